"""bioimage.io model packages (format 0.5) from unetkit checkpoints, and the `unetkit export` entry.

A package holds the network three ways (`pytorch_state_dict` with its architecture as a plain-torch
file, `torchscript`, `onnx`), a test input and the output it must give, a cover image (the test
output's contours over the image), a README with a Validation section, and a description whose
axes state the legal input sizes (min + n*step from the network's geometry) and the output size
(input size - 2 * border for the paper's unpadded network; the same size with a halo for
padding "same"). Preprocessing repeats the checkpoint's normalisation (`Normalization`):
percentiles -> `scale_range`, fixed -> `scale_linear`, clipping -> `clip`. The package is built
and validated with `bioimageio.spec`, and each weight format is run on the test input with
`bioimageio.core.test_model` before it is written; a package that fails either is refused.

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
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..checkpoint import LoadedModel, load_checkpoint
from ..data.normalize import Normalization, to_chw
from ..errors import InputError
from ..io import read_image, write_png, write_tiff
from ..pretrained import get_model, pretrained_name
from ..tiling import extract_region, same_margin
from . import FORMATS
from .graphs import OPSET, Probabilities, export_onnx, export_torchscript

CITATION = {
    "text": "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
    "MICCAI 2015, LNCS 9351, pp. 234-241",
    "doi": "10.1007/978-3-319-24574-4_28",
}
#: Output pixels per side the test input aims at (the input adds the network's border).
TEST_OUTPUT_SIZE = 256
ARCHITECTURE_FILE = Path(__file__).with_name("architecture.py")


def export_checkpoint(
    checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, *, force: bool = False, **options: Any
) -> Path:
    """Export a checkpoint (RUN/best.pt or a packaged model's name) as `fmt`: "onnx",
    "torchscript" (one file each) or "bioimageio" (a .zip, or a folder for any other name;
    `options` go to `export_bioimageio`).

    Example:
        >>> export_checkpoint("em-membranes", "onnx", "em.onnx")  # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists; use --force to overwrite it")
    if fmt == "bioimageio":
        return export_bioimageio(checkpoint, out, force=force, **options)
    if options:
        raise InputError(f"options {sorted(options)} apply to --format bioimageio only")
    model = load_checkpoint(checkpoint).model
    write = export_onnx if fmt == "onnx" else export_torchscript
    return write(model, out, force=force)


def export_bioimageio(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sample: str | os.PathLike | None = None,
    name: str | None = None,
    authors: Sequence[str] = (),
    license: str | None = None,
    test: bool = True,
    force: bool = False,
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
        license: SPDX identifier (default "MIT"); packaged models carry their data's terms as a file.
        test: run `bioimageio.core.test_model` for every weight format before writing.
        force: replace an existing `out`.
        echo: receives one line per step.

    Raises:
        InputError: the checkpoint cannot be traced (naming the layer), or the package fails
            validation or its test (the first errors of the validator); FileExistsError: `out` exists.
    """
    note = echo or (lambda message: None)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists; use --force to overwrite it")
    spec = _require_bioimageio()
    loaded = load_checkpoint(checkpoint)
    packaged = pretrained_name(checkpoint)
    model = loaded.model.eval()
    content = _description(loaded, checkpoint, packaged, name=name, authors=authors, license=license)
    # The description alone first, so that a wrong name or license is refused before any export.
    early = spec.build_description(content, context=spec.ValidationContext(perform_io_checks=False))
    _refuse_if_failed(early, "validation")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unetkit-export-", dir=out.parent) as tmp:
        root = Path(tmp) / "package"
        root.mkdir()
        note("writing the weights (state dict, TorchScript, ONNX)")
        shutil.copyfile(ARCHITECTURE_FILE, root / "architecture.py")
        state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
        torch.save(state, root / "weights.pt")
        export_torchscript(model, root / "weights_torchscript.pt")
        export_onnx(model, root / "weights.onnx")
        raw, source = _sample(sample, None if packaged else checkpoint, model.in_channels, packaged)
        test_input, test_output = _test_tensors(loaded, raw)
        np.save(root / "test_input.npy", test_input)
        np.save(root / "test_output.npy", test_output)
        write_tiff(root / "sample_input.tif", test_input[0])
        write_tiff(root / "sample_output.tif", test_output[0])
        _write_cover(root / "cover.png", loaded, test_input, test_output)
        files = ["README.md", "cover.png"]
        if packaged:
            (root / "LICENSE.md").write_text(get_model(packaged).license + "\n")
            files.append("LICENSE.md")
        (root / "README.md").write_text(_readme(loaded, checkpoint, packaged, source, test_input.shape))
        descr = spec.build_description(content, context=spec.ValidationContext(root=root, file_name="rdf.yaml"))
        _refuse_if_failed(descr, "validation")
        if test:
            note("testing every weight format on the test input (bioimageio.core)")
            descr = _tested(descr)
        note(f"writing {out}")
        staged = Path(tmp) / ("package.zip" if out.suffix.lower() == ".zip" else "folder")
        if out.suffix.lower() == ".zip":
            spec.save_bioimageio_package(descr, output_path=staged)
        else:
            spec.save_bioimageio_package_as_folder(descr, output_path=staged)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staged, out)
    return out


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
    g = model.geometry
    extra = 2 * (same_margin(g) if g.padding == "same" else g.border)
    return g.input_size(TEST_OUTPUT_SIZE) if g.padding == "valid" else g.legal_sizes(TEST_OUTPUT_SIZE + extra)[-1]


def _test_tensors(loaded: LoadedModel, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A centred legal-size window of the raw image (1, C, s, s) and the probabilities it gives."""
    size = _test_size(loaded.model)
    y0, x0 = (raw.shape[-2] - size) // 2, (raw.shape[-1] - size) // 2
    window = np.ascontiguousarray(extract_region(raw, y0, x0, size, size), dtype=np.float32)
    normalised = loaded.normalization(window)
    with torch.no_grad():
        output = Probabilities(loaded.model.eval())(torch.from_numpy(normalised)[None]).numpy()
    return window[None], output


def _write_cover(path: Path, loaded: LoadedModel, test_input: np.ndarray, test_output: np.ndarray) -> None:
    """The image beside its predicted contours (2:1), over the region the output covers."""
    from ..plots import overlay
    from ..segment import labels_rule

    probabilities = test_output[0]
    foreground = probabilities[1:].sum(0) if probabilities.shape[0] > 2 else probabilities[-1]
    h, w = foreground.shape
    dy, dx = (test_input.shape[-2] - h) // 2, (test_input.shape[-1] - w) // 2
    image = loaded.normalization(test_input[0])[:, dy : dy + h, dx : dx + w]
    labels = labels_rule(loaded.decision).apply(foreground)
    plain = overlay(image, np.zeros_like(labels))
    write_png(path, np.concatenate([plain, overlay(image, labels)], axis=1), force=True)


def _min_input(g) -> int:
    """The smallest input size the package states: the geometry's, or for padding "same" the
    smallest legal size larger than the halo on both sides."""
    if g.padding == "valid":
        return g.min_size
    return next(s for s in g.legal_sizes(2 * same_margin(g) + 2 * g.step) if s > 2 * same_margin(g))


def _identifier(text: str) -> str:
    word = re.sub(r"[^A-Za-z0-9_]", "_", str(text)).strip("_") or "c"
    return word if word[0].isalpha() else f"c_{word}"


def _preprocessing(norm: Normalization) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if norm.mode == "percentile":
        axes = ["y", "x"] if norm.per_channel else ["channel", "y", "x"]
        steps.append({"id": "scale_range", "kwargs": {"axes": axes, "min_percentile": norm.low, "max_percentile": norm.high}})
    elif norm.mode == "fixed":
        steps.append({"id": "scale_linear", "kwargs": {"gain": norm.scale, "offset": norm.offset}})
    if norm.clip:
        steps.append({"id": "clip", "kwargs": {"min": 0.0, "max": 1.0}})
    return steps


def _description(loaded: LoadedModel, checkpoint, packaged: str | None, *, name, authors, license) -> dict[str, Any]:
    model = loaded.model
    g = model.geometry
    config = dict(model.config, dropout=0.0)  # inference only
    if name is None:
        base = packaged or Path(str(checkpoint)).resolve().parent.name or "model"
        name = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"unetkit U-Net {base}")[:64]
    authors = list(authors) or (["unetkit"] if packaged else [getpass.getuser()])
    minimum = _min_input(g)
    space = {"size": {"min": minimum, "step": g.step}}
    if g.padding == "valid":
        out_axes = [{"type": "space", "id": axis, "size": {"tensor_id": "input", "axis_id": axis, "offset": -2 * g.border}}
                    for axis in ("y", "x")]
    else:
        out_axes = [{"type": "space", "id": axis, "halo": same_margin(g), "size": {"tensor_id": "input", "axis_id": axis}}
                    for axis in ("y", "x")]
    channel_names = ["gray"] if model.in_channels == 1 else [f"channel{i}" for i in range(model.in_channels)]
    torch_version = torch.__version__.split("+")[0]
    what = f"{g.depth} levels, {config['base_channels']} channels at the first, padding {g.padding!r}"
    description = (get_model(packaged).description + "; " if packaged else "") + (
        f"U-Net (Ronneberger et al. 2015) trained with unetkit: {what}. Outputs class probabilities; "
        f"valid input sizes are {minimum} + n*{g.step} pixels."
    )
    tags = ["unetkit", "unet2d", "u-net", "2d", "segmentation", "semantic-segmentation", "pytorch", "torchscript", "onnx"]
    if packaged:
        tags += {"em-membranes": ["electron-microscopy", "membranes", "isbi2012"], "dic-hela": ["dic", "cells", "hela"],
                 "fluo-nuclei": ["fluorescence-light-microscopy", "nuclei"]}.get(packaged, [])
    return {
        "format_version": _format_version(),
        "type": "model",
        "name": name,
        "description": description[:1000],
        "authors": [{"name": a} for a in authors],
        "cite": [CITATION],
        "license": {"source": "LICENSE.md"} if packaged else (license or "MIT"),
        "tags": tags,
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "inputs": [{
            "id": "input",
            "description": "image, normalised by the preprocessing",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": channel_names},
                     {"type": "space", "id": "y", **space}, {"type": "space", "id": "x", **space}],
            "test_tensor": {"source": "test_input.npy"},
            "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": "float32"},
            "preprocessing": _preprocessing(loaded.normalization),
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
        "weights": {
            "pytorch_state_dict": {
                "source": "weights.pt",
                "architecture": {"source": "architecture.py", "callable": "UNet", "kwargs": config},
                "pytorch_version": torch_version,
            },
            "torchscript": {"source": "weights_torchscript.pt", "pytorch_version": torch_version, "parent": "pytorch_state_dict"},
            "onnx": {"source": "weights.onnx", "opset_version": OPSET, "parent": "pytorch_state_dict"},
        },
        "config": {"unetkit": {"model": model.config, "normalization": loaded.normalization.to_dict(),
                               "decision": loaded.decision, "border": g.border, "packaged_model": packaged}},
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


def _readme(loaded: LoadedModel, checkpoint, packaged: str | None, source: str, test_shape) -> str:
    model, g = loaded.model, loaded.model.geometry
    norm = loaded.normalization
    if norm.mode == "percentile":
        preprocessing = (f"each image's percentiles {norm.low:g} and {norm.high:g} "
                         f"({'per channel' if norm.per_channel else 'over all channels'}) are mapped to 0 and 1")
    elif norm.mode == "fixed":
        preprocessing = f"values are mapped by x * {norm.scale:g} + {norm.offset:g}"
    else:
        preprocessing = "values are used as they are"
    if norm.clip:
        preprocessing += ", then clipped to [0, 1]"
    lines = [
        f"# {packaged or 'U-Net'} (unetkit)", "",
        "A U-Net (Ronneberger, Fischer & Brox, MICCAI 2015) trained with unetkit.", "",
        "## Input and output", "",
        f"- Input: {model.in_channels} channel(s), float32; {preprocessing} (the package's preprocessing does this).",
        f"- Valid input sizes: {_min_input(g)} + n*{g.step} pixels along y and x (every 2x2 pooling sees an even size).",
        (f"- Output: class probabilities {loaded.class_names}, {2 * g.border} pixels smaller than the input "
         f"({g.border} per side: unpadded convolutions, so tiles that overlap by that much stitch without seams)."
         if g.padding == "valid" else
         f"- Output: class probabilities {loaded.class_names}, as large as the input; crop {same_margin(g)} pixels "
         "per side of each tile (the halo) when tiling."),
        f"- Network: depth {g.depth}, {model.config['base_channels']} channels at the first level, "
        f"batch norm {'on' if model.config['batch_norm'] else 'off'}.",
        f"- Test input: a {test_shape[-2]}x{test_shape[-1]} window of {source}.", "",
        "## Validation", "",
    ]
    if packaged:
        info = get_model(packaged)
        lines += [f"Trained on {info.trained_on}.", ""]
        if info.scores:
            lines += ["Held-out scores (unetkit's labels rule on these probabilities):", "",
                      "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info.scores.items()]
            lines.append("")
    best_iou = loaded.state.get("best_iou") if loaded.state else None
    if best_iou is not None and np.isfinite(float(best_iou)):
        lines += [f"- Best foreground IoU on the run's validation images: {float(best_iou):.4f} "
                  f"(checkpoint at iteration {loaded.iteration}).", ""]
    decision = loaded.decision or {}
    if decision.get("score") is not None:
        measure = "Rand error (lower is better)" if decision.get("task") == "membranes" else "mean of SEG and PQ at IoU 0.5"
        lines += [f"- Labels rule chosen on the validation images: {decision.get('method')} at threshold "
                  f"{decision.get('threshold')}, {measure} {float(decision['score']):.4f}.", ""]
    if len(lines) and lines[-1] == "" and lines[-2] == "## Validation":
        lines += ["No validation scores are stored in this checkpoint. Score the model on annotated images that it "
                  "was not trained on, e.g. with `unetkit predict` and `unetkit evaluate`.", ""]
    lines += ["To validate on your own data: `unetkit predict --model MODEL IMAGES --out PRED` and "
              "`unetkit evaluate --pred PRED --gt MASKS`.", "",
              "## Citation", "", f"{CITATION['text']}. doi:{CITATION['doi']}", ""]
    return "\n".join(lines)
