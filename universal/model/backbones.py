"""Vision backbones of the Universal Model and the tiny registry that names them.

Every backbone is an ``nn.Module`` whose ``forward(x)`` takes a CT patch ``(B, 1, X, Y, Z)`` (intensities scaled to
[0, 1]) and returns two tensors:

- the **bottleneck** feature ``(B, C_b, X/s, Y/s, Z/s)`` (deepest encoder output; pooled into the 256-d global
  feature by the shared head), and
- the **decoder** feature ``(B, C_d, X, Y, Z)`` at full patch resolution (turned into the 8-channel head input).

It carries ``bottleneck_channels`` (C_b), ``decoder_channels`` (C_d) and ``size_divisor`` (spatial sizes of the input
must be multiples of it). Backbones are declared with :func:`register_backbone` (timm style), so
``create_model(name)`` and :func:`list_models` see them and the tests parametrize over all of them. MONAI (slow to
import) is imported only when a MONAI-based backbone is first built.

Registered here:

- ``segresnet`` (default, the FLARE 2023 configuration): MONAI SegResNet, 16 initial filters, blocks_down (1, 2, 2, 4),
  blocks_up (1, 1, 1); C_b = 128 at 1/8, C_d = 16.
- ``unet``: the Models Genesis 3-D U-Net of the official release (parameter names of the released checkpoints);
  C_b = 512 at 1/8, C_d = 64. Its BatchNorm always normalises with the statistics of the current input, taken **per
  sample** (see :class:`PerSampleBatchNorm3d`).
- ``swinunetr``: MONAI's SwinUNETR (feature_size 48) with the patch-merging sub-grid order of MONAI 0.9 that the
  released weights were trained with (:class:`PatchMergingV09`); C_b = 768 at 1/32, C_d = 48.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from universal.errors import InputError

__all__ = [
    "BackboneSpec",
    "PatchMergingV09",
    "PerSampleBatchNorm3d",
    "SegResNetBackbone",
    "SwinUNETRBackbone",
    "UNet3DBackbone",
    "build_backbone",
    "get_backbone_spec",
    "list_models",
    "register_backbone",
]


# --------------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: its name, the factory that builds it and a one-line description."""

    name: str
    factory: Callable[..., nn.Module]
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(
    name: str, description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a backbone factory (a class or a function returning an ``nn.Module``).

    The module it builds must return ``(bottleneck, decoder)`` from ``forward`` and carry the attributes
    ``bottleneck_channels``, ``decoder_channels`` and ``size_divisor``. Keyword arguments of the factory are the
    ``**backbone_kwargs`` of ``create_model`` and are stored in the model's config (so keep them plain: numbers,
    strings, lists).

    >>> @register_backbone("tiny-example")
    ... def tiny(width: int = 16):
    ...     ...
    >>> "tiny-example" in list_models()
    True
    >>> _ = _REGISTRY.pop("tiny-example")
    """
    key = name.lower()

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        doc_lines = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = BackboneSpec(key, factory, description or (doc_lines[0] if doc_lines else ""))
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered backbones, sorted (``create_model(name)`` accepts each).

    >>> list_models()
    ['segresnet', 'swinunetr', 'unet']
    """
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name`` (case-insensitive); unknown → ``InputError`` listing the valid names."""
    spec = _REGISTRY.get(str(name).lower())
    if spec is None:
        raise InputError(
            f"Unknown backbone {name!r}; choose one of {list_models()} (see universal.model.list_models())."
        )
    return spec


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered backbone ``name`` with its keyword arguments."""
    spec = get_backbone_spec(name)
    try:
        module = spec.factory(**kwargs)
    except TypeError as exc:  # an unknown keyword argument
        raise InputError(
            f"Backbone {spec.name!r} does not accept these arguments {sorted(kwargs)}: {exc}"
        ) from exc
    for attr in ("bottleneck_channels", "decoder_channels", "size_divisor"):
        if not hasattr(module, attr):
            raise TypeError(f"backbone {spec.name!r} must define the attribute {attr!r}")
    return module


