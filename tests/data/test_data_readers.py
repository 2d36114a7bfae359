"""Dataset layouts, pairing and mask checks."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from unetkit.errors import InputError
from unetkit.data import ImagePair, check_mask, find_pairs, load_sample, read_mask
from unetkit.data.readers import ctc_frame, intensity_problem
from unetkit.io import read_image


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, array, extension=".png")
    return path


def _tif(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, **kwargs)
    return path


def _mask(shape=(20, 24), value=255, dtype=np.uint8) -> np.ndarray:
    mask = np.zeros(shape, dtype)
    mask[4:10, 4:10] = value
    mask[12:18, 14:20] = value
    return mask


def test_folder_pair_png_and_tiff_matched_by_stem(tmp_path):
    image = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24)
    _png(tmp_path / "images" / "a.png", image.astype(np.uint8))
    _tif(tmp_path / "images" / "b.tif", image)
    _png(tmp_path / "masks" / "a.png", _mask())
    _tif(tmp_path / "masks" / "b_mask.tif", _mask(value=1, dtype=np.uint16))
    pairs = find_pairs(tmp_path)
    assert [(p.name, p.image.name, p.mask.name) for p in pairs] == [
        ("a", "a.png", "a.png"),
        ("b", "b.tif", "b_mask.tif"),
    ]
    sample = load_sample(pairs[1])
    assert sample.image.shape == (1, 20, 24) and sample.instances.max() == 2


def test_labels_folder_rgb_image_and_instance_mask(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    labels = _mask(value=1, dtype=np.uint16)
    labels[12:18, 14:20] = 7
    _png(tmp_path / "images" / "x.png", rgb)
    _tif(tmp_path / "labels" / "x.tif", labels)
    (pair,) = find_pairs(tmp_path)
    sample = load_sample(pair)
    assert sample.image.shape == (3, 20, 24)
    assert sorted(np.unique(sample.instances).tolist()) == [0, 1, 7]


def test_isbi_layout(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "images" / f"{i:02d}.png", np.full((16, 16), 10 * i, np.uint8))
        _png(tmp_path / "train" / "labels" / f"{i:02d}.png", _mask((16, 16)))
    _png(tmp_path / "test" / "images" / "00.png", np.zeros((16, 16), np.uint8))
    pairs = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["00", "01", "02"]
    assert all(p.mask.parent.name == "labels" for p in pairs)


def test_ctc_flat_layout_pairs_by_number(tmp_path):
    for n in (0, 1, 12):
        _tif(tmp_path / "images" / f"t{n:03d}.tif", np.zeros((16, 16), np.uint8))
        _tif(tmp_path / "masks" / f"man_seg{n:02d}.tif", _mask((16, 16), 3, np.uint16), compression="lzw")
    pairs = find_pairs(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        ("t000.tif", "man_seg00.tif"),
        ("t001.tif", "man_seg01.tif"),
        ("t012.tif", "man_seg12.tif"),
    ]


def test_ctc_release_layout_gold_silver(tmp_path):
    for n in range(4):
        _tif(tmp_path / "01" / f"t{n:03d}.tif", np.zeros((16, 16), np.uint8))
        _tif(tmp_path / "01_ST" / "SEG" / f"man_seg{n:03d}.tif", _mask((16, 16), 2, np.uint16))
    _tif(tmp_path / "01_GT" / "SEG" / "man_seg002.tif", _mask((16, 16), 5, np.uint16))
    _tif(tmp_path / "01_GT" / "TRA" / "man_track002.tif", _mask((16, 16), 5, np.uint16))
    gold = find_pairs(tmp_path)
    assert [(p.name, p.mask.parent.parent.name) for p in gold] == [("01_t002", "01_GT")]
    silver = find_pairs(tmp_path, ctc_truth="silver")
    assert [p.name for p in silver] == ["01_t000", "01_t001", "01_t002", "01_t003"]
    everything = find_pairs(tmp_path, allow_missing_masks=True)
    assert [p.mask is None for p in everything] == [True, True, False, True]


def test_no_layout_lists_what_was_looked_for(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(InputError) as info:
        find_pairs(tmp_path)
    message = str(info.value)
    assert "masks/" in message and "train/labels" in message and "01_GT/SEG" in message


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    _png(tmp_path / "masks" / "a.png", _mask())
    with pytest.raises(InputError, match="no images"):
        find_pairs(tmp_path)


def test_missing_mask_names_image_and_expected_mask(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((20, 24), np.uint8))
    _png(tmp_path / "images" / "cell7.png", np.zeros((20, 24), np.uint8))
    _png(tmp_path / "masks" / "a.png", _mask())
    with pytest.raises(InputError) as info:
        find_pairs(tmp_path)
    assert "cell7.png" in str(info.value) and str(tmp_path / "masks" / "cell7") in str(info.value)
    pairs = find_pairs(tmp_path, allow_missing_masks=True)
    assert pairs[1].mask is None
    with pytest.raises(InputError, match="cell7.png"):
        load_sample(pairs[1])


def test_size_mismatch_names_both_files_and_shapes(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((20, 24), np.uint8))
    _png(tmp_path / "masks" / "a.png", _mask((20, 22)))
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(InputError) as info:
        load_sample(pair)
    message = str(info.value)
    assert str(pair.image) in message and str(pair.mask) in message
    assert "20x24" in message and "20x22" in message


def test_antialiased_binary_mask(tmp_path):
    mask = _mask((40, 40))
    mask[3, 4:10] = 128
    mask[10, 4:10] = 64
    mask[4:10, 3] = 200
    path = _png(tmp_path / "m.png", mask)
    with pytest.raises(InputError, match="anti-aliased") as info:
        read_mask(path)
    assert "m.png" in str(info.value) and "threshold" in str(info.value)


def test_instance_labels_are_not_mistaken_for_antialiasing():
    labels = np.zeros((40, 40), np.uint16)
    labels[2:30, 2:30] = 255  # a large object with the largest label
    labels[32:38, 32:38] = 3
    labels[32:36, 2:6] = 9
    assert check_mask(labels).max() == 255


@pytest.mark.parametrize(
    "mask, words",
    [
        (np.full((8, 8), 0.5, np.float32), "fractional"),
        (np.array([[0, -1], [2, 3]], np.int16), "negative"),
        (np.stack([_mask((8, 8)), np.zeros((8, 8), np.uint8), _mask((8, 8))], -1), "colour"),
    ],
)
def test_bad_mask_values(tmp_path, mask, words):
    path = _tif(tmp_path / "bad_mask.tif", mask)
    with pytest.raises(InputError, match=words) as info:
        read_mask(path)
    assert "bad_mask.tif" in str(info.value)


def test_tolerated_masks():
    gray_as_rgb = np.repeat(_mask((8, 8))[..., None], 3, -1)
    assert check_mask(gray_as_rgb).shape == (8, 8)
    assert check_mask(_mask((8, 8)).astype(np.float32)).dtype.kind == "i"
    assert check_mask(_mask((8, 8)) > 0).max() == 1


def test_image_pair_is_frozen():
    pair = ImagePair(Path("a.png"), None, "a")
    with pytest.raises(AttributeError):
        pair.name = "b"  # type: ignore[misc]


def _cells(shape=(64, 64)) -> np.ndarray:
    """A binary 0/255 mask of three round cells."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, np.uint8)
    for cy, cx, r in ((16, 18, 9), (40, 44, 12), (50, 14, 7)):
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 255
    return mask


