"""The dashboard's non-UI logic: samples, model choices, per-session upload folders, ground truth, comparisons.

``app.py`` only wires Streamlit widgets to these functions and to the package API (``segment``,
``evaluate_case``, ``viz``), so everything here is testable without a browser and usable from a notebook.

>>> [s.key for s in list_samples(root="/nonexistent")]
['phantom']
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from universal.errors import CheckpointError, InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The project root (the folder holding ``app.py``); samples are found relative to it."""

REAL_SAMPLE_DIR = Path("..") / "shared" / "data" / "ts_abdomen_3mm"
"""Where the optional real CT sample (the built-in model's training scan) lives, relative to the project root."""

HELD_OUT_SAMPLE_DIR = Path("..") / "shared" / "data" / "ts_dicom_series"
"""Where the optional held-out real CT sample (a DICOM series in ``dicom/``) lives, relative to the project root."""

DEMO_MODEL = "demo"
"""Key of the untrained demo model (random weights) offered when no trained weights are available."""

DEMO_MODEL_LABEL = "untrained demo model (random weights — for trying the interface only)"

GT_CONVENTIONS = ("universal ids (1-32)", "FLARE 2023 ids (1-14)")
"""Label conventions of an uploaded ground truth besides the public datasets of the taxonomy."""


# ------------------------------------------------------------------------------------------------ samples
@dataclass(frozen=True)
class Sample:
    """A built-in sample: ``key``, a ``label`` for the UI, and where its files are (``None`` for the phantom)."""

    key: str
    label: str
    ct: Path | None = None
    gt: Path | None = None
    gt_dataset: str | None = None
    description: str = ""


@dataclass
class SampleData:
    """A loaded sample: the CT, its reference masks (keyed by universal name) and the classes they annotate."""

    sample: Sample
    volume: Any
    gt_masks: dict[str, np.ndarray] = field(default_factory=dict)
    annotated: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def list_samples(root: str | os.PathLike | None = None) -> list[Sample]:
    """The built-in samples: always the synthetic phantom, plus real CTs of ``../shared/data`` when present (the
    built-in model's training scan, and a held-out DICOM series).

    Args:
        root: The project root (default: the folder holding ``app.py``).
    """
    root = Path(root) if root is not None else PROJECT_ROOT
    samples = [
        Sample(
            "phantom",
            "Synthetic phantom (128×128×96, 1.5 mm, with ground truth)",
            description="A deterministic synthetic abdominal CT with 14+ labelled structures (seed 0).",
        )
    ]
    real_samples = [  # (key, folder, CT inside it, label, description); labels: TotalSegmentator v2 ids
        (
            "ts_abdomen_3mm",
            REAL_SAMPLE_DIR,
            "ct.nii.gz",
            "Real abdominal CT (122×101×30, 3 mm; TotalSegmentator labels as reference)",
            "TotalSegmentator test CT (CC-BY); its reference labels are themselves model output. "
            "The built-in model was trained on this scan: its scores here are not a validation.",
        ),
        (
            "ts_dicom_series",
            HELD_OUT_SAMPLE_DIR,
            "dicom",
            "Real abdominal CT, DICOM series (held out from the built-in model's training)",
            "Another patient's contrast-enhanced CT as a DICOM series (CC-BY; TotalSegmentator labels as "
            "reference). Never used to train or tune the built-in model: its scores here are what to expect on "
            "unseen scans (MODEL_CARD.md).",
        ),
    ]
    for key, folder, ct_name, label, description in real_samples:
        ct, gt = root / folder / ct_name, root / folder / "labels_totalseg.nii.gz"
        if ct.exists():
            has_gt = gt.is_file()
            samples.append(
                Sample(
                    key,
                    label,
                    ct=ct,
                    gt=gt if has_gt else None,
                    gt_dataset="totalsegmentator_v2" if has_gt else None,
                    description=description,
                )
            )
    return samples


