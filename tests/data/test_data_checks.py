"""Dataset checks made before training: validation counts and names, frame numbers, dangling links."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetkit.data import ImagePair, find_pairs, split_pairs
from unetkit.data.readers import check_unique_frames
from unetkit.errors import InputError


def _pairs(n: int) -> list[ImagePair]:
    return [ImagePair(Path(f"img{i:02d}.png"), Path(f"m/img{i:02d}.png"), f"img{i:02d}") for i in range(n)]


@pytest.mark.parametrize("split", ["last", "random"])
def test_a_validation_count_must_leave_a_training_image(split):
    with pytest.raises(InputError, match=r"^--val 7: .* the dataset has 5 image\(s\); give a count below 5 or a fraction$"):
        split_pairs(_pairs(5), 7, split=split)
    with pytest.raises(InputError, match="--val 5: "):
        split_pairs(_pairs(5), 5, split=split)
    train, val = split_pairs(_pairs(5), 4, split=split)
    assert (len(train), len(val)) == (1, 4)


def test_every_unknown_validation_name_is_named():
    with pytest.raises(InputError) as error:
        split_pairs(_pairs(3), ["img01", "img07", "nope"])
    assert str(error.value) == ("validation image(s) 'img07', 'nope' not in the dataset (--val); known names: "
                                "img00, img01, img02")


def test_two_names_for_one_frame_are_refused_naming_both():
    with pytest.raises(InputError) as error:
        check_unique_frames(["in/t41.tif", "in/t040.tif", "in/t041.tif"])
    assert str(error.value) == "in/t41.tif and in/t041.tif are both frame 41; keep one file per frame (rename or remove one)"
    check_unique_frames([Path("t040.tif"), Path("t041.tif"), Path("cell41.tif"), Path("t41_labels.tif")])


@pytest.mark.parametrize("folder, names", [("images", ("t41.tif", "t041.tif")), ("masks", ("man_seg41.tif", "man_seg041.tif"))])
def test_ctc_layout_refuses_two_names_for_one_frame(tmp_path, folder, names):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    tifffile.imwrite(tmp_path / "images" / "t040.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "masks" / "man_seg040.tif", np.zeros((8, 8), np.uint8))
    for name in names:
        tifffile.imwrite(tmp_path / folder / name, np.zeros((8, 8), np.uint8))
    if folder == "images":
        tifffile.imwrite(tmp_path / "masks" / "man_seg041.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError) as error:
        find_pairs(tmp_path)
    first, second = sorted(tmp_path / folder / name for name in names)
    assert str(error.value).startswith(f"{first} and {second} are both frame 41;")


def test_a_dangling_link_in_a_dataset_folder_is_named(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "a.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "masks" / "b.tif").symlink_to(tmp_path / "gone.tif")
    (tmp_path / "masks" / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not an image: not a data file
    with pytest.raises(InputError, match=r"masks/b\.tif: a link to .*gone\.tif, which does not exist; restore the file"):
        find_pairs(tmp_path)
    (tmp_path / "masks" / "b.tif").unlink()
    assert [p.name for p in find_pairs(tmp_path)] == ["a"]
