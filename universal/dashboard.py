"""The dashboard's actions: read an input, run a :class:`~universal.predictor.Predictor`, compare two runs, load a
reference and score against it, build surfaces — each one recorded in the session's
:class:`~universal.app_state.DashboardState`. ``app.py`` draws the widgets and calls these; nothing here imports
Streamlit, so every action is testable without a browser.

Option lists come from the library: templates from :data:`universal.prompts.TEMPLATES`, precisions from
:data:`universal.spec.PRECISIONS`, devices from :func:`universal.app_logic.available_devices`, classes from the
taxonomy.

>>> StageProgress.stage_fraction("inference", 0.475)  # halfway through the sliding window
0.5
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from universal import app_logic as al
from universal.app_state import (
    CompareRecord,
    DashboardState,
    EvaluationRecord,
    GroundTruthRecord,
    InputRecord,
    MeshRecord,
    RunRecord,
    RunSettings,
)
from universal.errors import InputError, UniversalError

COMMON_CLASSES = (
    "liver", "spleen", "right kidney", "left kidney", "pancreas", "stomach", "gallbladder", "aorta",
    "inferior vena cava", "liver tumor",
)  # fmt: skip
"""The dashboard's default class selection (and the "common abdominal organs" quick pick)."""

CUSTOM = "custom"
"""The template choice "free text" (and the encoder choice "other spec")."""

MODEL_OWN = "the model's own"
"""The precision choice "what the model's spec says"."""

TRIANGLE_CAPS = (20_000, 40_000, 60_000, 100_000, 150_000)
"""The 3-D view's choices of the most triangles drawn."""

RULE_LABELS = {
    "flare23": "FLARE 2023 (classes, tolerances, rules)",
    None: "all segmented classes (NSD tolerance 2 mm or FLARE's)",
}
"""How the Evaluate tab names the presets of :data:`universal.evaluation.PRESETS` (``None``: generic rules)."""


# ------------------------------------------------------------------------------------------------ input
@dataclass(frozen=True)
class InputRef:
    """What the sidebar points at: ``kind`` is ``"sample"`` (value: its key), ``"upload"`` (an uploaded file:
    ``name``, ``size``, ``file_id``, ``getvalue()``) or ``"path"`` (a path on the server); ``series``: the DICOM
    series chosen (a SeriesInstanceUID or SeriesNumber; ``None``: the loader's default)."""

    kind: str
    value: Any
    series: str | None = None

    @property
    def id(self) -> str:
        """Names the input; a new id means a new input (an edited file on the server, another series, too)."""
        return self.base_id if self.series is None else f"{self.base_id}{_SERIES_MARK}{self.series}"

    @property
    def base_id(self) -> str:
        """The id of the file or folder, whatever series of it is read."""
        if self.kind == "upload":
            return f"upload:{self.value.file_id}:{self.value.name}:{self.value.size}"
        if self.kind == "path":
            p = Path(self.value).expanduser()
            try:
                return f"path:{p.resolve()}:{p.stat().st_mtime_ns}"
            except OSError:
                return f"path:{p}"
        return f"sample:{self.value}"


_SERIES_MARK = "#series="


def series_choices(record: InputRecord, ref: InputRef | None) -> tuple[list[str], int, Callable[[str], str]] | None:
    """``(options, index, format_func)`` of a "DICOM series" select box when the input ``ref`` points at was read
    and holds several CT series (``None`` otherwise): the values are SeriesInstanceUIDs (SeriesNumbers for a series
    without one), ``index`` the series shown now. Other modalities are not offered (the loader refuses them)."""
    if ref is None or ref.kind == "sample" or record.volume is None or record.id is None:
        return None
    if record.id.partition(_SERIES_MARK)[0] != ref.base_id or record.volume.source is None:
        return None
    meta = record.volume.source.meta
    found = [s for s in meta.get("series") or [] if s.get("modality") in ("CT", "")]
    labels = {_series_value(s): _series_label(s) for s in found if _series_value(s)}
    if len(labels) < 2:
        return None
    options = list(labels)
    loaded = _series_value({"uid": meta.get("series_uid"), "number": meta.get("series_number")})
    return options, options.index(loaded) if loaded in options else 0, labels.__getitem__


