"""`unetkit export`: a checkpoint as a bioimage.io model package, an ONNX or a TorchScript file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import app

_FORMATS = ("bioimageio", "onnx", "torchscript")


@app.command(context_settings={"allow_extra_args": True})
def export(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="Checkpoint written by `unetkit train` (RUN/best.pt), or a packaged model's name (`unetkit models`).")],
    format: Annotated[str, typer.Option("--format", help="bioimageio (a model package for the bioimage.io model zoo, deepImageJ, ilastik; .zip or a folder), onnx or torchscript (one file).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write: NAME.zip or a folder for bioimageio, a file for onnx and torchscript.")],
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists: a file, or a package folder that unetkit wrote (a folder with other files is refused, never deleted).")] = False,
    sample: Annotated[Optional[Path], typer.Option("--sample", help="bioimageio: image for the test input and the cover (default: the run's first validation image, else a synthetic one).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="bioimageio: the package's name (letters, digits, spaces, _+-()).")] = None,
    author: Annotated[Optional[List[str]], typer.Option("--author", help="bioimageio: an author's name (repeat for several; default: your login name).")] = None,
    maintainer: Annotated[Optional[List[str]], typer.Option("--maintainer", help="bioimageio: a maintainer's GitHub user name (repeat for several).")] = None,
    git_repo: Annotated[Optional[str], typer.Option("--git-repo", help="bioimageio: URL of the Git repository the model is developed in.")] = None,
    license: Annotated[Optional[str], typer.Option("--license", help="bioimageio: SPDX license identifier of the weights (default MIT; packaged models keep their data's terms).")] = None,
    test: Annotated[bool, typer.Option("--test/--no-test", help="bioimageio: run every weight format on the test input before writing (bioimageio.core).")] = True,
    statistics_from: Annotated[Optional[List[Path]], typer.Option("--statistics-from", metavar="PATH [PATH ...]", help="Images, or folders of images, like the ones to segment: their batch-norm statistics, averaged, are fixed in the exported network (every format), which brings a model that unetkit runs with each image's own statistics closer to unetkit. Default: the training statistics.")] = None,
) -> None:
    """Export a trained network for use outside unetkit (probabilities out, as large as the input, any size)."""
    if ctx.args:  # the paths after the first one of --statistics-from PATH [PATH ...]
        if not statistics_from:
            from ..errors import InputError

            raise InputError(f"unexpected argument(s) {' '.join(ctx.args)}; `unetkit export` takes options only "
                             "(several --statistics-from paths go after that option)")
        statistics_from = [*statistics_from, *map(Path, ctx.args)]
    if format not in _FORMATS:
        from ..errors import InputError

        raise InputError(f"--format must be one of {', '.join(_FORMATS)} (got {format!r})")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists; use --force to overwrite it")
    options = {}
    if format == "bioimageio":
        options = dict(sample=sample, name=name, authors=author or (), maintainers=maintainer or (), git_repo=git_repo,
                       license=license, test=test)
    elif sample or name or author or maintainer or git_repo or license:
        from ..errors import InputError

        raise InputError("--sample, --name, --author, --maintainer, --git-repo and --license apply to --format bioimageio only")
    from ..export import export_checkpoint

    written = export_checkpoint(model, format, out, force=force, statistics_from=statistics_from, echo=typer.echo, **options)
    typer.echo(f"wrote {written}")
