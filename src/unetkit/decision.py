"""The decision rule: how a foreground probability map becomes labels, chosen on validation images.

A network's probabilities are only half a segmentation; the threshold and the way objects are
formed decide whether a faint membrane closes (EM) or a cell is split in two (DIC). Instead of
fixed defaults, training tries a small grid of rules on the validation images and stores the best
one in the checkpoint, so `unetkit predict` draws labels the way that scored best on data the
network never trained on.

Two kinds of ground truth are told apart (`infer_task`):

* "membranes" (ISBI 2012 EM): the background is a thin network between cells. Rules are scored
  by the ISBI Rand error (lower is better).
* "objects" (cells, nuclei): the background is wide. Rules are scored by the mean of SEG and
  panoptic quality at IoU 0.5, so a rule that covers cells well but splits them (SEG alone does
  not punish extra fragments) loses to one that finds each cell once.

Example:
    >>> import numpy as np
    >>> truth = np.zeros((80, 80), np.int32); truth[5:20, 5:20] = 1; truth[40:60, 30:55] = 2
    >>> prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    >>> rule = choose_decision([prob], [truth])
    >>> rule.task, int(rule.apply(prob).max())
    ('objects', 2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from .config import from_dict_strict
from .errors import InputError
from .postprocess import METHODS, probabilities_to_instances

TASKS = ("membranes", "objects")


@dataclass(frozen=True)
class DecisionRule:
    """Parameters of `unetkit.postprocess.probabilities_to_instances`, with where they came from.

    Args:
        method: "components", "watershed" or "seeded" (see `probabilities_to_instances`).
        threshold: foreground is `prob > threshold`.
        seed_threshold, min_seed_size: cores of the "seeded" watershed.
        h: seed depth of the distance "watershed".
        min_size: objects smaller than this many pixels are dropped.
        tta: the probabilities it was chosen on were averaged over the test-time transforms (8
            dihedral ones for images, 16 for volumes).
        image_statistics: the probabilities it was chosen on were made with batch norm using each
            image's own statistics (`predict(..., norm_statistics="image")`, `unetkit.adapt`).
        task: "membranes" or "objects" (what the score below measures).
        per_plane: a volume's labels are drawn plane by plane (objects annotated per section,
            as in serial-section EM), with ids unique across the volume; else 6-connected 3D
            objects. Images ignore it.
        score: the validation score of this rule (Rand error for membranes, mean of SEG and PQ
            for objects); None for a rule that was not chosen on data.

    Example:
        >>> int(DecisionRule(method="seeded", threshold=0.4).apply(np.full((3, 3), 0.95)).max())
        1
    """

    method: str = "components"
    threshold: float = 0.5
    seed_threshold: float = 0.9
    min_seed_size: int = 0
    h: float = 2.0
    min_size: int = 0
    tta: bool = False
    image_statistics: bool = False
    task: str = "objects"
    per_plane: bool = False
    score: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"decision method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise InputError(f"decision task {self.task!r}: choose one of {', '.join(TASKS)}")

    def apply(self, prob_foreground: np.ndarray, fill_holes: bool = True) -> np.ndarray:
        """Instance labels (int32) of one foreground probability map (H, W) or volume (Z, Y, X)."""
        prob_foreground = np.asarray(prob_foreground)
        if prob_foreground.ndim == 3 and self.per_plane:
            from .stacks import unique_across_planes

            planes = [self.apply(plane, fill_holes) for plane in prob_foreground]
            return unique_across_planes(np.stack(planes)).astype(np.int32)
        return probabilities_to_instances(
            prob_foreground, threshold=self.threshold, method=self.method,  # type: ignore[arg-type]
            min_size=self.min_size, fill_holes=fill_holes, h=self.h, seed_threshold=self.seed_threshold, min_seed_size=self.min_seed_size,
        )

    @property
    def norm_statistics(self) -> str:
        """The `predict` argument that makes maps like the ones this rule was chosen on."""
        return "image" if self.image_statistics else "training"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DecisionRule":
        return from_dict_strict(cls, values, "decision rule")


def infer_task(truths: Sequence[np.ndarray]) -> str:
    """"membranes" when the ground-truth background is a thin network (three quarters of its pixels
    lie within 4 px of the foreground; ISBI 2012: 3 px, DIC-HeLa: 63 px), else "objects".

    Example:
        >>> cells = np.ones((20, 20), np.int32); cells[:, 10] = 0    # a 1-px membrane
        >>> infer_task([cells]), infer_task([np.pad(np.ones((4, 4), np.int32), 8)])
        ('membranes', 'objects')
    """
    distances = []
    for truth in truths:
        background = np.asarray(truth) == 0
        if background.any() and not background.all():
            distances.append(ndi.distance_transform_edt(background)[background])
    if not distances:
        return "objects"
    return "membranes" if float(np.percentile(np.concatenate(distances), 75)) <= 4.0 else "objects"


#: Mask thresholds of the seeded watershed. Membranes also try 0.05 and 0 (every pixel goes to the
#: basin of a core, cells meet on one-pixel watershed lines): across 4 seeds and validation splits of
#: the membranes recipe on ISBI 2012 (benchmarks/em_weights_study.py), the rule chosen on validation
#: came out at the lowest threshold offered each time, and each lower floor lowered the held-out Rand
#: error on every seed (mean of the 4 seeds 0.102 with 0.3 as the floor, 0.090 with 0.05, 0.087 with 0).
#: Objects also try 0.7, as components do: a model fine-tuned on sparse HeLa nuclei (few contacts)
#: drew its masks best at 0.7, where only components were offered, so the rule chosen could not
#: split the touching nuclei of denser frames (benchmarks/finetune_external.py).
SEEDED_THRESHOLDS = {"membranes": (0.0, 0.05, 0.3, 0.5), "objects": (0.3, 0.5, 0.7)}
#: Core levels of the seeded watershed, highest first: `best_rule` keeps the first of equals, so of
#: rules that validate alike the one with the strictest cores, which splits touching objects where
#: the network's probability dips, is chosen (seeded rules come before components for the same
#: reason). Validation images with few touching objects cannot tell core levels apart: a model
#: fine-tuned on two sparse HeLa frames validated exactly alike with cores at 0.8 to 0.98, and on
#: the dense frames SEG was 0.766 with 0.8 (first in the former order) and 0.801 with 0.98. Objects
#: also try 0.99, which models fine-tuned on DSB2018 chose on 2 of 3 seeds (held-out SEG 0.761 ->
#: 0.773, 0.757 -> 0.784); a level of 0.995, where it tied with 0.99, scored 0.05 SEG lower.
SEED_LEVELS = {"membranes": (0.98, 0.95, 0.9, 0.8, 0.7), "objects": (0.99, 0.98, 0.95, 0.9, 0.8, 0.7)}
#: Mask thresholds of the distance watershed (objects only).
WATERSHED_THRESHOLDS = (0.5, 0.7)


def candidate_rules(task: str, object_area: float) -> list[DecisionRule]:
    """The grid tried on validation, in the order ties are broken: seeded watersheds with several
    core levels (strictest first; for membranes, masks down to the whole image), components at
    several thresholds, and (objects only) distance watersheds and a minimum size."""
    rules = []
    for threshold in SEEDED_THRESHOLDS[task]:
        for seed in SEED_LEVELS[task]:
            for min_seed in (0, 10, 50):
                rules.append(DecisionRule("seeded", threshold=threshold, seed_threshold=seed, min_seed_size=min_seed))
    rules += [DecisionRule("components", threshold=t) for t in (0.3, 0.4, 0.5, 0.6, 0.7)]
    if task == "membranes":
        return rules
    rules += [DecisionRule("watershed", threshold=t, h=h) for t in WATERSHED_THRESHOLDS for h in (2.0, 4.0, 8.0)]
    min_size = int(round(0.1 * object_area))
    if min_size > 1:
        rules += [DecisionRule(**{**r.to_dict(), "min_size": min_size}) for r in rules]
    return rules


def score_labels(task: str, labels: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """Validation score of labels: Rand error for "membranes" (lower is better), mean of SEG and
    PQ@0.5 for "objects" (higher is better). Volumes (Z, Y, X) are scored as volumes, objects
    matched by voxel overlap (`unetkit.metrics.volume`)."""
    labels, truths = list(labels), list(truths)
    if truths and np.asarray(truths[0]).ndim == 3:
        from .metrics.volume import average_precision_3d as average_precision, rand_error_3d as rand_error, \
            seg_score_3d as seg_score
    else:
        from .metrics import average_precision, rand_error, seg_score

    if task == "membranes":
        return float(rand_error(labels, truths))
    pq = average_precision(labels, truths, thresholds=(0.5,))[0.5]["pq"]
    return 0.5 * (float(seg_score(labels, truths)) + float(pq))


def cut_to_labelled(labels: np.ndarray, labelled: np.ndarray | None) -> np.ndarray:
    """`labels` with the unlabelled pixels or voxels set to 0 and each object split into its
    connected parts among the labelled ones (6-connected in volumes), so predictions and a sparse
    ground truth (say two annotated planes of a volume) are formed alike; `labelled` None: as they are.

    Example:
        >>> labels = np.ones((3, 1, 2), np.int32)
        >>> cut_to_labelled(labels, np.array([True, False, True])[:, None, None] & (labels > 0))[:, 0].tolist()
        [[1, 1], [0, 0], [2, 2]]
    """
    if labelled is None:
        return labels
    from skimage.measure import label

    cut = np.where(labelled, labels, 0)
    return label(cut, background=0, connectivity=1).astype(np.int64)


def best_rule(rules: Sequence[DecisionRule]) -> DecisionRule:
    """The rule with the best validation score (lowest Rand error for membranes, highest for
    objects); the first of equals."""
    if not rules:
        raise InputError("best_rule needs at least one scored rule")
    sign = 1.0 if rules[0].task == "membranes" else -1.0
    return min(rules, key=lambda rule: sign * rule.score)  # type: ignore[operator]


#: For objects, each image's own batch-norm statistics are chosen over the training images' only
#: when they score better on validation by more than this. They depend on each image's content: a
#: model fine-tuned on dense HeLa frames validated 0.8113 with them and 0.8112 with the training
#: statistics, and on sparse frames (mostly background) they turned noise into objects: 501 for
#: 168 nuclei, AP@0.5 0.32 against 0.76 with the training statistics
#: (benchmarks/finetune_external.py). Where they matter the gain is large (DSB2018 quarters: 0.757
#: against 0.690).
IMAGE_STATISTICS_MARGIN = 0.01


def choose_statistics(rules: Sequence[DecisionRule]) -> DecisionRule:
    """The best of rules chosen with the training batch-norm statistics and with each image's own
    (`DecisionRule.image_statistics`); for objects, each image's own only when they score better
    by more than `IMAGE_STATISTICS_MARGIN`.

    Example:
        >>> training = DecisionRule(score=0.800, task="objects")
        >>> own = [DecisionRule(score=s, task="objects", image_statistics=True) for s in (0.805, 0.85)]
        >>> choose_statistics([training, own[0]]).image_statistics, choose_statistics([training, own[1]]).image_statistics
        (False, True)
    """
    best = best_rule(rules)
    training = [rule for rule in rules if not rule.image_statistics]
    if not best.image_statistics or best.task != "objects" or not training:
        return best
    fallback = best_rule(training)
    return best if best.score > fallback.score + IMAGE_STATISTICS_MARGIN else fallback


def choose_decision(
    probabilities: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    *,
    task: str | None = None,
    tta: bool = False,
    image_statistics: bool = False,
    labelled: Sequence[np.ndarray | None] | None = None,
) -> DecisionRule:
    """The rule of `candidate_rules` that scores best on (probability map, instance labels) pairs.

    Args:
        probabilities: foreground probability maps of the validation images (H, W), or of
            validation volumes (Z, Y, X).
        truths: their ground truth (instance labels, or binary masks; ISBI: cells 1, membranes 0);
            in volumes 6-connected objects.
        task: "membranes" or "objects"; None infers it from the ground truth (`infer_task`).
        tta: whether the maps were made with test-time augmentation (recorded in the rule).
        image_statistics: whether the maps were made with each image's batch-norm statistics
            (recorded in the rule).
        labelled: per map, a bool mask of the annotated pixels or voxels (None: all), for sparse
            annotation: labels and truths are scored there only (`cut_to_labelled`).
    """
    if len(probabilities) != len(truths) or not truths:
        raise InputError("choose_decision needs one ground truth per probability map, and at least one")
    from .labels import as_instances
    from .labels3d import as_instances_3d

    truths = [as_instances_3d(t) if np.asarray(t).ndim == 3 else as_instances(np.asarray(t)) for t in truths]
    masks = list(labelled) if labelled is not None else [None] * len(truths)
    if len(masks) != len(truths):
        raise InputError("choose_decision needs one labelled mask (or None) per probability map")
    truths = [cut_to_labelled(t, m) for t, m in zip(truths, masks)]
    task = task or infer_task(truths)
    areas = np.concatenate([np.bincount(t.ravel())[1:] for t in truths])
    areas = areas[areas > 0]
    object_area = float(np.median(areas)) if areas.size else 0.0
    scored = [
        DecisionRule(**{**rule.to_dict(), "task": task, "tta": tta, "image_statistics": image_statistics,
                        "score": score_labels(task, [cut_to_labelled(rule.apply(p), m) for p, m in zip(probabilities, masks)],
                                              truths)})
        for rule in candidate_rules(task, object_area)
    ]
    return best_rule(scored)
