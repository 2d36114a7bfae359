"""bioimage.io model packages (format 0.5) from unetkit checkpoints, and the `unetkit export` entry.

A package holds the network three ways (`pytorch_state_dict` with its architecture as a plain-torch
file, `torchscript`, `onnx`), all of which take any input size and return probabilities of the
same size (mirrored inside the network exactly as `unetkit.predict` mirrors one tile), a test input
and the output `unetkit.predict` gives for it, a cover image, and a README stating what the package
cannot carry (test-time augmentation, per-image batch-norm statistics, the labels rule) and the
package's own scores where they were measured (`pretrained` ``package_scores``). Batch-norm
statistics averaged over representative images (`statistics_from`, ``--statistics-from``) can be
fixed in the exported network, for every format; the README and ``config.unetkit`` say which. The description states input sizes min + n*step and an output halo that is a multiple of
the pooling step, so bioimage.io's runner gives unetkit's result whole and in blocks; the input is
padded by reflection (unetkit's mirror). Preprocessing repeats the checkpoint's normalisation:
percentiles -> `scale_range`, fixed -> `scale_linear`, clipping -> `clip`. The package is built
and validated with `bioimageio.spec`, and each weight format is run on the test input with
`bioimageio.core.test_model` before it is written; a package that fails either is refused.
It is written in a temporary folder beside `out` and moved into place; `force` replaces only a
package folder that unetkit wrote (its `MARKER` file lists the files), never anything else.

Needs ``pip install 'unetkit[export]'``.

Example:
    >>> export_bioimageio("run/best.pt", "unet.zip")  # doctest: +SKIP
    PosixPath('unet.zip')
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..checkpoint import LoadedModel, load_checkpoint
from ..data.normalize import Normalization, to_chw
from ..errors import InputError
from ..geometry import VolumeGeometry
from ..io import IMAGE_SUFFIXES, list_images, process_running, read_image, write_png, write_tiff
from ..pretrained import file_sha256, get_model, model_path, package_scores_for, pretrained_name
from ..tiling import extract_region
from . import FORMATS
from .graphs import OPSET, AnySize, AnyVolume, any_size_layout, export_onnx, export_torchscript

CITATION = {
    "text": "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
    "MICCAI 2015, LNCS 9351, pp. 234-241",
    "doi": "10.1007/978-3-319-24574-4_28",
}
CITATION_3D = {
    "text": "Cicek O, Abdulkadir A, Lienkamp SS, Brox T, Ronneberger O. 3D U-Net: Learning Dense Volumetric Segmentation "
    "from Sparse Annotation. MICCAI 2016, LNCS 9901, pp. 424-432",
    "doi": "10.1007/978-3-319-46723-8_49",
}
#: Pixels per side the test input aims at (the smallest stated input size at least this large).
TEST_SIZE = 256
#: Voxels along y and x the test input of a 3D model aims at (along z: the sample's slices).
TEST_VOLUME_SIZE = 64
#: The packaged models' training data: what to cite (`unetkit.pretrained` names the papers).
DATA_CITATIONS = {
    "isbi2012": [
        {"text": "Cardona A et al. An integrated micro- and macroarchitectural analysis of the Drosophila brain by "
                 "computer-assisted serial section electron microscopy. PLoS Biol 8:e1000502, 2010",
         "doi": "10.1371/journal.pbio.1000502"},
        {"text": "Arganda-Carreras I et al. Crowdsourcing the creation of image segmentation algorithms for "
                 "connectomics. Front Neuroanat 9:142, 2015", "doi": "10.3389/fnana.2015.00142"},
    ],
    "ctc": [
        {"text": "Maska M et al. A benchmark for comparison of cell tracking algorithms. Bioinformatics 30:1609-1617, "
                 "2014", "doi": "10.1093/bioinformatics/btu080"},
        {"text": "Ulman V et al. An objective comparison of cell-tracking algorithms. Nat Methods 14:1141-1152, 2017",
         "doi": "10.1038/nmeth.4473"},
        {"text": "Maska M et al. The Cell Tracking Challenge: 10 years of objective benchmarking. Nat Methods "
                 "20:1010-1020, 2023", "doi": "10.1038/s41592-023-01879-y"},
    ],
}
#: The file of a packaged model's package that states its training data's terms.
DATA_TERMS = "DATA_TERMS.md"
ARCHITECTURE_FILE = Path(__file__).with_name("architecture.py")


def export_checkpoint(
    checkpoint: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    force: bool = False,
    statistics_from: Sequence[str | os.PathLike] | None = None,
    echo: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Export a checkpoint (RUN/best.pt or a packaged model's name) as `fmt`: "onnx",
    "torchscript" (one file each, any input size, output as large as the input) or "bioimageio"
    (a .zip, or a folder for any other name; `options` go to `export_bioimageio`).

    `statistics_from` (image files or folders of them) fixes batch-norm statistics averaged over
    those images in the exported network (`representative_statistics`), for every format.
    `out` and `statistics_from` are checked before the checkpoint is even loaded; `echo`
    receives notes (one when the checkpoint's rule wants each image's statistics and the export
    uses the training statistics).

    Example:
        >>> export_checkpoint("em-membranes", "onnx", "em.onnx")  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = Path(out)
    if fmt == "bioimageio":
        return export_bioimageio(checkpoint, out, force=force, statistics_from=statistics_from, echo=echo, **options)
    if options:
        raise InputError(f"options {sorted(options)} apply to --format bioimageio only")
    check_destination(out, force=force, folder=False)
    files = statistics_files(statistics_from)
    loaded, _ = fixed_statistics(load_checkpoint(checkpoint), files, echo=echo, what=f"the {fmt} file")
    write = export_onnx if fmt == "onnx" else export_torchscript
    return write(loaded.model, out, force=force)


# -- batch-norm statistics fixed on representative images -------------------------------------------


@dataclass(frozen=True)
class PackageStatistics:
    """Which batch-norm statistics an exported network uses: the training ones (`images` empty),
    or the average of the statistics of `images` (their file names, and their files' SHA-256)."""

    images: tuple[str, ...] = ()
    sha256: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "images" if self.images else "training"

    def describe(self) -> str:
        """E.g. "statistics averaged over 4 representative images (16.png, 17.png, 18.png, 19.png)"."""
        if not self.images:
            return "the training statistics"
        n = len(self.images)
        return f"statistics averaged over {n} representative image{'s' if n != 1 else ''} ({', '.join(self.images)})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "images": list(self.images), "image_sha256": list(self.sha256)}

    def matches(self, recorded: dict[str, Any]) -> bool:
        """Whether a record (`to_dict` form, e.g. models.json's ``package_scores``) names these statistics:
        the same source and, for images, the same files (by content)."""
        if not isinstance(recorded, dict) or recorded.get("kind") != self.kind:
            return False
        return self.kind == "training" or sorted(recorded.get("image_sha256") or []) == sorted(self.sha256)


def statistics_files(paths: Sequence[str | os.PathLike] | None) -> list[Path]:
    """The image files `--statistics-from` names (files, or the images directly inside folders);
    [] when not given. InputError for a missing path, a file that is not an image, or a folder
    without images."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise InputError("--statistics-from: no path given; give image files or folders of images")
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise InputError(f"--statistics-from {item}: no PNG or TIFF images in this folder; give a folder of "
                                 "images like the ones to segment")
            files.extend(found)
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"--statistics-from {item}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            files.append(item)
        else:
            raise InputError(f"--statistics-from {item}: no such file or folder")
    return files


def representative_statistics(loaded: LoadedModel, files: Sequence[Path]):
    """Batch-norm statistics averaged over images: each file is read, normalised as the checkpoint
    says, its statistics gathered over the tiles `unetkit.predict` would use
    (`adapt.gather_statistics` with `predict.choose_tile_shape`), and the means and the variances
    averaged layer by layer, each image weighing the same.

    Raises InputError for a network without batch norm, or an image with the wrong channel count.
    """
    from ..adapt import BatchNormStatistics, gather_statistics, has_batch_norm
    from ..predict import choose_tile_shape

    model = loaded.model.eval()
    if not has_batch_norm(model):
        raise InputError("--statistics-from: this network has no batch norm, so there are no statistics to fix; "
                         "leave the option out")
    gathered = []
    for path in files:
        raw = read_image(path)
        channels = to_chw(raw, name=str(path)).shape[0]
        if channels != model.in_channels:
            raise InputError(f"--statistics-from {path}: has {channels} channel(s), the model takes "
                             f"{model.in_channels}; give images like the ones to segment")
        loaded.normalization.check(raw, source=str(path))
        image = loaded.normalization(raw)
        gathered.append(gather_statistics(model, image, choose_tile_shape(model, image.shape[-2:])))
    return BatchNormStatistics(
        tuple(np.mean([s.means[i] for s in gathered], axis=0) for i in range(len(gathered[0]))),
        tuple(np.mean([s.variances[i] for s in gathered], axis=0) for i in range(len(gathered[0]))),
        gathered[0].tile_shape, sum(s.tiles for s in gathered), sum(s.plan_size for s in gathered),
    )


def rescale_factor(loaded: LoadedModel) -> float | None:
    """By how much unetkit rescales each image before segmenting it with `loaded` (a model fine-tuned
    at its start model's object scale records the objects' diameter of its images; the factor is
    `unetkit.scale.scale_factor` for that diameter, as `Segmenter` uses it), or None.

    Example:
        >>> from unetkit.data import Normalization
        >>> from unetkit.network import UNet
        >>> net = UNet(depth=2, base_channels=4)
        >>> rescale_factor(LoadedModel(net, Normalization(), ["background", "cell"], scale={"diameter": 60.0, "input_diameter": 24.0}))
        2.5
    """
    from ..scale import scale_factor

    input_diameter = (loaded.scale or {}).get("input_diameter")  # the checkpoint keeps only a positive one
    return None if input_diameter is None else scale_factor(loaded.scale, diameter=float(input_diameter))


def fixed_statistics(loaded: LoadedModel, files: Sequence[Path], *, echo=None,
                     what: str = "the package") -> tuple[LoadedModel, PackageStatistics]:
    """`loaded` with the statistics of `files` fixed in its network (`representative_statistics`),
    or as it is (the training statistics) without files; and which statistics those are.

    Without files, a checkpoint whose labels rule was chosen with each image's statistics gets a
    note through `echo` saying so."""
    from ..adapt import with_statistics

    factor = rescale_factor(loaded)
    if factor is not None and echo is not None:
        echo(f"note: this model was fine-tuned at its start model's object scale and unetkit rescales each image by "
             f"{factor:.2f} before segmenting it (objects of {float(loaded.scale['input_diameter']):g} px to "
             f"{float(loaded.scale['diameter']):g} px); {what} does not: rescale images by {factor:.2f} first")
    if not files:
        if (loaded.decision or {}).get("image_statistics") and echo is not None:
            echo(f"note: unetkit normalises each image with its own batch-norm statistics for this model, but "
                 f"{what} uses the training statistics; --statistics-from with a few images like the ones to "
                 "segment brings it closer to unetkit")
        return loaded, PackageStatistics()
    if isinstance(loaded.model.geometry, VolumeGeometry):
        raise InputError("--statistics-from gathers the batch-norm statistics of 2D images, but this is a 3D model: "
                         "leave it out (the export then uses the training statistics)")
    stats = representative_statistics(loaded, files)
    used = PackageStatistics(tuple(p.name for p in files), tuple(file_sha256(p) for p in files))
    if echo is not None:
        echo(f"fixing batch-norm {used.describe()}")
    return replace(loaded, model=with_statistics(loaded.model, stats)), used


def export_bioimageio(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sample: str | os.PathLike | None = None,
    name: str | None = None,
    authors: Sequence[str] = (),
    maintainers: Sequence[str] = (),
    git_repo: str | None = None,
    license: str | None = None,
    test: bool = True,
    force: bool = False,
    statistics_from: Sequence[str | os.PathLike] | None = None,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Write a bioimage.io model package of `checkpoint` to `out` (a .zip file, else a folder).

    Args:
        checkpoint: RUN/best.pt or a packaged model's name.
        out: the package: ``NAME.zip``, or a folder for any other name.
        sample: an image file for the test input and the cover; default: the run's first
            validation image (RUN/data.json), else a synthetic image of cells.
        name: the package's name (default "unetkit " + the model or run folder name).
        authors: author names (default: the user's login name; "unetkit" for packaged models).
        maintainers: GitHub user names of the package's maintainers (default: none stated).
        git_repo: URL of the Git repository the model is developed in (default: none stated).
        license: SPDX identifier of the weights (default "MIT"); packaged models add their
            training data's terms as DATA_TERMS.md.
        test: run `bioimageio.core.test_model` for every weight format before writing.
        force: replace `out` if it is a package this function wrote (see `check_destination`).
        statistics_from: image files or folders of images; their batch-norm statistics, averaged,
            are fixed in every weight format (`representative_statistics`), and the README and
            ``config.unetkit.batch_norm_statistics`` say so. Default: the training statistics.
        echo: receives one line per step.

    Raises:
        InputError: `out` cannot be written or replaced, the checkpoint cannot be traced (naming
            the layer), or the package fails validation or its test (the first errors of the
            validator); FileExistsError: `out` exists and not `force`.
    """
    note = echo or (lambda message: None)
    out = Path(out)
    zipped = out.suffix.lower() == ".zip"
    check_destination(out, force=force, folder=not zipped)
    files = statistics_files(statistics_from)
    spec = _require_bioimageio()
    packaged = pretrained_name(checkpoint)
    loaded, statistics = fixed_statistics(load_checkpoint(checkpoint), files, echo=note)
    model = loaded.model.eval()
    volume = isinstance(model.geometry, VolumeGeometry)
    content = _description(loaded, checkpoint, packaged, name=name, authors=authors, license=license,
                           maintainers=maintainers, git_repo=git_repo, statistics=statistics)
    # The description alone first, so that a wrong name or license is refused before any export.
    early = spec.build_description(content, context=spec.ValidationContext(perform_io_checks=False))
    _refuse_if_failed(early, "validation")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=out.parent))
    try:
        root = tmp / "package"
        root.mkdir()
        if volume:  # architecture.py is the 2D network: a 3D package carries the traced graphs only
            note("writing the weights (TorchScript, ONNX)")
        else:
            note("writing the weights (state dict, TorchScript, ONNX)")
            shutil.copyfile(ARCHITECTURE_FILE, root / "architecture.py")
            state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
            torch.save(state, root / "weights.pt")
        export_torchscript(model, root / "weights_torchscript.pt")
        export_onnx(model, root / "weights.onnx")
        if volume:
            raw, source = _sample_volume(sample, model.in_channels)
            test_input, test_output = _test_volume_tensors(loaded, raw)
        else:
            raw, source = _sample(sample, None if packaged else checkpoint, model.in_channels, packaged)
            test_input, test_output = _test_tensors(loaded, raw)
        np.save(root / "test_input.npy", test_input)
        np.save(root / "test_output.npy", test_output)
        write_tiff(root / "sample_input.tif", test_input[0])
        write_tiff(root / "sample_output.tif", test_output[0])
        middle = test_input.shape[2] // 2  # a 3D model's cover shows the middle slice
        _write_cover(root / "cover.png", loaded, *((test_input[:, :, middle], test_output[:, :, middle]) if volume
                                                    else (test_input, test_output)))
        if packaged:
            (root / DATA_TERMS).write_text(f"# Terms of the training data\n\n{get_model(packaged).license}\n")
        (root / "README.md").write_text(_readme(loaded, checkpoint, packaged, source, test_input.shape, statistics))
        descr = spec.build_description(content, context=spec.ValidationContext(root=root, file_name="rdf.yaml"))
        _refuse_if_failed(descr, "validation")
        if test:
            note("testing every weight format on the test input (bioimageio.core)")
            descr = _tested(descr)
        note(f"writing {out}")
        staged = tmp / ("package.zip" if zipped else "folder")
        if zipped:
            spec.save_bioimageio_package(descr, output_path=staged)
        else:
            spec.save_bioimageio_package_as_folder(descr, output_path=staged)
            _write_marker(staged)
        check_destination(out, force=force, folder=not zipped)  # again: the export took a while
        if out.is_dir():
            os.replace(out, tmp / "replaced")
        os.replace(staged, out)
    finally:
        _remove_own_folder(tmp)
    return out


