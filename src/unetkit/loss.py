"""The paper's energy: pixel-wise softmax with a weighted cross-entropy (Eq. 1), optional Dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

#: Target value of an unlabelled pixel or voxel (sparse annotation, Cicek et al. 2016): no loss, no gradient.
IGNORE_INDEX = -1


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Mean over pixels of w(x) * -log p_l(x)(x), with p the softmax over the class axis.

    Dividing by the number of pixels (not summing) keeps the loss scale independent of the tile
    size, so one learning rate serves small and large tiles. With `ignore_index`, pixels whose
    target is that value contribute nothing (zero loss, zero gradient) and the mean runs over the
    labelled pixels only, so a sparsely annotated volume weighs as much as a dense one.

    Args:
        logits: (N, K, H, W) network output, or (N, K, D, H, W) for volumes.
        target: (N, H, W) or (N, D, H, W) int64 class index per pixel.
        weights: per-pixel weights of the target's shape (the paper's weight map); None means all ones.
        ignore_index: target value of unlabelled pixels (`IGNORE_INDEX`), or None if all are labelled.

    Example:
        >>> logits = torch.zeros(1, 2, 4, 4)
        >>> round(weighted_cross_entropy(logits, torch.zeros(1, 4, 4, dtype=torch.long)).item(), 4)
        0.6931
        >>> sparse = torch.full((1, 4, 4), IGNORE_INDEX); sparse[0, 0, 0] = 1
        >>> round(weighted_cross_entropy(logits, sparse, ignore_index=IGNORE_INDEX).item(), 4)
        0.6931
    """
    if logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in size")
    if ignore_index is None:
        nll = F.cross_entropy(logits, target, reduction="none")
        if weights is not None:
            nll = nll * weights
        return nll.mean()
    labelled = target != ignore_index
    nll = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    if weights is not None:
        # Weights of unlabelled voxels are zeroed first: a weight map may hold anything (NaN) there.
        nll = nll * torch.where(labelled, weights, torch.zeros_like(weights))
    return nll.sum() / labelled.sum().clamp(min=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, ignore_index: int | None = None) -> torch.Tensor:
    """1 - soft Dice averaged over every class, class 0 included.

    Class 0 counts because it is not always the uninteresting one: in EM masks it is the membrane,
    the thin class whose gaps merge cells and which cross-entropy alone under-draws. With
    `ignore_index`, unlabelled pixels count in neither the overlap nor the totals.

    Example:
        >>> target = torch.tensor([[[0, 1], [1, 1]]])
        >>> all_cell = torch.tensor([[[[-9.0, -9.0], [-9.0, -9.0]], [[9.0, 9.0], [9.0, 9.0]]]])
        >>> round(soft_dice_loss(all_cell, target).item(), 2)  # Dice 0.5 for the missed membrane, 0.875 for cells
        0.31
    """
    probs = torch.softmax(logits, dim=1)
    if ignore_index is not None:
        labelled = (target != ignore_index).unsqueeze(1).to(probs.dtype)
        probs = probs * labelled
        target = torch.where(target == ignore_index, torch.zeros_like(target), target)
    one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    if ignore_index is not None:
        one_hot = one_hot * labelled
    dims = (0, *range(2, logits.ndim))
    overlap = (probs * one_hot).sum(dims)
    total = probs.sum(dims) + one_hot.sum(dims)
    dice = (2 * overlap + eps) / (total + eps)
    return 1.0 - dice.mean()


class SegmentationLoss(nn.Module):
    """Weighted cross-entropy (the paper) plus `dice_weight` times a soft Dice loss (off by default).

    Targets holding `IGNORE_INDEX` (sparsely annotated volumes) leave those voxels out of both terms.

    Example:
        >>> loss = SegmentationLoss(dice_weight=0.5)
        >>> loss(torch.zeros(1, 2, 4, 4), torch.ones(1, 4, 4, dtype=torch.long)).item() > 0
        True
    """

    def __init__(self, dice_weight: float = 0.0) -> None:
        super().__init__()
        if dice_weight < 0:
            raise InputError(f"dice_weight must be >= 0 (got {dice_weight})")
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        ignore = IGNORE_INDEX if bool((target == IGNORE_INDEX).any()) else None
        loss = weighted_cross_entropy(logits, target, weights, ignore_index=ignore)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, ignore_index=ignore)
        return loss
