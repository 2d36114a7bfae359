import numpy as np
import pytest

from unetkit.decision import DecisionRule, candidate_rules, choose_decision, infer_task, score_labels
from unetkit.errors import InputError
from unetkit.postprocess import probabilities_to_instances, seeded_watershed


def membrane_truth() -> np.ndarray:
    """Four cells separated by 1-px membranes (label 0), as in ISBI 2012."""
    truth = np.ones((41, 41), np.int32)
    truth[20, :] = 0
    truth[:, 20] = 0
    return truth


def test_seeded_watershed_keeps_cells_apart_across_a_faint_membrane():
    prob = np.where(membrane_truth() > 0, 0.95, 0.6).astype(np.float32)  # membranes above 0.5: a gap
    assert int(probabilities_to_instances(prob, 0.5).max()) == 1
    labels = seeded_watershed(prob, threshold=0.5, seed_threshold=0.9)
    assert int(labels.max()) == 4
    assert (labels > 0).all()  # the mask covers everything; the watershed assigns the membrane to the cells


def test_seeded_watershed_drops_small_seeds_and_labels_unseeded_components():
    prob = np.zeros((10, 20), np.float32)
    prob[2:8, 2:8] = 0.95
    prob[4, 4] = 0.6  # a hole in the core does not matter
    prob[2:4, 12:14] = 0.95  # a tiny core: too small to seed with min_seed_size=5
    prob[6:9, 15:18] = 0.7  # a component with no core at all
    labels = seeded_watershed(prob, threshold=0.5, seed_threshold=0.9, min_seed_size=5)
    assert int(labels.max()) == 3
    assert len(np.unique(labels[2:8, 2:8])) == 1 and labels[3, 13] > 0 and labels[7, 16] > 0
    with pytest.raises(InputError, match="seed_threshold"):
        seeded_watershed(prob, seed_threshold=1.0)


def test_infer_task():
    assert infer_task([membrane_truth()]) == "membranes"
    cells = np.zeros((100, 100), np.int32)
    cells[10:30, 10:30], cells[60:90, 50:80] = 1, 2
    assert infer_task([cells]) == "objects"


def test_choose_decision_prefers_the_rule_that_does_not_merge_membranes():
    truth = membrane_truth()
    prob = np.where(truth > 0, 0.95, 0.75).astype(np.float32)  # above every components threshold
    rule = choose_decision([prob], [truth])
    assert rule.task == "membranes" and rule.method == "seeded"
    assert rule.score == pytest.approx(0.0, abs=1e-12)
    assert score_labels("membranes", [probabilities_to_instances(prob, 0.5)], [truth]) > 0.5


def test_choose_decision_for_objects_does_not_over_split():
    """Two elongated, dumbbell-shaped cells: a distance watershed splits them, the chosen rule must not."""
    truth = np.zeros((60, 120), np.int32)
    yy, xx = np.mgrid[:60, :120]
    for k, cy in enumerate((15, 45), start=1):
        body = ((yy - cy) ** 2 / 64 + (xx - 25) ** 2 / 100 <= 1) | ((yy - cy) ** 2 / 64 + (xx - 55) ** 2 / 100 <= 1)
        truth[body | ((abs(yy - cy) <= 2) & (xx > 25) & (xx < 55))] = k
    prob = np.where(truth > 0, 0.9, 0.05).astype(np.float32)
    assert int(probabilities_to_instances(prob, method="watershed").max()) > 2  # the distance watershed over-splits
    rule = choose_decision([prob], [truth], tta=True)
    assert rule.task == "objects" and rule.tta and rule.score == pytest.approx(1.0)
    assert int(rule.apply(prob).max()) == 2


def test_rule_round_trip_and_validation():
    rule = DecisionRule("seeded", threshold=0.3, seed_threshold=0.8, min_seed_size=10, task="membranes", score=0.1)
    assert DecisionRule.from_dict(rule.to_dict()) == rule
    stored_before = {k: v for k, v in rule.to_dict().items() if k != "image_statistics"}  # checkpoints of earlier versions
    assert DecisionRule.from_dict(stored_before).norm_statistics == "training"
    assert DecisionRule(image_statistics=True).norm_statistics == "image"
    with pytest.raises(InputError, match="method"):
        DecisionRule("magic")
    with pytest.raises(InputError, match="unknown decision rule"):
        DecisionRule.from_dict({"thresh": 0.5})
    with pytest.raises(InputError, match="one ground truth per"):
        choose_decision([np.zeros((4, 4))], [])


