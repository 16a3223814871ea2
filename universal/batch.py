"""Batch inference: many CTs, one model load, the next case read while the current one runs, resumable, summarised.

What ``universal segment`` runs (and what a script can run)::

    plan = plan_batch(["cts/", "more/*.nii.gz", "list.csv"], "out/", BatchSettings(overwrite=True))
    result = BatchRunner(Predictor("builtin"), plan, plan.settings).run()

- **Case lists** (:func:`collect_cases`): a CT (file, DICOM folder, zip), a **folder of CTs** (its files with a CT
  extension, sorted; a folder without any is one DICOM input, as before), a **glob** (quoted, ``**`` recursive,
  sorted; CT files and folders) or a **manifest** (``.csv`` with a header holding ``image`` and optionally
  ``name``; ``.json``: a list of paths or of ``{"image", "name"}`` objects, or an object with such a ``cases``
  list — training manifests of :mod:`universal.data` qualify, their other keys are ignored). Manifest paths are
  relative to the manifest's folder; a missing file, an empty ``image``, a repeated image or name, and a name that
  is not a plain folder name are refused with the line (CSV) or entry (JSON) that holds them, before the model loads.
- **Output names**: a manifest's ``name``, else the rule of ``universal segment --help`` (:func:`case_names`);
  names are unique ignoring case and never leave the output folder.
- **Prefetch** (``BatchSettings.prefetch``, default 1 on a GPU, 0 on the CPU): a worker thread reads and
  preprocesses the next cases
  (``Predictor.prepare``) into a bounded queue while the main thread runs the network (``Predictor.infer``) and
  writes; at most ``prefetch`` prepared CTs wait, plus the one being prepared and the one running. 0 = one after
  the other.
- **Pipeline** (``BatchSettings.pipeline``, default on a GPU, off on the CPU): the main thread runs only the network
  (``Predictor.run_network``); a worker thread post-processes, maps back and writes the previous case
  (``Predictor.finish``, ``Segmentation.save``) meanwhile, so that a GPU does not wait for the CPU's half. One case
  at most is in the worker; an interruption waits for it (written whole, counted) before the summary.
  On the CPU the network already keeps every core busy, so neither worker gains anything there (``bench/batch.py``
  on 2 cores: 0.8-1.1x, within the noise, with more memory and more spread); :meth:`BatchSettings.for_device`
  turns both on only for an accelerator unless they are set.
- **Resume**: a case whose folder is complete (a valid ``report.json``, its label map and one mask per class) and
  was made with the same model and settings (classes, fast, threshold, overlap, window, post-processing,
  convention, template) is skipped; ``overwrite=True`` redoes it. A complete folder made with other settings is
  redone and replaced as a whole.
- **Summary** (:func:`write_summary`): ``<stem>.csv`` and ``<stem>.json`` (atomic) with each case's status
  (``ok``/``failed``/``skipped``), error line, stage times, efficiency numbers (:mod:`universal.efficiency`) and
  volumes per class; written at the end, every ``summary_every_s`` seconds, and on Ctrl+C/SIGTERM (what was done).
  Default place ``OUTDIR/summary`` when a folder, glob or manifest was given or several ranks run; ``summary=``
  anywhere for any run.
- **Ranks** (:mod:`universal.distributed`): under torchrun or Slurm each rank runs its share of the list
  (``i % world == rank``), writes ``<stem>.rank<r>of<w>.json``; after a barrier rank 0 merges them into the summary.

A failing case (unreadable, not a CT, out of memory, disk full, an unexpected error) fails only itself; only an
interruption stops the batch, and it leaves no half-written case (``Segmentation.save`` is atomic).
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from universal.distributed import Ranks
from universal.errors import InputError, UniversalError

__all__ = [
    "DEFAULT_PREFETCH",
    "MANIFEST_SUFFIXES",
    "MAX_PREFETCH",
    "BatchPlan",
    "BatchResult",
    "BatchRunner",
    "BatchSettings",
    "Case",
    "case_complete",
    "case_names",
    "collect_cases",
    "plan_batch",
    "read_manifest",
    "write_summary",
]

#: manifest extensions (a CT list rather than a CT)
MANIFEST_SUFFIXES = (".csv", ".json")
#: the largest ``prefetch`` depth (each waiting CT holds its prepared grid in memory)
MAX_PREFETCH = 8
#: ``prefetch`` on an accelerator when left unset (:meth:`BatchSettings.for_device`)
DEFAULT_PREFETCH = 1
#: the settings a resumed run compares with a complete case's report before skipping it
RESUME_KEYS = (
    "model",
    "weights_sha256",
    "classes",
    "fast",
    "threshold",
    "overlap",
    "patch_size",
    "postprocess",
    "precision",
    "convention",
    "template",
    "series",
)
STATUSES = ("ok", "failed", "skipped")
_GLOB_CHARS = "*?["


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class BatchSettings:
    """How a batch runs (the model's own settings are the Predictor's); checked here, where they enter.

    Attributes:
        overwrite: Redo cases whose output folder is already complete (default: skip them).
        prefetch: CTs read and preprocessed ahead in a worker thread (0..:data:`MAX_PREFETCH`; 0 = none;
            ``None``: 1 on a GPU, 0 on the CPU, see :meth:`for_device`).
        summary: Where the summary goes: a path stem (``.csv``/``.json`` are added; either suffix given is
            dropped); ``None`` = ``OUTDIR/summary`` when one is written by default.
        formats: Output formats passed to ``Segmentation.save(formats=...)`` (``universal.exports.FORMATS``;
            ``"nifti,dicom-seg"`` or names; ``None``: its default).
        series: The DICOM series of every DICOM input (see ``universal.io.load_volume``).
        pipeline: Post-process and write each case in a worker thread while the next case runs the network
            (default), so that the device is not idle while the CPU finishes a case; ``False``: one after the
            other. The outputs are the same either way; one more case is held in memory. ``None``: on for a GPU,
            off on the CPU (:meth:`for_device`).
        sample_interval_s: Seconds between the efficiency sampler's samples (FLARE: 0.1).
        summary_every_s: Seconds between intermediate summary writes during a long batch.
    """

    overwrite: bool = False
    prefetch: int | None = None
    summary: str | None = None
    formats: tuple[str, ...] | None = None
    series: str | None = None
    pipeline: bool | None = None
    sample_interval_s: float = 0.1
    summary_every_s: float = 60.0

    def __post_init__(self) -> None:
        for name, v in (("overwrite", self.overwrite), ("pipeline", self.pipeline)):
            if not isinstance(v, bool) and not (name == "pipeline" and v is None):
                raise InputError(f"{name} is {v!r}; it must be True or False")
        p = self.prefetch
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= MAX_PREFETCH):
            raise InputError(
                f"prefetch is {p!r}; it must be a whole number from 0 (no prefetch) to {MAX_PREFETCH}"
            )
        for name in ("sample_interval_s", "summary_every_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise InputError(f"{name} is {v!r}; it must be a positive number of seconds")
        if self.summary is not None:
            text = str(self.summary)
            if not text.strip() or text.endswith(("/", os.sep)):
                raise InputError(f"summary is {text!r}; give a file path such as out/summary.csv")
            stem = Path(text)
            object.__setattr__(
                self, "summary", str(stem.with_suffix("") if stem.suffix in MANIFEST_SUFFIXES else stem)
            )
        if self.formats is not None:
            from universal.exports import parse_formats  # the writers' own names and rule

            object.__setattr__(self, "formats", parse_formats(self.formats))
        if self.series is not None:
            object.__setattr__(self, "series", str(self.series))

    def for_device(self, device: Any) -> BatchSettings:
        """These settings with ``prefetch`` and ``pipeline`` decided for ``device`` where left ``None``: both on
        (prefetch 1) for an accelerator (CUDA, MPS), where the CPU is otherwise idle while the network runs; both
        off on the CPU, where the network keeps every core busy.

        >>> s = BatchSettings().for_device("cpu"), BatchSettings(prefetch=2).for_device("cuda:1")
        >>> [(x.prefetch, x.pipeline) for x in s]
        [(0, False), (2, True)]
        """
        kind = str(getattr(device, "type", device) or "cpu").split(":")[0].strip().lower()
        accelerator = kind not in ("cpu", "")
        return replace(
            self,
            prefetch=(DEFAULT_PREFETCH if accelerator else 0) if self.prefetch is None else self.prefetch,
            pipeline=accelerator if self.pipeline is None else self.pipeline,
        )


# ------------------------------------------------------------------------------------------------- case lists
@dataclass(frozen=True)
class Case:
    """One CT of a batch: its position in the whole list, its path, its output folder name, where it came from."""

    index: int
    source: str
    name: str
    origin: str


@dataclass(frozen=True)
class _Entry:
    source: str
    name: str | None
    origin: str
    batch: bool  # from a folder, a glob or a manifest


def read_manifest(path: str | os.PathLike) -> list[tuple[str, str | None, str]]:
    """The cases of a CSV or JSON manifest as ``(absolute image path, name or None, "FILE line N")``.

    Raises:
        InputError: Unreadable or malformed file, no ``image`` column/key, an empty image, a missing file, an image
            or a name given twice, a name that is not a plain folder name — naming the line (CSV) or entry (JSON),
            and how many more problems there are.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist: give the path of a .csv or .json manifest")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _json_rows(path)
    root = path.resolve().parent
    problems: list[str] = []
    seen_images: dict[str, str] = {}
    seen_names: dict[str, str] = {}
    cases = []
    for where, image, name in rows:
        if not image:
            problems.append(f"{where}: the image is empty")
            continue
        full = os.path.normpath(os.path.join(root, os.path.expanduser(image)))
        if not os.path.exists(full):
            problems.append(f"{where}: {image} does not exist (paths are relative to {root})")
        elif os.path.realpath(full) in seen_images:
            problems.append(f"{where}: {image} repeats {seen_images[os.path.realpath(full)]}")
        seen_images.setdefault(os.path.realpath(full), where)
        if name is not None:
            bad = bad_case_name(name)
            if bad:
                problems.append(f"{where}: name {name!r} {bad}")
            elif name.casefold() in seen_names:
                problems.append(
                    f"{where}: name {name!r} repeats {seen_names[name.casefold()]} (names ignore case)"
                )
            seen_names.setdefault(name.casefold(), where)
        cases.append((full, name, where))
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(f"manifest {problems[0]}{more}; fix the manifest and run again")
    if not cases:
        raise InputError(f"manifest {path} lists no case: add one row (CSV) or entry (JSON) per CT")
    return cases