def with_series(ref: InputRef, record: InputRecord, pick: str) -> InputRef:
    """``ref`` reading the series ``pick`` of :func:`series_choices`; when that is the series ``record`` holds, the
    ref keeps the record's id (no second read of the same series)."""
    meta = record.volume.source.meta
    if pick == _series_value({"uid": meta.get("series_uid"), "number": meta.get("series_number")}):
        return replace(ref, series=(record.id or "").partition(_SERIES_MARK)[2] or None)
    return replace(ref, series=pick)


def after_new_input(store: MutableMapping[str, Any], record: InputRecord, ref: InputRef | None) -> bool:
    """What a new input resets in the widgets' state ``store`` (the session state): the slice sliders' positions
    (the ``*_slice_*`` keys; a position past the new volume's last slice, as another series or a shorter scan
    has, would be refused by the slider). Returns whether the input offers a series choice
    (:func:`series_choices`), which the app then draws at once (a rerun)."""
    for key in [k for k in store if "_slice_" in str(k)]:
        del store[key]
    return series_choices(record, ref) is not None


def _series_value(s: Mapping[str, Any]) -> str:
    return str(s.get("uid") or (s["number"] if s.get("number") is not None else ""))


def _series_label(s: Mapping[str, Any]) -> str:
    number = s.get("number")
    head = f"#{number} · " if number is not None else ""
    return f"{head}{s.get('description') or '(no description)'} · {s.get('n_slices')} slices"


def load_input(
    ref: InputRef | None, folder: al.SessionFolder, limit_mb: float, sample: Callable[[str], al.SampleData]
) -> InputRecord:
    """Read the CT of ``ref`` (and a sample's reference, through ``sample(key)``); an upload is saved into
    ``folder``. Errors become the record's ``error``, warnings its ``warnings`` (readable messages)."""
    if ref is None:
        return InputRecord()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = _read_input(ref, folder, limit_mb, sample)
    except UniversalError as exc:
        return InputRecord(id=ref.id, error=str(exc))
    except (OSError, ValueError) as exc:  # a file the loaders could not make sense of
        return InputRecord(id=ref.id, error=f"could not read this input: {exc}")
    record.id, record.seconds = ref.id, time.perf_counter() - t0
    record.warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return record


def _read_input(
    ref: InputRef, folder: al.SessionFolder, limit_mb: float, sample: Callable[[str], al.SampleData]
) -> InputRecord:
    from universal.io import load_volume

    if ref.kind == "sample":
        data = sample(ref.value)
        label = f"reference of the sample ({data.sample.gt_dataset or 'phantom truth'})"
        return InputRecord(
            volume=data.volume,
            gt_masks=data.gt_masks,
            annotated=data.annotated,
            classes=data.classes,
            gt_label=label,
        )
    if ref.kind == "upload":
        al.check_upload(ref.value.name, ref.value.size, limit_mb)
        folder.clear("uploads")
        saved = folder.save(ref.value.name, ref.value.getvalue())
        return InputRecord(volume=load_volume(saved, series=ref.series))
    return InputRecord(volume=load_volume(Path(ref.value).expanduser(), series=ref.series))


def volume_caption(volume: Any) -> str:
    """One line about a CT: name, voxels, spacing, HU range."""
    sx, sy, sz = volume.spacing
    return (
        f"**{getattr(volume, 'name', 'CT')}** — {' × '.join(map(str, volume.array.shape))} voxels, "
        f"{sx:.2f} × {sy:.2f} × {sz:.2f} mm, HU {float(volume.array.min()):.0f} … {float(volume.array.max()):.0f}"
    )


# ------------------------------------------------------------------------------------------------ choices
def class_kinds() -> dict[str, str]:
    """Every class of the taxonomy → its kind (``"organ"``, ``"tumor"``, ...), in taxonomy order."""
    from universal.taxonomy import CLASSES

    return {c.name: c.kind for c in CLASSES}


def class_options() -> list[str]:
    """The class picker's options: organs first, then tumours."""
    kinds = class_kinds()
    return [n for n, k in kinds.items() if k != "tumor"] + [n for n, k in kinds.items() if k == "tumor"]


