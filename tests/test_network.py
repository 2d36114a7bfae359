import math

import pytest
import torch
from torch import nn

from unetkit import InputError, UNet


@pytest.fixture(scope="module")
def paper_net():
    return UNet()


def test_paper_network_has_23_convolutions(paper_net):
    assert paper_net.count_convolutions() == 23
    convs = [m for m in paper_net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[:10:2]] == [64, 128, 256, 512, 1024]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs[:-1])
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 2
    ups = [m for m in paper_net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(u.in_channels, u.out_channels) for u in ups] == [(1024, 512), (512, 256), (256, 128), (128, 64)]


def test_paper_network_572_gives_388(paper_net):
    paper_net.eval()
    with torch.no_grad():
        out = paper_net(torch.zeros(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)


def test_he_initialisation(paper_net):
    conv = paper_net.down[1][0]  # 3x3 over 64 channels: N = 576
    assert conv.in_channels == 64
    std = conv.weight.std().item()
    assert abs(std - math.sqrt(2 / 576)) / math.sqrt(2 / 576) < 0.02
    big = paper_net.down[4][2]  # 3x3 over 1024 channels
    assert abs(big.weight.std().item() - math.sqrt(2 / (9 * 1024))) / math.sqrt(2 / (9 * 1024)) < 0.02
    assert torch.count_nonzero(conv.bias) == 0


def test_dropout_only_in_training():
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=4, dropout=0.5)
    x = torch.randn(1, 1, 44, 44)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("depth,width", [(2, 1), (3, 4), (4, 8)])
def test_free_depth_and_width(depth, width):
    net = UNet(in_channels=3, n_classes=5, depth=depth, base_channels=width)
    size = net.geometry.min_size + net.geometry.step
    out = net(torch.zeros(2, 3, size, size + 2 * net.geometry.step))
    assert out.shape == (2, 5, net.geometry.output_size(size), net.geometry.output_size(size + 2 * net.geometry.step))
    assert net.count_convolutions() == 5 * depth - 2  # 23 for the paper's depth 5


def test_same_padding_keeps_size():
    net = UNet(depth=3, base_channels=4, padding="same")
    assert net(torch.zeros(1, 1, 36, 20)).shape == (1, 2, 36, 20)


def test_batch_norm_option():
    net = UNet(depth=2, base_channels=2, batch_norm=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_invalid_inputs_raise():
    net = UNet(depth=3, base_channels=4)
    with pytest.raises(InputError, match="44 or 48"):
        net(torch.zeros(1, 1, 46, 44))
    with pytest.raises(InputError, match="44 .the smallest"):
        net(torch.zeros(1, 1, 44, 42))
    with pytest.raises(InputError, match="channel|expects"):
        net(torch.zeros(1, 2, 44, 44))
    with pytest.raises(InputError):
        net(torch.zeros(1, 44, 44))


@pytest.mark.parametrize("kwargs", [dict(depth=1), dict(base_channels=0), dict(dropout=1.0), dict(padding="full"), dict(n_classes=0)])
def test_invalid_configuration(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


def test_flops_of_the_paper_tile(paper_net):
    # first convolution: 570*570 outputs * 64 channels * 9 taps * 1 input channel * 2
    first = 2 * 570 * 570 * 64 * 9
    assert paper_net.flops(572) > first
    # depth 2, width 1, input 18: every layer's multiply-adds, counted by hand
    macs = (
        16 * 16 * 9  # 3x3, 1 -> 1 channel, 16x16 outputs
        + 14 * 14 * 9  # 3x3, 1 -> 1, 14x14
        + 5 * 5 * 9 * 2  # after pooling to 7: 3x3, 1 -> 2, 5x5
        + 3 * 3 * 9 * 4  # 3x3, 2 -> 2, 3x3
        + 3 * 3 * 4 * 2  # 2x2 up-convolution, 2 -> 1, 3x3 inputs
        + 4 * 4 * 9 * 2  # 3x3 over the concatenation, 2 -> 1, 4x4
        + 2 * 2 * 9  # 3x3, 1 -> 1, 2x2
        + 2 * 2 * 2  # 1x1, 1 -> 2 classes
    )
    assert UNet(depth=2, base_channels=1).flops(18) == 2 * macs


def test_flops_of_a_batch_norm_network_in_training_mode():
    net = UNet(depth=3, base_channels=4, batch_norm=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert net.flops(44) == UNet(depth=3, base_channels=4).flops(44)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
