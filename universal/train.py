"""Training of the Universal Model on partially labeled datasets (masked back-propagation).

``train(config)`` runs the whole loop: manifests → cached preprocessed cases → positive/negative-balanced random
patches with light augmentation → model → masked BCE + Dice (only the (case, class) pairs a case's dataset annotates
contribute gradient) → AdamW or NovoGrad with linear warm-up and cosine decay → checkpoints that resume exactly →
CSV (and, when installed, TensorBoard) logs with validation DSC per class. The same function runs under ``torchrun``
with DistributedDataParallel (NCCL on GPUs, gloo on CPUs; detected from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``):
every rank draws its own share of each step's patches, and only rank 0 writes files.

The config (a mapping, or a YAML/TOML file whose relative paths are relative to its folder) is a
:class:`TrainConfig` of six typed, frozen sections: :class:`ModelSection`, :class:`DataSection`,
:class:`LossSection`, :class:`OptimSection`, :class:`TrainSection`, :class:`SynthesisSection`. Each key declares its
default, what it allows and a one-line help in one schema (the fields below); ``docs/CONFIG.md`` is generated from
it (``python -m universal.train --doc``), and :func:`resolve_config` (also behind ``universal train --set``) checks
a whole config against it before any work, listing every problem with the key, the value and what is allowed::

    >>> resolve_config({"data": {"train": "train.json"}, "optim": {"lr": -1e-3}})
    Traceback (most recent call last):
    ...
    universal.errors.InputError: training config: optim.lr is -0.001; it must be a number > 0

Outputs in ``out_dir``: ``model.pt`` (the final model; its :class:`~universal.spec.ModelSpec` carries classes,
encoder, template, preprocessing, the training window and provenance, so ``universal segment --weights model.pt``
needs nothing else), ``checkpoints/last.pt`` + ``checkpoints/last.state.pt`` (optimizer, AMP scaler, step, schedule
position, elapsed time and RNG states), ``train_log.csv``, ``val_log.csv``, ``config.json`` (the resolved config).

Resume equals uninterrupted training: every patch is a pure function of ``(seed, sample index)``, the learning rate
a pure function of the schedule position (:func:`lr_factor`), and the checkpoint restores the optimizer, scaler and
RNG states.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
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
from universal.io import to_json
from universal.predictor import DEVICE_NAMES, device_name, resolve_device

__all__ = [
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "SynthesisSection",
    "TrainConfig",
    "TrainResult",
    "TrainSection",
    "config_doc",
    "load_config",
    "lr_factor",
    "register_synthesis",
    "resolve_config",
    "train",
    "validate_prepared",
]


# ------------------------------------------------------------------------------------------------ config rules
@dataclass(frozen=True)
class _Rule:
    """What one config key allows: ``allowed`` in words (errors, docs) and ``convert`` (raises on a bad value)."""

    allowed: str
    convert: Callable[[Any], Any]


def _show(value: Any, quote: bool = True) -> str:
    """A value as a config file spells it (``null``, ``true``, lists in brackets; text quoted when ``quote``)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return repr(value) if quote else value
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v, quote) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v, quote)}" for k, v in value.items()) + "}"
    return repr(value)


def _real(value: Any) -> float:
    """A finite number (not text: configs are read with :func:`_yaml_load`, where ``1e-3`` is a number)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(value)
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


def _whole(value: Any) -> int:
    number = _real(value)
    if number != int(number):
        raise ValueError(value)
    return int(number)


def _number(low=None, high=None, *, above=False, below=False, integer=False) -> _Rule:
    """A number (``integer``: a whole one) >= ``low`` (> with ``above``) and <= ``high`` (< with ``below``)."""
    noun = "an integer" if integer else "a number"
    if low is not None and high is not None:
        allowed = f"{noun} in {'(' if above else '['}{low:g}, {high:g}{')' if below else ']'}"
    else:
        allowed = noun if low is None else f"{noun} {'>' if above else '>='} {low:g}"

    def convert(value: Any) -> float | int:
        x = (_whole if integer else _real)(value)
        if (low is not None and (x <= low if above else x < low)) or (
            high is not None and (x >= high if below else x > high)
        ):
            raise ValueError(value)
        return x

    return _Rule(allowed, convert)


def _optional(rule: _Rule, null: str = "null") -> _Rule:
    return _Rule(f"{rule.allowed}, or {null}", lambda v: None if v is None else rule.convert(v))


def _choice(*choices: str | bool) -> _Rule:
    """One of ``choices`` (text compared case-insensitively; ``true``/``false`` also as text)."""

    def convert(value: Any) -> str | bool:
        for c in choices:
            if isinstance(value, bool) and value is c:
                return c
            if isinstance(value, str) and value.strip().lower() == _show(c, quote=False):
                return c
        raise ValueError(value)

    return _Rule("one of " + ", ".join(_show(c, quote=False) for c in choices), convert)


def _flag_value(value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(value)
    return bool(value)


def _text_value(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise TypeError(value)
    return value


def _items(value: Any, n: int | None = None) -> list[Any]:
    if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n) or not value:
        raise ValueError(value)
    return list(value)


def _several(rule: _Rule, n: int, allowed: str, check: Callable[..., bool] = lambda *v: True) -> _Rule:
    """``n`` values of ``rule`` (a tuple) that pass ``check``; with ``n == 3`` a single value stands for all three."""

    def convert(value: Any) -> tuple:
        values = [value] * 3 if n == 3 and not isinstance(value, (list, tuple)) else _items(value, n)
        out = tuple(rule.convert(v) for v in values)
        if not check(*out):
            raise ValueError(value)
        return out

    return _Rule(allowed, convert)


def _mapping(allowed: str = "a mapping", check: Callable[[dict], Any] | None = None) -> _Rule:
    """A mapping (``null`` = empty), deep-copied; ``check`` may refuse it (an ``InputError`` says why)."""

    def convert(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TypeError(value)
        out = copy.deepcopy(dict(value))
        if check is not None:
            check(out)
        return out

    return _Rule(allowed, convert)


def _check_augment(values: dict) -> None:
    from universal.data import AugmentConfig

    AugmentConfig.from_dict(values)


_PHANTOM_KEYS = ("n_cases", "shape", "spacing", "label_sets", "seed", "unlabeled", "val_cases")


def _check_phantom(values: dict) -> None:
    unknown = sorted(set(values) - set(_PHANTOM_KEYS))
    if unknown:
        raise InputError(f"unknown keys {unknown}")
    if "val_cases" in values:
        rule = _number(0, integer=True)
        try:
            values["val_cases"] = rule.convert(values["val_cases"])
        except (TypeError, ValueError):
            given = _show(values["val_cases"])
            raise InputError(f"val_cases is {given}; it must be {rule.allowed}") from None


def _device_value(value: Any) -> str:
    """A device name by :func:`universal.predictor.device_name`'s rule (whether it exists is checked at run time)."""
    try:
        return device_name(value)
    except InputError:
        raise ValueError(value) from None


