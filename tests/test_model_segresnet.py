"""The plain-PyTorch SegResNet (``universal.model.segresnet``) is MONAI's SegResNet: same keys, same outputs; and the
built-in model loads without importing MONAI (the start-up of ``universal segment``, issue 16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from universal.model.segresnet import SegResNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"init_filters": 16, "use_conv_final": False},  # the project's backbone
        {
            "init_filters": 8,
            "out_channels": 3,
            "upsample_mode": "deconv",
            "blocks_down": (1, 2),
            "blocks_up": (1,),
        },
        {"init_filters": 16, "norm": ("GROUP", {"num_groups": 4}), "dropout_prob": 0.2},
    ],
)
def test_same_state_dict_and_outputs_as_monai(kwargs):
    from monai.networks.nets import SegResNet as MonaiSegResNet

    torch.manual_seed(0)
    ref = MonaiSegResNet(spatial_dims=3, in_channels=1, **kwargs).eval()
    ours = SegResNet(spatial_dims=3, in_channels=1, **kwargs).eval()
    theirs = ref.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)
    x = torch.rand(2, 1, 16, 24, 16)
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))
        (b1, s1), (b2, s2) = ours.encode(x), ref.encode(x)
        assert torch.equal(b1, b2) and all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_other_choices_are_refused_here():
    with pytest.raises(ValueError, match="pixelshuffle"):
        SegResNet(upsample_mode="pixelshuffle")
    with pytest.raises(ValueError, match="GroupNorm only"):
        SegResNet(norm="batch")


def test_builtin_backbone_equals_the_monai_based_one():
    from universal.model import backbones, load_pretrained

    model = load_pretrained("builtin").eval()
    net = model.backbone if hasattr(model, "backbone") else None
    assert net is not None and "monai" not in type(net).__mro__[1].__module__
    monai_based = backbones._segresnet_class(False)(
        init_filters=net.init_filters, blocks_down=net.blocks_down
    )
    monai_based.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.inference_mode():
        (a1, a2), (b1, b2) = net(x), monai_based.eval()(x)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_the_builtin_model_loads_without_importing_monai():
    code = (
        "import sys\nfrom universal.predictor import Predictor\nPredictor('builtin', device='cpu', fast=True)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'monai', 'torchvision', 'open_clip'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
