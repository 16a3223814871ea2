"""Tests of universal.loss.masked_bce_dice (masked back-propagation over partial labels)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from universal.errors import InputError
from universal.loss import masked_bce_dice


def _batch(b: int = 2, k: int = 4, shape=(4, 5, 6), seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, *shape, generator=gen, requires_grad=True)
    target = torch.rand(b, k, *shape, generator=gen) > 0.6
    return logits, target


def _manual(logits, target, available, bce_weight=1.0, dice_weight=1.0, smooth=1e-5) -> float:
    """Per-pair reference computed with plain Python floats over every voxel of the pair's volume."""
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for k in range(logits.shape[1]):
            if not available[b, k]:
                continue
            x = logits[b, k].detach().double().flatten().tolist()
            t = target[b, k].double().flatten().tolist()
            bce = sum(max(v, 0) - v * y + math.log1p(math.exp(-abs(v))) for v, y in zip(x, t)) / len(x)
            p = [1 / (1 + math.exp(-v)) for v in x]
            inter = sum(pi * yi for pi, yi in zip(p, t))
            dice = (2 * inter + smooth) / (sum(p) + sum(t) + smooth)
            total += bce_weight * bce + dice_weight * (1 - dice)
            n += 1
    return total / n if n else 0.0


def test_unavailable_pairs_get_exactly_zero_gradient() -> None:
    logits, target = _batch()
    available = torch.tensor([[True, False, True, False], [False, False, True, True]])
    masked_bce_dice(logits, target, available).backward()
    grad = logits.grad
    assert torch.all(grad[~available] == 0)
    for b, k in zip(*torch.nonzero(available, as_tuple=True)):
        assert grad[b, k].abs().sum() > 0


def test_value_equals_manual_per_pair_computation() -> None:
    logits, target = _batch(seed=3)
    available = torch.tensor([[True, True, False, True], [False, True, True, False]])
    for bw, dw in [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (1.0, 0.0)]:
        loss = masked_bce_dice(logits, target, available, bce_weight=bw, dice_weight=dw)
        assert loss.item() == pytest.approx(_manual(logits, target, available, bw, dw), rel=1e-5, abs=1e-6)


def test_components() -> None:
    logits, target = _batch(seed=4)
    available = torch.tensor([[True, False, True, True], [True, True, False, False]])
    parts = masked_bce_dice(
        logits, target, available, bce_weight=0.3, dice_weight=1.7, return_components=True
    )
    assert parts["n_available"] == 5
    assert parts["loss"].item() == pytest.approx(
        0.3 * parts["bce"].item() + 1.7 * parts["dice"].item(), rel=1e-5
    )
    assert parts["bce"].item() == pytest.approx(_manual(logits, target, available, 1.0, 0.0), rel=1e-5)
    assert parts["dice"].item() == pytest.approx(_manual(logits, target, available, 0.0, 1.0), rel=1e-5)


def test_all_unavailable_is_zero_without_nan() -> None:
    logits, target = _batch()
    available = torch.zeros(2, 4, dtype=torch.bool)
    loss = masked_bce_dice(logits, target, available)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.all(logits.grad == 0)
    parts = masked_bce_dice(logits, target, available, return_components=True)
    assert parts["n_available"] == 0 and parts["bce"].item() == 0 and parts["dice"].item() == 0


def test_batch_mixing_datasets_with_different_label_sets() -> None:
    from universal import taxonomy

    classes = ["liver", "liver tumor", "spleen", "right kidney", "left kidney", "pancreas", "lung tumor"]
    liver = taxonomy.dataset("msd_liver").availability(classes)
    lung = taxonomy.dataset("msd_lung").availability(classes)
    btcv = taxonomy.dataset("btcv").availability(classes)
    assert not np.array_equal(liver, lung) and not np.array_equal(liver, btcv)
    available = torch.as_tensor(np.stack([liver, lung, btcv]))
    logits, target = _batch(b=3, k=len(classes), shape=(6, 6, 6), seed=5)
    loss = masked_bce_dice(logits, target, available)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(_manual(logits, target, available), rel=1e-5)
    assert torch.all(logits.grad[~available] == 0)
    # the lung case only teaches the lung tumour
    lung_case = logits.grad[1].flatten(1).abs().sum(1)
    assert (lung_case > 0).tolist() == lung.tolist()


def test_dice_is_volume_level_not_per_slice() -> None:
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    target[0, 0, 0, :2, :2] = True  # foreground in the first slice only
    logits = torch.where(target, 20.0, -20.0).float()
    parts = masked_bce_dice(logits, target, torch.ones(1, 1, dtype=torch.bool), return_components=True)
    assert parts["dice"].item() < 1e-6  # a per-slice mean would be pulled up by the empty slices


def test_accepts_float_and_bool_targets_and_any_spatial_rank() -> None:
    logits, target = _batch(shape=(7,))
    available = torch.ones(2, 4, dtype=torch.bool)
    a = masked_bce_dice(logits, target, available)
    b = masked_bce_dice(logits, target.float(), available.numpy())
    assert a.item() == pytest.approx(b.item())


def test_bad_shapes() -> None:
    logits, target = _batch()
    with pytest.raises(InputError, match="target shape"):
        masked_bce_dice(logits, target[:, :3], torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="available"):
        masked_bce_dice(logits, target, torch.ones(2, 3, dtype=torch.bool))


def test_dice_on_empty_false_averages_dice_over_present_pairs_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    target = torch.zeros(2, 4, 6, 6, 6)
    target[0, 0, 1:4, 1:4, 1:4] = 1  # the only non-empty pair
    available = torch.tensor([[True, True, True, False], [True, True, False, False]])
    parts = masked_bce_dice(logits, target, available, dice_on_empty=False, return_components=True)
    n = int(available.sum())
    bce = _manual(logits, target, available, 1.0, 0.0)
    only = torch.zeros(2, 4, dtype=torch.bool)
    only[0, 0] = True
    dice_present = _manual(logits, target, only, 0.0, 1.0)
    assert parts["n_available"] == n
    assert parts["loss"].item() == pytest.approx(bce + dice_present, rel=1e-5)
    assert parts["dice"].item() == pytest.approx(dice_present, rel=1e-5)
    # the default (the paper's per-pair sum) differs: empty pairs add a Dice loss of about 1 each
    default = masked_bce_dice(logits, target, available).item()
    assert default == pytest.approx(_manual(logits, target, available), rel=1e-5)
    assert default > parts["loss"].item() + 0.1
    parts["loss"].backward()
    assert logits.grad[0, 3].abs().sum() == 0 and logits.grad[1, 2:].abs().sum() == 0  # still masked
    assert logits.grad[1, 0].abs().sum() > 0  # empty but annotated: BCE teaches absence


def test_dice_on_empty_false_with_no_present_pair_is_bce_only() -> None:
    logits = torch.randn(1, 2, 4, 4, 4)
    target = torch.zeros(1, 2, 4, 4, 4)
    available = torch.ones(1, 2, dtype=torch.bool)
    loss = masked_bce_dice(logits, target, available, dice_on_empty=False)
    assert loss.item() == pytest.approx(_manual(logits, target, available, 1.0, 0.0), rel=1e-5)
