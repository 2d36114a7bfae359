"""The `unetkit` command: `demo`, `train`, `predict`, `evaluate`.

Each sub-command lives in its own module and registers itself on `app`. User mistakes
(`ValueError`, `TypeError`, missing or existing files) end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="unetkit",
    help="U-Net segmentation: train from a few annotated images, segment images of any size, score results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = ("demo", "train", "predict", "evaluate")


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    _register_commands()
    try:
        app(args=argv, prog_name="unetkit", standalone_mode=False)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError) as exc:
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
    return 0


def run() -> None:  # pragma: no cover - console entry
    sys.exit(main())
