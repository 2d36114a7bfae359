"""Test collection: modules that need an optional extra are left out of doctest collection without it."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("napari") else ["src/unetkit/napari/_widget.py"]
