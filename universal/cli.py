"""The ``universal`` command line: segment, evaluate, train, pseudo-label, embed, models, classes, demo.

Every error a user can cause is printed as one line (``error: ...``) with a non-zero exit code, never a
traceback. Exit codes: 0 success, 1 some cases in a batch failed, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from universal.errors import InputError, UniversalError

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_SEGMENT_EXAMPLES = """examples:
  universal segment ct.nii.gz -o out/
  universal segment scan1.nii.gz dicom_folder/ series.zip -o out/ --classes liver spleen "liver tumor"
  universal segment ct.nrrd -o out/ --fast --template "There is {} in this computerized tomography"
  universal segment ct.nii.gz -o out/ --weights universal-unet --device cuda

Per case it writes OUTDIR/<case>/masks/<class_name>.nii.gz (uint8, on the input grid),
OUTDIR/<case>/labels.nii.gz (one label map, universal ids, tumours drawn over organs) and
OUTDIR/<case>/report.json (volumes in mL, mean HU, timings per stage, model, encoder, template, versions).
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
        **fixed,
    )


def _cmd_segment(args: argparse.Namespace) -> int:
    from universal.predictor import Predictor

    out = Path(args.output)
    try:
        predictor = Predictor(args.weights, _settings_from_args(args))
    except UniversalError as exc:
        return _fail(str(exc))
    failures: list[tuple[str, str]] = []
    n = len(args.inputs)
    bars: dict[int, Any] = {}

    def progress(i: int, source: Any, stage: str, fraction: float) -> None:
        if i not in bars:
            bars[i] = _progress_bar(f"[{i + 1}/{n}] {source}")
        bars[i][1](stage, fraction)

    try:
        for i, case in enumerate(predictor.predict_many(args.inputs, progress)):
            label = f"[{i + 1}/{n}] {case.source}"
            if i in bars:
                bars.pop(i)[0].close()
            if case.ok:
                try:
                    case_dir = out / case.segmentation.volume.name
                    case.segmentation.save(case_dir)
                except UniversalError as exc:
                    case = type(case)(case.source, None, str(exc))
            if not case.ok:
                failures.append((str(case.source), str(case.error)))
                print(f"{label}: failed: {case.error}", file=sys.stderr)
                continue
            result = case.segmentation
            present = [c for c, m in result.masks.items() if m.any()]
            t = result.timings.get("total", float("nan"))
            print(f"{label}: {len(present)}/{len(result.masks)} classes found in {t:.1f} s -> {case_dir}")
    except KeyboardInterrupt:
        for bar, _ in bars.values():
            bar.close()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return _batch_exit(failures, n)


def _batch_exit(failures: list[tuple[str, str]], n: int) -> int:
    if not failures:
        return EXIT_OK
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
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False))
        print(f"wrote {args.json}")
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


def _cmd_train(args: argparse.Namespace) -> int:
    from collections.abc import Mapping

    from universal.train import _absolutize, load_config, resolve_config, train

    config = load_config(args.config)
    flags = {"device": args.device, "steps": args.steps, "out_dir": args.out, "resume": args.resume}
    cwd = Path.cwd()
    overrides = [("train", k, _absolutize("train", k, v, cwd)) for k, v in flags.items() if v is not None]
    overrides += [_parse_override(item) for item in args.set or []]
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
    teacher = Predictor(args.weights, _settings_from_args(args, return_probabilities=True))
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


def _cmd_models(args: argparse.Namespace) -> int:
    from universal.model import PRETRAINED, list_models

    print("backbones: " + ", ".join(list_models()))
    print("pretrained weights:")
    for name, entry in PRETRAINED.items():
        print(f"  {name:22s} {entry.get('backbone', ''):10s} licence: {entry.get('licence', '?')}")
        if entry.get("description"):
            print(f"  {'':22s} {entry['description']}")
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
    _add_listing_parsers(sub, fmt)
    return p


def _add_segment_parser(sub: Any, fmt: Any) -> None:
    s = sub.add_parser("segment", help="segment CT scans", epilog=_SEGMENT_EXAMPLES, formatter_class=fmt)
    s.add_argument("inputs", nargs="+", metavar="CT", help="NIfTI, NRRD, MHA file, DICOM folder or DICOM zip")
    s.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    _add_predictor_args(s)
    s.set_defaults(func=_cmd_segment)


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
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (overrides train.device)")
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
        help="a class the teacher predicts nowhere: annotated absent (default) or left unannotated "
        "(masked in training; safer when the scans' field of view differs from the teacher's data)",
    )
    q.set_defaults(func=_cmd_pseudo)


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
    sub.add_parser("models", help="list backbones and pretrained weights").set_defaults(func=_cmd_models)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UniversalError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
