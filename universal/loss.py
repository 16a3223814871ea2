"""Masked BCE + Dice: the partial-label loss of the Universal Model (masked back-propagation).

A case from a dataset that annotates only some classes must not teach the model that the other classes are absent.
``available[b, k]`` says whether class k is annotated in case b; the loss is computed for those (case, class) pairs
only and averaged over them, and every other pair gets exactly zero gradient (its logits are never read).

Per available pair the loss is ``bce_weight * BCE + dice_weight * (1 - soft Dice)``, both over the pair's whole
volume (Dice is volume-level, not per slice). Everything is vectorised over pairs (no loop over classes or cases).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from universal.errors import InputError

__all__ = ["masked_bce_dice"]


def masked_bce_dice(
    logits: torch.Tensor,
    target: torch.Tensor,
    available: torch.Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    smooth: float = 1e-5,
    return_components: bool = False,
    dice_on_empty: bool = True,
) -> torch.Tensor | dict[str, Any]:
    """Masked BCE + soft Dice over the annotated (case, class) pairs.

    Args:
        logits: ``(B, K, X, Y, Z)`` (any number of spatial dims) raw model outputs.
        target: same shape, one-vs-all masks in {0, 1} (bool, int or float).
        available: ``(B, K)`` bool, True where class k is annotated in case b.
        bce_weight, dice_weight: weights of the two terms.
        smooth: added to the numerator and denominator of the Dice.
        return_components: return a dict ``{"loss", "bce", "dice", "n_available"}`` (``bce``/``dice`` are the
            means of the BCE and of the Dice *loss* over the available pairs, detached) instead of the scalar.
        dice_on_empty: ``True`` (the paper's per-pair sum): every available pair has a Dice term. ``False``: the
            Dice term is averaged over the available pairs whose target is non-empty only (the BCE still covers
            every available pair and teaches absence). With many classes and small patches most pairs are empty;
            their Dice loss is ≈ 1 with almost no gradient, so they only dilute the present classes' Dice gradient
            (and make the loss value read ≈ 1 whatever the model does).

    Returns:
        the scalar loss (0, with zero gradient and no NaN, when no pair is available).

    >>> logits = torch.zeros(2, 3, 4, 4, 4, requires_grad=True)
    >>> target = torch.zeros(2, 3, 4, 4, 4)
    >>> available = torch.tensor([[True, False, False], [False, False, False]])
    >>> loss = masked_bce_dice(logits, target, available)
    >>> loss.backward()
    >>> bool(logits.grad[0, 1:].abs().sum() == 0)
    True
    """
    available = _check_inputs(logits, target, available)
    b, k = logits.shape[:2]
    flat_logits = logits.reshape(b, k, -1)[available].float()  # (n, N): only the annotated pairs are read
    flat_target = target.reshape(b, k, -1)[available].to(flat_logits.dtype)
    n = flat_logits.shape[0]
    bce, dice_loss = _pair_losses(flat_logits, flat_target, smooth)  # (n,), (n,)
    if dice_on_empty:
        pair_loss = bce_weight * bce + dice_weight * dice_loss
        loss = pair_loss.sum() / max(n, 1)  # empty → 0, still attached to the graph (zero gradient)
        dice_mean = dice_loss.detach().sum() / max(n, 1)
    else:
        present = flat_target.sum(dim=1) > 0
        n_present = int(present.sum())
        dice_sum = (dice_loss * present).sum()
        loss = bce_weight * bce.sum() / max(n, 1) + dice_weight * dice_sum / max(n_present, 1)
        dice_mean = dice_sum.detach() / max(n_present, 1)
    if not return_components:
        return loss
    return {"loss": loss, "bce": bce.detach().sum() / max(n, 1), "dice": dice_mean, "n_available": int(n)}


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, available: Any) -> torch.Tensor:
    """``available`` as a bool ``(B, K)`` tensor on the logits' device, after checking the three shapes agree."""
    if logits.dim() < 2:
        raise InputError(f"logits must be (B, K, ...), got shape {tuple(logits.shape)}.")
    if tuple(target.shape) != tuple(logits.shape):
        raise InputError(
            f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}."
        )
    available = torch.as_tensor(available, device=logits.device)
    if tuple(available.shape) != tuple(logits.shape[:2]):
        raise InputError(
            f"available must be (B, K) = {tuple(logits.shape[:2])} booleans, got shape {tuple(available.shape)}."
        )
    return available.to(torch.bool)


def _pair_losses(
    logits: torch.Tensor, target: torch.Tensor, smooth: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair mean BCE and soft Dice loss ``1 - Dice`` of ``(n, N)`` logits and targets: two ``(n,)`` tensors."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum(dim=1)
    denominator = prob.sum(dim=1) + target.sum(dim=1)
    return bce, 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
