"""Instance labels of an image too large for memory, block by block, never cut at block edges.

Each block is labelled on its own (4-connected objects; 8-connected background, for holes), with
ids unique across blocks. The rows and columns on both sides of every block border are kept, and
ids that touch across a border are merged (`scipy.sparse.csgraph.connected_components`). A second
pass renumbers every block. The result equals `unetkit.postprocess.probabilities_to_instances`
with method "components" on the whole image, ids included (objects numbered in raster order of
their first pixel), whatever the block size.

Example:
    >>> import numpy as np
    >>> from unetkit.postprocess import probabilities_to_instances
    >>> prob = np.random.default_rng(0).random((37, 53)).astype("float32")
    >>> out = np.zeros(prob.shape, np.uint32)
    >>> n = label_blockwise(prob, out, threshold=0.4, min_size=3, block=8)
    >>> bool((out == probabilities_to_instances(prob, 0.4, min_size=3)).all()), n == int(out.max())
    (True, True)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm.auto import tqdm

from .labels import EIGHT_CONNECTED, FOUR_CONNECTED


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a, b) id pairs of neighbouring pixels, both non-zero."""
    both = (a != 0) & (b != 0)
    return np.stack([a[both], b[both]], axis=1)


def _neighbour_pairs(upper: np.ndarray, lower: np.ndarray, diagonal: bool) -> np.ndarray:
    """Pairs of two adjacent lines of pixels: straight across, and diagonally if `diagonal`."""
    pairs = [_pairs(upper, lower)]
    if diagonal:
        pairs += [_pairs(upper[:-1], lower[1:]), _pairs(upper[1:], lower[:-1])]
    return np.concatenate(pairs)


