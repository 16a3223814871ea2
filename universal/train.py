"""Training of the Universal Model on partially labeled datasets (masked back-propagation).

``train(config)`` runs the whole loop: manifests → cached preprocessed cases → positive/negative-balanced random
patches with light augmentation → model → masked BCE + Dice (only the (case, class) pairs a case's dataset annotates
contribute gradient) → AdamW or NovoGrad with linear warm-up and cosine decay → checkpoints that resume exactly →
CSV (and, when installed, TensorBoard) logs with validation DSC per class. The same function runs under ``torchrun``
with DistributedDataParallel (NCCL on GPUs, gloo on CPUs; detected from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``):
every rank draws its own share of each step's patches, and only rank 0 writes files.

Config (YAML or TOML; relative paths are relative to the config file's folder; every key has a default except
``data.train``)::

    model:
      backbone: segresnet        # a name from universal.model.list_models()
      classes: null              # universal class names; null = all 32
      encoder: minilm            # text encoder (minilm, clip, table:FILE, onehot, auto)
      template: ct               # prompt template key or text with {}
      kwargs: {}                 # backbone arguments, e.g. {init_filters: 8}
      init: null                 # checkpoint whose weights start the run (fine-tuning)
    data:
      train: train.json          # manifest (or a list of manifests) of labeled cases
      val: null                  # manifest of held-out labeled cases for validation DSC
      spacing_mm: 1.5            # training grid (one number or three); recorded in the checkpoint
      window_hu: [-175, 250]     # HU window → [0, 1]; recorded in the checkpoint
      crop_foreground: true      # crop to the body like inference does
      patch_size: [96, 96, 96]   # multiple of the backbone's size divisor
      samples_per_case: 2        # consecutive patches from one case visit
      pos_neg_ratio: [1, 1]      # foreground- vs background-centred patches
      cache: true                # keep preprocessed cases in memory (false: re-read per visit)
      validate_labels: true      # read every label file before training and check its values
      augment: {flip_lr: 0.0, flip_ap: 0.0, flip_si: 0.0, intensity_prob: 0.5,
                intensity_scale: 0.1, intensity_shift: 0.1}
      phantom: null              # {n_cases, shape, spacing, label_sets, seed, unlabeled, val_cases}: write a
                                 # synthetic dataset at data.train (and data.val) when the manifest is missing
    loss:
      dice_weight: 1.0
      bce_weight: 1.0
      dice_on_empty: true        # false: Dice only over annotated pairs with a non-empty target (BCE over all)
    optim:
      name: adamw                # adamw | novograd
      lr: 1.0e-4
      weight_decay: 1.0e-5
      betas: [0.9, 0.999]
      warmup_steps: 100          # linear warm-up from 0, then cosine decay to min_lr_ratio * lr
      min_lr_ratio: 0.0
      grad_clip: null            # max gradient norm, or null
    train:
      steps: 1000
      time_budget_s: null        # wall-clock budget of the training loop (seconds): the schedule follows
                                 # max(step / steps, elapsed / budget) and the run ends when either is used up
      batch_size: 2              # per rank
      amp: auto                  # auto (= on CUDA only) | true | false
      amp_dtype: float16         # float16 | bfloat16
      seed: 0
      val_every: 0               # steps between validations (0: only at the end, when data.val is set)
      ckpt_every: 500            # steps between checkpoints (0: only at the end)
      log_every: 1               # steps between CSV log rows
      out_dir: runs/universal
      device: null               # null = cuda if available else cpu
      num_workers: 0             # DataLoader worker processes
      resume: auto               # auto (resume from out_dir if a checkpoint is there) | true | false | path
      deterministic: true        # torch.use_deterministic_algorithms (warn only)
      progress: true             # tqdm progress bar
      tensorboard: auto          # auto (when importable) | true | false
      find_unused_parameters: false
    synthesis:
      hook: null                 # "package.module:function" or a name registered with register_synthesis
      prob: 1.0                  # probability of applying it to a patch
      kwargs: {}

Outputs in ``out_dir``: ``model.pt`` (the final model: classes, encoder, template and preprocessing ride along, so
``universal segment --weights model.pt`` needs nothing else), ``checkpoints/last.pt`` + ``checkpoints/last.state.pt``
(optimizer, scheduler, AMP scaler, step and RNG states), ``train_log.csv``, ``val_log.csv``, ``config.json``.

Resume equals uninterrupted training: every patch is a pure function of ``(seed, sample index)``, the schedule of
the step, and the checkpoint restores the optimizer, scheduler, scaler and RNG states.
"""