# -- where the export goes: checks, temporary folders, replacing only what unetkit wrote ------------

#: The file in a package folder that names the files unetkit wrote there (one per line).
MARKER = ".unetkit-package"
_TEMP_NAME = re.compile(r"^\.unetkit-export-(?P<host>[A-Za-z0-9]{1,32})-(?P<pid>[0-9]+)-[a-z0-9_]{8}$")
#: Age after which a temporary folder of another machine (same shared folder) counts as stale.
STALE_SECONDS = 24 * 3600


def check_destination(out: str | os.PathLike, *, force: bool, folder: bool) -> None:
    """Refuse `out` before any export work: an existing `out` without `force`, a missing or
    read-only parent folder, a folder where a file is wanted, and (`folder` packages) a folder
    that is not a package unetkit wrote or holds files it did not write.

    Raises:
        FileExistsError: `out` exists and not `force`.
        InputError: anything else, in one line naming the path.

    Example:
        >>> check_destination("new-package", force=False, folder=True)  # doctest: +SKIP
    """
    out = Path(out)
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: the folder {parent} is not writable")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{out}: already exists; use --force to overwrite it")
    if out.is_symlink():
        raise InputError(f"--out {out}: is a link; give a new name (--force replaces only what unetkit wrote)")
    if not folder:
        if out.is_dir():
            raise InputError(f"--out {out}: is a folder; give a file name")
        if not os.access(out, os.W_OK):
            raise InputError(f"--out {out}: is not writable")
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a package folder unetkit wrote; give a new folder name")
    foreign = _foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(
            f"--out {out}: not replaced, the folder holds files unetkit did not write ({shown}); "
            "give a new folder name or move those files"
        )


