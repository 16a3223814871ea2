"""The dashboard's Correct tab, without Streamlit: edits of the current run's masks, saving corrected cases,
fine-tuning in the background, and the fine-tuned models the Model box offers.

- :func:`correction_of` gives the current run's :class:`CorrectionRecord` (an :class:`~universal.edit.EditHistory`
  over the run's masks, created on the first look, replaced when the run changes).
- :func:`apply_strokes`, :func:`remove_component`, :func:`copy_to_neighbours`, :func:`undo`, :func:`redo` change
  the masks and keep the run consistent: the ``Segmentation``'s masks, volumes (mL) and mean HU of the edited
  class are updated, and what was derived from the old masks (3-D surfaces, evaluation, download files) is
  dropped, so each is recomputed when its tab opens.
- :func:`save_training_case` writes the CT and the corrected classes into the corrections dataset
  (:mod:`universal.corrections`); :class:`FinetuneJob` runs :func:`universal.finetune.finetune` in a thread with
  progress and a stop event; :func:`finetuned_choices` lists the models it wrote for the Model box.

Where things live: ``$UNIVERSAL_CORRECTIONS_DIR`` (default ``$UNIVERSAL_CACHE_DIR/corrections``, else
``~/.cache/universal/corrections``) holds ``dataset/`` (the corrected cases) and ``models/`` (fine-tuned models
and their cards).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from universal import edit
from universal.errors import InputError, UniversalError

__all__ = [
    "CORRECTIONS_ENV",
    "CorrectionRecord",
    "FinetuneJob",
    "apply_strokes",
    "canvas_strokes",
    "copy_to_neighbours",
    "correction_of",
    "corrections_root",
    "finetune_weights",
    "finetuned_choices",
    "redo",
    "remove_component",
    "save_training_case",
    "undo",
]

CORRECTIONS_ENV = "UNIVERSAL_CORRECTIONS_DIR"


def corrections_root(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of the corrections dataset and the fine-tuned models (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get(CORRECTIONS_ENV):
        return Path(env[CORRECTIONS_ENV]).expanduser()
    cache = env.get("UNIVERSAL_CACHE_DIR")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "universal") / "corrections"


# ------------------------------------------------------------------------------------------------ editing
@dataclass
class CorrectionRecord:
    """The edits of run ``run_id``: its history and a counter that renews the drawing widgets after each edit."""

    run_id: str
    history: edit.EditHistory
    version: int = 0
    last: str = ""
    segmented_ml: dict[str, float] = field(default_factory=dict)  # the volumes before any edit


def correction_of(state: Any) -> CorrectionRecord | None:
    """The current run's correction record (a new one when the run changed), or ``None`` without a run."""
    run = state.run
    if run is None:
        return None
    record = getattr(state, "correction", None)
    if record is None or record.run_id != run.id:
        record = CorrectionRecord(
            run.id, edit.EditHistory(run.seg.masks), segmented_ml=dict(run.seg.volumes_ml)
        )
        state.correction = record
    return record


def _sync(state: Any, record: CorrectionRecord, name: str, what: str) -> None:
    """Put the edited mask into the run's Segmentation, re-measure it, drop what was derived from the old masks."""
    seg = state.run.seg
    mask = record.history.masks[name]
    seg.masks[name] = mask
    volume = seg.volume
    voxel_ml = abs(float(np.linalg.det(np.asarray(volume.affine)[:3, :3]))) / 1000.0
    seg.volumes_ml[name] = float(np.count_nonzero(mask)) * voxel_ml
    seg.mean_hu[name] = (
        float(np.asarray(volume.array)[mask].mean(dtype=np.float64)) if mask.any() else float("nan")
    )
    state.mesh = state.evaluation = state.downloads = None
    record.version += 1
    record.last = what


def _do(state: Any, change: edit.Edit) -> int:
    record = correction_of(state)
    if record is None:
        raise InputError("run a segmentation first, then correct it")
    if not record.history.do(change):
        return 0
    _sync(state, record, change.name, f"{change.what}: {change.size} voxels of {change.name}")
    return change.size


def _mask(state: Any, name: str) -> np.ndarray:
    record = correction_of(state)
    if record is None:
        raise InputError("run a segmentation first, then correct it")
    if name not in record.history.masks:
        raise InputError(
            f"{name!r} was not segmented in this run; choose one of {', '.join(record.history.masks)}"
        )
    return record.history.masks[name]


