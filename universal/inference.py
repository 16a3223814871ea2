"""``segment()``: a CT in, one mask per class out, on the CT's own grid.

Pipeline (timed per stage in :attr:`Segmentation.timings`)::

    load      read the file (skipped for a Volume)               universal.io.load_volume
    model     load / move / re-prompt the model (cached)          universal.model.load_pretrained
    preprocess  foreground crop, 1.5 mm (fast: 3 mm), window      universal.preprocess.preprocess
    inference   Gaussian-weighted sliding window, threshold      sliding_window_predict (below)
    postprocess connected components and anatomy rules           universal.postprocess.postprocess
    resample    masks back onto the input grid                    universal.preprocess.resample_to_source

Design for memory and speed (measured in ``bench/inference.py``):

- **One backbone pass per window for all requested classes**: the model's forward computes the shared backbone once
  and the heads of every requested class in one batched computation; only the requested classes' heads run. The
  heads' intermediates (two ``(B, k, 8, N)`` float tensors, 1.8 GB for 32 classes and one 96³ window) are bounded
  by evaluating them in chunks of classes (``UniversalModel.head_chunk_size``, set for the call from a 32 MiB
  budget on CPU — one class per chunk at 96³, 2× faster than all at once — and 4 GiB on CUDA); the backbone is
  never re-run per chunk.
- **Windows are batched** (``sw_batch_size``: 4 on CUDA; 1 on CPU, where a batch of 2 gave no consistent speed-up and
  doubled the memory of a forward pass) and run under ``torch.inference_mode()``; on CUDA under
  ``torch.autocast(float16)``.
- **No full-size float accumulator.** Windows are visited in order of their start along the last axis (z), and the
  Gaussian-weighted logit sums are kept in a *rolling slab* buffer ``(K, X', Y', D)`` whose depth ``D`` is one
  window plus the z-spread of one batch of windows (96–144 voxels), not the whole volume. As soon as no remaining
  window can touch a z-slab, that slab is final: it is thresholded right there (``sum(w·logit) >= logit(t)·sum(w)``,
  which for t = 0.5 needs no division and no sigmoid) into boolean masks, and — only when asked — turned into
  float16 probabilities. The buffer is float32 (exactly MONAI's arithmetic, so results equal
  ``monai.inferers.sliding_window_inference(mode="gaussian")`` up to summation order) and the normalisation map is
  one channel shared by all classes. For 32 classes on a 233×167×191 grid this is ~0.5 GB of float32 slab instead
  of ~1 GB of float32 full accumulator + count map (+ ~1 GB more for MONAI's output and the sigmoid), and the
  saving grows with the scan length. (A float16 slab would halve the slab again but give up exact equality with
  MONAI; the forward pass, not the accumulator, is the larger part of the peak.)
- **Labels, not logits, are mapped back.** Post-processing runs on the prepared (1.5 mm) grid, and each class's
  final mask is mapped back with linear interpolation of the 0/1 mask thresholded at 0.5 (smooth boundaries, unlike
  nearest-neighbour staircases, while post-processing decisions stay exact), computed only over that class's
  bounding box (:func:`universal.preprocess.resample_to_source`). Probabilities, when requested, are mapped back
  linearly as float16.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from universal import exports, taxonomy
from universal import preprocess as pp
from universal.io import (
    Volume,
    atomic_folder,
    atomic_write_text,
    json_float,
    load_volume,
    save_mask,
    to_json,
)
from universal.predictor import model_device
from universal.spec import PRECISIONS

__all__ = [
    "STAGE_START",
    "Segmentation",
    "clear_model_cache",
    "gaussian_weights",
    "official_gaussian_weights",
    "segment",
    "sliding_window_predict",
    "window_starts",
]

ProgressFn = Callable[[str, float], None]

#: overall progress fraction at the start of each stage (one bar for the CLI and the app); stage → fraction
STAGE_START = {
    "load": 0.0,
    "model": 0.02,
    "preprocess": 0.05,
    "inference": 0.1,
    "postprocess": 0.85,
    "resample": 0.9,
    "done": 1.0,
}


# --------------------------------------------------------------------------------------------------- result
@dataclass
class Segmentation:
    """The result of :func:`segment`.

    Attributes:
        masks: Class name → boolean mask (X, Y, Z) on the input volume's RAS+ grid, in the requested order.
        volume: The input :class:`~universal.io.Volume`.
        probabilities: Class name → float16 sigmoid probabilities on the input grid (before post-processing), or
            ``None`` unless requested.
        volumes_ml: Class name → volume of the mask in millilitres.
        mean_hu: Class name → mean HU inside the mask (NaN for an empty mask).
        timings: Stage → seconds (``load``, ``model``, ``preprocess``, ``inference``, ``postprocess``,
            ``resample``, ``total``).
        info: Model backbone, encoder, template, device, spacing used, classes, settings and versions.
    """

    masks: dict[str, np.ndarray]
    volume: Any
    probabilities: dict[str, np.ndarray] | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    mean_hu: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """The class names, in order."""
        return list(self.masks)

    def label_map(self) -> np.ndarray:
        """int16 label map (X, Y, Z) with universal class ids (1..32), tumours drawn over their organs."""
        return taxonomy.masks_to_label_map(self.masks, list(self.masks))

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary: per-class volume (mL) and mean HU (``None`` when empty), timings (s), model info."""
        return {
            "case": getattr(self.volume, "name", "volume"),
            **to_json(self.info, ndigits=4, default=str),
            "classes": list(self.masks),
            "volumes_ml": {n: json_float(self.volumes_ml.get(n), 4) for n in self.masks},
            "mean_hu": {n: json_float(self.mean_hu.get(n), 4) for n in self.masks},
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},  # seconds
        }

    def save(self, outdir: str | os.PathLike, formats: str | Sequence[str] | None = None) -> dict[str, Path]:
        """Write the case folder ``outdir``: ``masks/<class_name>.nii.gz`` (uint8), ``labels.nii.gz`` (int16) and
        ``report.json``, all at once or not at all.

        ``formats`` (:func:`universal.exports.parse_formats`: names or ``"nifti,dicom-seg"``; default ``("nifti",)``)
        chooses the files beside ``report.json``, which is always written and lists them (``outputs``): ``nifti``
        (the masks and labels above), ``dicom-seg`` (``segmentation.dcm``), ``rtstruct`` (``rtstruct.dcm``),
        ``seg.nrrd`` (``segmentation.seg.nrrd``), ``report`` (``report.html``); see :mod:`universal.exports`.

        Masks and labels are written on the source file's own grid and affine (:func:`universal.io.save_mask`).
        Every file is written into a hidden temporary sibling folder (``.<name>.<random>.tmp``) that is renamed to
        ``outdir`` once complete (:func:`universal.io.atomic_folder`): a full disk, an error or an interruption
        (Ctrl+C, SIGTERM) leaves neither a half-written case nor a temporary file. An existing case folder (an
        earlier result) is replaced as a whole, so no mask of an earlier run with other classes stays beside the
        new ones; an existing file, or a folder that is not a case folder, is refused (:meth:`check_outdir`).
        Spaces in class names become underscores in file names.

        Returns:
            A dict ``{"masks": folder, "labels": path, "report": path}`` (``masks``/``labels`` with ``nifti``), plus
            format → path of each other format written (a format with no non-empty class writes no file).

        Raises:
            InputError: An unknown format, or ``dicom-seg``/``rtstruct`` for a CT not read from a DICOM series
                (checked before anything is written).
            FileExistsError: ``outdir`` is a file, or a folder that holds something else than a case.
            OSError: The folder cannot be written (read-only, disk full, ...); nothing is left behind.
        """
        chosen = exports.parse_formats(formats)
        exports.check_formats(chosen, [self.volume])
        out = Path(outdir)
        self.check_outdir(out)
        with atomic_folder(out) as tmp:
            written = self._write_files(tmp, chosen)
        paths = {"masks": out / "masks", "labels": out / "labels.nii.gz"} if "nifti" in chosen else {}
        paths.update((f, out / e.files[0]) for f, e in written.items() if f != "nifti" and e.files)
        return {**paths, "report": out / "report.json"}

    def _write_files(self, folder: Path, formats: Sequence[str] = exports.DEFAULT_FORMATS) -> dict[str, Any]:
        """Write every output file of the case into ``folder`` (an empty temporary folder that :meth:`save` renames
        into place afterwards): the one place where output files are written; each format's writer is
        :data:`universal.exports.WRITERS`, and ``report.json`` (always) records what they wrote (``outputs``).
        Returns format → :class:`universal.exports.Export`."""
        written = {
            f: self._write_nifti(folder) if f == "nifti" else exports.WRITERS[f](self, folder)
            for f in formats
        }
        report = self.report()
        report["outputs"] = {
            "formats": list(formats),
            "files": {f: list(e.files) for f, e in written.items()},
            "left_out": {f: list(e.left_out) for f, e in written.items() if e.left_out},
            "notes": list(dict.fromkeys(n for e in written.values() for n in e.notes)),
        }
        atomic_write_text(folder / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
        return written

    def _write_nifti(self, folder: Path) -> exports.Export:
        """``masks/<class>.nii.gz`` (uint8, every class) and ``labels.nii.gz`` (int16 universal ids) on the source
        file's own grid (:func:`universal.io.save_mask`)."""
        (folder / "masks").mkdir()
        for name, mask in self.masks.items():
            save_mask(mask, self.volume, folder / "masks" / f"{mask_file_stem(name)}.nii.gz", dtype=np.uint8)
        save_mask(self.label_map(), self.volume, folder / "labels.nii.gz", dtype=np.int16)
        return exports.Export(files=exports.FILE_NAMES["nifti"])

    #: what a case folder holds (:meth:`_write_files`); an existing folder holding only these may be replaced
    CASE_ENTRIES = frozenset({"report.json", *(n for names in exports.FILE_NAMES.values() for n in names)})

    @classmethod
    def check_outdir(cls, outdir: str | os.PathLike) -> None:
        """Raise unless :meth:`save` may (re)place a case folder at ``outdir``: it is absent, an empty folder, or an
        earlier case folder (its ``report.json`` is a report of :meth:`report`, or it holds only ``masks/*.nii.gz``,
        ``labels.nii.gz``, ``report.json``, the other formats' files (:data:`universal.exports.FILE_NAMES`) and
        hidden leftovers of an interrupted older version).

        Raises:
            FileExistsError: ``outdir`` is a file, or a folder that holds something else (never deleted).
        """
        out = Path(outdir)
        if out.is_symlink():
            out = out.resolve()
        if not os.path.lexists(out):
            return
        if not out.is_dir():
            raise FileExistsError(errno.EEXIST, "exists and is not a folder (a case is a folder)", str(out))
        entries = list(out.iterdir())
        if not entries or _is_report(out / "report.json"):
            return
        masks = out / "masks"
        known = all(e.name in cls.CASE_ENTRIES or e.name.startswith(".") for e in entries)
        if known and (not masks.is_dir() or all(_is_mask_file(m) for m in masks.iterdir())):
            return
        raise FileExistsError(
            errno.EEXIST,
            "exists and is not a case folder of `universal segment` (it holds other files, which are never "
            "replaced); choose another output folder or move it away",
            str(out),
        )


def _is_report(path: Path) -> bool:
    """Whether ``path`` is a ``report.json`` written by :meth:`Segmentation.save`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"case", "classes", "volumes_ml"} <= set(data)


def _is_mask_file(path: Path) -> bool:
    return path.name.startswith(".") or (path.is_file() and path.name.endswith(".nii.gz"))


def mask_file_stem(name: str) -> str:
    """File stem of a class's mask: ``"liver tumor"`` → ``"liver_tumor"``."""
    return name.strip().replace(" ", "_")


# -------------------------------------------------------------------------------------------------- segment
def segment(
    volume_or_path,
    classes: Sequence[str] | None = None,
    *,
    model=None,
    template: str | None = None,
    device=None,
    fast: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    patch_size: int | Sequence[int] | None = None,
    return_probabilities: bool = False,
    postprocess=True,
    progress: ProgressFn | None = None,
    threshold: float | None = None,
    preprocess_config=None,
    precision: str | None = None,
    convention: str | None = None,
) -> Segmentation:
    """Segment the requested classes of a CT: ``Predictor(model, **settings).predict(volume_or_path)``.

    A thin wrapper for one call; to segment many CTs build a :class:`~universal.predictor.Predictor` once. Every
    setting left at ``None`` takes the value of the model's :class:`~universal.spec.ModelSpec` (window size,
    overlap, threshold, precision, spacing, HU window, crop). See :class:`~universal.predictor.PredictorSettings`
    for each setting (``preprocess_config`` is its ``preprocessing``; ``convention="official"`` runs the official
    release's MONAI chain, the default for its checkpoints: ``docs/ARCHITECTURE.md``).

    Args:
        volume_or_path: A :class:`~universal.io.Volume` or a path that :func:`universal.io.load_volume` reads.
        classes: Class names; ``None`` = all of the model's classes. Only these classes' heads are computed.
        model: A ``UniversalModel``, a pretrained name or checkpoint path, or ``None`` for the built-in model
            (loaded once per process; the given model is never changed).

    Returns:
        A :class:`Segmentation` on the input volume's grid.

    Raises:
        InputError: An invalid setting, an absent device, or a file that cannot be read as a CT.
        ClassNameError: A class name that does not exist or that the model does not segment.

    >>> import universal  # doctest: +SKIP
    >>> seg = universal.segment("ct.nii.gz", classes=["liver", "liver tumor"])  # doctest: +SKIP
    >>> seg.volumes_ml["liver"], seg.save("out/")  # doctest: +SKIP
    """
    from universal.predictor import Predictor, PredictorSettings

    _check_input_type(volume_or_path)
    settings = PredictorSettings(
        device=device,
        precision=precision,
        overlap=overlap,
        threshold=threshold,
        fast=fast,
        postprocess=postprocess,
        classes=classes,
        template=template,
        sw_batch_size=sw_batch_size,
        patch_size=patch_size,
        preprocessing=preprocess_config,
        return_probabilities=return_probabilities,
        convention=convention,
    )
    return Predictor(model, settings).predict(volume_or_path, progress)


def run_pipeline(
    predictor, volume_or_path, progress: ProgressFn | None = None, *, series: str | None = None
) -> Segmentation:
    """The stages of :meth:`Predictor.predict`: load (``series``: the DICOM series of a path, see
    :func:`~universal.io.load_volume`), preprocess, sliding window, post-process, map back; the first two are
    :func:`prepare_case`, the others :func:`finish_case`."""
    return finish_case(predictor, prepare_case(predictor, volume_or_path, progress, series=series), progress)


@dataclass
class PreparedCase:
    """A CT read and prepared for the network (the first half of a run, :func:`prepare_case`); a batch prepares the
    next case in a worker thread while the current one runs (``universal.batch``).

    Attributes:
        volume: The checked input :class:`~universal.io.Volume`.
        prepared: The prepared grid (``universal.preprocess.prepare``), with the way back.
        timings: Seconds of ``load`` and ``preprocess``.
        seconds: Wall seconds of the whole first half.
        series: The DICOM series asked for (``series=``; reported, so that a batch resumes only onto it).
    """

    volume: Any
    prepared: Any
    timings: dict[str, float]
    seconds: float
    series: str | None = None


def prepare_case(
    predictor, volume_or_path, progress: ProgressFn | None = None, *, series: str | None = None
) -> PreparedCase:
    """Read (``series``: see :func:`~universal.io.load_volume`) and preprocess one CT with ``predictor``'s
    resolved settings. Raises what ``load_volume`` and ``preprocess.prepare`` raise (``InputError`` ...)."""
    r = predictor.resolved
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    clock = _StageClock(timings, _progress_reporter(progress))
    with clock("load"):
        volume = _as_volume(volume_or_path, series)
    max_voxels = getattr(predictor.settings, "max_voxels", None) or pp.MAX_PREPARED_VOXELS
    with clock("preprocess"):
        prepared = pp.prepare(volume, r.preprocessing, max_voxels=max_voxels)  # by the grid convention
    series = None if series is None else str(series)
    return PreparedCase(volume, prepared, timings, time.perf_counter() - t_start, series)


def finish_case(predictor, case: PreparedCase, progress: ProgressFn | None = None) -> Segmentation:
    """Sliding window, post-processing and mapping back of a :class:`PreparedCase` → :class:`Segmentation`
    (``timings["total"]``: both halves plus the model's loading, reported in the Predictor's first case): the
    network half (:func:`network_case`) then the CPU half (:func:`complete_case`)."""
    return complete_case(predictor, network_case(predictor, case, progress), progress)


@dataclass
class InferredCase:
    """A case after the network (:func:`network_case`), before post-processing: the device's part of the work is
    done, so a batch post-processes and writes it in a worker thread while the next case runs on the device.

    Attributes:
        case: The :class:`PreparedCase` it came from.
        masks: One bool mask per class on the prepared grid (the Predictor's class order).
        probabilities: Their probabilities when asked for (``return_probabilities``), else ``None``.
        timings: Seconds of ``load``, ``model``, ``preprocess`` and ``inference``.
        seconds: Wall seconds of the network half (its model-loading seconds excluded).
    """

    case: PreparedCase
    masks: list
    probabilities: Any
    timings: dict[str, float]
    seconds: float


def network_case(predictor, case: PreparedCase, progress: ProgressFn | None = None) -> InferredCase:
    """The sliding window of a :class:`PreparedCase` on the Predictor's device → :class:`InferredCase` (the masks
    are on the CPU, the device is free for the next case). Raises what the network raises."""
    r = predictor.resolved
    t_start = time.perf_counter()
    report = _progress_reporter(progress)
    timings: dict[str, float] = {"load": case.timings["load"], "model": predictor.take_load_seconds()}
    timings.update((k, v) for k, v in case.timings.items() if k != "load")
    clock = _StageClock(timings, report)
    with clock("inference"):
        infer = _infer_official if r.preprocessing.convention == "official" else _infer
        masks_p, probs_p = infer(predictor, case.prepared.array, lambda f: report("inference", f))
    return InferredCase(case, masks_p, probs_p, timings, time.perf_counter() - t_start)


def complete_case(predictor, inferred: InferredCase, progress: ProgressFn | None = None) -> Segmentation:
    """Post-processing, mapping back and measuring of an :class:`InferredCase` → :class:`Segmentation` (CPU only:
    no model call, safe in a worker thread while the device runs the next case). Its mask lists are consumed."""
    r = predictor.resolved
    t_start = time.perf_counter()
    report = _progress_reporter(progress)
    volume, prepared = inferred.case.volume, inferred.case.prepared
    timings = dict(inferred.timings)
    clock = _StageClock(timings, report)
    masks_p, probs_p = inferred.masks, inferred.probabilities
    inferred.masks, inferred.probabilities = [], None  # the only references left are ours: freed as mapped
    with clock("postprocess"):
        masks_prep = _postprocess(dict(zip(r.classes, masks_p)), volume, prepared, r.postprocess)
    del masks_p
    with clock("resample"):
        masks, probabilities = _map_back(masks_prep, probs_p, prepared, list(r.classes), report)
    volumes_ml, mean_hu = _measure(masks, volume)
    own = time.perf_counter() - t_start
    timings["total"] = inferred.case.seconds + inferred.seconds + own + timings["model"]
    report("done", 1.0)
    return Segmentation(
        masks=masks,
        volume=volume,
        probabilities=probabilities,
        volumes_ml=volumes_ml,
        mean_hu=mean_hu,
        timings=timings,
        info={**_info(predictor, prepared, inferred.case.series), "warnings": list(volume.notes or ())},
    )


class _StageClock:
    """``with clock("stage"):`` reports the stage's start and records its seconds in ``timings``."""

    def __init__(self, timings: dict[str, float], report: Callable[[str, float], None]) -> None:
        self.timings, self.report = timings, report

    @contextmanager
    def __call__(self, stage: str):
        self.report(stage, 0.0)
        t = time.perf_counter()
        yield
        self.timings[stage] = time.perf_counter() - t


def _infer(predictor, image: np.ndarray, progress: Callable[[float], None]):
    import torch

    r, net, dev = predictor.resolved, predictor.model, predictor.device
    with _eval_mode(net), _head_chunking(net, r.sw_batch_size, r.patch_size, dev):
        out = sliding_window_predict(
            image,
            net,
            list(r.classes),
            patch_size=r.patch_size,
            overlap=r.overlap,
            sw_batch_size=r.sw_batch_size,
            device=dev,
            threshold=r.threshold,
            return_probabilities=r.return_probabilities,
            progress=progress,
            precision=r.precision,
        )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out


def _infer_official(predictor, image: np.ndarray, progress: Callable[[float], None]):
    """The official chain's steps 7-8: MONAI's ``sliding_window_inference`` with MONAI 0.9.0's Gaussian blending
    (:func:`official_gaussian_weights`, as the release pins), sigmoid, ``prob > threshold``.

    Returns ``(masks, probabilities)``: a list of bool (X', Y', Z') masks and the float32 (K, X', Y', Z')
    probabilities (or ``None`` unless asked). The arithmetic is MONAI's (full float32 accumulator and count map),
    so that results equal the official chain's with the same weights, not merely up to summation order.
    """
    import torch
    from monai.inferers import sliding_window_inference

    r, net, dev = predictor.resolved, predictor.model, predictor.device
    classes = list(r.classes)
    autocast_dtype = autocast_dtype_for(dev, r.precision)
    n_windows = len(_WindowPlan(image.shape, tuple(r.patch_size), r.overlap, 1).windows)
    done = [0]

    def forward(x):
        with _autocast(dev, autocast_dtype):
            logits = net(x, classes=classes)
        done[0] += int(x.shape[0])
        progress(min(1.0, done[0] / n_windows))
        return logits.float()

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(dev)
    weights = official_gaussian_weights(r.patch_size).to(dev)
    with _eval_mode(net), _head_chunking(net, r.sw_batch_size, r.patch_size, dev), torch.inference_mode():
        logits = sliding_window_inference(
            x, tuple(r.patch_size), r.sw_batch_size, forward, overlap=r.overlap, mode="gaussian",
            roi_weight_map=weights,
        )  # fmt: skip
        probs = logits[0].sigmoid_()  # in place: no second (K, X', Y', Z') float32 array
        del logits
        masks = [m.numpy() for m in (probs > r.threshold).cpu()]
        probs = probs.cpu().numpy() if r.return_probabilities else None
    return masks, probs


def official_gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 0.125):
    """MONAI 0.9.0's Gaussian importance map (the blending of the official release, which pins MONAI 0.9.0).

    A unit impulse at index ``size // 2`` on each axis (half a voxel off the geometric centre for an even size)
    blurred with MONAI's ``GaussianFilter`` (sigma = ``sigma_scale`` × size per axis) and divided by its maximum:
    the centre weight is exactly 1 and nothing is floored (corner weights ≈ 4e-11 for 96³). MONAI ≥ 1.x
    (:func:`gaussian_weights`) samples a closed-form Gaussian centred on ``(size - 1) / 2`` and floors it at 1e-3;
    with the same weights and input the two blendings differ by up to ~7e-3 in probability
    (../shared/reference/OFFICIAL_PIPELINE.md, "MONAI version"). Returns a float32 tensor ``(1, 1, *patch_size)``.
    """
    return _official_gaussian_weights(tuple(int(p) for p in patch_size), float(sigma_scale)).clone()