def _roots(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component of each id 0..n-1 of the graph whose edges are `pairs`."""
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def label_blockwise(
    foreground_probability,
    out,
    *,
    threshold: float = 0.5,
    min_size: int = 0,
    fill_holes: bool = True,
    block: int = 4096,
    scratch: Callable[[tuple[int, int]], object] | None = None,
    progress: bool = False,
) -> int:
    """Write the instance labels of `foreground_probability > threshold` (2D, any array-like read by
    windows) into `out` (writable (H, W) array-like); returns the number of objects.

    Args:
        threshold, min_size, fill_holes: as for `probabilities_to_instances` (method "components").
        block: block side in pixels; align it with the arrays' chunks for speed.
        scratch: makes the (H, W) int64 array that holds provisional ids between the passes
            (default: a NumPy array; pass a zarr factory for images larger than memory).
    """
    height, width = (int(s) for s in foreground_probability.shape)
    provisional = scratch((height, width)) if scratch is not None else np.zeros((height, width), np.int64)
    row_starts, col_starts = list(range(0, height, block)), list(range(0, width, block))
    # lines on both sides of each inner border: rows[y] for y in (b-1, b), cols[x] likewise
    rows = {y: np.zeros(width, np.int64) for b in row_starts[1:] for y in (b - 1, b)}
    cols = {x: np.zeros(height, np.int64) for b in col_starts[1:] for x in (b - 1, b)}
    first, sizes, bg_sizes, exterior, touching = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], [], []
    n_obj = n_bg = 0
    blocks = [(y, x) for y in row_starts for x in col_starts]
    for y, x in tqdm(blocks, disable=not progress, desc="labels (1/2)", unit="block"):
        h, w = min(block, height - y), min(block, width - x)
        mask = np.asarray(foreground_probability[y : y + h, x : x + w]).astype(np.float32) > threshold
        objects, count = ndi.label(mask, structure=FOUR_CONNECTED, output=np.int64)
        objects[mask] += n_obj
        flat = objects.ravel()
        nonzero = np.flatnonzero(flat)
        ids, where = np.unique(flat[nonzero], return_index=True)
        position = nonzero[where]
        first.append((y + position // w) * width + x + position % w)
        sizes.append(np.bincount(flat[nonzero] - n_obj, minlength=count + 1)[1:])
        ids_here = objects
        if fill_holes:
            background, bg_count = ndi.label(~mask, structure=EIGHT_CONNECTED, output=np.int64)
            background[~mask] += n_bg
            bg_sizes.append(np.bincount(background[~mask] - n_bg, minlength=bg_count + 1)[1:])
            edges = [background[0] if y == 0 else None, background[-1] if y + h == height else None,
                     background[:, 0] if x == 0 else None, background[:, -1] if x + w == width else None]
            exterior.append(np.concatenate([e[e > 0] for e in edges if e is not None] + [np.zeros(0, np.int64)]))
            ids_here = objects - background  # objects > 0, background < 0
            touching.append(_unique_pairs(np.concatenate([
                _object_background(a, b)
                for a, b in ((ids_here[:, :-1], ids_here[:, 1:]), (ids_here[:-1], ids_here[1:]),
                             (ids_here[:-1, :-1], ids_here[1:, 1:]), (ids_here[:-1, 1:], ids_here[1:, :-1]))
            ])))
            n_bg += bg_count
        n_obj += count
        provisional[y : y + h, x : x + w] = ids_here
        for line in range(y, y + h):
            if line in rows:
                rows[line][x : x + w] = ids_here[line - y]
        for line in range(x, x + w):
            if line in cols:
                cols[line][y : y + h] = ids_here[:, line - x]
    # merge across borders
    obj_pairs, bg_pairs = [np.zeros((0, 2), np.int64)], [np.zeros((0, 2), np.int64)]
    lines = [(rows[b - 1], rows[b]) for b in row_starts[1:]] + [(cols[b - 1], cols[b]) for b in col_starts[1:]]
    for a, b in lines:
        obj_pairs.append(_pairs(np.maximum(a, 0), np.maximum(b, 0)))
        if fill_holes:
            bg_pairs.append(_neighbour_pairs(np.maximum(-a, 0), np.maximum(-b, 0), diagonal=True))
            for u, v in ((a, b), (a[:-1], b[1:]), (a[1:], b[:-1])):
                touching.append(_object_background(u, v))
    obj_root = _roots(n_obj + 1, np.concatenate(obj_pairs))
    first_of = np.full(obj_root.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_of, obj_root, np.concatenate(first))
    size_of = np.bincount(obj_root, weights=np.concatenate(sizes), minlength=len(first_of))
    fill_of = np.zeros(n_bg + 1, np.int64)  # background id -> object root that fills it (0: none)
    if fill_holes and n_bg:
        bg_root = _roots(n_bg + 1, np.concatenate(bg_pairs))
        outside = np.zeros(bg_root.max() + 1, bool)
        outside[bg_root[np.concatenate(exterior)]] = True
        adjacent = np.concatenate(touching) if touching else np.zeros((0, 2), np.int64)
        adjacent = _unique_pairs(np.stack([bg_root[adjacent[:, 0]], obj_root[adjacent[:, 1]]], axis=1))
        adjacent = adjacent[~outside[adjacent[:, 0]]]
        neighbours = np.bincount(adjacent[:, 0], minlength=len(outside))
        single = adjacent[neighbours[adjacent[:, 0]] == 1]
        hole_fill = np.zeros(len(outside), np.int64)
        hole_fill[single[:, 0]] = single[:, 1]
        fill_of = hole_fill[bg_root]
        fill_of[0] = 0
        size_of += np.bincount(fill_of, weights=np.concatenate(bg_sizes), minlength=len(size_of))[: len(size_of)]
    keep = size_of >= max(int(min_size), 1)
    keep[obj_root[0]] = False
    order = np.flatnonzero(keep)[np.argsort(first_of[keep], kind="stable")]
    final = np.zeros(len(first_of), np.int64)
    final[order] = np.arange(1, len(order) + 1)
    lut_obj, lut_bg = final[obj_root], final[fill_of]
    lut_obj[0] = 0
    for y, x in tqdm(blocks, disable=not progress, desc="labels (2/2)", unit="block"):
        ids = np.asarray(provisional[y : y + block, x : x + block])
        out[y : y + ids.shape[0], x : x + ids.shape[1]] = np.where(
            ids > 0, lut_obj[np.maximum(ids, 0)], lut_bg[np.maximum(-ids, 0)]
        ).astype(out.dtype, copy=False)
    return len(order)


def _unique_pairs(pairs: np.ndarray) -> np.ndarray:
    """The distinct rows of an (n, 2) array of non-negative ids below 2^32 (sorted)."""
    keys = np.unique((pairs[:, 0].astype(np.int64) << 32) | pairs[:, 1].astype(np.int64))
    return np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1)


def _object_background(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(background id, object id) pairs of neighbouring pixels in two aligned arrays of signed ids."""
    one = (a < 0) & (b > 0)
    other = (a > 0) & (b < 0)
    return np.concatenate([np.stack([-a[one], b[one]], 1), np.stack([-b[other], a[other]], 1)])
