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
  universal evaluate pred_labels.nii.gz gt_labels.nii.gz --preset flare23 --json metrics.json
  universal evaluate out/case1 gt_case1/ --classes liver spleen

PRED and GT are either output folders of `universal segment` (with masks/*.nii.gz) or label maps.
Label maps carry universal ids (1-32) unless --preset flare23 (FLARE 2023 ids 1-14) or --gt-dataset NAME
(a public dataset's own ids, mapped through the taxonomy; classes it does not annotate are reported as
"not annotated", not as misses).
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
def _cmd_segment(args: argparse.Namespace) -> int:
    from universal.inference import segment
    from universal.io import load_volume
    from universal.model import load_pretrained

    out = Path(args.output)
    try:
        model = load_pretrained(args.weights)
    except UniversalError as exc:
        return _fail(str(exc))
    failures: list[tuple[str, str]] = []
    for i, ct in enumerate(args.inputs, 1):
        label = f"[{i}/{len(args.inputs)}] {ct}"
        bar, progress = _progress_bar(label)
        try:
            volume = load_volume(ct)
            result = segment(
                volume,
                classes=args.classes or None,
                model=model,
                template=args.template,
                device=args.device,
                fast=args.fast,
                overlap=args.overlap,
                precision=args.precision,
                progress=progress,
            )
            case_dir = out / volume.name
            result.save(case_dir)
        except UniversalError as exc:
            bar.close()
            failures.append((ct, str(exc)))
            print(f"{label}: failed: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            bar.close()
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        bar.close()
        t = result.timings.get("total", float("nan"))
        present = [n for n, m in result.masks.items() if m.any()]
        print(f"{label}: {len(present)}/{len(result.masks)} classes found in {t:.1f} s -> {case_dir}")
    if failures:
        print(f"\n{len(failures)} of {len(args.inputs)} case(s) failed:", file=sys.stderr)
        for ct, msg in failures:
            print(f"  {ct}: {msg}", file=sys.stderr)
        return EXIT_PARTIAL if len(failures) < len(args.inputs) else EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- evaluate
def _read_masks(path: Path, like, *, preset: str | None, dataset: str | None) -> tuple[dict, list[str] | None]:
    """Masks keyed by universal class name (or FLARE names) from an output folder or a label map.

    Returns the masks and the classes the source annotates (``None`` = whatever is present).
    """
    import numpy as np

    from universal import metrics, taxonomy
    from universal.io import load_label

    if path.is_dir() and (path / "masks").is_dir():
        masks = {}
        for f in sorted((path / "masks").glob("*.nii*")):
            name = f.name.split(".")[0].replace("_", " ")
            masks[taxonomy.resolve_class(name).name] = load_label(f, like=like) > 0
        if preset == "flare23":
            masks = metrics.flare23_masks_from_universal(masks)
        return masks, None
    if path.is_dir():
        raise UniversalError(
            f"{path} is a folder without masks/: pass an output folder of `universal segment` or a label map file"
        )
    label = load_label(path, like=like)
    if preset == "flare23":
        return metrics.flare23_masks_from_label_map(label), None
    if dataset:
        lmap = taxonomy.dataset(dataset)
        classes = [c.name for c in taxonomy.CLASSES]
        arr = taxonomy.transfer_labels(label, lmap, like.affine, classes=classes)
        masks = {n: arr[i] for i, n in enumerate(classes) if n in lmap.annotated}
        return masks, list(lmap.annotated)
    present = set(int(v) for v in np.unique(label)) - {0}
    return metrics.universal_masks_from_label_map(label, classes=sorted(present)), None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from universal import metrics
    from universal.io import load_volume

    pred, gt = Path(args.pred), Path(args.gt)
    for p in (pred, gt):
        if not p.exists():
            return _fail(f"{p} does not exist")
    # the reference grid: the GT label map itself (labels are read as HU-free volumes through load_label)
    like = _label_grid(gt if gt.is_file() else next(iter(sorted((gt / "masks").glob("*.nii*"))), None))
    if like is None:
        return _fail(f"{gt} holds no masks")
    gt_masks, annotated = _read_masks(gt, like, preset=args.preset, dataset=args.gt_dataset)
    pred_masks, _ = _read_masks(pred, like, preset=args.preset, dataset=None)
    classes = args.classes or None
    if classes and args.preset != "flare23":
        from universal.taxonomy import resolve_classes

        classes = [c.name for c in resolve_classes(classes)]
    if classes is None:
        classes = list(gt_masks) if args.preset == "flare23" else sorted(set(gt_masks) | set(pred_masks))
    shape = like.shape
    empty = np.zeros(shape, bool)
    pred_masks = {c: pred_masks.get(c, empty) for c in classes}
    result = metrics.evaluate_case(
        pred_masks,
        {c: gt_masks.get(c, empty) for c in classes if annotated is None or c in annotated},
        like.spacing,
        preset=args.preset,
        classes=classes,
        annotated=annotated if annotated is not None else None,
    )
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False, default=_nan_none))
        print(f"wrote {args.json}")
    del load_volume
    return EXIT_OK


def _nan_none(x: Any) -> Any:
    return None


def _label_grid(path: Path | None):
    """A Volume-like grid (affine, shape, spacing) read from a label file, without HU checks."""
    if path is None:
        return None
    from universal.io import label_grid

    return label_grid(path)


# ------------------------------------------------------------------------------------------------- train
def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` (value in YAML syntax) → (section, key, value); path keys relative to the cwd."""
    import yaml

    from universal.train import _PATH_KEYS

    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (sep and dot and section and key):
        raise InputError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set train.time_budget_s=600")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    if (section, key) in _PATH_KEYS and value not in (None, True, False, "auto"):
        value = [str(Path(v).resolve()) for v in value] if isinstance(value, list) else str(Path(value).resolve())
    return section, key, value


def _cmd_train(args: argparse.Namespace) -> int:
    from universal.train import load_config, train

    config = load_config(args.config)
    overrides = {}
    if args.device:
        overrides["device"] = args.device
    if args.steps:
        overrides["steps"] = args.steps
    if args.out:
        overrides["out_dir"] = args.out
    if overrides:
        config.setdefault("train", {}).update(overrides)
    if args.resume:
        config.setdefault("train", {})["resume"] = args.resume
    for item in args.set or []:
        section, key, value = _parse_override(item)
        config[section] = {**(config.get(section) or {}), key: value}
    result = train(config)
    print(f"checkpoint: {result.checkpoint}")
    return EXIT_OK


def _cmd_pseudo(args: argparse.Namespace) -> int:
    from universal.model import load_pretrained
    from universal.pseudo import PseudoLabelConfig, pseudo_label

    model = load_pretrained(args.weights)
    config = PseudoLabelConfig(
        threshold=args.threshold,
        min_confidence=args.min_confidence,
        empty_as_negative=args.empty == "absent",
    )
    manifest, report = pseudo_label(
        args.manifest,
        model,
        args.output,
        config=config,
        device=args.device,
        fast=args.fast,
    )
    print(f"new manifest: {manifest}")
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
    if not args.cli:
        app = Path(__file__).resolve().parents[1] / "app.py"
        if app.exists():
            import os
            import subprocess

            headless = sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
            cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", str(headless).lower()]
            print("starting the dashboard (Ctrl+C stops it): " + " ".join(cmd))
            try:
                return subprocess.call(cmd, cwd=app.parent)  # cwd: .streamlit/config.toml applies
            except KeyboardInterrupt:
                return EXIT_OK
    return _demo_cli(Path(args.out), fast=not args.standard)


def _demo_cli(out: Path, fast: bool = True) -> int:
    """Segment the synthetic phantom with the built-in model and score it against the phantom's truth."""
    from universal import metrics
    from universal.inference import segment
    from universal.model import load_pretrained
    from universal.phantom import make_phantom

    t0 = time.perf_counter()
    phantom = make_phantom()
    model = load_pretrained("builtin")
    bar, progress = _progress_bar("phantom")
    result = segment(phantom.volume, model=model, fast=fast, progress=progress)
    bar.close()
    result.save(out / "phantom")
    classes = [c for c in phantom.masks if c in result.masks]
    scores = metrics.evaluate_case(
        {c: result.masks[c] for c in classes}, {c: phantom.masks[c] for c in classes}, phantom.volume.spacing
    )
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

    s = sub.add_parser("segment", help="segment CT scans", epilog=_SEGMENT_EXAMPLES, formatter_class=fmt)
    s.add_argument("inputs", nargs="+", metavar="CT", help="NIfTI, NRRD, MHA file, DICOM folder or DICOM zip")
    s.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    s.add_argument("--classes", nargs="+", metavar="NAME", help="class names or aliases (default: all)")
    s.add_argument("--weights", default="builtin", metavar="NAME|PATH", help="see `universal models`")
    s.add_argument("--template", default=None, metavar="TEXT", help="prompt template key or text with {}")
    s.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    s.add_argument("--fast", action="store_true", help="3 mm instead of 1.5 mm (about 8x faster)")
    s.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    s.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="forward-pass arithmetic (auto: float16 on CUDA, bfloat16 on CPUs that support it)")
    s.set_defaults(func=_cmd_segment)

    e = sub.add_parser("evaluate", help="DSC/NSD of predictions", epilog=_EVALUATE_EXAMPLES, formatter_class=fmt)
    e.add_argument("pred", metavar="PRED")
    e.add_argument("gt", metavar="GT")
    e.add_argument("--preset", choices=["flare23"], default=None, help="FLARE 2023 classes, tolerances and rules")
    e.add_argument("--gt-dataset", default=None, metavar="NAME", help="GT label ids of this public dataset")
    e.add_argument("--classes", nargs="+", metavar="NAME")
    e.add_argument("--json", metavar="FILE", help="write {classes: {name: {dsc, nsd}}, mean: {...}}")
    e.set_defaults(func=_cmd_evaluate)

    t = sub.add_parser("train", help="train on partially labeled datasets (YAML/TOML config)", formatter_class=fmt,
                       epilog="examples:\n  universal train configs/example_phantom.yaml\n"
                       "  universal train configs/builtin.yaml --device cuda --set train.time_budget_s=300\n"
                       "  torchrun --nproc_per_node 2 -m universal.cli train configs/builtin.yaml")
    t.add_argument("config", help="YAML/TOML training config (see configs/ and universal/train.py)")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (overrides train.device)")
    t.add_argument("--steps", type=int, default=None, help="override train.steps")
    t.add_argument("--out", default=None, metavar="DIR", help="override train.out_dir")
    t.add_argument("--resume", default=None, metavar="CKPT", help="resume from this training checkpoint")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config key (YAML value; repeatable), e.g. --set synthesis.prob=0.5 "
                   "--set train.time_budget_s=600; paths are relative to the current folder")
    t.set_defaults(func=_cmd_train)

    q = sub.add_parser("pseudo-label", help="fill unannotated classes with a trained model's predictions",
                       formatter_class=fmt,
                       epilog="example:\n  universal pseudo-label train.json -o pseudo/ --weights run/final.pt")
    q.add_argument("manifest", help="JSON/CSV manifest of the cases to label (label may be missing)")
    q.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="writes manifest.json, labels/ and quality_report.json/.csv here")
    q.add_argument("--weights", default="builtin", metavar="NAME|PATH", help="the teacher model")
    q.add_argument("--threshold", type=float, default=0.5, help="probability threshold of predictions")
    q.add_argument("--min-confidence", type=float, default=0.75,
                   help="mean probability a predicted mask needs to become a pseudo-label (default 0.75)")
    q.add_argument("--empty", choices=("absent", "unannotated"), default="absent",
                   help="a class the teacher predicts nowhere: annotated absent (default) or left unannotated "
                   "(masked in training; safer when the scans' field of view differs from the teacher's data)")
    q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    q.add_argument("--fast", action="store_true", help="predict at 3 mm")
    q.set_defaults(func=_cmd_pseudo)

    m = sub.add_parser("embed", help="encode class prompts with a text encoder", formatter_class=fmt,
                       epilog="examples:\n  universal embed --encoder minilm --template photo\n"
                       "  universal embed --encoder clip -o clip_ct.npy")
    m.add_argument("--encoder", default="auto", help="minilm, clip[:MODEL:WEIGHTS], table:FILE, onehot, auto")
    m.add_argument("--template", default="ct")
    m.add_argument("--classes", nargs="+", metavar="NAME")
    m.add_argument("-o", "--output", default=None, metavar="FILE.npy")
    m.set_defaults(func=_cmd_embed)

    sub.add_parser("models", help="list backbones and pretrained weights").set_defaults(func=_cmd_models)
    sub.add_parser("classes", help="list the 32 universal classes and datasets").set_defaults(func=_cmd_classes)

    d = sub.add_parser("demo", help="the dashboard on the built-in sample (or --cli: the phantom in the terminal)")
    d.add_argument("--cli", action="store_true", help="segment the phantom in the terminal instead")
    d.add_argument("--standard", action="store_true", help="1.5 mm instead of fast mode")
    d.add_argument("--out", default="outputs/demo")
    d.set_defaults(func=_cmd_demo)
    return p


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
