"""Errors a user can fix.

`InputError` is a `ValueError` whose message names the offending file or argument and the fix.
The command line prints it as one line and exits with status 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (file, array or option); the message says how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long job; the message says what was finished and how to continue."""