# --------------------------------------------------------------------------------------------------------------------
# SegResNet (default; FLARE 2023 configuration)
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def _segresnet_class(plain: bool = True) -> type[nn.Module]:
    """The backbone class on the plain-PyTorch SegResNet (``plain``: no MONAI import, the project's up-sampling
    modes) or on MONAI's own (any other mode)."""
    if plain:
        from universal.model.segresnet import SegResNet
    else:
        from monai.networks.nets import SegResNet

    class _SegResNetBackbone(SegResNet):
        """MONAI SegResNet without its final conv; returns (deepest encoder output, last up-block output)."""

        def __init__(
            self,
            init_filters: int = 16,
            blocks_down: Sequence[int] = (1, 2, 2, 4),
            blocks_up: Sequence[int] = (1, 1, 1),
            num_groups: int = 8,
            upsample_mode: str = "nontrainable",
            dropout_prob: float | None = None,
        ) -> None:
            blocks_down, blocks_up = tuple(int(b) for b in blocks_down), tuple(int(b) for b in blocks_up)
            if len(blocks_up) != len(blocks_down) - 1:
                raise ValueError("segresnet needs len(blocks_up) == len(blocks_down) - 1")
            super().__init__(
                spatial_dims=3,
                init_filters=int(init_filters),
                in_channels=1,
                out_channels=1,
                dropout_prob=dropout_prob,
                norm=("GROUP", {"num_groups": int(num_groups)}),
                use_conv_final=False,
                blocks_down=blocks_down,
                blocks_up=blocks_up,
                upsample_mode=upsample_mode,
            )
            del self.conv_final  # unused (use_conv_final=False): keep the parameter count honest
            self.bottleneck_channels = int(init_filters) * 2 ** (len(blocks_down) - 1)
            self.decoder_channels = int(init_filters)
            self.size_divisor = 2 ** (len(blocks_down) - 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            bottleneck, skips = self.encode(x)
            skips.reverse()
            decoded = self.decode(bottleneck, skips)  # use_conv_final=False → last up-block output
            return bottleneck, decoded

    _SegResNetBackbone.__name__ = _SegResNetBackbone.__qualname__ = "SegResNetBackbone"
    return _SegResNetBackbone


@register_backbone(
    "segresnet", "MONAI SegResNet (16 filters, blocks 1-2-2-4 / 1-1-1): FLARE 2023 default, ~4.7 M"
)
def SegResNetBackbone(**kwargs: Any) -> nn.Module:  # noqa: N802 - behaves like a class
    """MONAI ``SegResNet`` (subclass) returning (bottleneck 128 ch at 1/8, decoder 16 ch at full resolution).

    Keyword arguments: ``init_filters=16``, ``blocks_down=(1, 2, 2, 4)``, ``blocks_up=(1, 1, 1)``,
    ``num_groups=8`` (GroupNorm groups), ``upsample_mode="nontrainable"``, ``dropout_prob=None``.

    Raises:
        InputError: ``init_filters`` not a positive multiple of 16 and of ``num_groups`` (GroupNorm).
    """
    filters = kwargs.get("init_filters", 16)
    groups = kwargs.get("num_groups", 8)
    if not isinstance(filters, int) or not isinstance(groups, int) or filters < 1 or groups < 1:
        raise InputError(
            f"segresnet needs positive integers init_filters and num_groups, got {filters}, {groups}"
        )
    if filters % 16 or filters % groups:
        raise InputError(
            f"segresnet init_filters={filters} must be a multiple of 16 (the Universal Model's heads normalise the "
            f"decoder's {filters} channels in 16 GroupNorm groups) and of num_groups={groups}; "
            f"e.g. init_filters={max(16, filters - filters % 16)}"
        )
    from universal.model.segresnet import LIGHT_UPSAMPLE_MODES

    mode = str(kwargs.get("upsample_mode", "nontrainable")).lower()
    return _segresnet_class(mode in LIGHT_UPSAMPLE_MODES)(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# U-Net (Models Genesis layout of the official release)
# --------------------------------------------------------------------------------------------------------------------


class PerSampleBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that always normalises with the statistics of the current input, **per sample**.

    The official U-Net's BatchNorm uses the current batch's statistics in training and evaluation alike, and the
    official inference feeds one window per batch; so each window is normalised by its own per-channel mean and
    (biased) variance over its voxels. Taking the statistics per sample reproduces that for any batch size, so
    batching windows together does not change the outputs. ``running_mean``/``running_var``/``num_batches_tracked``
    are kept (same names as the checkpoints) and updated in training mode, but never used for the output.

    >>> bn = PerSampleBatchNorm3d(2).eval()
    >>> x = torch.randn(2, 2, 4, 4, 4)
    >>> torch.allclose(bn(x)[1:], bn(x[1:]), atol=1e-6)
    True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) tensor, got shape {tuple(x.shape)}")
        update = self.training and self.track_running_stats
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = 0.1 if self.momentum is None else self.momentum
        return F.instance_norm(
            x,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            use_input_stats=True,
            momentum=momentum,
            eps=self.eps,
        )


class _ConvBNReLU(nn.Module):
    """Conv3d 3×3×3 (padding 1, bias) → per-sample BatchNorm → ReLU (names ``conv1``, ``bn1``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = PerSampleBatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    def __init__(self, in_channels: int, mid: int, out: int, pool: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(_ConvBNReLU(in_channels, mid), _ConvBNReLU(mid, out))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class _Up(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(_ConvBNReLU(in_channels + skip_channels, out), _ConvBNReLU(out, out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))  # [upsampled, skip]


@register_backbone("unet", "Models Genesis 3-D U-Net of the official release (per-sample BatchNorm), ~19 M")
class UNet3DBackbone(nn.Module):
    """The official Universal Model U-Net: returns (512 ch at 1/8, 64 ch at full resolution).

    Parameter names (``down_tr64.ops.0.conv1.weight`` …, ``up_tr64.up_conv.bias``) match the released checkpoints.
    """

    bottleneck_channels = 512
    decoder_channels = 64
    size_divisor = 8

    def __init__(self) -> None:
        super().__init__()
        self.down_tr64 = _Down(1, 32, 64, pool=True)
        self.down_tr128 = _Down(64, 64, 128, pool=True)
        self.down_tr256 = _Down(128, 128, 256, pool=True)
        self.down_tr512 = _Down(256, 256, 512, pool=False)
        self.up_tr256 = _Up(512, 256, 256)
        self.up_tr128 = _Up(256, 128, 128)
        self.up_tr64 = _Up(128, 64, 64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, skip64 = self.down_tr64(x)
        x, skip128 = self.down_tr128(x)
        x, skip256 = self.down_tr256(x)
        bottleneck, _ = self.down_tr512(x)
        x = self.up_tr256(bottleneck, skip256)
        x = self.up_tr128(x, skip128)
        x = self.up_tr64(x, skip64)
        return bottleneck, x


# --------------------------------------------------------------------------------------------------------------------
# Swin UNETR (MONAI 1.6 with the MONAI 0.9 patch-merging order)
# --------------------------------------------------------------------------------------------------------------------

#: (d, h, w) offsets of the eight 2×2×2 sub-grids, in the order MONAI 0.9 concatenated them (the released Swin UNETR
#: weights were trained with it): (1, 1, 0) and (0, 1, 1) never appear, (0, 1, 0) and (0, 0, 1) twice.
MERGING_ORDER_V09: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 0, 1),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
)


def _merge_subgrids(x: torch.Tensor, order: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Concatenate the 2×2×2 sub-grids of a channels-last ``(B, D, H, W, C)`` tensor in ``order`` (pads odd sizes)."""
    d, h, w = x.shape[1:4]
    if d % 2 or h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
    return torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in order], dim=-1)


