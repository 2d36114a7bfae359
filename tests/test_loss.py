import math

import pytest
import torch

from unetkit.loss import SegmentationLoss, soft_dice_loss, weighted_cross_entropy


def test_uniform_logits_give_log_two():
    logits = torch.zeros(1, 2, 3, 5)
    target = torch.randint(0, 2, (1, 3, 5))
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(math.log(2))


def test_weights_scale_each_pixel():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = 2.0  # pixel 0: p(class 1) = e^2 / (1 + e^2)
    target = torch.tensor([[[1, 0]]])
    weights = torch.tensor([[[3.0, 0.5]]])
    expected = (3.0 * -math.log(math.exp(2) / (1 + math.exp(2))) + 0.5 * math.log(2)) / 2
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)


def test_loss_scale_does_not_depend_on_tile_size():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 4, 4)
    target = torch.randint(0, 2, (1, 4, 4))
    weights = torch.rand(1, 4, 4)
    small = weighted_cross_entropy(logits, target, weights)
    big = weighted_cross_entropy(logits.repeat(1, 1, 3, 5), target.repeat(1, 3, 5), weights.repeat(1, 3, 5))
    assert big.item() == pytest.approx(small.item(), rel=1e-6)


def test_dice_term():
    target = torch.tensor([[[0, 1], [1, 1]]])
    perfect = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 50
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    plain = SegmentationLoss()(torch.zeros(1, 2, 2, 2), target)
    with_dice = SegmentationLoss(dice_weight=1.0)(torch.zeros(1, 2, 2, 2), target)
    # uniform softmax, eps 1: class 0 overlap 0.5*1, total 0.5*4 + 1 -> dice (1 + 1) / (3 + 1);
    # class 1 overlap 0.5*3, total 0.5*4 + 3 -> dice (3 + 1) / (5 + 1); both classes count
    assert (with_dice - plain).item() == pytest.approx(1 - (2 / 4 + 4 / 6) / 2, rel=1e-6)
    # a net that draws no membrane (class 0) pays for it even though it is right on 3 of 4 pixels
    all_cell = torch.stack([torch.full((2, 2), -50.0), torch.full((2, 2), 50.0)])[None]
    assert soft_dice_loss(all_cell, target).item() == pytest.approx(1 - ((0 + 1) / (1 + 1) + (6 + 1) / (7 + 1)) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        SegmentationLoss(dice_weight=-1)


def test_size_mismatch_raises():
    with pytest.raises(ValueError, match="differ"):
        weighted_cross_entropy(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 3, dtype=torch.long))