def _resume_value(value: Any) -> str | bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = _text_value(value)
    return {"auto": "auto", "true": True, "false": False, "none": False}.get(text.strip().lower(), text)


_TEXT = _Rule("a non-empty string", _text_value)
_FLAG = _Rule("true or false", _flag_value)
_PATHS = _Rule(
    "a path or a list of paths",
    lambda v: tuple(_text_value(p) for p in _items(v)) if isinstance(v, (list, tuple)) else (_text_value(v),),
)
_NAMES = _Rule(
    "a list of universal class names",
    lambda v: tuple(_text_value(c) for c in _items(v)) if isinstance(v, (list, tuple)) else (_text_value(v),),
)


def _key(default: Any, rule: _Rule, help: str, *, path: bool = False, required: bool = False) -> Any:
    """A config key: its default, its rule, one line of help; ``path``: relative to the config file's folder."""
    meta = {"rule": rule, "help": help, "path": path, "required": required}
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _config_error(problems: Sequence[str]) -> InputError:
    """One error for all ``problems`` (one sentence each: key, value, what is allowed); they ride along as
    ``.problems`` so that :func:`resolve_config` can gather those of every section."""
    problems = list(problems)
    if len(problems) == 1:
        text = f"training config: {problems[0]}"
    else:
        text = f"training config has {len(problems)} problems:\n  - " + "\n  - ".join(problems)
    error = InputError(text)
    error.problems = problems  # type: ignore[attr-defined]
    return error


class _Section:
    """Base of the config sections: every key is checked and converted to its type where it enters."""

    _name = ""

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value, rule = getattr(self, f.name), f.metadata["rule"]
            if f.metadata["required"] and value is None:
                problems.append(f"{self._name}.{f.name} is required: {f.metadata['help']}")
                continue
            try:
                object.__setattr__(self, f.name, rule.convert(value))
            except (TypeError, ValueError) as exc:
                why = f" ({exc})" if isinstance(exc, InputError) else ""
                problems.append(f"{self._name}.{f.name} is {_show(value)}; it must be {rule.allowed}{why}")
        if problems:
            raise _config_error(problems)


# ------------------------------------------------------------------------------------------------ config schema
@dataclass(frozen=True)
class ModelSection(_Section):
    """``model``: the network and its class prompts."""

    _name = "model"
    backbone: str = _key("segresnet", _TEXT, "a name from universal.model.list_models()")
    classes: tuple[str, ...] | None = _key(
        None, _optional(_NAMES, "null (all 32)"), "classes the model predicts"
    )
    encoder: str = _key(
        "minilm", _TEXT, "text encoder of the class prompts (minilm, clip, table:FILE, onehot, auto)"
    )
    template: str = _key("ct", _TEXT, "prompt template: a key (ct, photo, ...) or text with {}")
    kwargs: dict[str, Any] = _key({}, _mapping(), "backbone arguments, e.g. {init_filters: 8}")
    init: str | None = _key(
        None, _optional(_TEXT), "checkpoint whose weights start the run (fine-tuning)", path=True
    )


