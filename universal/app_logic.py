"""The dashboard's non-UI logic: where samples are, model choices, per-session upload folders, comparisons.

``app.py`` only wires Streamlit widgets to these functions, to :mod:`universal.dashboard` (the actions of a
session) and :mod:`universal.app_state` (its state), so everything here is testable without a browser and usable
from a notebook.

Nothing here assumes the repository layout: where the app script and the real samples are comes from a
:class:`DashboardConfig` (environment variables ``UNIVERSAL_APP`` and ``UNIVERSAL_DATA_DIR``; the repository
layout, ``<project>/../shared/data``, is one default among them), so a wheel install works with the phantom alone.

>>> [s.key for s in list_samples(data_dir=None)]
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

from universal import data, prompts
from universal.errors import CheckpointError, InputError

APP_ENV = "UNIVERSAL_APP"
"""Environment variable: the dashboard's Streamlit script (``app.py``) for ``universal demo``."""

DATA_DIR_ENV = data.DATA_DIR_ENV
"""Environment variable: the folder holding the real samples' folders (``ts_abdomen_3mm/``, ``ts_dicom_series/``)."""

DEMO_MODEL = "demo"
"""Key of the untrained demo model (random weights) offered when no trained weights are available."""

DEMO_MODEL_LABEL = "untrained demo model (random weights — for trying the interface only)"

CHECKPOINT = "checkpoint"
"""Key of the model choice "a local checkpoint file" (its path is :attr:`WeightsChoice.checkpoint`)."""

ENCODER_KEYWORDS = prompts.ENCODER_KEYWORDS  # the library's list
"""The keyword specs of :func:`universal.prompts.get_encoder` offered as presets (any other spec can be typed)."""

GT_CONVENTIONS = ("universal ids (1-32)", "FLARE 2023 ids (1-14)")
"""Label conventions of an uploaded ground truth besides the public datasets of the taxonomy."""


# ------------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class DashboardConfig:
    """Where the dashboard's files are: its Streamlit script and the folder of the real samples (``None``: none).

    Build it with :meth:`from_env`; nothing else in the package guesses these locations.
    """

    app: Path | None = None
    data_dir: Path | None = None

    @classmethod
    def from_env(
        cls, project_root: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
    ) -> DashboardConfig:
        """``$UNIVERSAL_APP`` / ``$UNIVERSAL_DATA_DIR`` when set; else the repository layout under
        ``project_root`` (default: the current folder): ``app.py``, and ``shared/data`` found walking up from it
        (:func:`universal.data.find_sample_data`), each ``None`` when absent.

        >>> config = DashboardConfig.from_env("/nonexistent", environ={"UNIVERSAL_DATA_DIR": "/"})
        >>> config.app, config.data_dir.as_posix()
        (None, '/')
        """
        env = os.environ if environ is None else environ
        root = Path.cwd() if project_root is None else Path(project_root)
        return cls(
            app=_configured(env.get(APP_ENV), root / "app.py", Path.is_file),
            data_dir=data.find_sample_data(start=root, environ=env),
        )


def _configured(value: str | None, default: Path, exists: Any) -> Path | None:
    if value:
        return Path(value).expanduser()
    return default.resolve() if exists(default) else None


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


PHANTOM = Sample(
    "phantom",
    "Synthetic phantom (128×128×96, 1.5 mm, with ground truth)",
    description="A deterministic synthetic abdominal CT with 14+ labelled structures (seed 0).",
)

REAL_SAMPLES = (  # (key, folder under the data folder, CT inside it, label, description); TotalSegmentator v2 ids
    (
        "ts_abdomen_3mm",
        "ts_abdomen_3mm",
        "ct.nii.gz",
        "Real abdominal CT (122×101×30, 3 mm; TotalSegmentator labels as reference)",
        "TotalSegmentator test CT (CC-BY); its reference labels are themselves model output. "
        "The built-in model was trained on this scan: its scores here are not a validation.",
    ),
    (
        "ts_dicom_series",
        "ts_dicom_series",
        "dicom",
        "Real abdominal CT, DICOM series (held out from the built-in model's training)",
        "Another patient's contrast-enhanced CT as a DICOM series (CC-BY; TotalSegmentator labels as "
        "reference). Never used to train or tune the built-in model: its scores here are what to expect on "
        "unseen scans (MODEL_CARD.md).",
    ),
)
"""The real samples a data folder may hold; each is offered when its CT is there."""


def list_samples(data_dir: str | os.PathLike | None = None) -> list[Sample]:
    """The built-in samples: always the synthetic phantom, plus the :data:`REAL_SAMPLES` found in ``data_dir``
    (the built-in model's training scan, and a held-out DICOM series).

    Args:
        data_dir: The folder of the real samples (:attr:`DashboardConfig.data_dir`); ``None``: the phantom only.
    """
    samples = [PHANTOM]
    if data_dir is None:
        return samples
    for key, folder, ct_name, label, description in REAL_SAMPLES:
        ct, gt = Path(data_dir) / folder / ct_name, Path(data_dir) / folder / "labels_totalseg.nii.gz"
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


