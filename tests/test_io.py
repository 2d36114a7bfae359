"""Reading images (broken files, multi-page TIFFs), listing folders, atomic writes, output checks."""

from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from unetkit import io
from unetkit.errors import InputError
from unetkit.io import (
    atomic_write,
    check_output_dir,
    check_writable_file,
    list_images,
    read_header,
    read_image,
    remove_stale_temp_files,
    write_tiff,
)


@pytest.mark.parametrize("content, words", [(b"", r"empty file \(0 bytes\)"), (b"\x89PNG garbage" * 20, "not a readable image")])
def test_broken_png_says_the_file_is_not_an_image(tmp_path, content, words):
    path = tmp_path / "cell.png"
    path.write_bytes(content)
    for reader in (read_image, read_header):
        with pytest.raises(InputError, match=words) as info:
            reader(path)
        message = str(info.value)
        assert str(path) in message and "pip" not in message and "plugin" not in message


def test_hidden_and_macos_resource_files_are_not_listed(tmp_path):
    iio.imwrite(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".a_labels.tif.abcd1234.tif").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]


def test_multi_page_tiff_is_refused_with_its_page_count(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 20, 30), np.uint8), photometric="minisblack")  # a 3-page z-stack
    for reader in (read_image, read_header):
        with pytest.raises(InputError, match="3 pages") as info:
            reader(path)
        assert str(path) in str(info.value) and "never used as colour channels" in str(info.value)
    assert read_image(path, pages=True).shape == (3, 20, 30)


def test_single_page_colour_and_planar_rgb_tiffs(tmp_path):
    rgb = np.arange(20 * 30 * 3, dtype=np.uint16).reshape(20, 30, 3)
    tifffile.imwrite(tmp_path / "contig.tif", rgb)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "single.tif", np.ones((1, 20, 30), np.uint8), photometric="minisblack")
    for name in ("contig.tif", "planar.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), rgb)
        assert read_header(tmp_path / name).shape == (20, 30, 3)
    assert read_image(tmp_path / "single.tif").shape == read_header(tmp_path / "single.tif").shape == (20, 30)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_tiff(tmp_path / "a.tif", np.zeros((3, 3), np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "a.tif").stat().st_mode & 0o777 == mode


def test_atomic_write_syncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "model.pt", lambda p: p.write_bytes(b"weights"))
    assert events[:2] == ["fsync", "replace"]
    assert (tmp_path / "model.pt").read_bytes() == b"weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_stale_temp_files_are_removed(tmp_path):
    stale = [tmp_path / ".curves.png.k3j_9x2a.png", tmp_path / ".last.pt.abcdefgh.pt", tmp_path / ".log.csv.a1b2c3d4.csv"]
    for path in stale:
        path.write_bytes(b"")
    keep = [tmp_path / ".gitignore", tmp_path / ".notes.txt.short.txt", tmp_path / "curves.png"]
    for path in keep:
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path, older_than=3600) == []  # too recent: maybe another writer's
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)


def test_output_checks(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(InputError, match="because .*file is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(InputError, match="is a folder; give a file name for --json"):
        check_writable_file(tmp_path, "--json", force=True)
    with pytest.raises(FileExistsError, match="--force"):
        check_writable_file(tmp_path / "file", "--json")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access  # root may write anywhere: report the folder read-only as for a user
    monkeypatch.setattr(io.os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(locked) else real_access(p, mode))
    try:
        with pytest.raises(InputError, match="permission denied"):
            check_output_dir(locked / "run")
        with pytest.raises(InputError, match="permission denied"):
            check_writable_file(locked / "scores.json", "--json")
    finally:
        locked.chmod(0o755)
