"""Exact tiling (issue 14): `mixfx.tile` equals the whole-image run to float rounding, and refuses,
naming the node, where the receptive field is unbounded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixfx
from mixfx.tiling import NotTileableError

from test_examples_models import load_example


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


_unet = load_example("unet")
UNet, Block = _unet.UNet, _unet.Block


def _randomise_bn(model: nn.Module) -> nn.Module:
    return _unet.randomise_norm_statistics(model, 0.5)


@pytest.mark.parametrize("up", ["nearest", "bilinear", "tconv"])
def test_padded_unet_tiled_equals_whole(up):
    torch.manual_seed(0)
    model = _randomise_bn(UNet(c=4, depth=3, up=up))
    x = torch.randn(1, 3, 136, 200)  # not a multiple of the tile: the last tiles are partial
    with torch.no_grad():
        ref = model(x)
    out = mixfx.tile(model, x, (48, 64))
    assert out.shape == ref.shape
    assert _rel_err(out, ref) <= 1e-5


def test_strided_net_with_odd_sizes_tiled_equals_whole():
    """Strides 2 and 3, odd kernels and paddings, dilation, a ceil-mode pool: output stride 12,
    odd image sizes, tile origins on multiples of 12."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2), nn.GELU(),
        nn.MaxPool2d(3, stride=3, padding=1, ceil_mode=True),
        nn.Conv2d(6, 4, 3, stride=2, padding=1), nn.Hardswish(),
        nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(2, 3, 157, 203)
    with torch.no_grad():
        ref = model(x)
    out = mixfx.tile(model, x, (37, 50))
    assert out.shape == ref.shape
    assert _rel_err(out, ref) <= 1e-5


def test_classifier_gives_the_pre_head_map_and_up_to():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(2)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 128, 168)
    body = nn.Sequential(*list(model.children())[:-2])
    with torch.no_grad():
        ref = body(x)
        ref3 = nn.Sequential(*list(model.children())[:-3])(x)
    out = mixfx.tile(model, x, 64)
    assert out.shape == ref.shape and _rel_err(out, ref) <= 1e-5
    out3 = mixfx.tile(model, x, 64, up_to="layer3")
    assert out3.shape == ref3.shape and _rel_err(out3, ref3) <= 1e-5


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))


class Attention(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        return F.scaled_dot_product_attention(t, t, t).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("layer,module,words", [
    (nn.GroupNorm(2, 4), "1", "GroupNorm"),
    (SE(4), "1", "global pooling"),
    (Attention(), "1", "attention"),
], ids=["groupnorm", "squeeze_excite", "attention"])
def test_refuses_naming_the_node(layer, module, words):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer, nn.Conv2d(4, 2, 3, padding=1)).eval()
    with pytest.raises(NotTileableError) as info:
        mixfx.tile(model, torch.randn(1, 3, 64, 64), 32)
    assert f"`{module}`" in info.value.message and words in info.value.message
    assert info.value.exit_code == 3


def test_refuses_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    with pytest.raises(NotTileableError, match="eval"):
        mixfx.tile(model, torch.randn(2, 3, 32, 32), 16)


class SuperResolution(nn.Module):
    """Output 3x the input: pixel shuffle and bicubic up, a strided conv down, nearest x3 up (output
    stride 1/3 input pixel, fractional maps all the way)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 5, stride=2, padding=2)

    def forward(self, x):
        y = self.b(F.pixel_shuffle(self.a(x), 2)) + F.interpolate(x, scale_factor=2, mode="bicubic")
        return F.interpolate(self.c(y), scale_factor=3, mode="nearest")


def test_fractional_output_stride_tiled_equals_whole():
    torch.manual_seed(3)
    model = SuperResolution().eval()
    x = torch.randn(1, 3, 77, 91)
    with torch.no_grad():
        ref = model(x)
    out = mixfx.tile(model, x, (20, 24))
    assert out.shape == ref.shape == (1, 3, 231, 273)
    assert _rel_err(out, ref) <= 1e-5