@dataclass(frozen=True)
class DataSection(_Section):
    """``data``: the cases, their preprocessing (recorded in the checkpoint) and the patches drawn from them."""

    _name = "data"
    train: tuple[str, ...] | None = _key(
        None, _PATHS, "manifest(s) of the labeled training cases", path=True, required=True
    )
    val: tuple[str, ...] | None = _key(
        None, _optional(_PATHS), "manifest(s) of held-out labeled cases for validation DSC", path=True
    )
    spacing_mm: tuple[float, float, float] = _key(
        (1.5, 1.5, 1.5),
        _several(_number(0, above=True), 3, "one positive number of mm or three"),
        "training grid spacing (mm); recorded in the checkpoint, inference resamples to it",
    )
    window_hu: tuple[float, float] = _key(
        (-175.0, 250.0),
        _several(_number(), 2, "[low, high] HU with high > low", lambda lo, hi: hi > lo),
        "HU window scaled to [0, 1]; recorded in the checkpoint",
    )
    crop_foreground: bool = _key(
        True, _FLAG, "crop to the body; recorded in the checkpoint (inference does the same)"
    )
    patch_size: tuple[int, int, int] = _key(
        (96, 96, 96),
        _several(_number(1, integer=True), 3, "one positive integer or three"),
        "training patch = sliding-window size (voxels); a multiple of the backbone's size divisor",
    )
    samples_per_case: int = _key(2, _number(1, integer=True), "consecutive patches drawn from one case visit")
    pos_neg_ratio: tuple[float, float] = _key(
        (1.0, 1.0),
        _several(_number(0), 2, "[positive, negative], numbers >= 0, not both 0", lambda p, n: p + n > 0),
        "foreground- vs background-centred patches",
    )
    cache: bool = _key(True, _FLAG, "keep preprocessed cases in memory (false: re-read on each visit)")
    validate_labels: bool = _key(True, _FLAG, "read every label file before training and check its values")
    augment: dict[str, float] = _key(
        {},
        _mapping(
            "a mapping of universal.data.AugmentConfig fields: flip_lr, flip_ap, flip_si, intensity_prob "
            "(probabilities in [0, 1]), intensity_scale, intensity_shift (numbers >= 0)",
            _check_augment,
        ),
        "patch augmentation; {} (the default) keeps AugmentConfig's defaults: no flips, and on half the patches "
        "(intensity_prob 0.5) an intensity scale and shift of up to ±0.1 (intensity_scale, intensity_shift 0.1)",
    )
    phantom: dict[str, Any] | None = _key(
        None,
        _optional(_mapping("a mapping of " + ", ".join(_PHANTOM_KEYS), _check_phantom)),
        "write a synthetic dataset at data.train (and val_cases held-out cases at data.val, which they need) when "
        "the manifest is missing",
    )

    def __post_init__(self) -> None:
        """The keys' checks, then ``data.phantom.val_cases``: it needs one ``data.val`` manifest to write."""
        super().__post_init__()
        val_cases = (self.phantom or {}).get("val_cases", 0)
        if val_cases and len(self.val or ()) != 1:
            given = "is not set" if not self.val else f"lists {len(self.val)} manifests"
            raise _config_error(
                [
                    f"data.phantom.val_cases is {val_cases} but data.val {given}; set data.val to the one "
                    "manifest path the held-out phantom cases are written to, or remove val_cases"
                ]
            )


@dataclass(frozen=True)
class LossSection(_Section):
    """``loss``: masked BCE + Dice over the (case, class) pairs each case's dataset annotates."""

    _name = "loss"
    dice_weight: float = _key(1.0, _number(0), "weight of the Dice term")
    bce_weight: float = _key(1.0, _number(0), "weight of the BCE term")
    dice_on_empty: bool = _key(True, _FLAG, "false: Dice only over annotated pairs with a non-empty target")


@dataclass(frozen=True)
class OptimSection(_Section):
    """``optim``: optimizer and learning-rate schedule (linear warm-up, then cosine decay)."""

    _name = "optim"
    name: str = _key("adamw", _choice("adamw", "novograd"), "the optimizer")
    lr: float = _key(1e-4, _number(0, above=True), "peak learning rate")
    weight_decay: float = _key(1e-5, _number(0), "weight decay")
    betas: tuple[float, float] = _key(
        (0.9, 0.999), _several(_number(0, 1, below=True), 2, "two numbers in [0, 1)"), "Adam betas"
    )
    warmup_steps: int = _key(100, _number(0, integer=True), "linear warm-up from 0 over this many steps")
    min_lr_ratio: float = _key(0.0, _number(0, 1), "the cosine decays to min_lr_ratio * lr")
    grad_clip: float | None = _key(None, _optional(_number(0, above=True)), "max gradient norm, or null")


@dataclass(frozen=True)
class TrainSection(_Section):
    """``train``: length, batches, precision, checkpoints, logs and where they go."""

    _name = "train"
    steps: int = _key(
        1000, _number(1, integer=True), "optimisation steps (an upper bound with time_budget_s)"
    )
    time_budget_s: float | None = _key(
        None,
        _optional(_number(0, above=True)),
        "seconds of training loop: the schedule follows max(step/steps, elapsed/budget), the run ends at either",
    )
    batch_size: int = _key(2, _number(1, integer=True), "patches per step and rank")
    amp: str | bool = _key("auto", _choice("auto", True, False), "mixed precision (auto: on CUDA only)")
    amp_dtype: str = _key("float16", _choice("float16", "bfloat16"), "autocast dtype of mixed precision")
    seed: int = _key(0, _number(0, integer=True), "seed of the weights and of every patch")
    val_every: int = _key(0, _number(0, integer=True), "steps between validations (0: only at the end)")
    ckpt_every: int = _key(500, _number(0, integer=True), "steps between checkpoints (0: only at the end)")
    log_every: int = _key(1, _number(1, integer=True), "steps between CSV log rows")
    out_dir: str = _key("runs/universal", _TEXT, "the run folder", path=True)
    device: str | None = _key(
        None,
        _optional(_Rule(DEVICE_NAMES, _device_value), "null (cuda when available)"),
        "the device to train on (auto or null: cuda when available); checked to exist when the run starts",
    )
    num_workers: int = _key(0, _number(0, integer=True), "DataLoader worker processes")
    resume: str | bool = _key(
        "auto",
        _Rule("auto, true, false or the path of a training checkpoint", _resume_value),
        "auto: continue from out_dir/checkpoints/last.pt when it exists (with the config it was trained with)",
        path=True,
    )
    deterministic: bool = _key(
        True, _FLAG, "torch.use_deterministic_algorithms (warn only); false: cuDNN benchmark"
    )
    progress: bool = _key(True, _FLAG, "tqdm progress bar")
    tensorboard: str | bool = _key(
        "auto", _choice("auto", True, False), "TensorBoard logs (auto: when importable)"
    )
    find_unused_parameters: bool = _key(False, _FLAG, "DistributedDataParallel's find_unused_parameters")


