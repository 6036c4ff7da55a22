"""The symbolic run on windowed models: sizes stay small and exact (issue 13's budget stops).

A Swin-like model pads each map up to a multiple of its window, cuts it into windows, puts the
windows back and crops. torch writes the padded size as `H + Mod(7 - Mod(H, 7), 7)` and its own
`view` infers a window of 7 as `Hp//(Hp//7)`; each stage nested the last one's expression, and
sympy took minutes. Ground truth here is torch's `ShapeProp` on real tensors at other sizes.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import mixfx
from mixfx.shape_rules import _rounded_up
from mixfx.shapes import propagate_symbolic
from mixfx.tracing import trace


class PaddedWindows(nn.Module):
    """Three stages of: pad to a multiple of the window, window attention stand-in (a Linear over
    each window's tokens), windows back, crop, residual; then a patch merge padded to even."""

    def __init__(self, ws: int = 7, c: int = 8, stages: int = 3) -> None:
        super().__init__()
        self.ws = ws
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.blocks = nn.ModuleList(nn.Linear(c * 2 ** i, c * 2 ** i) for i in range(stages))
        self.merges = nn.ModuleList(nn.Linear(4 * c * 2 ** i, 2 * c * 2 ** i) for i in range(stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ws = self.ws
        x = self.embed(x).permute(0, 2, 3, 1)
        for block, merge in zip(self.blocks, self.merges):
            B, H, W, C = x.shape
            y = F.pad(x, (0, 0, 0, (ws - W % ws) % ws, 0, (ws - H % ws) % ws))
            Hp, Wp = y.shape[1], y.shape[2]
            win = y.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws * ws, C)
            win = block(win)
            y = win.view(-1, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, Hp, Wp, C)
            x = x + y[:, :H, :W, :]
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            B, H, W, C = x.shape
            x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
            x = merge(x)
        return x.permute(0, 3, 1, 2)


def _symbolic_run():
    gm = trace(PaddedWindows().eval(), torch.empty(1, 3, 224, 224)).graph_module
    return gm, propagate_symbolic(gm, (1, 3, 224, 224), budget_s=60)


def test_padded_windows_finish_with_small_exact_sizes():
    gm, run = _symbolic_run()
    assert run.failure is None
    shapes = {n: tuple(v.shape) for n, v in run.values.items() if isinstance(v, torch.Tensor) or hasattr(v, "shape")}
    # the window is the literal 7, not an expression that equals 7 only where the padding divides
    first_view = next(n.name for n in gm.graph.nodes if n.op == "call_method" and n.target == "view")
    assert shapes[first_view][2] == 7 and shapes[first_view][4] == 7
    # sizes grow by one floor division per stage, not by a copy of the last stage's expression
    # (the window count, a product of two, is the longest: ~100 characters at the third stage)
    longest = max(len(str(d)) for shape in shapes.values() for d in shape)
    assert longest <= 150, longest
    # and every size is right: torch's ShapeProp on real tensors at other sizes
    H, W = run.symbols["H"], run.symbols["W"]
    for h, w in [(100, 124), (224, 160), (61, 250)]:
        ShapeProp(gm).propagate(torch.randn(1, 3, h, w))
        for n in gm.graph.nodes:
            meta = n.meta.get("tensor_meta")
            if n.name not in shapes or not hasattr(meta, "shape"):
                continue
            got = tuple(int(d.node.expr.subs({H: h, W: w})) if isinstance(d, torch.SymInt) else int(d)
                        for d in shapes[n.name])
            assert got == tuple(meta.shape), (n.name, h, w)


@pytest.mark.parametrize("k, form", [(7, "k - x % k"), (3, "k - x % k"), (16, "k - x % k"), (2, "x % 2")])
def test_a_size_padded_to_a_multiple_is_rewritten_to_an_equal_one(k, form):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    if form == "x % 2":
        k = 2
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    t = mode.from_tensor(torch.empty(50, device="meta"),
                         symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]))
    x = t.shape[0]
    padded = x + ((k - x % k) % k if form == "k - x % k" else x % 2)
    rewritten = _rounded_up(padded)
    assert rewritten is not padded  # the pattern was recognised
    sym = x.node.expr
    for v in range(0, 3 * k + 2):
        want = v + ((k - v % k) % k if form == "k - x % k" else v % 2)
        assert int(rewritten.node.expr.subs({sym: v})) == want
    assert rewritten.node.hint == padded.node.hint


def test_analyze_gives_back_the_objects_it_set_aside():
    """`analyze` freezes the objects that exist before it (so that full collections skip them);
    they must be back in the collector afterwards, also after a failure."""
    before = gc.get_freeze_count()
    with torch.device("meta"):
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    mixfx.analyze(m, torch.empty(1, 3, 32, 32, device="meta"))
    assert gc.get_freeze_count() == before and gc.isenabled()
    with pytest.raises(mixfx.errors.MixfxError):
        mixfx.analyze(m, torch.empty(1, 5, 32, 32, device="meta"))  # wrong channel count
    assert gc.get_freeze_count() == before and gc.isenabled()


def test_a_view_that_splits_a_permuted_map_keeps_its_window_and_strides():
    """`view(B, H//8, 8, W//8, 8, C)` of a channels-last permute (MaxViT's, GCViT's window
    partition): the rule gives the literal 8 and the strides torch's kernel gives at real sizes."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from mixfx.shape_rules import NOT_HANDLED, ShapeRules

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    dyn = [DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.DYNAMIC]
    x = mode.from_tensor(torch.empty(1, 16, 64, 96, device="meta"),
                         symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))
    h, w = x.shape[2].node.expr, x.shape[3].node.expr
    with mode, enable_python_dispatcher():
        y = x.permute(0, 2, 3, 1)
        H, W = y.shape[1], y.shape[2]
        out = ShapeRules().method("view", (y, 1, H // 8, 8, W // 8, 8, 16), {})
    assert out is not NOT_HANDLED
    assert out.shape[2] == 8 and out.shape[4] == 8
    for hv, wv in [(64, 96), (128, 40), (8, 256)]:
        real = torch.empty(1, 16, hv, wv, device="meta").permute(0, 2, 3, 1).view(1, hv // 8, 8, wv // 8, 8, 16)
        at = {h: hv, w: wv}
        sizes = tuple(int(d.node.expr.xreplace(at)) if isinstance(d, torch.SymInt) else d for d in out.shape)
        strides = tuple(int(d.node.expr.xreplace(at)) if isinstance(d, torch.SymInt) else d for d in out.stride())
        assert sizes == tuple(real.shape)
        # strides of size-1 dims mean nothing (torch's contiguity and `view` ignore them)
        assert [s for s, n in zip(strides, sizes) if n != 1] == [s for s, n in zip(real.stride(), sizes) if n != 1]