def canvas_strokes(drawing: Mapping[str, Any] | None) -> list[tuple[list[tuple[float, float]], float]]:
    """``(points (row, col), radius)`` of every free-drawn path of a drawable-canvas drawing (Fabric.js JSON:
    ``objects`` of type ``path`` with ``["M", x, y]``, ``["Q", cx, cy, x, y]``, ``["L", x, y]`` commands)."""
    strokes = []
    for obj in (drawing or {}).get("objects") or []:
        if str(obj.get("type", "")).lower() != "path":
            continue
        points = []
        for command in obj.get("path") or []:
            if len(command) >= 3:  # the last two numbers of a command are its end point (x, y)
                points.append((float(command[-1]), float(command[-2])))
        if points:
            strokes.append((points, float(obj.get("strokeWidth", 1)) / 2.0))
    return strokes


def apply_strokes(
    state: Any,
    name: str,
    view: str,
    index: int,
    strokes: Sequence[tuple[Sequence[Sequence[float]], float]],
    mode: str,
    display_hw: Sequence[int],
) -> int:
    """Apply brush or eraser ``strokes`` (display ``(row, col)`` points, radius) to class ``name`` on slice
    ``index`` of ``view``; returns the voxels changed (each stroke is one undo step)."""
    changed = 0
    for points, radius in strokes:
        change = edit.stroke_edit(_mask(state, name), view, index, points, radius, mode, display_hw, name)
        changed += _do(state, change)
    return changed


def remove_component(
    state: Any, name: str, view: str, index: int, point: Sequence[float], display_hw: Sequence[int]
) -> int:
    """Remove the connected component of ``name`` under the display ``point`` (row, col); returns voxels removed."""
    mask = _mask(state, name)
    voxel = edit.click_voxel(mask.shape, view, index, point, display_hw)
    return _do(state, edit.component_edit(mask, voxel, name=name))


def copy_to_neighbours(state: Any, name: str, view: str, index: int, n: int, direction: str = "both") -> int:
    """Copy slice ``index`` of ``name`` onto its ``n`` neighbours in ``view``; returns the voxels changed."""
    return _do(state, edit.copy_to_neighbours_edit(_mask(state, name), view, index, n, direction, name))


def undo(state: Any) -> bool:
    """Undo the last edit of the current run (False when there is none)."""
    return _replay(state, "undo")


def redo(state: Any) -> bool:
    """Redo the last undone edit of the current run (False when there is none)."""
    return _replay(state, "redo")


def _replay(state: Any, which: str) -> bool:
    record = correction_of(state)
    change = getattr(record.history, which)() if record else None
    if change is not None:
        _sync(state, record, change.name, f"{which}: {change.what} of {change.name}")
    return change is not None


# ------------------------------------------------------------------------------------------------ dataset
def save_training_case(state: Any, classes: Sequence[str], root: Path | None = None) -> Any:
    """Save the current run's CT and its ``classes`` (the corrected ones) as a training case; returns the
    :class:`~universal.corrections.CorrectedCase`."""
    from universal.corrections import save_case

    if state.run is None:
        raise InputError("run a segmentation first, then correct and save it")
    seg, weights = state.run.seg, state.run.settings.weights
    root = corrections_root() if root is None else root
    name = getattr(seg.volume, "name", "") or "case"
    source = weights.checkpoint or weights.key
    return save_case(root / "dataset", seg.volume, seg.masks, list(classes), name=name, source=str(source))


def finetune_weights(weights: Any) -> str:
    """What to fine-tune for the run's :class:`~universal.app_logic.WeightsChoice`: a name or a checkpoint path."""
    from universal.app_logic import CHECKPOINT, DEMO_MODEL

    if weights.key == DEMO_MODEL:
        raise InputError(
            "the demo model has random weights: fine-tune a trained model (e.g. builtin) instead"
        )
    return str(weights.checkpoint) if weights.key == CHECKPOINT else str(weights.key)


