"""Where weights come from: the registry (built-in and a user file), resumable checked downloads, the Hub.

- **Sources**: :func:`sources` is every downloadable entry — :data:`universal.model.checkpoints.PRETRAINED` plus
  the entries of a JSON file named by ``$UNIVERSAL_WEIGHTS_REGISTRY`` (``{"NAME": {"url": ..., "licence": ...,
  "backbone": ..., "sha256": ..., "size": ..., "filename": ..., "format": ..., "description": ...,
  "requires_acceptance": ...}}``), each checked once by :class:`WeightsSource` (one line per bad entry).
- **Downloads** (:func:`download`): into the weights cache (:func:`universal.model.checkpoints.cache_dir`) through
  ``.NAME.part``, which is kept when the transfer breaks and resumed next time with ``Range: bytes=N-`` (a server
  that answers 200 instead of 206 is read from the start); the file appears under its final name only complete.
  Progress goes to a callback ``progress(done, total)`` (bytes; ``total`` from ``Content-Length``, or ``None``).
- **Licences**: a source whose licence is not open (non-commercial, no-derivatives or research-only, e.g. the
  official CC BY-NC-ND 4.0 weights; or ``requires_acceptance: true``) is downloaded only once its licence is
  accepted (``accept_licence=True``, ``universal models download NAME --accept-licence``, the dashboard's
  checkbox); the acceptance is recorded in ``licences.json`` beside the weights cache, so it is asked once.
- **Checksums**: a pinned sha256 is checked; otherwise the sha256 of the first download is recorded in the
  cache's ``manifest.json`` (written atomically) and every later load checks the file against it
  (:func:`verify`): a changed file raises ``CheckpointError`` naming the file, both digests and what to do.
- **Hugging Face Hub**: ``hf-hub:ORG/REPO[:FILE][@REVISION]`` (:func:`parse_hub_spec`; FILE defaults to
  :data:`HUB_DEFAULT_FILE`, REVISION to ``main``) is fetched with ``huggingface_hub.hf_hub_download`` into the
  Hub's own cache (``$HF_ENDPOINT`` and ``$HF_HUB_CACHE`` read when called); its sha256 is recorded and checked
  per commit like a registry download's.

Every failure is one line: ``DownloadError`` (offline, interrupted, licence not accepted, pinned checksum
mismatch), ``CheckpointError`` (unknown name, a cached file that changed), ``InputError`` (a bad registry file
or hub spec).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from universal.errors import CheckpointError, DownloadError, InputError

__all__ = [
    "FORMATS",
    "HUB_DEFAULT_FILE",
    "HUB_PREFIX",
    "REGISTRY_ENV",
    "HubSpec",
    "WeightsSource",
    "accept_licence",
    "cached_path",
    "checksum_state",
    "download",
    "fetch_hub",
    "get_source",
    "is_hub_spec",
    "licence_accepted",
    "human_size",
    "listing",
    "obtain",
    "parse_hub_spec",
    "prepare_weights",
    "read_registry",
    "sources",
    "tqdm_progress",
    "verify",
]

REGISTRY_ENV = "UNIVERSAL_WEIGHTS_REGISTRY"
HUB_PREFIX = "hf-hub:"
#: the file of a hub spec without ``:FILE`` (a checkpoint of either format, read with ``weights_only=True``)
HUB_DEFAULT_FILE = "model.pt"
HUB_DEFAULT_REVISION = "main"
FORMATS = ("official", "universal")
MANIFEST = "manifest.json"
LICENCES = "licences.json"
_BLOCK = 1 << 20
_RESTRICTED = re.compile(r"(\bNC\b|\bND\b|non-?commercial|no-?deriv|research)", re.IGNORECASE)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIELDS = {"url", "sha256", "licence", "license", "backbone", "format", "filename", "description", "size"}
_FIELDS |= {"requires_acceptance"}

#: ``progress(done, total)``: bytes written so far (a resumed download starts at the part's size) and the
#: file's size (``None`` when the server does not say)
ProgressFn = Callable[[int, "int | None"], None]


# ------------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class WeightsSource:
    """One downloadable entry of the weights registry, checked where it enters.

    Attributes:
        name: Registry key (lower case letters, digits, ``.``, ``_``, ``-``).
        url: ``http(s)://`` address of the file (``None``: not downloadable, e.g. the built-in weights).
        licence: Licence text shown before the download.
        backbone: Backbone name (for listings).
        format: ``"official"`` or ``"universal"`` (the file's layout; both are detected on load anyway).
        filename: Name in the weights cache (a plain file name).
        sha256: Pinned digest (64 hex digits) or ``None`` (then the first download's digest is recorded).
        size: Size in bytes if known beforehand (listings; the download's own size comes from the server).
        requires_acceptance: Whether the licence must be accepted before the download (default: when the
            licence is non-commercial, no-derivatives or research-only).
        origin: Where the entry comes from (``"built-in"`` or the registry file's path).
    """

    name: str
    url: str | None
    licence: str
    backbone: str = ""
    format: str = "universal"
    filename: str = ""
    sha256: str | None = None
    size: int | None = None
    description: str = ""
    requires_acceptance: bool | None = None
    origin: str = "built-in"

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise InputError(f"weights source {self.name!r} ({self.origin}): {problem}")
        if not self.filename:
            object.__setattr__(self, "filename", self._default_filename())
        if self.requires_acceptance is None:
            object.__setattr__(self, "requires_acceptance", bool(_RESTRICTED.search(self.licence)))
        if self.sha256:
            object.__setattr__(self, "sha256", self.sha256.lower())

    def _problem(self) -> str:
        """What is wrong with the entry ('' when nothing)."""
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            return "its name must be lower-case letters, digits, '.', '_' or '-'"
        if self.url is not None and not (isinstance(self.url, str) and re.match(r"^https?://\S+$", self.url)):
            return f"url {self.url!r} is not an http:// or https:// address"
        if not isinstance(self.licence, str) or not self.licence.strip():
            return "it needs a 'licence' (the text users accept before downloading)"
        if self.format not in FORMATS:
            return f"format {self.format!r} must be one of {', '.join(FORMATS)}"
        fn = self.filename
        if not isinstance(fn, str) or (fn and (Path(fn).name != fn or fn.startswith(".") or fn in ("..",))):
            return f"filename {fn!r} must be a plain file name (no folders, not hidden)"
        if self.sha256 is not None and not (isinstance(self.sha256, str) and _SHA.match(self.sha256.lower())):
            return "sha256 must be 64 hexadecimal digits (or null)"
        if self.size is not None and (
            isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1
        ):
            return f"size {self.size!r} must be a positive number of bytes (or null)"
        if self.requires_acceptance is not None and not isinstance(self.requires_acceptance, bool):
            return "requires_acceptance must be true or false"
        if not isinstance(self.backbone, str) or not isinstance(self.description, str):
            return "backbone and description must be text"
        return ""

    def _default_filename(self) -> str:
        suffix = Path(str(self.url or "").split("?")[0]).suffix
        return self.name + (suffix if suffix in (".pt", ".pth", ".bin", ".ckpt") else ".pt")

    @classmethod
    def from_entry(cls, name: str, entry: Any, origin: str) -> WeightsSource:
        """A source from a registry mapping; ``InputError`` (one line) for unknown fields or bad values."""
        if not isinstance(entry, Mapping):
            raise InputError(
                f"weights source {name!r} ({origin}): must be an object, got {type(entry).__name__}"
            )
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise InputError(
                f"weights source {name!r} ({origin}): unknown field(s) {unknown}; known: {sorted(_FIELDS)}"
            )
        licence = entry.get("licence", entry.get("license"))
        optional = _FIELDS - {"licence", "license", "url"}
        fields = {k: entry[k] for k in optional if entry.get(k) is not None}
        return cls(name=name, licence=licence, origin=origin, url=entry.get("url"), **fields)


def read_registry(path: str | os.PathLike[str]) -> dict[str, WeightsSource]:
    """The entries of a registry file (a JSON object ``{name: entry}``).

    Raises:
        InputError: the file is unreadable or not such an object, or entries are bad (one line per bad entry).
    """
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"The weights registry {path} ({REGISTRY_ENV}) cannot be read: {exc}") from None
    if not isinstance(raw, Mapping):
        raise InputError(
            f'The weights registry {path} ({REGISTRY_ENV}) must be a JSON object {{"NAME": {{"url": ...}}}}'
        )
    out: dict[str, WeightsSource] = {}
    problems = []
    for name, entry in raw.items():
        try:
            out[str(name)] = WeightsSource.from_entry(str(name), entry, str(path))
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        raise InputError(
            f"The weights registry {path} has {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}; "
            "fix or remove them:\n  " + "\n  ".join(problems)
        )
    return out


def sources() -> dict[str, WeightsSource]:
    """Every registry entry: the built-in :data:`~universal.model.checkpoints.PRETRAINED` ones, then those of
    ``$UNIVERSAL_WEIGHTS_REGISTRY`` (``InputError`` for a bad file, or a name that is already built in)."""
    from universal.model.checkpoints import PRETRAINED

    out = {name: WeightsSource.from_entry(name, entry, "built-in") for name, entry in PRETRAINED.items()}
    registry = os.environ.get(REGISTRY_ENV, "").strip()
    if registry:
        for name, source in read_registry(registry).items():
            if name in out:
                raise InputError(
                    f"The weights registry {registry} redefines the built-in name {name!r}; give it another name."
                )
            out[name] = source
    return out


def get_source(name: str) -> WeightsSource:
    """The source called ``name`` (case-insensitive); ``CheckpointError`` listing the known names."""
    known = sources()
    source = known.get(str(name).lower())
    if source is None:
        raise CheckpointError(
            f"{name!r} is neither an existing file nor a known weights name; known names: {sorted(known)} "
            f"(or hf-hub:ORG/REPO[:FILE][@REVISION])."
        )
    return source


# ------------------------------------------------------------------------------------------------ records
def _cache(directory: str | os.PathLike[str] | None = None) -> Path:
    from universal.model.checkpoints import cache_dir

    return Path(directory) if directory is not None else cache_dir()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DownloadError(
            f"{path} is unreadable ({exc}); delete it (it is rebuilt) and try again."
        ) from None
    return data if isinstance(data, dict) else {}


def _update_json(path: Path, key: str, value: Mapping[str, Any]) -> None:
    from universal.io import atomic_write_text

    data = _read_json(path)
    data[key] = dict(value)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _licences_file() -> Path:
    return _cache().parent / LICENCES


def licence_accepted(source: WeightsSource) -> bool:
    """Whether ``source`` may be downloaded: its licence needs no acceptance, or this licence text was accepted."""
    if not source.requires_acceptance:
        return True
    record = _read_json(_licences_file()).get(source.name)
    return isinstance(record, Mapping) and record.get("licence") == source.licence


def accept_licence(source: WeightsSource | str) -> None:
    """Record that the licence of ``source`` is accepted (``licences.json`` beside the cache; asked once)."""
    _record_acceptance(get_source(source) if isinstance(source, str) else source)


def _record_acceptance(source: WeightsSource) -> None:
    _update_json(_licences_file(), source.name, {"licence": source.licence, "accepted": _now()})


def _licence_refusal(source: WeightsSource) -> DownloadError:
    return DownloadError(
        f"{source.name!r} is licensed {source.licence}: accept it once with accept_licence=True, "
        f"`universal models download {source.name} --accept-licence` or the dashboard's checkbox."
    )


def _recorded(key: str, directory: Path) -> str | None:
    record = _read_json(directory / MANIFEST).get(key)
    return record.get("sha256") if isinstance(record, Mapping) else None


def checksum_state(
    source: WeightsSource, directory: str | os.PathLike[str] | None = None
) -> tuple[str, str | None]:
    """``("pinned", sha)``, ``("recorded", sha)`` (from the first download) or ``("none", None)``."""
    if source.sha256:
        return "pinned", source.sha256
    sha = _recorded(source.filename, _cache(directory))
    return ("recorded", sha) if sha else ("none", None)


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_file(
    path: Path, key: str, pinned: str | None, manifest_dir: Path, what: str, url: str = ""
) -> str:
    """Check ``path`` against the pinned or recorded sha256 (recording it when there is none): the digest."""
    got = sha256_of(path)
    expected = pinned or _recorded(key, manifest_dir)
    if expected is None:
        _record(manifest_dir, key, got, path.stat().st_size, url)
        return got
    if got != expected:
        kind = "pinned" if pinned else "recorded at its first download"
        raise CheckpointError(
            f"{path} has sha256 {got}, but {what}'s {kind} sha256 is {expected}: the file changed or is corrupt. "
            f"Delete {path} and download it again."
        )
    return got


def _record(folder: Path, key: str, sha: str, size: int, url: str) -> None:
    """Record the sha256 of a first download in the cache's manifest (atomic rewrite)."""
    _update_json(folder / MANIFEST, key, {"sha256": sha, "size": size, "url": url, "recorded": _now()})


def cached_path(source: WeightsSource, directory: str | os.PathLike[str] | None = None) -> Path:
    """Where ``source`` lives in the cache (whether or not it is there)."""
    return _cache(directory) / source.filename


def verify(source: WeightsSource, directory: str | os.PathLike[str] | None = None) -> str:
    """Check the cached file of ``source`` (pinned or recorded sha256; recorded now if neither): its sha256.

    Raises:
        CheckpointError: it is not in the cache, or it does not match.
    """
    path = cached_path(source, directory)
    if not path.is_file():
        raise CheckpointError(f"{source.name!r} is not downloaded ({path} is missing).")
    return _check_file(path, source.filename, source.sha256, path.parent, repr(source.name), source.url or "")


# ------------------------------------------------------------------------------------------------ downloads
def tqdm_progress(name: str) -> tuple[ProgressFn, Callable[[], None]]:
    """A ``progress`` callback that draws a tqdm bar (terminal; created at the first block), and the function
    that closes the bar."""
    bars: list[Any] = []

    def update(done: int, total: int | None) -> None:
        if not bars:
            from tqdm.auto import tqdm

            bars.append(tqdm(total=total, initial=0, unit="B", unit_scale=True, desc=name))
        bar = bars[0]
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def _manual(source: WeightsSource, dest: Path) -> str:
    return (
        f"To install it by hand, download {source.url} on a machine with internet access and either copy it to "
        f"{dest} or pass its path: universal.model.load_pretrained('/path/to/{source.filename}')."
    )


def download(
    source: WeightsSource | str,
    *,
    directory: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
    accept_licence: bool = False,
    timeout: float = 60.0,
) -> Path:
    """The cached file of ``source``, downloaded (or resumed) first if needed, its sha256 checked or recorded.

    Args:
        source: A :class:`WeightsSource` or a registry name.
        directory: The cache folder (default: :func:`universal.model.checkpoints.cache_dir`).
        progress: ``progress(done, total)`` after each block (bytes).
        accept_licence: Accept (and record) a licence that needs acceptance.
        timeout: Seconds a connection may stay silent.

    Raises:
        DownloadError: licence not accepted, offline or interrupted (the part is kept; run again to resume),
            a download that does not match its pinned sha256 (deleted).
        CheckpointError: a cached file that no longer matches its sha256.
    """
    return _download(
        get_source(source) if isinstance(source, str) else source,
        directory,
        progress,
        accept_licence,
        timeout,
    )[0]


def _download(
    source: WeightsSource, directory: Any, progress: ProgressFn | None, accept_licence: bool, timeout: float
) -> tuple[Path, str]:
    """:func:`download`, returning the file and its checked sha256."""
    folder = _cache(directory)
    dest = folder / source.filename
    if dest.is_file():
        return dest, verify(source, folder)
    if not source.url:
        raise DownloadError(f"{source.name!r} has no download URL.")
    if accept_licence and not licence_accepted(source):
        _record_acceptance(source)
    if not licence_accepted(source):
        raise _licence_refusal(source)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"Cannot create the weights cache {folder} ({exc}); set UNIVERSAL_CACHE_DIR."
        ) from None
    part = folder / f".{source.filename}.part"
    _transfer(source, part, progress, timeout, _manual(source, dest))
    got = sha256_of(part)
    if source.sha256 and got != source.sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"The download of {source.name!r} is corrupt or changed (sha256 {got}, expected {source.sha256}); "
            f"it was deleted. {_manual(source, dest)}"
        )
    if not source.sha256:
        _record(folder, source.filename, got, part.stat().st_size, source.url)
    os.replace(part, dest)
    return dest, got


def _transfer(
    source: WeightsSource, part: Path, progress: ProgressFn | None, timeout: float, manual: str
) -> None:
    """Fill ``part`` with the whole file at ``source.url``, resuming from its current size (``Range``).

    One download of a file at a time: the part is locked (``flock``), so a second process or dashboard session
    gets ``DownloadError`` instead of writing into it. An empty part is removed when the download fails.
    """
    with open(part, "a+b") as out:  # a+: never truncated on open; writes go to the end
        _lock(out, source)
        try:
            _stream(source, out, part, progress, timeout, manual)
        except BaseException:
            if out.seek(0, os.SEEK_END) == 0:
                out.close()
                part.unlink(missing_ok=True)
            raise


def _lock(fh: Any, source: WeightsSource) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DownloadError(
            f"{source.name!r} is being downloaded by another process or dashboard session; wait for it to "
            "finish, then try again."
        ) from None


def _stream(
    source: WeightsSource, out: Any, part: Path, progress: ProgressFn | None, timeout: float, manual: str
) -> None:
    """Append the rest of the file to ``out`` (206), or all of it after truncating (200); check the size."""
    import http.client
    import urllib.error
    import urllib.request

    offset = out.seek(0, os.SEEK_END)
    headers = {"User-Agent": "universal-weights-downloader", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    done, total = offset, None
    try:
        request = urllib.request.Request(str(source.url), headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            start, total = _start_and_total(response, offset)
            out.truncate(start)
            done = start
            for block in iter(lambda: response.read(_BLOCK), b""):
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
            out.flush()
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the part is already whole (or longer): start again
            out.truncate(0)
            return _stream(source, out, part, progress, timeout, manual)
        raise DownloadError(
            f"Could not download {source.name!r} from {source.url} (HTTP {exc.code}). {manual}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        kept = f" {done} bytes are kept in {part}; run again to resume." if done else ""
        raise DownloadError(
            f"Could not download {source.name!r} from {source.url} ({reason}).{kept} {manual}"
        ) from None
    if total is not None and done != total:
        raise DownloadError(
            f"The download of {source.name!r} stopped after {done} of {total} bytes; run again to resume "
            f"(the {done} bytes are kept in {part}). {manual}"
        )
    return None


def _start_and_total(response: Any, offset: int) -> tuple[int, int | None]:
    """Where the response's body starts in the file and the file's size (206: from Content-Range)."""
    status = int(getattr(response, "status", None) or 200)
    length = response.headers.get("Content-Length")
    length = int(length) if length and str(length).isdigit() else None
    if status == 206 and offset:
        match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", str(response.headers.get("Content-Range") or ""))
        if not match or int(match.group(1)) != offset:
            raise ValueError(
                f"the server resumed at the wrong place (Content-Range {match and match.group(0)!r})"
            )
        size = match.group(3)
        return offset, int(size) if size != "*" else (offset + length if length is not None else None)
    return 0, length  # 200: the whole file (a server that ignores Range)


# ------------------------------------------------------------------------------------------------ the Hub
@dataclass(frozen=True)
class HubSpec:
    """``hf-hub:ORG/REPO[:FILE][@REVISION]``, parsed (:func:`parse_hub_spec`)."""

    repo: str
    filename: str = HUB_DEFAULT_FILE
    revision: str = HUB_DEFAULT_REVISION

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.repo}:{self.filename}@{self.revision}"


def is_hub_spec(text: Any) -> bool:
    """Whether ``text`` asks for the Hugging Face Hub (starts with ``hf-hub:``)."""
    return isinstance(text, str) and text.strip().lower().startswith(HUB_PREFIX)


def parse_hub_spec(text: str) -> HubSpec:
    """Parse ``hf-hub:ORG/REPO[:FILE][@REVISION]`` (FILE default :data:`HUB_DEFAULT_FILE`, REVISION ``main``).

    >>> parse_hub_spec("hf-hub:org/repo:unet.pth@v1.0")
    HubSpec(repo='org/repo', filename='unet.pth', revision='v1.0')

    Raises:
        InputError: not of that form (the message shows the form and an example).
    """
    body = str(text).strip()[len(HUB_PREFIX) :] if is_hub_spec(text) else None
    form = "write hf-hub:ORG/REPO[:FILE][@REVISION], e.g. hf-hub:my-org/universal-unet:unet.pth@v1.0"
    if not body:
        raise InputError(f"{text!r} is not a Hugging Face Hub weights name; {form}.")
    rest, _, revision = body.partition("@")
    repo, _, filename = rest.partition(":")
    problems = []
    if not _REPO.match(repo):
        problems.append(f"the repository {repo!r} must be ORG/REPO")
    if "@" in body and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", revision):
        problems.append(f"the revision {revision!r} must be a branch, tag or commit")
    if ":" in rest and (not filename or filename.startswith("/") or ".." in filename.split("/")):
        problems.append(f"the file {filename!r} must be a path inside the repository")
    if problems:
        raise InputError(f"{text!r}: {'; '.join(problems)}; {form}.")
    return HubSpec(repo, filename or HUB_DEFAULT_FILE, revision or HUB_DEFAULT_REVISION)


def fetch_hub(spec: str | HubSpec) -> Path:
    """The local file of a hub spec (see :func:`obtain`)."""
    return _fetch_hub(parse_hub_spec(spec) if isinstance(spec, str) else spec)[0]


def _fetch_hub(spec: HubSpec) -> tuple[Path, str]:
    """The local file of a hub spec, downloaded into the Hub's cache with ``huggingface_hub.hf_hub_download``
    (``$HF_ENDPOINT``, ``$HF_HUB_CACHE`` read now); its sha256 recorded at the first download and checked later.

    Raises:
        InputError: a bad spec. DownloadError: offline, unknown repository, revision or file (one line).
        CheckpointError: a cached file that no longer matches its recorded sha256.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError(
            f"{spec} needs the huggingface_hub package: pip install huggingface_hub"
        ) from None
    from huggingface_hub import constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    # unreachable (no network): the Hub's cache only, at once (hf_hub_download would retry for ~20 s first)
    offline = not _reachable(endpoint)
    try:
        path = Path(
            hf_hub_download(
                spec.repo,
                spec.filename,
                revision=spec.revision,
                endpoint=endpoint,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                local_files_only=offline,
            )
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's errors (offline, 404, HTTP) → one line
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        where = f"{endpoint} is unreachable and it is not in the Hub's cache" if offline else detail
        raise DownloadError(
            f"Could not get {spec} from the Hugging Face Hub ({type(exc).__name__}: {where}). Check the name and "
            "revision, or download the file on a machine with internet access and pass its path."
        ) from None
    commit = path.parent.name if path.parent.parent.name == "snapshots" else spec.revision
    key = f"{HUB_PREFIX}{spec.repo}:{spec.filename}@{commit}"
    return path, _check_file(path, key, None, _cache(), str(spec))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ any source
def obtain(
    name_or_spec: str, *, progress: ProgressFn | None = None, accept_licence: bool = False
) -> tuple[Path, str]:
    """The checked local file of a registry name or an ``hf-hub:`` spec (downloaded first if needed) and its
    sha256. Errors: those of :func:`download` and :func:`fetch_hub`."""
    if is_hub_spec(name_or_spec):
        return _fetch_hub(parse_hub_spec(name_or_spec))
    return _download(get_source(name_or_spec), None, progress, accept_licence, 60.0)


def prepare_weights(
    weights: Any, *, accept_licence: bool = False, progress: ProgressFn | None = None
) -> Path | None:
    """Make ``weights`` loadable without a download: a registry name (other than ``builtin``) or an ``hf-hub:``
    spec is downloaded and checked now (``accept_licence``: accept and record its licence first); a file, a module
    or ``builtin`` needs nothing. Returns the local file of a downloaded source, else ``None``. A batch of several
    ranks calls this on rank 0 before the others load (:func:`universal.distributed.on_main_first`), so that they
    do not race for the same download.

    Raises:
        InputError: ``accept_licence`` for weights with no licence to accept (the option would do nothing).
        DownloadError, CheckpointError: As :func:`obtain`.
    """
    if not isinstance(weights, (str, os.PathLike)) or Path(weights).expanduser().is_file():
        source = None
    elif is_hub_spec(str(weights)):
        source = "hub"
    else:
        source = sources().get(str(weights).lower())
    needs = isinstance(source, WeightsSource) and source.requires_acceptance
    if accept_licence and not needs:
        what = "a file" if source is None else "a Hub file" if source == "hub" else f"licensed {source.licence}"
        raise InputError(
            f"accept_licence (--accept-licence) was given, but the weights {str(weights)!r} are {what}, with no "
            "licence to accept; leave it out"
        )
    if source is None or (isinstance(source, WeightsSource) and source.name == "builtin"):
        return None
    return obtain(str(weights), progress=progress, accept_licence=accept_licence)[0]


def human_size(size: int | None) -> str:
    """``12.3 MB`` style (decimal units); ``?`` when unknown.

    >>> human_size(9867151), human_size(None)
    ('9.9 MB', '?')
    """
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


# ------------------------------------------------------------------------------------------------ listing
def listing(directory: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One row per source for ``universal models`` and the dashboard: name, backbone, licence, whether its licence
    needs acceptance, size (bytes: the cached file's, else the registry's; ``None``), cached, checksum kind
    (pinned, recorded, shipped: the built-in file's own, as in MODEL_CARD.md, or none) and digest, url,
    description."""
    rows = []
    for name, source in sources().items():
        path = cached_path(source, directory)
        if name == "builtin":
            from universal.model.checkpoints import builtin_weights_path

            path = builtin_weights_path()
        cached = path.is_file()
        kind, sha = checksum_state(source, directory)
        if name == "builtin" and cached:  # shipped in the package; MODEL_CARD.md states the same digest
            kind, sha = "shipped", sha256_of(path)
        rows.append(
            {
                "name": name,
                "backbone": source.backbone,
                "licence": source.licence,
                "requires_acceptance": bool(source.requires_acceptance),
                "size": path.stat().st_size if cached else source.size,
                "cached": cached,
                "state": ("shipped" if name == "builtin" else "cached") if cached else "not cached",
                "path": str(path) if cached else None,
                "checksum": kind,
                "sha256": sha,
                "url": source.url,
                "description": source.description,
            }
        )
    return rows
