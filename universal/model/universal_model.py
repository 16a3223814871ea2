"""The Universal Model: a vision backbone, a text-driven controller and one tiny dynamic head per class.

For a CT patch ``x`` (B, 1, X, Y, Z) and the prompt embeddings ``E`` (K, D) of the model's classes:

- the backbone gives a bottleneck feature and a full-resolution decoder feature;
- ``GAP`` (GroupNorm(16) → ReLU → global average pool → 1×1×1 conv to 256) pools the bottleneck into the global image
  feature ``f`` (B, 256); ``precls_conv`` (GroupNorm(16) → ReLU → 1×1×1 conv to 8) makes the head input
  ``F`` (B, 8, X, Y, Z);
- ``text_to_vision`` (Linear D → 256, ReLU) maps each class's embedding to ``w_k`` (256);
- the ``controller`` (a 1×1×1 conv 512 → 153, i.e. a linear map) turns ``[f, w_k]`` (image first) into the 153
  parameters of class k's head: weights 8×8, 8×8, 1×8 (output-major), then biases 8, 8, 1;
- the head ``conv(w1, b1) → ReLU → conv(w2, b2) → ReLU → conv(w3, b3)`` (all 1×1×1) gives class k's logit map.

The heads of all requested classes and batch items are evaluated together with three batched matrix products
(:func:`dynamic_heads`), not with a Python loop over classes or batch items. Parameter and buffer names match the
official release (``GAP.0``, ``GAP.3``, ``precls_conv.0``, ``precls_conv.2``, ``text_to_vision``, ``controller``,
``organ_embedding``), so its checkpoints load unchanged (see ``universal.model.checkpoints``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from universal import prompts, taxonomy
from universal.errors import InputError
from universal.io import to_json
from universal.model.backbones import build_backbone, get_backbone_spec
from universal.preprocess import PreprocessConfig
from universal.spec import InferenceDefaults, ModelSpec, Provenance

__all__ = [
    "CONTROLLER_SPLITS",
    "HEAD_CHANNELS",
    "NUM_CONTROLLER_PARAMS",
    "UniversalModel",
    "create_model",
    "dynamic_heads",
    "split_controller_params",
]

#: channels of the head input and of the two hidden layers of every dynamic head
HEAD_CHANNELS = 8
#: sizes of the blocks of the controller output, in order: weights 8×8, 8×8, 1×8, then biases 8, 8, 1
CONTROLLER_SPLITS: tuple[int, ...] = (
    HEAD_CHANNELS * HEAD_CHANNELS,
    HEAD_CHANNELS * HEAD_CHANNELS,
    HEAD_CHANNELS,
    HEAD_CHANNELS,
    HEAD_CHANNELS,
    1,
)
#: parameters per class (153)
NUM_CONTROLLER_PARAMS = sum(CONTROLLER_SPLITS)
#: width of the global image feature and of the projected text feature
GLOBAL_DIM = 256


def split_controller_params(
    params: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split controller outputs ``(..., 153)`` into the head parameters.

    Returns ``w1 (..., 8, 8)``, ``w2 (..., 8, 8)``, ``w3 (..., 1, 8)`` (row = output channel) and
    ``b1 (..., 8)``, ``b2 (..., 8)``, ``b3 (..., 1)``.

    >>> w1, w2, w3, b1, b2, b3 = split_controller_params(torch.zeros(2, 5, 153))
    >>> tuple(w1.shape), tuple(w3.shape), tuple(b3.shape)
    ((2, 5, 8, 8), (2, 5, 1, 8), (2, 5, 1))
    """
    if params.shape[-1] != NUM_CONTROLLER_PARAMS:
        raise ValueError(f"expected {NUM_CONTROLLER_PARAMS} controller outputs, got {params.shape[-1]}")
    c = HEAD_CHANNELS
    lead = params.shape[:-1]
    w1, w2, w3, b1, b2, b3 = torch.split(params, CONTROLLER_SPLITS, dim=-1)
    return (
        w1.reshape(*lead, c, c),
        w2.reshape(*lead, c, c),
        w3.reshape(*lead, 1, c),
        b1,
        b2,
        b3,
    )


