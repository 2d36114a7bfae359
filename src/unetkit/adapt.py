"""Batch norm with the statistics of the image being segmented (test-time adaptation).

A network trained with batch norm normalises, at prediction, with the running statistics of its
training tiles. On EM those tiles went through strong gray-value augmentation, and one slice whose
membranes are fainter than the training slices' then loses them: two cells merge and the Rand
error jumps (ISBI 2012 slice 20). Normalising each layer with the statistics of the image itself
(AdaBN, Li et al. 2016, "Revisiting batch normalization for practical domain adaptation") adapts
the network to that image. The statistics are gathered over the image's own overlap tiles, then
fixed, so every tile of the image is normalised alike and overlap-tile prediction stays seamless.

Whether a model predicts better this way is chosen on its validation images at the end of
training and stored in its labels rule (`DecisionRule.image_statistics`).

Example:
    >>> import numpy as np
    >>> from unetkit import UNet
    >>> net = UNet(depth=2, base_channels=4, batch_norm=True)
    >>> adapted = adapt_batch_norm(net, np.random.rand(40, 40).astype("float32"), tile_size=44)
    >>> adapted is not net and has_batch_norm(adapted)
    True
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .network import UNet
from .tiling import as_pair, extract_region, plan_tiles

NORM_STATISTICS = ("training", "image")


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether `model` has batch-norm layers (whose statistics `adapt_batch_norm` can replace)."""
    return bool(batch_norm_layers(model))


def adapt_batch_norm(model: UNet, image: np.ndarray, tile_size: int | tuple[int, int]) -> UNet:
    """A copy of `model` whose batch-norm layers normalise with statistics of `image`.

    Each layer's mean and variance are the average over the image's input tiles (the tile plan
    `predict` uses for `tile_size`) of the per-tile statistics, computed in one forward pass
    without gradients. `model` itself is not changed; a model without batch norm is returned as is.

    Args:
        model: a `UNet`.
        image: (C, H, W) or (H, W) array, normalised as for `predict`.
        tile_size: legal input tile size, the one `predict` will use (`predict_plan` shows it).
    """
    layers = batch_norm_layers(model)
    if not layers:
        return model
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    tile_shape = as_pair(tile_size)
    plan = plan_tiles(shape, model.geometry, tile_shape)
    adapted = copy.deepcopy(model).eval()
    device = next(adapted.parameters()).device
    layers = batch_norm_layers(adapted)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the tiles, not an exponential one
        layer.train()
    with torch.no_grad():
        for tile in plan.tiles:
            window = extract_region(image, tile.in_y, tile.in_x, *plan.tile_shape)
            adapted(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None].to(device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return adapted.eval()
