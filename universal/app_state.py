"""The dashboard's per-session state: one typed :class:`DashboardState` and its invalidation rules.

Streamlit keeps the widgets' values in ``st.session_state`` under their keys; everything else a browser session
loads or computes lives in one ``DashboardState`` (``st.session_state["state"]``):

- **a new input** (another sample, upload or path; :meth:`DashboardState.set_input`) clears the run, the loaded
  reference, the slice defaults and everything derived from them;
- **a new run** (Segment; :meth:`DashboardState.set_run`) clears what was derived from the previous run: the
  comparison, the evaluation, the 3-D surfaces and the download files;
- **derived records** name the run (and reference) they were computed from; the accessors
  (:meth:`~DashboardState.current_compare`, :meth:`~DashboardState.evaluation_for`, ...) return them only while
  those are current, so a stale record is never shown;
- **changed settings** do not discard a result (it records its own :class:`RunSettings`):
  :meth:`~DashboardState.settings_changed` tells the page to say that Segment would give another result.

>>> state = DashboardState()
>>> state.set_input(InputRecord(id="sample:phantom"))
>>> state.run is None and state.current_compare() is None
True
>>> state.folder.close()
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from universal.app_logic import SessionFolder, WeightsChoice

__all__ = [
    "CompareRecord",
    "DashboardState",
    "DownloadRecord",
    "EvaluationRecord",
    "GroundTruthRecord",
    "InputRecord",
    "MeshRecord",
    "RunRecord",
    "RunSettings",
]


@dataclass
class InputRecord:
    """The loaded CT (``id`` names the input; ``None`` when there is none) and, for a sample, its reference."""

    id: str | None = None
    volume: Any = None
    gt_masks: dict[str, np.ndarray] = field(default_factory=dict)
    annotated: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    gt_label: str = ""
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class RunSettings:
    """What the user asked a run for (compared with the sidebar to tell whether a result is still current)."""

    weights: WeightsChoice
    device: str
    classes: tuple[str, ...]
    fast: bool
    template: str | None = None
    precision: str | None = None


@dataclass
class RunRecord:
    """One segmentation of the current input: the ``Segmentation``, its settings, the seconds spent getting the
    model (from the cache or loading it) and the requested classes the model does not segment (skipped)."""

    seg: Any
    input_id: str | None
    settings: RunSettings
    model_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the settings did not do (e.g. fast with a 3 mm model)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def demo(self) -> bool:
        return self.settings.weights.demo


@dataclass
class CompareRecord:
    """Run B of the Compare tab, for the run ``result_id``: its segmentation, the per-class agreement table and
    the prompts' similarity matrix (or why it is undefined)."""

    result_id: str
    seg: Any
    table: Any
    sim: np.ndarray | None = None
    sim_error: str | None = None


@dataclass
class GroundTruthRecord:
    """A reference loaded for evaluation (``id`` names its source and convention): a
    :class:`universal.evaluation.Reference` on the CT's grid, or why it could not be read."""

    id: str
    name: str = ""
    reference: Any = None
    error: str | None = None


@dataclass
class EvaluationRecord:
    """The scores of run ``key[0]`` against reference ``key[1]`` under rules ``key[2]``, or the error."""

    key: tuple
    result: Any = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class MeshRecord:
    """A 3-D figure for ``key`` (run, source, classes, triangle cap) and the seconds it took."""

    key: tuple
    fig: Any
    seconds: float = 0.0


@dataclass
class DownloadRecord:
    """The output files of run ``result_id``, written once on the first download click (thread-safe: download
    buttons call back from Streamlit's threads)."""

    result_id: str
    files: dict[str, bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def files_of(self, seg: Any, write: Any) -> dict[str, bytes]:
        """``write(seg)`` (e.g. ``viz.saved_files``) the first time, the same bytes after."""
        with self.lock:
            if self.files is None:
                self.files = write(seg)
            return self.files


@dataclass
class DashboardState:
    """Everything one browser session has loaded or computed (see the module's rules)."""

    folder: SessionFolder = field(default_factory=SessionFolder)
    input: InputRecord = field(default_factory=InputRecord)
    run: RunRecord | None = None
    gt: GroundTruthRecord | None = None
    compare: CompareRecord | None = None
    evaluation: EvaluationRecord | None = None
    mesh: MeshRecord | None = None
    downloads: DownloadRecord | None = None
    correction: Any = None  # universal.correct_session.CorrectionRecord of the current run (the Correct tab)
    view_defaults: dict[str, dict[str, int]] = field(default_factory=dict)
    n_segment_runs: int = 0
    last_render_s: float = 0.0

    @classmethod
    def of(cls, store: MutableMapping[str, Any], key: str = "state") -> DashboardState:
        """The state kept in ``store`` (``st.session_state``) under ``key``, created on a session's first run."""
        if not isinstance(store.get(key), cls):
            store[key] = cls()
        state = store[key]
        state.ensure_folder()
        return state

    def ensure_folder(self) -> SessionFolder:
        """The session's upload folder (a new one if it was removed)."""
        if self.folder.closed:
            self.folder = SessionFolder()
        return self.folder

    # ------------------------------------------------------------------------------------------ invalidation
    def set_input(self, record: InputRecord) -> None:
        """A new input: the run, the reference, the slice defaults and all derived records are cleared."""
        self.input = record
        self.gt = None
        self.view_defaults.clear()
        self.clear_results()

    def clear_results(self) -> None:
        """Forget the run and everything derived from it (the input and the loaded reference stay)."""
        self.run = self.compare = self.evaluation = self.mesh = self.downloads = self.correction = None

    def set_run(self, run: RunRecord) -> None:
        """A new run (one segmentation more) replaces the previous one and what was derived from it."""
        self.clear_results()
        self.run = run
        self.n_segment_runs += 1

    def set_compare(self, record: CompareRecord) -> None:
        """Run B of the current run (one segmentation more)."""
        self.compare = record
        self.n_segment_runs += 1

    def settings_changed(self, current: RunSettings) -> bool:
        """Whether the sidebar now asks for something else than the shown run did."""
        return self.run is not None and self.run.settings != current

    # ------------------------------------------------------------------------------------------ derived records
    def current_compare(self) -> CompareRecord | None:
        """Run B when it belongs to the current run."""
        if self.run is None or self.compare is None or self.compare.result_id != self.run.id:
            return None
        return self.compare

    def evaluation_for(self, key: tuple) -> EvaluationRecord | None:
        """The evaluation computed for ``key`` (run id, reference id, rules), if it is the one kept."""
        return self.evaluation if self.evaluation is not None and self.evaluation.key == key else None

    def current_scores(self) -> Any:
        """The evaluation result of the current run (for the downloads), or ``None``."""
        ev = self.evaluation
        if self.run is None or ev is None or ev.result is None or ev.key[0] != self.run.id:
            return None
        return ev.result

    def mesh_for(self, key: tuple) -> MeshRecord | None:
        return self.mesh if self.mesh is not None and self.mesh.key == key else None

    def current_downloads(self) -> DownloadRecord | None:
        """The download files of the current run (a new, empty record when the run changed)."""
        if self.run is None:
            return None
        if self.downloads is None or self.downloads.result_id != self.run.id:
            self.downloads = DownloadRecord(self.run.id)
        return self.downloads
