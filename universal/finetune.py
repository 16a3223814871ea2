"""Fine-tuning on corrected cases with masked back-propagation.

``finetune(dataset, weights, out)`` continues training ``weights`` (``"builtin"``, a pretrained name or a universal
checkpoint) on the cases of a corrections dataset (:mod:`universal.corrections`: each case annotates only the
classes that were corrected). It is :func:`universal.train.train` with a config built from the weights' own
:class:`~universal.spec.ModelSpec` (backbone, classes, prompts, spacing, HU window, crop) and a
:class:`FinetuneConfig` (few steps, small patches: minutes on a CPU), so the masked loss gives the corrected classes
gradient and every other class none. Optionally the built-in model's synthetic training data (the phantom, every
class it draws annotated) is mixed in against forgetting (``mix_phantom``).

Output: ``out`` (a model checkpoint whose spec keeps the source's preprocessing and inference defaults, and whose
provenance says: fine-tuned from X on N cases, which classes, steps, seconds) and a model card ``out`` with the
suffix ``.md`` beside it. Both are written atomically, after training; the run's work folder (a hidden sibling of
``out``) is removed in every case. A ``stop`` event ends the run before its next step and writes **nothing**
(the result says so): a half-trained model is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from universal.errors import InputError
from universal.predictor import device_name

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "model_card"]


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune (validated on construction; defaults run in a few minutes on a laptop CPU).

    Attributes:
        steps: Optimisation steps.
        patch_size: Training patch (voxels, on the weights' grid; a multiple of the backbone's size divisor), or
            ``None``: the weights' own sliding window, so training sees the global context inference sees (the
            controller pools over the whole window). Smaller patches are faster but moved the other classes more
            in ``bench/finetune.py`` (liver DSC on an unseen scan −0.10 with 64×64×32, −0.03 with the window).
        batch_size: Patches per step.
        lr: Peak learning rate (AdamW; linear warm-up over ``warmup_steps``, then cosine decay).
        warmup_steps: Warm-up steps.
        mix_phantom: Synthetic phantom cases (the built-in model's training data) mixed in against forgetting
            (0: the corrected cases only).
        anchor: Anchor the classes that were *not* corrected on the starting model's own confident predictions
            on the corrected cases (:func:`universal.pseudo.pseudo_label`: the corrected classes keep their
            labels, the others get the model's pseudo-labels), so that the shared network cannot drift on them.
            Off by default: then only the corrected classes have a loss term.
        samples_per_case: Consecutive patches per case visit.
        foreground: Share of patches centred on an annotated structure (the rest anywhere in the body).
        time_budget_s: Stop after this many seconds of training (the schedule follows the clock), or ``None``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``None`` (cuda when available); the name is
            checked here (:func:`universal.predictor.device_name`), its presence when the run starts.
        seed: Seed of the patches.
    """

    steps: int = 30
    patch_size: tuple[int, int, int] | None = None
    batch_size: int = 1
    lr: float = 5e-5
    warmup_steps: int = 3
    mix_phantom: int = 0
    anchor: bool = False
    samples_per_case: int = 2
    foreground: float = 0.75
    time_budget_s: float | None = None
    device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "samples_per_case"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name} is {getattr(self, name)!r}; it must be an integer >= 1")
        for name in ("warmup_steps", "mix_phantom", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} is {getattr(self, name)!r}; it must be an integer >= 0")
        patch = tuple(self.patch_size) if isinstance(self.patch_size, (list, tuple)) else ()
        if self.patch_size is not None and (len(patch) != 3 or not all(_is_int(p) and p >= 8 for p in patch)):
            problems.append(f"patch_size is {self.patch_size!r}; it must be three integers >= 8, or None")
        elif self.patch_size is not None:
            object.__setattr__(self, "patch_size", tuple(int(p) for p in patch))
        if not (_is_number(self.lr) and self.lr > 0):
            problems.append(f"lr is {self.lr!r}; it must be a number > 0")
        if not (_is_number(self.foreground) and 0 <= self.foreground <= 1):
            problems.append(f"foreground is {self.foreground!r}; it must be a number in [0, 1]")
        if self.time_budget_s is not None and not (_is_number(self.time_budget_s) and self.time_budget_s > 0):
            problems.append(f"time_budget_s is {self.time_budget_s!r}; it must be a number > 0 or None")
        if not isinstance(self.anchor, bool):
            problems.append(f"anchor is {self.anchor!r}; it must be True or False")
        if self.device is not None:
            try:
                object.__setattr__(self, "device", device_name(self.device))
            except InputError as exc:
                problems.append(f"{exc}, or None")
        if problems:
            raise InputError("fine-tuning settings: " + "; ".join(problems))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: ``checkpoint`` and ``card`` (``None`` when stopped), the steps done and asked
    for, the cases and classes fine-tuned on, seconds of training and in all, the loss per step, a summary line."""

    checkpoint: Path | None
    card: Path | None
    steps: int
    total_steps: int
    cases: int
    classes: tuple[str, ...]
    train_seconds: float
    seconds: float
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    message: str = ""


def _dataset_manifest(dataset: str | os.PathLike) -> Path:
    from universal.corrections import MANIFEST

    path = Path(dataset)
    path = path / MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise InputError(
            f"no corrections dataset at {dataset} (no {MANIFEST}); save corrected cases first "
            "(dashboard: Correct → Save as training case)"
        )
    return path


def _check_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.suffix != ".pt":
        raise InputError(f"the output {out} must be a .pt file, e.g. my_model.pt")
    if out.is_dir():
        raise InputError(f"the output {out} is a folder; give a .pt file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"cannot write into {out.parent}; choose a writable folder for the model")
    return out


def _corrected_classes(manifest: Path, model_classes: Sequence[str]) -> tuple[int, tuple[str, ...]]:
    """Cases and the union of their annotated classes (in the model's order); refuses classes the model lacks."""
    from universal.data import load_manifest

    cases = [c for c in load_manifest(manifest).cases if c.labeled]
    annotated = {n for c in cases for n in c.annotated_classes()}
    foreign = sorted(annotated - set(model_classes))
    if foreign:
        raise InputError(
            f"the dataset annotates {foreign}, which these weights do not segment; fine-tune weights that have "
            "these classes, or save cases of the model's own classes"
        )
    if not cases or not annotated:
        raise InputError(f"{manifest} lists no corrected case; save corrected cases first")
    return len(cases), tuple(n for n in model_classes if n in annotated)


def _train_config(spec: Any, init: Path, manifests: list[str], work: Path, cfg: FinetuneConfig) -> dict:
    """The :func:`universal.train.train` config: the weights' own contract, the fine-tuning settings."""
    p = spec.preprocessing
    return {
        "model": {
            "backbone": spec.backbone,
            "classes": list(spec.classes),
            "encoder": spec.encoder,
            "template": spec.template,
            "kwargs": dict(spec.backbone_kwargs),
            "init": str(init),
        },
        "data": {
            "train": manifests,
            "spacing_mm": list(p.target_spacing()),
            "window_hu": list(p.hu_window),
            "crop_foreground": p.crop_foreground,
            "patch_size": list(cfg.patch_size or spec.inference.patch_size),
            "samples_per_case": cfg.samples_per_case,
            "pos_neg_ratio": [cfg.foreground, 1.0 - cfg.foreground],
        },
        "loss": {"dice_on_empty": False},
        "optim": {"lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "grad_clip": 12.0},
        "train": {
            "steps": cfg.steps,
            "time_budget_s": cfg.time_budget_s,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "ckpt_every": 0,
            "out_dir": str(work / "run"),
            "device": cfg.device,
            "resume": False,
            "progress": False,
            "tensorboard": False,
        },
    }


def _phantom_manifest(work: Path, spacing: Sequence[float], n: int) -> str:
    """``n`` phantom cases on the weights' grid (the anatomy's 192×192×144 mm field of view), every drawn class
    annotated."""
    from universal.data import write_phantom_dataset

    shape = tuple(max(16, int(round(fov / s))) for fov, s in zip((192.0, 192.0, 144.0), spacing))
    return str(write_phantom_dataset(work / "phantom", n, shape, tuple(spacing), {"phantom": None}, seed=100))


def finetune(
    dataset: str | os.PathLike,
    weights: str | os.PathLike = "builtin",
    out: str | os.PathLike = "finetuned.pt",
    config: FinetuneConfig | None = None,
    *,
    clock: Callable[[], float] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    stop: Any = None,
) -> FinetuneResult:
    """Fine-tune ``weights`` on the corrected cases of ``dataset`` and write ``out`` and its model card.

    Args:
        dataset: A corrections dataset folder (or its ``manifest.json``).
        weights: ``"builtin"``, a pretrained name or a universal checkpoint path.
        out: The new model's ``.pt`` path (its card: the same path with ``.md``).
        config: A :class:`FinetuneConfig` (default: its defaults).
        clock: Monotonic seconds (default :func:`time.perf_counter`); the training's time budget and the
            reported seconds read it, so tests can run on a fake clock.
        progress: Called after each step with ``(step, total steps, loss)``.
        stop: An object with ``is_set()`` (a :class:`threading.Event`): stops before the next step; nothing is
            written then.

    Raises:
        InputError: no dataset, classes the weights lack, a bad output path, bad settings.
        CheckpointError: weights that cannot be read.
    """
    from universal.model import load_pretrained, save_checkpoint

    cfg = config or FinetuneConfig()
    clock = clock or time.perf_counter
    started = clock()
    manifest, out = _dataset_manifest(dataset), _check_out(out)
    source = load_pretrained(weights)
    n_cases, classes = _corrected_classes(manifest, source.spec.classes)
    facts = {"weights": _weights_label(weights), "cases": n_cases, "classes": classes, "losses": []}
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.finetune.", dir=out.parent))
    try:
        result = _train_in(work, source, manifest, cfg, facts["losses"], clock, progress, stop)
        if stop is not None and stop.is_set() and result.step < cfg.steps:
            return _stopped(result.step, cfg, facts, clock() - started)
        model = result.model.cpu()
        model.preprocessing, model.inference_defaults = source.spec.preprocessing, source.spec.inference
        model.provenance = _provenance(model.provenance, facts, cfg)
        patch = list(cfg.patch_size or source.spec.inference.patch_size)
        settings = {**dataclasses.asdict(cfg), "patch_size": patch}
        extra = {"finetune": {**facts, "classes": list(classes), "settings": settings}}
        checkpoint = save_checkpoint(model, out, extra=extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = clock() - started
    card = _write_card(out, model, facts, cfg, result.step, seconds)
    return _finished(
        checkpoint, card, result.step, cfg, facts, float(model.provenance.train_seconds or 0), seconds
    )


def _finished(
    checkpoint: Path, card: Path, step: int, cfg: FinetuneConfig, facts: dict, train_s: float, seconds: float
):
    """The result of a completed fine-tune, with its summary line."""
    classes = facts["classes"]
    message = (
        f"fine-tuned {facts['weights']} on {facts['cases']} case(s) ({', '.join(classes)}) for {step} steps "
        f"in {seconds:.0f} s: {checkpoint}"
    )
    return FinetuneResult(
        checkpoint,
        card,
        step,
        cfg.steps,
        facts["cases"],
        classes,
        train_s,
        seconds,
        False,
        facts["losses"],
        message,
    )


def _train_in(
    work: Path, source: Any, manifest: Path, cfg: FinetuneConfig, losses: list, clock, progress, stop
):
    """:func:`universal.train.train` in the work folder, from ``source``'s weights; ``losses`` collects the loss
    of every step (and ``progress`` hears of it)."""
    from universal.model import save_checkpoint
    from universal.train import train

    spec = source.spec
    init = save_checkpoint(source, work / "init.pt")
    if cfg.anchor:
        from universal.predictor import Predictor
        from universal.pseudo import pseudo_label

        teacher = Predictor(source, device=cfg.device, return_probabilities=True)
        manifest, _ = pseudo_label(manifest, teacher, work / "anchor")
    manifests = [str(manifest)]
    if cfg.mix_phantom:
        manifests.append(_phantom_manifest(work, spec.preprocessing.target_spacing(), cfg.mix_phantom))

    def on_step(step: int, total: int, loss: float) -> None:
        losses.append(float(loss))
        if progress is not None:
            progress(step, total, loss)

    return train(_train_config(spec, init, manifests, work, cfg), clock=clock, on_step=on_step, stop=stop)


def _weights_label(weights: str | os.PathLike) -> str:
    path = Path(weights)
    return path.name if path.is_file() else str(weights)


def _stopped(step: int, cfg: FinetuneConfig, facts: dict, seconds: float) -> FinetuneResult:
    message = f"stopped after {step} of {cfg.steps} steps: nothing was written (the model is unchanged)"
    return FinetuneResult(
        None,
        None,
        step,
        cfg.steps,
        facts["cases"],
        facts["classes"],
        0.0,
        seconds,
        True,
        facts["losses"],
        message,
    )


def _provenance(trained: Any, facts: dict, cfg: FinetuneConfig) -> Any:
    """The new model's provenance: the training run's steps and seconds, and where it came from."""
    from universal.corrections import DATASET_KEY

    notes = (
        f"fine-tuned from {facts['weights']} on {facts['cases']} corrected case(s); classes: "
        f"{', '.join(facts['classes'])}"
        + (f"; {cfg.mix_phantom} phantom case(s) mixed in" if cfg.mix_phantom else "")
        + ("; the other classes anchored on the source's own predictions" if cfg.anchor else "")
    )
    datasets = (DATASET_KEY, *(("phantom",) if cfg.mix_phantom else ()))
    return dataclasses.replace(trained, datasets=datasets, notes=notes)


def model_card(model: Any, facts: dict, cfg: FinetuneConfig, steps: int, seconds: float) -> str:
    """The short Markdown card of a fine-tuned model (cases, classes, steps, time, how to use it)."""
    p = model.provenance
    loss = facts["losses"]
    trend = f"{loss[0]:.4f} → {loss[-1]:.4f}" if loss else "–"
    return "\n".join(
        [
            f"# Model card: fine-tuned from `{facts['weights']}`",
            "",
            "**Not for clinical use.** Fine-tuned with masked back-propagation on corrected cases: only the classes",
            "below had labels, every other class got no gradient (it can still change, through the shared network).",
            "",
            "| | |",
            "|---|---|",
            f"| source weights | `{facts['weights']}` ({model.backbone_name}, {len(model.class_names)} classes) |",
            f"| corrected cases | {facts['cases']} |",
            f"| classes fine-tuned | {', '.join(facts['classes'])} |",
            f"| mixed-in phantom cases | {cfg.mix_phantom} |",
            f"| other classes anchored on the source's predictions | {'yes' if cfg.anchor else 'no'} |",
            f"| steps | {steps} of {cfg.steps} (batch {cfg.batch_size}, patch "
            f"{'×'.join(map(str, cfg.patch_size or model.inference_defaults.patch_size))}, "
            f"lr {cfg.lr:g}) |",
            f"| time | {float(p.train_seconds or 0):.1f} s of training, {seconds:.1f} s in all |",
            f"| training loss | {trend} (first → last step) |",
            f"| grid | {model.preprocessing.spacing_mm} mm, HU {model.preprocessing.hu_window}, "
            f"window {model.inference_defaults.patch_size} (the source's) |",
            "",
            "Measure it on scans it has not seen before trusting it (`bench/finetune.py` shows how).",
            "",
        ]
    )


def _write_card(out: Path, model: Any, facts: dict, cfg: FinetuneConfig, steps: int, seconds: float) -> Path:
    from universal.io import atomic_write_text

    return atomic_write_text(out.with_suffix(".md"), model_card(model, facts, cfg, steps, seconds))
