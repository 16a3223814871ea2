"""Saving and loading Universal Models: the project's own format, the official release's format, a weights registry.

- :func:`save_checkpoint` / :func:`load_checkpoint`: the project's self-describing format, a dict of plain values and
  tensors only (``{"format": "universal-checkpoint", "version": 2, "spec": ..., "state_dict": ..., "extra": ...}``),
  so it loads with ``torch.load(weights_only=True)``; ``spec`` is :meth:`universal.spec.ModelSpec.to_dict` (the
  architecture, classes, encoder, template, preprocessing, inference defaults and provenance) and comes back as the
  same object (``model.spec``). Version-1 files (``"config"`` with an untyped preprocessing dict, e.g. the first
  ``builtin.pt``) are migrated on load by :func:`universal.spec.migrate_v1`.
- :func:`load_official`: a checkpoint released with the official CLIP-Driven Universal Model (``{'net': state_dict}``
  or a bare state dict, ``module.`` prefixes, Swin keys with or without ``backbone.``), backbone detected from the key
  names; the 32 universal classes; embeddings from the checkpoint's ``organ_embedding``; the official pipeline's
  settings as its spec (:func:`universal.spec.official_spec`).
- :func:`load_pretrained`: a path (either format, detected), a registry name (:data:`PRETRAINED` and the entries of
  ``$UNIVERSAL_WEIGHTS_REGISTRY``, downloaded once to ``~/.cache/universal/weights``, or
  ``$UNIVERSAL_CACHE_DIR/weights``, resumable, licence acceptance, sha256 pinned or recorded and checked) or
  ``hf-hub:ORG/REPO[:FILE][@REVISION]``; the sources live in :mod:`universal.model.sources`.

Nothing here unpickles arbitrary objects: every file is read with ``torch.load(..., weights_only=True)``. Every
problem (not a checkpoint, Python objects inside, another architecture or class count) raises
``universal.errors.CheckpointError`` naming it, with every missing, unexpected and mismatched key.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from universal.errors import CheckpointError
from universal.model.backbones import list_models
from universal.model.universal_model import UniversalModel
from universal.spec import ModelSpec, migrate_v1, official_spec

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "OFFICIAL_ENCODER_NAME",
    "OFFICIAL_TEMPLATE",
    "PRETRAINED",
    "builtin_weights_path",
    "cache_dir",
    "download_weights",
    "load_checkpoint",
    "load_official",
    "load_pretrained",
    "model_from_spec",
    "read_spec",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "universal-checkpoint"
CHECKPOINT_VERSION = 2
#: encoder name recorded for the CLIP ViT-B/32 embeddings stored inside the official checkpoints
OFFICIAL_ENCODER_NAME = "table:official-clip"
#: the official prompt template (the embeddings in the released checkpoints were made with it)
OFFICIAL_TEMPLATE = "A computerized tomography of a {}"
_OFFICIAL_LICENCE = "CC BY-NC-ND 4.0 (research only)"
_OFFICIAL_README = "https://github.com/ljwztc/CLIP-Driven-Universal-Model#model"
#: top-level names of the official head (everything else belongs to the backbone)
_HEAD_PREFIXES = ("organ_embedding", "GAP.", "precls_conv.", "text_to_vision.", "controller.")

#: Registry of downloadable weights: name → url, sha256 (``None`` = not pinned: the first download's sha256 is
#: recorded and checked at every later load), licence, backbone, description (and ``filename`` in the cache,
#: ``format``: ``"official"`` or ``"universal"``); each entry is checked as a :class:`universal.model.sources.
#: WeightsSource`, and ``$UNIVERSAL_WEIGHTS_REGISTRY`` adds more. The official URLs are the download links of the
#: official README (Dropbox, ``dl=1`` for a direct download); their sha256 is not pinned because no checksum is
#: published; their licence (non-commercial, no derivatives) must be accepted before the download.
PRETRAINED: dict[str, dict[str, Any]] = {
    "universal-unet": {
        "url": "https://www.dropbox.com/s/lyunaue0wwhmv5w/unet.pth?dl=1",
        "sha256": None,
        "licence": _OFFICIAL_LICENCE,
        "backbone": "unet",
        "format": "official",
        "filename": "universal-unet.pth",
        "description": "Official CLIP-Driven Universal Model, U-Net backbone, 32 classes, CLIP ViT-B/32 prompts "
        f"(weights by Liu et al.; listed in {_OFFICIAL_README}).",
    },
    "universal-swinunetr": {
        "url": "https://www.dropbox.com/s/jdsodw2vemsy8sz/swinunetr.pth?dl=1",
        "sha256": None,
        "licence": _OFFICIAL_LICENCE,
        "backbone": "swinunetr",
        "format": "official",
        "filename": "universal-swinunetr.pth",
        "description": "Official CLIP-Driven Universal Model, Swin UNETR backbone, 32 classes, CLIP ViT-B/32 prompts "
        f"(weights by Liu et al.; listed in {_OFFICIAL_README}).",
    },
    "builtin": {
        "url": None,
        "sha256": None,
        "licence": "Apache-2.0 (this project)",
        "backbone": "segresnet",
        "format": "universal",
        "filename": "builtin.pt",
        "description": "The project's own SegResNet weights, shipped as universal/resources/builtin.pt.",
    },
}

_BUILTIN_PATH = Path(__file__).resolve().parents[1] / "resources" / "builtin.pt"


def builtin_weights_path() -> Path:
    """Where the built-in weights live (inside the installed package: ``universal/resources/builtin.pt``)."""
    return _BUILTIN_PATH


# --------------------------------------------------------------------------------------------------------------------
# reading files safely
# --------------------------------------------------------------------------------------------------------------------


def _read(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint file at {str(path)!r}; check the path.")
    try:
        # silence torch's notes (e.g. "Detected pickle protocol 4"): the outcome is what matters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if _is_pickle_container(path):
            raise CheckpointError(
                f"{path.name} contains Python objects other than tensors and plain containers, and is refused "
                f"(unpickling it could run arbitrary code). Re-save its state dict, or use a checkpoint written by "
                f"universal.model.save_checkpoint. Detail: {_weights_only_detail(exc)}"
            ) from None
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint file (unreadable as one); pass a .pt/.pth file saved with "
            "torch.save."
        ) from None
    except Exception as exc:
        # RuntimeError (bad zip archive), EOFError (empty), KeyError/IndexError (garbage)...
        detail = ""
        if isinstance(exc, RuntimeError) and str(exc).strip():
            detail = f" ({str(exc).strip().splitlines()[0]})"
        raise CheckpointError(
            f"{path.name} is not a PyTorch checkpoint file: it cannot be read as one{detail}; it may be of another "
            "kind, empty or truncated. Pass a .pt/.pth file saved with torch.save."
        ) from None


def _is_pickle_container(path: Path) -> bool:
    """A torch.save zip archive or a pickle stream (protocol >= 2), as opposed to some other kind of file."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _weights_only_detail(exc: BaseException) -> str:
    """The informative line of torch's weights-only refusal (e.g. 'Unsupported global: GLOBAL mod.Class')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _is_universal(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def _check_plain(value: Any, where: str) -> None:
    """Only values that ``torch.load(weights_only=True)`` reads back are allowed in a checkpoint."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}; use str or int keys.")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise CheckpointError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors, str, int, float, bool, None, lists and "
        "dicts (so that they load with weights_only=True)."
    )


