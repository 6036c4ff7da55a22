"""The layout pass: what it cancels, what it pushes through, what stops it, and ConvNeXt."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.fx  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mixfx.tracing import fx_trace  # noqa: E402
from passes import _fxutil as fu  # noqa: E402
from passes.conv_to_linear import ConvToLinear  # noqa: E402
from passes.layout import LayoutCleanup  # noqa: E402
from passes.linear_to_conv import LinearToConv  # noqa: E402
from passes.modules import ChannelLayerNorm, channel_layer_norm  # noqa: E402


def cleanup(model, x, *extra_inputs):
    model.eval()
    gm = fx_trace(model, leaves=(ChannelLayerNorm,), use_timm=False)
    fu.annotate_example_inputs(gm, x)
    r = LayoutCleanup()(gm)
    with torch.no_grad():
        for inp in (x,) + extra_inputs:
            torch.testing.assert_close(r.graph_module(inp), model(inp), atol=1e-5, rtol=1e-4)
    return r.graph_module, r


def permutes(gm, x):
    shapes = fu.propagate_shapes(gm, [x])
    return [fu.permutation_of(n, shapes) for n in gm.graph.nodes if fu.permutation_of(n, shapes) is not None]


class Fn(nn.Module):
    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            setattr(self, k, nn.Parameter(v))

    def forward(self, x):
        return self.fn(self, x)


def test_inverse_pair_cancels_and_transpose_pair_cancels():
    x = torch.randn(2, 3, 4, 5)
    gm, r = cleanup(Fn(lambda s, x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2) + 1), x)
    assert permutes(gm, x) == []
    t = torch.randn(2, 6, 7)
    gm, _ = cleanup(Fn(lambda s, x: torch.relu(x.transpose(1, 2)).transpose(2, 1)), t)
    assert permutes(gm, t) == []


def test_non_inverse_permutes_fuse_into_one():
    x = torch.randn(2, 3, 4, 5)
    gm, _ = cleanup(Fn(lambda s, x: F.gelu(x.permute(0, 2, 3, 1)).transpose(1, 2)), x)
    assert permutes(gm, x) == [(0, 3, 2, 1)]


def test_pushes_through_activation_dropout_scalar_and_param_mul():
    x = torch.randn(2, 3, 4, 5)

    def f(s, x):
        y = x.permute(0, 2, 3, 1)
        y = F.dropout(torch.sigmoid(F.gelu(y) * 2.0 + 1), 0.1, False)
        y = y * s.gamma + s.beta
        return y.permute(0, 3, 1, 2)

    gm, r = cleanup(Fn(f, gamma=torch.randn(3), beta=torch.randn(1, 1, 3)), x, torch.randn(1, 3, 6, 2))
    assert permutes(gm, x) == []
    reshapes = [n.args[1] for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert sorted(reshapes) == [(1, 3, 1, 1), (1, 3, 1, 1)]


def test_layer_norm_over_channels_becomes_channel_layer_norm_and_back():
    ln = nn.LayerNorm(3)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    model = nn.Module()
    model.ln = ln
    x = torch.randn(2, 3, 4, 5)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = ln

        def forward(self, x):
            return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    gm, _ = cleanup(M(), x)
    assert permutes(gm, x) == []
    assert isinstance(gm.get_submodule("ln"), ChannelLayerNorm)
    # functional layer_norm (timm's LayerNorm2d is traced into this)
    gm, _ = cleanup(Fn(lambda s, x: F.layer_norm(x.permute(0, 2, 3, 1), (3,), s.w, s.b, 1e-6).permute(0, 3, 1, 2),
                       w=torch.randn(3), b=torch.randn(3)), x)
    assert permutes(gm, x) == []
    assert any(n.target is channel_layer_norm for n in gm.graph.nodes)


def test_channel_layer_norm_followed_by_channels_last_permute_becomes_layer_norm():
    cln = ChannelLayerNorm(3)
    x = torch.randn(2, 3, 4, 5)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = cln
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.norm(x).permute(0, 2, 3, 1))

    gm, r = cleanup(M(), x)
    assert type(gm.get_submodule("norm")) is nn.LayerNorm
    assert permutes(gm, x) == [(0, 2, 3, 1)]


def test_hoists_common_permute_out_of_add():
    x = torch.randn(2, 3, 4, 5)
    gm, r = cleanup(Fn(lambda s, x: (x.permute(0, 2, 3, 1) + (x * 2).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)), x)
    assert permutes(gm, x) == []


def test_stops_at_layout_dependent_ops():
    x = torch.randn(2, 3, 4, 5)
    cases = [
        Fn(lambda s, x: x.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)),
        Fn(lambda s, x: x.permute(0, 2, 3, 1).reshape(2, 20, 3).sum(1)),
        # a [W, C] constant would need a permute of its own: the permutes stay
        Fn(lambda s, x: (x.permute(0, 2, 3, 1) * s.p).permute(0, 3, 1, 2), p=torch.randn(5, 3)),
        # LayerNorm over H (not the channels) cannot become a channel LayerNorm
        Fn(lambda s, x: s.ln(x.permute(0, 1, 3, 2)).permute(0, 1, 3, 2)),
    ]
    cases[-1].ln = nn.LayerNorm(4)
    for model in cases:
        gm, r = cleanup(model, x)
        assert not r.changes


def test_residual_stream_keeps_its_permutes():
    """A permute whose value is used twice is not moved (the walk needs a single user)."""
    x = torch.randn(2, 3, 4, 5)
    gm, r = cleanup(Fn(lambda s, x: (lambda y: y + F.gelu(y))(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)), x)
    assert len(permutes(gm, x)) == 2


def test_channel_layer_norm_matches_layer_norm():
    x = torch.randn(2, 7, 3, 4)
    ln = nn.LayerNorm(7, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    cln = ChannelLayerNorm.from_layer_norm(ln, spatial_dims=2)
    ref = ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(cln(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cln.to_layer_norm().weight, ln.weight)
    # one fused layer_norm on the channels-last view: the permutes around it are views (no copy),
    # and the output keeps the channels-last order the kernel wrote
    y = cln(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    gm = torch.fx.symbolic_trace(cln)  # re-traces into plain torch calls (a saved folder needs only torch)
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count("permute") == 2 and targets.count(torch.nn.functional.layer_norm) == 1
    torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
    x1 = torch.randn(2, 7, 5)  # NCL
    cln1 = ChannelLayerNorm.from_layer_norm(ln, spatial_dims=1)
    torch.testing.assert_close(cln1(x1), ln(x1.transpose(1, 2)).transpose(1, 2), atol=1e-5, rtol=1e-5)


def _load_example(name):
    path = ROOT / "examples" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"examples/{name}.py not present")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block with conv_mlp=False, written out."""

    def __init__(self, dim=8):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        x = x * self.gamma
        return x.permute(0, 3, 1, 2) + shortcut


