import pytest

from unetkit import Geometry, InputError, UNet


def test_paper_geometry():
    g = Geometry()
    assert g.border == 92
    assert g.step == 16
    assert g.min_size == 188
    assert g.output_size(572) == 388
    assert g.input_size(388) == 572
    assert g.input_size(389) == 588
    assert g.input_size(1) == 188
    assert g.legal_sizes(572)[:3] == [188, 204, 220]
    assert g.legal_sizes(572)[-1] == 572
    assert all((s - 188) % 16 == 0 for s in g.legal_sizes(2000))


@pytest.mark.parametrize("size", [187, 189, 196, 571, 573, 0, -16])
def test_illegal_sizes(size):
    assert not Geometry().is_legal(size)


def test_illegal_size_error_names_the_two_nearest_legal_sizes():
    with pytest.raises(ValueError, match="556 or 572"):
        Geometry().check(570)
    with pytest.raises(InputError, match="188"):
        Geometry().check(100)


@pytest.mark.parametrize("depth", [2, 3, 4, 5, 6])
def test_geometry_matches_the_network(depth):
    import torch

    net = UNet(depth=depth, base_channels=1, dropout=0.0)
    g = net.geometry
    for size in g.legal_sizes(g.min_size + 3 * g.step):
        out = net(torch.zeros(1, 1, size, size)).shape[-1]
        assert out == g.output_size(size)
        assert size - out == 2 * g.border
    assert g.output_size(g.min_size) >= 1
    # a size just below the smallest legal one has no valid output
    assert not g.is_legal(g.min_size - g.step)


def test_same_padding_geometry():
    g = Geometry(padding="same")
    assert g.is_legal(512) and not g.is_legal(500)
    assert g.output_size(512) == 512
    assert g.margin == 92
    assert g.input_size(500) == 512
    with pytest.raises(ValueError, match="496 or 512"):
        g.check(500)


def test_invalid_configuration():
    with pytest.raises(ValueError):
        Geometry(depth=1)
    with pytest.raises(ValueError):
        Geometry(padding="reflect")
