"""Block-by-block "seeded" labels against the whole-image labels on real probability maps.

The packaged em-membranes model's probability maps of ISBI 2012 slices 20-23 (its held-out
slices; no TTA, as its stored rule's batch-norm statistics say) are tiled into a 1024x1024
mosaic; its stored labels rule is applied to the whole mosaic (`DecisionRule.apply`) and block
by block (`unetkit.blocklabels.label_blockwise`) at several block and halo sizes, and the two
compared (`compare_labels`: fraction of pixels outside best-matched labels, Rand index).

    OMP_NUM_THREADS=1 python benchmarks/blocklabels_isbi.py

Writes benchmarks/results/blocklabels_isbi.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unetkit.blocklabels import compare_labels, label_blockwise
from unetkit.checkpoint import load_checkpoint
from unetkit.data import data_root, get_isbi2012_samples
from unetkit.decision import DecisionRule
from unetkit.predict import predict
from unetkit.targets import TargetConfig

SLICES = (20, 21, 22, 23)
SETTINGS = [(256, 32), (256, 64), (256, 128), (256, 256), (128, 32), (128, 128)]


def mosaic() -> tuple[np.ndarray, DecisionRule]:
    """The 1024x1024 foreground probability mosaic of SLICES and the model's stored rule."""
    loaded = load_checkpoint("em-membranes")
    rule = DecisionRule.from_dict(loaded.decision)
    samples = get_isbi2012_samples(data_root() / "isbi2012", slices=list(SLICES), normalization=loaded.normalization,
                                   targets=TargetConfig(use_weight_map=False))
    tile = loaded.model.geometry.input_size(512)
    maps = [predict(loaded.model, s.image, tile_size=tile, norm_statistics=rule.norm_statistics)[1] for s in samples]
    return np.block([[maps[0], maps[1]], [maps[2], maps[3]]]).astype(np.float32), rule


def main() -> dict:
    prob, rule = mosaic()
    whole = rule.apply(prob)
    rows = []
    for block, halo in SETTINGS:
        out = np.zeros(prob.shape, np.uint32)
        n = label_blockwise(prob, out, rule=rule, block=block, halo=halo)
        row = {"block": block, "halo": halo, "objects": n, "objects_whole": int(whole.max()),
               "identical": bool((out == whole).all()), **compare_labels(whole, out)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"rule": rule.to_dict(), "slices": list(SLICES), "shape": list(prob.shape), "rows": rows}
    path = Path(__file__).parent / "results" / "blocklabels_isbi.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