def _csv_rows(path: Path) -> list[tuple[str, str, str | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            if "image" not in fields:
                raise InputError(
                    f"manifest {path} line 1: no column 'image' in the header {fields}; the header needs image "
                    "(and optionally name)"
                )
            reader.fieldnames = fields
            rows = []
            for row in reader:
                if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    continue  # a blank line
                name = (row.get("name") or "").strip() or None
                rows.append((f"{path.name} line {reader.line_num}", (row.get("image") or "").strip(), name))
            return rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"manifest {path} is not a readable CSV file ({exc}); save it as UTF-8 CSV") from exc


def _json_rows(path: Path) -> list[tuple[str, str, str | None]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"manifest {path} is not valid JSON ({exc}); fix the file or use a .csv manifest"
        ) from exc
    entries = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(
            f"manifest {path}: expected a list of cases, or an object with a 'cases' list; got {type(data).__name__}"
        )
    rows = []
    for i, entry in enumerate(entries):
        where = f"{path.name} entry {i + 1} (cases[{i}])"
        if isinstance(entry, str):
            rows.append((where, entry.strip(), None))
        elif isinstance(entry, dict) and isinstance(entry.get("image"), str):
            name = entry.get("name")
            rows.append((where, entry["image"].strip(), None if name in (None, "") else str(name).strip()))
        else:
            raise InputError(
                f"manifest {where}: expected a path or an object with an 'image' path, got {entry!r}"
            )
    return rows


def bad_case_name(name: str) -> str | None:
    """Why ``name`` cannot be a case's folder or file name (``None`` when it can): empty, a path separator, a
    leading dot, too long. Used for batch manifests and training manifests alike, so that no name leaves its
    folder."""
    if not name or name in (".", ".."):
        return "is empty"
    if any(sep in name for sep in ("/", "\\", "\0")) or os.path.isabs(name):
        return "holds a path separator: give a plain folder name"
    if name.startswith("."):
        return "starts with a dot (hidden names are temporary folders)"
    if len(name.encode("utf-8")) > 200:
        return "is too long (at most 200 bytes)"
    return None


def _expand(item: str) -> list[_Entry]:
    """One command-line input → its entries (a manifest, a glob, a folder of CTs, or one CT)."""
    from universal.io import VOLUME_SUFFIXES

    p = Path(item)
    if p.suffix.lower() in MANIFEST_SUFFIXES and not p.is_dir():
        return [_Entry(s, n, f"manifest {w}", True) for s, n, w in read_manifest(p)]
    if any(c in item for c in _GLOB_CHARS) and not os.path.exists(item):
        import glob

        hits = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        cts = [h for h in hits if os.path.isdir(h) or _is_ct_file(h, VOLUME_SUFFIXES)]
        if not cts:
            raise InputError(
                f"the pattern {item!r} matches no CT file or folder: check it (quote it for the shell)"
            )
        return [_Entry(h, None, f"pattern {item}", True) for h in cts]
    if p.is_dir():
        files = sorted(str(c) for c in p.iterdir() if c.is_file() and _is_ct_file(c.name, VOLUME_SUFFIXES))
        if files:
            dicom = _a_dicom_file(p, files)
            if dicom is not None:  # a series folder with a stray export, or a mix: never drop one in silence
                raise InputError(
                    f"{item} holds DICOM files ({os.path.basename(dicom)}) and CT files "
                    f"({', '.join(os.path.basename(f) for f in files[:3])}{', ...' if len(files) > 3 else ''}): "
                    "move the CT files out to read the DICOM series, or name them one by one"
                )
            return [_Entry(f, None, f"folder {item}", True) for f in files]
    return [_Entry(item, None, "argument", False)]


def _a_dicom_file(folder: Path, ct_files: Sequence[str], limit: int = 64) -> str | None:
    """A DICOM file among the other files of ``folder`` (``.dcm``, or no known extension and the ``DICM``
    preamble; at most ``limit`` files opened), or ``None``."""
    from universal.exports import is_dicom_input

    skip, opened = set(ct_files), 0
    for c in sorted(folder.iterdir()):
        if str(c) in skip or not c.is_file() or c.name.startswith("."):
            continue
        if c.suffix.lower() == ".dcm":
            return str(c)
        if not c.suffix and opened < limit:
            opened += 1
            if is_dicom_input(c):
                return str(c)
    return None


def _name_key(name: str) -> str:
    """How file systems may compare names: Unicode-normalised (macOS stores ``é`` one way whichever was typed) and
    case-folded (macOS and Windows ignore case)."""
    import unicodedata

    return unicodedata.normalize("NFC", name).casefold()


def _is_ct_file(name: str, suffixes: Sequence[str]) -> bool:
    base = os.path.basename(name).lower()
    return not base.startswith(".") and base.endswith(tuple(suffixes))


def collect_cases(inputs: Sequence[str]) -> tuple[list[Case], bool]:
    """The cases of ``inputs`` in order (each expanded by the rules of the module docstring) and whether any came
    from a folder, glob or manifest. Names: a manifest's, else :func:`case_names` over the others; a name equal
    to another (ignoring case) gets ``_2``, ``_3``, ...

    Raises:
        InputError: No input, a bad manifest, a pattern matching nothing.
    """
    if not inputs:
        raise InputError("no CT given: name CT files, DICOM folders, folders of CTs, patterns or manifests")
    entries = [e for item in inputs for e in _expand(str(item))]
    auto = case_names([e.source for e in entries if e.name is None])
    taken = {_name_key(e.name) for e in entries if e.name is not None}
    names, k = [], 0
    for e in entries:
        if e.name is not None:
            names.append(e.name)
            continue
        base, n = auto[k], 1
        k += 1
        candidate = base
        while _name_key(candidate) in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(_name_key(candidate))
        names.append(candidate)
    cases = [Case(i, e.source, name, e.origin) for i, (e, name) in enumerate(zip(entries, names))]
    return cases, any(e.batch for e in entries)


def case_names(inputs: Sequence[str]) -> list[str]:
    """The output folder name of each input (the rule of ``universal segment --help``): its case name; names that
    occur more than once (ignoring case) get their parent folder's name in front (``a/ct.nii.gz``, ``b/ct.nii.gz``
    → ``a_ct``, ``b_ct``), and names still equal get ``_2``, ``_3``, ... in input order.

    >>> case_names(["a/ct.nii.gz", "b/ct.nii.gz", "c/liver.nrrd", "x/a/ct.nii.gz"])
    ['a_ct', 'b_ct', 'liver', 'a_ct_2']
    """
    from collections import Counter

    from universal.io import case_name

    paths = [Path(os.path.abspath(p)) for p in inputs]
    names = [case_name(p).lstrip(".") or "case" for p in paths]
    counts = Counter(_name_key(n) for n in names)
    names = [
        f"{p.parent.name.lstrip('.')}_{n}" if counts[_name_key(n)] > 1 and p.parent.name.lstrip(".") else n
        for p, n in zip(paths, names)
    ]
    used: set[str] = set()
    result = []
    for n in names:
        candidate, k = n, 1
        while _name_key(candidate) in used:
            k += 1
            candidate = f"{n}_{k}"
        used.add(_name_key(candidate))
        result.append(candidate)
    return result


def check_case_dirs(inputs: Sequence[str], case_dirs: Sequence[Path], outdir: Path | None = None) -> None:
    """Refuse, before the model loads, what would make a case folder unsafe to write: the same input twice, a
    case folder that is (or holds) an input or that leads out of ``outdir`` (a link), a file or a folder of other
    files where a case folder goes.

    Raises:
        InputError: One line naming the input or folder and what to do.
    """
    from universal.inference import Segmentation

    real = [os.path.realpath(p) for p in inputs]
    seen: dict[str, str] = {}
    for source, r in zip(inputs, real):
        if r in seen:
            raise InputError(f"{source} is given twice: give each CT once")
        seen[r] = source
    root = os.path.realpath(outdir) if outdir is not None else None
    for case_dir in case_dirs:
        target = os.path.realpath(case_dir)
        if root is not None and not target.startswith(root + os.sep):
            raise InputError(f"{case_dir} leads out of the output folder {outdir} (a link?): remove it")
        for source, r in zip(inputs, real):
            if r == target or r.startswith(target + os.sep):
                raise InputError(
                    f"the results of {source} would go to {case_dir}, which holds that input: choose another -o"
                )
        try:
            Segmentation.check_outdir(case_dir)
        except OSError as exc:
            raise InputError(f"{case_dir} {exc.strerror}") from exc


@dataclass(frozen=True)
class BatchPlan:
    """Everything decided before the model loads: the whole case list, the output folder, this rank's share, the
    summary's stem (``None``: no summary) and the settings."""

    cases: tuple[Case, ...]
    outdir: Path
    settings: BatchSettings
    ranks: Ranks = Ranks()
    summary: Path | None = None

    @property
    def mine(self) -> list[Case]:
        """This rank's cases."""
        return self.ranks.mine(self.cases)

    def case_dir(self, case: Case) -> Path:
        return self.outdir / case.name


def plan_batch(
    inputs: Sequence[str], outdir: str | os.PathLike, settings: BatchSettings, ranks: Ranks = Ranks()
) -> BatchPlan:
    """Collect and check the cases of ``inputs`` for ``outdir`` (see :func:`collect_cases`,
    :func:`check_case_dirs`) and decide the summary's place: ``settings.summary``, else ``OUTDIR/summary`` when a
    folder, glob or manifest was given or several ranks run, else none.

    Raises:
        InputError: Any problem of the inputs, names, output folders or summary path.
    """
    out = Path(outdir)
    cases, from_batch = collect_cases(inputs)
    check_case_dirs([c.source for c in cases], [out / c.name for c in cases], out)
    if settings.formats is not None:
        from universal.exports import check_formats

        check_formats(settings.formats, [c.source for c in cases])  # DICOM-only formats need DICOM inputs
    if settings.series is not None:
        from universal.exports import is_dicom_input

        if not any(is_dicom_input(c.source) for c in cases):
            raise InputError(
                f"--series {settings.series} picks a series of a DICOM folder or zip, but no input is one: leave "
                "it out"
            )
    summary = Path(settings.summary) if settings.summary is not None else None
    if summary is None and (from_batch or ranks.distributed):
        summary = out / "summary"
    if summary is not None:
        files = {_name_key(os.path.abspath(p)): p for p in _summary_paths(summary)}
        for c in cases:
            clash = files.get(_name_key(os.path.abspath(out / c.name)))
            if clash is not None:
                raise InputError(
                    f"the results of {c.source} would go to {out / c.name}, where the summary {clash} goes: "
                    "rename the CT or give --summary another path"
                )
        for path in _summary_paths(summary):
            if path.is_dir():
                raise InputError(f"the summary {path} is a folder: give --summary a file path")
    return BatchPlan(tuple(cases), out, settings, ranks, summary)


# ------------------------------------------------------------------------------------------------- completion
def case_complete(
    case_dir: str | os.PathLike, expected: dict[str, Any] | None = None, formats: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """The report of a complete case folder made with ``expected`` settings (keys of :data:`RESUME_KEYS` that
    ``expected`` holds; floats compared to 4 decimals) and, when given, the output ``formats``; else ``None``.
    Complete: ``report.json`` is a report of ``Segmentation.save`` and every file it lists (``outputs``) exists; a
    report of an older version without that list needs a label map and one mask file per class."""
    folder = Path(case_dir)
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not {"case", "classes", "volumes_ml"} <= set(report):
        return None
    outputs = report.get("outputs") if isinstance(report.get("outputs"), dict) else None
    written = list(outputs.get("formats") or ()) if outputs is not None else ["nifti"]  # older reports: NIfTI
    if formats is not None and written != list(formats):
        return None
    if outputs is not None and not _listed_files_exist(folder, outputs):
        return None
    if "nifti" in written and not _nifti_files_exist(folder, report):  # "masks" is listed as a folder
        return None
    for key, value in (expected or {}).items():
        if _plain(report.get(key)) != _plain(value):
            return None
    return report


def _listed_files_exist(folder: Path, outputs: dict[str, Any]) -> bool:
    files = outputs.get("files")
    if not isinstance(files, dict):
        return False
    names = [str(n) for listed in files.values() if isinstance(listed, list) for n in listed]
    root = os.path.realpath(folder)
    return all(
        os.path.realpath(folder / n).startswith(root + os.sep) and (folder / n).exists() for n in names
    )


def _nifti_files_exist(folder: Path, report: dict[str, Any]) -> bool:
    from universal.inference import mask_file_stem

    try:
        names = {p.name for p in folder.iterdir()}
        masks = {p.name.split(".")[0] for p in (folder / "masks").iterdir() if not p.name.startswith(".")}
    except OSError:
        return False
    return any(n.startswith("labels.") for n in names) and all(
        mask_file_stem(str(c)) in masks for c in report["classes"]
    )


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resume_key(predictor: Any, series: str | None = None) -> dict[str, Any]:
    """What a complete case's report must say to be skipped for ``predictor`` reading DICOM ``series``
    (:data:`RESUME_KEYS`: the weights by name and file content, the resolved settings, the series)."""
    from universal.inference import precision_name

    d = predictor.describe()
    keys = ("model", "weights_sha256", "classes", "fast", "threshold", "overlap", "patch_size", "postprocess")
    return {
        **{k: d[k] for k in keys},
        "precision": precision_name(predictor),
        "convention": predictor.resolved.preprocessing.convention,
        "template": getattr(predictor.model, "template", None),
        "series": None if series is None else str(series),
    }


# ------------------------------------------------------------------------------------------------------ errors
def error_line(exc: BaseException) -> str:
    """One line for an exception: the message of a project error, else the kind and the first line of the text."""
    if isinstance(exc, UniversalError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_text(exc)
    text = str(exc).strip().splitlines()
    if isinstance(exc, MemoryError) or "out of memory" in (text[0].lower() if text else ""):
        return f"out of memory ({text[0] if text else 'MemoryError'}): try --fast or fewer --classes"
    return f"unexpected {type(exc).__name__}" + (f": {text[0]}" if text else "")


def os_error_text(exc: OSError) -> str:
    """``No space left on device: out/ct`` rather than ``[Errno 28] ...`` (hidden temporary names left out)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename
    parts = Path(str(name)).parts if name is not None else ()
    hidden = any(p.startswith(".") and p not in (".", "..") for p in parts)
    return what if name is None or hidden else f"{what}: {name}"


# ------------------------------------------------------------------------------------------------------ records
@dataclass
class CaseRecord:
    """One line of the summary."""

    index: int
    case: str
    source: str
    status: str
    error: str | None = None
    rank: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None
    efficiency: dict[str, Any] = field(default_factory=dict)
    volumes_ml: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from universal.io import to_json

        return to_json(
            {
                "index": self.index,
                "case": self.case,
                "source": self.source,
                "status": self.status,
                "error": self.error,
                "rank": self.rank,
                "wall_s": self.wall_s,
                "timings": self.timings,
                "efficiency": self.efficiency,
                "volumes_ml": self.volumes_ml,
            },
            ndigits=4,
        )


@dataclass
class BatchResult:
    """What a batch did: a record per case handled (skipped included), whether it was interrupted, the summary."""

    records: list[CaseRecord]
    interrupted: bool = False
    summary: Path | None = None
    elapsed_s: float | None = None

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(r.source, r.error or "") for r in self.records if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)


# ----------------------------------------------------------------------------------------------------- prefetch
class _Prefetcher:
    """Prepares cases in a daemon worker thread into a queue of ``depth`` items: yields ``(case, prepared or error
    line)`` in order; :meth:`close` stops the worker (between cases) and drops what is queued."""

    _END = object()

    def __init__(self, prepare: Callable[[Case], Any], cases: Sequence[Case], depth: int) -> None:
        self._prepare, self._cases = prepare, list(cases)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        for case in self._cases:
            if self._stop.is_set() or not self._put((case, self._prepare(case))):
                return
        self._put(self._END)

    def __iter__(self) -> Iterator[tuple[Case, Any]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------------- runner
@dataclass
class _Job:
    """One case between the network and its record: the network's result or the error line that ends it."""

    case: Case
    label: str
    case_dir: Path
    sampler: Any
    inferred: Any = None
    error: str | None = None
    bar: Any = None
    progress: Any = None

    def close_bar(self) -> None:
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar[0].close()


class BatchRunner:
    """Runs this rank's cases of a :class:`BatchPlan` with one loaded Predictor (see the module docstring).

    Args:
        predictor: A ``universal.Predictor`` (its model is loaded once, before the first case).
        plan: From :func:`plan_batch`.
        settings: The batch settings (default: the plan's), decided for the Predictor's device
            (:meth:`BatchSettings.for_device`).
        echo: ``echo(line, error=False)`` for one line per case (default: print to stdout / stderr).
        case_progress: ``case_progress(label) -> (bar, update(stage, fraction))`` for a bar within a case
            (``bar.close()`` at the end), or ``None``.
        clock: Monotonic seconds (injectable).
    """

    def __init__(
        self,
        predictor: Any,
        plan: BatchPlan,
        settings: BatchSettings | None = None,
        *,
        echo: Callable[..., None] | None = None,
        case_progress: Callable[[str], tuple[Any, Callable[[str, float], None]]] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.predictor, self.plan = predictor, plan
        self.settings = (settings or plan.settings).for_device(getattr(predictor, "device", None))
        self._echo = echo or _print
        self._case_progress = case_progress
        self._clock = clock
        self._total = len(plan.cases)

    def run(self) -> BatchResult:
        """Run the cases; Ctrl+C/SIGTERM (``KeyboardInterrupt``) let the case being finished complete (its folder
        appears whole), write the summary of what was done and re-raise (with a note saying how to resume, for a
        batch of several cases or ranks). Returns the :class:`BatchResult` (the
        merged summary on rank 0 of several)."""
        result = BatchResult([], summary=self.plan.summary)
        todo = self._skip_complete(result)
        self._last_write = self._clock()
        started = self._clock()
        source = self._source(todo)
        try:
            self._run_all(source, result)
        except KeyboardInterrupt as exc:
            result.interrupted = True
            if len(self.plan.mine) > 1 or self.plan.ranks.distributed:  # how to go on, for the CLI's one line
                exc.add_note(self._interrupted_line(result))
            raise
        finally:
            if isinstance(source, _Prefetcher):
                source.close()
            result.elapsed_s = self._clock() - started
            if self.plan.summary is not None:
                self._write(result)
        if self.plan.summary is not None and self.plan.ranks.distributed:
            self._merge_after_barrier(result)
        return result

    def _interrupted_line(self, result: BatchResult) -> str:
        done, n = len(result.records), len(self.plan.mine)
        line = f"{self._label_prefix()}{done} of {n} cases done; run the same command again to resume"
        line += " (complete cases are skipped)"
        if self.plan.summary is not None and self.plan.ranks.distributed:
            line += f"; this rank's summary is {_rank_part(self.plan.summary, self.plan.ranks)}, merged by the rerun"
        return line

    def _label_prefix(self) -> str:
        r = self.plan.ranks
        return f"[rank {r.rank}/{r.world}] " if r.distributed else ""

    def _add(self, result: BatchResult, record: CaseRecord) -> None:
        """Record a finished case; rewrite the summary when ``summary_every_s`` has passed."""
        result.records.append(record)
        if (
            self.plan.summary is not None
            and self._clock() - self._last_write >= self.settings.summary_every_s
        ):
            self._write(result)
            self._last_write = self._clock()

    def _label(self, case: Case) -> str:
        return f"{self._label_prefix()}[{case.index + 1}/{self._total}] {case.source}"

    def _skip_complete(self, result: BatchResult) -> list[Case]:
        """Record the complete cases as skipped (unless overwrite); returns the cases to run."""
        todo = []
        expected = None if self.settings.overwrite else resume_key(self.predictor, self.settings.series)
        from universal.exports import DEFAULT_FORMATS

        formats = self.settings.formats or DEFAULT_FORMATS
        for case in self.plan.mine:
            report = None if expected is None else case_complete(self.plan.case_dir(case), expected, formats)
            if report is None:
                todo.append(case)
                continue
            result.records.append(_record_from_report(case, report, self.plan.ranks.rank))
            self._echo(
                f"{self._label(case)}: skipped: {self.plan.case_dir(case)} is complete (--overwrite redoes it)"
            )
        return todo

    def _prepare(self, case: Case) -> Any:
        """The prepared CT of ``case``, or its error line (any exception of one case fails only that case)."""
        try:
            return self.predictor.prepare(case.source, series=self.settings.series)
        except Exception as exc:  # noqa: BLE001 - one case's failure never stops the batch
            return error_line(exc)

    def _source(self, todo: Sequence[Case]) -> Any:
        if self.settings.prefetch > 0 and len(todo) > 1:
            return _Prefetcher(self._prepare, todo, self.settings.prefetch)
        return ((case, self._prepare(case)) for case in todo)  # read when its turn comes

    def _run_all(self, source: Any, result: BatchResult) -> None:
        """The main thread runs each case's network; with ``pipeline`` a worker thread post-processes and writes
        the previous case meanwhile (one at a time, in order), else this thread does it before the next case."""
        from concurrent.futures import ThreadPoolExecutor

        writer = ThreadPoolExecutor(1, thread_name_prefix="batch-finish") if self.settings.pipeline else None
        pending = None  # the previous case's post-processing and writing, in the worker
        try:
            for job in self._network_jobs(source):
                if writer is None:
                    self._add(result, self._finish(job))
                    continue
                if pending is not None:
                    record = pending.result()
                    pending = None
                    self._add(result, record)
                pending = writer.submit(self._finish, job)
            if pending is not None:
                record = pending.result()
                pending = None
                self._add(result, record)
        except BaseException:
            if pending is not None:  # interrupted: the case in the worker is completed whole and recorded
                with contextlib.suppress(BaseException):
                    self._add(result, pending.result())
            raise
        finally:
            if writer is not None:
                writer.shutdown(wait=True)

    def _network_jobs(self, source: Any) -> Iterator[_Job]:
        """Each case of ``source`` through the network, in order (its efficiency sampler started when it is
        waited for: reading it is part of its wall time)."""
        from universal.efficiency import EfficiencySampler

        items = iter(source)
        while True:
            sampler = EfficiencySampler(
                self.predictor.device, interval_s=self.settings.sample_interval_s, clock=self._clock
            ).start()
            try:
                case, prepared = next(items)
            except StopIteration:
                sampler.stop()
                return
            except BaseException:
                sampler.stop()
                raise
            job = _Job(case, self._label(case), self.plan.case_dir(case), sampler)
            try:
                if isinstance(prepared, str):
                    job.error = prepared
                else:
                    self._network(job, prepared)
            except BaseException:
                job.close_bar()
                sampler.stop()
                raise
            yield job

    def _network(self, job: _Job, prepared: Any) -> None:
        """``Predictor.run_network`` of one case into ``job`` (its error line on failure)."""

        def progress(stage: str, fraction: float) -> None:
            if self._case_progress is None:
                return
            if job.bar is None:
                job.bar = self._case_progress(job.label)
            job.bar[1](stage, fraction)

        job.progress = progress
        try:
            job.inferred = self.predictor.run_network(prepared, progress)
        except Exception as exc:  # noqa: BLE001 - one case's failure never stops the batch
            job.error = error_line(exc)
        if self.settings.pipeline:
            job.sampler.end_gpu()  # the device is the next case's from now on
        if self.settings.pipeline or job.error is not None:
            job.close_bar()  # the worker's stages run while the next case's bar shows

    def _finish(self, job: _Job) -> CaseRecord:
        """Post-processing, mapping back and the case folder as a whole → the case's record (failed with its error
        line when any step fails)."""
        record = CaseRecord(
            job.case.index, job.case.name, job.case.source, "failed", rank=self.plan.ranks.rank
        )
        try:
            seg = None if job.error is not None else self._finish_and_save(job)
        finally:
            job.close_bar()
            job.sampler.stop()
        record.efficiency = job.sampler.result.to_dict()
        record.wall_s = record.efficiency["wall_s"]
        if seg is None:
            record.error = job.error
            self._echo(f"{job.label}: failed: {job.error}", error=True)
            return record
        record.status, record.timings = "ok", {k: float(v) for k, v in seg.timings.items()}
        record.volumes_ml = dict(seg.volumes_ml)
        present = sum(bool(m.any()) for m in seg.masks.values())
        t = seg.timings.get("total", float("nan"))
        self._echo(f"{job.label}: {present}/{len(seg.masks)} classes found in {t:.1f} s -> {job.case_dir}")
        return record

    def _finish_and_save(self, job: _Job) -> Any:
        """``Predictor.finish`` then ``Segmentation.save`` → the segmentation, or ``None`` with ``job.error``."""
        progress = None if self.settings.pipeline else job.progress
        inferred, job.inferred = job.inferred, None
        try:
            seg = self.predictor.finish(inferred, progress)
        except Exception as exc:  # noqa: BLE001 - one case's failure never stops the batch
            job.error = error_line(exc)
            return None
        del inferred
        job.sampler.extra_wall_s = float(
            seg.timings.get("model", 0.0)
        )  # the first case carries the model's load
        seg.info["efficiency"] = job.sampler.summary().to_dict()  # up to the end of the segmentation
        try:
            kwargs = {} if self.settings.formats is None else {"formats": self.settings.formats}
            seg.save(job.case_dir, **kwargs)
        except OSError as exc:
            job.error = f"cannot write {job.case_dir}: {os_error_text(exc)}"
        except Exception as exc:  # noqa: BLE001
            job.error = f"cannot write {job.case_dir}: {error_line(exc)}"
        return None if job.error is not None else seg

    # -------------------------------------------------------------------------------------------- summary
    def _write(self, result: BatchResult) -> None:
        ranks, stem = self.plan.ranks, self.plan.summary
        meta = self._meta(result, len(self.plan.mine))
        if ranks.distributed:
            part = _rank_part(stem, ranks)
            from universal.io import atomic_write_text

            body = {**meta, "cases": [r.to_dict() for r in result.records]}
            atomic_write_text(part, json.dumps(body, indent=1, allow_nan=False) + "\n")
        else:
            write_summary(stem, result.records, meta)

    def _meta(self, result: BatchResult, n: int) -> dict[str, Any]:
        return {
            "outdir": str(self.plan.outdir),
            "interrupted": result.interrupted,
            "elapsed_s": None if result.elapsed_s is None else round(result.elapsed_s, 3),
            "cases_total": n,
            "counts": {s: result.count(s) for s in STATUSES} | {"not run": n - len(result.records)},
            "world_size": self.plan.ranks.world,
            "batch": {
                k: getattr(self.settings, k)
                for k in ("overwrite", "prefetch", "pipeline", "formats", "series")
            },
            "settings": self.predictor.describe(),
        }

    def _merge_after_barrier(self, result: BatchResult) -> None:
        from universal import distributed

        distributed.barrier(self.plan.ranks)
        if self.plan.ranks.main:
            merge_summaries(self.plan.summary, self.plan.ranks.world, len(self.plan.cases))


def _print(line: str, error: bool = False) -> None:
    import sys

    print(line, file=sys.stderr if error else sys.stdout, flush=True)


def _record_from_report(case: Case, report: dict[str, Any], rank: int) -> CaseRecord:
    eff = report.get("efficiency") if isinstance(report.get("efficiency"), dict) else {}
    timings = report.get("timings") if isinstance(report.get("timings"), dict) else {}
    volumes = report.get("volumes_ml") if isinstance(report.get("volumes_ml"), dict) else {}
    return CaseRecord(case.index, case.name, case.source, "skipped", None, rank, timings, None, eff, volumes)


# ------------------------------------------------------------------------------------------------ summary files
def _summary_paths(stem: Path) -> tuple[Path, Path]:
    return Path(f"{stem}.csv"), Path(f"{stem}.json")


def _rank_part(stem: Path, ranks: Ranks) -> Path:
    return Path(f"{stem}.rank{ranks.rank}of{ranks.world}.json")


#: the fixed columns of ``summary.csv`` (then ``volume_ml:<class>`` for every class met)
CSV_COLUMNS = (
    "case", "source", "status", "error", "rank", "wall_s",
    "load_s", "model_s", "preprocess_s", "inference_s", "postprocess_s", "resample_s", "total_s",
    "gpu", "gpu_peak_mb", "gpu_area_mb_s", "cpu_peak_rss_mb",
)  # fmt: skip


def write_summary(
    stem: str | os.PathLike, records: Sequence[CaseRecord], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (one row per case, :data:`CSV_COLUMNS` then a volume column per class) and
    ``<stem>.json`` (``meta`` and every record), each atomically. Returns both paths."""
    from universal.io import atomic_write_text, to_json

    csv_path, json_path = _summary_paths(Path(stem))
    rows = sorted(records, key=lambda r: r.index)
    classes: list[str] = []
    for r in rows:
        classes += [c for c in r.volumes_ml if c not in classes]
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"volume_ml:{c}" for c in classes)])
    for r in rows:
        writer.writerow(_csv_row(r, classes))
    atomic_write_text(csv_path, buf.getvalue())
    body = {**to_json(meta, default=str), "cases": [r.to_dict() for r in rows]}
    atomic_write_text(json_path, json.dumps(body, indent=1, allow_nan=False) + "\n")
    return csv_path, json_path


def _csv_row(r: CaseRecord, classes: Sequence[str]) -> list[Any]:
    def cell(v: Any) -> Any:
        if v is None:
            return ""
        return round(v, 4) if isinstance(v, float) else v

    t, e = r.timings, r.efficiency
    stages = [
        t.get(s) for s in ("load", "model", "preprocess", "inference", "postprocess", "resample", "total")
    ]
    gpu = [e.get(k) for k in ("gpu", "gpu_peak_mb", "gpu_area_mb_s", "cpu_peak_rss_mb")]
    fixed = [r.case, r.source, r.status, r.error, r.rank, r.wall_s, *stages, *gpu]
    return [cell(v) for v in fixed] + [cell(r.volumes_ml.get(c)) for c in classes]


def merge_summaries(stem: str | os.PathLike, world: int, total: int) -> tuple[Path, Path]:
    """Rank 0's merge: read each rank's ``<stem>.rank<r>of<w>.json``, write the summary of all cases in list
    order, then remove the parts (and those an interrupted run with another number of ranks left: this summary
    covers their cases, recorded as skipped when complete). A missing part (a rank that died) is named in
    ``missing_ranks``."""
    stem = Path(stem)
    records: list[CaseRecord] = []
    meta: dict[str, Any] = {}
    missing = []
    for rank in range(world):
        part = _rank_part(stem, Ranks(rank, world, 0))
        try:
            data = json.loads(part.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(rank)
            continue
        meta = meta or {k: v for k, v in data.items() if k != "cases"}
        meta["interrupted"] = bool(meta.get("interrupted")) or bool(data.get("interrupted"))
        spans = [x for x in (meta.get("elapsed_s"), data.get("elapsed_s")) if isinstance(x, (int, float))]
        meta["elapsed_s"] = max(spans) if spans else None  # the slowest rank's
        records += [_record_from_dict(d) for d in data.get("cases", [])]
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    meta.update(cases_total=total, counts=counts | {"not run": total - len(records)}, missing_ranks=missing)
    paths = write_summary(stem, records, meta)
    for part in stem.parent.glob(f"{glob_escape(stem.name)}.rank*of*.json"):
        with contextlib.suppress(OSError):
            part.unlink()
    return paths


def _record_from_dict(d: dict[str, Any]) -> CaseRecord:
    keys = (
        "index",
        "case",
        "source",
        "status",
        "error",
        "rank",
        "timings",
        "wall_s",
        "efficiency",
        "volumes_ml",
    )
    return CaseRecord(**{k: d.get(k) for k in keys if k in d})
