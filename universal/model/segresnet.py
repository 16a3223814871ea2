"""MONAI's SegResNet in plain PyTorch, parameter for parameter, so that loading it does not import MONAI.

``import monai`` loads every MONAI submodule (``monai/__init__.py`` walks the package, torchvision included): 7 s on
the project's 2-core CPU, most of the start-up of ``universal segment`` with the built-in SegResNet model. This
module rebuilds the same network (Myronenko 2018, as ``monai.networks.nets.SegResNet`` builds it: the same module
tree and ``state_dict`` keys, ``convInit.conv.weight``, ``down_layers.1.0.conv.weight``, ``up_samples.0.1`` ...,
the same operations in the same order) for what the project uses: GroupNorm, ReLU, ``nontrainable`` (trilinear,
``align_corners=False``) or ``deconv`` up-sampling. Other choices go to MONAI's class
(``universal.model.backbones``). ``tests/test_model_segresnet.py`` checks keys and outputs against MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LIGHT_UPSAMPLE_MODES", "ResBlock", "SegResNet"]

#: the up-sampling modes this module builds (others: MONAI's class)
LIGHT_UPSAMPLE_MODES = ("nontrainable", "deconv")


class _Convolution(nn.Sequential):
    """MONAI's ``Convolution(conv_only=True)``: a ``Sequential`` holding one ``conv`` ("same" padding)."""

    def __init__(
        self, dims: int, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, bias: bool = False
    ):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.add_module(
            "conv", conv(cin, cout, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=bias)
        )


def _norm(norm: tuple | str, channels: int) -> nn.Module:
    name, args = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]) if len(norm) > 1 else {})
    if str(name).lower() != "group":
        raise ValueError(f"the plain SegResNet builds GroupNorm only, not {name!r}")
    return nn.GroupNorm(num_channels=channels, **{"num_groups": 8, **args})


def _act(act: tuple | str) -> nn.Module:
    name, args = (act, {}) if isinstance(act, str) else (act[0], dict(act[1]) if len(act) > 1 else {})
    if str(name).lower() != "relu":
        raise ValueError(f"the plain SegResNet builds ReLU only, not {name!r}")
    return nn.ReLU(**args)


class ResBlock(nn.Module):
    """norm → act → conv → norm → act → conv, plus the input (MONAI's ``segresnet_block.ResBlock``)."""

    def __init__(
        self,
        dims: int,
        channels: int,
        norm: tuple | str,
        kernel_size: int = 3,
        act=("RELU", {"inplace": True}),
    ):
        super().__init__()
        self.norm1 = _norm(norm, channels)
        self.norm2 = _norm(norm, channels)
        self.act = _act(act)
        self.conv1 = _Convolution(dims, channels, channels, kernel_size)
        self.conv2 = _Convolution(dims, channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.conv1(self.act(self.norm1(x)))
        x = self.conv2(self.act(self.norm2(x)))
        x += identity
        return x


class _UpSample(nn.Sequential):
    """MONAI's ``UpSample`` for ``nontrainable`` (``upsample_non_trainable``) and ``deconv`` (``deconv``), ×2."""

    def __init__(self, dims: int, channels: int, mode: str) -> None:
        super().__init__()
        if mode == "deconv":
            deconv = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
            self.add_module("deconv", deconv(channels, channels, kernel_size=2, stride=2, bias=True))
        elif mode == "nontrainable":
            interp = "trilinear" if dims == 3 else "bilinear"
            self.add_module(
                "upsample_non_trainable",
                nn.Upsample(scale_factor=(2.0,) * dims, mode=interp, align_corners=False),
            )
        else:
            raise ValueError(
                f"the plain SegResNet builds the up-sampling modes {LIGHT_UPSAMPLE_MODES}, not {mode!r}"
            )


class SegResNet(nn.Module):
    """``monai.networks.nets.SegResNet`` with GroupNorm, ReLU and ``nontrainable``/``deconv`` up-sampling (same
    arguments, module tree, ``state_dict`` and ``encode``/``decode``/``forward``).

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3, another norm, activation or up-sampling mode.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 8,
        in_channels: int = 1,
        out_channels: int = 2,
        dropout_prob: float | None = None,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        use_conv_final: bool = True,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        upsample_mode: str = "nontrainable",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("`spatial_dims` can only be 2 or 3.")
        mode = str(getattr(upsample_mode, "value", upsample_mode)).lower()
        self.spatial_dims, self.init_filters, self.in_channels = spatial_dims, init_filters, in_channels
        self.blocks_down, self.blocks_up, self.dropout_prob = (
            tuple(blocks_down),
            tuple(blocks_up),
            dropout_prob,
        )
        self.act, self.norm, self.upsample_mode, self.use_conv_final = act, norm, mode, use_conv_final
        self.act_mod = _act(act)
        self.convInit = _Convolution(spatial_dims, in_channels, init_filters)  # noqa: N815 - MONAI's key
        self.down_layers = nn.ModuleList()
        for i, n in enumerate(self.blocks_down):
            ch = init_filters * 2**i
            pre = _Convolution(spatial_dims, ch // 2, ch, stride=2) if i > 0 else nn.Identity()
            self.down_layers.append(
                nn.Sequential(pre, *[ResBlock(spatial_dims, ch, norm, act=act) for _ in range(n)])
            )
        self.up_layers, self.up_samples = nn.ModuleList(), nn.ModuleList()
        n_up = len(self.blocks_up)
        for i in range(n_up):
            ch = init_filters * 2 ** (n_up - i)
            blocks = [ResBlock(spatial_dims, ch // 2, norm, act=act) for _ in range(self.blocks_up[i])]
            self.up_layers.append(nn.Sequential(*blocks))
            up = [
                _Convolution(spatial_dims, ch, ch // 2, kernel_size=1),
                _UpSample(spatial_dims, ch // 2, mode),
            ]
            self.up_samples.append(nn.Sequential(*up))
        self.conv_final = nn.Sequential(
            _norm(norm, init_filters),
            self.act_mod,
            _Convolution(spatial_dims, init_filters, out_channels, 1, bias=True),
        )
        if dropout_prob is not None:
            self.dropout = (nn.Dropout3d if spatial_dims == 3 else nn.Dropout2d)(dropout_prob)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.convInit(x)
        if self.dropout_prob is not None:
            x = self.dropout(x)
        down_x = []
        for down in self.down_layers:
            x = down(x)
            down_x.append(x)
        return x, down_x

    def decode(self, x: torch.Tensor, down_x: list[torch.Tensor]) -> torch.Tensor:
        for i, (up, upl) in enumerate(zip(self.up_samples, self.up_layers)):
            x = up(x) + down_x[i + 1]
            x = upl(x)
        if self.use_conv_final:
            x = self.conv_final(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, down_x = self.encode(x)
        down_x.reverse()
        return self.decode(x, down_x)
