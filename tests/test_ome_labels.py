"""OME-Zarr label images (`unetkit.bigimage`): metadata, pyramid built block by block, read back by ome-zarr-py."""

import numpy as np
import pytest

from unetkit.bigimage import create_image_labels, create_ome_labels, label_dtype, write_label_pyramid
from unetkit.blocklabels import label_blockwise
from unetkit.decision import DecisionRule

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")


def read_nodes(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


def spec_names(node):
    return sorted(type(s).__name__ for s in node.specs)


def test_label_image_pyramid_is_strided_level_by_level_and_read_back_as_labels(tmp_path):
    path = tmp_path / "cells_labels.ome.zarr"
    level0 = create_ome_labels(path, (130, 70), (16, 16), "uint32", "cells", source="../cells.ome.zarr",
                               colors=[{"label-value": 1, "rgba": [255, 0, 0, 255]}])
    ids = np.random.default_rng(0).integers(0, 2**32 - 1, (130, 70), dtype=np.uint32)
    level0[:] = ids
    # blocks of 10 px cut across the 16 px chunks; levels halve until the longer side is below 32
    assert write_label_pyramid(path, min_side=32, block=10) == 4
    group = zarr.open_group(str(path), mode="r")
    for k, shape in enumerate([(130, 70), (65, 35), (33, 18), (17, 9)]):
        level = group[str(k)]
        assert level.shape == shape and level.dtype == np.uint32
        np.testing.assert_array_equal(level[:], ids[:: 2**k, :: 2**k])
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    assert ome["image-label"]["source"] == {"image": "../cells.ome.zarr"}
    assert [d["coordinateTransformations"][0]["scale"] for d in ome["multiscales"][0]["datasets"]] == [
        [1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]]
    [node] = read_nodes(path)
    assert spec_names(node) == ["Label", "Multiscales"]
    assert [d.shape for d in node.data] == [(130, 70), (65, 35), (33, 18), (17, 9)]
    assert node.metadata["name"] == "cells" and node.metadata["color"] == {1: [1.0, 0.0, 0.0, 1.0]}
    np.testing.assert_array_equal(np.asarray(node.data[2]), ids[::4, ::4])


def test_small_label_image_keeps_one_level(tmp_path):
    path = tmp_path / "small.ome.zarr"
    create_ome_labels(path, (40, 50), (16, 16), "uint16", "small")[:] = 7
    assert write_label_pyramid(path) == 1  # below the default 1024 px: no lower level
    [node] = read_nodes(path)
    assert [d.shape for d in node.data] == [(40, 50)] and "source" not in zarr.open_group(str(path)).attrs["ome"]["image-label"]


def test_labels_inside_an_ome_zarr_image_are_listed_and_point_to_it(tmp_path):
    from ome_zarr.writer import write_image

    image = tmp_path / "cells.ome.zarr"
    write_image(np.zeros((64, 80), np.uint8), zarr.open_group(str(image), mode="w"), axes="yx")
    create_image_labels(image, "nuclei", (64, 80), (32, 32), "uint16")[:] = 1
    create_image_labels(image, "cells", (64, 80), (32, 32), "uint32")[:] = 2
    create_image_labels(image, "cells", (64, 80), (32, 32), "uint32")[:] = 3  # replaced, listed once
    labels = zarr.open_group(str(image / "labels"), mode="r")
    assert labels.attrs["ome"]["labels"] == ["nuclei", "cells"]
    assert zarr.open_group(str(image / "labels" / "cells")).attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    nodes = read_nodes(image)
    label_nodes = [n for n in nodes if "Label" in spec_names(n)]
    assert [n.metadata["name"] for n in label_nodes] == ["nuclei", "cells"]
    assert int(np.asarray(label_nodes[1].data[0]).max()) == 3
    # read from the label image itself, the reader finds the image it labels
    from_label = read_nodes(image / "labels" / "cells")
    assert spec_names(from_label[0]) == ["Multiscales"] and from_label[0].data[0].shape == (64, 80)


def test_label_dtype_never_wraps():
    # 4-connected objects: at most ceil(pixels / 2) of them (a checkerboard)
    assert label_dtype((1, 131070)) == "uint16"  # 65535 objects
    assert label_dtype((1, 131071)) == "uint32"  # 65536
    assert label_dtype((65536, 131072)) == "uint64"  # 2^32 objects
    checkerboard = np.indices((6, 7)).sum(0) % 2 == 0
    assert label_dtype((6, 7)) == "uint16" and int(checkerboard.sum()) == (6 * 7 + 1) // 2


def test_blockwise_labels_written_into_an_ome_zarr_label_image(tmp_path):
    from scipy import ndimage as ndi

    field = ndi.gaussian_filter(np.random.default_rng(1).random((90, 70)), 2.0)
    prob = ((field - field.min()) / np.ptp(field)).astype(np.float32)
    rule = DecisionRule("seeded", threshold=0.3, seed_threshold=0.7, min_seed_size=3)
    path = tmp_path / "blobs_labels.ome.zarr"
    array = create_ome_labels(path, prob.shape, (32, 32), label_dtype(prob.shape), "blobs")
    n = label_blockwise(prob, array, rule=rule, block=32, halo=90)
    write_label_pyramid(path, min_side=64)
    expected = rule.apply(prob)
    assert n == expected.max() > 5
    [node] = read_nodes(path)
    np.testing.assert_array_equal(np.asarray(node.data[0]), expected)
    np.testing.assert_array_equal(np.asarray(node.data[1]), expected[::2, ::2])