from __future__ import annotations

import copy
import csv
import importlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from universal.errors import CheckpointError, InputError

__all__ = [
    "DEFAULT_CONFIG",
    "TrainResult",
    "load_config",
    "lr_factor",
    "register_synthesis",
    "resolve_config",
    "train",
    "validate_prepared",
]

DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "model": {
        "backbone": "segresnet",
        "classes": None,
        "encoder": "minilm",
        "template": "ct",
        "kwargs": {},
        "init": None,
    },
    "data": {
        "train": None,
        "val": None,
        "spacing_mm": 1.5,
        "window_hu": [-175.0, 250.0],
        "crop_foreground": True,
        "patch_size": [96, 96, 96],
        "samples_per_case": 2,
        "pos_neg_ratio": [1.0, 1.0],
        "cache": True,
        "validate_labels": True,
        "augment": {},
        "phantom": None,
    },
    "loss": {"dice_weight": 1.0, "bce_weight": 1.0, "dice_on_empty": True},
    "optim": {
        "name": "adamw",
        "lr": 1e-4,
        "weight_decay": 1e-5,
        "betas": [0.9, 0.999],
        "warmup_steps": 100,
        "min_lr_ratio": 0.0,
        "grad_clip": None,
    },
    "train": {
        "steps": 1000,
        "time_budget_s": None,
        "batch_size": 2,
        "amp": "auto",
        "amp_dtype": "float16",
        "seed": 0,
        "val_every": 0,
        "ckpt_every": 500,
        "log_every": 1,
        "out_dir": "runs/universal",
        "device": None,
        "num_workers": 0,
        "resume": "auto",
        "deterministic": True,
        "progress": True,
        "tensorboard": "auto",
        "find_unused_parameters": False,
    },
    "synthesis": {"hook": None, "prob": 1.0, "kwargs": {}},
}

# config keys holding paths (resolved relative to the config file by load_config)
_PATH_KEYS = (
    ("data", "train"),
    ("data", "val"),
    ("train", "out_dir"),
    ("train", "resume"),
    ("model", "init"),
)


# ------------------------------------------------------------------------------------------------------- config
def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) training config.

    Relative paths (``data.train``, ``data.val``, ``train.out_dir``, ``train.resume``, ``model.init``, and
    ``model.encoder`` of the form ``table:FILE``) become absolute, relative to the config file's folder. The
    result is the raw dict (defaults are filled in by :func:`train`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {path} does not exist: give the path of a .yaml or .toml training config")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise InputError(
            f"config {path} cannot be parsed ({type(exc).__name__}: {exc}); fix its syntax"
        ) from exc
    if not isinstance(data, dict):
        raise InputError(f"config {path} must be a mapping of sections (model, data, optim, train, ...)")
    root = path.resolve().parent
    for section, key in _PATH_KEYS:
        sec = data.get(section)
        if not isinstance(sec, dict) or sec.get(key) in (None, ""):
            continue
        value = sec[key]
        if (
            section == "train"
            and key == "resume"
            and (isinstance(value, bool) or str(value).lower() in ("auto", "true", "false", "none"))
        ):
            continue
        if isinstance(value, list):
            sec[key] = [_abspath(root, v) for v in value]
        else:
            sec[key] = _abspath(root, value)
    enc = (data.get("model") or {}).get("encoder")
    if isinstance(enc, str) and enc.startswith("table:"):
        data["model"]["encoder"] = "table:" + _abspath(root, enc[len("table:") :])
    return data


def _abspath(root: Path, value: Any) -> str:
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else (root / p).resolve())


