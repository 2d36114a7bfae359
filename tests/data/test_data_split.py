"""Validation splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from unetkit.errors import InputError
from unetkit.data import ImagePair, split_pairs


def _pairs(n: int) -> list[ImagePair]:
    return [ImagePair(Path(f"images/img{i:02d}.png"), Path(f"masks/img{i:02d}.png"), f"img{i:02d}") for i in range(n)]


def test_fraction_is_deterministic_disjoint_and_order_independent():
    pairs = _pairs(20)
    train, val = split_pairs(pairs, val=0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert {p.name for p in train}.isdisjoint(p.name for p in val)
    assert {p.name for p in train} | {p.name for p in val} == {p.name for p in pairs}
    assert split_pairs(pairs, 0.2, seed=3) == (train, val)
    shuffled_train, shuffled_val = split_pairs(pairs[::-1], 0.2, seed=3)
    assert {p.name for p in shuffled_val} == {p.name for p in val}
    assert {p.name for p in split_pairs(pairs, 0.2, seed=4)[1]} != {p.name for p in val}


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