def dynamic_heads(
    features: torch.Tensor, params: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Evaluate the per-class dynamic heads of all classes and batch items at once.

    Args:
        features: head input ``(B, 8, X, Y, Z)`` (any number of spatial dims).
        params: controller outputs ``(B, k, 153)`` (see :func:`split_controller_params`).
        chunk_size: ``None`` (default) evaluates all k classes in one batched computation, whose largest
            intermediate is ``(B, k, 8, N)`` floats (N voxels). An integer bounds that memory to
            ``(B, chunk_size, 8, N)`` by looping over *chunks* of classes (not over single classes).

    Returns:
        logits ``(B, k, X, Y, Z)``.

    >>> logits = dynamic_heads(torch.randn(2, 8, 4, 4, 4), torch.randn(2, 3, 153))
    >>> tuple(logits.shape)
    (2, 3, 4, 4, 4)
    """
    b, c, *spatial = features.shape
    if c != HEAD_CHANNELS:
        raise ValueError(f"head input must have {HEAD_CHANNELS} channels, got {c}")
    if params.dim() != 3 or params.shape[0] != b:
        raise ValueError(f"params must be (B={b}, k, {NUM_CONTROLLER_PARAMS}), got {tuple(params.shape)}")
    k = params.shape[1]
    if chunk_size is not None and 0 < chunk_size < k:  # memory bound: loop over chunks of classes
        parts = [dynamic_heads(features, params[:, i : i + chunk_size]) for i in range(0, k, chunk_size)]
        return torch.cat(parts, dim=1)
    n = math.prod(spatial)
    feats = features.reshape(b, c, n)
    w1, w2, w3, b1, b2, b3 = split_controller_params(params)
    # layer 1: one (k*8 × 8) @ (8 × N) product per batch item → (B, k*8, N)
    h = torch.baddbmm(b1.reshape(b, k * c, 1), w1.reshape(b, k * c, c), feats)
    h = F.relu(h, inplace=True).reshape(b * k, c, n)
    # layers 2 and 3: one small product per (batch item, class) pair, batched → (B*k, 8, N), (B*k, 1, N)
    h = F.relu(torch.baddbmm(b2.reshape(b * k, c, 1), w2.reshape(b * k, c, c), h), inplace=True)
    out = torch.baddbmm(b3.reshape(b * k, 1, 1), w3.reshape(b * k, 1, c), h)
    return out.reshape(b, k, *spatial)


def _plain(value: Any) -> Any:
    """Backbone kwargs → plain JSON values (tuples → lists, numpy → Python) for the config; other types raise."""
    try:
        return to_json(value)
    except TypeError as exc:
        raise TypeError(f"backbone arguments must be numbers, strings, lists or dicts; {exc}") from None


class UniversalModel(nn.Module):
    """Text-prompted one-vs-all segmentation network (build it with :func:`create_model`).

    Attributes:
        backbone: the vision backbone (returns bottleneck and decoder features).
        backbone_name: its registry name; ``backbone_kwargs`` the arguments it was built with.
        class_names: canonical universal names of the K classes, in output order.
        encoder_name: stable name of the text encoder that made ``organ_embedding`` (e.g. ``"minilm"``).
        template: the prompt template (e.g. ``"A computerized tomography of a {}"``).
        organ_embedding: buffer ``(K, D)``, one prompt embedding per class (saved in checkpoints).
        preprocessing: the input preprocessing the model expects (:class:`universal.preprocess.PreprocessConfig`).
        inference_defaults: window size, overlap, threshold, precision (:class:`universal.spec.InferenceDefaults`).
        provenance: how the weights were made (:class:`universal.spec.Provenance`).
        spec: all of the above as one frozen :class:`universal.spec.ModelSpec` (what checkpoints store).
        head_chunk_size: ``None`` or a number of classes per chunk of the dynamic heads (memory bound).

    >>> model = create_model("segresnet", classes=["liver", "spleen"], embeddings=np.eye(2, 32, dtype="float32"))
    >>> model(torch.rand(1, 1, 32, 32, 32)).shape
    torch.Size([1, 2, 32, 32, 32])
    """

    organ_embedding: torch.Tensor

    def __init__(
        self,
        backbone: str,
        class_names: Sequence[str],
        embeddings: torch.Tensor | np.ndarray,
        encoder_name: str,
        template: str,
        backbone_kwargs: dict[str, Any] | None = None,
        preprocessing: PreprocessConfig | None = None,
        inference: InferenceDefaults | None = None,
        provenance: Provenance | None = None,
    ) -> None:
        super().__init__()
        for name, value, kind in (
            ("preprocessing", preprocessing, PreprocessConfig),
            ("inference", inference, InferenceDefaults),
            ("provenance", provenance, Provenance),
        ):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        emb = (
            torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
            if not torch.is_tensor(embeddings)
            else embeddings
        )
        emb = emb.detach().to(torch.float32).clone()
        if emb.dim() != 2 or emb.shape[0] != len(class_names) or emb.shape[1] < 1:
            from universal.errors import InputError

            raise InputError(
                f"Embeddings must have shape (K={len(class_names)}, D), one row per class; got {tuple(emb.shape)}."
            )
        self.backbone_name = get_backbone_spec(backbone).name
        self.backbone_kwargs: dict[str, Any] = _plain(dict(backbone_kwargs or {}))
        self.class_names: list[str] = list(class_names)
        self._position = {name: i for i, name in enumerate(self.class_names)}
        self.encoder_name = str(encoder_name)
        self.template = str(template)
        self.preprocessing: PreprocessConfig = preprocessing or PreprocessConfig()
        self.inference_defaults: InferenceDefaults = inference or InferenceDefaults()
        self.provenance: Provenance = provenance or Provenance(source="created")
        self.head_chunk_size: int | None = None

        self.backbone = build_backbone(self.backbone_name, **self.backbone_kwargs)
        c_b, c_d = int(self.backbone.bottleneck_channels), int(self.backbone.decoder_channels)
        self.GAP = nn.Sequential(
            nn.GroupNorm(16, c_b),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(c_b, GLOBAL_DIM, kernel_size=1),
        )
        self.precls_conv = nn.Sequential(
            nn.GroupNorm(16, c_d),
            nn.ReLU(inplace=True),
            nn.Conv3d(c_d, HEAD_CHANNELS, kernel_size=1),
        )
        self.text_to_vision = nn.Linear(emb.shape[1], GLOBAL_DIM)
        self.controller = nn.Conv3d(2 * GLOBAL_DIM, NUM_CONTROLLER_PARAMS, kernel_size=1)
        self.register_buffer("organ_embedding", emb)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        """K, the number of classes the model predicts."""
        return len(self.class_names)

    @property
    def embed_dim(self) -> int:
        """D, the width of the prompt embeddings."""
        return int(self.organ_embedding.shape[1])

    @property
    def size_divisor(self) -> int:
        """Input spatial sizes must be multiples of this (8 for segresnet/unet, 32 for swinunetr)."""
        return int(self.backbone.size_divisor)

    @property
    def spec(self) -> ModelSpec:
        """The model's contract (architecture, preprocessing, inference defaults, provenance), frozen."""
        return ModelSpec(
            backbone=self.backbone_name,
            backbone_kwargs=copy.deepcopy(self.backbone_kwargs),
            classes=tuple(self.class_names),
            encoder=self.encoder_name,
            template=self.template,
            embed_dim=self.embed_dim,
            preprocessing=self.preprocessing,
            inference=self.inference_defaults,
            provenance=self.provenance,
        )

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> UniversalModel:
        """A model with ``spec``'s architecture and contract (zero prompt embeddings until weights are loaded)."""
        return cls(
            spec.backbone,
            list(spec.classes),
            np.zeros((len(spec.classes), spec.embed_dim), dtype=np.float32),
            encoder_name=spec.encoder,
            template=spec.template,
            backbone_kwargs=dict(spec.to_dict()["backbone_kwargs"]),
            preprocessing=spec.preprocessing,
            inference=spec.inference,
            provenance=spec.provenance,
        )

    def config(self) -> dict[str, Any]:
        """The spec as plain values (``self.spec.to_dict()``; str/int/float/list/dict only)."""
        return self.spec.to_dict()

    # ---------------------------------------------------------------------------------------------- classes
    def class_positions(self, classes: Iterable[Any] | str | None = None) -> list[int]:
        """Output positions (0-based, in ``class_names``) of ``classes`` (names/aliases/indices; ``None`` → all)."""
        if classes is None:
            return list(range(self.num_classes))
        if isinstance(classes, (str, int)) or not isinstance(classes, Iterable):
            classes = [classes]
        from universal import taxonomy

        infos = taxonomy.resolve_classes(list(classes))
        missing = [info.name for info in infos if info.name not in self._position]
        if missing:
            from universal.errors import ClassNameError

            raise ClassNameError(
                f"This model does not predict {missing}; it predicts {self.class_names}. "
                "Choose among those, or use a model trained for the classes you need."
            )
        return [self._position[info.name] for info in infos]

    # ---------------------------------------------------------------------------------------------- prompts
    def set_prompts(self, template: str | None = None, encoder: Any = None) -> UniversalModel:
        """Re-encode the class prompts with ``template`` (default: the current one) and ``encoder``.

        ``encoder`` defaults to the encoder that made the current embeddings (``encoder_name``); it must give
        embeddings of the model's width D. Returns ``self``.
        """
        from universal import prompts, taxonomy

        template = self.template if template is None else prompts.resolve_template(template)
        if encoder is None:
            from universal.errors import EncoderUnavailableError

            try:
                enc = prompts.get_encoder(self.encoder_name)
            except EncoderUnavailableError as exc:
                raise EncoderUnavailableError(
                    f"The prompts of this model were made by {self.encoder_name!r}, which cannot be rebuilt from "
                    f"its name here ({exc}). Pass encoder= explicitly: an encoder of width {self.embed_dim} "
                    "(e.g. 'clip' or 'table:/path/to/embeddings.npy' for CLIP ViT-B/32)."
                ) from None
        else:
            enc = prompts.get_encoder(encoder)
        if int(enc.dim) != self.embed_dim:
            from universal.errors import InputError

            raise InputError(
                f"Encoder {enc.name!r} gives {enc.dim}-d embeddings but this model takes {self.embed_dim}-d ones "
                f"(it was trained with {self.encoder_name!r}); use an encoder of the same width."
            )
        emb = prompts.encode_prompts(taxonomy.resolve_classes(self.class_names), template, enc)
        emb = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        if tuple(emb.shape) != tuple(self.organ_embedding.shape):
            from universal.errors import InputError

            raise InputError(
                f"The encoder returned embeddings of shape {tuple(emb.shape)}; expected {tuple(self.organ_embedding.shape)}."
            )
        with torch.no_grad():
            self.organ_embedding.copy_(emb.to(self.organ_embedding.device))
        self.template = template
        self.encoder_name = str(enc.name)
        return self

    # ---------------------------------------------------------------------------------------------- forward
    def controller_params(
        self, global_feature: torch.Tensor, positions: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Head parameters ``(B, k, 153)`` from the global feature ``(B, 256)`` and the classes at ``positions``.

        Equal to the 1×1×1 controller conv applied to ``concat[global feature, relu(text_to_vision(embedding))]``
        for every (batch item, class) pair; computed as two matrix products (image part + text part).
        """
        emb = self.organ_embedding if positions is None else self.organ_embedding[list(positions)]
        text = F.relu(self.text_to_vision(emb.to(global_feature.dtype)))  # (k, 256)
        weight = self.controller.weight.reshape(NUM_CONTROLLER_PARAMS, 2 * GLOBAL_DIM)
        image_part = global_feature @ weight[:, :GLOBAL_DIM].t()  # (B, 153)
        text_part = text @ weight[:, GLOBAL_DIM:].t() + self.controller.bias  # (k, 153)
        return image_part[:, None, :] + text_part[None, :, :]

    def forward(self, x: torch.Tensor, classes: Iterable[Any] | str | None = None) -> torch.Tensor:
        """Logits ``(B, k, X, Y, Z)`` of the requested classes (``None`` → all ``class_names``, in that order).

        Args:
            x: preprocessed CT patches ``(B, 1, X, Y, Z)``, intensities in [0, 1]; spatial sizes multiples of
                ``size_divisor``.
            classes: class names (aliases, universal indices) among ``class_names``; only their heads are computed.
        """
        if x.dim() != 5 or x.shape[1] != 1:
            from universal.errors import InputError

            raise InputError(f"Expected a (B, 1, X, Y, Z) tensor, got shape {tuple(x.shape)}.")
        div = self.size_divisor
        if any(s % div for s in x.shape[2:]):
            from universal.errors import InputError

            raise InputError(
                f"Patch size {tuple(x.shape[2:])} is not a multiple of {div} (needed by the {self.backbone_name} "
                "backbone); pad or crop the patch."
            )
        positions = self.class_positions(classes)
        bottleneck, decoded = self.backbone(x)
        global_feature = self.GAP(bottleneck).flatten(1)  # (B, 256)
        features = self.precls_conv(decoded)  # (B, 8, X, Y, Z)
        params = self.controller_params(global_feature, positions)  # (B, k, 153)
        return dynamic_heads(features, params, chunk_size=self.head_chunk_size)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, classes={self.num_classes}, encoder={self.encoder_name!r}, "
            f"embed_dim={self.embed_dim}"
        )


def create_model(
    backbone: str = "segresnet",
    classes: Iterable[Any] | None = None,
    encoder: Any = "minilm",
    template: str | None = None,
    embeddings: np.ndarray | torch.Tensor | None = None,
    embed_dim: int | None = None,
    preprocessing: PreprocessConfig | None = None,
    inference: InferenceDefaults | None = None,
    provenance: Provenance | None = None,
    **backbone_kwargs: Any,
) -> UniversalModel:
    """Build a Universal Model (randomly initialised) for ``classes`` with prompt embeddings.

    Args:
        backbone: a name from :func:`list_models` (``"segresnet"`` default, ``"unet"``, ``"swinunetr"``).
        classes: universal class names / aliases / indices; ``None`` → all 32.
        encoder: text encoder spec for ``universal.prompts.get_encoder`` (or a ``TextEncoder``); only recorded
            (not run) when ``embeddings`` or ``embed_dim`` is given.
        template: prompt template (key or text with ``{}``); ``None`` → ``prompts.DEFAULT_TEMPLATE``.
        embeddings: ``(K, D)`` prompt embeddings, one row per class (in ``classes`` order).
        embed_dim: D. With ``embeddings`` it must match; alone it builds zero placeholder embeddings (used when
            the real ones are loaded from a checkpoint afterwards).
        preprocessing: the input preprocessing the weights expect (default: 1.5 mm, HU [-175, 250], crop).
        inference: inference defaults (window size, overlap, threshold, precision); provenance: how it was made.
        **backbone_kwargs: arguments of the backbone (e.g. ``init_filters=16`` for segresnet).

    >>> m = create_model("segresnet", classes=["liver", "spleen"], encoder="onehot", embed_dim=32)
    >>> m.class_names, tuple(m.organ_embedding.shape)
    (['liver', 'spleen'], (2, 32))
    """
    get_backbone_spec(backbone)  # unknown backbone → clear error before any encoding
    infos = taxonomy.resolve_classes(classes)
    if not infos:
        raise InputError(
            "No classes given: name at least one universal class (or pass classes=None for all 32)."
        )
    if template is None or "{}" not in template:
        template = prompts.DEFAULT_TEMPLATE if template is None else prompts.resolve_template(template)
    emb, encoder_name = _prompt_embeddings(infos, encoder, template, embeddings, embed_dim)
    return UniversalModel(
        backbone,
        [info.name for info in infos],
        emb,
        encoder_name=encoder_name,
        template=template,
        backbone_kwargs=backbone_kwargs,
        preprocessing=preprocessing,
        inference=inference,
        provenance=provenance,
    )


def _prompt_embeddings(
    infos: Sequence[Any], encoder: Any, template: str, embeddings: Any, embed_dim: int | None
) -> tuple[np.ndarray, str]:
    """``(K, D)`` float32 prompt embeddings for :func:`create_model` and the name of the encoder they come from.

    Given ``embeddings`` are checked, ``embed_dim`` alone gives zero placeholders, else ``encoder`` is run.
    """
    n = len(infos)
    if embeddings is None and embed_dim is None:
        enc = prompts.get_encoder(encoder) if isinstance(encoder, str) else encoder
        return np.asarray(prompts.encode_prompts(infos, template, enc), dtype=np.float32), str(enc.name)
    if embeddings is None:
        if int(embed_dim) < 1:
            raise InputError(f"embed_dim must be a positive integer, got {embed_dim}.")
        emb = np.zeros((n, int(embed_dim)), dtype=np.float32)
    else:
        emb = np.asarray(
            embeddings.detach().cpu() if torch.is_tensor(embeddings) else embeddings, dtype=np.float32
        )
        if emb.ndim != 2 or emb.shape[0] != n:
            raise InputError(f"Embeddings must have shape (K={n}, D) for the {n} classes, got {emb.shape}.")
        if embed_dim is not None and emb.shape[1] != int(embed_dim):
            raise InputError(f"Embeddings are {emb.shape[1]}-d but embed_dim={embed_dim}; they must agree.")
        if not np.isfinite(emb).all():
            raise InputError("Embeddings contain NaN or infinite values.")
    return emb, encoder if isinstance(encoder, str) else str(encoder.name)