def load_sample(sample: Sample | str, root: str | os.PathLike | None = None) -> SampleData:
    """Load a sample's CT and reference masks (the phantom is generated, deterministic)."""
    if isinstance(sample, str):
        found = {s.key: s for s in list_samples(root)}
        if sample not in found:
            raise InputError(f"unknown sample {sample!r}; available: {sorted(found)}")
        sample = found[sample]
    if sample.key == "phantom":
        from universal.phantom import make_phantom

        ph = make_phantom(shape=(128, 128, 96), spacing=(1.5, 1.5, 1.5), seed=0)
        masks = {n: np.asarray(m, bool) for n, m in ph.masks.items()}
        names = list(getattr(ph, "classes", None) or masks)
        return SampleData(sample, ph.volume, masks, list(masks), names)
    from universal.io import load_volume

    volume = load_volume(sample.ct)
    gt_masks: dict[str, np.ndarray] = {}
    annotated: list[str] = []
    if sample.gt is not None:
        with warnings.catch_warnings():
            # TotalSegmentator labels structures the universal taxonomy does not have (vertebrae, ribs...):
            # expected for this sample, so not worth a warning in the app
            warnings.simplefilter("ignore", UserWarning)
            gt_masks, annotated = ground_truth_from_file(sample.gt, volume, sample.gt_dataset)
    present = [n for n, m in gt_masks.items() if m.any()]
    return SampleData(sample, volume, gt_masks, annotated, present)


# ------------------------------------------------------------------------------------------------ ground truth
def gt_conventions() -> list[str]:
    """Choices for the label convention of an uploaded ground truth: universal, FLARE 2023, then the datasets."""
    from universal.taxonomy import list_datasets

    return [*GT_CONVENTIONS, *(f"dataset: {d}" for d in list_datasets())]