def test_candidate_grid():
    membranes = candidate_rules("membranes", object_area=500)
    objects = candidate_rules("objects", object_area=500)
    assert {r.method for r in membranes} == {"components", "seeded"}
    assert {r.method for r in objects} == {"components", "seeded", "watershed"}
    seeded = [r for r in membranes if r.method == "seeded"]
    assert {r.threshold for r in seeded} == {0.0, 0.05, 0.3, 0.5} and len(membranes) == 5 + 4 * 5 * 3
    assert {r.threshold for r in objects if r.method == "seeded"} == {0.3, 0.5, 0.7}
    assert {r.threshold for r in objects if r.method == "watershed"} == {0.5, 0.7}
    assert {r.min_size for r in objects} == {0, 50} and len(objects) == 2 * (5 + 3 * 6 * 3 + 2 * 3)
    assert [r.seed_threshold for r in objects[:18:3]] == [0.99, 0.98, 0.95, 0.9, 0.8, 0.7]  # strictest cores first


def test_seeded_rule_at_threshold_zero_tiles_the_image_into_basins():
    # two confident cells either side of a membrane that is faint everywhere (p 0.6): threshold 0
    # assigns every pixel to one of the two cores and the cells meet where the membrane is
    prob = np.full((6, 10), 0.99, np.float32)
    prob[:, 5] = 0.6
    labels = DecisionRule("seeded", threshold=0.0, seed_threshold=0.9).apply(prob)
    assert (labels > 0).all() and labels.max() == 2
    assert (labels[:, :5] == labels[0, 0]).all() and (labels[:, 6:] == labels[0, 9]).all()


def test_of_rules_that_validate_alike_the_one_that_splits_touching_objects_is_chosen():
    """Validation with isolated objects cannot tell core levels (nor components) apart; the rule
    chosen still splits two touching objects where the probability dips between them."""
    yy, xx = np.mgrid[:60, :120]
    truth = np.zeros((60, 120), np.int32)
    truth[(yy - 30) ** 2 + (xx - 25) ** 2 <= 144] = 1
    truth[(yy - 30) ** 2 + (xx - 90) ** 2 <= 144] = 2
    validation = np.where(truth > 0, 0.999, 0.02).astype(np.float32)
    rule = choose_decision([validation], [truth])
    assert rule.score == pytest.approx(1.0) and rule.method == "seeded"
    touching = np.zeros((40, 60), np.float32)
    touching[10:30, 6:54] = 0.97  # two cells pressed together, the network a little less sure at the contact
    touching[12:28, 8:28] = 0.999
    touching[12:28, 32:52] = 0.999
    assert int(DecisionRule("components", threshold=rule.threshold).apply(touching).max()) == 1
    assert int(rule.apply(touching).max()) == 2


def test_best_rule_follows_the_task_and_keeps_the_first_of_equals():
    from unetkit.decision import best_rule

    membranes = [DecisionRule(threshold=t, task="membranes", score=s) for t, s in ((0.3, 0.05), (0.4, 0.02), (0.5, 0.02))]
    objects = [DecisionRule(threshold=t, task="objects", score=s) for t, s in ((0.3, 0.5), (0.4, 0.9), (0.5, 0.9))]
    assert best_rule(membranes).threshold == 0.4 and best_rule(objects).threshold == 0.4
    with pytest.raises(InputError, match="at least one"):
        best_rule([])


def test_choose_decision_records_how_the_maps_were_made():
    truth = np.zeros((40, 40), np.int32)
    truth[5:20, 5:20] = 1
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    rule = choose_decision([prob], [truth], tta=True, image_statistics=True)
    assert rule.tta and rule.image_statistics and rule.norm_statistics == "image"
    assert not choose_decision([prob], [truth]).image_statistics


def test_each_images_own_statistics_must_win_clearly_for_objects():
    from unetkit.decision import IMAGE_STATISTICS_MARGIN, choose_statistics

    training = DecisionRule(score=0.80, task="objects", method="seeded")
    close = DecisionRule(score=0.80 + IMAGE_STATISTICS_MARGIN / 2, task="objects", image_statistics=True)
    clear = DecisionRule(score=0.80 + IMAGE_STATISTICS_MARGIN * 2, task="objects", image_statistics=True)
    assert choose_statistics([training, close]) is training and choose_statistics([training, clear]) is clear
    assert choose_statistics([close]) is close  # nothing else to choose
    # membranes (Rand error, lower is better): the best one, as before
    rand = [DecisionRule(score=0.050, task="membranes"), DecisionRule(score=0.049, task="membranes", image_statistics=True)]
    assert choose_statistics(rand) is rand[1]