def resolve_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The full config: ``config`` (a dict or a config file) over :data:`DEFAULT_CONFIG`, checked.

    Raises:
        InputError: unknown sections or keys (listing the valid ones), a missing ``data.train``, bad values.
    """
    if not isinstance(config, Mapping):
        config = load_config(config)
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    problems = []
    for section, values in config.items():
        if section not in cfg:
            problems.append(f"unknown section {section!r} (valid: {', '.join(cfg)})")
            continue
        if values is None:
            continue
        if not isinstance(values, Mapping):
            problems.append(f"section {section!r} must be a mapping of keys")
            continue
        for key, value in values.items():
            if key not in cfg[section]:
                problems.append(f"unknown key {section}.{key} (valid: {', '.join(cfg[section])})")
            else:
                cfg[section][key] = copy.deepcopy(value)
    d, t, o = cfg["data"], cfg["train"], cfg["optim"]
    if not d["train"]:
        problems.append("data.train is required: the manifest of labeled training cases")
    if str(o["name"]).lower() not in ("adamw", "novograd"):
        problems.append(f"optim.name {o['name']!r} is not supported (adamw or novograd)")
    ps = d["patch_size"]
    ps = [int(ps)] * 3 if isinstance(ps, (int, float)) else [int(v) for v in ps]
    if len(ps) != 3 or min(ps) < 1:
        problems.append(f"data.patch_size {d['patch_size']!r} must be one positive integer or three")
    d["patch_size"] = ps
    sp = d["spacing_mm"]
    d["spacing_mm"] = [float(sp)] * 3 if isinstance(sp, (int, float)) else [float(v) for v in sp]
    if len(d["spacing_mm"]) != 3 or min(d["spacing_mm"]) <= 0:
        problems.append(f"data.spacing_mm {sp!r} must be one positive number or three")
    d["window_hu"] = [float(v) for v in d["window_hu"]]
    if len(d["window_hu"]) != 2 or not d["window_hu"][1] > d["window_hu"][0]:
        problems.append(f"data.window_hu {d['window_hu']!r} must be [low, high] with high > low")
    for key in ("steps", "batch_size"):
        if int(t[key]) < 1:
            problems.append(f"train.{key} must be at least 1")
    if t["time_budget_s"] is not None:
        try:
            t["time_budget_s"] = float(t["time_budget_s"])
            if not t["time_budget_s"] > 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"train.time_budget_s {t['time_budget_s']!r} must be a positive number of seconds or null")
    if str(t["amp"]).lower() not in ("auto", "true", "false") and not isinstance(t["amp"], bool):
        problems.append(f"train.amp {t['amp']!r} must be auto, true or false")
    if str(t["amp_dtype"]) not in ("float16", "bfloat16"):
        problems.append(f"train.amp_dtype {t['amp_dtype']!r} must be float16 or bfloat16")
    try:
        from universal.data import AugmentConfig

        AugmentConfig.from_dict(d["augment"])
    except InputError as exc:
        problems.append(f"data.augment: {exc}")
    if problems:
        raise InputError("training config has problem(s):\n  - " + "\n  - ".join(problems))
    return cfg


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: The trained :class:`~universal.model.UniversalModel` (unwrapped from DDP, on its device).
        checkpoint: The model checkpoint written last (``out_dir/model.pt`` after a complete run,
            ``checkpoints/last.pt`` when stopped early).
        out_dir: The run folder.
        step: Steps done.
        history: One dict per logged step: ``step``, ``loss``, ``lr``.
        validation: One dict per validation: ``step``, ``mean_dsc``, ``dsc`` (class → DSC or NaN).
        resumed_from: The step the run resumed from (``None`` for a fresh run).
    """

    model: Any
    checkpoint: Path | None
    out_dir: Path
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------- synthesis hooks
_SYNTHESIS: dict[str, Callable[..., Any]] = {}


