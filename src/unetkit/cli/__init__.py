"""The `unetkit` command: `demo`, `train`, `predict`, `evaluate`, `models`, `export`.

Each sub-command lives in its own module and registers itself on `app`. User mistakes
(`unetkit.errors.InputError`; missing, existing or unwritable files: `OSError`) end as one line on
stderr and exit status 2; any other exception is a bug and keeps its traceback; Ctrl-C ends with "unetkit: interrupted" (and what was kept) and exit status 130.
Warnings are printed as one line, "unetkit: warning: ...".

The modules of this package import nothing heavy (torch, SciPy) at their top level, so that
`unetkit --help` and usage errors are quick; commands import what they need when they run.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="unetkit",
    help="U-Net segmentation: train from a few annotated images, segment images of any size, score results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("demo", "train", "predict", "evaluate", "models", "export")


class CommandInterrupted(Exception):
    """Ctrl-C in a command; the message says what was kept and how to continue.

    Commands raise it from a KeyboardInterrupt, which typer would turn into a silent exit 130.
    """


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"unetkit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """U-Net segmentation: train from a few annotated images, segment images of any size, score results."""


def _one_line_warnings(previous):  # noqa: ANN001, ANN202
    """A `warnings.showwarning` that prints user warnings as one line and hands others to `previous`."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if issubclass(category, UserWarning):
            typer.echo(f"unetkit: warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from ..errors import InputError  # light: the module imports nothing

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            _register_commands()
            status = app(args=argv, prog_name="unetkit", standalone_mode=False)
    except CommandInterrupted as exc:
        typer.echo(f"unetkit: interrupted: {exc}", err=True)
        return 130
    except (InputError, OSError) as exc:  # OSError: missing, existing or unwritable files
        typer.echo(f"unetkit: error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("unetkit: interrupted", err=True)
        return 130
    except SystemExit as exc:  # typer's own usage errors and --help
        return int(exc.code or 0)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except Exception as exc:
        # Usage errors of the underlying click (bundled with recent typer): they print themselves.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            return exit_code
        if type(exc).__name__ == "Abort":
            return 1
        raise
    if status == 130:  # typer's exit status for a KeyboardInterrupt it caught
        typer.echo("unetkit: interrupted", err=True)
    return status if isinstance(status, int) else 0


def run() -> None:  # pragma: no cover - console entry
    sys.exit(main())
