"""Project exceptions: every error a user can cause carries a sentence that says what to do."""

from __future__ import annotations


class UniversalError(Exception):
    """Base class of every error a user can cause; the CLI and the app show its message, not a traceback."""


class InputError(UniversalError, ValueError):
    """A CT or label file that cannot be used (wrong type, not 3-D, not HU, empty, corrupt, too large)."""


class ClassNameError(UniversalError, KeyError):
    """An unknown class name; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class CheckpointError(UniversalError, ValueError):
    """A checkpoint that is corrupt, foreign, or of another architecture / class count."""


class EncoderUnavailableError(UniversalError, RuntimeError):
    """A text encoder whose weights cannot be had here (e.g. CLIP offline)."""


class DownloadError(UniversalError, RuntimeError):
    """A download that failed (offline, checksum mismatch)."""


class InputWarning(UserWarning):
    """An unusual but usable input (thick slices, few slices, oblique axes, several DICOM series, resampled labels)."""