def register_synthesis(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a synthesis hook by name (for ``synthesis.hook`` in configs).

    A hook is ``fn(image (1,X,Y,Z) float32, target (K,X,Y,Z) bool, available (K,) bool, *, classes, rng, **kwargs)
    -> (image, target, available)``; it may draw a synthetic tumour and mark its class available.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _SYNTHESIS[name] = fn
        return fn

    return deco


def _synthesis_hook(cfg: Mapping[str, Any]) -> Callable[..., Any] | None:
    spec = cfg.get("hook")
    if not spec:
        return None
    if spec in _SYNTHESIS:
        fn = _SYNTHESIS[spec]
    elif ":" in str(spec):
        module, _, attr = str(spec).partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InputError(
                f"synthesis.hook {spec!r} cannot be imported ({exc}); give 'package.module:function'"
            ) from exc
    else:
        raise InputError(
            f"synthesis.hook {spec!r} is neither registered ({', '.join(_SYNTHESIS) or 'none'}) nor 'module:function'"
        )
    return _ProbHook(fn, float(cfg.get("prob", 1.0)), dict(cfg.get("kwargs") or {}))


class _ProbHook:
    """Apply ``fn`` with probability ``prob`` (a picklable object, for DataLoader workers)."""

    def __init__(self, fn: Callable[..., Any], prob: float, kwargs: dict[str, Any]) -> None:
        self.fn, self.prob, self.kwargs = fn, prob, kwargs

    def __call__(self, image, target, available, *, classes, rng):
        if rng.random() >= self.prob:
            return image, target, available
        return self.fn(image, target, available, classes=classes, rng=rng, **self.kwargs)


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_hint: str | None) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, False)
        use_cuda = torch.cuda.is_available() and (device_hint is None or str(device_hint).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(rank, world, local_rank, True)

    def close(self) -> None:
        if self.initialized_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def mean(self, value: float, device: Any) -> float:
        if self.world <= 1:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world


def _pick_device(spec: str | None, d: _Dist):
    import torch

    if spec in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"train.device {spec!r} asks for CUDA but no GPU is available; use cpu or leave it empty"
            )
        if d.world > 1 and dev.index is None:
            dev = torch.device("cuda", d.local_rank)
    return dev


