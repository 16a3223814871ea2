"""The ``universal`` command line: segment, evaluate, train, pseudo-label, embed, models, classes, demo.

Every error a user can cause is printed as one line (``error: ...``) with a non-zero exit code, never a
traceback. Exit codes: 0 success, 1 some cases in a batch failed, 2 bad usage or input, 130 interrupted (Ctrl+C),
143 terminated (SIGTERM, as sent by ``timeout``, Slurm and ``docker stop``; handled like Ctrl+C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from universal.batch import case_names as _case_names  # noqa: F401 - the naming rule (tests use it)
from universal.batch import os_error_text as _os_error_text
from universal.errors import InputError, UniversalError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM

_SEGMENT_EXAMPLES = """examples:
  universal segment ct.nii.gz -o out/
  universal segment scan1.nii.gz dicom_folder/ series.zip -o out/ --classes liver spleen "liver tumor"
  universal segment ct.nrrd -o out/ --fast --template "There is {} in this computerized tomography"
  universal segment ct.nii.gz -o out/ --weights universal-unet --device cuda
  universal segment cts/ 'more/*.nii.gz' list.csv -o out/ --fast     # a folder, a pattern, a manifest
  torchrun --nproc_per_node 4 -m universal.cli segment list.csv -o out/  # 4 GPUs, each its share of the list

Per case it writes OUTDIR/<case>/masks/<class_name>.nii.gz (uint8, on the input grid),
OUTDIR/<case>/labels.nii.gz (one label map, universal ids, tumours drawn over organs) and
OUTDIR/<case>/report.json (volumes in mL, mean HU, timings per stage, model, encoder, template, versions).

<case> is the input's name: the file name without its extension (ct.nii.gz -> ct), or the DICOM folder's or
zip's name. Inputs of one run with the same name (a/ct.nii.gz b/ct.nii.gz) get their parent folder's name in
front (a_ct, b_ct); names still equal then get _2, _3, ... in the order given (names compared ignoring case;
a leading dot is dropped). The same input given twice is refused.

A case folder appears whole or not at all: it is written into a hidden .<case>.*.tmp folder beside it and
renamed into place when complete, so a full disk, an error, Ctrl+C or SIGTERM leave no half-written case and
no temporary file. An earlier result in OUTDIR/<case> that is complete and was made with the same model and
settings is skipped, so a rerun resumes an interrupted batch (--overwrite redoes it); one made with other
settings is replaced as a whole (no mask of an earlier run with other classes stays); a file, or a folder
holding anything else, is never replaced (exit 2).

Batches: the model loads once; the next CT is read while the current one runs (--prefetch); the summary
(PATH.csv, PATH.json: status, error, times, FLARE efficiency numbers, volumes per case) is written at the end,
now and then, and on Ctrl+C/SIGTERM. Under torchrun or Slurm srun each rank takes every WORLD_SIZE-th case on
its own device (cuda:LOCAL_RANK), and rank 0 merges the ranks' summaries.

Checked before the model loads: the options, the device, the inputs' output names, and OUTDIR (a folder, or
creatable; writable; at least 1 MiB free). A case that fails later (unreadable, not a CT, out of memory,
disk full) is one line `[i/n] CT: failed: ...` and the next case runs.
exit codes: 0 every case written; 1 some cases failed, the others written; 2 bad usage or input, or every
case failed; 130 interrupted (Ctrl+C); 143 terminated (SIGTERM: timeout, Slurm, docker stop).
"""

_EVALUATE_EXAMPLES = """examples:
  universal evaluate out/case1 gt_labels.nii.gz --gt-dataset totalsegmentator_v2
  universal evaluate out/case1 gt_labels.nii.gz --gt-dataset totalsegmentator_v2 --preset flare23
  universal evaluate pred.nii.gz gt.nii.gz --preset flare23 --gt-dataset flare23 --pred-dataset flare23 --json m.json
  universal evaluate out/case1 gt_case1/ --classes liver spleen

