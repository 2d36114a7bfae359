import numpy as np
import pytest

from unetkit import Geometry, InputError
from unetkit.tiling import extract_region, plan_tiles, reflect_indices


def test_reflect_indices_match_numpy_reflect_padding():
    for size in (1, 2, 3, 7):
        padded = np.pad(np.arange(size), 20, mode="reflect")
        assert reflect_indices(-20, size + 40, size).tolist() == padded.tolist()


def test_extract_region_equals_mirror_padding(rng):
    image = rng.random((2, 13, 9))
    padded = np.pad(image, ((0, 0), (30, 30), (30, 30)), mode="reflect")
    for y0, x0, h, w in [(-30, -30, 73, 69), (5, 2, 4, 4), (-3, 7, 20, 11)]:
        expected = padded[:, y0 + 30 : y0 + 30 + h, x0 + 30 : x0 + 30 + w]
        np.testing.assert_array_equal(extract_region(image, y0, x0, h, w), expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (388, 388), (389, 385), (1000, 777)])
def test_plan_covers_every_pixel_once_on_the_pooling_grid(shape):
    g = Geometry()
    plan = plan_tiles(shape, g, 572)
    cover = np.zeros(shape, dtype=int)
    for t in plan:
        assert (t.in_y + g.border) % g.step == 0 and (t.in_x + g.border) % g.step == 0
        assert 0 < t.out_h <= plan.output_shape[0] and 0 < t.out_w <= plan.output_shape[1]
        cover[t.out_y : t.out_y + t.out_h, t.out_x : t.out_x + t.out_w] += 1
    assert (cover == 1).all()


def test_plan_numbers():
    plan = plan_tiles((1000, 400), Geometry(), (572, 700))
    assert plan.output_shape == (388, 516) and plan.stride == (384, 512)
    assert len(plan) == 3  # rows start at 0, 384, 768; one column
    assert [t.out_y for t in plan] == [0, 384, 768]
    assert [t.out_h for t in plan] == [384, 384, 232]


def test_same_padding_plan_keeps_centres():
    g = Geometry(padding="same")
    plan = plan_tiles((300, 300), g, 320)
    assert plan.output_shape == (128, 128)  # 320 - 2 * 96
    assert all(t.crop_y == 96 and t.in_y == t.out_y - 96 for t in plan)


def test_bad_plans():
    with pytest.raises(InputError, match="556 or 572"):
        plan_tiles((100, 100), Geometry(), 570)
    with pytest.raises(InputError, match="empty"):
        plan_tiles((0, 100), Geometry(), 572)
    with pytest.raises(InputError, match="larger tile"):
        plan_tiles((100, 100), Geometry(), 188)  # 4 output pixels cannot tile on a 16-pixel grid