@functools.cache
def _patch_merging_class() -> type[nn.Module]:
    from monai.networks.nets.swin_unetr import PatchMergingV2

    class PatchMergingV09(PatchMergingV2):
        """MONAI ``PatchMergingV2`` (same ``norm``/``reduction`` parameters) with the MONAI 0.9 sub-grid order."""

        order = MERGING_ORDER_V09

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 5:
                raise ValueError(f"expected a (B, D, H, W, C) tensor, got shape {tuple(x.shape)}")
            return self.reduction(self.norm(_merge_subgrids(x, self.order)))

    return PatchMergingV09


def PatchMergingV09(dim: int, norm_layer: type[nn.Module] = nn.LayerNorm, spatial_dims: int = 3) -> nn.Module:  # noqa: N802
    """Patch merging with the MONAI 0.9 sub-grid order (:data:`MERGING_ORDER_V09`); usable as SwinUNETR ``downsample``.

    A subclass of MONAI's ``PatchMergingV2`` (created on first use, so that importing this module does not import
    MONAI), with the same ``norm`` and ``reduction`` parameters.

    >>> pm = PatchMergingV09(dim=1)
    >>> pm(torch.zeros(1, 2, 2, 2, 1)).shape
    torch.Size([1, 1, 1, 1, 2])
    """
    return _patch_merging_class()(dim=dim, norm_layer=norm_layer, spatial_dims=spatial_dims)