def ground_truth_masks(
    label: np.ndarray, volume: Any, convention: str | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """One-vs-all reference masks keyed by universal class name, and the classes the reference annotates.

    Args:
        label: Integer (X, Y, Z) label map on ``volume``'s grid.
        volume: The CT :class:`~universal.io.Volume` (its affine splits left/right for some datasets).
        convention: One of :func:`gt_conventions` (or a bare dataset name); ``None`` → universal ids.
            With universal ids every class present is annotated; with FLARE 2023 ids the 13 organs and the
            ``"lesion"`` class; with a dataset, what the taxonomy says that dataset annotates.
    """
    from universal import metrics, taxonomy

    lab = np.asarray(label)
    if lab.ndim != 3:
        raise InputError(f"the ground truth must be a 3-D label map, got shape {lab.shape}")
    if tuple(lab.shape) != tuple(volume.shape):
        raise InputError(
            f"the ground truth grid {tuple(lab.shape)} does not match the CT {tuple(volume.shape)}; "
            "upload the label map that belongs to this scan"
        )
    conv = (convention or GT_CONVENTIONS[0]).strip()
    if conv.lower().startswith("dataset:"):
        conv = conv.split(":", 1)[1].strip()
    if conv == GT_CONVENTIONS[0] or conv.lower() in ("universal", "universal ids"):
        present = sorted(int(v) for v in np.unique(lab) if v != 0)
        bad = [v for v in present if not 1 <= v <= len(taxonomy.CLASSES)]
        if bad:
            raise InputError(
                f"label values {bad[:5]} are not universal ids (1-{len(taxonomy.CLASSES)}); "
                "choose the dataset the labels come from"
            )
        masks = metrics.universal_masks_from_label_map(lab, classes=present)
        return masks, list(masks)
    if conv == GT_CONVENTIONS[1] or conv.lower() in ("flare23", "flare 2023"):
        masks = metrics.flare23_masks_from_label_map(lab)
        return masks, list(masks)
    lmap = taxonomy.dataset(conv)
    names = list(lmap.annotated)
    arr = taxonomy.transfer_labels(lab, lmap, volume.affine, classes=names)
    return {n: np.asarray(arr[i], bool) for i, n in enumerate(names)}, names


def ground_truth_from_file(
    path: str | os.PathLike, volume: Any, convention: str | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """:func:`ground_truth_masks` of a label file, read onto ``volume``'s grid with ``universal.io.load_label``."""
    from universal.io import load_label

    label = load_label(path, like=volume)
    return ground_truth_masks(label, volume, convention)


def evaluate_segmentation(
    seg: Any,
    gt_masks: Mapping[str, np.ndarray],
    annotated: Iterable[str],
    spacing: Sequence[float],
    preset: str | None = "flare23",
):
    """DSC/NSD of a Segmentation against reference masks.

    With ``preset="flare23"`` the FLARE 2023 classes, tolerances and rules are used (classes the reference does
    not annotate are reported as "not annotated"); with ``None`` the segmented classes are scored.
    """
    from universal.metrics import evaluate_case, flare23_masks_from_universal

    annotated = list(annotated)
    pred = {n: np.asarray(m, bool) for n, m in seg.masks.items()}
    if preset == "flare23":
        from universal.taxonomy import FLARE23_LESION_CLASSES

        names = _flare_names()
        pred_view = flare23_masks_from_universal(pred)
        gt_view = flare23_masks_from_universal({n: gt_masks[n] for n in annotated if n in gt_masks})
        ann_set = set(annotated)
        lesion_annotated = "lesion" in ann_set or bool(ann_set & set(FLARE23_LESION_CLASSES))
        ann = [n for n in names if n in ann_set or (n == names[-1] and lesion_annotated)]
        # only the classes the model was asked for can be scored (others would count as misses)
        classes = [n for n in names if n in pred_view]
        if not classes:
            raise InputError(
                "none of the segmented classes is a FLARE 2023 class: segment e.g. the liver, or score all classes"
            )
        return evaluate_case(pred_view, gt_view, spacing, preset="flare23", classes=classes, annotated=ann)
    gt = {n: gt_masks[n] for n in annotated if n in gt_masks}
    return evaluate_case(pred, gt, spacing, classes=list(seg.masks), annotated=annotated)


def _flare_names() -> list[str]:
    from universal.taxonomy import flare23_classes

    ids = flare23_classes()
    return [ids[i] for i in sorted(ids)]


# ------------------------------------------------------------------------------------------------ comparison
def compare_segmentations(seg_a: Any, seg_b: Any, spacing: Sequence[float] | None = None):
    """Per-class agreement of two runs on the same scan: DSC between them and volumes (mL) of each.

    Returns a pandas DataFrame with columns ``class, DSC(A,B), volume A (mL), volume B (mL), voxels only in A,
    voxels only in B``.
    """
    import pandas as pd

    from universal.metrics import dice

    names = [n for n in seg_a.masks if n in seg_b.masks]
    va, vb = getattr(seg_a, "volumes_ml", {}) or {}, getattr(seg_b, "volumes_ml", {}) or {}
    rows = []
    for n in names:
        a, b = np.asarray(seg_a.masks[n], bool), np.asarray(seg_b.masks[n], bool)
        rows.append(
            {
                "class": n,
                "DSC(A,B)": round(float(dice(a, b)), 4),
                "volume A (mL)": round(float(va.get(n, np.nan)), 2),
                "volume B (mL)": round(float(vb.get(n, np.nan)), 2),
                "voxels only in A": int(np.count_nonzero(a & ~b)),
                "voxels only in B": int(np.count_nonzero(b & ~a)),
            }
        )
    return pd.DataFrame(rows)


def prompt_similarity_matrix(
    classes: Sequence[str],
    template_a: str,
    template_b: str,
    encoder_a: str = "minilm",
    encoder_b: str | None = None,
) -> np.ndarray:
    """Cosine similarity (K, K) between the prompts of ``template_a`` (rows) and ``template_b`` (columns).

    Embeddings from ``universal.prompts.encode_prompts`` (cached on disk), similarity from
    ``universal.prompts.prompt_similarity``. Two encoders of different widths cannot be compared (``InputError``).
    """
    from universal import prompts

    encoder_b = encoder_b or encoder_a
    ea = np.asarray(prompts.encode_prompts(list(classes), template=template_a, encoder=encoder_a), np.float32)
    eb = np.asarray(prompts.encode_prompts(list(classes), template=template_b, encoder=encoder_b), np.float32)
    if ea.shape[1] != eb.shape[1]:
        raise InputError(
            f"the two encoders give embeddings of different widths ({ea.shape[1]} and {eb.shape[1]}): "
            "their similarity is undefined; compare templates of one encoder"
        )
    return prompts.prompt_similarity(ea, eb)


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelChoice:
    """An entry of the model selector: ``key`` (for ``load_model``), ``label``, and whether it can load now."""

    key: str
    label: str
    available: bool = True
    note: str = ""


def model_choices() -> list[ModelChoice]:
    """The built-in weights, the official checkpoints that are already downloaded, and the demo model.

    The built-in model is listed first when its weights load; otherwise the demo model (random weights) comes
    first and the built-in entry carries the reason in ``note``.
    """
    choices: list[ModelChoice] = []
    try:
        from universal.model import PRETRAINED
    except Exception as exc:  # noqa: BLE001 - the app must still start
        return [ModelChoice(DEMO_MODEL, DEMO_MODEL_LABEL, True, f"model registry unavailable: {exc}")]
    for name, entry in PRETRAINED.items():
        entry = dict(entry) if isinstance(entry, Mapping) else {}
        ok, why = pretrained_available(name)
        lic = entry.get("licence") or entry.get("license") or ""
        label = name + (f" ({entry.get('backbone')})" if entry.get("backbone") else "")
        if lic:
            label += f" — {lic}"
        choices.append(ModelChoice(name, label, ok, why))
    choices.sort(key=lambda c: (not c.available, c.key != "builtin"))
    demo = ModelChoice(DEMO_MODEL, DEMO_MODEL_LABEL, True, "random weights: the masks are meaningless")
    if not any(c.available for c in choices):
        return [demo, *choices]
    return [*[c for c in choices if c.available], demo, *[c for c in choices if not c.available]]


def pretrained_available(name: str) -> tuple[bool, str]:
    """Whether the weights ``name`` of ``PRETRAINED`` are on this machine (never downloads), and if not, why."""
    try:
        from universal.model import checkpoints
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)
    entry = checkpoints.PRETRAINED.get(name)
    if entry is None:
        return False, f"{name!r} is not a known weights name"
    if name == "builtin":
        path = Path(
            getattr(checkpoints, "_BUILTIN_PATH", PROJECT_ROOT / "universal" / "resources" / "builtin.pt")
        )
        if path.is_file():
            return True, ""
        return False, (
            "the built-in weights are not shipped yet (universal/resources/builtin.pt is missing); "
            "train one with `universal train` and load its checkpoint"
        )
    path = checkpoints.cache_dir() / str(entry.get("filename", f"{name}.pth"))
    if path.is_file():
        return True, ""
    return (
        False,
        f"not downloaded (run `python -c \"import universal; universal.load_pretrained('{name}')\"`)",
    )


def load_model(
    key: str, *, checkpoint: str | os.PathLike | None = None, encoder: str | None = None, seed: int = 0
):
    """Load a model for the app: a PRETRAINED name, a local checkpoint file, or the demo model.

    Args:
        key: A :func:`model_choices` key, ``"checkpoint"`` (then ``checkpoint`` is the path) or :data:`DEMO_MODEL`.
        encoder: For the demo model: the text encoder (default ``"minilm"``, falling back to ``"onehot"``).
        seed: For the demo model: the torch seed of its random weights (fixed, so runs are reproducible).
    """
    from universal import model as m

    if key == DEMO_MODEL:
        return demo_model(encoder=encoder or "minilm", seed=seed)
    if key == "checkpoint":
        if not checkpoint:
            raise CheckpointError("give the path of a checkpoint file (.pt/.pth) to load")
        p = Path(str(checkpoint)).expanduser()
        if not p.is_file():
            raise CheckpointError(
                f"{p} is not a file: give the path of a checkpoint (.pt/.pth) on the server"
            )
        return m.load_pretrained(str(p))
    return m.load_pretrained(key)


def split_supported_classes(model: Any, classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split requested class names into those ``model`` was trained to segment and those it was not.

    Names are resolved through the taxonomy (aliases and case are accepted); the order of ``classes`` is kept.

    >>> from types import SimpleNamespace
    >>> split_supported_classes(SimpleNamespace(class_names=["liver", "spleen"]), ["Spleen", "liver tumor"])
    (['spleen'], ['liver tumor'])
    """
    from universal.taxonomy import resolve_class

    own = set(getattr(model, "class_names", None) or ())
    ok: list[str] = []
    missing: list[str] = []
    for name in classes:
        canonical = resolve_class(name).name
        (ok if canonical in own else missing).append(canonical)
    return ok, missing


def demo_model(encoder: str = "minilm", seed: int = 0):
    """A small randomly initialised Universal Model for all 32 classes (for trying the interface only).

    The default encoder ``"minilm"`` falls back to ``"onehot"`` when it cannot load; an encoder asked for
    explicitly (e.g. ``"clip"`` without its weights) raises its own error instead.
    """
    import torch

    from universal.errors import EncoderUnavailableError
    from universal.model import create_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        try:
            model = create_model("segresnet", classes=None, encoder=encoder)
        except (EncoderUnavailableError, ImportError, OSError):
            if encoder != "minilm":
                raise
            model = create_model("segresnet", classes=None, encoder="onehot")
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model


def model_with_prompts(base: Any, template: str | None = None, encoder: str | None = None):
    """A copy of ``base`` whose prompts are re-encoded with ``template``/``encoder`` (``base`` is not changed).

    Returns ``base`` itself when nothing changes.
    """
    import copy

    from universal.prompts import resolve_template

    tmpl = resolve_template(template) if template else None
    if (tmpl is None or tmpl == getattr(base, "template", None)) and (
        not encoder or encoder == getattr(base, "encoder_name", None)
    ):
        return base
    model = copy.deepcopy(base)
    model.set_prompts(template=tmpl, encoder=encoder or None)
    return model


# ------------------------------------------------------------------------------------------------ uploads
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, default: str = "upload") -> str:
    """A file name without folders or odd characters that keeps a known (double) suffix.

    >>> safe_filename("../../etc/My scan.nii.gz")
    'My_scan.nii.gz'
    """
    base = Path(str(name).replace("\\", "/")).name
    base = _SAFE.sub("_", base).strip("._") or default
    return base[-120:]


class SessionFolder:
    """A private temporary folder for one browser session's uploads and outputs, removed when closed or collected.

    >>> f = SessionFolder(); p = f.save("x.nii.gz", b"abc"); p.read_bytes(), p.parent.parent == f.path
    (b'abc', True)
    >>> f.close(); p.exists()
    False
    """

    def __init__(self, prefix: str = "universal-app-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def save(self, name: str, data: bytes, subfolder: str = "uploads") -> Path:
        """Write ``data`` under ``subfolder/`` with a sanitised ``name`` (replacing an earlier file of that name)."""
        folder = self.path / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / safe_filename(name)
        tmp = folder / (target.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def clear(self, subfolder: str = "uploads") -> None:
        """Remove everything under ``subfolder``."""
        shutil.rmtree(self.path / subfolder, ignore_errors=True)

    def close(self) -> None:
        """Remove the folder now."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def check_upload(name: str, size: int, max_mb: float) -> None:
    """Raise ``InputError`` for an upload larger than ``max_mb`` MB.

    The file type is judged by the package's loaders (``load_volume`` / ``load_label``), whose messages say
    what to do (a PNG, a 2-D image, a corrupt file, an unsupported type).
    """
    if size > max_mb * 1024 * 1024:
        raise InputError(f"{name} is {size / 1024**2:.0f} MB; the upload limit is {max_mb:.0f} MB")


def upload_limit_mb() -> int:
    """The upload limit in MB (Streamlit's ``server.maxUploadSize``; 512 when Streamlit is not configured)."""
    try:
        import streamlit as st

        return int(st.get_option("server.maxUploadSize"))
    except Exception:  # noqa: BLE001
        return 512
