"""Stacks (z-stacks, time series) segmented plane by plane with a 2D model.

Every plane goes through the one segmentation core (`unetkit.inference.Segmenter`) with the same
settings, so a plane of a stack gets exactly the labels it would get as its own file. The planes'
labels are then made unique across the stack (plane 2's objects continue the numbering of plane
1's), or, with `stitch`, linked across planes: an object takes the id of the object in the plane
before it that it overlaps most, when their intersection over union reaches the threshold (the
way Cellpose stitches 2D masks into 3D ones), so a cell cut by several sections, or followed
through a time series, keeps one id.

Example:
    >>> planes = np.zeros((3, 4, 6), np.uint16)
    >>> planes[:, 1:3, 1:3] = 1; planes[1:, 1:3, 4:] = 2; planes[2, 0, 5] = 3
    >>> stitch_planes(planes, 0.25)[:, 1, :].tolist()
    [[0, 1, 1, 0, 0, 0], [0, 1, 1, 0, 2, 2], [0, 1, 1, 0, 2, 2]]
    >>> unique_across_planes(planes)[:, 1, :].tolist()
    [[0, 1, 1, 0, 0, 0], [0, 2, 2, 0, 3, 3], [0, 4, 4, 0, 5, 5]]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .errors import InputError
from .labels import id_dtype

#: The overlap (intersection over union) at which `--stitch` links an object to the one in the
#: plane before it when no threshold is given; Cellpose users commonly stitch at 0.25.
STITCH_THRESHOLD = 0.25


def check_stack(stack: np.ndarray, in_channels: int, name: str = "stack") -> np.ndarray:
    """`stack` as (N, H, W) for a one-channel model or (N, H, W, C) / (N, C, H, W) for a colour
    one; InputError naming `name` for anything else.

    Example:
        >>> check_stack(np.zeros((5, 8, 9)), 1).shape
        (5, 8, 9)
    """
    stack = np.asarray(stack)
    if in_channels == 1 and stack.ndim == 3:
        return stack
    if in_channels > 1 and stack.ndim == 4 and in_channels in (stack.shape[1], stack.shape[-1]):
        return stack
    expected = "(planes, H, W)" if in_channels == 1 else f"(planes, H, W, {in_channels}) or (planes, {in_channels}, H, W)"
    raise InputError(f"{name}: a stack for this {in_channels}-channel model must have shape {expected}; got {stack.shape}")


def unique_across_planes(labels: np.ndarray) -> np.ndarray:
    """(N, H, W) labels whose ids continue from plane to plane, so no two planes share an id (0
    stays background); each plane's objects keep their order.
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.int64)
    offset = 0
    for z, plane in enumerate(labels):
        ids, inverse = np.unique(plane, return_inverse=True)
        new = np.arange(len(ids), dtype=np.int64) + offset + (0 if ids[0] == 0 else 1)
        if ids[0] == 0:
            new[0] = 0
        out[z] = new[inverse.reshape(plane.shape)]
        offset += int((ids > 0).sum())
    return out.astype(id_dtype(int(out.max(initial=0))))


