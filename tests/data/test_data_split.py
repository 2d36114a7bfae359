"""Validation splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from unetkit.errors import InputError
from unetkit.data import ImagePair, split_pairs


def _pairs(n: int) -> list[ImagePair]:
    return [ImagePair(Path(f"images/img{i:02d}.png"), Path(f"masks/img{i:02d}.png"), f"img{i:02d}") for i in range(n)]


def test_random_fraction_is_deterministic_disjoint_and_order_independent():
    pairs = _pairs(20)
    train, val = split_pairs(pairs, val=0.2, seed=3, split="random")
    assert len(val) == 4 and len(train) == 16
    assert {p.name for p in train}.isdisjoint(p.name for p in val)
    assert {p.name for p in train} | {p.name for p in val} == {p.name for p in pairs}
    assert split_pairs(pairs, 0.2, seed=3, split="random") == (train, val)
    shuffled_train, shuffled_val = split_pairs(pairs[::-1], 0.2, seed=3, split="random")
    assert {p.name for p in shuffled_val} == {p.name for p in val}
    assert {p.name for p in split_pairs(pairs, 0.2, seed=4, split="random")[1]} != {p.name for p in val}


def test_default_split_is_the_last_block_in_natural_name_order():
    names = ["t9", "t10", "t2", "t11", "t1"]
    pairs = [ImagePair(Path(f"images/{n}.tif"), Path(f"masks/{n}.tif"), n) for n in names]
    train, val = split_pairs(pairs, val=2, seed=5)
    assert [p.name for p in val] == ["t10", "t11"]  # t10 and t11 follow t9 by number, not by character
    assert [p.name for p in train] == ["t9", "t2", "t1"]  # the given order is kept
    assert split_pairs(pairs[::-1], val=2)[1] == val[::-1]
    train, val = split_pairs(_pairs(20), val=0.2)
    assert [p.name for p in val] == ["img16", "img17", "img18", "img19"] and len(train) == 16


def test_small_fraction_gives_at_least_one_and_zero_gives_none():
    assert len(split_pairs(_pairs(3), 0.1)[1]) == 1
    assert split_pairs(_pairs(3), 0.0) == (_pairs(3), [])
    assert len(split_pairs(_pairs(5), 2)[1]) == 2


def test_explicit_names_stems_and_file_names():
    train, val = split_pairs(_pairs(5), val=["img01", "img03.png"])
    assert [p.name for p in val] == ["img01", "img03"]
    assert [p.name for p in train] == ["img00", "img02", "img04"]
    assert split_pairs(_pairs(5), val="img04")[1][0].name == "img04"


def test_errors():
    with pytest.raises(InputError, match="nope"):
        split_pairs(_pairs(3), ["nope"])
    with pytest.raises(InputError, match="none for training"):
        split_pairs(_pairs(1), 0.5)
    with pytest.raises(InputError, match="none for training"):
        split_pairs(_pairs(2), ["img00", "img01"])
    with pytest.raises(InputError):
        split_pairs(_pairs(4), 1.5)
    with pytest.raises(InputError, match="last, random"):
        split_pairs(_pairs(4), 0.5, split="middle")
