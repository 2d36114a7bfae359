"""Test collection: modules that need an optional extra are left out of doctest collection without it."""

import importlib.util


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing
        return True


_NEEDS = {"src/unetkit/napari/_widget.py": "napari", "src/unetkit/distributed.py": "dask.array"}
collect_ignore = [path for path, module in _NEEDS.items() if _missing(module)]
