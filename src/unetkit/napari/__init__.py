"""unetkit in napari: a reader for the files `unetkit predict` writes and a segmentation widget.

Install with ``pip install "unetkit[napari]"``; napari finds the plugin through the manifest
``napari.yaml`` (entry point ``napari.manifest``). The widget's work is done by plain functions in
`unetkit.napari._segment`, which need neither napari nor Qt.
"""
