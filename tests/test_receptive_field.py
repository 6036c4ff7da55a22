"""Receptive fields (issue 14) against independent ground truth: the closed form of Araujo, Norris &
Sim (Distill 2019) for chains, the support of the input gradient of one output position (weights
made positive, max pools as average pools) for DAGs and resamplings, and the published ResNet-50
figure (427 px, stride 32)."""
from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixfx
from mixfx.receptive_field import compute_fields, summary_line


# ----------------------------------------------------------------------------- ground truth
def closed_form(layers: list[tuple[int, int, int]]) -> tuple[int, int]:
    """r0 = sum_l (k_l - 1) * d_l * prod_{i<l} s_i + 1, S = prod s_i for a chain of (k, s, d)."""
    r, stride = 1, 1
    for k, s, d in layers:
        r += (k - 1) * d * stride
        stride *= s
    return r, stride


def gradient_support(model: nn.Module, shape: tuple[int, ...], position: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per spatial axis, the first and last input pixel whose gradient on the output at `position`
    (summed over channels) is non-zero. Positive weights and inputs: no path cancels."""
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.abs() / max(p.abs().sum().item(), 1e-12) * p.numel() ** 0.5 + 1e-3)
    x = torch.rand(shape, dtype=torch.float64) * 0.5 + 0.5
    x.requires_grad_(True)
    with _MaxPoolAsSum():
        y = model(x)
    y[(0, slice(None), *position)].sum().backward()
    g = x.grad.abs().sum(dim=(0, 1))
    spans = []
    for axis in range(g.dim()):
        other = tuple(d for d in range(g.dim()) if d != axis)
        nz = torch.nonzero(g.sum(dim=other) if other else g).flatten()
        spans.append((int(nz.min()), int(nz.max())))
    return spans


class _MaxPoolAsSum(torch.overrides.TorchFunctionMode):
    """A max pool passes gradient to one element per window: sum over the window instead (a
    depthwise conv of ones with the pool's geometry), so the support is the whole field."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "max_pool2d" not in getattr(func, "__name__", ""):
            return func(*args, **kwargs)
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        a = dict(zip(names, args), **kwargs)
        x, k = a["input"], a["kernel_size"]
        k = (k, k) if isinstance(k, int) else tuple(k)
        stride = a.get("stride") or k
        ones = torch.ones(x.shape[1], 1, *k, dtype=x.dtype)
        return F.conv2d(x, ones, stride=stride, padding=a.get("padding", 0), dilation=a.get("dilation", 1),
                        groups=x.shape[1])


def _check_against_gradient(model: nn.Module, shape: tuple[int, ...], node: str | None = None) -> None:
    run = compute_fields(mixfx.trace(model, torch.zeros(shape)).graph_module, shape)
    target = node or run.pre_head()
    f = run.fields[target]
    out_shape = run.shapes[target]
    from mixfx.receptive_field import exact_interval

    position = []
    for k in range(len(shape) - 2):
        d, _ = f.axes()[k]
        position.append(out_shape[d] // 2)
    spans = gradient_support(model, shape, tuple(position))
    for k, (lo, hi) in enumerate(spans):
        d, m = f.axes()[k]
        a, b = exact_interval(m, position[k])
        a, b = max(a, 0), min(b, shape[2 + k] - 1)
        assert (lo, hi) == (a, b), f"axis {k}: gradient support {lo}..{hi}, computed {a}..{b}"
        # and the stride: one output position further moves the support by the stride
    assert run.receptive_field(target).bounded


# ----------------------------------------------------------------------------- chains
def _random_chain(rng: random.Random) -> tuple[nn.Sequential, list[tuple[int, int, int]]]:
    layers, spec, ch = [], [], 2
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["conv", "conv", "max", "avg"])
        k, s = rng.choice([1, 2, 3, 5]), rng.choice([1, 1, 2, 3])
        d = rng.choice([1, 1, 2]) if kind != "avg" else 1
        p = rng.randint(0, (k - 1) * d // 2) if kind != "conv" else rng.randint(0, (k - 1) * d)
        if kind == "conv":
            layers.append(nn.Conv2d(ch, 3, k, stride=s, padding=p, dilation=d))
            ch = 3
        elif kind == "max":
            layers.append(nn.MaxPool2d(k, stride=s, padding=min(p, k // 2), dilation=d))
        else:
            layers.append(nn.AvgPool2d(k, stride=s, padding=min(p, k // 2)))
        spec.append((k, s, d))
    return nn.Sequential(*layers), spec


@pytest.mark.parametrize("seed", range(12))
def test_chain_matches_closed_form(seed):
    net, spec = _random_chain(random.Random(seed))
    size, stride = closed_form(spec)
    n = max(64, 2 * size + 8)
    report = mixfx.analyze(net, torch.zeros(1, 2, n, n + 6))
    rf = report.receptive_field
    assert rf.bounded and rf.size == [size, size] and rf.stride == [stride, stride], (spec, rf)
    assert report.tileable


def test_offset_is_the_centre_of_output_zero():
    # conv k3 p0: output 0 reads 0..2 (centre 1); then conv k2 s2 p0 at stride 1: 0..3 -> centre 1.5
    net = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 2, stride=2))
    rf = mixfx.analyze(net, torch.zeros(1, 1, 32, 32)).receptive_field
    assert rf.size == [4, 4] and rf.stride == [2, 2] and rf.offset == [1.5, 1.5]


# ----------------------------------------------------------------------------- DAGs, resampling
class Branches(nn.Module):
    """Two paths of different extent merged by an add, then a concat over channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(1, 2, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=2,
                                                                                            dilation=2))
        self.c = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.head = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.b(x) + self.c(x)
        z = torch.cat([y, F.max_pool2d(self.a(x), 2)], dim=1)
        return self.head(z)


class UpDown(nn.Module):
    """Down by 4, up by 4 with the given resampling: a stride 1/4 path, exact as fractions."""

    def __init__(self, up: str):
        super().__init__()
        self.up = up
        self.d1 = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.d2 = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.t = nn.ConvTranspose2d(2, 2, 4, stride=4) if up == "tconv" else None
        self.skip = nn.Conv2d(1, 2, 3, padding=1)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        y = self.d2(self.d1(x))
        if self.t is not None:
            y = self.t(y)
        elif self.up == "shuffle":
            y = F.pixel_shuffle(torch.cat([y] * 16, dim=1), 4)
        else:
            y = F.interpolate(y, scale_factor=4, mode=self.up)
        return self.out(torch.cat([y, self.skip(x)], dim=1))


@pytest.mark.parametrize("model", [Branches(), nn.Sequential(nn.Conv2d(1, 1, 3, stride=2, dilation=3), nn.ReLU(),
                                                              nn.MaxPool2d(3, 2, 1), nn.Conv2d(1, 1, 4, stride=3))],
                         ids=["branches", "dilated_chain"])
def test_dag_matches_gradient_support(model):
    _check_against_gradient(model, (1, 1, 96, 88))


@pytest.mark.parametrize("up", ["nearest", "bilinear", "nearest-exact", "tconv", "shuffle"])
def test_upsampling_matches_gradient_support(up):
    model = UpDown(up)
    _check_against_gradient(model, (1, 1, 64, 72))
    rf = mixfx.analyze(model, torch.zeros(1, 1, 64, 72)).receptive_field
    assert rf.stride == [1, 1] and rf.bounded


def test_exact_size_over_phases_matches_gradient_support():
    """Through a nearest x4 upsampling the field of output i depends on i mod 4: the reported size
    is the largest over the phases, each read off a gradient."""
    model = UpDown("nearest")
    shape = (1, 1, 64, 64)
    rf = mixfx.analyze(model, torch.zeros(shape)).receptive_field
    widths = []
    for i in range(28, 32):
        (lo, hi), _ = gradient_support(UpDown("nearest"), shape, (i, 32))
        widths.append(hi - lo + 1)
    assert rf.size[0] == max(widths)


# ----------------------------------------------------------------------------- published figures
def test_torchvision_resnet50_is_427_stride_32():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None).eval()
    report = mixfx.analyze(model, input_shape=(1, 3, 224, 224))
    rf = report.receptive_field
    assert (rf.size, rf.stride, rf.bounded) == ([427, 427], [32, 32], True)
    assert report.tileable
    assert summary_line(rf, report.tileable) == "receptive field 427x427 px, stride 32 (tileable, halo 213 px)"


def test_timm_resnet50_is_427_stride_32():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False).eval()
    rf = mixfx.analyze(model, input_shape=(1, 3, 224, 224)).receptive_field
    assert (rf.size, rf.stride) == ([427, 427], [32, 32])


# ----------------------------------------------------------------------------- unbounded
class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


def test_squeeze_excite_makes_the_field_unbounded_at_the_gate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SE(4), nn.Conv2d(4, 4, 3, padding=1))
    report = mixfx.analyze(model, torch.zeros(1, 3, 40, 48))
    rf = report.receptive_field
    assert rf.bounded is False and rf.unbounded_at == "1" and "mean" in rf.reason
    assert report.tileable is False
    before = next(n for n in report.nodes if n.name == "_0")
    assert before.receptive_field.size == [3, 3]


def test_groupnorm_makes_the_field_unbounded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3))
    rf = mixfx.analyze(model, torch.zeros(1, 3, 32, 40)).receptive_field
    assert rf.bounded is False and rf.unbounded_at == "1" and "GroupNorm" in rf.reason


def test_unknown_op_is_unbounded_with_its_name():
    class Flip(nn.Module):
        def forward(self, x):
            return torch.flip(x, dims=(3,))

    rf = mixfx.analyze(nn.Sequential(nn.Conv2d(1, 1, 3), Flip()), torch.zeros(1, 1, 20, 24)).receptive_field
    assert rf.bounded is False and rf.reason == "no receptive-field rule for flip"


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, permute, LayerNorm over C, Linear, permute back."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.fc(self.norm(y)).permute(0, 3, 1, 2)


def test_layernorm_over_channels_only_stays_bounded():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), ChannelsLastBlock(), ChannelsLastBlock())
    report = mixfx.analyze(model, torch.zeros(1, 3, 64, 96))
    assert report.receptive_field.size == [4 + 6 * 4 * 2] * 2 and report.tileable
    _check_against_gradient(model, (1, 3, 128, 128))


def test_layernorm_over_hw_is_global_context():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LayerNorm([30, 30]))
    rf = mixfx.analyze(model, torch.zeros(1, 3, 32, 32)).receptive_field
    assert rf.bounded is False and "LayerNorm" in rf.reason


def test_json_has_the_receptive_field_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    d = json.loads(json.dumps(mixfx.analyze(model, torch.zeros(1, 3, 32, 40)).to_dict()))
    assert d["receptive_field"] == {"size": [7, 7], "stride": [2, 2], "offset": [0, 0], "bounded": True,
                                    "unbounded_at": None, "reason": None}
    assert d["tileable"] is True
    conv0 = next(n for n in d["nodes"] if n["name"] == "_0")
    assert conv0["receptive_field"]["size"] == [3, 3]


class Pair(nn.Module):
    """Made a leaf module below: the walk runs its forward eagerly and applies the same rules."""

    def __init__(self, c, stride):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.bn(self.conv(x))), 3, 1, 1)
        return y + x[:, :, ::self.conv.stride[0], ::self.conv.stride[1]] if self.conv.stride[0] > 1 else y + x


def test_leaf_modules_are_walked_inside():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Pair(4, 2), Pair(4, 1), Pair(4, 2))
    report = mixfx.analyze(model, torch.zeros(1, 3, 64, 80), leaves=("Pair",))
    assert any(n.op == "Pair" for n in report.nodes)  # really leaves
    size, stride = closed_form([(3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1)])
    assert report.receptive_field.size == [size, size] and report.receptive_field.stride == [stride, stride]