def load_sample(sample: Sample | str, data_dir: str | os.PathLike | None = None) -> SampleData:
    """Load a sample (a :class:`Sample`, or its key among :func:`list_samples` of ``data_dir``): its CT and
    reference masks (the phantom is generated, deterministic)."""
    if isinstance(sample, str):
        found = {s.key: s for s in list_samples(data_dir)}
        if sample not in found:
            raise InputError(f"unknown sample {sample!r}; available: {sorted(found)}")
        sample = found[sample]
    if sample.key == "phantom":
        from universal.phantom import make_phantom

        ph = make_phantom(shape=(128, 128, 96), spacing=(1.5, 1.5, 1.5), seed=0)
        masks = {n: np.asarray(m, bool) for n, m in ph.masks.items()}
        names = list(getattr(ph, "classes", None) or masks)
        return SampleData(sample, ph.volume, masks, list(masks), names)
    from universal.evaluation import read_reference
    from universal.io import load_volume

    volume = load_volume(sample.ct)
    gt_masks: dict[str, np.ndarray] = {}
    annotated: list[str] = []
    if sample.gt is not None:
        with warnings.catch_warnings():
            # TotalSegmentator labels structures the universal taxonomy does not have (vertebrae, ribs...):
            # expected for this sample, so not worth a warning in the app
            warnings.simplefilter("ignore", UserWarning)
            ref = read_reference(sample.gt, sample.gt_dataset, like=volume)
        gt_masks, annotated = {n: np.asarray(m, bool) for n, m in ref.masks.items()}, list(ref.annotated)
    present = [n for n, m in gt_masks.items() if m.any()]
    return SampleData(sample, volume, gt_masks, annotated, present)


# ------------------------------------------------------------------------------------------------ ground truth
def gt_conventions() -> list[str]:
    """Choices for the label convention of an uploaded ground truth: universal, FLARE 2023, then the datasets
    (:func:`universal.evaluation.convention_label` of each of :func:`universal.evaluation.conventions`)."""
    from universal import evaluation

    return [evaluation.convention_label(c) for c in evaluation.conventions()]


