"""The dashboard's Download control for registry weights (no Streamlit here; ``app.py`` draws it).

:func:`offer` says what the Model box shows for a downloadable source — its licence (with the acceptance it
needs), its size, where it comes from, whether a partial download will resume, and once it is cached the sha256
that every load checks; :func:`download` runs the download (:func:`universal.model.sources.obtain`) with a
``progress(fraction, text)`` callback for ``st.progress``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from universal.model import sources

#: ``progress(fraction in [0, 1], text)``, as ``st.progress(value, text=...)`` takes them
BarFn = Callable[[float, str], None]


@dataclass(frozen=True)
class WeightsOffer:
    """What the Download control of one source shows."""

    name: str
    licence: str
    requires_acceptance: bool
    accepted: bool
    size: int | None
    url: str
    cached: bool
    checksum: str
    sha256: str | None
    partial: int = 0
    description: str = ""

    @property
    def title(self) -> str:
        state = "downloaded" if self.cached else sources.human_size(self.size)
        return f"Download {self.name} ({state})"

    @property
    def lines(self) -> list[str]:
        """Licence, size and origin; a partial download that will resume."""
        out = [f"Licence: **{self.licence}**", f"Size: {sources.human_size(self.size)}", f"From: {self.url}"]
        if self.description:
            out.insert(0, self.description)
        if self.partial and not self.cached:
            out.append(f"A partial download ({sources.human_size(self.partial)}) resumes where it stopped.")
        return out

    @property
    def accept_label(self) -> str:
        return f"I accept the licence: {self.licence}"

    @property
    def needs_checkbox(self) -> bool:
        """Whether the user must tick the acceptance (a licence that is not open and not accepted before)."""
        return self.requires_acceptance and not self.accepted

    @property
    def sha_line(self) -> str:
        """The checksum every load checks (pinned, or recorded at the first download)."""
        if not self.sha256:
            return "sha256: not recorded yet (it is recorded at the next load)"
        return f"sha256 ({self.checksum}, checked at every load): `{self.sha256}`"


def offer(name: str) -> WeightsOffer | None:
    """The Download control of ``name``, or ``None`` when it is not a downloadable registry source (the built-in
    weights, a local checkpoint, the demo model, a bad registry file)."""
    try:
        source = sources.sources().get(name)
    except Exception:  # noqa: BLE001 - a bad registry file is reported by the model selector
        return None
    if source is None or not source.url:
        return None
    path = sources.cached_path(source)
    part = path.with_name(f".{path.name}.part")
    kind, sha = sources.checksum_state(source)
    return WeightsOffer(
        name=source.name,
        licence=source.licence,
        requires_acceptance=bool(source.requires_acceptance),
        accepted=sources.licence_accepted(source),
        size=path.stat().st_size if path.is_file() else source.size,
        url=source.url,
        cached=path.is_file(),
        checksum=kind,
        sha256=sha,
        partial=part.stat().st_size if part.is_file() else 0,
        description=source.description,
    )


def bytes_progress(bar: BarFn | None, name: str) -> sources.ProgressFn | None:
    """A ``progress(done, total)`` byte callback that moves ``bar`` in whole percents (few redraws)."""
    if bar is None:
        return None
    last = [-1]

    def update(done: int, total: int | None) -> None:
        fraction = min(1.0, done / total) if total else 0.0
        step = int(fraction * 100) if total else done >> 22  # unknown size: every 4 MiB
        if step != last[0]:
            last[0] = step
            size = f" of {sources.human_size(total)}" if total else ""
            bar(fraction, f"Downloading {name}: {sources.human_size(done)}{size}")

    return update


def download(name: str, accept_licence: bool, bar: BarFn | None = None) -> str:
    """Download ``name`` into the weights cache (resuming a partial download); its checked sha256.

    Raises:
        DownloadError: licence not accepted, offline, interrupted (run again to resume), pinned sha256 mismatch.
        CheckpointError: unknown name, or a cached file that no longer matches its sha256.
    """
    _, sha = sources.obtain(name, progress=bytes_progress(bar, name), accept_licence=accept_licence)
    if bar is not None:
        bar(1.0, f"Downloaded {name}")
    return sha
