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

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Segmentation",
    "clear_model_cache",
    "gaussian_weights",
    "segment",
    "sliding_window_predict",
    "window_starts",
]

ProgressFn = Callable[[str, float], None]

# overall progress fraction at the start of each stage (a single bar for the CLI and the app)
_STAGE_START = {
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
        from universal import taxonomy

        return taxonomy.masks_to_label_map(self.masks, list(self.masks))

    def report(self) -> dict[str, Any]:
        """A JSON-ready summary: per-class volume (mL) and mean HU (``None`` when empty), timings (s), model info."""
        return {
            "case": getattr(self.volume, "name", "volume"),
            **{k: _jsonable(v) for k, v in self.info.items()},
            "classes": list(self.masks),
            "volumes_ml": {n: _json_float(self.volumes_ml.get(n)) for n in self.masks},
            "mean_hu": {n: _json_float(self.mean_hu.get(n)) for n in self.masks},
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},  # seconds
        }

    def save(self, outdir: str | os.PathLike) -> dict[str, Path]:
        """Write ``masks/<class_name>.nii.gz`` (uint8), ``labels.nii.gz`` (int16) and ``report.json``.

        Masks and labels are written on the source file's own grid and affine (:func:`universal.io.save_mask`);
        every write is atomic. Spaces in class names become underscores in file names.

        Returns:
            A dict ``{"masks": folder, "labels": path, "report": path}``.
        """
        from universal.io import save_mask

        out = Path(outdir)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        for name, mask in self.masks.items():
            save_mask(mask, self.volume, out / "masks" / f"{mask_file_stem(name)}.nii.gz", dtype=np.uint8)
        save_mask(self.label_map(), self.volume, out / "labels.nii.gz", dtype=np.int16)
        report = out / "report.json"
        from universal.io import atomic_write_text

        atomic_write_text(report, json.dumps(self.report(), indent=2, allow_nan=False) + "\n")
        return {"masks": out / "masks", "labels": out / "labels.nii.gz", "report": report}


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
    overlap: float = 0.25,
    sw_batch_size: int | None = None,
    patch_size: int | Sequence[int] | None = None,
    return_probabilities: bool = False,
    postprocess=True,
    progress: ProgressFn | None = None,
    threshold: float = 0.5,
    preprocess_config=None,
    precision: str = "auto",
) -> Segmentation:
    """Segment the requested classes of a CT.

    Args:
        volume_or_path: A :class:`~universal.io.Volume` or a path that :func:`universal.io.load_volume` reads.
        classes: Class names (any spelling :func:`universal.taxonomy.resolve_class` accepts); ``None`` = all of the
            model's classes. Only these classes' heads are computed.
        model: A ``UniversalModel``, a pretrained name or checkpoint path (:func:`universal.model.load_pretrained`),
            or ``None`` for the built-in model (loaded once per process).
        template: Prompt template (key such as ``"ct"`` or a text with ``{}``); when it differs from the model's,
            a re-prompted copy is used (the given or cached model is not changed).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; ``None`` = CUDA when available.
        fast: Work at 3 mm instead of the model's spacing (1.5 mm: ≈ 8× fewer voxels; coarser masks).
        overlap: Fraction of overlap between neighbouring 96³ windows (the paper's code uses 0.5).
        sw_batch_size: Windows per forward pass (default 4 on CUDA; 1 on CPU, where batching gains no speed and
            doubles the memory of a forward pass).
        patch_size: Window size in voxels (default: the model's training window if recorded, else 96).
        return_probabilities: Also return float16 probabilities on the input grid.
        postprocess: ``True`` (default rules), ``False``/``None`` (raw thresholded masks) or a
            :class:`universal.postprocess.PostprocessConfig`.
        progress: ``callback(stage, fraction)`` with ``fraction`` the overall progress in [0, 1].
        threshold: Probability threshold of the masks.
        preprocess_config: A :class:`universal.preprocess.PreprocessConfig` overriding the spacing/window/crop
            (``fast`` is then ignored).
        precision: Arithmetic of the forward passes: ``"auto"`` (float16 autocast on CUDA, bfloat16 autocast on a
            CPU with native bfloat16 support, else float32), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
            Accumulation and thresholding are float32 in every case.

    Returns:
        A :class:`Segmentation` on the input volume's grid.

    Raises:
        ClassNameError: A class name that does not exist or that the model does not segment.
        InputError: A file that cannot be read as a CT.

    >>> import universal  # doctest: +SKIP
    >>> seg = universal.segment("ct.nii.gz", classes=["liver", "liver tumor"])  # doctest: +SKIP
    >>> seg.volumes_ml["liver"], seg.save("out/")  # doctest: +SKIP
    """
    import torch

    from universal import preprocess as pp

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    report = _progress_reporter(progress)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    pp_config = _postprocess_config(postprocess)  # validated before any work
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    # load
    report("load", 0.0)
    t = time.perf_counter()
    volume = _as_volume(volume_or_path)
    timings["load"] = time.perf_counter() - t

    # model
    report("model", 0.0)
    t = time.perf_counter()
    dev = _resolve_device(device)
    net, model_label = _prepare_model(model, template, dev)
    names = _resolve_requested(classes, net)
    timings["model"] = time.perf_counter() - t

    # preprocess
    report("preprocess", 0.0)
    t = time.perf_counter()
    if preprocess_config is None:
        preprocess_config = _preprocess_config(net, fast)
    prepared = pp.preprocess(volume, preprocess_config)
    timings["preprocess"] = time.perf_counter() - t

    # inference
    report("inference", 0.0)
    t = time.perf_counter()
    psize = _patch_size(patch_size, net)
    bs = sw_batch_size or (4 if dev.type == "cuda" else 1)
    with _eval_mode(net), _head_chunking(net, bs, psize, dev):
        masks_p, probs_p = sliding_window_predict(
            prepared.array,
            net,
            names,
            patch_size=psize,
            overlap=overlap,
            sw_batch_size=bs,
            device=dev,
            threshold=threshold,
            return_probabilities=return_probabilities,
            progress=lambda f: report("inference", f),
            precision=precision,
        )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timings["inference"] = time.perf_counter() - t

    # postprocess (on the prepared grid)
    report("postprocess", 0.0)
    t = time.perf_counter()
    masks_prep = dict(zip(names, masks_p))
    del masks_p
    if pp_config is not None:
        from universal import postprocess as post

        body_x = None
        if _has_paired(names):  # sides are decided against the body's midline, measured on the source CT
            body_x = post.body_midline_x_mm(volume.array, volume.affine)
        masks_prep = dict(post.postprocess(masks_prep, prepared.affine, pp_config, body_x_mm=body_x))
    timings["postprocess"] = time.perf_counter() - t

    # resample back onto the input grid, class by class (each prepared mask is dropped once mapped back)
    t = time.perf_counter()
    masks: dict[str, np.ndarray] = {}
    probabilities: dict[str, np.ndarray] | None = {} if return_probabilities else None
    for i, name in enumerate(names):
        report("resample", i / max(1, len(names)))
        masks[name] = pp.resample_to_source(np.asarray(masks_prep.pop(name), dtype=bool), prepared, order=1)
        if probabilities is not None and probs_p is not None:
            probabilities[name] = pp.resample_to_source(probs_p[i], prepared, order=1)
            probs_p[i] = None  # type: ignore[call-overload]
    timings["resample"] = time.perf_counter() - t

    voxel_ml = abs(float(np.linalg.det(np.asarray(volume.affine)[:3, :3]))) / 1000.0
    volumes_ml = {n: float(np.count_nonzero(m)) * voxel_ml for n, m in masks.items()}
    hu = np.asarray(volume.array)
    mean_hu = {
        n: (float(hu[m].mean(dtype=np.float64)) if m.any() else float("nan")) for n, m in masks.items()
    }
    timings["total"] = time.perf_counter() - t_start
    report("done", 1.0)

    info = _info(net, model_label, dev, prepared, names, psize, overlap, bs, fast, threshold, pp_config)
    ac = autocast_dtype_for(dev, precision)
    info["precision"] = "float32" if ac is None else str(ac).replace("torch.", "")
    return Segmentation(
        masks=masks,
        volume=volume,
        probabilities=probabilities,
        volumes_ml=volumes_ml,
        mean_hu=mean_hu,
        timings=timings,
        info=info,
    )


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
    overlap, mode="gaussian")) >= threshold`` (same windows, same Gaussian map with sigma 0.125 × patch, same
    zero padding of inputs smaller than a window, float32 accumulation of logits), but the float32 accumulator only
    spans a rolling slab of the last axis (see the module docstring) and the outputs are boolean masks (and
    optionally float16 probabilities), one (X, Y, Z) array per class.

    Args:
        image: float32 (X, Y, Z) network input (intensities in [0, 1]).
        model: Callable ``model(x (B, 1, px, py, pz), classes=list[str]) -> logits (B, k, px, py, pz)``.
        classes: Class names passed to the model (``None``: the model's ``class_names``).
        patch_size: Window size (voxels).
        overlap: Relative overlap of neighbouring windows.
        sw_batch_size: Windows per forward pass.
        device: Device of the forward passes (default: the model's).
        threshold: Probability threshold of the masks.
        return_probabilities: Also return float16 sigmoid probabilities.
        progress: ``callback(fraction of windows done)``.
        precision: Autocast dtype of the forward passes (see :func:`segment`; default ``"float32"``: no autocast,
            MONAI's arithmetic).

    Returns:
        ``(masks, probabilities)``: lists (one per class) of bool (X, Y, Z) arrays and float16 arrays (or ``None``).
    """
    import torch

    if classes is None:
        classes = list(model.class_names)
    classes = list(classes)
    k = len(classes)
    if device is None:
        device = _model_device(model)
    device = torch.device(device)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) image, got shape {image.shape}")
    shape = tuple(int(s) for s in image.shape)
    patch = tuple(int(p) for p in (patch_size if isinstance(patch_size, Sequence) else (patch_size,) * 3))
    logit_thr = float(math.log(threshold / (1.0 - threshold)))

    # MONAI pads inputs smaller than a window with zeros, split half before / half after
    pad_before = [max(p - s, 0) // 2 for s, p in zip(shape, patch)]
    full = tuple(max(s, p) for s, p in zip(shape, patch))
    img = torch.zeros(full, dtype=torch.float32)
    img[tuple(slice(b, b + s) for b, s in zip(pad_before, shape))] = torch.from_numpy(image)
    img = img.to(device)

    starts = [window_starts(full[a], patch[a], overlap) for a in range(3)]
    windows = sorted(
        ((x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]), key=lambda w: (w[2], w[0], w[1])
    )
    batches = [windows[i : i + sw_batch_size] for i in range(0, len(windows), sw_batch_size)]
    # rolling buffer depth: before batch b the buffer starts at the first z of batch b (everything before is final)
    depth = max(max(w[2] for w in b) + patch[2] - b[0][2] for b in batches)

    weight = gaussian_weights(patch).to(device)
    acc = torch.zeros((k, full[0], full[1], depth), dtype=torch.float32, device=device)
    wsum = torch.zeros((full[0], full[1], depth), dtype=torch.float32, device=device)

    masks = [np.zeros(shape, dtype=bool) for _ in range(k)]
    probs = [np.zeros(shape, dtype=np.float16) for _ in range(k)] if return_probabilities else None
    crop_xy = (slice(pad_before[0], pad_before[0] + shape[0]), slice(pad_before[1], pad_before[1] + shape[1]))

    def finalize(z0: int, z1: int, buf0: int) -> None:
        """Threshold the final slab [z0, z1) (padded z) held at buffer offset z0 - buf0."""
        # keep only the unpadded part
        lo, hi = max(z0, pad_before[2]), min(z1, pad_before[2] + shape[2])
        if hi <= lo:
            return
        sl = (slice(None), *crop_xy, slice(lo - buf0, hi - buf0))
        a, w = acc[sl], wsum[sl[1:]]
        out_z = slice(lo - pad_before[2], hi - pad_before[2])
        m = (a >= w * logit_thr) if logit_thr != 0.0 else (a >= 0)
        m = m.cpu().numpy()
        for c in range(k):
            masks[c][:, :, out_z] = m[c]
        if probs is not None:
            p = torch.sigmoid(a / w).to(torch.float16).cpu().numpy()
            for c in range(k):
                probs[c][:, :, out_z] = p[c]

    autocast_dtype = autocast_dtype_for(device, precision)
    buf0 = 0  # padded z of buffer index 0
    n_done = 0
    with torch.inference_mode():
        for bi, batch in enumerate(batches):
            z_first = batch[0][2]
            if z_first > buf0:  # shift the buffer: [buf0, z_first) is final and was finalised
                s = z_first - buf0
                if s < depth:
                    acc[..., : depth - s] = acc[..., s:].clone()
                    wsum[..., : depth - s] = wsum[..., s:].clone()
                    acc[..., depth - s :] = 0
                    wsum[..., depth - s :] = 0
                else:
                    acc.zero_()
                    wsum.zero_()
                buf0 = z_first
            x = torch.stack(
                [img[wx : wx + patch[0], wy : wy + patch[1], wz : wz + patch[2]] for wx, wy, wz in batch]
            )
            x = x.unsqueeze(1)
            if autocast_dtype is not None:
                with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                    logits = model(x, classes=classes)
            else:
                logits = model(x, classes=classes)
            if logits.shape[1] != k or tuple(logits.shape[2:]) != patch:
                raise RuntimeError(
                    f"the model returned {tuple(logits.shape)} for {k} classes and windows {patch}"
                )
            logits = logits.float()
            for (wx, wy, wz), lg in zip(batch, logits):
                sl = (
                    slice(wx, wx + patch[0]),
                    slice(wy, wy + patch[1]),
                    slice(wz - buf0, wz - buf0 + patch[2]),
                )
                acc[(slice(None), *sl)].addcmul_(lg, weight)
                wsum[sl].add_(weight)
            del logits, x
            n_done += len(batch)
            # everything below the next batch's first z is final
            z_next = batches[bi + 1][0][2] if bi + 1 < len(batches) else full[2]
            if z_next > buf0:
                finalize(buf0, z_next, buf0)
            if progress is not None:
                progress(n_done / len(windows))
    return masks, probs


# ------------------------------------------------------------------------------------------------- helpers
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


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


_MODEL_CACHE: dict[tuple, Any] = {}


def clear_model_cache() -> None:
    """Forget the models :func:`segment` loaded by name (frees their memory)."""
    _MODEL_CACHE.clear()


def _as_volume(volume_or_path):
    from universal.io import Volume

    if isinstance(volume_or_path, Volume):
        return volume_or_path
    if isinstance(volume_or_path, (str, os.PathLike)):
        from universal.io import load_volume

        return load_volume(volume_or_path)
    if hasattr(volume_or_path, "array") and hasattr(volume_or_path, "affine"):
        return volume_or_path
    raise TypeError(f"segment() needs a Volume or a path, got {type(volume_or_path).__name__}")


def _resolve_device(device):
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_device(model):
    import torch

    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _same_device(a, b) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        import torch

        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def _prepare_model(model, template, device):
    """The model to run (on ``device``, with ``template``), without changing the given or cached model."""
    if model is None or isinstance(model, (str, os.PathLike)):
        spec = "builtin" if model is None else str(model)
        key = (spec, str(device), template)
        if key not in _MODEL_CACHE:
            base_key = (spec, "cpu", None)
            if base_key not in _MODEL_CACHE:
                from universal.model import load_pretrained

                _MODEL_CACHE[base_key] = load_pretrained(spec).eval()
            net = _MODEL_CACHE[base_key]
            if _needs_template(net, template) or not _same_device(_model_device(net), device):
                net = copy.deepcopy(net)
                if _needs_template(net, template):
                    net.set_prompts(template=template)
                net = net.to(device).eval()
            _MODEL_CACHE[key] = net
        return _MODEL_CACHE[key], spec
    net = model
    if _needs_template(net, template) or not _same_device(_model_device(net), device):
        net = copy.deepcopy(net)
        if _needs_template(net, template):
            net.set_prompts(template=template)
        net = net.to(device)
    return net, type(model).__name__


def _needs_template(net, template) -> bool:
    if template is None:
        return False
    try:
        from universal.prompts import resolve_template

        wanted = resolve_template(template)
    except ImportError:  # pragma: no cover - prompts not available
        wanted = template
    return wanted != getattr(net, "template", None)


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


def _resolve_requested(classes, net) -> list[str]:
    from universal.errors import ClassNameError
    from universal.taxonomy import resolve_class

    available = list(net.class_names)
    if classes is None:
        return available
    if isinstance(classes, str):
        classes = [classes]
    names: list[str] = []
    for c in classes:
        name = resolve_class(c).name
        if name not in available:
            raise ClassNameError(
                f"the model does not segment {name!r}; its classes are: {', '.join(available)}. "
                "Choose among these or load a model trained for that class."
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ClassNameError("no class requested: pass at least one class name (or classes=None for all)")
    return names


def _patch_size(patch_size, net) -> tuple[int, int, int]:
    """The window: given, else the model's training window (``preprocessing["patch_size"]``, a checkpoint's
    ``extra["training"]["patch_size"]`` or ``config()["patch_size"]``), else 96³."""
    if patch_size is None:
        prep = getattr(net, "preprocessing", None) or {}
        extra = getattr(net, "checkpoint_extra", None) or {}
        try:
            cfg = net.config()
        except Exception:  # noqa: BLE001 - a model without config()
            cfg = {}
        patch_size = (
            prep.get("patch_size")
            or (extra.get("training") or {}).get("patch_size")
            or (cfg.get("patch_size") if isinstance(cfg, dict) else None)
            or 96
        )
    if isinstance(patch_size, (int, np.integer)):
        return (int(patch_size),) * 3
    p = tuple(int(v) for v in patch_size)
    if len(p) != 3:
        raise ValueError(f"patch_size must be one int or three, got {patch_size!r}")
    return p  # type: ignore[return-value]


def _preprocess_config(net, fast: bool):
    """The model's recorded preprocessing (spacing, HU window); ``fast`` → 3 mm (never finer than the model's)."""
    from universal.preprocess import PreprocessConfig

    spec = getattr(net, "preprocessing", None) or {}
    spacing = spec.get("spacing", 1.5)
    spacing = tuple(float(v) for v in spacing) if isinstance(spacing, (list, tuple)) else float(spacing)
    window = tuple(float(v) for v in spec.get("window", (-175.0, 250.0)))
    if fast:  # 3 mm, or the model's own spacing when that is coarser already
        spacing = max(3.0, float(np.max(spacing)))
    return PreprocessConfig(spacing_mm=spacing, hu_window=window)  # type: ignore[arg-type]


def _has_paired(names) -> bool:
    from universal.taxonomy import resolve_class

    return any(resolve_class(n).paired is not None for n in names)


def _postprocess_config(postprocess):
    if postprocess is None or postprocess is False:
        return None
    from universal.postprocess import PostprocessConfig

    if postprocess is True:
        return PostprocessConfig()
    if isinstance(postprocess, PostprocessConfig):
        return postprocess
    raise TypeError(
        f"postprocess must be True, False or a PostprocessConfig, got {type(postprocess).__name__}"
    )


def _progress_reporter(progress: ProgressFn | None) -> Callable[[str, float], None]:
    order = list(_STAGE_START)

    def report(stage: str, fraction: float) -> None:
        if progress is None:
            return
        start = _STAGE_START[stage]
        nxt = order.index(stage) + 1
        end = _STAGE_START[order[nxt]] if nxt < len(order) else 1.0
        progress(stage, float(start + (end - start) * min(1.0, max(0.0, fraction))))

    return report


def _info(
    net, model_label, dev, prepared, names, psize, overlap, bs, fast, threshold, pp_config
) -> dict[str, Any]:
    import torch

    import universal

    try:
        cfg = net.config()
    except Exception:  # noqa: BLE001
        cfg = {}
    return {
        "model": model_label,
        "backbone": cfg.get("backbone"),
        "encoder": getattr(net, "encoder_name", cfg.get("encoder")),
        "template": getattr(net, "template", cfg.get("template")),
        "device": str(dev),
        "spacing_mm": [round(float(s), 4) for s in prepared.spacing],
        "target_spacing_mm": list(prepared.config.target_spacing()),
        "fast": bool(fast),
        "crop_box": [list(b) for b in prepared.box],
        "prepared_shape": list(prepared.shape),
        "classes": list(names),
        "patch_size": list(psize),
        "overlap": float(overlap),
        "sw_batch_size": int(bs),
        "threshold": float(threshold),
        "postprocess": pp_config is not None,
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


def _json_float(v) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else round(v, 4)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _json_float(v)
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)