@functools.lru_cache(maxsize=4)
def _official_gaussian_weights(patch_size: tuple[int, ...], sigma_scale: float):
    import torch
    from monai.networks.layers import GaussianFilter

    impulse = torch.zeros(patch_size, dtype=torch.float32)
    impulse[tuple(p // 2 for p in patch_size)] = 1.0
    blur = GaussianFilter(len(patch_size), [p * sigma_scale for p in patch_size])
    with torch.no_grad():
        w = blur(impulse[None, None])
    w = w / torch.max(w)
    if bool((w == 0).any()):  # as MONAI 0.9.0: no zero weight (a window must count where it lies)
        w[w == 0] = torch.min(w[w != 0])
    return w.float()


def _postprocess(masks: dict[str, np.ndarray], volume, prepared, config) -> dict[str, np.ndarray]:
    """Component rules on the prepared grid; sides are decided against the body midline of the source CT."""
    if config is None:
        return masks
    from universal import postprocess as post

    body_x = post.body_midline_x_mm(volume.array, volume.affine) if _has_paired(masks) else None
    return dict(post.postprocess(masks, prepared.affine, config, body_x_mm=body_x))


def _map_back(masks_prep, probs_p, prepared, names: list[str], report):
    """Each class's mask (and probabilities) back onto the input grid; each prepared array is dropped once mapped.

    Official convention: all masks go back in one nearest-neighbour ``Invertd`` (packed as bits), probabilities
    in one bilinear ``Invertd`` of their stack (:meth:`universal.preprocess.OfficialPrepared.to_source`)."""
    if prepared.config.convention == "official":
        report("resample", 0.0)
        stack = np.stack([np.asarray(masks_prep.pop(n), dtype=bool) for n in names])
        masks = dict(zip(names, prepared.to_source(stack, order=0)))
        del stack
        probabilities = None
        if probs_p is not None:
            probs = probs_p if isinstance(probs_p, np.ndarray) else np.stack(probs_p)
            probabilities = dict(zip(names, prepared.to_source(probs, order=1)))
        return masks, probabilities
    masks: dict[str, np.ndarray] = {}
    probabilities: dict[str, np.ndarray] | None = {} if probs_p is not None else None
    for i, name in enumerate(names):
        report("resample", i / max(1, len(names)))
        masks[name] = pp.resample_to_source(np.asarray(masks_prep.pop(name), dtype=bool), prepared, order=1)
        if probabilities is not None:
            probabilities[name] = pp.resample_to_source(probs_p[i], prepared, order=1)
            probs_p[i] = None
    return masks, probabilities


def _measure(masks: dict[str, np.ndarray], volume) -> tuple[dict[str, float], dict[str, float]]:
    """Volume (mL) and mean HU (NaN when empty) of each mask."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(volume.affine)[:3, :3]))) / 1000.0
    hu = np.asarray(volume.array)
    volumes_ml = {n: float(np.count_nonzero(m)) * voxel_ml for n, m in masks.items()}
    mean_hu = {
        n: (float(hu[m].mean(dtype=np.float64)) if m.any() else float("nan")) for n, m in masks.items()
    }
    return volumes_ml, mean_hu


# ------------------------------------------------------------------------------------------- sliding window
def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis (MONAI's ``dense_patch_slices`` rule).

    The interval is ``int(patch * (1 - overlap))`` (at least 1); the last window is moved back to end at ``size``.

    >>> window_starts(233, 96, 0.25), window_starts(96, 96, 0.5), window_starts(191, 96, 0.5)
    ([0, 72, 137], [0], [0, 48, 95])
    """
    if size <= patch:
        return [0]
    interval = max(1, int(patch * (1 - overlap)))
    starts = []
    for d in range(int(math.ceil(size / interval))):
        s = d * interval
        starts.append(min(s, size - patch))
        if s + patch >= size:
            break
    return starts


def gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 0.125):
    """The Gaussian window weights of MONAI's ``compute_importance_map(mode="gaussian")`` (float32 tensor).

    Separable Gaussian centred on the window, sigma = ``sigma_scale`` × size per axis, peak 1, clamped below at
    max(min, 1e-3). Computed here so that inference does not import MONAI.
    """
    import torch

    w = None
    for i, p in enumerate(patch_size):
        x = torch.arange(start=-(p - 1) / 2.0, end=(p - 1) / 2.0 + 1, dtype=torch.float)
        x = torch.exp(x**2 / (-2 * (p * sigma_scale) ** 2))
        w = x if i == 0 else w.unsqueeze(-1) * x[(None,) * i]
    floor = max(float(w.min()), 1e-3)
    return torch.clamp(w, min=floor)


def sliding_window_predict(
    image: np.ndarray,
    model,
    classes: Sequence[str] | None = None,
    *,
    patch_size: Sequence[int] = (96, 96, 96),
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    device=None,
    threshold: float = 0.5,
    return_probabilities: bool = False,
    progress: Callable[[float], None] | None = None,
    precision: str = "float32",
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """Gaussian-weighted sliding-window prediction of a preprocessed volume, thresholded slab by slab.

    Equivalent to ``sigmoid(monai.inferers.sliding_window_inference(x, patch_size, sw_batch_size, model,
    overlap, mode="gaussian")) >= threshold`` (same windows, Gaussian map, zero padding and float32 accumulation),
    but the accumulator only spans a rolling slab of the last axis (module docstring); one bool (X, Y, Z) mask
    (and optionally float16 probabilities) per class.

    Args:
        image: float32 (X, Y, Z) network input (intensities in [0, 1]).
        model: Callable ``model(x (B, 1, px, py, pz), classes=list[str]) -> logits (B, k, px, py, pz)``.
        classes: Class names passed to the model (``None``: the model's ``class_names``).
        patch_size, overlap, sw_batch_size: Window size (voxels), relative overlap, windows per forward pass.
        device: Device of the forward passes (default: the model's). threshold: of the masks.
        return_probabilities: Also return float16 sigmoid probabilities.
        progress: ``callback(fraction of windows done)``.
        precision: Autocast dtype of the forward passes (default ``"float32"``: MONAI's arithmetic).

    Returns:
        ``(masks, probabilities)``: lists (one per class) of bool (X, Y, Z) arrays and float16 arrays (or ``None``).
    """
    import torch

    classes = list(model.class_names if classes is None else classes)
    device = torch.device(model_device(model) if device is None else device)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) image, got shape {image.shape}")
    patch = tuple(int(p) for p in (patch_size if isinstance(patch_size, Sequence) else (patch_size,) * 3))
    plan = _WindowPlan(image.shape, patch, overlap, sw_batch_size)
    slab = _Slab(plan, len(classes), device, threshold, return_probabilities)
    img = plan.padded(image).to(device)
    autocast_dtype = autocast_dtype_for(device, precision)
    n_done = 0
    with torch.inference_mode():
        for bi, batch in enumerate(plan.batches):
            slab.shift_to(batch[0][2])
            slab.add(batch, _forward(model, img, batch, patch, classes, device, autocast_dtype))
            n_done += len(batch)
            # everything below the next batch's first z is final
            slab.finalize_below(plan.batches[bi + 1][0][2] if bi + 1 < len(plan.batches) else plan.full[2])
            if progress is not None:
                progress(n_done / len(plan.windows))
    return slab.masks, slab.probs


def _forward(model, img, batch, patch, classes, device, autocast_dtype):
    """float32 logits (B, k, *patch) of one batch of windows (checked against what was asked)."""
    import torch

    x = torch.stack([img[wx : wx + patch[0], wy : wy + patch[1], wz : wz + patch[2]] for wx, wy, wz in batch])
    with _autocast(device, autocast_dtype):
        logits = model(x.unsqueeze(1), classes=classes)
    if logits.shape[1] != len(classes) or tuple(logits.shape[2:]) != patch:
        raise RuntimeError(
            f"the model returned {tuple(logits.shape)} for {len(classes)} classes and windows {patch}"
        )
    return logits.float()


def _autocast(device, dtype):
    import torch

    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


class _WindowPlan:
    """The windows of one volume (MONAI's rule), in order of their z start, batched, and the rolling buffer depth.

    MONAI pads inputs smaller than a window with zeros, split half before / half after; so does this plan.
    """

    def __init__(self, shape: Sequence[int], patch: tuple[int, int, int], overlap: float, batch: int) -> None:
        self.shape = tuple(int(v) for v in shape)
        self.patch = patch
        self.pad_before = [max(p - s, 0) // 2 for s, p in zip(self.shape, patch)]
        self.full = tuple(max(s, p) for s, p in zip(self.shape, patch))
        starts = [window_starts(self.full[a], patch[a], overlap) for a in range(3)]
        self.windows = sorted(
            ((x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]),
            key=lambda w: (w[2], w[0], w[1]),
        )
        self.batches = [self.windows[i : i + batch] for i in range(0, len(self.windows), batch)]
        # before batch b the buffer starts at the first z of batch b (everything before is final)
        self.depth = max(max(w[2] for w in b) + patch[2] - b[0][2] for b in self.batches)

    def padded(self, image: np.ndarray):
        import torch

        img = torch.zeros(self.full, dtype=torch.float32)
        img[tuple(slice(b, b + s) for b, s in zip(self.pad_before, self.shape))] = torch.from_numpy(image)
        return img


class _Slab:
    """Gaussian-weighted logit sums over a rolling z-slab; final slabs are thresholded into the output masks."""

    def __init__(self, plan: _WindowPlan, k: int, device, threshold: float, with_probs: bool) -> None:
        import torch

        self.plan, self.k = plan, k
        full, depth = plan.full, plan.depth
        self.weight = gaussian_weights(plan.patch).to(device)
        self.acc = torch.zeros((k, full[0], full[1], depth), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((full[0], full[1], depth), dtype=torch.float32, device=device)
        self.masks = [np.zeros(plan.shape, dtype=bool) for _ in range(k)]
        self.probs = [np.zeros(plan.shape, dtype=np.float16) for _ in range(k)] if with_probs else None
        self.logit_thr = float(math.log(threshold / (1.0 - threshold)))
        self.buf0 = 0  # padded z of buffer index 0

    def shift_to(self, z_first: int) -> None:
        """Move the buffer to start at ``z_first`` ([buf0, z_first) is final and was finalised)."""
        if z_first <= self.buf0:
            return
        s, depth = z_first - self.buf0, self.plan.depth
        if s < depth:
            self.acc[..., : depth - s] = self.acc[..., s:].clone()
            self.wsum[..., : depth - s] = self.wsum[..., s:].clone()
            self.acc[..., depth - s :] = 0
            self.wsum[..., depth - s :] = 0
        else:
            self.acc.zero_()
            self.wsum.zero_()
        self.buf0 = z_first

    def add(self, batch, logits) -> None:
        p = self.plan.patch
        for (wx, wy, wz), lg in zip(batch, logits):
            sl = (slice(wx, wx + p[0]), slice(wy, wy + p[1]), slice(wz - self.buf0, wz - self.buf0 + p[2]))
            self.acc[(slice(None), *sl)].addcmul_(lg, self.weight)
            self.wsum[sl].add_(self.weight)

    def finalize_below(self, z1: int) -> None:
        """Threshold the final slab [buf0, z1) (padded z), keeping only the unpadded part."""
        import torch

        pad, shape = self.plan.pad_before, self.plan.shape
        lo, hi = max(self.buf0, pad[2]), min(z1, pad[2] + shape[2])
        if z1 <= self.buf0 or hi <= lo:
            return
        crop_xy = (slice(pad[0], pad[0] + shape[0]), slice(pad[1], pad[1] + shape[1]))
        sl = (slice(None), *crop_xy, slice(lo - self.buf0, hi - self.buf0))
        a, w = self.acc[sl], self.wsum[sl[1:]]
        out_z = slice(lo - pad[2], hi - pad[2])
        m = ((a >= w * self.logit_thr) if self.logit_thr != 0.0 else (a >= 0)).cpu().numpy()
        for c in range(self.k):
            self.masks[c][:, :, out_z] = m[c]
        if self.probs is not None:
            prob = torch.sigmoid(a / w).to(torch.float16).cpu().numpy()
            for c in range(self.k):
                self.probs[c][:, :, out_z] = prob[c]


# ------------------------------------------------------------------------------------------------- helpers


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU runs bfloat16 convolutions natively (oneDNN on AVX512-BF16/AMX); 1.5x faster there."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - an older/other build without the probe
        return False


def autocast_dtype_for(device, precision: str = "auto"):
    """The autocast dtype of forward passes on ``device`` for ``precision`` (``None`` = plain float32).

    >>> import torch
    >>> autocast_dtype_for(torch.device("cuda"), "auto")
    torch.float16
    >>> autocast_dtype_for(torch.device("cpu"), "float32") is None
    True
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "float32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bfloat16() else None
    return getattr(torch, precision)


def clear_model_cache() -> None:
    """Forget the models loaded by name (frees their memory)."""
    from universal.predictor import clear_model_cache as clear

    clear()


def _as_volume(volume_or_path, series: str | None = None) -> Volume:
    """The checked CT of a run: a path is read (and checked) by ``load_volume``; a Volume that was never checked
    (built directly, ``check=False``, any object with ``array`` and ``affine``) is checked here like a file
    (:func:`universal.io.checked_volume`: no second pass for a volume that was, and no copy of the array)."""
    from universal.io import checked_volume

    if isinstance(volume_or_path, (str, os.PathLike)):
        return load_volume(volume_or_path, series=series)
    _check_input_type(volume_or_path)
    return checked_volume(volume_or_path)


@contextmanager
def _eval_mode(net):
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


#: memory budget (MiB) of the dynamic heads' intermediates per forward pass on CPU (cache-friendly: at 96³ one class
#: per chunk, which measured 2× faster than all 32 classes at once); :data:`HEAD_MEMORY_MB_CUDA` on CUDA
HEAD_MEMORY_MB = 32
HEAD_MEMORY_MB_CUDA = 4096


@contextmanager
def _head_chunking(net, batch: int, patch: Sequence[int], device):
    """Bound the memory of the dynamic heads by evaluating them in chunks of classes (restored afterwards).

    The heads' largest intermediates are two ``(B, k, 8, N)`` float tensors: 1.8 GB for 32 classes and one 96³
    window, and streaming them through memory made the heads cost 40 % of a window on CPU. Small chunks keep the
    intermediates near the cache (measured on 2 CPU cores, 96³, 32 classes: 0.85 s all at once, 0.42 s one class at
    a time; backbone 1.25 s). The backbone still runs once per window; only the heads are chunked. A model whose
    ``head_chunk_size`` is already set is left as it is.
    """
    if not hasattr(net, "head_chunk_size") or net.head_chunk_size is not None:
        yield
        return
    budget = (HEAD_MEMORY_MB_CUDA if device.type == "cuda" else HEAD_MEMORY_MB) * 2**20
    per_class = 2 * batch * 8 * math.prod(patch) * 4
    net.head_chunk_size = max(1, int(budget // per_class))
    try:
        yield
    finally:
        net.head_chunk_size = None


def _check_input_type(volume_or_path) -> None:
    if isinstance(volume_or_path, (str, os.PathLike)) or (
        hasattr(volume_or_path, "array") and hasattr(volume_or_path, "affine")
    ):
        return
    raise TypeError(f"segment() needs a Volume or a path, got {type(volume_or_path).__name__}")


def _has_paired(names) -> bool:
    return any(taxonomy.resolve_class(n).paired is not None for n in names)


def _progress_reporter(progress: ProgressFn | None) -> Callable[[str, float], None]:
    order = list(STAGE_START)

    def report(stage: str, fraction: float) -> None:
        if progress is None:
            return
        start = STAGE_START[stage]
        nxt = order.index(stage) + 1
        end = STAGE_START[order[nxt]] if nxt < len(order) else 1.0
        progress(stage, float(start + (end - start) * min(1.0, max(0.0, fraction))))

    return report


def precision_name(predictor) -> str:
    """The arithmetic ``predictor`` runs its forward passes in, as reports state it (``float32``, ``bfloat16``,
    ``float16``): its precision setting resolved for its device."""
    ac = autocast_dtype_for(predictor.device, predictor.resolved.precision)
    return "float32" if ac is None else str(ac).replace("torch.", "")


def _info(predictor, prepared, series: str | None = None) -> dict[str, Any]:
    """What a report says about the run: the model (and its file's sha256), its contract's provenance, the
    settings used (``series``: the DICOM series asked for), versions."""
    import torch

    import universal
    from universal.predictor import postprocess_record

    r, net = predictor.resolved, predictor.model
    spec = predictor.spec
    return {
        "model": predictor.model_label,
        "weights_sha256": predictor.weights_sha256,
        "series": series,
        "backbone": getattr(net, "backbone_name", None),
        "encoder": getattr(net, "encoder_name", None),
        "template": getattr(net, "template", None),
        "device": str(predictor.device),
        "spacing_mm": [round(float(s), 4) for s in prepared.spacing],
        "target_spacing_mm": list(prepared.config.target_spacing()),
        "fast": r.fast,
        "crop_foreground": bool(prepared.config.crop_foreground),
        "convention": prepared.config.convention,
        "hu_window": list(prepared.config.hu_window),
        "crop_box": [list(b) for b in prepared.box],  # official convention: on the resampled grid
        "prepared_shape": list(prepared.shape),
        **(
            {"resampled_shape": list(prepared.resampled_shape)}
            if hasattr(prepared, "resampled_shape")
            else {}
        ),
        "blending": "monai-0.9.0" if prepared.config.convention == "official" else "monai-1.x",
        "classes": list(r.classes),
        "patch_size": list(r.patch_size),
        "overlap": float(r.overlap),
        "sw_batch_size": int(r.sw_batch_size),
        "threshold": float(r.threshold),
        "postprocess": postprocess_record(r.postprocess),
        "precision": precision_name(predictor),
        "provenance": dataclasses.asdict(spec.provenance) if spec is not None else None,
        "versions": {
            "universal": universal.__version__,
            "torch": torch.__version__,
            "monai": _package_version("monai"),
            "numpy": np.__version__,
        },
    }


def _package_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (MONAI is slow to import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
