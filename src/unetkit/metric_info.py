"""Names and one-line descriptions of the metrics `unetkit evaluate` computes.

Kept apart from `unetkit.evaluate` (which imports SciPy) so the command line can show them in
its help without loading anything heavy.
"""

from __future__ import annotations

METRIC_DESCRIPTIONS: dict[str, str] = {
    "pixel": "pixel error at --threshold (ISBI 2012)",
    "pixel_f": "1 - maximal pixel F-score over thresholds 0.0..1.0 (ISBI 2012)",
    "rand": "Rand error, best over thresholds 0.0..1.0 (ISBI 2012)",
    "warping": "warping error at --threshold (ISBI 2012)",
    "dice": "Dice of the foreground",
    "iou": "IoU of the foreground",
    "seg": "SEG, mean IoU of ground-truth objects (cell tracking challenge)",
    "ap": "AP, precision, recall, F1, PQ at IoU 0.5, 0.75, 0.9",
    "adapted_rand": "adapted Rand error (connectomics)",
    "vi": "variation of information: split and merge entropies in bits",
}
DEFAULT_METRICS: tuple[str, ...] = ("pixel", "rand", "warping", "dice", "seg", "ap")