def class_label(name: str) -> str:
    return f"{name}  ·  {'tumour' if class_kinds()[name] == 'tumor' else 'organ'}"


def class_groups(reference_classes: Iterable[str] = ()) -> dict[str, list[str]]:
    """The quick picks: the scan's reference classes, common organs, all organs, all tumours, all classes."""
    kinds = class_kinds()
    organs = [n for n, k in kinds.items() if k != "tumor"]
    tumours = [n for n, k in kinds.items() if k == "tumor"]
    reference = [c for c in reference_classes if c in kinds]
    return {
        "this scan's reference classes": reference or list(COMMON_CLASSES),
        "common abdominal organs": list(COMMON_CLASSES),
        "all organs": organs,
        "all tumours": tumours,
        f"all {len(kinds)} classes": organs + tumours,
    }


def initial_classes(record: InputRecord) -> list[str]:
    """The class selection for a newly loaded input: its reference's classes, else :data:`COMMON_CLASSES`."""
    return class_groups(record.classes)["this scan's reference classes"]


def evaluation_rules() -> dict[str, str | None]:
    """The Evaluate tab's rules, label → ``preset``: each of :data:`universal.evaluation.PRESETS`, then the
    generic rules (``None``)."""
    from universal.evaluation import PRESETS

    return {RULE_LABELS.get(p, f"{p} rules"): p for p in (*PRESETS, None)}


def template_options() -> list[str]:
    """Keys of :data:`universal.prompts.TEMPLATES`, then :data:`CUSTOM` (free text)."""
    from universal.prompts import TEMPLATES

    return [*TEMPLATES, CUSTOM]


def template_label(key: str) -> str:
    from universal.prompts import TEMPLATES

    return "your own text with {}…" if key == CUSTOM else TEMPLATES[key].replace("{}", "…")


def template_of(key: str, text: str | None = None) -> str | None:
    """The template of a choice: the named template, or the free ``text`` for :data:`CUSTOM`."""
    from universal.prompts import TEMPLATES

    return text if key == CUSTOM else TEMPLATES.get(key)


def encoder_options(own: str) -> list[str]:
    """``own`` (the weights' encoder: "model's own" / "same as A"), the encoder keywords, then :data:`CUSTOM`."""
    return [own, *al.ENCODER_KEYWORDS, CUSTOM]


def encoder_label(option: str) -> str:
    return "other (a spec)…" if option == CUSTOM else option


def window_label(name: str) -> str:
    """A CT window preset with its level/width, e.g. ``"bone (400/1800)"``."""
    from universal.viz import window_presets

    level, width = window_presets()[name]
    return f"{name} ({level:g}/{width:g})"


def slice_caption(view: str, index: int) -> str:
    where = "anterior" if view == "axial" else "superior"
    return f"{view} slice {index} — patient's right on the image's left, {where} at the top"


def precision_options() -> list[str]:
    """:data:`MODEL_OWN` (the model spec's precision), then :data:`universal.spec.PRECISIONS`."""
    from universal.spec import PRECISIONS

    return [MODEL_OWN, *PRECISIONS]


def precision_of(option: str) -> str | None:
    """The ``precision`` setting of a choice (``None``: the model spec's)."""
    return None if option == MODEL_OWN else option


# ------------------------------------------------------------------------------------------------ running
class StageProgress:
    """A ``progress(stage, fraction)`` callback for ``Predictor.predict`` that drives one bar per stage.

    ``new_bar(stage)`` makes a bar: anything with ``progress(fraction, text=...)`` (a Streamlit progress bar).
    A bar is marked done when the next stage starts.
    """

    def __init__(self, new_bar: Callable[[str], Any]) -> None:
        self.new_bar = new_bar
        self.bars: dict[str, Any] = {}
        self.done: set[str] = set()

    @classmethod
    def of(cls, container: Any) -> StageProgress:
        """Bars added to ``container`` (anything with ``progress(value, text=...)``, e.g. a Streamlit container)."""
        return cls(lambda stage: container.progress(0.0, text=stage))

    @staticmethod
    def stage_fraction(stage: str, overall: float) -> float:
        """The fraction of ``stage`` done, from the overall fraction (stage boundaries: ``STAGE_START``)."""
        from universal.inference import STAGE_START

        order = list(STAGE_START)
        if stage not in STAGE_START:
            return float(np.clip(overall, 0.0, 1.0))
        i = order.index(stage)
        end = STAGE_START[order[i + 1]] if i + 1 < len(order) else 1.0
        span = max(end - STAGE_START[stage], 1e-9)
        return float(np.clip((overall - STAGE_START[stage]) / span, 0.0, 1.0))

    def __call__(self, stage: str, overall: float) -> None:
        for s, bar in self.bars.items():
            if s != stage and s not in self.done:
                bar.progress(1.0, text=f"{s} ✓")
                self.done.add(s)
        if stage == "done":
            return
        if stage not in self.bars:
            self.bars[stage] = self.new_bar(stage)
        frac = self.stage_fraction(stage, overall)
        self.bars[stage].progress(frac, text=f"{stage} — {frac:.0%}")