@dataclass(frozen=True)
class SynthesisSection(_Section):
    """``synthesis``: an optional hook that edits training patches (e.g. draws synthetic tumours)."""

    _name = "synthesis"
    hook: str | None = _key(
        None, _optional(_TEXT), "'package.module:function' or a name registered with register_synthesis"
    )
    prob: float = _key(1.0, _number(0, 1), "probability of applying the hook to a patch")
    kwargs: dict[str, Any] = _key({}, _mapping(), "keyword arguments of the hook")


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "loss": LossSection,
    "optim": OptimSection,
    "train": TrainSection,
    "synthesis": SynthesisSection,
}

# config keys holding paths (relative to the config file in load_config, to the cwd in ``universal train --set``)
_PATH_KEYS = tuple(
    (s, f.name) for s, kind in _SECTIONS.items() for f in dataclasses.fields(kind) if f.metadata["path"]
)


@dataclass(frozen=True)
class TrainConfig:
    """A checked training config: one typed, frozen section per part (see ``docs/CONFIG.md``).

    Build it with :func:`resolve_config` (from a mapping or a file); ``to_dict()`` gives plain values (what
    ``config.json`` holds), and ``resolve_config(cfg.to_dict()) == cfg``.
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    synthesis: SynthesisSection = field(default_factory=SynthesisSection)

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"TrainConfig.{name} must be a {kind.__name__}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values (str, int, float, bool, None, lists, dicts), section by section."""
        return {name: to_json(dataclasses.asdict(getattr(self, name))) for name in _SECTIONS}


# ------------------------------------------------------------------------------------------------------- config
def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) training config.

    Relative paths (the keys marked *path* in ``docs/CONFIG.md``, and ``model.encoder`` of the form ``table:FILE``)
    become absolute, relative to the config file's folder. The result is the raw dict; :func:`resolve_config`
    checks it and fills in the defaults.
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
            data = _yaml_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise InputError(
            f"config {path} cannot be parsed ({type(exc).__name__}: {exc}); fix its syntax"
        ) from exc
    if not isinstance(data, dict):
        raise InputError(f"config {path} must be a mapping of sections (model, data, optim, train, ...)")
    root = path.resolve().parent
    for section, values in data.items():
        if isinstance(values, dict):
            data[section] = {k: _absolutize(section, k, v, root) for k, v in values.items()}
    return data


def _yaml_load(text: str) -> Any:
    """YAML as the configs mean it: PyYAML's safe loader, but ``1e-3`` (no dot) is a number, not text."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only


def _absolutize(section: str, key: str, value: Any, root: Path) -> Any:
    """``value`` of ``section.key`` with a relative path (or list of them) made absolute against ``root``.

    Keys that hold no path, empty values and the keywords of ``train.resume`` come back unchanged.
    """
    if (section, key) == ("model", "encoder") and isinstance(value, str) and value.startswith("table:"):
        return "table:" + _abspath(root, value[len("table:") :])
    if (section, key) not in _PATH_KEYS or value in (None, "") or isinstance(value, (bool, Mapping)):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false", "none"):
        return value
    if isinstance(value, (list, tuple)):
        return [_abspath(root, v) for v in value]
    return _abspath(root, value)


def _abspath(root: Path, value: Any) -> str:
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else (root / p).resolve())


def resolve_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike) -> TrainConfig:
    """The checked :class:`TrainConfig` of ``config`` (a mapping of sections, a YAML/TOML file, or one already).

    Every key takes its declared default unless given; given values are converted to the declared types
    (``patch_size: 32`` → ``(32, 32, 32)``).

    Raises:
        InputError: listing every problem at once, each naming the key, the value and what is allowed: unknown
            sections or keys (with the valid ones), a missing ``data.train``, values of the wrong type or range.
    """
    if isinstance(config, TrainConfig):
        return config
    if not isinstance(config, Mapping):
        config = load_config(config)
    problems = [
        f"unknown section {s!r} (valid: {', '.join(_SECTIONS)})" for s in config if s not in _SECTIONS
    ]
    sections = {}
    for name, kind in _SECTIONS.items():
        values = config.get(name)
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            problems.append(f"section {name!r} is {_show(values)}; it must be a mapping of keys")
            continue
        known = [f.name for f in dataclasses.fields(kind)]
        problems += [f"unknown key {name}.{k} (valid: {', '.join(known)})" for k in values if k not in known]
        try:
            sections[name] = kind(**{k: v for k, v in values.items() if k in known})
        except InputError as exc:
            problems += getattr(exc, "problems", [str(exc)])
    if problems:
        raise _config_error(problems)
    return TrainConfig(**sections)


def _default(f: dataclasses.Field) -> Any:
    """The default value of config key ``f`` (a fresh copy for mappings)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_doc() -> str:
    """The text of ``docs/CONFIG.md``: every key of the schema with its default, what it allows and its help."""
    lines = [
        "# Training configuration",
        "",
        "<!-- Generated from the schema in universal/train.py by `python -m universal.train --doc > docs/CONFIG.md`;",
        "     do not edit by hand (tests/test_train.py checks that this file equals the generated text). -->",
        "",
        "`universal train CONFIG` reads a YAML or TOML file of the sections below (examples: `configs/`);",
        "`universal train CONFIG --set section.key=value` overrides one key (YAML value). Every key has a default",
        "except `data.train`. Keys marked *path* are relative to the config file's folder (to the current folder",
        "with `--set`). A wrong key or value is refused before any work, naming the key, the value and what is",
        "allowed.",
        "",
        "A resumed run (`train.resume`) refuses a config that differs from the one its checkpoint was trained with,",
        "naming each changed key with its old and new value; only "
        + ", ".join(f"`{k}`" for k in RESUME_MAY_CHANGE),
        "may change. Set `train.resume: false` (or another `train.out_dir`) to start over.",
    ]
    for name, kind in _SECTIONS.items():
        summary = (kind.__doc__ or "").strip().removeprefix(f"``{name}``: ")
        lines += ["", f"## `{name}`", "", summary[:1].upper() + summary[1:], ""]
        lines += ["| key | default | allowed | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(kind):
            shown = "required" if f.metadata["required"] else f"`{_show(_default(f), quote=False)}`"
            allowed = f.metadata["rule"].allowed + ("; *path*" if f.metadata["path"] else "")
            cells = (f"`{name}.{f.name}`", shown, allowed, f.metadata["help"])
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


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


def _synthesis_hook(cfg: SynthesisSection) -> Callable[..., Any] | None:
    spec = cfg.hook
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
    return _ProbHook(fn, cfg.prob, dict(cfg.kwargs))


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
    if dev.type != "cuda":
        return resolve_device(spec)  # cpu, or mps checked to be available (InputError)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"train.device {spec!r} asks for CUDA but no GPU is available; use cpu or leave it empty"
            )
        if d.world > 1 and dev.index is None:
            dev = torch.device("cuda", d.local_rank)
    return dev