def _permute_rearrange(x: torch.Tensor, pattern: str) -> torch.Tensor:
    """The axis-permutation subset of ``einops.rearrange`` (e.g. ``"b c d h w -> b d h w c"``), as a view."""
    src, dst = (side.split() for side in pattern.split("->"))
    if sorted(src) != sorted(dst) or len(src) != x.dim() or any(not t.isidentifier() for t in src):
        raise ValueError(f"only plain axis permutations are supported without einops, not {pattern!r}")
    return x.permute(*[src.index(t) for t in dst])


def _ensure_swin_rearrange() -> None:
    """MONAI's Swin code calls ``einops.rearrange`` (an optional MONAI dependency) only to permute axes.

    When einops is not installed, give that MONAI module an equivalent permutation so Swin UNETR still runs;
    with einops installed nothing is changed.
    """
    import importlib.util

    if importlib.util.find_spec("einops") is not None:
        return
    import monai.networks.nets.swin_unetr as swin_module

    swin_module.rearrange = _permute_rearrange


def _swin_downsample(merging: str) -> Any:
    """MONAI's ``downsample`` argument for a patch-merging order: ``"v0.9"`` (official weights) or ``"corrected"``."""
    if merging == "v0.9":
        return PatchMergingV09  # MONAI calls it as downsample(dim=, norm_layer=, spatial_dims=)
    if merging == "corrected":
        return "merging"  # MONAI >= 1.0 order, all eight sub-grids once
    raise ValueError(f"merging must be 'v0.9' (official weights) or 'corrected', not {merging!r}")


def _check_swin_patch(spatial: tuple[int, ...]) -> None:
    """Swin UNETR's 1/32 bottleneck must hold more than one voxel (instance norm), else an :class:`InputError`."""
    if math.prod(s // 32 for s in spatial) < 2:
        raise InputError(
            f"Swin UNETR needs patches of at least 64 voxels along one axis (its 1/32 bottleneck must hold "
            f"more than one voxel for its instance norm); got {spatial}."
        )


@functools.cache
def _swinunetr_class() -> type[nn.Module]:
    from monai.networks.nets import SwinUNETR

    _ensure_swin_rearrange()

    class _SwinUNETRBackbone(SwinUNETR):
        """MONAI SwinUNETR without its ``out`` head; returns (encoder10 output, decoder1 output)."""

        def __init__(
            self,
            feature_size: int = 48,
            merging: str = "v0.9",
            use_checkpoint: bool = False,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            dropout_path_rate: float = 0.0,
        ) -> None:
            super().__init__(
                in_channels=1,
                out_channels=1,
                feature_size=int(feature_size),
                normalize=True,
                use_checkpoint=bool(use_checkpoint),
                drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate,
                dropout_path_rate=dropout_path_rate,
                downsample=_swin_downsample(merging),
            )
            del self.out  # the Universal Model uses its own head
            self.bottleneck_channels = 16 * int(feature_size)
            self.decoder_channels = int(feature_size)
            self.size_divisor = 32

        def forward(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
            self._check_input_size(x_in.shape[2:])
            _check_swin_patch(tuple(x_in.shape[2:]))
            hidden = self.swinViT(x_in, self.normalize)
            enc0 = self.encoder1(x_in)
            enc1 = self.encoder2(hidden[0])
            enc2 = self.encoder3(hidden[1])
            enc3 = self.encoder4(hidden[2])
            dec4 = self.encoder10(hidden[4])
            dec3 = self.decoder5(dec4, hidden[3])
            dec2 = self.decoder4(dec3, enc3)
            dec1 = self.decoder3(dec2, enc2)
            dec0 = self.decoder2(dec1, enc1)
            out = self.decoder1(dec0, enc0)
            return dec4, out

    _SwinUNETRBackbone.__name__ = _SwinUNETRBackbone.__qualname__ = "SwinUNETRBackbone"
    return _SwinUNETRBackbone


@register_backbone(
    "swinunetr", "MONAI SwinUNETR (feature_size 48, MONAI 0.9 patch merging) of the official release, ~62 M"
)
def SwinUNETRBackbone(**kwargs: Any) -> nn.Module:  # noqa: N802 - behaves like a class
    """MONAI ``SwinUNETR`` (subclass) returning (768 ch at 1/32, 48 ch at full resolution); inputs multiple of 32.

    Keyword arguments: ``feature_size=48``, ``merging="v0.9"`` (the order of the released weights) or
    ``"corrected"`` (MONAI ≥ 1.0), ``use_checkpoint=False`` (gradient checkpointing), ``drop_rate``,
    ``attn_drop_rate``, ``dropout_path_rate``.
    """
    return _swinunetr_class()(**kwargs)
