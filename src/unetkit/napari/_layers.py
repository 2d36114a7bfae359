"""napari layer data for unetkit's outputs, as plain (data, keyword arguments, layer type) tuples.

The reader and the widget show probabilities and labels the same way; napari is not imported here.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

LayerData = tuple[np.ndarray, dict[str, Any], str]

# One colour per foreground class; additive blending shows where classes overlap.
_COLORMAPS = ("magma", "green", "cyan", "yellow", "red", "blue")


def default_class_names(n_classes: int) -> list[str]:
    """["background", "foreground"] for two classes, else "class 0", "class 1", ...

    Example:
        >>> default_class_names(2), default_class_names(3)
        (['background', 'foreground'], ['class 0', 'class 1', 'class 2'])
    """
    return ["background", "foreground"] if n_classes == 2 else [f"class {i}" for i in range(n_classes)]


def probability_layers(
    probabilities: np.ndarray, name: str, class_names: Sequence[str] | None = None, **common: Any
) -> list[LayerData]:
    """One image layer per class but the background (class 0, which is 1 minus the others), in [0, 1].

    `probabilities` is (n_classes, H, W), or (n_classes, planes, H, W) for a stack or a volume (each
    layer then holds that class's (planes, H, W)); `common` (e.g. scale, translate) is passed to
    every layer.

    Example:
        >>> p = np.zeros((2, 4, 4), np.float32)
        >>> [(kw["name"], kind) for _, kw, kind in probability_layers(p, "cells")]
        [('cells foreground probability', 'image')]
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim == 2:  # a single foreground map
        probabilities = np.stack([1 - probabilities, probabilities])
    names = list(class_names) if class_names is not None else default_class_names(probabilities.shape[0])
    several = probabilities.shape[0] > 2
    layers = []
    for index in range(1, probabilities.shape[0]):
        kwargs = {
            "name": f"{name} {names[index]} probability",
            "colormap": _COLORMAPS[(index - 1) % len(_COLORMAPS)],
            "contrast_limits": (0.0, 1.0),
            "blending": "additive" if several else "translucent",
            **common,
        }
        layers.append((probabilities[index], kwargs, "image"))
    return layers


def labels_layer(labels: np.ndarray, name: str, **common: Any) -> LayerData:
    """The labels layer of an instance (or binary) label image.

    Example:
        >>> labels_layer(np.zeros((3, 3), np.uint16), "cells")[1:]
        ({'name': 'cells labels'}, 'labels')
    """
    return np.asarray(labels), {"name": f"{name} labels", **common}, "labels"
