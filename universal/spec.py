"""The model contract: what a set of weights expects, as one typed, versioned, frozen object.

A :class:`ModelSpec` travels with the weights from training to the checkpoint to every front-end. It holds

- the **architecture** (backbone and its arguments, classes, text encoder, prompt template, embedding width),
- the **preprocessing** (:class:`universal.preprocess.PreprocessConfig`: spacing, HU window, foreground crop, grid
  convention),
- the **inference defaults** (:class:`InferenceDefaults`: sliding-window size, overlap, threshold, precision, the
  spacing of the fast mode),
- the **provenance** (:class:`Provenance`: how the weights were made).

``universal.train`` writes it into every checkpoint (``"spec"`` of a version-2 checkpoint), ``load_checkpoint`` /
``load_official`` / ``load_pretrained`` read it back as the same object (``model.spec``), and
:class:`universal.predictor.Predictor` reads what it needs from it and nowhere else. Version-1 checkpoints (an
untyped ``config["preprocessing"]`` dict and ``extra["training"]``) are migrated by :func:`migrate_v1`; the
official release's checkpoints map onto :func:`official_spec`.

Every value is checked where it enters (``__post_init__``), with a message naming the field, the value and what is
allowed; ``from_dict`` refuses unknown keys, so a typo in a hand-edited spec is never ignored.

>>> spec = ModelSpec(backbone="segresnet", classes=("liver",), encoder="minilm",
...                  template="A computerized tomography of a {}", embed_dim=384)
>>> ModelSpec.from_dict(spec.to_dict()) == spec
True
>>> spec.inference.patch_size, spec.preprocessing.target_spacing()
((96, 96, 96), (1.5, 1.5, 1.5))
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from universal.errors import CheckpointError, InputError
from universal.io import to_json
from universal.preprocess import PreprocessConfig

__all__ = [
    "InferenceDefaults",
    "ModelSpec",
    "PRECISIONS",
    "Provenance",
    "SPEC_VERSION",
    "migrate_v1",
    "official_spec",
]

#: version of the :class:`ModelSpec` layout (``to_dict()["version"]``); older layouts are migrated on load
SPEC_VERSION = 1
#: arithmetic of the forward passes (see :func:`universal.inference.autocast_dtype_for`)
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def _bad(where: str, value: Any, allowed: str) -> InputError:
    return InputError(f"{where} is {value!r}; {allowed}")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _bad(where, value, "it must be a finite number")
    return float(value)


@dataclass(frozen=True)
class InferenceDefaults:
    """How the weights are run by default (every one can be overridden by a :class:`~universal.Predictor` setting).

    Attributes:
        patch_size: Sliding-window size in voxels (X, Y, Z): the training window (the global feature pools over one
            window, so windows of another size see other statistics).
        overlap: Fraction of overlap of neighbouring windows, in [0, 1).
        threshold: Probability threshold of the masks, in (0, 1).
        precision: Arithmetic of the forward passes (:data:`PRECISIONS`).
        fast_spacing_mm: Spacing of the fast mode (never finer than the model's own spacing).
    """

    patch_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    threshold: float = 0.5
    precision: str = "auto"
    fast_spacing_mm: float = 3.0

    def __post_init__(self) -> None:
        p = self.patch_size
        if isinstance(p, (int,)) and not isinstance(p, bool):
            p = (p,) * 3
        try:
            p = tuple(int(v) for v in p if not isinstance(v, bool) and float(v) == int(v))
        except (TypeError, ValueError):
            raise _bad(
                "inference.patch_size", self.patch_size, "it must be three positive integers"
            ) from None
        if len(p) != 3 or min(p) < 1:
            raise _bad("inference.patch_size", self.patch_size, "it must be three positive integers")
        object.__setattr__(self, "patch_size", p)
        overlap = _number("inference.overlap", self.overlap)
        if not 0.0 <= overlap < 1.0:
            raise _bad("inference.overlap", self.overlap, "it must be in [0, 1)")
        object.__setattr__(self, "overlap", overlap)
        threshold = _number("inference.threshold", self.threshold)
        if not 0.0 < threshold < 1.0:
            raise _bad("inference.threshold", self.threshold, "it must be in (0, 1)")
        object.__setattr__(self, "threshold", threshold)
        if self.precision not in PRECISIONS:
            raise _bad("inference.precision", self.precision, f"it must be one of {', '.join(PRECISIONS)}")
        fast = _number("inference.fast_spacing_mm", self.fast_spacing_mm)
        if not fast > 0:
            raise _bad(
                "inference.fast_spacing_mm", self.fast_spacing_mm, "it must be a positive number of mm"
            )
        object.__setattr__(self, "fast_spacing_mm", fast)


@dataclass(frozen=True)
class Provenance:
    """How the weights were made (shown in reports and model cards; never read by inference).

    Attributes:
        source: ``"trained"`` (``universal train``), ``"official"`` (the official release), ``"created"`` (a fresh
            model, e.g. random weights) or ``"unknown"``.
        universal_version: Version of ``universal`` that wrote the weights.
        steps: Optimisation steps done; ``train_seconds``: wall time of the training loop.
        time_budget_s: The training run's time budget, if it had one; ``seed``: its seed.
        datasets: Names of the datasets (manifests) trained on.
        migrated_from: The layout this spec was migrated from (e.g. ``"universal-checkpoint v1"``), else ``None``.
        notes: Free text (licence of official weights, packaging).
    """

    source: str = "unknown"
    universal_version: str | None = None
    steps: int | None = None
    train_seconds: float | None = None
    time_budget_s: float | None = None
    seed: int | None = None
    datasets: tuple[str, ...] = ()
    migrated_from: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in ("trained", "official", "created", "unknown"):
            raise _bad("provenance.source", self.source, "it must be trained, official, created or unknown")
        object.__setattr__(self, "datasets", tuple(str(d) for d in self.datasets))


def _frozen(value: Any) -> Any:
    """Backbone kwargs as immutable plain values (lists → tuples, dicts → read-only mappings); the inverse is
    :func:`universal.io.to_json`."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _bad("backbone_kwargs", value, "its values must be numbers, strings, lists or mappings")


@dataclass(frozen=True)
class ModelSpec:
    """The contract of a set of weights: architecture, preprocessing, inference defaults and provenance.

    Build it with keywords; change it with :meth:`replace` (a new object; specs are frozen). ``classes`` are
    canonical universal class names in output order; ``encoder`` the text encoder's stable name
    (:func:`universal.prompts.get_encoder`); ``template`` the prompt template the embeddings were made with.
    """

    backbone: str
    classes: tuple[str, ...]
    encoder: str
    template: str
    embed_dim: int
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    provenance: Provenance = field(default_factory=Provenance)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise _bad("backbone", self.backbone, "it must be a backbone name (universal models)")
        classes = tuple(str(c) for c in self.classes)
        if not classes or len(set(classes)) != len(classes):
            raise _bad("classes", self.classes, "it must list at least one class, each once")
        object.__setattr__(self, "classes", classes)
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise _bad("embed_dim", self.embed_dim, "it must be a positive integer")
        for name in ("encoder", "template"):
            if not isinstance(getattr(self, name), str):
                raise _bad(name, getattr(self, name), "it must be a string")
        object.__setattr__(self, "backbone_kwargs", _frozen(dict(self.backbone_kwargs or {})))
        for name, kind in (
            ("preprocessing", PreprocessConfig),
            ("inference", InferenceDefaults),
            ("provenance", Provenance),
        ):
            if not isinstance(getattr(self, name), kind):
                raise _bad(name, getattr(self, name), f"it must be a {kind.__name__}")
        if self.version != SPEC_VERSION:
            raise _bad(
                "version", self.version, f"this version of universal writes spec version {SPEC_VERSION}"
            )

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with ``changes`` (fields of this class; nested parts are replaced whole)."""
        return dataclasses.replace(self, **changes)

    def with_prompts(self, *, encoder: str | None = None, template: str | None = None) -> ModelSpec:
        return self.replace(encoder=encoder or self.encoder, template=template or self.template)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (str, int, float, bool, None, lists, dicts): what a checkpoint stores."""
        return {
            "version": self.version,
            "backbone": self.backbone,
            "backbone_kwargs": to_json(self.backbone_kwargs),
            "classes": list(self.classes),
            "encoder": self.encoder,
            "template": self.template,
            "embed_dim": self.embed_dim,
            "preprocessing": to_json(dataclasses.asdict(self.preprocessing)),
            "inference": to_json(dataclasses.asdict(self.inference)),
            "provenance": to_json(dataclasses.asdict(self.provenance)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """The spec written by :meth:`to_dict` (unknown keys and newer versions are refused)."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f"a model spec must be a mapping, got {type(data).__name__}")
        version = data.get("version")
        if not isinstance(version, int) or version > SPEC_VERSION:
            raise CheckpointError(
                f"model spec version {version!r} is newer than this universal reads ({SPEC_VERSION}); upgrade universal"
            )
        try:
            parts = {
                "preprocessing": _part(PreprocessConfig, data.get("preprocessing") or {}, "preprocessing"),
                "inference": _part(InferenceDefaults, data.get("inference") or {}, "inference"),
                "provenance": _part(Provenance, data.get("provenance") or {}, "provenance"),
            }
            top = {k: v for k, v in data.items() if k not in parts}
            _refuse_unknown(cls, top, "model spec")
            return cls(**{**top, **parts})
        except (TypeError, InputError) as exc:
            raise CheckpointError(f"invalid model spec: {exc}") from None

    # ------------------------------------------------------------------------------------------ derived values
    def prepare_config(self, fast: bool = False) -> PreprocessConfig:
        """The preprocessing of one run: the model's own, or at the fast spacing (never finer than the model's)."""
        if not fast:
            return self.preprocessing
        coarse = max(self.inference.fast_spacing_mm, max(self.preprocessing.target_spacing()))
        return dataclasses.replace(self.preprocessing, spacing_mm=(coarse,) * 3)


def _refuse_unknown(kind: type, values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{where} has unknown key(s) {unknown}; known: {sorted(known)}")


def _part(kind: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise InputError(f"{where} must be a mapping, got {type(values).__name__}")
    _refuse_unknown(kind, values, where)
    plain = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    return kind(**plain)


# ------------------------------------------------------------------------------------------------ migrations
def migrate_v1(config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> ModelSpec:
    """The spec of a version-1 universal checkpoint (``config`` + ``extra``), e.g. the shipped ``builtin.pt``.

    Version 1 kept the preprocessing as an untyped dict (``orientation``, ``spacing``, ``window`` and, from
    ``universal train``, ``patch_size``) and the training record in ``extra["training"]`` (``patch_size``,
    ``spacing_mm``, ``steps``/``step``, ``train_seconds``, ``time_budget_s``, ``seed``). Keys it did not record take
    the defaults v1 inference used (foreground crop on, overlap 0.25, threshold 0.5, 96³ windows).
    """
    try:
        prep = dict(config.get("preprocessing") or {})
        training = dict((extra or {}).get("training") or {})
        spacing = prep.get("spacing", training.get("spacing_mm", 1.5))
        spacing = tuple(float(s) for s in spacing) if isinstance(spacing, (list, tuple)) else float(spacing)
        preprocessing = PreprocessConfig(
            spacing_mm=spacing,
            hu_window=tuple(float(w) for w in prep.get("window", (-175.0, 250.0))),
            crop_foreground=bool(prep.get("crop_foreground", training.get("crop_foreground", True))),
        )
        patch = prep.get("patch_size") or training.get("patch_size") or (96, 96, 96)
        provenance = Provenance(
            source="trained" if training else "unknown",
            steps=int(training["step"]) if "step" in training else None,
            train_seconds=float(training["train_seconds"]) if "train_seconds" in training else None,
            time_budget_s=float(training["time_budget_s"]) if training.get("time_budget_s") else None,
            seed=int(training["seed"]) if "seed" in training else None,
            migrated_from="universal-checkpoint v1",
        )
        return ModelSpec(
            backbone=str(config["backbone"]).lower(),
            backbone_kwargs=copy.deepcopy(dict(config.get("backbone_kwargs") or {})),
            classes=tuple(config["class_names"]),
            encoder=str(config["encoder_name"]),
            template=str(config["template"]),
            embed_dim=int(config["embed_dim"]),
            preprocessing=preprocessing,
            inference=InferenceDefaults(patch_size=tuple(int(p) for p in patch)),
            provenance=provenance,
        )
    except KeyError as exc:
        raise CheckpointError(
            f"a version-1 checkpoint config lacks {exc} (a corrupt universal checkpoint)"
        ) from None
    except (TypeError, ValueError, InputError) as exc:
        raise CheckpointError(f"a version-1 checkpoint config cannot be migrated: {exc}") from None


def official_spec(
    backbone: str, embed_dim: int, classes: tuple[str, ...], encoder: str, template: str
) -> ModelSpec:
    """The spec of a checkpoint of the official release: its inference chain (``../shared/reference/
    OFFICIAL_PIPELINE.md``), so that its weights reproduce the official outputs by default.

    The ``"official"`` grid convention (MONAI's ``Spacingd`` to 1.5 mm, then the crop to the foreground of the
    windowed image: HU above -175, no margin; back with ``Invertd``), HU window [-175, 250], 96³ windows, overlap
    0.5 with MONAI 0.9.0's Gaussian blending, threshold 0.5, float32 forward passes (``precision="auto"`` is
    faster on CUDA but changes probabilities by ~1e-3).
    """
    return ModelSpec(
        backbone=backbone,
        classes=tuple(classes),
        encoder=encoder,
        template=template,
        embed_dim=int(embed_dim),
        preprocessing=PreprocessConfig(
            spacing_mm=(1.5, 1.5, 1.5),
            hu_window=(-175.0, 250.0),
            crop_foreground=True,
            foreground_hu=-175.0,
            margin_mm=0.0,
            convention="official",
        ),
        inference=InferenceDefaults(patch_size=(96, 96, 96), overlap=0.5, threshold=0.5, precision="float32"),
        provenance=Provenance(
            source="official",
            notes="CLIP-Driven Universal Model release by Liu et al.; CC BY-NC-ND 4.0 (research only)",
        ),
    )
