"""Reading images (broken files, multi-page TIFFs), listing folders, atomic writes, output checks."""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
import sys
import warnings
import zlib

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


def _temp_name(name: str, pid: int, host: str | None = None) -> str:
    return f".{name}.unetkit-tmp.{host or io._host()}.{pid}.k3j_9x2a{os.path.splitext(name)[1]}"


def test_stale_temp_files_are_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    killed = [tmp_path / _temp_name("curves.png", dead), tmp_path / _temp_name("last.pt", dead)]
    writing = [tmp_path / _temp_name("log.csv", os.getpid()), tmp_path / _temp_name("a.tif", dead, "other-host")]
    users = [tmp_path / ".gitignore", tmp_path / ".notes.txt.short.txt", tmp_path / ".last.pt.abcdefgh.pt",
             tmp_path / ".log.csv.a1b2c3d4.csv", tmp_path / "curves.png"]  # the old temp pattern: user files now
    for path in killed + writing + users:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path, older_than=3600)) == sorted(killed)  # its writer is gone
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(writing)  # old enough (here: any age)
    assert sorted(tmp_path.iterdir()) == sorted(users)


def test_temporary_files_carry_the_mark_and_pid_and_vanish(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.txt", lambda p: (seen.append(p.name), p.write_text("x")))
    assert seen[0].startswith(".a.txt.unetkit-tmp.") and f".{os.getpid()}." in seen[0] and seen[0].endswith(".txt")
    assert io._TEMP_NAME.match(seen[0]) and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_broken_links_among_images_are_named(tmp_path):
    iio.imwrite(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "b.tif").symlink_to(tmp_path / "gone" / "b.tif")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "gone.txt")  # not an image name: not ours to judge
    with pytest.raises(InputError, match=r"b\.tif: a link to .*gone/b\.tif, which does not exist; restore the file or remove the link"):
        list_images(tmp_path)
    broken: list = []
    assert list_images(tmp_path, broken_links=broken) == [tmp_path / "a.png"]
    assert broken == [tmp_path / "b.tif"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EFBIG, "the file is too large for this file system"),
                                         (errno.EROFS, "the file system is read-only")])
def test_write_errors_the_user_can_fix_are_one_line_and_leave_no_temp_file(tmp_path, monkeypatch, code, words):
    def fail(path, *args, **kwargs):
        open(path, "wb").write(b"half a TIFF")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(tifffile, "imwrite", fail)
    with pytest.raises(InputError) as info:
        write_tiff(tmp_path / "cell_labels.tif", np.zeros((3, 3), np.uint8))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'cell_labels.tif'}: cannot write it: {words} ([Errno {code}]")
    assert "\n" not in message and list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError):  # other errors stay what they are
        atomic_write(tmp_path / "b.txt", lambda p: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    assert list(tmp_path.iterdir()) == []


def test_pages_written_one_by_one_are_pages(tmp_path):
    path = tmp_path / "planes.tif"
    planes = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30)
    with tifffile.TiffWriter(path) as writer:  # tifffile's documented way: one series per write
        writer.write(planes[0])
        writer.write(planes[1])
    for reader in (read_image, read_header):
        with pytest.raises(InputError, match=r"holds 2 pages") as info:
            reader(path)
        assert str(path) in str(info.value) and "save each plane as its own file" in str(info.value)
    np.testing.assert_array_equal(read_image(path, pages=True), planes)
    assert read_header(path, pages=True).shape == (2, 20, 30)
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as writer:
        writer.write(planes[0])
        writer.write(planes[1, :10])
    with pytest.raises(InputError, match=r"mixed\.tif: has 2 pages of different shapes"):
        read_image(tmp_path / "mixed.tif", pages=True)


def _png_of_zeros(path, height: int, width: int) -> None:
    """A grayscale 8-bit PNG of zeros, compressed row by row (a huge image in a small file and little memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\x00" * (width + 1)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_pngs_beyond_pillows_decompression_bomb_limit_are_read(tmp_path, monkeypatch):
    from PIL import Image

    _png_of_zeros(tmp_path / "scan.png", 14000, 14000)  # 196 Mpixel: Pillow's default limit refuses it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_header(tmp_path / "scan.png").shape == (14000, 14000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the same guard, tripped by a small image
    _png_of_zeros(tmp_path / "small.png", 60, 70)
    with pytest.raises(Image.DecompressionBombError):
        iio.imread(tmp_path / "small.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "small.png").shape == read_header(tmp_path / "small.png").shape == (60, 70)
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted for our reads only


def test_complex_pixels_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "fft.tif", np.ones((8, 9), np.complex64))
    for reader in (read_image, read_header):
        with pytest.raises(InputError, match=r"fft\.tif: complex-valued pixels \(complex64\).*magnitude"):
            reader(tmp_path / "fft.tif")


def test_tifffile_metadata_complaints_are_not_printed(tmp_path, caplog):
    image = np.arange(20, dtype=np.uint8).reshape(4, 5)
    tifffile.imwrite(tmp_path / "shaped.tif", image, description='{"shape": [7, 9]}', metadata=None)
    tifffile.imwrite(tmp_path / "imagej.tif", image, description="ImageJ=1.11a\nimages=3\nslices=3\n", metadata=None)
    with caplog.at_level(logging.DEBUG, logger="tifffile"):
        tifffile.imread(tmp_path / "shaped.tif")
        assert "shape does not match" in caplog.text  # what a user saw
        caplog.clear()
        for name in ("shaped.tif", "imagej.tif"):
            np.testing.assert_array_equal(read_image(tmp_path / name), image)
            assert read_header(tmp_path / name).shape == (4, 5)
    assert caplog.records == [] and logging.getLogger("tifffile").filters == []


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_pixel_data_damaged_past_the_header_is_an_input_error(tmp_path, compression):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), compression=compression,
                     rowsperstrip=8)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[-2]
    path.write_bytes(path.read_bytes()[:offset + 3])  # the copy stopped inside the pixel data
    assert read_header(path).shape == (64, 64)
    with pytest.raises(InputError, match=r"cut\.tif: the header is readable but the pixel data is damaged or incomplete"):
        read_image(path)


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