def _bilinear_upscale(mask: np.ndarray, factor: int = 4) -> np.ndarray:
    """The mask resized with bilinear interpolation (what image editors do by default)."""
    from scipy import ndimage as ndi

    return np.clip(ndi.zoom(mask.astype(np.float64), factor, order=1), 0, 255).round().astype(np.uint8)


def _jpeg(tmp_path: Path, mask: np.ndarray) -> Path:
    path = tmp_path / "mask.jpg"
    iio.imwrite(path, mask, extension=".jpg", quality=90)
    return path


def test_masks_that_are_intensity_images_are_refused(tmp_path):
    resized = _bilinear_upscale(_cells())
    assert ((resized > 0) & (resized < 255)).mean() > 0.03  # interpolated ramps at every edge
    raw = (np.random.default_rng(0).random((64, 64)) * 200 + 20).astype(np.uint8)  # images/ and masks/ swapped
    from scipy import ndimage as ndi

    probability = ndi.gaussian_filter(_cells() / 255.0, 3)  # a probability map saved as 16-bit integers
    cases = {
        "resized.png": _png(tmp_path / "resized.png", resized),
        "mask.jpg": _jpeg(tmp_path, _cells((128, 128))),
        "raw.png": _png(tmp_path / "raw.png", raw),
        "prob16.tif": _tif(tmp_path / "prob16.tif", (probability * 65535).astype(np.uint16)),
    }
    for name, path in cases.items():
        with pytest.raises(InputError, match="does not look like a mask") as info:
            read_mask(path)
        assert name in str(info.value) and "--allow-intensity-masks" in str(info.value)
        assert read_mask(path, allow_intensity_masks=True).shape == read_image(path).shape


def test_label_images_with_small_objects_are_not_intensity_images():
    labels = np.zeros((60, 60), np.uint16)
    for k in range(36):  # 36 objects of 3x3 pixels and one large one
        y, x = divmod(k, 6)
        labels[4 * y + 1 : 4 * y + 4, 4 * x + 1 : 4 * x + 4] = k + 1
    labels[30:58, 5:55] = 99
    assert intensity_problem(labels) is None
    specks = np.zeros((60, 60), np.uint16)
    for k in range(100):  # 100 objects of 2x2 pixels
        y, x = divmod(k, 10)
        specks[3 * y + 1 : 3 * y + 3, 3 * x + 1 : 3 * x + 3] = k + 1
    assert intensity_problem(specks) is None
    assert intensity_problem(_cells()) is None


def test_ctc_frame_numbers_keep_their_digits():
    assert [ctc_frame(s) for s in ("t000", "t041", "t0041", "t5", "cell7", "t04a", "mask041")] == [
        "000", "041", "0041", "5", None, None, None,
    ]


def test_multi_page_training_image_names_the_page_count(tmp_path):
    _tif(tmp_path / "images" / "a.tif", np.zeros((4, 20, 24), np.uint8), photometric="minisblack")
    _png(tmp_path / "masks" / "a.png", _mask())
    (pair,) = find_pairs(tmp_path)
    with pytest.raises(InputError, match="4 pages") as info:
        load_sample(pair)
    assert "a.tif" in str(info.value) and "4x20" not in str(info.value)


def test_broken_links_and_pages_written_one_by_one_are_named(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    tifffile.imwrite(root / "images" / "a.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(root / "masks" / "a.tif", np.eye(8, dtype=np.uint8))
    (root / "images" / "b.tif").symlink_to(tmp_path / "elsewhere" / "b.tif")  # the disk it pointed to is gone
    with pytest.raises(InputError, match=r"images/b\.tif: a link to .*elsewhere/b\.tif, which does not exist"):
        find_pairs(root)
    with tifffile.TiffWriter(root / "masks" / "c.tif") as writer:
        writer.write(np.eye(8, dtype=np.uint8))
        writer.write(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match=r"c\.tif: holds 2 pages"):
        read_mask(root / "masks" / "c.tif")