def _overlaps(previous: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(previous id, current id, intersection over union) for every pair of objects that touch."""
    both = (previous > 0) & (current > 0)
    if not both.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    pairs, intersection = np.unique(np.stack([previous[both], current[both]]).astype(np.int64), axis=1, return_counts=True)
    prev_ids, prev_areas = np.unique(previous[previous > 0], return_counts=True)
    cur_ids, cur_areas = np.unique(current[current > 0], return_counts=True)
    area_prev = prev_areas[np.searchsorted(prev_ids, pairs[0])]
    area_cur = cur_areas[np.searchsorted(cur_ids, pairs[1])]
    return pairs[0], pairs[1], intersection / (area_prev + area_cur - intersection)


def stitch_planes(labels: np.ndarray, threshold: float = STITCH_THRESHOLD) -> np.ndarray:
    """Link (N, H, W) per-plane labels into objects across planes by overlap.

    Plane by plane, each object takes the id of the object in the previous (already stitched)
    plane with which its intersection over union is largest, if that reaches `threshold`; pairs are
    matched greedily from the largest overlap down, so two objects never take one id in one plane.
    An object without such a partner starts a new id. Ids are unique across the stack.

    Args:
        labels: (N, H, W) instance labels, one plane after the other (z or t).
        threshold: smallest intersection over union that links two objects, in (0, 1].

    Returns:
        (N, H, W) labels (uint16, or uint32 above 65535 objects).
    """
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"--stitch must be an overlap (intersection over union) in (0, 1] (got {threshold})")
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise InputError(f"stitching needs a stack of planes (N, H, W); got shape {labels.shape}")
    planes = unique_across_planes(labels).astype(np.int64)
    for z in range(1, len(planes)):
        previous, current = planes[z - 1], planes[z]
        prev_ids, cur_ids, iou = _overlaps(previous, current)
        order = np.argsort(-iou, kind="stable")
        taken_prev, renamed = set(), {}
        for k in order:
            if iou[k] < threshold:
                break
            p, c = int(prev_ids[k]), int(cur_ids[k])
            if p in taken_prev or c in renamed:
                continue
            taken_prev.add(p)
            renamed[c] = p
        if renamed:
            ids = np.unique(current)
            lookup = ids.copy()
            for i, value in enumerate(ids):
                lookup[i] = renamed.get(int(value), value)
            planes[z] = lookup[np.searchsorted(ids, current)]
    # ids now have gaps where objects were linked: number them 1..n in order of first appearance
    ids, first = np.unique(planes.ravel(), return_index=True)
    objects = np.flatnonzero(ids > 0)
    lookup = np.zeros(len(ids), np.int64)
    lookup[objects[np.argsort(first[objects])]] = np.arange(1, len(objects) + 1)
    out = lookup[np.searchsorted(ids, planes)]
    return out.astype(id_dtype(int(out.max(initial=0))))


@dataclass
class StackSegmentation:
    """A stack segmented plane by plane: what `unetkit predict` writes for a multi-page input."""

    probabilities: np.ndarray  # float32 (N, n_classes, H, W)
    labels: np.ndarray  # (N, H, W) ids unique across the stack (stitched if asked), or binary uint8
    seconds: float
    stitched: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: planes, objects, how they were numbered, the time."""
        count = int(len(np.unique(self.labels[self.labels > 0])))
        how = "linked across planes" if self.stitched else "unique across planes"
        return f"{len(self.labels)} planes, {count} objects ({how}) in {self.seconds:.1f} s"


def segment_stack(
    segmenter,
    stack: np.ndarray,
    *,
    name: str = "stack",
    stitch: float | None = None,
    progress: bool = False,
    callback: Callable[[int, int], None] | None = None,
) -> StackSegmentation:
    """Segment a raw stack plane by plane with `segmenter` (a `unetkit.inference.Segmenter`).

    Args:
        segmenter: the model with its resolved settings; each plane is one image to it (its own
            normalisation and, if the rule says so, its own batch-norm statistics).
        stack: (N, H, W) for a one-channel model, (N, H, W, C) or (N, C, H, W) for a colour one.
        name: the input's name, for messages.
        stitch: link objects across planes at this overlap (`stitch_planes`); None keeps planes apart.
        progress: a progress bar over planes.
        callback: called with (planes done, planes in all) after each plane.

    Returns:
        A `StackSegmentation`; binary labels (`labels="binary"`) are neither renumbered nor stitched.

    Example:
        >>> from unetkit.checkpoint import LoadedModel
        >>> from unetkit.data.normalize import Normalization
        >>> from unetkit.inference import InferenceOptions, Segmenter
        >>> from unetkit.network import UNet
        >>> model = LoadedModel(UNet(depth=2, base_channels=4), Normalization(), ["background", "cell"])
        >>> result = segment_stack(Segmenter(model, InferenceOptions(device="cpu")), np.random.rand(3, 30, 40))
        >>> result.probabilities.shape, result.labels.shape
        ((3, 2, 30, 40), (3, 30, 40))
    """
    stack = check_stack(stack, segmenter.model.in_channels, name)
    if stitch is not None and not 0.0 < stitch <= 1.0:
        raise InputError(f"--stitch must be an overlap (intersection over union) in (0, 1] (got {stitch})")
    started = time.perf_counter()
    maps, planes, notes = [], [], []
    for z in tqdm(range(len(stack)), disable=not progress, desc="planes", unit="plane"):
        plane_name = f"{name} (plane {z})"
        if z == 0:
            notes.extend(segmenter.check_raw(stack[z], name))
        result = segmenter.segment(stack[z], name=plane_name)
        maps.append(result.probabilities)
        planes.append(result.labels)
        if callback is not None:
            callback(z + 1, len(stack))
    labels = np.stack(planes)
    binary = segmenter.settings.labels == "binary"
    if not binary:
        labels = stitch_planes(labels, stitch) if stitch is not None else unique_across_planes(labels)
    return StackSegmentation(np.stack(maps).astype(np.float32, copy=False), labels, time.perf_counter() - started,
                             stitched=stitch is not None and not binary, notes=notes)
