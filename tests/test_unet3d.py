"""The 3D U-Net core: network, per-axis geometry, kernel planning, 3D targets, augmentation, sparse loss, training step."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import unetkit
from unetkit import InputError, UNet
from unetkit.augment import augment_volume, displacement_field_3d
from unetkit.checkpoint import load_checkpoint
from unetkit.config import PAPER
from unetkit.geometry import AxisGeometry, Geometry, VolumeGeometry, plan_kernels
from unetkit.labels3d import label_components_3d
from unetkit.loss import IGNORE_INDEX, weighted_cross_entropy
from unetkit.synthetic import _face_contacts, synthetic_cells_3d
from unetkit.targets import make_targets, make_targets_3d
from unetkit.volume import smallest_volume_tile, sparse_target, train_step

ANISOTROPIC = dict(pool_kernels=[(1, 2, 2), (2, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3)])


def tiny(depth=3, **kwargs):
    torch.manual_seed(0)
    options = dict(dims=3, depth=depth, base_channels=4, dropout=0.0)
    options.update(kwargs)
    return UNet(**options)


# -- network ---------------------------------------------------------------------------------------


def test_3d_network_layers_follow_the_kernels():
    net = tiny(**ANISOTROPIC)
    convs = [m for m in net.down.modules() if isinstance(m, nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(1, 3, 3)] * 2 + [(3, 3, 3)] * 4
    assert [p.kernel_size for p in net.pools] == [(1, 2, 2), (2, 2, 2)]
    assert [(u.kernel_size, u.stride) for u in net.up] == [((2, 2, 2), (2, 2, 2)), ((1, 2, 2), (1, 2, 2))]
    assert net.count_convolutions() == 2 * 3 + 2 * 2 + 2 + 1  # 6 down, 4 up, 2 up-convolutions, head
    assert not any(isinstance(m, (nn.Conv2d, nn.MaxPool2d)) for m in net.modules())
    # He initialisation with the 3D fan-in: 3x3x3 over 8 channels
    conv = net.down[2][0]
    assert conv.in_channels == 8 and abs(conv.weight.std().item() - math.sqrt(2 / (27 * 8))) < 0.15 * math.sqrt(2 / (27 * 8))
    assert net.config["dims"] == 3 and net.config["pool_kernels"] == [[1, 2, 2], [2, 2, 2]]
    # the config rebuilds the same network (what a checkpoint stores)
    assert list(UNet(**net.config).state_dict()) == list(net.state_dict())


@pytest.mark.parametrize(
    "kernels",
    [dict(), ANISOTROPIC, dict(pool_kernels=[(1, 2, 2), (1, 2, 2)], conv_kernels=[(1, 3, 3)] * 2 + [(3, 3, 3)])],
)
def test_volume_geometry_matches_the_network(kernels):
    net = tiny(base_channels=1, **kernels).eval()
    g = net.geometry
    sizes = [axis.legal_sizes(axis.min_size + 2 * axis.step) for axis in g.axes]
    for shape in [tuple(s[0] for s in sizes), tuple(s[-1] for s in sizes), (sizes[0][1], sizes[1][0], sizes[2][2])]:
        with torch.no_grad():
            out = net(torch.zeros(1, 1, *shape)).shape[2:]
        assert tuple(out) == g.output_shape(shape)
        assert all(s - o == 2 * b for s, o, b in zip(shape, out, g.border))
    for axis in g.axes:
        assert not axis.is_legal(axis.min_size - 1) and axis.output_size(axis.min_size) >= 1


def test_anisotropic_geometry_by_hand():
    g = VolumeGeometry(((1, 2, 2), (2, 2, 2)), ((1, 3, 3), (3, 3, 3), (3, 3, 3)))
    # z: level 0 loses nothing and does not pool; level 1 loses 4 slices, pools by 2; bottom loses 4
    assert g.axes[0] == AxisGeometry((1, 2), (0, 4, 4))
    assert g.step == (2, 4, 4) and g.border == (8, 20, 20) and g.min_shape == (18, 44, 44)
    assert g.output_shape((18, 44, 44)) == (2, 4, 4) and g.input_shape((9, 37, 41)) == (26, 80, 84)
    assert smallest_volume_tile(g) == (18, 44, 44)
    assert VolumeGeometry.isotropic(3).axes[1] == Geometry(depth=3).axis  # the 2D arithmetic per axis


def test_illegal_shapes_name_the_axis_and_the_nearest_legal_sizes():
    g = tiny(**ANISOTROPIC).geometry
    with pytest.raises(InputError, match=r"z size 19 is not legal .* use 18 or 20"):
        g.check((19, 44, 44))
    with pytest.raises(InputError, match=r"x size 46 is not legal .* use 44 or 48"):
        g.check((18, 44, 46))
    with pytest.raises(InputError, match=r"y size 10 .* 44 \(the smallest legal size\)"):
        g.check((18, 10, 44))
    with pytest.raises(InputError, match="must be"):
        g.check((18, 44))


def test_wrong_dimensions_raise_one_line_errors():
    net3, net2 = tiny(depth=2), UNet(depth=2, base_channels=4)
    with pytest.raises(InputError, match=r"UNet\(dims=3\) expects .* got an image \(4D\).* UNet\(dims=2\)") as info:
        net3(torch.zeros(1, 1, 18, 18))
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match=r"UNet\(dims=2\) expects .* got a volume \(5D\).* UNet\(dims=3\)"):
        net2(torch.zeros(1, 1, 18, 18, 18))
    with pytest.raises(InputError, match="add the batch axis"):
        net3(torch.zeros(1, 18, 18, 18))
    with pytest.raises(InputError, match="input shape"):
        net3(torch.zeros(1, 1, 17, 18, 18))
    with pytest.raises(InputError, match="dims=3"):
        UNet(pool_kernels=[(1, 2, 2)])
    with pytest.raises(InputError, match="dims must be 2"):
        UNet(dims=4)
    with pytest.raises(InputError, match=r"conv_kernels has 2 kernels; give 3 \(one per level"):
        UNet(dims=3, depth=3, conv_kernels=[3, 3])
    with pytest.raises(InputError, match=r"pool_kernels has 1 kernels; give 2 \(one per down-sampling"):
        UNet(dims=3, depth=3, pool_kernels=[2])
    with pytest.raises(InputError, match="values in"):
        UNet(dims=3, depth=2, pool_kernels=[(3, 2, 2)])


def test_flops_count_3d_voxels():
    net = tiny(depth=2, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    # by hand, input (5, 18, 18): level 0 convs (1x3x3) give 5x16x16 then 5x14x14; pool -> 5x7x7;
    # bottom (3x3x3) 3x5x5 then 1x3x3; up-conv (1x2x2) -> 1x6x6; up convs (1x3x3) 1x4x4, 1x2x2; head 1x1x1
    macs = (
        1 * 4 * 9 * 5 * 16 * 16 + 4 * 4 * 9 * 5 * 14 * 14
        + 4 * 8 * 27 * 3 * 5 * 5 + 8 * 8 * 27 * 1 * 3 * 3
        + 8 * 4 * 4 * 1 * 3 * 3
        + 8 * 4 * 9 * 1 * 4 * 4 + 4 * 4 * 9 * 1 * 2 * 2
        + 4 * 2 * 1 * 1 * 2 * 2
    )
    assert net.flops((5, 18, 18)) == 2.0 * macs


def test_2d_network_is_unchanged():
    net = UNet(depth=3, base_channels=4)
    assert net.dims == 2 and set(net.config) == {"in_channels", "n_classes", "depth", "base_channels", "padding", "dropout", "batch_norm"}
    assert list(net.state_dict()) == [
        "down.0.0.weight", "down.0.0.bias", "down.0.2.weight", "down.0.2.bias", "down.1.0.weight", "down.1.0.bias",
        "down.1.2.weight", "down.1.2.bias", "down.2.0.weight", "down.2.0.bias", "down.2.2.weight", "down.2.2.bias",
        "up.0.weight", "up.0.bias", "up.1.weight", "up.1.bias", "up_conv.0.0.weight", "up_conv.0.0.bias",
        "up_conv.0.2.weight", "up_conv.0.2.bias", "up_conv.1.0.weight", "up_conv.1.0.bias", "up_conv.1.2.weight",
        "up_conv.1.2.bias", "head.weight", "head.bias",
    ]
    assert isinstance(net.geometry, Geometry) and isinstance(net.pool, nn.MaxPool2d)


@pytest.mark.parametrize("path", sorted((Path(unetkit.__file__).parent / "models").glob("*.pt")), ids=lambda p: p.stem)
def test_packaged_2d_models_load_unchanged(path):
    loaded = load_checkpoint(path)  # strict load_state_dict into UNet(**model_config)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model = loaded.model
    assert model.dims == 2 and model.config == {**model.config, **payload["model_config"]}
    assert list(model.state_dict()) == list(payload["state_dict"])
    for key, tensor in payload["state_dict"].items():
        assert torch.equal(model.state_dict()[key], tensor.float())


# -- kernel planning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, depth, pools, convs",
    [
        ((1, 1, 1), 3, [(2, 2, 2)] * 2, [(3, 3, 3)] * 3),
        ((5, 1, 1), 4, [(1, 2, 2), (1, 2, 2), (2, 2, 2)], [(1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)]),
        ((2, 1, 1), 3, [(2, 2, 2)] * 2, [(3, 3, 3)] * 3),  # within 2x: isotropic enough
        ((3, 1, 1), 3, [(1, 2, 2), (2, 2, 2)], [(1, 3, 3), (3, 3, 3), (3, 3, 3)]),
        ((10, 1, 1), 3, [(1, 2, 2), (1, 2, 2)], [(1, 3, 3)] * 3),
        ((0.5, 1.5, 1.5), 3, [(2, 1, 1), (2, 2, 2)], [(3, 1, 1), (3, 3, 3), (3, 3, 3)]),
    ],
)
def test_plan_kernels_pools_coarse_axes_later(spacing, depth, pools, convs):
    planned_pools, planned_convs = plan_kernels(spacing, depth)
    assert list(planned_pools) == pools and list(planned_convs) == convs
    UNet(dims=3, depth=depth, base_channels=1, pool_kernels=planned_pools, conv_kernels=planned_convs)


def test_plan_kernels_rejects_bad_spacing():
    with pytest.raises(InputError, match="spacing"):
        plan_kernels((0, 1, 1), 3)
    with pytest.raises(InputError, match="spacing"):
        plan_kernels((1, 1), 3)


# -- targets ---------------------------------------------------------------------------------------


def test_3d_weight_map_uses_3d_distances_and_the_paper_constants():
    labels = np.zeros((9, 5, 5), np.int64)
    labels[:4], labels[5:] = 1, 2  # two slabs one slice apart in z
    target, weights = make_targets_3d(labels, class_weights=(1.0, 1.0))
    assert target[4].sum() == 0 and weights.dtype == np.float32
    # gap voxel: d1 = d2 = 1 slice
    assert weights[4, 2, 2] == pytest.approx(1 + PAPER.w0 * math.exp(-(2.0**2) / (2 * PAPER.sigma**2)), rel=1e-6)
    # slices 3 pixels apart: the same gap is 3 + 3 in-plane pixels wide
    _, anisotropic = make_targets_3d(labels, spacing=(3.0, 1.0, 1.0), class_weights=(1.0, 1.0))
    assert anisotropic[4, 2, 2] == pytest.approx(1 + PAPER.w0 * math.exp(-(6.0**2) / (2 * PAPER.sigma**2)), rel=1e-6)
    # spacing is relative: (6, 2, 2) is (3, 1, 1)
    np.testing.assert_array_equal(make_targets_3d(labels, spacing=(6, 2, 2), class_weights=(1.0, 1.0))[1], anisotropic)


def test_3d_targets_agree_with_2d_on_a_single_slice():
    rng = np.random.default_rng(0)
    labels = np.zeros((1, 30, 30), np.int64)
    labels[0, 3:14, 3:14], labels[0, 3:14, 14:25], labels[0, 16:27, 5:20] = 1, 2, 3
    labels[0, rng.random((30, 30)) < 0.02] = 0
    t3, w3 = make_targets_3d(labels)
    t2, w2 = make_targets(labels[0])
    np.testing.assert_array_equal(t3[0], t2)
    np.testing.assert_allclose(w3[0], w2, rtol=1e-6)


def test_3d_binary_mask_objects_are_6_connected():
    mask = np.zeros((2, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[1, 2, 2] = 255  # diagonal neighbours only
    assert label_components_3d(mask).max() == 3
    target, weights = make_targets_3d(mask, class_weights=(1.0, 1.0))
    np.testing.assert_array_equal(target, mask > 0)
    assert weights[0, 1, 1] > 1  # between several objects: the border term applies


def test_3d_class_balance_term():
    labels = np.zeros((4, 10, 10), np.int64)
    labels[1:3, 2:5, 2:5] = 1  # 18 of 400 voxels
    target, weights = make_targets_3d(labels, use_weight_map=False)
    assert weights.mean() == pytest.approx(1.0)
    assert weights[target == 1][0] == pytest.approx(400 / (2 * 18)) and weights[target == 0][0] == pytest.approx(400 / (2 * 382))


def test_3d_target_errors():
    with pytest.raises(InputError, match="3D"):
        make_targets_3d(np.zeros((4, 4), np.int64))
    with pytest.raises(InputError, match="spacing"):
        make_targets_3d(np.zeros((2, 4, 4), np.int64), spacing=(1, -1, 1))


# -- augmentation ----------------------------------------------------------------------------------


def test_3d_displacement_scales_z_by_the_anisotropy():
    field = displacement_field_3d((5, 9, 9), rng=3, spacing=(4.0, 1.0, 1.0))
    drawn = np.random.default_rng(3).normal(0.0, PAPER.elastic_sigma, (3, 3, 3, 3))
    np.testing.assert_allclose(field[0, ::2, ::4, ::4], drawn[0] / 4.0, atol=1e-9)
    np.testing.assert_allclose(field[2, ::2, ::4, ::4], drawn[2], atol=1e-9)


def test_3d_augmentation_moves_image_labels_and_mask_together():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (6, 12, 12))
    unlabelled = rng.random((6, 12, 12)) < 0.3
    image = (labels * 10 + unlabelled).astype(np.float64)[None]  # every voxel encodes its label and mask
    for seed in range(4):
        out_image, out_labels, out_mask = augment_volume(
            image, labels, unlabelled, rng=seed, spacing=(2.0, 1.0, 1.0), elastic=False
        )
        np.testing.assert_allclose(out_image[0], out_labels * 10 + out_mask, atol=1e-9)
        assert out_mask.dtype == bool and out_labels.dtype == labels.dtype
    # without elastic deformation, a flip/rotation permutes voxels: same multiset of labels
    assert sorted(out_labels.ravel().tolist()) == sorted(labels.ravel().tolist())
    # with it, labels are still moved by nearest neighbour: no new values
    _, warped, warped_mask = augment_volume(image, labels, unlabelled, rng=5)
    assert set(np.unique(warped)) <= set(range(4)) and warped_mask.dtype == bool


def test_3d_augmentation_rotates_only_in_the_xy_plane():
    volume = np.zeros((4, 8, 8))
    volume[0] = 1.0  # the first slice stands out
    for seed in range(8):
        (out,) = augment_volume(volume, rng=seed, elastic=False)
        assert np.round(out.sum(axis=(1, 2)), 6).tolist() in ([64.0, 0, 0, 0], [0, 0, 0, 64.0])


# -- sparse loss and the training step ----------------------------------------------------------


def test_unlabelled_voxels_get_no_loss_and_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, 5, requires_grad=True)
    target = torch.randint(0, 2, (2, 3, 4, 5))
    unlabelled = torch.rand(2, 3, 4, 5) < 0.5
    sparse = torch.where(unlabelled, torch.full_like(target, IGNORE_INDEX), target)
    weights = torch.rand(2, 3, 4, 5) + 0.5
    weights[unlabelled] = float("nan")  # anything there must not matter
    loss = weighted_cross_entropy(logits, sparse, weights, ignore_index=IGNORE_INDEX)
    loss.backward()
    grad = logits.grad.movedim(1, -1)
    assert torch.count_nonzero(grad[unlabelled]) == 0
    assert torch.all(grad[~unlabelled].abs().sum(-1) > 0)
    # the value: the weighted mean over the labelled voxels only
    nll = -torch.log_softmax(logits.detach(), 1).gather(1, target[:, None])[:, 0]
    expected = (nll * weights)[~unlabelled].sum() / (~unlabelled).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_train_step_on_a_synthetic_volume_updates_only_from_labelled_voxels():
    net = tiny(depth=2, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
    g = net.geometry
    image, labels = synthetic_cells_3d((9, 37, 41), seed=2)
    target, weights = make_targets_3d(labels, spacing=(2.0, 1.0, 1.0))
    tile = (9, 36, 40)
    out = g.output_shape(tile)
    crop = tuple(slice(b, b + o) for b, o in zip(g.border, out))
    unlabelled = np.zeros(out, bool)
    unlabelled[: out[0] // 2] = True  # only the lower slices are annotated
    x = torch.from_numpy(image[None, None, : tile[0], : tile[1], : tile[2]].copy())
    t = torch.from_numpy(sparse_target(target[crop], unlabelled)[None])
    w = torch.from_numpy(weights[crop][None])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=PAPER.momentum)
    before = [p.detach().clone() for p in net.parameters()]
    loss = train_step(net, optimizer, x, t, w)
    assert math.isfinite(loss) and loss > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # every layer learns
    # changing the labels of unlabelled voxels changes nothing
    def gradients(target):
        torch.manual_seed(0)
        model = tiny(depth=2, pool_kernels=[(1, 2, 2)], conv_kernels=[(1, 3, 3), (3, 3, 3)])
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, target, w)
        return [p.grad.clone() for p in model.parameters()]

    flipped = t.clone()
    flipped[0, : out[0] // 2] = 1 - torch.from_numpy(target[crop][: out[0] // 2])
    assert all(torch.equal(a, b) for a, b in zip(gradients(t), gradients(sparse_target_all(t, unlabelled))))
    assert not all(torch.equal(a, b) for a, b in zip(gradients(t), gradients(flipped)))
    with pytest.raises(InputError, match="crop the target"):
        train_step(net, optimizer, x, torch.zeros(1, 9, 36, 40, dtype=torch.long), w)


def sparse_target_all(t, unlabelled):
    """`t` with every unlabelled voxel set to class 1 and then marked unlabelled again."""
    dense = t.clone()
    dense[0][torch.from_numpy(unlabelled)] = 1
    return torch.from_numpy(sparse_target(dense[0].numpy(), unlabelled)[None])


# -- synthetic volumes -----------------------------------------------------------------------------


def test_synthetic_volumes_have_touching_6_connected_cells():
    touching = 0
    for seed in range(4):
        image, labels = synthetic_cells_3d((9, 37, 41), seed=seed)
        assert image.shape == labels.shape == (9, 37, 41) and image.dtype == np.float32 and labels.dtype == np.uint16
        assert 0.0 <= image.min() and image.max() <= 1.0
        ids = np.unique(labels)
        assert ids.tolist() == list(range(ids.size))  # numbered 1..N
        for i in ids[1:]:
            assert label_components_3d(labels == i).max() == 1
        touching += _face_contacts(labels)[0].size > 0
        a, b = synthetic_cells_3d((9, 37, 41), seed=seed)
        assert np.array_equal(a, image) and np.array_equal(b, labels)
    assert touching >= 2
    with pytest.raises(InputError, match="at least 4"):
        synthetic_cells_3d((2, 37, 41))


def test_a_3d_checkpoint_saves_and_loads(tmp_path):
    from unetkit.checkpoint import load_checkpoint, save_checkpoint
    from unetkit.data import Normalization

    torch.manual_seed(0)
    net = UNet(dims=3, depth=2, base_channels=4, pool_kernels=[(1, 2, 2)])
    path = save_checkpoint(tmp_path / "best.pt", net, normalization=Normalization(), class_names=["background", "cell"])
    loaded = load_checkpoint(path).model
    assert loaded.dims == 3 and loaded.config == net.config
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