PRED is an output folder of `universal segment` (masks/*.nii.gz: every class in it counts as segmented) or a
label map (the classes present in it); GT is a label map or a folder of masks. --gt-dataset / --pred-dataset
give a label map's ids: universal (1-32, the default), flare23 (FLARE 2023 ids 1-14) or a public dataset's own
ids (mapped through the taxonomy); with --preset a label map must say which. Scored by default: the classes
segmented that GT annotates; the others are listed as skipped with the reason (not segmented, not annotated),
never counted as misses. A combination that cannot work exits 2 with one line saying why.
"""


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _progress_bar(desc: str):
    """A tqdm-backed ``progress(stage, fraction)`` callback for ``segment``."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", leave=False, file=sys.stderr, dynamic_ncols=True)
    state = {"stage": ""}

    def update(stage: str, fraction: float) -> None:
        if stage != state["stage"]:
            state["stage"] = stage
            bar.set_postfix_str(stage)
        bar.n = int(round(100 * max(0.0, min(1.0, fraction))))
        bar.refresh()

    return bar, update


# ----------------------------------------------------------------------------------------------- segment
def _add_predictor_args(p: argparse.ArgumentParser, *, weights_help: str = "see `universal models`") -> None:
    """The options that build a :class:`universal.Predictor`; choices and defaults come from the library (an option
    left out takes the model spec's value)."""
    from universal.preprocess import CONVENTIONS
    from universal.spec import PRECISIONS

    p.add_argument("--weights", default="builtin", metavar="NAME|PATH", help=weights_help)
    p.add_argument(
        "--classes", nargs="+", metavar="NAME", help="class names or aliases (default: all the model's)"
    )
    p.add_argument("--template", default=None, metavar="TEXT", help="prompt template key or text with {}")
    p.add_argument(
        "--device", default=None, metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps (default: auto)"
    )
    p.add_argument("--fast", action="store_true", help="work at the model's fast spacing (3 mm)")
    p.add_argument(
        "--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) (default: the model's)"
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="probability threshold in (0, 1) (default: the model's)"
    )
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="forward-pass arithmetic (default: the model's, usually auto: float16 on CUDA, bfloat16 on "
                   "CPUs that support it)")  # fmt: skip
    p.add_argument("--convention", default=None, choices=CONVENTIONS,
                   help="grid convention (default: the model's): official = the official release's MONAI chain "
                   "(the default of its checkpoints), universal = the project's own")  # fmt: skip
    p.add_argument("--accept-licence", action="store_true",
                   help="accept (and record, once) the non-open licence of downloaded weights such as the official "
                   "release's CC BY-NC-ND 4.0 (see `universal models`)")  # fmt: skip
    p.add_argument("--max-voxels", type=int, default=None, metavar="N",
                   help="refuse a CT whose prepared grid would hold more voxels (memory bound; default: "
                   "universal.preprocess.MAX_PREPARED_VOXELS)")  # fmt: skip


def _settings_from_args(args: argparse.Namespace, **fixed: Any):
    """The :class:`PredictorSettings` of the parsed options (validated here, before any model is loaded)."""
    from universal.predictor import PredictorSettings

    return PredictorSettings(
        device=args.device,
        precision=args.precision,
        overlap=args.overlap,
        threshold=args.threshold,
        fast=args.fast,
        classes=tuple(args.classes) if args.classes else None,
        template=args.template,
        convention=args.convention,
        max_voxels=args.max_voxels,
        **fixed,
    )


def _cmd_segment(args: argparse.Namespace) -> int:
    """Plan the batch (inputs, names, folders and options checked before the model loads), load the model once,
    run this rank's cases (:class:`universal.batch.BatchRunner`; ranks from torchrun / Slurm)."""
    from universal import batch, distributed
    from universal.predictor import Predictor, resolve_device

    ranks = distributed.detect()
    out = Path(args.output)
    settings = _settings_from_args(args)  # every option, before anything is created or loaded
    device = distributed.device_for(ranks, settings.device)  # several ranks: cuda:LOCAL_RANK each
    if device != settings.device:
        settings = settings.replace(device=device)
    resolved = resolve_device(settings.device)  # an absent device is said before the model loads
    plan = batch.plan_batch(args.inputs, out, _batch_settings(args), ranks)
    created, started = _prepare_output(out), False
    try:
        started = distributed.init(ranks, resolved)  # several ranks: gloo (CPU) or nccl (CUDA)
        distributed.on_main_first(ranks, lambda: _prepare_weights(args))  # one download, not one per rank
        predictor = Predictor(args.weights, settings)
        bars = None if ranks.distributed else _progress_bar  # one bar per rank would garble the terminal
        result = batch.BatchRunner(predictor, plan, case_progress=bars).run()
    finally:
        distributed.shutdown(started)
        _remove_if_empty(created)  # nothing written (a refused model, every case failed, interrupted)
    if result.summary is not None and ranks.main:
        print(f"summary: {result.summary}.csv and {result.summary}.json")
    return _batch_exit(result.failures, len(plan.mine))


def _batch_settings(args: argparse.Namespace):
    """The :class:`universal.batch.BatchSettings` of the parsed options (an option left out keeps its default)."""
    from universal.batch import BatchSettings

    given = {
        "overwrite": args.overwrite or None,
        "prefetch": args.prefetch,
        "pipeline": args.pipeline,
        "summary": args.summary,
        "series": args.series,
        "formats": args.formats,  # --format
    }
    return BatchSettings(**{k: v for k, v in given.items() if v is not None})


_MIN_FREE_BYTES = 1024**2
"""Free space OUTDIR must have before the model loads (a floor, not an estimate: a full disk later still fails
only the case being written, and leaves nothing of it)."""


def _prepare_output(out: Path) -> list[Path]:
    """Create OUTDIR (and missing parents) and prove it writable with a probe file, before the model loads; refuse
    a file, a read-only folder or a (nearly) full disk. Returns the folders it created."""
    import secrets
    import shutil

    existing = out
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = f"-o {out} is a file" if existing == out else f"-o {out} cannot be made: {existing} is a file"
        raise InputError(f"{what}; give a folder for the results")
    created = [p for p in [out, *out.parents] if not os.path.lexists(p)][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".universal-probe-{secrets.token_hex(4)}.tmp"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        free = shutil.disk_usage(out).free
    except OSError as exc:
        _remove_if_empty(created)
        raise InputError(f"cannot write into the output folder {out}: {exc.strerror or exc}") from exc
    if free < _MIN_FREE_BYTES:
        _remove_if_empty(created)
        raise InputError(
            f"only {free // 1024} KiB free in the output folder {out} (at least {_MIN_FREE_BYTES // 1024**2} MiB "
            "needed): free some space or choose another -o"
        )
    return created


def _remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove the folders this run created, deepest first, where they are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _batch_exit(failures: list[tuple[str, str]], n: int) -> int:
    """The exit code of a batch (0 all written, 1 some failed, 2 all failed), after a summary of the failures
    when there was more than one case (a single case's failure is its one line already)."""
    if not failures:
        return EXIT_OK
    if n > 1:
        print(f"\n{len(failures)} of {n} case(s) failed:", file=sys.stderr)
        for ct, msg in failures:
            print(f"  {ct}: {msg}", file=sys.stderr)
    return EXIT_PARTIAL if len(failures) < n else EXIT_USAGE


# ---------------------------------------------------------------------------------------------- evaluate
class _LazyChoices:
    """argparse choices read from :mod:`universal.evaluation` on first use (``universal --help`` stays light)."""

    def __init__(self, name: str) -> None:
        self._name, self._values = name, None

    def _get(self) -> list[str]:
        if self._values is None:
            from universal import evaluation

            value = getattr(evaluation, self._name)
            self._values = list(value() if callable(value) else value)
        return self._values

    def __contains__(self, item: object) -> bool:
        return item in self._get()

    def __iter__(self):
        return iter(self._get())


def _add_evaluate_parser(sub: Any, fmt: Any) -> None:
    e = sub.add_parser(
        "evaluate", help="DSC/NSD of predictions", epilog=_EVALUATE_EXAMPLES, formatter_class=fmt
    )
    e.add_argument("pred", metavar="PRED", help="output folder of `universal segment`, or a label map")
    e.add_argument("gt", metavar="GT", help="reference label map, or a folder of masks")
    e.add_argument(
        "--preset",
        choices=_LazyChoices("PRESETS"),
        default=None,
        metavar="NAME",
        help="scoring rules: %(choices)s (default: generic rules)",
    )
    e.add_argument(
        "--gt-dataset",
        choices=_LazyChoices("conventions"),
        default=None,
        metavar="NAME",
        help="the ids of a GT label map: %(choices)s (default: universal)",
    )
    e.add_argument(
        "--pred-dataset",
        choices=_LazyChoices("conventions"),
        default=None,
        metavar="NAME",
        help="the ids of a PRED label map (default: universal, what `universal segment` writes)",
    )
    e.add_argument("--classes", nargs="+", metavar="NAME", help="default: those segmented that GT annotates")
    e.add_argument("--json", metavar="FILE", help="also write the scores, the classes skipped and why")
    e.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from universal import evaluation

    pred, gt = Path(args.pred), Path(args.gt)
    for p in (pred, gt):
        if not p.exists():
            return _fail(f"{p} does not exist")
    if args.json:
        evaluation.check_json_path(args.json)  # before scoring: a wrong folder fails at once
    result = evaluation.evaluate(
        pred,
        gt,
        preset=args.preset,
        classes=args.classes,
        convention=args.gt_dataset,
        prediction_convention=args.pred_dataset,
    )
    print(result.table())
    if args.json:
        print(f"wrote {result.write_json(args.json)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------- train
def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value in YAML syntax) → (section, key, value); relative paths against the cwd.

    Only the syntax is checked here; the value is checked with the whole config by ``resolve_config``.
    """
    import yaml

    from universal.train import _absolutize, _yaml_load

    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (sep and dot and section and key):
        raise InputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set train.time_budget_s=600")
    try:
        value = _yaml_load(text)  # as in config files: 1e-3 is a number
    except yaml.YAMLError as exc:
        raise InputError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return section, key, _absolutize(section, key, value, Path.cwd())


def _one_value_per_key(given: list[tuple[str, tuple[str, str, Any]]]) -> list[tuple[str, str, Any]]:
    """The overrides of ``(option text, (section, key, value))``; a key given twice with different values (``--steps
    5 --set train.steps=7``) is refused rather than one of them winning in silence."""
    seen: dict[tuple[str, str], tuple[str, Any]] = {}
    for text, (section, key, value) in given:
        before = seen.get((section, key))
        if before is not None and before[1] != value:
            raise InputError(f"{section}.{key} is given twice ({before[0]} and {text}): give it once")
        seen[(section, key)] = (text, value)
    return [(section, key, value) for (section, key), (_, value) in seen.items()]


def _cmd_train(args: argparse.Namespace) -> int:
    from collections.abc import Mapping

    from universal.train import _absolutize, load_config, resolve_config, train

    config = load_config(args.config)
    flags = {"device": args.device, "steps": args.steps, "out_dir": args.out, "resume": args.resume}
    names = {"device": "--device", "steps": "--steps", "out_dir": "--out", "resume": "--resume"}
    cwd = Path.cwd()
    given = [(f"{names[k]} {v}", ("train", k, _absolutize("train", k, v, cwd))) for k, v in flags.items()
             if v is not None]  # fmt: skip
    given += [(f"--set {item}", _parse_override(item)) for item in args.set or []]
    overrides = _one_value_per_key(given)
    for section, key, value in overrides:
        values = config.get(section)
        if values is None or isinstance(values, Mapping):  # else resolve_config names the bad section
            config[section] = {**(values or {}), key: value}
    cfg = resolve_config(config)  # every key at once, the overrides included, before any work
    result = train(cfg)
    print(f"checkpoint: {result.checkpoint}")
    return EXIT_OK


def _cmd_pseudo(args: argparse.Namespace) -> int:
    from universal.predictor import Predictor
    from universal.pseudo import EMPTY_POLICIES, PseudoLabelConfig, pseudo_label

    rules = {"min_confidence": args.min_confidence, "empty_as_negative": EMPTY_POLICIES.get(args.empty)}
    config = PseudoLabelConfig(
        **{k: v for k, v in rules.items() if v is not None}
    )  # validated before any load
    settings = _settings_from_args(args, return_probabilities=True)
    _prepare_weights(args)
    teacher = Predictor(args.weights, settings)
    manifest, report = pseudo_label(args.manifest, teacher, args.output, config)
    print(f"new manifest: {manifest}")
    s = report["settings"]
    empty = "absent" if s["empty_as_negative"] else "unannotated"
    print(f"threshold {s['threshold']}, min confidence {s['min_confidence']}, empty predictions: {empty}")
    flagged = [c for c in report.get("cases", []) if c.get("flags")]
    print(f"{len(flagged)} case(s) flagged for review (see {Path(args.output) / 'quality_report.json'})")
    return EXIT_OK


# ----------------------------------------------------------------------------------- embed/models/classes
def _cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from universal.prompts import encode_prompts, get_encoder, resolve_template
    from universal.taxonomy import resolve_classes

    classes = resolve_classes(args.classes or None)
    encoder = get_encoder(args.encoder)
    template = resolve_template(args.template)
    emb = encode_prompts(classes, template=template, encoder=encoder)
    if args.output:
        np.save(args.output, emb.astype(np.float32))
        print(f"wrote {args.output}: {emb.shape[0]} x {emb.shape[1]} ({encoder.name}, {template!r})")
    else:
        print(f"{encoder.name}: {emb.shape[0]} x {emb.shape[1]}, template {template!r}")
        norms = np.linalg.norm(emb, axis=1)
        for c, n in zip(classes, norms):
            print(f"  {c.index:2d} {c.name:28s} |w| = {n:.3f}")
    return EXIT_OK


def _prepare_weights(args: argparse.Namespace) -> None:
    """Download (with a progress bar) and check downloadable weights before the model loads; ``--accept-licence``
    accepts their licence (``universal.model.sources.prepare_weights``)."""
    from universal.model import sources

    update, close = sources.tqdm_progress(str(args.weights))
    try:
        sources.prepare_weights(args.weights, accept_licence=args.accept_licence, progress=update)
    finally:
        close()


def _cmd_models(args: argparse.Namespace) -> int:
    """List the backbones and every weights source, or (``download NAME``) fetch one into the cache."""
    from universal.model import list_models, sources

    if args.action == "download":
        if not args.name:
            raise InputError("give the source to download: universal models download NAME (see `universal models`)")
        update, close = sources.tqdm_progress(args.name)
        try:
            path, sha = sources.obtain(args.name, progress=update, accept_licence=args.accept_licence)
        finally:
            close()
        print(f"{args.name}: {path}\nsha256 {sha}")
        return EXIT_OK
    print("backbones: " + ", ".join(list_models()))
    print("weights sources (name, backbone, licence, size, cached, checksum):")
    for row in sources.listing():
        accept = " (accept it: --accept-licence)" if row["requires_acceptance"] else ""
        sha = f" {row['sha256']}" if row["sha256"] else ""
        print(
            f"  {row['name']:22s} {row['backbone'] or '-':10s} licence: {row['licence']}{accept}; "
            f"size {sources.human_size(row['size'])}; {row['state']}; "
            f"sha256 {row['checksum']}{sha}"
        )
        if row["description"]:
            print(f"  {'':22s} {row['description']}")
    print(f"  {sources.HUB_PREFIX + 'ORG/REPO[:FILE][@REVISION]':22s} a checkpoint on the Hugging Face Hub "
          f"(FILE default {sources.HUB_DEFAULT_FILE}, REVISION default {sources.HUB_DEFAULT_REVISION})")
    return EXIT_OK


def _cmd_classes(args: argparse.Namespace) -> int:
    from universal.taxonomy import CLASSES, list_datasets

    for c in CLASSES:
        extra = f"  (in {', '.join(c.parent)})" if getattr(c, "parent", None) else ""
        print(f"{c.index:2d}  {c.name}{extra}")
    print("\ndatasets with label maps: " + ", ".join(list_datasets()))
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    """The dashboard (``$UNIVERSAL_APP``, else ``app.py`` in the current folder), or the terminal demo."""
    from universal.app_logic import APP_ENV, DashboardConfig

    app = None if args.cli else DashboardConfig.from_env().app
    if app is not None and app.is_file():
        import os
        import subprocess

        headless = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
        cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", str(headless).lower()]
        print("starting the dashboard (Ctrl+C stops it): " + " ".join(cmd))
        try:
            return subprocess.call(cmd, cwd=app.parent)  # cwd: its .streamlit/config.toml applies
        except KeyboardInterrupt:
            return EXIT_OK
    if not args.cli:
        print(f"no app.py here (set {APP_ENV} to the dashboard's app.py): the demo runs in the terminal")
    return _demo_cli(Path(args.out), fast=not args.standard)


def _demo_cli(out: Path, fast: bool = True) -> int:
    """Segment the synthetic phantom with the built-in model and score it against the phantom's truth."""
    from universal import evaluation
    from universal.phantom import make_phantom
    from universal.predictor import Predictor

    t0 = time.perf_counter()
    phantom = make_phantom()
    bar, progress = _progress_bar("phantom")
    result = Predictor("builtin", fast=fast).predict(phantom.volume, progress)
    bar.close()
    result.save(out / "phantom")
    scores = evaluation.evaluate(result, evaluation.read_reference(dict(phantom.masks), like=phantom.volume))
    print(scores.table())
    print(f"\nwrote {out / 'phantom'} in {time.perf_counter() - t0:.1f} s")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="universal",
        description="Text-prompted universal segmentation of organs and tumours in CT.",
        epilog="Run `universal COMMAND --help` for examples. Not for clinical use.",
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_segment_parser(sub, fmt)
    _add_evaluate_parser(sub, fmt)
    _add_train_parser(sub, fmt)
    _add_pseudo_parser(sub, fmt)
    _add_finetune_parser(sub, fmt)
    _add_listing_parsers(sub, fmt)
    return p


def _add_segment_parser(sub: Any, fmt: Any) -> None:
    s = sub.add_parser("segment", help="segment CT scans", epilog=_SEGMENT_EXAMPLES, formatter_class=fmt)
    s.add_argument(
        "inputs",
        nargs="+",
        metavar="CT",
        help="NIfTI, NRRD, MHA file, DICOM folder or DICOM zip; a folder of CTs, a quoted pattern ('cts/*.nii.gz') "
        "or a .csv/.json manifest (column/key image, optionally name)",
    )
    s.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    s.add_argument(
        "--series",
        default=None,
        metavar="UID|NUMBER",
        help="the DICOM series to read when a folder or zip holds several: its SeriesInstanceUID or SeriesNumber "
        "(applies to every DICOM input; default: the CT series with the most slices, with a warning listing the others)",
    )
    from universal.exports import DEFAULT_FORMATS, DICOM_FORMATS, FORMATS

    s.add_argument(
        "--format",
        dest="formats",
        default=None,
        metavar="FORMATS",
        help=f"comma-separated output formats: {', '.join(FORMATS)} (default: {','.join(DEFAULT_FORMATS)}; "
        f"{' and '.join(sorted(DICOM_FORMATS))} need a DICOM input; report.json is always written)",
    )
    _add_predictor_args(s)
    _add_batch_args(s)
    s.set_defaults(func=_cmd_segment)


def _add_batch_args(s: argparse.ArgumentParser) -> None:
    """The options of :class:`universal.batch.BatchSettings` (defaults and bounds from the library)."""
    from universal.batch import DEFAULT_PREFETCH, MAX_PREFETCH

    s.add_argument("--overwrite", action="store_true",
                   help="redo cases whose output folder is complete (default: skip them, so a rerun resumes)")
    s.add_argument("--prefetch", type=int, default=None, metavar="N",
                   help=f"CTs read and preprocessed ahead in a worker thread while the current one runs (0 to "
                   f"{MAX_PREFETCH}; 0 = none; default {DEFAULT_PREFETCH} on a GPU, 0 on the CPU)")
    s.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="post-process and write each case in a worker thread while the next one runs the network "
                   "(one more case in memory; same outputs). Default: on a GPU, off on the CPU, whose cores the "
                   "network already keeps busy")
    s.add_argument("--summary", default=None, metavar="PATH",
                   help="write the batch summary to PATH.csv and PATH.json (default: OUTDIR/summary when a "
                   "folder, pattern or manifest is given or several ranks run; else none)")  # fmt: skip


def _add_train_parser(sub: Any, fmt: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train on partially labeled datasets (YAML/TOML config)",
        formatter_class=fmt,
        epilog="examples:\n  universal train configs/example_phantom.yaml\n"
        "  universal train configs/builtin.yaml --device cuda --set train.time_budget_s=300\n"
        "  torchrun --nproc_per_node 2 -m universal.cli train configs/builtin.yaml",
    )
    t.add_argument("config", help="YAML/TOML training config (every key: docs/CONFIG.md; examples: configs/)")
    t.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (overrides train.device)")
    t.add_argument("--steps", type=int, default=None, help="override train.steps")
    t.add_argument("--out", default=None, metavar="DIR", help="override train.out_dir")
    t.add_argument("--resume", default=None, metavar="CKPT", help="resume from this training checkpoint")
    t.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override any config key (YAML value; repeatable), e.g. --set synthesis.prob=0.5 "
        "--set train.time_budget_s=600; paths are relative to the current folder",
    )
    t.set_defaults(func=_cmd_train)


def _add_pseudo_parser(sub: Any, fmt: Any) -> None:
    q = sub.add_parser(
        "pseudo-label",
        help="fill unannotated classes with a trained model's predictions",
        formatter_class=fmt,
        epilog="example:\n  universal pseudo-label train.json -o pseudo/ --weights run/final.pt",
    )
    q.add_argument("manifest", help="JSON/CSV manifest of the cases to label (label may be missing)")
    q.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTDIR",
        help="writes manifest.json, labels/ and quality_report.*",
    )
    _add_predictor_args(q, weights_help="the teacher model (see `universal models`)")
    q.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        help="mean probability a predicted mask needs to become a pseudo-label (default: "
        f"{_pseudo_default('min_confidence')})",
    )
    q.add_argument(
        "--empty",
        choices=list(_pseudo_default("EMPTY_POLICIES")),
        default=None,
        help="a class the teacher predicts nowhere: annotated absent, or left unannotated (masked in training; "
        "the default: a weak teacher would otherwise teach 'absent' everywhere)",
    )
    q.set_defaults(func=_cmd_pseudo)


def _add_finetune_parser(sub: Any, fmt: Any) -> None:
    """``finetune``: options left out take :class:`universal.finetune.FinetuneConfig`'s defaults (shown)."""
    import dataclasses

    from universal.finetune import FinetuneConfig

    default = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    f = sub.add_parser(
        "finetune",
        help="fine-tune on corrected cases (masked loss: only the corrected classes are learnt)",
        formatter_class=fmt,
        epilog="examples:\n  universal finetune corrections/ --weights builtin -o my_model.pt\n"
        "  universal finetune corrections/ -o my_model.pt --steps 60 --mix-phantom 2 --device cuda\n"
        "Writes the model and its card (my_model.md); the new model loads with --weights my_model.pt.",
    )
    f.add_argument("dataset", help="a corrections dataset folder (the dashboard's Correct tab saves one)")
    f.add_argument("--weights", default="builtin", metavar="NAME|PATH", help="the weights to start from")
    f.add_argument("-o", "--output", required=True, metavar="MODEL.pt")
    f.add_argument("--steps", type=int, help=f"optimisation steps (default {default['steps']})")
    f.add_argument("--patch", type=int, nargs="+", metavar="N",
                   help="patch size, one or three integers (default: the weights' sliding window)")  # fmt: skip
    f.add_argument("--lr", type=float, help=f"peak learning rate (default {default['lr']:g})")
    f.add_argument("--mix-phantom", type=int, metavar="N",
                   help="phantom cases mixed in against forgetting (default none)")  # fmt: skip
    f.add_argument("--anchor", action="store_true",
                   help="anchor the classes not corrected on the starting model's own predictions")  # fmt: skip
    f.add_argument("--time-budget", type=float, metavar="S", help="stop training after S seconds")
    f.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: cuda when available)")
    f.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from universal.finetune import FinetuneConfig, finetune

    patch = args.patch and tuple(args.patch * 3 if len(args.patch) == 1 else args.patch)
    given = {"steps": args.steps, "patch_size": patch, "lr": args.lr, "mix_phantom": args.mix_phantom,
             "time_budget_s": args.time_budget, "device": args.device, "anchor": args.anchor or None}  # fmt: skip
    config = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})  # checked before any load
    bar, _ = _progress_bar("finetune")
    try:
        result = finetune(args.dataset, args.weights, args.output, config,
                          progress=lambda step, total, loss: bar.update(100 * step // total - bar.n))  # fmt: skip
    finally:
        bar.close()
    print(result.message)
    print(f"model card: {result.card}")
    return EXIT_OK


def _add_listing_parsers(sub: Any, fmt: Any) -> None:
    """``embed``, ``models``, ``classes`` and ``demo``."""
    m = sub.add_parser(
        "embed",
        help="encode class prompts with a text encoder",
        formatter_class=fmt,
        epilog="examples:\n  universal embed --encoder minilm --template photo\n"
        "  universal embed --encoder clip -o clip_ct.npy",
    )
    m.add_argument("--encoder", default="auto", help="minilm, clip[:MODEL:WEIGHTS], table:FILE, onehot, auto")
    m.add_argument("--template", default="ct")
    m.add_argument("--classes", nargs="+", metavar="NAME")
    m.add_argument("-o", "--output", default=None, metavar="FILE.npy")
    m.set_defaults(func=_cmd_embed)
    mp = sub.add_parser("models", help="list backbones and weights sources; `models download NAME` fetches one")
    mp.add_argument("action", nargs="?", choices=("list", "download"), default="list")
    mp.add_argument("name", nargs="?", help="what to download: a registry name or hf-hub:ORG/REPO[:FILE][@REV]")
    mp.add_argument("--accept-licence", action="store_true", help="accept a non-open licence (recorded; asked once)")
    mp.set_defaults(func=_cmd_models)
    sub.add_parser("classes", help="list the 32 universal classes and datasets").set_defaults(
        func=_cmd_classes
    )
    d = sub.add_parser(
        "demo", help="the dashboard on the built-in sample (or --cli: the phantom in the terminal)"
    )
    d.add_argument("--cli", action="store_true", help="segment the phantom in the terminal instead")
    d.add_argument("--standard", action="store_true", help="1.5 mm instead of fast mode")
    d.add_argument("--out", default="outputs/demo")
    d.set_defaults(func=_cmd_demo)


def _pseudo_default(name: str) -> Any:
    """A default of :class:`universal.pseudo.PseudoLabelConfig` (shown in help; one home for it)."""
    import dataclasses

    from universal import pseudo
    from universal.pseudo import PseudoLabelConfig

    if name.isupper():
        return getattr(pseudo, name)
    return {f.name: f.default for f in dataclasses.fields(PseudoLabelConfig)}[name]


def _version() -> str:
    from universal import __version__

    return f"universal {__version__}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by ``timeout``, Slurm, ``docker stop``), raised like Ctrl+C's ``KeyboardInterrupt`` so that
    every clean-up runs: no half-written case and no temporary file stays behind."""


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises :class:`Terminated` (main thread only; a SIGTERM that the parent
    process set to be ignored stays ignored); the previous handler is restored afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _warnings_above_progress_bars():
    """Warnings shown while a progress bar is drawn start on their own line: the bars are cleared, the warning is
    shown as it would have been (filters, ``logging.captureWarnings`` and recording still apply), the bars are
    drawn again below it."""
    import warnings

    previous = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file=None, line=None) -> None:
        tqdm = sys.modules.get("tqdm")
        bars = getattr(getattr(tqdm, "tqdm", None), "external_write_mode", None)
        with bars(file=file or sys.stderr) if bars is not None else contextlib.nullcontext():
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    with _sigterm_raises(), _warnings_above_progress_bars():
        try:
            return int(args.func(args) or 0)
        except UniversalError as exc:
            return _fail(str(exc))
        except KeyboardInterrupt as exc:  # Ctrl+C, or SIGTERM (Terminated)
            terminated = isinstance(exc, Terminated)
            notes = getattr(exc, "__notes__", None)  # a batch says how to resume
            line = "interrupted (SIGTERM)" if terminated else "interrupted"
            print(f"{line}: {notes[-1]}" if notes else line, file=sys.stderr)
            return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        except OSError as exc:  # a file that cannot be read or written (missing, permissions, disk full)
            return _fail(_os_error_text(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
