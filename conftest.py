"""Doctests of modules whose optional dependencies (the `scale` extra) are not installed are skipped."""

import importlib.util

collect_ignore = [
    path
    for path, needs in [
        ("src/unetkit/distributed.py", "dask"),
    ]
    if importlib.util.find_spec(needs) is None
]
