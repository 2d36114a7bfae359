"""`python -m unetkit` works like the `unetkit` command."""

from .cli import run

run()