def _load_state_strict(model: UniversalModel, state: Mapping[str, Any], source: str) -> UniversalModel:
    """Load ``state`` into ``model`` after checking every key and shape; report all problems at once."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = []
    for key, target in expected.items():
        if key not in state:
            continue
        value = state[key]
        if not torch.is_tensor(value):
            mismatched.append(f"{key}: not a tensor ({type(value).__name__})")
        elif tuple(value.shape) != tuple(target.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
        elif value.is_floating_point() and not torch.isfinite(value).all():
            mismatched.append(f"{key}: contains NaN or infinite values")
    if missing or unexpected or mismatched:
        lines = [
            f"{source} does not fit a {model.backbone_name} Universal Model with {model.num_classes} classes "
            f"and {model.embed_dim}-d embeddings (another architecture, class count or a corrupt file):"
        ]
        if mismatched:
            lines.append(f"  mismatched ({len(mismatched)}):")
            lines += [f"    {m}" for m in mismatched]
        if missing:
            lines.append(f"  missing ({len(missing)}):")
            lines += [f"    {k}" for k in missing]
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}):")
            lines += [f"    {k}" for k in unexpected]
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(dict(state), strict=True)
    return model


# --------------------------------------------------------------------------------------------------------------------
# the project's own format
# --------------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    model: UniversalModel, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> Path:
    """Save ``model`` (weights + config) atomically to ``path``; ``extra`` holds plain values (epoch, metrics...).

    The file is a dict of tensors, str, int, float, lists and dicts only, so that ``torch.load(path,
    weights_only=True)`` reads it; :func:`load_checkpoint` rebuilds the model from it.

    >>> import tempfile, numpy as np
    >>> from universal.model import create_model
    >>> m = create_model("segresnet", classes=["liver"], encoder="onehot", embeddings=np.ones((1, 32), "float32"))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = save_checkpoint(m, f"{d}/m.pt", extra={"epoch": 3})
    ...     load_checkpoint(p).class_names
    ['liver']
    """
    while not isinstance(model, UniversalModel) and isinstance(
        getattr(model, "module", None) or getattr(model, "_orig_mod", None), torch.nn.Module
    ):  # DistributedDataParallel (.module) or torch.compile (._orig_mod) wrappers
        model = getattr(model, "module", None) or model._orig_mod
    if not isinstance(model, UniversalModel):
        raise CheckpointError(f"save_checkpoint needs a UniversalModel, got {type(model).__name__}.")
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "spec": model.spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    from universal.io import atomic_write

    return atomic_write(path, lambda fh: torch.save(payload, fh))


def read_spec(obj: Mapping[str, Any], source: str) -> ModelSpec:
    """The :class:`~universal.spec.ModelSpec` of a loaded universal checkpoint object (version 1 migrated)."""
    version = obj.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION or version < 1:
        raise CheckpointError(
            f"{source} is a universal checkpoint of version {version!r}; this version of universal reads up to "
            f"version {CHECKPOINT_VERSION}. Upgrade universal."
        )
    if version == 1:
        config = obj.get("config")
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{source} lacks its 'config' (a corrupt universal checkpoint).")
        required = ("backbone", "class_names", "encoder_name", "template", "embed_dim")
        absent = [k for k in required if k not in config]
        if absent:
            raise CheckpointError(f"{source}: its config lacks {absent} (a corrupt universal checkpoint).")
        extra = obj.get("extra") if isinstance(obj.get("extra"), Mapping) else {}
        try:
            return migrate_v1(config, extra)
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
    try:
        return ModelSpec.from_dict(obj.get("spec"))
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc} (a corrupt universal checkpoint)") from None


def model_from_spec(spec: ModelSpec, source: str = "the spec") -> UniversalModel:
    """An untrained model with ``spec``'s architecture and contract (zero embeddings until weights are loaded)."""
    if spec.backbone.lower() not in list_models():
        raise CheckpointError(
            f"{source} uses the backbone {spec.backbone!r}, which this installation does not have "
            f"(available: {list_models()})."
        )
    from universal import taxonomy
    from universal.errors import UniversalError

    try:
        canonical = [c.name for c in taxonomy.resolve_classes(list(spec.classes))]
    except UniversalError as exc:
        raise CheckpointError(f"{source}: its classes cannot be read: {exc}") from None
    if canonical != list(spec.classes):
        spec = spec.replace(classes=tuple(canonical))
    try:
        return UniversalModel.from_spec(spec)
    except UniversalError as exc:
        raise CheckpointError(f"{source}: cannot rebuild its model from the spec: {exc}") from None