class WarmUp:
    """Once per server: a background thread imports torch while the first page loads, then (once
    :attr:`page_drawn` is set) builds the default base Predictor, so the first Segment does not wait.

    ``build(weights, device)`` makes a base Predictor (default :func:`universal.app_logic.base_predictor`).
    """

    def __init__(self, device: str = "auto", build: Callable[..., Any] | None = None, start: bool = True):
        self.device, self.build = device, build or al.base_predictor
        self.page_drawn = threading.Event()
        self.weights: al.WeightsChoice | None = None
        self.predictor: Any = None
        self.thread = threading.Thread(target=self._work, name="universal-warm-up", daemon=True)
        if start:
            self.thread.start()

    def _work(self) -> None:
        try:
            import universal.model  # noqa: F401 - torch: the sidebar's model list needs it too

            self.page_drawn.wait(timeout=20)
            weights = al.WeightsChoice(next(c.key for c in al.model_choices() if c.available))
            self.predictor = self.build(weights, self.device)
            self.weights = weights
        except Exception:  # noqa: BLE001 - a failed warm-up only costs time later
            self.weights = None

    def take(self, weights: al.WeightsChoice, device: str) -> Any:
        """The warmed-up Predictor when it is the one asked for (waiting for it if it is being built), else None."""
        if self.thread.is_alive():
            self.thread.join()  # it may be loading these very weights: do not load them twice
        return self.predictor if (self.weights, self.device) == (weights, device) else None


