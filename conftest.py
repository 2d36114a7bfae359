"""Doctests of modules whose optional dependencies (the `scale` extra) are not installed are skipped."""

import importlib


def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


collect_ignore = [path for path, needs in [("src/unetkit/distributed.py", "dask.array")] if _missing(needs)]