def _model_from_universal(obj: Mapping[str, Any], source: str) -> UniversalModel:
    spec = read_spec(obj, source)
    state = obj.get("state_dict")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} lacks its 'state_dict' (a corrupt universal checkpoint).")
    model = model_from_spec(spec, source)
    return _load_state_strict(model, state, source)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> UniversalModel:
    """Rebuild a :class:`UniversalModel` from a file written by :func:`save_checkpoint` (model in eval mode).

    The checkpoint's ``extra`` dict is attached as ``model.checkpoint_extra``.
    """
    obj = _read(path, map_location)
    source = Path(path).name
    if not _is_universal(obj):
        if _looks_official(obj):
            raise CheckpointError(
                f"{source} is an official Universal Model checkpoint, not a universal one; load it with "
                "universal.model.load_official(path) or load_pretrained(path)."
            )
        raise CheckpointError(
            f"{source} is not a universal checkpoint (no format={CHECKPOINT_FORMAT!r} entry); "
            "save models with universal.model.save_checkpoint."
        )
    model = _model_from_universal(obj, source)
    model.checkpoint_extra = dict(obj.get("extra") or {})  # type: ignore[attr-defined]
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# the official release's format
# --------------------------------------------------------------------------------------------------------------------


def _official_state(obj: Any) -> dict[str, Any] | None:
    """The state dict inside an official checkpoint object, without ``module.`` prefixes (``None`` if not one)."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("net", "state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not obj or not all(isinstance(k, str) for k in obj):
        return None
    state = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def _looks_official(obj: Any) -> bool:
    state = _official_state(obj)
    return bool(state) and any(k == "organ_embedding" or k.startswith("controller.") for k in state)


def _detect_backbone(state: Mapping[str, Any]) -> str | None:
    keys = list(state)
    if any("swinViT." in k for k in keys):
        return "swinunetr"
    if any("down_tr64." in k for k in keys):
        return "unet"
    return None


def load_official(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    backbone: str | None = None,
    map_location: Any = "cpu",
) -> UniversalModel:
    """Load a checkpoint of the official CLIP-Driven Universal Model release (model in eval mode).

    Args:
        path_or_state_dict: a file (``{'net': state_dict}`` or a bare state dict, as saved from
            DistributedDataParallel with ``module.`` prefixes) or such a dict already in memory.
        backbone: ``"unet"`` or ``"swinunetr"``; ``None`` detects it from the key names.

    Returns:
        a model with the 32 universal classes, ``encoder_name="table:official-clip"``, the official template
        and the checkpoint's ``organ_embedding`` as its prompt embeddings. The released weights are
        CC BY-NC-ND 4.0 (research only).
    """
    if isinstance(path_or_state_dict, Mapping):
        return _official_from_object(path_or_state_dict, "the given state dict", backbone)
    return _official_from_object(
        _read(path_or_state_dict, map_location), Path(path_or_state_dict).name, backbone
    )


def _official_from_object(obj: Any, source: str, backbone: str | None = None) -> UniversalModel:
    if _is_universal(obj):
        raise CheckpointError(
            f"{source} is a universal checkpoint; load it with universal.model.load_checkpoint."
        )
    state = _official_state(obj)
    if not state:
        raise CheckpointError(
            f"{source} is not an official Universal Model checkpoint: expected {{'net': state_dict}} or a state dict "
            f"of tensors, got {type(obj).__name__}."
        )
    name = str(backbone).lower() if backbone else _detect_backbone(state)
    if name is None:
        sample = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"{source}: cannot tell its backbone from its keys (neither Swin UNETR 'swinViT.*' nor U-Net "
            f"'down_tr64.*'; first keys: {sample}). Pass backbone='unet' or 'swinunetr' if it is one of them."
        )
    if name not in ("unet", "swinunetr"):
        raise CheckpointError(f"The official release has 'unet' and 'swinunetr' backbones, not {backbone!r}.")
    # Swin keys may lack the 'backbone.' prefix (the official loaders add it)
    state = {
        (k if k.startswith("backbone.") or k.startswith(_HEAD_PREFIXES) else f"backbone.{k}"): v
        for k, v in state.items()
    }
    emb = state.get("organ_embedding")
    if not torch.is_tensor(emb) or emb.dim() != 2:
        raise CheckpointError(
            f"{source} has no 2-D 'organ_embedding' (the prompt embeddings of its classes); it is not a "
            "Universal Model checkpoint of the official release."
        )
    # the 32 universal classes in the official (= taxonomy) order; a checkpoint with another class count is
    # reported by the strict check below (organ_embedding's shape), together with every other mismatch
    from universal.taxonomy import CLASSES

    spec = official_spec(
        name,
        int(emb.shape[1]),
        tuple(c.name for c in CLASSES),
        encoder=OFFICIAL_ENCODER_NAME,
        template=OFFICIAL_TEMPLATE,
    )
    return _load_state_strict(UniversalModel.from_spec(spec), state, source).eval()


# --------------------------------------------------------------------------------------------------------------------
# registry and downloads
# --------------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Folder of downloaded weights: ``$UNIVERSAL_CACHE_DIR/weights`` or ``~/.cache/universal/weights``."""
    root = os.environ.get("UNIVERSAL_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "universal"
    return base / "weights"


def download_weights(
    name: str, directory: str | os.PathLike[str] | None = None, progress: bool = True, accept_licence: bool = False
) -> Path:
    """Download the weights ``name`` of the registry once into the cache (or ``directory``); return the path.

    See :func:`universal.model.sources.download`: a resumable download through ``.NAME.part`` (never a partial
    file under the final name), the pinned sha256 checked or the first download's recorded and checked at every
    later call, a licence that is not open refused unless ``accept_licence`` (recorded: asked once). ``progress``
    draws a tqdm bar.
    """
    from universal.model import sources

    source = sources.get_source(name)
    if not progress:
        return sources.download(source, directory=directory, accept_licence=accept_licence)
    update, close = sources.tqdm_progress(source.name)
    try:
        return sources.download(source, directory=directory, progress=update, accept_licence=accept_licence)
    finally:
        close()


def _with_file(model: UniversalModel, file: Path) -> UniversalModel:
    """``model`` with ``weights_file``: the checkpoint it was read from (reports identify the weights by its
    sha256)."""
    model.weights_file = str(Path(file).resolve())  # type: ignore[attr-defined]
    return model


def _from_object(obj: Any, source: str) -> UniversalModel:
    """A model from a loaded checkpoint object of either format (detected)."""
    if _is_universal(obj):
        model = _model_from_universal(obj, source)
        model.checkpoint_extra = dict(obj.get("extra") or {})  # type: ignore[attr-defined]
        return model.eval()
    state = _official_state(obj)
    if state and (_looks_official(obj) or _detect_backbone(state)):
        return _official_from_object(obj, source)
    raise CheckpointError(
        f"{source} is neither a universal checkpoint nor an official Universal Model checkpoint "
        f"(got {type(obj).__name__} without the expected keys)."
    )


def load_pretrained(
    name_or_path: str | os.PathLike[str] = "builtin",
    map_location: Any = "cpu",
    progress: bool = True,
    accept_licence: bool = False,
) -> UniversalModel:
    """A ready model (eval mode) from a checkpoint path (universal or official format), a registry name or a
    Hugging Face Hub spec ``hf-hub:ORG/REPO[:FILE][@REVISION]``.

    Names (:func:`universal.model.sources.sources`): ``"builtin"`` (the project's own weights,
    ``universal/resources/builtin.pt``), ``"universal-unet"`` and ``"universal-swinunetr"`` (the official release,
    downloaded once; CC BY-NC-ND 4.0, research only: ``accept_licence=True`` the first time), and the entries of
    ``$UNIVERSAL_WEIGHTS_REGISTRY``. A downloaded file is checked against its pinned or recorded sha256 at every
    load. Offline, a download raises ``DownloadError`` saying how to fetch the file by hand and pass its path.
    """
    from universal.model import sources

    if sources.is_hub_spec(name_or_path):
        file = sources.fetch_hub(str(name_or_path))
        return _with_file(_from_object(_read(file, map_location), file.name), file)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _with_file(_from_object(_read(path, map_location), path.name), path)
    key = str(name_or_path).lower()
    if (path.suffix or os.sep in str(name_or_path)) and key not in sources.sources():
        raise CheckpointError(f"No checkpoint file at {str(name_or_path)!r}; check the path.")
    if key == "builtin":
        builtin = builtin_weights_path()
        if not builtin.is_file():
            raise CheckpointError(
                "The built-in weights are not shipped yet (universal/resources/builtin.pt is missing): train a model "
                "with `universal train` and pass its checkpoint path, or use 'universal-unet' / "
                "'universal-swinunetr' (official weights, research only)."
            )
        return _with_file(_from_object(_read(builtin, map_location), builtin.name), builtin)
    file = download_weights(key, progress=progress, accept_licence=accept_licence)
    return _with_file(_from_object(_read(file, map_location), file.name), file)
