"""`unetkit predict`: segment images with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import app


@app.command()
def predict(
    inputs: Annotated[List[Path], typer.Argument(help="Images or folders of images (PNG/TIFF), or zarr / OME-Zarr images (level 0).")],
    model: Annotated[Path, typer.Option("--model", help="Checkpoint written by `unetkit train` (RUN/best.pt), or a packaged model's name (`unetkit models`: em-membranes, dic-hela, fluo-nuclei).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    tta: Annotated[Optional[bool], typer.Option("--tta/--no-tta", help="Average the 8 rotated/mirrored versions (the paper used 7 rotations). Default: as the checkpoint's labels rule was chosen (on for models trained by unetkit train with validation images), else off.")] = None,
    tile_size: Annotated[Optional[int], typer.Option("--tile-size", help="Input tile size (default: the largest that fits in memory).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")] = "auto",
    norm_statistics: Annotated[Optional[str], typer.Option("--norm-statistics", help="Batch norm statistics: 'training' (stored in the model) or 'image' (each image's own, gathered over its tiles first; helps images whose contrast differs from the training images'). Default: as the checkpoint's labels rule was chosen. ")] = None,
    backend: Annotated[str, typer.Option("--backend", help="What runs the network: torch, onnxruntime (needs the export extra: pip install 'unetkit\\[export]') or auto (torch on a GPU; on the CPU the faster of the two, measured once per model and tile and remembered).")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16 (torch autocast; CPUs with AVX512-BF16 or AMX), int8 (onnxruntime, statically quantised once on the model's training images and cached) or auto (the fastest whose stored validation score is within 0.005 of fp32's; fp32 without stored scores).")] = "fp32",
    threshold: Annotated[Optional[float], typer.Option(help="Foreground probability threshold of the objects' masks (default: that of the checkpoint's labels rule, chosen on validation images; else 0.5). The rest of the stored rule (how touching objects are split, the minimum size) is kept.")] = None,
    labels: Annotated[str, typer.Option(help="'instances' (one id per object) or 'binary'.")] = "instances",
    watershed: Annotated[Optional[bool], typer.Option("--watershed", help="Split touching objects by a seeded watershed on the distance transform (instead of the stored rule's method; its threshold and minimum size are kept).")] = None,
    min_size: Annotated[Optional[int], typer.Option("--min-size", help="Remove objects smaller than this many pixels (instead of the stored rule's minimum size; the rest of the rule is kept).")] = None,
    fill_holes: Annotated[bool, typer.Option("--fill-holes/--keep-holes")] = True,
    ctc: Annotated[bool, typer.Option("--ctc", help="Also write the Cell Tracking Challenge result layout: OUT/ctc/maskNNN.tif, numbered by the input frame (t041.tif -> mask041.tif).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files (without it, images whose outputs exist are skipped).")] = False,
    skip_unreadable: Annotated[bool, typer.Option("--skip-unreadable", help="Skip inputs that are not readable images instead of stopping before the first image.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    out_format: Annotated[Optional[str], typer.Option("--out-format", help="zarr (NAME_probabilities.zarr, NAME_labels.ome.zarr; computed tile by tile, resumable) or tiff. Default: zarr for zarr inputs and images above 8192x8192 pixels, else tiff. 3D models: zarr volumes given it (or above 8192x8192 voxels) are predicted tile by tile.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Probabilities of large images (and zarr volumes predicted tile by tile): float32 or float16.")] = "float32",
    dask: Annotated[Optional[str], typer.Option("--dask", help="Predict on a Dask cluster: local:N (N worker processes here) or a scheduler address tcp://HOST:PORT.")] = None,
    rows: Annotated[Optional[int], typer.Option("--rows", help="Only the top N rows of each image (a trial run on a stripe).")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", help="With --dask: about this many pixels per block side (default 4096).")] = None,
    diameter: Annotated[Optional[str], typer.Option("--diameter", help="The objects' median diameter in pixels, or 'auto' (measured in a first pass at the model's scale): each image is rescaled so its objects take the size the model was trained on (recorded in its checkpoint, or in models.json for the packaged models); labels are written at the input's size.")] = None,
    stitch: Annotated[Optional[float], typer.Option("--stitch", help="Stacks (multi-page TIFF or zarr / OME-Zarr z-stacks or time series, segmented plane by plane): link each object to the one in the plane before it that it overlaps most, when their intersection over union reaches this value (0.25 is common); without it ids are unique per plane.")] = None,
    pixel_size: Annotated[Optional[float], typer.Option("--pixel-size", help="Micrometres per pixel of the images: rescales them to the pixel size the model was trained at (models that record it).")] = None,
    spacing: Annotated[Optional[str], typer.Option("--spacing", metavar="Z,Y,X", help="3D models: the volumes' voxel size (e.g. 2,0.5,0.5; only the ratios matter), compared with the spacing the model was trained at; a z/xy ratio more than 25% off is refused. Default: as each TIFF records it (ImageJ spacing or OME-XML), else not checked.")] = None,
) -> None:
    """Write class probabilities (float32 TIFF, or zarr for large images) and label images named after each input.

    A 3D model (trained with --dims 3) segments each multi-page TIFF z-stack (or (Z, Y, X) zarr) as one volume.
    A 2D model segments zarr / OME-Zarr stacks (a z or t axis) plane by plane, tile by tile.
    """
    from ..errors import InputError
    from ..inference import InferenceOptions
    from ..io import check_writable_folder

    # Every option is checked before torch is imported, a model loaded or a folder created.
    options = InferenceOptions(tta=tta, tile_size=tile_size, batch_size=batch_size, device=device, backend=backend,
                               norm_statistics=norm_statistics, threshold=threshold, watershed=watershed, min_size=min_size,
                               labels=labels, fill_holes=fill_holes, precision=precision, diameter=diameter,
                               pixel_size=pixel_size).check()
    from ..bigsegment import check_large_options, segment_large, wants_large

    check_large_options(out_format=out_format, dtype=dtype, rows=rows, block_size=block_size, dask=dask)
    if dask:
        from ..distributed import check_dask_address

        check_dask_address(dask)
    if stitch is not None and not 0.0 < stitch <= 1.0:
        raise InputError(f"--stitch must be an overlap (intersection over union) in (0, 1] (got {stitch})")
    from ..data.volumes import parse_spacing

    voxel_size = parse_spacing(spacing)
    check_writable_folder(out, "--out")
    from ..checkpoint import load_checkpoint
    from ..segment_volume import is_volume_model

    loaded = load_checkpoint(model)
    if is_volume_model(loaded):
        given = _two_d_options(diameter=diameter, pixel_size=pixel_size, stitch=stitch, ctc=ctc, dask=dask, out_format=out_format,
                               rows=rows, block_size=block_size, dtype=dtype, backend=backend, norm_statistics=norm_statistics,
                               precision=precision)
        _predict_volumes(inputs, loaded, options, model=model, out=out, spacing=voxel_size, given=given, force=force,
                         progress=progress, skip_unreadable=skip_unreadable, out_format=out_format, dtype=dtype, dask=dask)
        return
    if voxel_size is not None:
        raise InputError(f"--spacing applies to 3D models, but {model} is a 2D model (it segments z-stacks plane by plane): "
                         "leave out --spacing")
    large = wants_large(inputs, out_format=out_format, dask=dask, rows=rows)
    if large and (diameter is not None or pixel_size is not None):
        raise InputError("--diameter and --pixel-size rescale images in memory, not zarr or larger-than-memory images; "
                         "rescale the image to the model's scale first (unetkit.scale.rescale_image) and predict without them")
    if large and ctc:
        raise InputError("--ctc writes 16-bit TIFF masks of ordinary images; large images are written as OME-Zarr labels: "
                         "leave out --ctc (or --out-format/--dask/--rows)")
    if large and skip_unreadable:
        raise InputError("--skip-unreadable applies to batches of ordinary image files; leave it out for zarr/large images")
    if not large and dtype != "float32":
        raise InputError("--dtype float16 applies to the zarr/BigTIFF outputs of large images; add --out-format zarr or leave it out")
    from . import CommandInterrupted
    from ..inference import Segmenter

    segmenter = Segmenter(loaded, options, source=model)
    typer.echo(f"{model}: {segmenter.settings.describe()}")
    try:
        if large:
            written = segment_large(inputs, segmenter, out, out_format=out_format, dtype=dtype, dask=dask, rows=rows,
                                    block_size=block_size, force=force, progress=progress, echo=typer.echo, stitch=stitch)
            typer.echo(f"wrote {len(written)} outputs to {out}")
            return
        from ..segment import segment_files

        written = segment_files(inputs, segmenter, out, ctc=ctc, force=force, progress=progress,
                                skip_unreadable=skip_unreadable, stitch=stitch, echo=typer.echo)
    except KeyboardInterrupt as exc:
        if large:
            raise CommandInterrupted("finished tiles are kept; run the same command again to continue") from None
        raise CommandInterrupted(str(exc) or f"nothing was written to {out}") from None
    typer.echo(f"wrote {len(written)} files to {out}")


def _two_d_options(*, diameter, pixel_size, stitch, ctc, dask, out_format, rows, block_size, dtype, backend,
                   norm_statistics, precision) -> list[str]:
    """The options given that only 2D models use (keys of `unetkit.segment_volume.TWO_D_ONLY`)."""
    given = {
        "--diameter": diameter is not None, "--pixel-size": pixel_size is not None, "--stitch": stitch is not None,
        "--ctc": ctc, "--dask": bool(dask), "--out-format zarr": out_format == "zarr", "--rows": rows is not None,
        "--block-size": block_size is not None, "--dtype float16": dtype != "float32",
        "--backend onnxruntime": backend == "onnxruntime", "--norm-statistics image": norm_statistics == "image",
        f"--precision {precision}": precision != "fp32",
    }
    return [option for option, on in given.items() if on]


def _predict_volumes(inputs, loaded, options, *, model, out, spacing, given, force, progress, skip_unreadable,
                     out_format=None, dtype="float32", dask=None) -> None:
    """`unetkit predict` with a 3D model: each z-stack segmented whole (`unetkit.segment_volume`),
    zarr volumes given --out-format or --dask, or above `bigsegment.LARGE_VOXELS`, tile by tile into
    zarr (`unetkit.bigsegment.segment_large_volumes`; on the Dask cluster with --dask)."""
    from . import CommandInterrupted
    from ..bigsegment import segment_large_volumes, wants_large_volume
    from ..errors import InputError
    from ..segment import segment_files
    from ..segment_volume import VolumeSegmenter, refuse_two_d_options

    large = [p for p in inputs if wants_large_volume(p, out_format, dask)]
    zarr_only = [option for option in given if option in ("--out-format zarr", "--dtype float16", "--dask")]
    if zarr_only:  # options of the tile-by-tile path, for zarr volumes only
        if len(large) != len(inputs):
            stacks = ", ".join(str(p) for p in inputs if p not in large)
            raise InputError(f"{zarr_only[0]}: a 3D model writes zarr outputs tile by tile for zarr volumes only, and "
                             f"{stacks} are segmented in memory: predict them in a separate run without "
                             f"{zarr_only[0].split()[0]} (or save them as zarr)")
        given = [option for option in given if option not in zarr_only]
    refuse_two_d_options(given, str(model))
    if large and skip_unreadable:
        raise InputError("--skip-unreadable applies to batches of ordinary image files; leave it out for zarr volumes")
    segmenter = VolumeSegmenter(loaded, options, spacing=spacing, source=model)
    typer.echo(f"{model}: {segmenter.describe()}")
    rest = [p for p in inputs if p not in large]
    written = []
    try:
        if large:
            written += segment_large_volumes(large, segmenter, out, out_format=out_format, dtype=dtype, dask=dask,
                                             force=force, progress=progress, echo=typer.echo)
        if rest:
            written += segment_files(rest, segmenter, out, force=force, progress=progress,
                                     skip_unreadable=skip_unreadable, echo=typer.echo)
    except KeyboardInterrupt as exc:
        if large:
            raise CommandInterrupted("finished tiles are kept; run the same command again to continue") from None
        raise CommandInterrupted(str(exc) or f"nothing was written to {out}") from None
    typer.echo(f"wrote {len(written)} files to {out}")