# ----------------------------------------------------------------------------------------------- optimisation
def _make_optimizer(params, o: Mapping[str, Any]):
    import torch

    name = str(o["name"]).lower()
    lr, wd = float(o["lr"]), float(o["weight_decay"])
    betas = tuple(float(b) for b in o["betas"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)
    from monai.optimizers import Novograd

    return Novograd(params, lr=lr, weight_decay=wd, betas=betas)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of step ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine
    decay from 1 to ``min_ratio`` over the remaining steps.

    >>> [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    return _warmup_cosine(step, total, warmup, min_ratio)


class _Schedule:
    """Picklable LambdaLR function (warm-up + cosine)."""

    def __init__(self, total: int, warmup: int, min_ratio: float) -> None:
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return _warmup_cosine(step, self.total, self.warmup, self.min_ratio)


def _warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- model building
def _build_model(cfg: dict[str, Any]):
    from universal.model import create_model

    m, d = cfg["model"], cfg["data"]
    preprocessing = {
        "orientation": "RAS",
        "spacing": list(d["spacing_mm"]),
        "window": list(d["window_hu"]),
        # the sliding-window size the model was trained with (its global feature pools over one window)
        "patch_size": [int(p) for p in d["patch_size"]],
    }
    model = create_model(
        m["backbone"],
        classes=m["classes"],
        encoder=m["encoder"],
        template=m["template"],
        preprocessing=preprocessing,
        **dict(m["kwargs"] or {}),
    )
    if m["init"]:
        _init_from(model, Path(m["init"]))
    return model


def _init_from(model, path: Path) -> None:
    """Start from another checkpoint's weights (same backbone); the prompt embeddings stay this model's."""
    from universal.model import load_checkpoint

    src = load_checkpoint(path)
    state = {k: v for k, v in src.state_dict().items() if k != "organ_embedding"}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"model.init {path} does not fit this architecture (e.g. {bad[:3]}); use the same backbone"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "organ_embedding"]
    if missing or unexpected:
        raise CheckpointError(
            f"model.init {path} does not fit this architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


# --------------------------------------------------------------------------------------------------- checkpoints
def _state_path(ckpt: Path) -> Path:
    name = ckpt.name[:-3] if ckpt.name.endswith(".pt") else ckpt.name
    return ckpt.with_name(name + ".state.pt")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    from universal.io import atomic_write

    atomic_write(path, lambda fh: torch.save(obj, fh))


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _save_training_checkpoint(
    path: Path, model, optimizer, scheduler, scaler, step: int, cfg: dict[str, Any], elapsed_s: float = 0.0
) -> None:
    from universal.model import save_checkpoint

    state = {
        "step": step,
        "elapsed_s": float(elapsed_s),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
        "config": json.loads(json.dumps(cfg)),
    }
    # state first, model second: a model file always has a matching (or newer) state beside it
    _atomic_torch_save(state, _state_path(path))
    save_checkpoint(model, path, extra={"training": _train_info(cfg, step, elapsed_s)})


def _train_info(cfg: dict[str, Any], step: int, elapsed_s: float = 0.0) -> dict[str, Any]:
    """Plain facts about the run stored in checkpoints (``patch_size`` is the sliding-window size to use)."""
    return {
        "step": int(step),
        "steps": int(cfg["train"]["steps"]),
        "time_budget_s": cfg["train"]["time_budget_s"],
        "train_seconds": round(float(elapsed_s), 1),
        "patch_size": [int(p) for p in cfg["data"]["patch_size"]],
        "spacing_mm": [float(s) for s in cfg["data"]["spacing_mm"]],
        "optimizer": str(cfg["optim"]["name"]),
        "seed": int(cfg["train"]["seed"]),
    }


def _load_training_state(path: Path) -> dict[str, Any]:
    import torch

    sp = _state_path(path)
    if not sp.is_file():
        raise CheckpointError(f"cannot resume from {path}: its training state {sp.name} is missing beside it")
    try:
        return torch.load(sp, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot resume: training state {sp} is unreadable ({exc})") from exc


def _resume_path(cfg: dict[str, Any], out_dir: Path) -> Path | None:
    r = cfg["train"]["resume"]
    last = out_dir / "checkpoints" / "last.pt"
    if r is None or r is False or str(r).lower() in ("false", "none", ""):
        return None
    if r is True or str(r).lower() == "true":
        if not last.is_file():
            raise CheckpointError(
                f"train.resume is true but {last} does not exist; set resume: auto or false"
            )
        return last
    if str(r).lower() == "auto":
        return last if last.is_file() else None
    p = Path(r)
    if not p.is_file():
        raise CheckpointError(f"train.resume: checkpoint {p} does not exist")
    return p


# -------------------------------------------------------------------------------------------------------- logging
class _CsvLog:
    """Append-only CSV log that is truncated to the resume step when a run resumes."""

    def __init__(self, path: Path, fields: list[str], resume_step: int | None) -> None:
        self.path, self.fields = path, fields
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r.get("step", 0))) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: Mapping[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def _tensorboard(setting: Any, out_dir: Path):
    if setting is False or str(setting).lower() == "false":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        if setting is True or str(setting).lower() == "true":
            warnings.warn(
                "train.tensorboard is true but tensorboard is not installed; logging to CSV only",
                stacklevel=3,
            )
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


# ------------------------------------------------------------------------------------------------------ validation
def validate_prepared(
    model,
    cases: Sequence[Any],
    patch_size: Sequence[int],
    device=None,
    amp: bool = False,
    overlap: float = 0.25,
) -> dict[str, float]:
    """Mean DSC per class over ``cases`` (:class:`~universal.data.PreparedCase`, on the training grid).

    Sliding-window logits (MONAI ``sliding_window_inference``, window = ``patch_size``) thresholded at 0; only cases
    whose availability includes a class count for it (NaN when none does). Both masks empty counts as DSC 1.
    """
    import torch
    from monai.inferers import sliding_window_inference

    names = list(model.class_names)
    device = device or next(model.parameters()).device
    sums = np.zeros(len(names))
    counts = np.zeros(len(names))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for case in cases:
                x = torch.from_numpy(case.image[None]).to(device)
                with torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
                    logits = sliding_window_inference(
                        x,
                        roi_size=tuple(patch_size),
                        sw_batch_size=2,
                        predictor=model,
                        overlap=overlap,
                        mode="gaussian",
                    )
                pred = (logits[0] > 0).flatten(1)
                gt = torch.from_numpy(case.target).to(device).flatten(1)
                inter = (pred & gt).sum(1).double()
                total = (pred.sum(1) + gt.sum(1)).double()
                dsc = (
                    torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
                    .cpu()
                    .numpy()
                )
                avail = np.asarray(case.available, dtype=bool)
                sums[avail] += dsc[avail]
                counts[avail] += 1
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {n: float(v) for n, v in zip(names, mean)}


# ---------------------------------------------------------------------------------------------------------- train
def _ensure_phantom(d: dict[str, Any], dist_ctx: _Dist) -> None:
    """``data.phantom``: write the synthetic dataset at ``data.train`` when that manifest does not exist yet."""
    from universal.data import write_phantom_dataset

    spec = dict(d["phantom"])
    allowed = {"n_cases", "shape", "spacing", "label_sets", "seed", "unlabeled", "val_cases"}
    unknown = set(spec) - allowed
    if unknown:
        raise InputError(
            f"data.phantom: unknown keys {sorted(unknown)} (valid: {', '.join(sorted(allowed))})"
        )
    val_cases = int(spec.pop("val_cases", 0))
    target = Path(d["train"] if isinstance(d["train"], (str, os.PathLike)) else d["train"][0])
    if dist_ctx.main and not target.is_file():
        write_phantom_dataset(target.parent, manifest_name=target.name, **spec)
    if (
        dist_ctx.main
        and val_cases
        and isinstance(d["val"], (str, os.PathLike))
        and not Path(d["val"]).is_file()
    ):
        val = Path(d["val"])
        # held-out cases: other seeds, every class the phantom draws annotated
        write_phantom_dataset(
            val.parent,
            n_cases=val_cases,
            shape=spec.get("shape", (64, 64, 48)),
            spacing=spec.get("spacing", (3.0, 3.0, 3.0)),
            label_sets={"phantom_val": None},
            seed=int(spec.get("seed", 0)) + 10_000,
            manifest_name=val.name,
        )
    if dist_ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


class _StepSampler:
    """Indices of this rank's samples for steps ``start..stop-1``: step s, rank r → ``(s * world + r) * B + j``."""

    def __init__(self, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.stop):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch


class _LazyCases:
    """Uncached cases (``data.cache: false``): prepared on access; only the last one is kept, so the
    ``samples_per_case`` consecutive samples of one case visit read it once."""

    def __init__(self, cases, kwargs) -> None:
        self.cases, self.kwargs = list(cases), kwargs
        self._last: tuple[int, Any] | None = None

    def __call__(self, i: int):
        from universal.data import prepare_case

        if self._last is None or self._last[0] != i:
            self._last = (i, prepare_case(self.cases[i], **self.kwargs))
        return self._last[1]


def _load_cases(paths: Any, classes: list[str], validate_labels: bool, main: bool, what: str):
    from universal.data import load_manifest, validate_manifest

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    cases = []
    for p in paths:
        manifest = load_manifest(p)
        validate_manifest(
            manifest, read_labels=validate_labels, classes=classes, require_labels=False, strict=True
        )
        labeled = [c for c in manifest.cases if c.labeled]
        if main and len(labeled) < len(manifest.cases):
            warnings.warn(
                f"{what} manifest {p}: {len(manifest.cases) - len(labeled)} unlabeled case(s) skipped "
                "(pseudo-label them first with universal.pseudo)",
                stacklevel=3,
            )
        cases.extend(labeled)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InputError(
            f"{what} manifests list case names more than once: {dup[:5]}; give each case a unique name"
        )
    if not cases:
        raise InputError(f"the {what} manifest(s) {list(map(str, paths))} list no labeled case")
    return cases


def train(config: Mapping[str, Any] | str | os.PathLike, *, stop_after: int | None = None) -> TrainResult:
    """Train a Universal Model as ``config`` says (a dict or a YAML/TOML file; see the module docstring).

    Args:
        config: The config (missing keys take :data:`DEFAULT_CONFIG`).
        stop_after: Stop after this many total steps (a checkpoint is written), as if interrupted; the schedule
            still follows ``train.steps``, so resuming later continues exactly.

    Returns:
        A :class:`TrainResult`.
    """
    import torch

    cfg = resolve_config(config)
    t = cfg["train"]
    dist_ctx = _Dist.from_env(t["device"])
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_bench = torch.backends.cudnn.benchmark
    try:
        if t["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:  # fixed patch size: let cuDNN pick its fastest convolutions once
            torch.backends.cudnn.benchmark = True
        return _train(cfg, dist_ctx, stop_after)
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.backends.cudnn.benchmark = previous_bench
        dist_ctx.close()


def _train(cfg: dict[str, Any], dist_ctx: _Dist, stop_after: int | None) -> TrainResult:
    import torch
    from tqdm.auto import tqdm

    from universal.data import AugmentConfig, PatchDataset, prepare_case
    from universal.loss import masked_bce_dice
    from universal.model import save_checkpoint

    t, d, o = cfg["train"], cfg["data"], cfg["optim"]
    main = dist_ctx.main
    device = _pick_device(t["device"], dist_ctx)
    out_dir = Path(t["out_dir"])
    total_steps = int(t["steps"])
    end_step = total_steps if stop_after is None else max(0, min(total_steps, int(stop_after)))
    amp = (device.type == "cuda") if str(t["amp"]).lower() == "auto" else (str(t["amp"]).lower() == "true")
    if amp and device.type != "cuda":
        warnings.warn("train.amp is only used on CUDA; training in float32 on the CPU", stacklevel=3)
        amp = False
    amp_dtype = getattr(torch, t["amp_dtype"])

    # ---- model (same seed on every rank; DDP also broadcasts rank 0's weights)
    torch.manual_seed(int(t["seed"]))
    model = _build_model(cfg)
    classes = list(model.class_names)
    div = model.size_divisor
    if any(p % div for p in d["patch_size"]):
        raise InputError(
            f"data.patch_size {d['patch_size']} must be a multiple of {div} for the {model.backbone_name} backbone"
        )

    # ---- data
    if d["phantom"]:
        _ensure_phantom(d, dist_ctx)
    train_cases = _load_cases(d["train"], classes, bool(d["validate_labels"]), main, "training")
    val_cases = (
        _load_cases(d["val"], classes, bool(d["validate_labels"]), main, "validation") if d["val"] else []
    )
    prep_kwargs = {
        "classes": classes,
        "spacing": d["spacing_mm"],
        "window_hu": d["window_hu"],
        "crop_foreground": bool(d["crop_foreground"]),
    }
    show = main and bool(t["progress"])
    if d["cache"]:
        prepared: Any = [
            prepare_case(c, **prep_kwargs) for c in tqdm(train_cases, desc="caching", disable=not show)
        ]
        n_cases = None
    else:
        prepared, n_cases = _LazyCases(train_cases, prep_kwargs), len(train_cases)
    val_prepared = [prepare_case(c, **prep_kwargs) for c in val_cases] if main else []
    dataset = PatchDataset(
        prepared,
        d["patch_size"],
        classes=classes,
        samples_per_case=int(d["samples_per_case"]),
        pos_neg_ratio=d["pos_neg_ratio"],
        augment=AugmentConfig.from_dict(d["augment"]),
        seed=int(t["seed"]),
        synthesis=_synthesis_hook(cfg["synthesis"]),
        n_cases=n_cases,
    )

    # ---- optimisation
    model.to(device)
    optimizer = _make_optimizer(model.parameters(), o)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Schedule(total_steps, int(o["warmup_steps"]), float(o["min_lr_ratio"]))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    # ---- resume
    start_step, resumed_from, prior_elapsed = 0, None, 0.0
    resume = _resume_path(cfg, out_dir)
    if resume is not None:
        from universal.model import load_checkpoint

        state = _load_training_state(resume)
        saved = load_checkpoint(resume, map_location="cpu")
        if list(saved.class_names) != classes:
            raise CheckpointError(
                f"cannot resume from {resume}: it predicts {saved.class_names}, the config {classes}"
            )
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_step = resumed_from = int(state["step"])
        prior_elapsed = float(state.get("elapsed_s", 0.0))
        del saved

    train_model: Any = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(t["find_unused_parameters"]),
        )

    # ---- logs (rank 0 only)
    train_log = val_log = writer = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
        train_log = _CsvLog(
            out_dir / "train_log.csv", ["step", "loss", "lr", "seconds", "pairs"], resumed_from
        )
        val_log = _CsvLog(out_dir / "val_log.csv", ["step", "mean_dsc", *classes], resumed_from)
        writer = _tensorboard(t["tensorboard"], out_dir)

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=int(t["batch_size"]),
        sampler=_StepSampler(start_step, end_step, int(t["batch_size"]), dist_ctx.rank, dist_ctx.world),
        num_workers=int(t["num_workers"]),
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    loss_kw = {
        "dice_weight": float(cfg["loss"]["dice_weight"]),
        "bce_weight": float(cfg["loss"]["bce_weight"]),
        "dice_on_empty": bool(cfg["loss"]["dice_on_empty"]),
    }
    grad_clip = o["grad_clip"]
    history: list[dict[str, float]] = []
    validation: list[dict[str, Any]] = []
    val_every, ckpt_every, log_every = int(t["val_every"]), int(t["ckpt_every"]), max(1, int(t["log_every"]))
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not show, dynamic_ncols=True)

    def run_validation(step: int) -> None:
        if not (main and val_prepared):
            return
        dsc = validate_prepared(model, val_prepared, d["patch_size"], device=device, amp=amp)
        finite = [v for v in dsc.values() if not math.isnan(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        validation.append({"step": step, "mean_dsc": mean, "dsc": dsc})
        val_log.write({"step": step, "mean_dsc": mean, **dsc})
        if writer is not None:
            writer.add_scalar("val/mean_dsc", mean, step)
            for n, v in dsc.items():
                if not math.isnan(v):
                    writer.add_scalar(f"val_dsc/{n}", v, step)
        bar.set_postfix_str(f"val DSC {mean:.3f}")

    budget = t["time_budget_s"]
    loop_start = time.perf_counter()

    def elapsed_s() -> float:
        return prior_elapsed + (time.perf_counter() - loop_start)

    def schedule_position(step: int) -> int:
        """Where the schedule stands after ``step`` steps: the step, or further along when the time budget runs
        out faster (averaged over ranks, so every rank follows the same schedule)."""
        if budget is None:
            return step
        return int(dist_ctx.mean(float(max(step, int(elapsed_s() / budget * total_steps))), device))

    model.train()
    step = start_step
    out_of_time = budget is not None and prior_elapsed >= budget  # a finished budgeted run resumed: nothing to do
    t0 = time.perf_counter()
    for batch in loader:
        if out_of_time:
            break
        image = batch["image"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True).float()
        available = batch["available"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
            logits = train_model(image)
        loss = masked_bce_dice(logits.float(), target, available, **loss_kw)
        if not loss.requires_grad:  # no available pair in this batch: keep DDP's graph, contribute zero
            loss = loss + logits.float().sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        scaler.step(optimizer)
        scaler.update()
        lr = float(optimizer.param_groups[0]["lr"])
        step += 1
        position = schedule_position(step)
        out_of_time = budget is not None and position >= total_steps
        scheduler.last_epoch = position - 1  # step() advances it to `position` and sets that position's lr
        scheduler.step()
        loss_value = dist_ctx.mean(float(loss.detach()), device)
        bar.update(1)
        if main:
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "seconds": elapsed,
                "pairs": int(available.sum()),
            }
            history.append({"step": step, "loss": loss_value, "lr": lr})
            if step % log_every == 0 or step == end_step or out_of_time:
                train_log.write(row)
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, step)
                    writer.add_scalar("train/lr", lr, step)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if val_every and step % val_every == 0 and step < total_steps:
            run_validation(step)
        if out_of_time:
            break
        if main and ckpt_every and step % ckpt_every == 0 and step < end_step:
            _save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, cfg, elapsed_s())
    bar.close()

    checkpoint: Path | None = None
    if step >= total_steps or out_of_time:
        run_validation(step)
        if main:
            spent = elapsed_s()
            _save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, cfg, spent)
            checkpoint = out_dir / "model.pt"
            save_checkpoint(model, checkpoint, extra={"training": _train_info(cfg, step, spent)})
    elif main:
        _save_training_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, step, cfg, elapsed_s())
        checkpoint = ckpt_path
    if writer is not None:
        writer.close()
    return TrainResult(model, checkpoint, out_dir, step, history, validation, resumed_from)
