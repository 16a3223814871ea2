"""universal: text-prompted universal segmentation of organs and tumours in CT.

A re-implementation of the CLIP-Driven Universal Model (Liu, Yuille, Tang, Zhou; FLARE 2023 version).
The public API is small; heavy libraries (torch, monai, SimpleITK, open_clip) load only when first used.

>>> import universal
>>> universal.resolve_class("IVC").name
'inferior vena cava'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it (loaded lazily on first access)
_EXPORTS: dict[str, str] = {
    "UniversalError": "universal.errors",
    "resolve_class": "universal.taxonomy",
    "class_names": "universal.taxonomy",
    "Volume": "universal.io",
    "load_volume": "universal.io",
    "load_label": "universal.io",
    "save_mask": "universal.io",
    "make_phantom": "universal.phantom",
    "encode_prompts": "universal.prompts",
    "create_model": "universal.model",
    "list_models": "universal.model",
    "load_pretrained": "universal.model",
    "segment": "universal.inference",
    "Predictor": "universal.predictor",
    "ModelSpec": "universal.spec",
    "evaluate_case": "universal.metrics",
    "evaluate": "universal.evaluation",
    "read_reference": "universal.evaluation",
}

__all__ = ["__version__", *_EXPORTS]  # the TYPE_CHECKING imports below are re-exports (ruff: F401 off here)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from universal.errors import UniversalError
    from universal.evaluation import evaluate, read_reference
    from universal.inference import segment
    from universal.io import Volume, load_label, load_volume, save_mask
    from universal.metrics import evaluate_case
    from universal.model import create_model, list_models, load_pretrained
    from universal.phantom import make_phantom
    from universal.predictor import Predictor
    from universal.prompts import encode_prompts
    from universal.spec import ModelSpec
    from universal.taxonomy import class_names, resolve_class


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'universal' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
