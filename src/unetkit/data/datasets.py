"""The real datasets of the paper, as training samples.

`data_root()` is where they live: the ``UNETKIT_DATA`` environment variable if set, else
``<repository>/../shared/data`` when the package runs from a source checkout (a folder with
``pyproject.toml`` two levels above the package), else ``../shared/data`` relative to the current
directory. Each dataset folder follows a layout that `find_pairs` recognises.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import InputError
from ..io import repeated
from ..targets import TargetConfig
from .normalize import Normalization
from .readers import ImagePair, ctc_frame, find_pairs
from .samples import Sample, load_samples

ISBI2012 = "isbi2012"
CTC_DIC_HELA = "ctc-dic-c2dh-hela"


def data_root() -> Path:
    """Folder holding the datasets (see the module docstring for how it is found).

    Example:
        >>> (data_root() / "isbi2012").name
        'isbi2012'
    """
    env = os.environ.get("UNETKIT_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]  # src/unetkit/data/datasets.py -> repository
    if (repo / "pyproject.toml").is_file() and (repo / "src" / "unetkit").is_dir():
        return repo.parent / "shared" / "data"
    return Path.cwd().parent / "shared" / "data"


def _dataset_folder(root: str | os.PathLike | None, default: str) -> Path:
    folder = Path(root) if root is not None else data_root() / default
    if not folder.is_dir():
        raise InputError(f"{folder}: dataset folder not found; pass root= or set UNETKIT_DATA to the data folder")
    return folder


def _select(pairs: list[ImagePair], wanted: Iterable[int] | None, number, what: str, root: Path) -> list[ImagePair]:
    if wanted is None:
        return pairs
    by_number = {number(p): p for p in pairs}
    wanted = list(wanted)
    missing = [w for w in wanted if w not in by_number]
    if missing:
        raise InputError(
            f"{root}: {what} {missing[:10]} not found; available: {sorted(k for k in by_number if k is not None)[:10]}"
            + (" ..." if len(by_number) > 10 else "")
        )
    return [by_number[w] for w in wanted]


def get_isbi2012_samples(
    root: str | os.PathLike | None = None,
    slices: Iterable[int] | None = range(20),
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
) -> list[Sample]:
    """Annotated ISBI 2012 training slices (``train/images/NN.png`` with ``train/labels/NN.png``).

    The default takes slices 0..19 and leaves 20..24 for validation. Labels are binary: 255 = cell
    interior, 0 = membrane, so the target is 1 on cells and the weight map stresses thin membranes.
    `normalization` and `targets` (`unetkit.targets.TargetConfig`) as in `unetkit.data.load_samples`.

    Example:
        >>> samples = get_isbi2012_samples(slices=[0])  # doctest: +SKIP
        >>> samples[0].image.shape  # doctest: +SKIP
        (1, 512, 512)
    """
    folder = _dataset_folder(root, ISBI2012)
    pairs = find_pairs(folder)
    number = lambda p: int(p.image.stem) if p.image.stem.isdigit() else None  # noqa: E731
    chosen = _select(pairs, slices, number, "slices", folder)
    return load_samples(chosen, normalization, targets=targets)


def get_ctc_samples(
    root: str | os.PathLike | None = None,
    frames: Iterable[int] | None = None,
    normalization: Normalization | None = None,
    *,
    targets: TargetConfig | None = None,
) -> list[Sample]:
    """Annotated frames of a Cell Tracking Challenge dataset (default: DIC-C2DH-HeLa under `data_root()`).

    Args:
        root: the dataset folder, in the CTC release layout (``01/``, ``01_GT/SEG/``) or flat
            (``images/tNNN.tif``, ``masks/man_segNNN.tif``).
        frames: frame numbers to load (NNN of tNNN.tif); None loads every annotated frame. With
            several sequences in a release layout, the frame numbers must identify one frame each.
        normalization, targets: as in `unetkit.data.load_samples`.

    Example:
        >>> samples = get_ctc_samples(frames=range(5))  # doctest: +SKIP
        >>> len(samples)  # doctest: +SKIP
        5
    """
    folder = _dataset_folder(root, CTC_DIC_HELA)
    pairs = find_pairs(folder)
    if frames is not None:
        numbers = [_frame_number(p) for p in pairs]
        duplicates = repeated(numbers)
        if duplicates:
            raise InputError(
                f"{folder}: frame {min(duplicates)} exists in several sequences; pass the sequence folder as root"
            )
    chosen = _select(pairs, frames, _frame_number, "frames", folder)
    return load_samples(chosen, normalization, targets=targets)


def _frame_number(pair: ImagePair) -> int | None:
    frame = ctc_frame(pair.image.stem)
    return int(frame) if frame is not None else None
