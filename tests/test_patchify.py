"""Patchify <-> strided conv rewrites (issue 4): numerics in both directions at several input sizes,
every spelling of patch extraction, Conv1d/3d, round trips, skips with reasons, domain notes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from passes._fxutil import annotate_example_inputs
from passes.conv_to_patchify import ConvToPatchify
from passes.patchify_to_conv import PatchifyToConv

ROOT = Path(__file__).resolve().parent.parent


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> torch.fx.GraphModule:
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, leaves) or super().is_leaf_module(m, name)

    return torch.fx.GraphModule(model, Tracer().trace(model))


def run_pass(pass_, model_or_gm, x):
    gm = model_or_gm if isinstance(model_or_gm, torch.fx.GraphModule) else trace(model_or_gm)
    annotate_example_inputs(gm, x)
    return pass_(gm)


def assert_same(a: nn.Module, b: nn.Module, shapes, atol=1e-5):
    torch.manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        assert ya.shape == yb.shape, (shape, ya.shape, yb.shape)
        assert torch.allclose(ya, yb, atol=atol, rtol=1e-4), (shape, (ya - yb).abs().max())


def calls(gm: torch.fx.GraphModule, kind: type) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


# --- models -------------------------------------------------------------------------------------

class ConvEmbed(nn.Module):
    """ViT / Mixer style: strided conv then tokens (or the conv map itself)."""

    def __init__(self, c=3, d=8, k=(4, 4), tokens=True):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(k)]
        self.proj = conv(c, d, k, k)
        self.tokens = tokens

    def forward(self, x):
        y = self.proj(x)
        return y.flatten(2).transpose(1, 2) if self.tokens else torch.relu(y)


class ReshapeEmbed(nn.Module):
    """reshape -> permute -> reshape; `perm` puts (c, p1, p2) in the order they are flattened."""

    def __init__(self, c=3, d=8, p=(4, 4), feature_order=(5, 3, 1)):
        super().__init__()
        self.p, self.order = p, feature_order
        self.proj = nn.Linear(c * p[0] * p[1], d)

    def forward(self, x):
        B, C, H, W = x.shape
        p1, p2 = self.p
        x = x.reshape(B, C, H // p1, p1, W // p2, p2).permute(0, 2, 4, *self.order)
        return self.proj(x.reshape(B, (H // p1) * (W // p2), C * p1 * p2))


class UnfoldEmbed(nn.Module):
    def __init__(self, c=3, d=8, k=(4, 4), stride=None, padding=0, dilation=1, module=False):
        super().__init__()
        self.k, self.stride, self.padding, self.dilation = k, stride or k, padding, dilation
        self.unfold = nn.Unfold(k, dilation, padding, self.stride) if module else None
        self.proj = nn.Linear(c * k[0] * k[1], d)

    def forward(self, x):
        if self.unfold is not None:
            cols = self.unfold(x)
        else:
            cols = F.unfold(x, self.k, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return self.proj(cols.transpose(1, 2))


class TensorUnfoldEmbed(nn.Module):
    def __init__(self, c=3, d=8, p=(4, 2)):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(c * p[0] * p[1], d)

    def forward(self, x):
        p1, p2 = self.p
        x = x.unfold(2, p1, p1).unfold(3, p2, p2)  # [B, C, gh, gw, p1, p2]
        x = x.permute(0, 2, 3, 4, 5, 1).flatten(3)  # flatten order p1 p2 c
        return self.proj(x).flatten(1, 2)


class FunctionalLinearEmbed(nn.Module):
    """F.linear with parameters, channels-last input, grid kept as [B, gh, gw, D]."""

    def __init__(self, c=2, d=6, p=(2, 3)):
        super().__init__()
        self.p = p
        self.weight = nn.Parameter(torch.randn(d, c * p[0] * p[1]))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # NHWC
        B, H, W, C = x.shape
        p1, p2 = self.p
        x = x.reshape(B, H // p1, p1, W // p2, p2, C).transpose(2, 3).reshape(B, H // p1, W // p2, -1)
        return F.linear(x, self.weight, self.bias)


class Conv1dReshape(nn.Module):
    def __init__(self, c=2, d=8, p=4):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(c * p, d)

    def forward(self, x):
        B, C, L = x.shape
        return self.proj(x.reshape(B, C, L // self.p, self.p).permute(0, 2, 3, 1).flatten(2))


class VideoReshape(nn.Module):
    def __init__(self, c=3, d=8, p=(2, 4, 4)):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(c * p[0] * p[1] * p[2], d)

    def forward(self, x):
        B, C, T, H, W = x.shape
        pt, ph, pw = self.p
        x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return self.proj(x.reshape(B, -1, pt * ph * pw * C))


def load_example(name: str):
    path = ROOT / "examples" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"examples/{name}.py is not there yet")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- conv -> patchify ---------------------------------------------------------------------------

@pytest.mark.parametrize("c,k,tokens", [
    (3, (4, 4), True), (1, (4, 4), True), (3, (4, 2), True), (1, (2, 5), False), (3, (3, 3), False),
])
def test_conv2d_to_patchify(c, k, tokens):
    model = ConvEmbed(c, 8, k, tokens).eval()
    res = run_pass(ConvToPatchify(), model, torch.randn(1, c, 16, 20))
    assert res.modified and len(res.changes) == 1
    assert calls(res.graph_module, nn.Conv2d) == 0 and calls(res.graph_module, nn.Linear) == 1
    # other sizes, including sizes the kernel does not divide (the slice drops the remainder)
    assert_same(model, res.graph_module, [(1, c, 16, 20), (2, c, 24, 12), (2, c, 17, 23)])
    assert any("domain unchanged" in n for n in res.notes)


def test_conv_to_patchify_tokens_need_no_permute():
    res = run_pass(ConvToPatchify(), ConvEmbed(3, 8, (4, 4)), torch.randn(1, 3, 16, 16))
    targets = [n.target for n in res.graph_module.graph.nodes]
    assert "permute" in targets  # the patch reshape's permute
    assert "transpose" not in targets  # the tokens come out of the Linear directly


def test_conv_to_patchify_without_slice_changes_domain():
    model = ConvEmbed(3, 8, (4, 4)).eval()
    res = run_pass(ConvToPatchify(exact_domain=False), model, torch.randn(1, 3, 16, 16))
    assert any("H % 4 == 0" in n and "changed" in n for n in res.notes)
    assert_same(model, res.graph_module, [(1, 3, 16, 16), (2, 3, 8, 24)])
    with pytest.raises(RuntimeError):
        res.graph_module(torch.randn(1, 3, 17, 16))


@pytest.mark.parametrize("k,shapes", [
    ((4,), [(1, 2, 32), (3, 2, 18)]),
    ((2, 4, 4), [(1, 2, 4, 16, 12), (2, 2, 5, 8, 9)]),
])
def test_conv1d_conv3d_to_patchify(k, shapes):
    model = ConvEmbed(2, 8, k, tokens=True).eval()
    res = run_pass(ConvToPatchify(), model, torch.randn(shapes[0]))
    assert res.modified
    assert_same(model, res.graph_module, shapes)


@pytest.mark.parametrize("conv,reason", [
    (nn.Conv2d(3, 8, 4, 4, padding=1), "padding"),
    (nn.Conv2d(3, 8, 4, 4, dilation=2), "dilation"),
    (nn.Conv2d(4, 8, 4, 4, groups=2), "groups"),
    (nn.Conv2d(3, 8, 4, 4, padding_mode="reflect"), "padding_mode"),
])
def test_conv_not_patchify_is_skipped_with_reason(conv, reason):
    model = nn.Sequential(conv)
    res = run_pass(ConvToPatchify(), model, torch.randn(1, conv.in_channels, 16, 16))
    assert not res.modified
    assert len(res.skipped) == 1 and reason in res.skipped[0].reason


def test_ordinary_and_1x1_convs_are_left_silently():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, 2))
    res = run_pass(ConvToPatchify(), model, torch.randn(1, 3, 16, 16))
    assert not res.modified and not res.skipped


# --- patchify -> conv ---------------------------------------------------------------------------

@pytest.mark.parametrize("order,name", [((1, 3, 5), "c p1 p2"), ((3, 5, 1), "p1 p2 c"), ((5, 1, 3), "p2 c p1")])
@pytest.mark.parametrize("c,p", [(3, (4, 4)), (1, (4, 2))])
def test_reshape_patchify_to_conv(order, name, c, p):
    model = ReshapeEmbed(c, 8, p, order).eval()
    res = run_pass(PatchifyToConv(), model, torch.randn(1, c, 16, 24))
    assert res.modified, res.skipped
    if c > 1:  # with one channel, where `c` goes in the flatten order is moot
        assert name in res.changes[0].before
    assert calls(res.graph_module, nn.Conv2d) == 1 and calls(res.graph_module, nn.Linear) == 0
    assert_same(model, res.graph_module, [(1, c, 16, 24), (2, c, 24, 8)])
    # the conv drops what the reshape rejected: the report says so
    assert any("domain changed" in n and "H % " in n for n in res.notes)
    res.graph_module(torch.randn(1, c, 17, 25))


@pytest.mark.parametrize("module", [False, True])
def test_unfold_patchify_to_conv(module):
    model = UnfoldEmbed(3, 8, (4, 2), module=module).eval()
    res = run_pass(PatchifyToConv(), model, torch.randn(1, 3, 16, 12))
    assert res.modified, res.skipped
    assert_same(model, res.graph_module, [(1, 3, 16, 12), (2, 3, 9, 13)])
    assert not res.notes  # unfold drops the remainder too: same domain


def test_tensor_unfold_twice_to_conv():
    model = TensorUnfoldEmbed().eval()
    res = run_pass(PatchifyToConv(), model, torch.randn(1, 3, 16, 12))
    assert res.modified, res.skipped
    assert "p1 p2 c" in res.changes[0].before
    assert_same(model, res.graph_module, [(1, 3, 16, 12), (2, 3, 9, 13)])


def test_functional_linear_channels_last_to_conv():
    model = FunctionalLinearEmbed().eval()
    res = run_pass(PatchifyToConv(), model, torch.randn(1, 2, 8, 9))
    assert res.modified, res.skipped
    assert calls(res.graph_module, nn.Conv2d) == 1
    assert_same(model, res.graph_module, [(1, 2, 8, 9), (2, 2, 4, 12)])


@pytest.mark.parametrize("model,shapes", [
    (Conv1dReshape(), [(1, 2, 16), (2, 2, 24)]),
    (VideoReshape(), [(1, 3, 4, 8, 12), (2, 3, 2, 12, 4)]),
])
def test_conv1d_conv3d_patchify_to_conv(model, shapes):
    model.eval()
    res = run_pass(PatchifyToConv(), model, torch.randn(shapes[0]))
    assert res.modified, res.skipped
    kind = nn.Conv1d if len(shapes[0]) == 3 else nn.Conv3d
    assert calls(res.graph_module, kind) == 1
    assert_same(model, res.graph_module, shapes)


def test_einops_rearrange_to_conv():
    pytest.importorskip("einops")
    from einops.layers.torch import Rearrange

    model = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (h w) (p2 c p1)", p1=4, p2=2), nn.Linear(24, 8)).eval()
    gm = trace(model, leaves=(Rearrange,))  # einops layers are fx leaves
    res = run_pass(PatchifyToConv(), gm, torch.randn(1, 3, 8, 12))
    assert res.modified, res.skipped
    assert "p2 c p1" in res.changes[0].before
    assert_same(model, res.graph_module, [(1, 3, 8, 12), (2, 3, 16, 4)])


def test_example_mixer_reshape_patchify():
    mod = load_example("mixer_reshape_patchify")
    model = mod.build_model()
    x = torch.randn(mod.INPUT_SHAPE)
    res = run_pass(PatchifyToConv(), model, x)
    assert [c.module for c in res.changes] == ["stem.proj"]
    assert isinstance(res.graph_module.get_submodule("stem.proj"), nn.Conv2d)
    assert_same(model, res.graph_module, [tuple(mod.INPUT_SHAPE)])
    back = run_pass(ConvToPatchify(), res.graph_module, x)
    assert isinstance(back.graph_module.get_submodule("stem.proj"), nn.Linear)
    assert_same(model, back.graph_module, [tuple(mod.INPUT_SHAPE)])


@pytest.mark.parametrize("model,reason", [
    (UnfoldEmbed(3, 8, (4, 4), stride=(2, 2)), "overlapping"),
    (UnfoldEmbed(3, 8, (4, 4), padding=1), "padding"),
    (UnfoldEmbed(3, 8, (2, 2), dilation=2), "dilation"),
])
def test_not_patchify_unfold_is_skipped(model, reason):
    res = run_pass(PatchifyToConv(), model.eval(), torch.randn(1, 3, 16, 16))
    assert not res.modified
    assert len(res.skipped) == 1 and reason in res.skipped[0].reason


class MixingPermute(nn.Module):
    """Each "token" gathers one offset from every patch: a dilated sampling, not a patchify."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 8)

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, 4, H // 4, 4, W // 4).permute(0, 3, 5, 1, 2, 4)
        return self.proj(x.reshape(B, (H // 4) * (W // 4), C * 16))


class TokenShuffle(nn.Module):
    """Patches are real, but the tokens come out in an order that is no grid walk."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 8)

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // 4, 4, W // 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * 16)
        return self.proj(torch.cat([x[:, 1:], x[:, :1]], 1))


def test_permute_mixing_patches_is_skipped():
    res = run_pass(PatchifyToConv(), MixingPermute().eval(), torch.randn(1, 3, 16, 16))
    assert not res.modified
    assert len(res.skipped) == 1 and "contiguous" in res.skipped[0].reason


def test_non_chain_linears_are_left_silently():
    class Attn(nn.Module):  # transpose + merging reshape into a Linear: no split, no candidate
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):  # x: [B, heads, N, hd]
            B, h, N, d = x.shape
            return self.proj(x.transpose(1, 2).reshape(B, N, h * d))

    res = run_pass(PatchifyToConv(), Attn(), torch.randn(1, 2, 5, 4))
    assert not res.modified and not res.skipped
    res = run_pass(PatchifyToConv(), TokenShuffle(), torch.randn(1, 3, 8, 8))
    assert not res.modified and not res.skipped  # cat is no layout op: the chain ends before it


def test_fixed_size_slice_is_not_generalised():
    class Crop(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 16, 8)

        def forward(self, x):
            x = x[:, :, :8, :8]
            B, C = x.shape[:2]
            return self.proj(x.reshape(B, C, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(B, 4, 48))

    res = run_pass(PatchifyToConv(), Crop().eval(), torch.randn(1, 3, 8, 8))
    assert not res.modified and res.skipped


def test_linear_over_whole_image_is_skipped():
    class Whole(nn.Module):  # splits dims, but the "patch" is always the whole image
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            B, C, H, W = x.shape
            x = x.reshape(B, C, 1, H, 1, W).permute(0, 2, 4, 1, 3, 5)
            return self.proj(x.reshape(B, 1, C * H * W))

    res = run_pass(PatchifyToConv(), Whole().eval(), torch.randn(1, 3, 8, 8))
    assert not res.modified and "whole dims" in res.skipped[0].reason


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("model,x", [
    (ReshapeEmbed(3, 8, (4, 2), (3, 5, 1)), torch.randn(1, 3, 16, 12)),
    (VideoReshape(), torch.randn(1, 3, 4, 8, 8)),
])
def test_round_trip_patchify_conv_patchify(model, x):
    model.eval()
    conv = run_pass(PatchifyToConv(), model, x)
    back = run_pass(ConvToPatchify(), conv.graph_module, x)
    assert back.modified and calls(back.graph_module, nn.Linear) == 1
    assert_same(model, back.graph_module, [tuple(x.shape), (2, x.shape[1]) + tuple(s * 2 for s in x.shape[2:])])
    again = run_pass(PatchifyToConv(), back.graph_module, x)
    assert again.modified
    assert_same(model, again.graph_module, [tuple(x.shape)])


def test_graph_saves_and_reloads(tmp_path):
    model = ConvEmbed(3, 8, (4, 4)).eval()
    res = run_pass(ConvToPatchify(), model, torch.randn(1, 3, 16, 16))
    path = tmp_path / "m.pt"
    torch.save(res.graph_module, path)
    loaded = torch.load(path, weights_only=False)
    assert_same(model, loaded, [(1, 3, 16, 16), (1, 3, 20, 12)])


# --- through the public API (written by other engineers) ---------------------------------------

def _api():
    try:
        from mixfx.rewrite import rewrite
        from mixfx.analysis import analyze
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"mixfx.rewrite / mixfx.analysis not importable yet: {exc}")
    return rewrite, analyze


def test_rewrite_api_example_mixer_keeps_classification():
    rewrite, analyze = _api()
    mod = load_example("mixer_reshape_patchify")
    model = mod.build_model()
    x = torch.randn(mod.INPUT_SHAPE)
    res = rewrite(model, to="conv", example_input=x, only="patchify", analyze=False)
    assert res.verification.passed
    assert any(c.pass_name == "patchify_to_conv" for c in res.changes)
    assert any("H % 16 == 0" in n for n in res.notes)
    before, after = analyze(model, x), analyze(res.module, x)
    assert before.classification == after.classification == "fixed"
    # the widened domain: no divisibility any more (a fixed model's constraint is its pin, issue 13;
    # the guards beside it are listed in dropped_guards)
    before, after = before.dropped_guards, after.dropped_guards
    assert any("% 16" in c for c in before), before
    assert not any("% 16" in c for c in after), after


def test_rewrite_api_vit_example_to_linear():
    rewrite, _ = _api()
    mod = load_example("vit_fixed_pos")
    model = mod.build_model()
    x = torch.randn(getattr(mod, "INPUT_SHAPE", (1, 3, 224, 224)))
    res = rewrite(model, to="linear", example_input=x, only="patchify")
    assert res.verification.passed
    assert [c.pass_name for c in res.changes] == ["conv_to_patchify"]
    assert res.classification_before == res.classification_after