def _foreign_files(folder: Path) -> list[str]:
    """Files in `folder` that its marker does not list (all of them without a marker)."""
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    try:
        written = set((folder / MARKER).read_text().split("\n")) | {MARKER}
    except OSError:
        written = set()
    return [name for name in present if name not in written]


def _write_marker(folder: Path) -> None:
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    (folder / MARKER).write_text("\n".join(names) + "\n")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _temp_prefix() -> str:
    return f".unetkit-export-{_host()}-{os.getpid()}-"


def remove_stale_temp_folders(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Delete the temporary folders that an export killed mid-way left in `folder`; return them.

    Only folders named as this module names them (``.unetkit-export-HOST-PID-xxxxxxxx``) count:
    of this machine, when process PID has ended; of another machine, when older than
    `STALE_SECONDS`. Nothing else is touched.
    """
    now = time.time() if now is None else now
    removed = []
    for path in Path(folder).iterdir():
        match = _TEMP_NAME.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match["pid"])
        if match["host"] == _host():
            stale = pid != os.getpid() and not process_running(pid)
        else:
            stale = now - path.stat().st_mtime > STALE_SECONDS
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _remove_own_folder(tmp: Path) -> None:
    if _TEMP_NAME.match(tmp.name):  # never anything but the folder this process made
        shutil.rmtree(tmp, ignore_errors=True)


# -- the pieces ------------------------------------------------------------------------------------


def _require_bioimageio():
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise InputError("bioimage.io export needs bioimageio.spec and bioimageio.core: pip install 'unetkit[export]'") from None
    return spec


def _sample(sample, checkpoint, channels: int, packaged: str | None = None) -> tuple[np.ndarray, str]:
    """The raw image (C, H, W) for the test input, and where it came from."""
    if sample is not None:
        return to_chw(read_image(sample), name=str(sample)), Path(sample).name
    if packaged:
        run_image = _held_out_image(packaged)
    else:
        run_image = None if checkpoint is None else _run_validation_image(Path(str(checkpoint)).parent)
    if run_image is not None:
        raw = to_chw(read_image(run_image), name=str(run_image))
        if raw.shape[0] == channels:
            what = "a held-out image of its dataset" if packaged else "a validation image of the run"
            return raw, f"{run_image.name} ({what})"
    from ..synthetic import synthetic_cells

    image, _ = synthetic_cells((320, 320), seed=0)
    raw = np.clip(np.asarray(image, np.float32) * 255, 0, 255).round().astype(np.uint8)
    return np.repeat(raw[None], channels, axis=0), "a synthetic image of touching cells (unetkit.synthetic)"


def _held_out_image(name: str) -> Path | None:
    """A held-out image of packaged model `name`'s dataset, where the datasets are at hand."""
    from ..data.datasets import data_root
    from ..data.readers import find_pairs

    info = get_model(name)
    try:
        pairs = find_pairs(data_root() / info.dataset, allow_missing_masks=True)
    except (OSError, ValueError):
        return None
    wanted = {form.format(i) for i in info.test_ids[:1] for form in ("{:02d}", "t{:02d}", "t{:03d}")}
    return next((p.image for p in pairs if p.name in wanted or p.image.stem in wanted), None)


def _run_validation_image(run_dir: Path) -> Path | None:
    """The first validation image named in RUN/data.json, if it is still there."""
    try:
        setup = json.loads((run_dir / "data.json").read_text())
        from ..data.readers import find_pairs

        folder = setup.get("val_data") or setup["data"]
        wanted = (setup.get("validation") or setup.get("train") or [None])[0]
        pairs = find_pairs(folder, allow_missing_masks=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((p.image for p in pairs if p.name == wanted), None)


def _test_size(model) -> int:
    """The smallest size the package states (`_min_input`) that is at least `TEST_SIZE`."""
    g = model.geometry
    minimum = _min_input(g)
    return minimum + max(0, -(-(TEST_SIZE - minimum) // g.step)) * g.step


def _test_tensors(loaded: LoadedModel, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A centred window of the raw image (1, C, s, s) and the probabilities (1, n_classes, s, s)
    that `unetkit.predict` gives for it (one tile, no test-time augmentation)."""
    size = _test_size(loaded.model)
    y0, x0 = (raw.shape[-2] - size) // 2, (raw.shape[-1] - size) // 2
    window = np.ascontiguousarray(extract_region(raw, y0, x0, size, size), dtype=np.float32)
    normalised = loaded.normalization(window)
    with torch.no_grad():
        output = AnySize(loaded.model.eval(), loaded.model.geometry)(torch.from_numpy(normalised)[None]).numpy()
    return window[None], output


def _sample_volume(sample, channels: int) -> tuple[np.ndarray, str]:
    """The raw volume (C, Z, Y, X) for a 3D model's test input, and where it came from: `sample`
    (a multi-page TIFF z-stack of one-channel planes), else synthetic cells."""
    if sample is not None:
        raw = np.asarray(read_image(sample, pages=True))
        if raw.ndim != 3:
            raise InputError(f"--sample {sample}: a 3D model's test input must be a z-stack (multi-page TIFF of one-channel "
                             f"planes), got shape {raw.shape}; give a z-stack")
        return np.repeat(raw[None], channels, axis=0), Path(sample).name
    from ..synthetic import synthetic_cells_3d

    image, _ = synthetic_cells_3d((16, 80, 80), seed=0)
    raw = np.clip(np.asarray(image, np.float32) * 255, 0, 255).round().astype(np.uint8)
    return np.repeat(raw[None], channels, axis=0), "a synthetic volume of touching cells (unetkit.synthetic)"


def _stated_size(axis, target: int) -> int:
    """The smallest size the package states along an axis (`_min_input` + n*step) of at least `target`."""
    minimum = _min_input(axis)
    return minimum + max(0, -(-(int(target) - minimum) // axis.step)) * axis.step


def normalize_channels_first(normalization: Normalization, volume: np.ndarray) -> np.ndarray:
    """A (C, Z, Y, X) volume normalised as one image (each statistic over all its voxels), float32.

    Example:
        >>> normalize_channels_first(Normalization(), np.arange(120.0).reshape(1, 2, 6, 10)).shape
        (1, 2, 6, 10)
    """
    c, z, y, x = volume.shape
    flat = normalization(volume.reshape(z * y, x) if c == 1 else volume.reshape(c, z * y, x))
    return np.ascontiguousarray(flat.reshape(c, z, y, x), dtype=np.float32)


def _test_volume_tensors(loaded: LoadedModel, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A centred window of the raw volume (1, C, z, y, x), mirrored where it is larger, and the
    probabilities (1, n_classes, z, y, x) the network gives for it (one tile, no augmentation)."""
    from ..volume import extract_volume

    geometry = loaded.model.geometry
    targets = (raw.shape[1], TEST_VOLUME_SIZE, TEST_VOLUME_SIZE)
    shape = tuple(_stated_size(axis, t) for axis, t in zip(geometry.axes, targets))
    start = tuple((size - n) // 2 for size, n in zip(raw.shape[1:], shape))
    window = np.ascontiguousarray(extract_volume(raw, start, shape), dtype=np.float32)
    normalised = normalize_channels_first(loaded.normalization, window)
    with torch.no_grad():
        output = AnyVolume(loaded.model.eval(), geometry)(torch.from_numpy(normalised)[None]).numpy()
    return window[None], output


def _write_cover(path: Path, loaded: LoadedModel, test_input: np.ndarray, test_output: np.ndarray) -> None:
    """The image beside its predicted contours (2:1), over the region the output covers."""
    from ..plots import overlay
    from ..inference import foreground as foreground_of, labels_rule

    foreground = foreground_of(test_output[0])
    h, w = foreground.shape
    dy, dx = (test_input.shape[-2] - h) // 2, (test_input.shape[-1] - w) // 2
    image = loaded.normalization(test_input[0])[:, dy : dy + h, dx : dx + w]
    labels = labels_rule(loaded.decision).apply(foreground)
    plain = overlay(image, np.zeros_like(labels))
    write_png(path, np.concatenate([plain, overlay(image, labels)], axis=1), force=True)


def _halo(g) -> int:
    """Output pixels per side that a block must drop: the context each pixel needs (the border,
    or the margin for padding "same") rounded up to the pooling step, so that blocks of a
    multiple of the step stay on the pooling grid."""
    return any_size_layout(g)[0] if g.padding == "same" else -(-g.border // g.step) * g.step


def _min_input(g) -> int:
    """The smallest input size the package states: one step more than the halo on both sides, so
    that every stated size (min + n*step) leaves a block centre of a multiple of the step."""
    return 2 * _halo(g) + g.step


def _space(g) -> list[tuple[str, Any]]:
    """(axis id, its geometry) of each space axis: y and x of a 2D network, z, y and x of a 3D one."""
    if isinstance(g, VolumeGeometry):
        return list(zip("zyx", g.axes))
    return [("y", g), ("x", g)]


def _sizes_text(g) -> str:
    """The stated input sizes in words, e.g. "44 + n*4 pixels along y and x" or per axis for volumes."""
    if not isinstance(g, VolumeGeometry):
        return f"{_min_input(g)} + n*{g.step} pixels along y and x"
    return ", ".join(f"{name}: {_min_input(axis)} + n*{axis.step}" for name, axis in _space(g)) + " voxels"


def _halo_text(g) -> str:
    if not isinstance(g, VolumeGeometry):
        return f"{_halo(g)} pixels"
    return ", ".join(f"{name} {_halo(axis)}" for name, axis in _space(g)) + " voxels"


def _pixel_size(packaged: str | None) -> dict[str, Any]:
    """The space axes' unit and scale where the packaged model's training data states a pixel size."""
    text = get_model(packaged).input.pixel_size if packaged else None
    found = re.fullmatch(r"\s*([0-9.]+)\s*x\s*([0-9.]+)\s*(nm|um|µm)\s*", text or "")
    if not found or found[1] != found[2]:
        return {}
    return {"unit": "nanometer" if found[3] == "nm" else "micrometer", "scale": float(found[1])}


def _identifier(text: str) -> str:
    word = re.sub(r"[^A-Za-z0-9_]", "_", str(text)).strip("_") or "c"
    return word if word[0].isalpha() else f"c_{word}"


def _preprocessing(norm: Normalization, space: Sequence[str] = ("y", "x")) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if norm.mode == "percentile":
        axes = list(space) if norm.per_channel else ["channel", *space]
        steps.append({"id": "scale_range", "kwargs": {"axes": axes, "min_percentile": norm.low, "max_percentile": norm.high}})
    elif norm.mode == "fixed":
        steps.append({"id": "scale_linear", "kwargs": {"gain": norm.scale, "offset": norm.offset}})
    if norm.clip:
        steps.append({"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}})
    return steps


def _data_citations(packaged: str | None) -> list[dict[str, str]]:
    if not packaged:
        return []
    dataset = get_model(packaged).dataset
    return DATA_CITATIONS.get("ctc" if dataset.startswith("ctc-") else dataset, [])


def _description(loaded: LoadedModel, checkpoint, packaged: str | None, *, name, authors, license,
                 maintainers: Sequence[str] = (), git_repo: str | None = None,
                 statistics: PackageStatistics | None = None) -> dict[str, Any]:
    model = loaded.model
    g = model.geometry
    volume = isinstance(g, VolumeGeometry)
    config = dict(model.config, dropout=0.0) if volume else dict(model.config, dropout=0.0, any_size=list(any_size_layout(g)))
    if name is None:
        base = packaged or Path(str(checkpoint)).resolve().parent.name or "model"
        name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"unetkit U-Net {base}")[:64]
    authors = list(authors) or (["unetkit"] if packaged else [getpass.getuser()])
    pixel = _pixel_size(packaged)
    in_axes = [{"type": "space", "id": name, "size": {"min": _min_input(axis), "step": axis.step}, **pixel}
               for name, axis in _space(g)]
    # Same size out, with a halo that blocks drop: the graphs mirror-pad inside, so any size runs.
    out_axes = [{"type": "space", "id": name, "halo": _halo(axis), "size": {"tensor_id": "input", "axis_id": name}, **pixel}
                for name, axis in _space(g)]
    channel_names = ["gray"] if model.in_channels == 1 else [f"channel{i}" for i in range(model.in_channels)]
    torch_version = torch.__version__.split("+")[0]
    what = f"{g.depth} levels, {config['base_channels']} channels at the first, padding {g.padding!r}"
    kind = "3D U-Net (Cicek et al. 2016)" if volume else "U-Net (Ronneberger et al. 2015)"
    blocks = (f"{_sizes_text(g)} drop a halo of {_halo_text(g)}" if volume
              else f"{_min_input(g)} + n*{g.step} pixels drop a halo of {_halo(g)}")
    description = (get_model(packaged).description + "; " if packaged else "") + (
        f"{kind} trained with unetkit: {what}. Outputs class probabilities as large as "
        f"the input; blocks of {blocks}."
    )
    dims = "3d" if volume else "2d"
    tags = ["unetkit", f"unet{dims}", "u-net", dims, "segmentation", "semantic-segmentation", "pytorch", "torchscript", "onnx"]
    if packaged:
        tags += {"em-membranes": ["electron-microscopy", "membranes", "isbi2012"], "dic-hela": ["dic", "cells", "hela"],
                 "fluo-nuclei": ["fluorescence-light-microscopy", "nuclei"]}.get(packaged, [])
    content = {
        "format_version": _format_version(),
        "type": "model",
        "name": name,
        "description": description[:1000],
        "authors": [{"name": a} for a in authors],
        "cite": [CITATION, *([CITATION_3D] if volume else []), *_data_citations(packaged)],
        "license": license or "MIT",
        "tags": tags,
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "inputs": [{
            "id": "input",
            "description": "image, normalised by the preprocessing",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channel_names},
                     *in_axes],
            "test_tensor": {"source": "test_input.npy"},
            "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": "float32"},
            "pad": {"mode": "reflect"},  # the mirror unetkit uses (no repeated edge pixel)
            "preprocessing": _preprocessing(loaded.normalization, [name for name, _ in _space(g)]),
        }],
        "outputs": [{
            "id": "probabilities",
            "description": "class probabilities (softmax)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": [_identifier(c) for c in loaded.class_names]},
                     *out_axes],
            "test_tensor": {"source": "test_output.npy"},
            "sample_tensor": {"source": "sample_output.tif"},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": _weights(config, torch_version, volume),
        "config": {"unetkit": {"model": model.config, "normalization": loaded.normalization.to_dict(),
                               "decision": loaded.decision, "border": list(g.border) if volume else g.border,
                               "packaged_model": packaged, "scale": loaded.scale or None,
                               "batch_norm_statistics": (statistics or PackageStatistics()).to_dict()
                               if model.config.get("batch_norm") else None}},
    }
    if maintainers:
        content["maintainers"] = [{"github_user": user} for user in maintainers]
    if git_repo:
        content["git_repo"] = git_repo
    if packaged:
        content["attachments"] = [{"source": DATA_TERMS}]
    return content


def _weights(config: dict[str, Any], torch_version: str, volume: bool) -> dict[str, Any]:
    """The weight formats: state dict (2D architecture file), TorchScript and ONNX; a 3D model's
    package has the TorchScript and ONNX graphs, TorchScript first."""
    if volume:
        return {"torchscript": {"source": "weights_torchscript.pt", "pytorch_version": torch_version},
                "onnx": {"source": "weights.onnx", "opset_version": OPSET, "parent": "torchscript"}}
    return {
        "pytorch_state_dict": {
            "source": "weights.pt",
            "architecture": {"source": "architecture.py", "callable": "UNet", "kwargs": config},
            "pytorch_version": torch_version,
        },
        "torchscript": {"source": "weights_torchscript.pt", "pytorch_version": torch_version, "parent": "pytorch_state_dict"},
        "onnx": {"source": "weights.onnx", "opset_version": OPSET, "parent": "pytorch_state_dict"},
    }


def _format_version() -> str:
    from bioimageio.spec.model.v0_5 import ModelDescr

    return ModelDescr.implemented_format_version


def _first_errors(summary, limit: int = 3) -> str:
    errors = list(getattr(summary, "errors", []) or [])
    for detail in getattr(summary, "details", []) or []:
        errors += [e for e in (detail.errors or []) if e not in errors]
    if not errors:
        return "no error details"
    shown = []
    for e in errors[:limit]:
        where = ".".join(map(str, e.loc)) if getattr(e, "loc", None) else ""
        shown.append(f"{where}: {' '.join(str(e.msg).split())}" if where else " ".join(str(e.msg).split()))
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(shown) + more


def _refuse_if_failed(descr, what: str) -> None:
    summary = descr.validation_summary
    if summary.status not in ("valid-format", "passed"):
        raise InputError(f"the bioimage.io package failed {what}: {_first_errors(summary)}; nothing was written")


def _tested(descr):
    """The description after `bioimageio.core.test_model` ran every weight format on it."""
    try:
        from bioimageio.core import test_model
    except ImportError:
        raise InputError("testing the package needs bioimageio.core: pip install 'unetkit[export]' (or pass test=False)") from None
    summary = test_model(descr, devices=["cpu"])
    if summary.status != "passed":
        raise InputError(f"the bioimage.io package failed its test: {_first_errors(summary)}; nothing was written")
    return descr


def _package_scores_text(packaged: str | None, statistics: PackageStatistics) -> str:
    """The package's own scores where they were measured for this model and these statistics
    (models.json's ``package_scores``), else a plain statement that they were not, and how to."""
    how = ("Measure them by running the package (e.g. with bioimageio.core) on annotated images it was not "
           "trained on and scoring its foreground probability, thresholded at 0.5 (`unetkit evaluate`)")
    if packaged:
        how += "; benchmarks/bioimageio_package.py does this for the packaged models on their held-out images"
    records = package_scores_for(packaged, weights_sha256=_weights_sha256(packaged)) if packaged else []
    record = next((r for r in records if statistics.matches(r.get("statistics"))), None)
    if record is None:
        return (f"Scores of this package alone (its probabilities with {statistics.describe()}, no test-time "
                f"augmentation, thresholded at 0.5) were not measured. {how}.")
    shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                      for k, v in record["scores"].items())
    where = f" on {record['scored_on']}" if record.get("scored_on") else ""
    runner = f" ({record['runner']})" if record.get("runner") else ""
    unetkit = record.get("unetkit_scores") or {}
    compare = (" With each image's own statistics, unetkit scores "
               + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in unetkit.items() if isinstance(v, float))
               + " on the same images without test-time augmentation." if unetkit else "")
    return (f"Scores of this package alone (its probabilities with {statistics.describe()}, no test-time "
            f"augmentation, thresholded at 0.5), measured{where}{runner}: {shown}.{compare}")


def _weights_sha256(packaged: str | None) -> str | None:
    try:
        return file_sha256(model_path(packaged, installed=True)) if packaged else None
    except (InputError, OSError):
        return None


def _rule_text(decision: dict | None, volume: bool = False) -> str:
    """The stored labels rule in words, e.g. "seeded at threshold 0.5 (h=2.0, seed_threshold=0.9)"."""
    if not decision or not decision.get("method"):
        return f"none stored: unetkit's default ({6 if volume else 4}-connected components of probability > 0.5)"
    details = {k: v for k, v in decision.items() if k not in ("method", "threshold", "score", "task", "tta")}
    extra = f" ({', '.join(f'{k}={v}' for k, v in details.items())})" if details else ""
    return f"{decision['method']} at threshold {decision.get('threshold')}{extra}"


def _readme(loaded: LoadedModel, checkpoint, packaged: str | None, source: str, test_shape,
            statistics: PackageStatistics | None = None) -> str:
    model, g = loaded.model, loaded.model.geometry
    statistics = statistics or PackageStatistics()
    norm = loaded.normalization
    volume = isinstance(g, VolumeGeometry)
    image, pixels = ("volume", "voxels") if volume else ("image", "pixels")
    if norm.mode == "percentile":
        preprocessing = (f"each {image}'s percentiles {norm.low:g} and {norm.high:g} "
                         f"({'per channel' if norm.per_channel else 'over all channels'}) are mapped to 0 and 1 "
                         "(`scale_range`)")
    elif norm.mode == "fixed":
        preprocessing = f"values are mapped by x * {norm.scale:g} + {norm.offset:g} (`scale_linear`)"
    else:
        preprocessing = "values are used as they are"
    if norm.clip:
        preprocessing += ", then clipped to [0, 1] (`clip`)"
    decision = loaded.decision or {}
    tta = bool(decision.get("tta", False))
    factor = rescale_factor(loaded)
    window = "x".join(str(n) for n in test_shape[2:])
    network = (f"3D (pooling {[list(k) for k in g.pool_kernels]}, kernels {[list(k) for k in g.conv_kernels]}), "
               if volume else "")
    lines = [
        f"# {packaged or 'U-Net'} (unetkit)", "",
        ("A 3D U-Net (Cicek, Abdulkadir, Lienkamp, Brox & Ronneberger, MICCAI 2016) trained with unetkit." if volume
         else "A U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) trained with unetkit."), "",
        "## Input and output", "",
        f"- Input: {model.in_channels} channel(s), float32; {preprocessing} (the package's preprocessing does this).",
        f"- Input size: {_sizes_text(g)} for the bioimage.io runner (which refuses other "
        f"sizes: mirror-pad such {'a volume' if volume else 'an image'} yourself); the ONNX and TorchScript files alone take any size. Inside the "
        f"network the {image} is mirrored (without repeating the edge {pixels[:-1]}) up to the tile size unetkit would use, "
        f"and the result is cropped back.",
        f"- Output: class probabilities {loaded.class_names}, as large as the input.",
        f"- Blockwise prediction: blocks of {_sizes_text(g)}, dropping a halo of {_halo_text(g)} per side. "
        f"Blocks then start on the network's pooling grid, so the stitched result equals the whole-{image} result "
        f"(within float rounding).",
        f"- Network: {network}depth {g.depth}, {model.config['base_channels']} channels at the first level, padding "
        f"{g.padding!r}, batch norm {'on' if model.config['batch_norm'] else 'off'}.",
        f"- Test input: a {window} window of {source}; its test output is what "
        f"`{'unetkit.volume.predict_volume' if volume else 'unetkit.predict'}(..., tta=False)` gives with the batch-norm "
        "statistics below.", "",
        *([f"- Batch-norm statistics: {statistics.describe()}."
           + (" Each image's preprocessing and the statistics gathered over it as `unetkit.predict` gathers them "
              "(`unetkit.adapt.gather_statistics`), means and variances averaged layer by layer, fixed in every "
              "weight format." if statistics.images else ""), ""] if model.config.get("batch_norm") else []),
        "## What this package does not carry", "",
        "unetkit does more than this package can describe. Without unetkit you get the probabilities of one pass of "
        "the network, and not:", "",
        f"- Test-time augmentation: unetkit {'averages' if tta else 'can average'} the "
        f"{'16 flips and xy rotations' if volume else '8 flips and rotations'} of "
        f"each {image}{' (this model was scored with it)' if tta else ''}.",
        f"- Each image's own batch-norm statistics (`norm_statistics=\"image\"`); the package uses "
        f"{statistics.describe()}"
        + (", which suit images like those best." if statistics.images else "." if volume else
           " (`unetkit export --statistics-from IMAGES` fixes statistics averaged over a few images like the ones "
           "to segment instead).") if model.config.get("batch_norm") else
        "- (No batch norm in this network, so nothing depends on per-image statistics.)",
        *([f"- The object scale: unetkit rescales each image by {factor:.2f} before segmenting it (this model was "
            f"fine-tuned with objects of {float(loaded.scale['input_diameter']):g} px brought to "
            f"{float(loaded.scale['diameter']):g} px) and brings the labels back to the image's size; rescale images by "
            f"{factor:.2f} before giving them to this package."] if factor is not None else []),
        f"- The labels rule that turns probabilities into labels: {_rule_text(decision, volume)}. Apply it with "
        "`unetkit predict`, or threshold the foreground probability yourself.",
        "- A constant image: unetkit maps it to 0; `scale_range` divides by its tiny range instead."
        if norm.mode == "percentile" else "- (Nothing else: the normalisation is fully expressed.)", "",
        "## Validation", "",
    ]
    if packaged:
        info = get_model(packaged)
        lines += [f"Trained on {info.trained_on}. Pixel size: {info.input.pixel_size or 'not stated'} "
                  f"({info.input.pixel_size_source}). Data terms: see {DATA_TERMS}.", ""]
        if info.scores:
            lines += ["Held-out scores with unetkit (its labels rule"
                      f"{' and test-time augmentation' if tta else ''} on these probabilities):", "",
                      "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info.scores.items()]
            lines.append("")
    best_iou = loaded.state.get("best_iou") if loaded.state else None
    if best_iou is not None and np.isfinite(float(best_iou)):
        lines += [f"- Best foreground IoU on the run's validation images: {float(best_iou):.4f} "
                  f"(checkpoint at iteration {loaded.iteration}).", ""]
    if decision.get("score") is not None:
        measure = "Rand error (lower is better)" if decision.get("task") == "membranes" else "mean of SEG and PQ at IoU 0.5"
        lines += [f"- Labels rule chosen on the validation images: {_rule_text(decision)}, {measure} "
                  f"{float(decision['score']):.4f}.", ""]
    if lines[-2] == "## Validation":
        lines += ["No validation scores are stored in this checkpoint. Score the model on annotated images that it "
                  "was not trained on, e.g. with `unetkit predict` and `unetkit evaluate`.", ""]
    scores_above = " The scores above need unetkit." if packaged and get_model(packaged).scores else ""
    lines += [_package_scores_text(packaged, statistics) + scores_above, "",
              "To validate on your own data: `unetkit predict --model MODEL IMAGES --out PRED` and "
              "`unetkit evaluate --pred PRED --gt MASKS`.", "",
              "## Citation", "", *(f"{c['text']}. doi:{c['doi']}" for c in [CITATION, *([CITATION_3D] if volume else [])]), ""]
    lines += [f"Training data: {c['text']}. doi:{c['doi']}" for c in _data_citations(packaged)]
    return "\n".join(lines) + "\n"
