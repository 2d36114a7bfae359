"""File > Open Sample: a held-out image of each packaged model, with its ground truth.

The images are read from the shared data folder (`unetkit.data.datasets.data_root`: the
``UNETKIT_DATA`` environment variable, else ``../shared/data`` beside a source checkout); nothing is
copied into the package. Where the folder is missing, the loader says which variable to set.
"""

from __future__ import annotations

from ..errors import InputError
from ._layers import LayerData


def sample_layers(model: str) -> list[LayerData]:
    """The first held-out (test) image of packaged model `model` as an image layer, and its mask as
    a "ground truth" labels layer when the dataset has one.

    Raises InputError (one line, naming UNETKIT_DATA) when the dataset folder or image is missing.
    """
    from ..data.datasets import data_root
    from ..data.readers import find_pairs, read_mask
    from ..io import read_image
    from ..labels import as_instances, id_dtype
    from ..pretrained import get_model

    info = get_model(model)
    folder = data_root() / info.dataset
    if not folder.is_dir():
        raise InputError(f"unetkit sample data not found: {folder} does not exist; set UNETKIT_DATA to the folder "
                         f"that holds {info.dataset}/")
    wanted = {form.format(i) for i in info.test_ids[:1] for form in ("{:02d}", "t{:02d}", "t{:03d}")}
    pair = next((p for p in find_pairs(folder, allow_missing_masks=True) if p.name in wanted or p.image.stem in wanted), None)
    if pair is None:
        raise InputError(f"unetkit sample data not found: no image {sorted(wanted)[0]} in {folder}; set UNETKIT_DATA "
                         f"to the folder that holds the complete {info.dataset}/")
    name = f"{model} {pair.name}"
    layers: list[LayerData] = [(read_image(pair.image), {"name": name}, "image")]
    if pair.mask is not None:
        truth = as_instances(read_mask(pair.mask))
        layers.append((truth.astype(id_dtype(int(truth.max(initial=0)))), {"name": f"{name} ground truth"}, "labels"))
    return layers


def em_membranes() -> list[LayerData]:
    """ISBI 2012 EM slice 20 (held out from em-membranes) and its cell interiors."""
    return sample_layers("em-membranes")


def dic_hela() -> list[LayerData]:
    """DIC-C2DH-HeLa frame t045 (held out from dic-hela) and its cell masks."""
    return sample_layers("dic-hela")


def fluo_nuclei() -> list[LayerData]:
    """Fluo-N2DH-GOWT1 frame t31 (held out from fluo-nuclei) and its nucleus masks."""
    return sample_layers("fluo-nuclei")