def segment(
    base: Any,
    volume: Any,
    settings: RunSettings,
    input_id: str | None,
    progress: Any = None,
    model_seconds: float = 0.0,
) -> RunRecord:
    """Run A: ``base.with_settings(...)`` (same weights, the run's classes/fast/template/precision) on ``volume``.

    Requested classes the model does not segment are skipped (listed in the record); none left is an error.
    """
    wanted, skipped = al.split_supported_classes(base.model, settings.classes)
    if not wanted:
        raise InputError("none of the chosen classes is one this model segments; choose others")
    from universal.errors import InputWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        predictor = base.with_settings(
            classes=tuple(wanted), fast=settings.fast, template=settings.template, precision=settings.precision
        )
    notes = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    for w in caught:  # others as they came
        if not issubclass(w.category, InputWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    from universal.efficiency import EfficiencySampler

    with EfficiencySampler(getattr(predictor, "device", None), extra_wall_s=model_seconds) as sampler:  # FLARE
        seg = predictor.predict(volume, progress=progress)
    seg.info["efficiency"] = sampler.result.to_dict()
    return RunRecord(seg, input_id, settings, model_seconds, skipped, notes)


def compare_run(run: RunRecord, base_b: Any, template_b: str | None, progress: Any = None) -> CompareRecord:
    """Run B: the classes and settings of ``run`` with another template (and ``base_b``'s encoder); the
    per-class agreement and the prompts' similarity (undefined across encoders of different widths)."""
    seg = run.seg
    predictor = base_b.with_settings(
        classes=tuple(seg.masks),
        fast=run.settings.fast,
        template=template_b,
        precision=run.settings.precision,
    )
    seg_b = predictor.predict(seg.volume, progress=progress)
    enc_a = str(seg.info.get("encoder") or "minilm")
    enc_b = str(seg_b.info.get("encoder") or enc_a)
    try:
        names, ta, tb = list(seg.masks), seg.info.get("template"), seg_b.info.get("template")
        sim, sim_error = al.prompt_similarity_matrix(names, ta, tb, enc_a, enc_b), None
    except UniversalError as exc:
        sim, sim_error = None, str(exc)
    return CompareRecord(run.id, seg_b, al.compare_segmentations(seg, seg_b), sim, sim_error)


def run_summary(run: RunRecord) -> str:
    """The success line of a run: classes, seconds, device, mode, template."""
    seg = run.seg
    total = float(seg.timings.get("total", float("nan")))
    from universal.preprocess import spacing_text

    spacing = seg.info.get("target_spacing_mm")
    at = spacing_text(spacing) if spacing else "its spacing"
    mode = f"{'fast' if seg.info.get('fast') else 'standard'} ({at})"  # the grid it ran on, not a guess
    return (
        f"Segmented {len(seg.masks)} classes in {total:.1f} s (model load {run.model_seconds:.1f} s) — "
        f"{seg.info.get('device', '')}, {mode}, template “{seg.info.get('template')}”."
    )


Message = tuple[str, str, dict[str, Any]]
"""What the page says: ``(kind, text, options)``, drawn as ``getattr(st, kind)(text, **options)``."""

_ERROR, _WARNING, _SCIENCE = (
    {"icon": ":material/error:"},
    {"icon": ":material/warning:"},
    {"icon": ":material/science:"},
)


def input_messages(record: InputRecord) -> list[Message]:
    """What the page says about the input: its error, its warnings, then its size (or how to choose one)."""
    out: list[Message] = [("error", record.error, _ERROR)] if record.error else []
    out += [("warning", w, _WARNING) for w in record.warnings]
    if record.volume is not None:
        out.append(("caption", volume_caption(record.volume), {}))
    elif not record.error:
        out.append(("info", TEXT["no_input"], {}))
    return out


def run_messages(state: DashboardState, current: RunSettings) -> list[Message]:
    """What the page says about the run: skipped classes, the summary, the demo's warning, changed settings."""
    run = state.run
    if run is None:
        return []
    out: list[Message] = []
    if run.skipped:
        out.append(("warning", TEXT["skipped"].format(names=", ".join(run.skipped)), _WARNING))
    out += [("info", note, {}) for note in run.notes]
    out.append(("success", run_summary(run), {"icon": ":material/check_circle:"}))
    if run.demo:
        out.append(("warning", TEXT["demo_result"], _SCIENCE))
    if state.settings_changed(current):
        out.append(("caption", TEXT["stale"], {}))
    return out


def score_summary(result: Any) -> list[tuple[str, str]]:
    """The Evaluate tab's headline numbers: mean DSC, mean NSD (``–`` when undefined), classes scored."""
    means = result.mean()
    shown = ["–" if np.isnan(means[k]) else f"{means[k]:.3f}" for k in ("dsc", "nsd")]
    scored = f"{len(result.evaluated)} / {len(result.scores)}"
    return [("Mean DSC", shown[0]), ("Mean NSD", shown[1]), ("Classes scored", scored)]


def timings_table(run: RunRecord):
    """The timing breakdown of a run, with the app's model load as its own row."""
    from universal import viz

    frame = viz.timings_frame({**run.seg.timings})
    frame.loc[len(frame)] = ["model load (app)", run.model_seconds, np.nan]
    return frame


def efficiency_table(run: RunRecord):
    """FLARE 2023's efficiency numbers of a run (``universal.efficiency``) as a DataFrame ``measure, value``:
    wall time with the model load, peak GPU memory and GPU memory-time area ("no GPU" on a CPU), peak CPU RSS."""
    import pandas as pd

    eff = run.seg.info.get("efficiency") or {}

    def mb(key: str, unit: str = "MB") -> str:
        value = eff.get(key)
        return value if isinstance(value, str) or value is None else f"{value:,.0f} {unit}"

    rows = [
        ("wall time (with model load)", f"{eff['wall_s']:.2f} s" if "wall_s" in eff else None),
        ("peak GPU memory", mb("gpu_peak_mb")),
        ("GPU memory-time area", mb("gpu_area_mb_s", "MB·s")),
        ("peak CPU memory (RSS)", mb("cpu_peak_rss_mb")),
    ]
    return pd.DataFrame([(k, v if v is not None else "–") for k, v in rows], columns=["measure", "value"])


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class GroundTruthRef:
    """The Evaluate tab's reference: ``kind`` ``"sample"`` (value: the input id), ``"upload"`` (an uploaded file),
    ``"path"`` (a path on the server) or ``"kept"`` (value: the id of the reference loaded before)."""

    kind: str
    value: Any
    convention: str | None = None

    @property
    def id(self) -> str:
        if self.kind == "kept":
            return str(self.value)
        if self.kind == "sample":
            return f"sample:{self.value}"
        if self.kind == "upload":
            return f"upload:{self.value.file_id}:{self.convention}"
        return f"path:{self.value}:{self.convention}"

    @property
    def name(self) -> str:
        return self.value.name if self.kind == "upload" else str(self.value)


def kept_upload(state: DashboardState) -> GroundTruthRecord | None:
    """The label map uploaded before, still usable after its uploader forgot the file (a closed tab)."""
    gt = state.gt
    return gt if gt is not None and gt.id.startswith("upload:") and gt.error is None else None


def ground_truth(
    state: DashboardState, ref: GroundTruthRef | None, limit_mb: float
) -> GroundTruthRecord | None:
    """The reference of ``ref`` (loaded once per id and kept in ``state.gt``; an error is kept as a record)."""
    if ref is None:
        return None
    if state.gt is None or state.gt.id != ref.id:
        try:
            state.gt = GroundTruthRecord(ref.id, ref.name, _read_ground_truth(state, ref, limit_mb))
        except UniversalError as exc:
            state.gt = GroundTruthRecord(ref.id, error=str(exc))
        except (OSError, ValueError) as exc:
            state.gt = GroundTruthRecord(ref.id, error=f"could not read this label map: {exc}")
    return state.gt


def _read_ground_truth(state: DashboardState, ref: GroundTruthRef, limit_mb: float):
    """A :class:`universal.evaluation.Reference` on the CT's grid: the sample's masks, or a label file."""
    from universal.evaluation import read_reference

    inp = state.input
    if ref.kind == "sample":
        return read_reference(inp.gt_masks, like=inp.volume, annotated=inp.annotated)
    if ref.kind == "upload":
        al.check_upload(ref.value.name, ref.value.size, limit_mb)
        path = state.ensure_folder().save(ref.value.name, ref.value.getvalue(), subfolder="labels")
    else:
        path = Path(ref.value).expanduser()
    return read_reference(path, ref.convention, like=inp.volume)


def evaluation(state: DashboardState, gt: GroundTruthRecord, preset: str | None) -> EvaluationRecord:
    """:func:`universal.evaluation.evaluate` of the current run against ``gt`` under ``preset`` (computed once per
    run, reference and rules; an error is kept as the record's ``error``)."""
    from universal.evaluation import evaluate

    run = state.run
    assert run is not None, "evaluate after a run"
    key = (run.id, gt.id, preset)
    record = state.evaluation_for(key)
    if record is None:
        t0 = time.perf_counter()
        try:
            record = EvaluationRecord(
                key, evaluate(run.seg, gt.reference, preset=preset), time.perf_counter() - t0
            )
        except UniversalError as exc:
            record = EvaluationRecord(key, error=str(exc))
        state.evaluation = record
    return record


# ------------------------------------------------------------------------------------------------ views
def mask_centres(masks: Mapping[str, np.ndarray]) -> dict[str, int]:
    """View → the slice through the centre of the masks' voxels (empty when there are none)."""
    from universal.viz import AXES

    if not masks:
        return {}
    union = np.zeros(next(iter(masks.values())).shape, bool)
    for m in masks.values():
        union |= m
    if not union.any():
        return {}
    idx = np.argwhere(union).mean(axis=0).round().astype(int)
    return {view: int(idx[ax]) for view, ax in AXES.items()}


def compare_images(seg_a: Any, seg_b: Any, view: str, index: int, window: str) -> list[tuple[Any, str]]:
    """Run A's and run B's overlays of one slice and their difference map, each with its caption."""
    from universal import viz

    ct, spacing = seg_a.volume.array, seg_a.volume.spacing
    a, b = (
        viz.slice_overlay(ct, s.masks, view, index, window=window, spacing=spacing) for s in (seg_a, seg_b)
    )
    diff = viz.difference_map(seg_a.masks, seg_b.masks, view, index, ct, window, spacing)
    return [(a, "A"), (b, "B"), (diff, "difference: white both, orange only A, cyan only B")]


def legend_html(names: Iterable[str]) -> str:
    """A colour legend of the classes (the overlay's colours)."""
    from universal.viz import class_color

    items = []
    for i, n in enumerate(names):
        r, g, b = class_color(n, i)
        items.append(
            f"<span style='display:inline-block;margin:0 10px 4px 0;white-space:nowrap'>"
            f"<span style='display:inline-block;width:12px;height:12px;background:rgb({r},{g},{b});"
            f"border:1px solid #555;margin-right:4px;vertical-align:middle'></span>{n}</span>"
        )
    return "<div style='font-size:0.85em'>" + "".join(items) + "</div>"


def mesh(state: DashboardState, masks: Mapping[str, np.ndarray], affine: Any, key: tuple) -> MeshRecord:
    """The 3-D figure of ``key`` = (run id, source, classes, triangle cap), built once and kept in the state."""
    from universal.viz import mesh_figure

    record = state.mesh_for(key)
    if record is None:
        t0 = time.perf_counter()
        fig = mesh_figure(masks, affine, list(key[2]), max_triangles=key[3])
        record = state.mesh = MeshRecord(key, fig, time.perf_counter() - t0)
    return record


# ------------------------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class Download:
    """One download button: widget ``key``, ``label``, ``data`` (bytes, text or a callable made on click),
    ``file_name`` and ``mime``."""

    key: str
    label: str
    data: Any
    file_name: str
    mime: str


def downloads(state: DashboardState) -> list[Download]:
    """The current run's outputs: labels and masks (written on the input's own grid on the first click, once),
    the report (with the evaluation when there is one) and the metrics CSV (only after an evaluation)."""
    from universal import viz

    run, record, scores = state.run, state.current_downloads(), state.current_scores()
    assert run is not None and record is not None, "downloads of a run"
    name = getattr(state.input.volume, "name", "ct") or "ct"

    def files() -> dict[str, bytes]:
        return record.files_of(run.seg, viz.saved_files)

    def masks_zip() -> bytes:
        return viz.zip_bytes({k: v for k, v in files().items() if k.startswith("masks/")})

    report = run.seg.report()
    if scores is not None:
        report["evaluation"] = scores.to_dict()
    out = [
        Download(
            "dl_labels",
            "labels.nii.gz",
            lambda: files()["labels.nii.gz"],
            f"{name}_labels.nii.gz",
            "application/gzip",
        ),
        Download("dl_masks", "masks (zip)", masks_zip, f"{name}_masks.zip", "application/zip"),
        Download(
            "dl_report", "report.json", viz.to_json_bytes(report), f"{name}_report.json", "application/json"
        ),
        *export_downloads(run.seg, name),
    ]
    if scores is not None:
        out.append(
            Download("dl_metrics", "metrics.csv", viz.metrics_csv(scores), f"{name}_metrics.csv", "text/csv")
        )
    return out


#: the Download tab's buttons of :mod:`universal.exports` formats: format → (label, file name suffix, MIME type)
EXPORT_DOWNLOADS = {
    "dicom-seg": ("DICOM-SEG", "_seg.dcm", "application/dicom"),
    "rtstruct": ("RTSTRUCT", "_rtstruct.dcm", "application/dicom"),
    "seg.nrrd": ("3D Slicer .seg.nrrd", ".seg.nrrd", "application/octet-stream"),
    "report": ("report.html", "_report.html", "text/html"),
}


def export_downloads(seg: Any, name: str) -> list[Download]:
    """The export formats' buttons (:data:`EXPORT_DOWNLOADS`; keys ``dl_dicom-seg``, ``dl_rtstruct``,
    ``dl_seg_nrrd``, ``dl_report_html``), each file made on click by its
    :mod:`universal.exports` writer: DICOM-SEG and RTSTRUCT only for a DICOM input, and the segment formats only
    when some class was found (their writers leave empty classes out); the report always."""
    from universal import exports

    found = any(np.any(m) for m in seg.masks.values())
    dicom = exports.is_dicom_volume(seg.volume)
    out = []
    for fmt, (label, suffix, mime) in EXPORT_DOWNLOADS.items():
        if fmt != "report" and (not found or (fmt in exports.DICOM_FORMATS and not dicom)):
            continue
        make = functools.partial(exports.export_bytes, seg, fmt)
        key = "dl_report_html" if fmt == "report" else f"dl_{fmt.replace('.', '_')}"  # dl_report: report.json
        out.append(Download(key, label, make, f"{name}{suffix}", mime))
    return out


def metrics_table(result: Any):
    """The Evaluate tab's table: class, DSC, NSD, tolerance and status of each row of ``result``."""
    from universal.viz import metrics_frame

    frame = metrics_frame(result)
    return frame[[c for c in ("class", "dsc", "nsd", "tolerance_mm", "status") if c in frame]]


def evaluation_caption(record: EvaluationRecord) -> str:
    """What the table leaves out, and how long the scoring took."""
    res = record.result
    unscored = [f"{n} ({why})" for n, why in res.skipped.items() if n not in res.scores]
    return (
        "Classes the ground truth does not annotate are shown as *not annotated* and are left out "
        f"of the means (computed in {record.seconds:.1f} s)."
        + (f" Not scored: {', '.join(unscored)}." if unscored else "")
    )


def overlay_sources(run: RunRecord | None, record: InputRecord) -> dict[str, dict[str, np.ndarray]]:
    """What the slice viewer can overlay: the run's masks, and the sample's reference (its non-empty masks)."""
    sources = {"segmentation": dict(run.seg.masks)} if run is not None else {}
    if record.gt_masks:
        sources["reference"] = {n: m for n, m in record.gt_masks.items() if m.any()}
    return sources


TEXT = {
    "encoder_help": "Turns prompts into embeddings. A trained model only works with an encoder of the width it "
    "was trained with; the demo model is built with the one chosen here.",
    "encoder_spec": "clip:ViT-B-32:/path/weights.safetensors or table:/path/emb.npy",
    "checkpoint_input": "Checkpoint on the server (.pt/.pth) or hf-hub:ORG/REPO[:FILE][@REVISION]",
    "upload_help": "The limit is Streamlit's server.maxUploadSize in .streamlit/config.toml.",
    "upload": "NIfTI (.nii, .nii.gz), NRRD, MHA or a DICOM series as .zip — up to {limit} MB",
    "demo_result": "These masks come from the untrained demo model (random weights): they are meaningless.",
    "skipped": "This model was not trained for {names}: skipped. Choose another model (e.g. an official "
    "checkpoint) to segment those classes.",
    "stale": "The sidebar's settings have changed since this run: press Segment for a new one.",
    "subtitle": "The CLIP-Driven Universal Model, re-implemented: one network, one text prompt per class. "
    "**Research software, not for clinical use.**",
    "pick": "choose a group…",
    "path_example": "/data/case01/ct.nii.gz",
    "server_path": "CT on the server: a file, a DICOM folder or a .zip",
    "overlay_help": "The model's masks, or the reference (ground truth) of the sample.",
    "no_input": "Choose a built-in sample, upload a CT or give a path in the sidebar.",
    "gt": "Universal ids 1-32, FLARE 2023 ids 1-14, or the ids of a public dataset (mapped through "
    "the taxonomy; classes it does not annotate are shown as 'not annotated').",
    "evaluate_first": "Run a segmentation first; its masks are then scored against the ground truth.",
    "compare_first": "Run a segmentation first (run A); then choose a second template or encoder here (run B).",
    "downloads": "Masks and labels are written on the **input file's own grid and affine** (the same files as "
    "`universal segment`).",
    "mesh": "World coordinates in mm (RAS+). Surfaces from marching cubes on downsampled masks, {triangles:,} "
    "triangles (cap {cap:,}), built in {seconds:.1f} s.",
}
"""The dashboard's longer texts (help, notes, messages), by name; ``{...}`` fields are filled with ``format``."""
