"""napari reader for the files `unetkit predict` writes.

NAME_probabilities.tif (float32, (n_classes, H, W)) opens as one image layer per foreground
class, NAME_labels.tif (integer instance labels) and the Cell Tracking Challenge masks
ctc/maskNNN.tif as labels layers. Other files are left to other readers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from ._layers import LayerData, labels_layer, probability_layers

_PROBABILITIES = re.compile(r"^(?P<name>.+)_probabilities\.tiff?$", re.IGNORECASE)
_LABELS = re.compile(r"^(?P<name>.+)_labels\.tiff?$|^(?P<ctc>mask\d+)\.tiff?$", re.IGNORECASE)


def output_kind(path: str | os.PathLike) -> tuple[str, str] | None:
    """("probabilities" or "labels", the image's name) for an output of `unetkit predict`, else None.

    Example:
        >>> output_kind("out/t041_probabilities.tif"), output_kind("out/ctc/mask041.tif"), output_kind("a.tif")
        (('probabilities', 't041'), ('labels', 'mask041'), None)
    """
    name = Path(path).name
    match = _PROBABILITIES.match(name)
    if match:
        return "probabilities", match.group("name")
    match = _LABELS.match(name)
    if match:
        return "labels", match.group("name") or match.group("ctc")
    return None


def get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list[LayerData]] | None:
    """The reader napari calls for `path` (one path or several) if all are unetkit outputs, else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or any(output_kind(p) is None or not Path(p).is_file() for p in paths):
        return None
    return read_outputs


def read_outputs(path: str | Sequence[str]) -> list[LayerData]:
    """Layer data of unetkit outputs: probabilities as image layers, labels as a labels layer.

    Raises InputError for a file named like an output whose contents are not (a probabilities
    file that is not float, a labels file that is not integer).
    """
    from ..io import read_image

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for item in paths:
        found = output_kind(item)
        if found is None:
            raise InputError(f"{item}: not an output of `unetkit predict` (NAME_probabilities.tif or NAME_labels.tif)")
        kind, name = found
        array = read_image(item, pages=kind == "probabilities")
        if kind == "probabilities":
            if array.dtype.kind != "f" or array.ndim not in (2, 3):
                raise InputError(f"{item}: expected float probabilities (n_classes, H, W), got {array.dtype} of shape {array.shape}")
            if array.ndim == 3 and array.shape[-1] <= 4 < array.shape[0]:  # classes stored as colour samples
                array = np.moveaxis(array, -1, 0)
            layers.extend(probability_layers(array, name))
        else:
            if array.dtype.kind not in "ui" or array.ndim != 2:
                raise InputError(f"{item}: expected an integer label image (H, W), got {array.dtype} of shape {array.shape}")
            layers.append(labels_layer(array, name))
    return layers