# ----------------------------------------------------------------------------------------------- optimisation
def _make_optimizer(params, o: OptimSection):
    import torch

    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    from monai.optimizers import Novograd

    return Novograd(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at schedule position ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    cosine decay from 1 to ``min_ratio`` over the remaining steps (``min_ratio`` from ``total`` on).

    >>> [round(lr_factor(s, 10, 2), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _place_schedule(optimizer, o: OptimSection, total: int, position: int) -> None:
    """Set every parameter group's learning rate to the schedule's value at ``position`` (the next step's lr).

    The rate is a pure function of the position, so nothing but the position needs saving for an exact resume.
    """
    lr = o.lr * lr_factor(position, total, o.warmup_steps, o.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------- model building
def _build_model(cfg: TrainConfig):
    """The model of ``cfg`` (random weights from torch's current seed, or ``model.init``'s), its spec filled in:
    the preprocessing and the training window that inference will use."""
    from universal.model import create_model
    from universal.preprocess import PreprocessConfig
    from universal.spec import InferenceDefaults

    m, d = cfg.model, cfg.data
    model = create_model(
        m.backbone,
        classes=None if m.classes is None else list(m.classes),
        encoder=m.encoder,
        template=m.template,
        preprocessing=PreprocessConfig(
            spacing_mm=tuple(d.spacing_mm), hu_window=tuple(d.window_hu), crop_foreground=d.crop_foreground
        ),
        # the sliding-window size the model was trained with (its global feature pools over one window)
        inference=InferenceDefaults(patch_size=tuple(d.patch_size)),
        **copy.deepcopy(m.kwargs),
    )
    div = model.size_divisor
    if any(p % div for p in d.patch_size):
        raise InputError(
            f"data.patch_size is {_show(d.patch_size)}; it must be a multiple of {div} for the "
            f"{model.backbone_name} backbone"
        )
    if m.init:
        _init_from(model, Path(m.init))
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


def _train_info(cfg: TrainConfig, step: int, elapsed_s: float = 0.0) -> dict[str, Any]:
    """Plain facts about the run stored in checkpoints' ``extra["training"]`` (the spec holds the contract)."""
    return {
        "step": int(step),
        "steps": cfg.train.steps,
        "time_budget_s": cfg.train.time_budget_s,
        "train_seconds": round(float(elapsed_s), 3),
        "patch_size": list(cfg.data.patch_size),
        "spacing_mm": list(cfg.data.spacing_mm),
        "crop_foreground": cfg.data.crop_foreground,
        "optimizer": cfg.optim.name,
        "seed": cfg.train.seed,
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


#: config keys a resumed run may change: how long it runs, where, on what device, its logs and checkpoints, and how
#: the cases are held in memory; every other key must equal the one the checkpoint was trained with
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.time_budget_s",
    "train.out_dir",
    "train.resume",
    "train.device",
    "train.num_workers",
    "train.progress",
    "train.tensorboard",
    "train.val_every",
    "train.ckpt_every",
    "train.log_every",
    "train.find_unused_parameters",
    "data.cache",
    "data.validate_labels",
)


def _check_resumed_config(cfg: TrainConfig, state: Mapping[str, Any], path: Path) -> None:
    """Refuse to continue the training state of ``path`` under a config other than the one it was trained with
    (outside :data:`RESUME_MAY_CHANGE`); a key the saved config lacks (an older schema) counts as its default.
    State files without a config (older versions) are not checked.

    Raises:
        CheckpointError: one line naming each changed key with its old and new value.
    """
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        return
    changed = []
    for section, values in cfg.to_dict().items():
        old_values = saved.get(section) if isinstance(saved.get(section), Mapping) else {}
        defaults = {f.name: _default(f) for f in dataclasses.fields(_SECTIONS[section])}
        for key, new in values.items():
            old = old_values.get(key, defaults[key])
            if f"{section}.{key}" not in RESUME_MAY_CHANGE and to_json(old) != new:
                changed.append(f"{section}.{key} was {_show(old)}, now {_show(new)}")
    if changed:
        raise CheckpointError(
            f"cannot resume from {path}: the config differs from the one it was trained with ("
            + "; ".join(changed)
            + "); restore the old value or set train.resume: false to start over"
        )


def _resume_path(resume: str | bool, out_dir: Path) -> Path | None:
    last = out_dir / "checkpoints" / "last.pt"
    if resume is False:
        return None
    if resume is True:
        if not last.is_file():
            raise CheckpointError(
                f"train.resume is true but {last} does not exist; set resume: auto or false"
            )
        return last
    if resume == "auto":
        return last if last.is_file() else None
    p = Path(resume)
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


# ---------------------------------------------------------------------------------------------------------- data
def _ensure_phantom(d: DataSection, dist_ctx: _Dist) -> None:
    """``data.phantom``: write the synthetic dataset at ``data.train`` when that manifest does not exist yet."""
    from universal.data import write_phantom_dataset

    spec = dict(d.phantom or {})
    val_cases = int(spec.pop("val_cases", 0))
    target = Path(d.train[0])
    if dist_ctx.main and not target.is_file():
        write_phantom_dataset(target.parent, manifest_name=target.name, **spec)
    # DataSection refuses val_cases without exactly one data.val
    if dist_ctx.main and val_cases and not Path(d.val[0]).is_file():
        val = Path(d.val[0])
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


def _build_data(cfg: TrainConfig, classes: list[str], dist_ctx: _Dist):
    """The training patches (a :class:`~universal.data.PatchDataset`), the prepared validation cases (rank 0) and
    the names of the datasets trained on."""
    from tqdm.auto import tqdm

    from universal.data import AugmentConfig, PatchDataset, prepare_case

    d, main = cfg.data, dist_ctx.main
    if d.phantom:
        _ensure_phantom(d, dist_ctx)
    cases = _load_cases(d.train, classes, d.validate_labels, main, "training")
    val_cases = _load_cases(d.val, classes, d.validate_labels, main, "validation") if d.val else []
    prep = {
        "classes": classes,
        "spacing": d.spacing_mm,
        "window_hu": d.window_hu,
        "crop_foreground": d.crop_foreground,
    }
    if d.cache:
        show = main and cfg.train.progress
        prepared: Any = [prepare_case(c, **prep) for c in tqdm(cases, desc="caching", disable=not show)]
        n_cases = None
    else:
        prepared, n_cases = _LazyCases(cases, prep), len(cases)
    dataset = PatchDataset(
        prepared,
        d.patch_size,
        classes=classes,
        samples_per_case=d.samples_per_case,
        pos_neg_ratio=d.pos_neg_ratio,
        augment=AugmentConfig.from_dict(d.augment),
        seed=cfg.train.seed,
        synthesis=_synthesis_hook(cfg.synthesis),
        n_cases=n_cases,
    )
    val_prepared = [prepare_case(c, **prep) for c in val_cases] if main else []
    return dataset, val_prepared, tuple(dict.fromkeys(c.dataset for c in cases))


# ---------------------------------------------------------------------------------------------------------- train
def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    stop_after: int | None = None,
    clock: Callable[[], float] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    stop: Any = None,
) -> TrainResult:
    """Train a Universal Model as ``config`` says (a :class:`TrainConfig`, a mapping or a YAML/TOML file).

    Args:
        config: The config (missing keys take their defaults; every key: ``docs/CONFIG.md``). It is checked
            completely before any work (:func:`resolve_config`).
        stop_after: Stop after this many total steps (a checkpoint is written), as if interrupted; the schedule
            still follows ``train.steps``, so resuming later continues exactly.
        clock: Seconds of a monotonic clock (default :func:`time.perf_counter`). It is read once before the first
            step and once after each step; ``train.time_budget_s`` and the logged step times use nothing else, so a
            fake clock makes a budgeted run independent of the machine's speed.
        on_step: Called after each step with ``(step, total steps, loss)`` (progress bars of front-ends).
        stop: An object with ``is_set()`` (a :class:`threading.Event`); once set, the run stops before its next
            step as with ``stop_after`` (``checkpoints/last.pt`` is written, ``model.pt`` is not).

    Returns:
        A :class:`TrainResult`.
    """
    import torch

    cfg = resolve_config(config)
    dist_ctx = _Dist.from_env(cfg.train.device)
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_bench = torch.backends.cudnn.benchmark
    try:
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:  # fixed patch size: let cuDNN pick its fastest convolutions once
            torch.backends.cudnn.benchmark = True
        run = _setup(cfg, dist_ctx, stop_after, clock or time.perf_counter)
        run.on_step, run.stop = on_step, stop
        return _run(run)
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.backends.cudnn.benchmark = previous_bench
        dist_ctx.close()


@dataclass
class _Logs:
    """Rank 0's outputs: the CSV logs and the optional TensorBoard writer."""

    train: _CsvLog
    val: _CsvLog
    writer: Any = None


@dataclass
class _Run:
    """The state of one training run: built by :func:`_setup`, advanced by :func:`_train_step`."""

    cfg: TrainConfig
    dist: _Dist
    device: Any
    amp: bool
    amp_dtype: Any
    model: Any  # the UniversalModel itself (train_model may wrap it in DDP)
    optimizer: Any
    scaler: Any
    val_prepared: list[Any]
    datasets: tuple[str, ...]
    end_step: int  # train.steps, or stop_after
    clock: Callable[[], float]
    train_model: Any = None
    loader: Any = None
    bar: Any = None
    logs: _Logs | None = None
    step: int = 0
    position: int = 0  # where the schedule stands (= step without a time budget)
    prior_elapsed: float = 0.0  # training-loop seconds of the runs this one resumes
    elapsed: float = 0.0  # training-loop seconds so far, prior runs included
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    on_step: Callable[[int, int, float], None] | None = None  # train(on_step=...)
    stop: Any = None  # train(stop=...): an object with is_set()

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def _setup(cfg: TrainConfig, dist_ctx: _Dist, stop_after: int | None, clock: Callable[[], float]) -> _Run:
    """Everything before the first step: device, model, data, optimizer, resume, DDP, logs and the loader."""
    import torch
    from tqdm.auto import tqdm

    t = cfg.train
    resume = _resume_path(t.resume, Path(t.out_dir))
    state = None if resume is None else _load_training_state(resume)
    if state is not None:
        _check_resumed_config(cfg, state, resume)  # before any data is read
    device = _pick_device(t.device, dist_ctx)
    amp = (device.type == "cuda") if t.amp == "auto" else t.amp
    if amp and device.type != "cuda":
        warnings.warn("train.amp is only used on CUDA; training in float32 on the CPU", stacklevel=3)
        amp = False
    amp_dtype = getattr(torch, t.amp_dtype)
    torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = _build_model(cfg)
    dataset, val_prepared, datasets = _build_data(cfg, list(model.class_names), dist_ctx)
    model.to(device)
    run = _Run(
        cfg=cfg,
        dist=dist_ctx,
        device=device,
        amp=amp,
        amp_dtype=amp_dtype,
        model=model,
        optimizer=_make_optimizer(model.parameters(), cfg.optim),
        scaler=torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16),
        val_prepared=val_prepared,
        datasets=datasets,
        end_step=t.steps if stop_after is None else max(0, min(t.steps, int(stop_after))),
        clock=clock,
    )
    _place_schedule(run.optimizer, cfg.optim, t.steps, 0)
    if state is not None:
        _restore(run, resume, state)
    run.train_model = model
    if dist_ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        run.train_model = DDP(model, device_ids=ids, find_unused_parameters=t.find_unused_parameters)
    if dist_ctx.main:
        run.logs = _open_logs(cfg, list(model.class_names), run.resumed_from)
    sampler = _StepSampler(run.step, run.end_step, t.batch_size, dist_ctx.rank, dist_ctx.world)
    run.loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=t.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    show = dist_ctx.main and t.progress
    run.bar = tqdm(total=t.steps, initial=run.step, desc="train", disable=not show, dynamic_ncols=True)
    return run


def _restore(run: _Run, path: Path, state: Mapping[str, Any]) -> None:
    """Continue from training checkpoint ``path`` and its training ``state`` (:func:`_check_resumed_config` passed):
    weights, optimizer, AMP scaler, RNG, step, elapsed seconds and the schedule's position (older state files keep
    it as the LambdaLR scheduler's ``last_epoch``).

    Raises:
        CheckpointError: the checkpoint predicts other classes than the config.
    """
    from universal.model import load_checkpoint

    saved = load_checkpoint(path, map_location="cpu")
    classes = list(run.model.class_names)
    if list(saved.class_names) != classes:
        raise CheckpointError(
            f"cannot resume from {path}: it predicts {saved.class_names}, the config {classes}"
        )
    run.model.load_state_dict(saved.state_dict())
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    run.step = run.resumed_from = int(state["step"])
    run.prior_elapsed = run.elapsed = float(state.get("elapsed_s", 0.0))
    legacy = (state.get("scheduler") or {}).get("last_epoch", run.step)
    run.position = int(state.get("schedule_position", legacy))
    _place_schedule(run.optimizer, run.cfg.optim, run.cfg.train.steps, run.position)


def _open_logs(cfg: TrainConfig, classes: list[str], resumed_from: int | None) -> _Logs:
    """Rank 0: the run folder with ``config.json`` (the resolved config), the CSV logs and TensorBoard."""
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return _Logs(
        train=_CsvLog(out_dir / "train_log.csv", ["step", "loss", "lr", "seconds", "pairs"], resumed_from),
        val=_CsvLog(out_dir / "val_log.csv", ["step", "mean_dsc", *classes], resumed_from),
        writer=_tensorboard(cfg.train.tensorboard, out_dir),
    )


def _run(run: _Run) -> TrainResult:
    """The loop: one step per batch, then the schedule, the log, validation and checkpoints; the final model."""
    t = run.cfg.train
    budget = t.time_budget_s
    out_of_time = budget is not None and run.prior_elapsed >= budget  # a finished budgeted run resumed
    run.model.train()
    start = last = run.clock()
    try:
        for batch in [] if out_of_time else run.loader:
            if run.stop is not None and run.stop.is_set():
                break
            loss, lr, pairs = _train_step(run, batch)
            now = run.clock()
            run.step += 1
            run.elapsed = run.prior_elapsed + (now - start)
            run.position = _schedule_position(run)
            _place_schedule(run.optimizer, run.cfg.optim, t.steps, run.position)
            out_of_time = budget is not None and run.position >= t.steps
            _log_step(run, loss, lr, pairs, now - last, last_row=out_of_time)
            if run.on_step is not None:
                run.on_step(run.step, run.end_step, loss)
            last = now
            if out_of_time:
                break
            if t.val_every and run.step % t.val_every == 0 and run.step < t.steps:
                _run_validation(run)
            if run.dist.main and t.ckpt_every and run.step % t.ckpt_every == 0 and run.step < run.end_step:
                _save(run, final=False)
    finally:
        run.bar.close()
    done = run.step >= t.steps or out_of_time
    if done:
        _run_validation(run)
    checkpoint = _save(run, final=done) if run.dist.main else None
    if run.logs is not None and run.logs.writer is not None:
        run.logs.writer.close()
    return TrainResult(
        run.model, checkpoint, run.out_dir, run.step, run.history, run.validation, run.resumed_from
    )


def _train_step(run: _Run, batch: Mapping[str, Any]) -> tuple[float, float, int]:
    """One optimisation step on ``batch``; returns the loss (mean over ranks), the lr used and the number of
    available (case, class) pairs."""
    import torch

    from universal.loss import masked_bce_dice

    device, loss_cfg, clip = run.device, run.cfg.loss, run.cfg.optim.grad_clip
    image = batch["image"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True).float()
    available = batch["available"].to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=run.amp_dtype, enabled=run.amp):
        logits = run.train_model(image)
    loss = masked_bce_dice(
        logits.float(),
        target,
        available,
        dice_weight=loss_cfg.dice_weight,
        bce_weight=loss_cfg.bce_weight,
        dice_on_empty=loss_cfg.dice_on_empty,
    )
    if not loss.requires_grad:  # no available pair in this batch: keep DDP's graph, contribute zero
        loss = loss + logits.float().sum() * 0.0
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    lr = float(run.optimizer.param_groups[0]["lr"])
    return run.dist.mean(float(loss.detach()), device), lr, int(available.sum())


def _schedule_position(run: _Run) -> int:
    """Where the schedule stands after ``run.step`` steps: the step, or further along when the time budget runs
    out faster (averaged over ranks, so every rank follows the same schedule)."""
    budget, total = run.cfg.train.time_budget_s, run.cfg.train.steps
    if budget is None:
        return run.step
    return int(run.dist.mean(float(max(run.step, int(run.elapsed / budget * total))), run.device))


def _log_step(run: _Run, loss: float, lr: float, pairs: int, seconds: float, last_row: bool) -> None:
    run.bar.update(1)
    if not run.dist.main:
        return
    step = run.step
    run.history.append({"step": step, "loss": loss, "lr": lr})
    if step % run.cfg.train.log_every == 0 or step == run.end_step or last_row:
        run.logs.train.write({"step": step, "loss": loss, "lr": lr, "seconds": seconds, "pairs": pairs})
        if run.logs.writer is not None:
            run.logs.writer.add_scalar("train/loss", loss, step)
            run.logs.writer.add_scalar("train/lr", lr, step)
    run.bar.set_postfix(loss=f"{loss:.4f}")


def _run_validation(run: _Run) -> None:
    """Rank 0, when ``data.val`` is set: DSC per class on the validation cases, logged."""
    if not (run.dist.main and run.val_prepared):
        return
    dsc = validate_prepared(
        run.model, run.val_prepared, run.cfg.data.patch_size, device=run.device, amp=run.amp
    )
    finite = [v for v in dsc.values() if not math.isnan(v)]
    mean = float(np.mean(finite)) if finite else float("nan")
    run.validation.append({"step": run.step, "mean_dsc": mean, "dsc": dsc})
    run.logs.val.write({"step": run.step, "mean_dsc": mean, **dsc})
    if run.logs.writer is not None:
        run.logs.writer.add_scalar("val/mean_dsc", mean, run.step)
        for n, v in dsc.items():
            if not math.isnan(v):
                run.logs.writer.add_scalar(f"val_dsc/{n}", v, run.step)
    run.bar.set_postfix_str(f"val DSC {mean:.3f}")


def _save(run: _Run, final: bool) -> Path:
    """Rank 0: ``checkpoints/last.pt`` and its training state; ``final``: also ``model.pt``. Returns the model
    file written last. The model's provenance says how far training got."""
    from universal import __version__
    from universal.model import save_checkpoint
    from universal.spec import Provenance

    t = run.cfg.train
    run.model.provenance = Provenance(
        source="trained",
        universal_version=__version__,
        steps=run.step,
        train_seconds=round(run.elapsed, 3),
        time_budget_s=t.time_budget_s,
        seed=t.seed,
        datasets=run.datasets,
        notes=f"fine-tuned from {Path(run.cfg.model.init).name}" if run.cfg.model.init else "",
    )
    state = {
        "step": run.step,
        "elapsed_s": float(run.elapsed),
        "schedule_position": run.position,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": _rng_state(),
        "config": run.cfg.to_dict(),
    }
    extra = {"training": _train_info(run.cfg, run.step, run.elapsed)}
    ckpt = run.out_dir / "checkpoints" / "last.pt"
    # state first, model second: a model file always has a matching (or newer) state beside it
    _atomic_torch_save(state, _state_path(ckpt))
    save_checkpoint(run.model, ckpt, extra=extra)
    return save_checkpoint(run.model, run.out_dir / "model.pt", extra=extra) if final else ckpt


if __name__ == "__main__":  # pragma: no cover - python -m universal.train --doc > docs/CONFIG.md
    import sys

    if sys.argv[1:] != ["--doc"]:
        sys.exit(
            "usage: python -m universal.train --doc   (prints docs/CONFIG.md, generated from the schema)"
        )
    sys.stdout.write(config_doc())