def test_convnext_block_matches_timm_conv_mlp_shape():
    """Result: conv_dw -> channel LayerNorm -> 1x1 conv -> GELU -> 1x1 conv -> mul -> add, no permute
    (timm's conv_mlp=True block)."""
    x = torch.randn(2, 8, 9, 11)
    model = ConvNeXtBlock().eval()
    gm = torch.fx.symbolic_trace(model)
    fu.annotate_example_inputs(gm, x)
    for p in (LinearToConv(), LayoutCleanup()):
        gm = p(gm).graph_module
    assert permutes(gm, x) == []
    ops = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            ops.append(type(gm.get_submodule(n.target)).__name__)
        elif n.op in ("call_function", "call_method") and n.target != "reshape":
            ops.append(getattr(n.target, "__name__", str(n.target)))
    assert ops == ["Conv2d", "ChannelLayerNorm", "Conv2d", "GELU", "Conv2d", "mul", "add"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-4)
        x2 = torch.randn(1, 8, 5, 14)
        torch.testing.assert_close(gm(x2), model(x2), atol=1e-5, rtol=1e-4)
    # and back: --to linear restores nn.LayerNorm and nn.Linear at the same paths
    for p in (ConvToLinear(), LayoutCleanup()):
        gm = p(gm).graph_module
    assert type(gm.get_submodule("norm")) is nn.LayerNorm
    assert type(gm.get_submodule("fc1")) is nn.Linear and type(gm.get_submodule("fc2")) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-4)


def test_convnext_example_has_no_permutes_in_stages():
    ex = _load_example("convnext_block")
    model = ex.build_model().eval()
    x = torch.randn(ex.INPUT_SHAPE)
    gm = torch.fx.symbolic_trace(model)
    fu.annotate_example_inputs(gm, x)
    for p in (LinearToConv(), LayoutCleanup()):
        gm = p(gm).graph_module
    shapes = fu.propagate_shapes(gm, [x])
    assert [n.name for n in gm.graph.nodes if fu.permutation_of(n, shapes)] == []
    assert not [n.target for n in gm.graph.nodes
                if n.op == "call_module" and "stages" in n.target and isinstance(gm.get_submodule(n.target), nn.Linear)]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-4, rtol=1e-4)