@dataclass
class FinetuneJob:
    """:func:`universal.finetune.finetune` in a background thread: ``step``/``total``/``loss`` while it runs,
    then ``result`` (or ``error``, one line); ``stop()`` asks it to end before its next step."""

    dataset: Path
    weights: str
    out: Path
    config: Any = None
    step: int = 0
    total: int = 0
    loss: float = float("nan")
    result: Any = None
    error: str | None = None
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> FinetuneJob:
        self.thread = threading.Thread(target=self._work, name="finetune", daemon=True)
        self.thread.start()
        return self

    def _progress(self, step: int, total: int, loss: float) -> None:
        self.step, self.total, self.loss = step, total, float(loss)

    def _work(self) -> None:
        from universal.finetune import finetune

        try:
            self.result = finetune(
                self.dataset,
                self.weights,
                self.out,
                self.config,
                progress=self._progress,
                stop=self.stop_event,
            )
        except UniversalError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a background job reports every failure as one line
            self.error = f"fine-tuning failed: {type(exc).__name__}: {exc}"

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def new_model_path(root: Path | None = None, weights: str = "builtin") -> Path:
    """A fresh ``models/<weights>-ft-<UTC time>.pt`` path under the corrections folder."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = Path(weights).stem if weights.endswith(".pt") else weights
    return (corrections_root() if root is None else root) / "models" / f"{stem}-ft-{stamp}.pt"


def finetuned_choices(root: Path | None = None) -> list[Any]:
    """The Model box's entries for the fine-tuned models in ``models/`` (newest first); the key is the file's
    path, which :func:`universal.app_logic.load_model` loads like any checkpoint."""
    from universal.app_logic import ModelChoice

    folder = (corrections_root() if root is None else root) / "models"
    files = (
        sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    )
    return [ModelChoice(str(p), f"{p.stem} (fine-tuned, local)", True, "") for p in files]


# ------------------------------------------------------------------------------------------------ page helpers
TOOLS = {"Brush": "brush", "Eraser": "eraser", "Remove component": "component"}  #: the tab's tools → modes


def stroke_css(name: str, tool: str) -> str:
    """The canvas stroke colour: the class's colour for the brush, white for the eraser (half transparent)."""
    from universal.viz import class_color

    r, g, b = (255, 255, 255) if TOOLS.get(tool) == "eraser" else class_color(name)
    return f"rgba({r}, {g}, {b}, 0.6)"


def click_point(click: Mapping[str, Any] | None, display_hw: Sequence[int]) -> tuple[float, float] | None:
    """``(row, col)`` in image pixels of a ``streamlit_image_coordinates`` click (``x``, ``y`` on the rendered
    ``width`` × ``height``), or ``None`` without a click."""
    if not click or "x" not in click:
        return None
    h, w = (float(v) for v in display_hw)
    rh, rw = float(click.get("height") or h), float(click.get("width") or w)
    return (float(click["y"]) + 0.5) * h / rh, (float(click["x"]) + 0.5) * w / rw


def volume_text(state: Any, name: str) -> str:
    """``"**liver**: 812.3 mL (segmented: 800.1 mL)"``: the class's volume now and before any edit."""
    record = correction_of(state)
    now = state.run.seg.volumes_ml.get(name, float("nan"))
    before = record.segmented_ml.get(name, now) if record else now
    return f"**{name}**: {now:.1f} mL (segmented: {before:.1f} mL)"


def cases_table(root: Path | None = None) -> list[dict[str, Any]]:
    """The saved corrected cases as table rows (name, classes, saved, from)."""
    from universal.corrections import list_cases

    cases = list_cases((corrections_root() if root is None else root) / "dataset")
    return [
        {"case": c.name, "classes": ", ".join(c.annotated), "saved": c.saved, "from": c.source} for c in cases
    ]


def job_message(job: FinetuneJob) -> tuple[str, str]:
    """``(kind, text)`` of a fine-tuning job: ``info`` while it runs, then ``success``, ``warning`` or ``error``."""
    if job.running:
        loss = "" if np.isnan(job.loss) else f", loss {job.loss:.4f}"
        return "info", f"Fine-tuning {job.weights}: step {job.step} of {job.total or '…'}{loss}"
    if job.error:
        return "error", job.error
    if job.result is None:
        return "info", "Fine-tuning is starting…"
    if job.result.stopped:
        return "warning", job.result.message
    return "success", job.result.message + " — choose it in the Model box."


TEXT = {
    "help": "Draw on the slice with the brush or the eraser; with 'Remove component', click a piece of the mask "
    "to delete it in 3-D. Each edit updates the overlay, the volumes and the 3-D view.",
    "saved": "Saved case {name} with its corrected classes ({classes}); the others stay unannotated.",
    "anchor": "Train the classes you did not correct towards the model's own confident predictions on the saved "
    "cases, so that the shared network does not drift on them (slower: each case is segmented once first).",
}
