"""Universal Model networks: backbone registry, the model with its text-driven dynamic heads, checkpoints.

>>> from universal.model import create_model, list_models
>>> list_models()
['segresnet', 'swinunetr', 'unet']

See ``docs/ARCHITECTURE.md`` for the contracts. Importing this package imports torch (MONAI only when a MONAI-based
backbone is built).
"""

from __future__ import annotations

from universal.model import sources  # weights sources: the registry, downloads, the Hub
from universal.model.backbones import build_backbone, get_backbone_spec, list_models, register_backbone
from universal.model.checkpoints import (
    PRETRAINED,
    download_weights,
    load_checkpoint,
    load_official,
    load_pretrained,
    save_checkpoint,
)
from universal.model.universal_model import (
    UniversalModel,
    create_model,
    dynamic_heads,
    split_controller_params,
)

__all__ = [
    "PRETRAINED",
    "UniversalModel",
    "build_backbone",
    "create_model",
    "download_weights",
    "dynamic_heads",
    "get_backbone_spec",
    "list_models",
    "load_checkpoint",
    "load_official",
    "load_pretrained",
    "register_backbone",
    "save_checkpoint",
    "sources",
    "split_controller_params",
]