def ground_truth_masks(
    label: np.ndarray, volume: Any, convention: str | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Reference masks keyed by class name on ``volume``'s grid, and the classes the reference annotates.

    A thin call of :func:`universal.evaluation.read_reference` (``convention``: one of :func:`gt_conventions`, a
    dataset name, or ``None`` for universal ids).
    """
    from universal.evaluation import read_reference

    ref = read_reference(label, convention, like=volume)
    return dict(ref.masks), list(ref.annotated)


def ground_truth_from_file(
    path: str | os.PathLike, volume: Any, convention: str | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """:func:`ground_truth_masks` of a label file, read onto ``volume``'s grid."""
    from universal.evaluation import read_reference

    ref = read_reference(Path(path), convention, like=volume)
    return dict(ref.masks), list(ref.annotated)


def evaluate_segmentation(
    seg: Any,
    gt_masks: Mapping[str, np.ndarray],
    annotated: Iterable[str],
    spacing: Sequence[float],
    preset: str | None = "flare23",
):
    """DSC/NSD of a Segmentation against reference masks: :func:`universal.evaluation.evaluate` (the classes
    segmented that the reference annotates; segmented classes it does not annotate are shown as "not annotated",
    the result's ``skipped`` says why each other class was left out)."""
    from universal.evaluation import evaluate, read_reference

    ref = read_reference(gt_masks, like=getattr(seg, "volume", None), annotated=annotated, spacing=spacing)
    return evaluate(seg, ref, preset=preset)


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


@dataclass(frozen=True)
class WeightsChoice:
    """The weights of a run: a :func:`model_choices` key (or :data:`CHECKPOINT` with the file's path) and a text
    encoder that re-prompts them (``None``: the weights' own; the demo model is built with it).

    >>> WeightsChoice(DEMO_MODEL).demo, WeightsChoice(CHECKPOINT).ready, WeightsChoice(CHECKPOINT, "m.pt").ready
    (True, False, True)
    """

    key: str
    checkpoint: str | None = None
    encoder: str | None = None

    @property
    def demo(self) -> bool:
        return self.key == DEMO_MODEL

    @property
    def ready(self) -> bool:
        """Whether the choice is complete (a checkpoint choice needs its path)."""
        return self.key != CHECKPOINT or bool(self.checkpoint)


def base_predictor(weights: WeightsChoice, device: str | None = "auto"):
    """A :class:`~universal.predictor.Predictor` of ``weights`` on ``device`` with the model spec's settings.

    A run derives its own with ``with_settings(classes=..., fast=..., template=...)``, which shares the loaded
    weights (no reload). The device is checked before any weights are read; the model is moved there once.
    """
    from universal.predictor import Predictor, resolve_device

    dev = resolve_device(device)
    model = load_model(weights.key, checkpoint=weights.checkpoint, encoder=weights.encoder)
    if weights.encoder and not weights.demo:
        model = model_with_prompts(model, encoder=weights.encoder)
    return Predictor(model.to(dev), device=device)


def available_devices() -> list[str]:
    """The entries of :data:`universal.predictor.DEVICE_CHOICES` this machine has (``auto`` and ``cpu`` always)."""
    from universal.predictor import DEVICE_CHOICES

    try:
        import torch

        have = {"cuda": torch.cuda.is_available(), "mps": bool(torch.backends.mps.is_available())}
    except Exception:  # noqa: BLE001 - the app must still start
        have = {}
    return [d for d in DEVICE_CHOICES if d in ("auto", "cpu") or have.get(d)]


def model_choices() -> list[ModelChoice]:
    """The built-in weights, the official checkpoints that are already downloaded, and the demo model.

    The built-in model is listed first when its weights load; otherwise the demo model (random weights) comes
    first and the built-in entry carries the reason in ``note``.
    """
    choices: list[ModelChoice] = []
    try:
        from universal.model import sources

        registry = sources.sources()  # built-in entries and $UNIVERSAL_WEIGHTS_REGISTRY's
    except Exception as exc:  # noqa: BLE001 - the app must still start
        return [ModelChoice(DEMO_MODEL, DEMO_MODEL_LABEL, True, f"model registry unavailable: {exc}")]
    for name, entry in registry.items():
        ok, why = pretrained_available(name)
        label = name + (f" ({entry.backbone})" if entry.backbone else "") + f" — {entry.licence}"
        choices.append(ModelChoice(name, label, ok, why))
    from universal.correct_session import finetuned_choices

    choices += finetuned_choices()  # the Correct tab's fine-tuned models (local files)
    choices.sort(key=lambda c: (not c.available, c.key != "builtin"))
    demo = ModelChoice(DEMO_MODEL, DEMO_MODEL_LABEL, True, "random weights: the masks are meaningless")
    if not any(c.available for c in choices):
        return [demo, *choices]
    return [*[c for c in choices if c.available], demo, *[c for c in choices if not c.available]]


def choice_label(choices: Mapping[str, ModelChoice], key: str) -> str:
    """The model selector's label of ``key`` (an unavailable choice says so)."""
    if key == CHECKPOINT:
        return "a local checkpoint file…"
    c = choices[key]
    return c.label if c.available else f"{c.label} — unavailable"


def model_notes(choices: Mapping[str, ModelChoice], key: str) -> list[tuple[str, str, dict[str, str]]]:
    """What the sidebar says under the model selector, as ``(kind, text, options)`` with kind ``"warning"``,
    ``"caption"`` or ``"info"``: why the chosen weights cannot load, why the built-in ones are missing, that the
    demo model is random.

    >>> model_notes({DEMO_MODEL: ModelChoice(DEMO_MODEL, "demo")}, DEMO_MODEL)[0][0]
    'info'
    """
    notes: list[tuple[str, str, dict[str, str]]] = []
    if key in choices and not choices[key].available:
        notes.append(("warning", choices[key].note, {}))
    if "builtin" in choices and not choices["builtin"].available:
        notes.append(("caption", f"Built-in weights: {choices['builtin'].note}.", {}))
    if key == DEMO_MODEL:
        text = "Random weights: the masks are meaningless. Use it to try the interface."
        notes.append(("info", text, {"icon": ":material/science:"}))
    return notes


def pretrained_available(name: str) -> tuple[bool, str]:
    """Whether the weights ``name`` of ``PRETRAINED`` are on this machine (never downloads), and if not, why."""
    try:
        from universal.model import checkpoints, sources

        entry = sources.sources().get(name)
    except Exception as exc:  # noqa: BLE001
        return False, str(exc)
    if entry is None:
        return False, f"{name!r} is not a known weights name"
    if name == "builtin":
        if checkpoints.builtin_weights_path().is_file():
            return True, ""
        return False, (
            "the built-in weights are not shipped yet (universal/resources/builtin.pt is missing); "
            "train one with `universal train` and load its checkpoint"
        )
    if sources.cached_path(entry).is_file():
        return True, ""
    return False, f"not downloaded: use its Download box below, or run `universal models download {name}`"


def load_model(
    key: str, *, checkpoint: str | os.PathLike | None = None, encoder: str | None = None, seed: int = 0
):
    """Load a model for the app: a PRETRAINED name, a local checkpoint file, or the demo model.

    Args:
        key: A :func:`model_choices` key, :data:`CHECKPOINT` (then ``checkpoint`` is the path) or :data:`DEMO_MODEL`.
        encoder: For the demo model: the text encoder (default ``"minilm"``, falling back to ``"onehot"``).
        seed: For the demo model: the torch seed of its random weights (fixed, so runs are reproducible).
    """
    from universal import model as m

    if key == DEMO_MODEL:
        return demo_model(encoder=encoder or "minilm", seed=seed)
    if key == CHECKPOINT:
        if not checkpoint:
            raise CheckpointError("give the path of a checkpoint file (.pt/.pth) to load")
        if m.sources.is_hub_spec(checkpoint):  # hf-hub:ORG/REPO[:FILE][@REVISION]
            return m.load_pretrained(str(checkpoint).strip())
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
