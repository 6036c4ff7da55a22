"""Models that assume a square token grid (`int(sqrt(N))` of a token count): the square requirement
is a constraint (`H == W`), not a rigid node, for the analysis and for `--to polymorphic`.

Ground truth comes from eager runs: each model's dynamic variant (`dynamic=True`, the same weights
with the runtime grid written by hand: timm's `resample_abs_pos_embed`, views of the runtime
sizes) at square sizes, and eager forwards that fail where H != W. Never mixfx's own output."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixfx  # noqa: E402
from passes.cure import CureRefused  # noqa: E402


def square_unflatten(t):
    """[B, N, C] tokens -> [B, C, s, s] with s = int(sqrt(N)): assumes a square grid."""
    B, N, C = t.shape
    s = int(math.sqrt(N))
    return t.transpose(1, 2).reshape(B, C, s, s)


def blockify(x, b: int):
    """[B, H, W, C] -> [B, T, b*b, C]: T blocks of b x b positions."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // b, b, W // b, b, C)
    return x.transpose(2, 3).reshape(B, (H // b) * (W // b), b * b, C)


def deblockify(x, b: int):
    """[B, T, b*b, C] -> [B, H, W, C], the block grid's side from T (NesT's way): square only."""
    B, T, _, C = x.shape
    g = int(math.sqrt(T))
    x = x.reshape(B, g, g, b, b, C)
    return x.transpose(2, 3).reshape(B, g * b, g * b, C)


def deblockify_to(x, b: int, gh: int, gw: int):
    """deblockify for a gh x gw block grid (the dynamic variants' ground truth)."""
    B, T, _, C = x.shape
    x = x.reshape(B, gh, gw, b, b, C)
    return x.transpose(2, 3).reshape(B, gh * b, gw * b, C)


# opaque to tracing, as timm registers its deblockify / GPSA
for _f in ("square_unflatten", "blockify", "deblockify"):
    torch.fx.wrap(_f)


def _resample(pos, h, w, grid):
    from timm.layers import resample_abs_pos_embed
    return resample_abs_pos_embed(pos, [h, w], [grid, grid], num_prefix_tokens=0)


class SquareViT(nn.Module):
    """Patch tokens + a fixed position table for a 32x32 input, attention, and a conv over the
    tokens unflattened to `int(sqrt(N))`^2 positions."""

    def __init__(self, dynamic: bool = False, fixed_pos: bool = True, dim: int = 8):
        super().__init__()
        self.dynamic, self.fixed_pos = dynamic, fixed_pos
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 64, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = self.proj(x)
        h, w = m.shape[2], m.shape[3]
        t = m.flatten(2).transpose(1, 2)
        t = t + (self.pos if self.fixed_pos and not self.dynamic else _resample(self.pos, h, w, 8))
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v
        if self.dynamic:
            m = t.transpose(1, 2).reshape(t.shape[0], -1, h, w)
        else:
            m = square_unflatten(t)
        return self.head(self.conv(m).mean((2, 3)))


class BlockNet(nn.Module):
    """NesT-like: 2x2 patches, blocks of 4x4 positions with a learned table per block (over the
    block grid of a `img` x `img` input), attention inside each block, deblockify, pool, head."""

    def __init__(self, dynamic: bool = False, img: int = 32, dim: int = 8, block: int = 4):
        super().__init__()
        self.dynamic, self.block, self.grid = dynamic, block, img // 2 // block
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, self.grid ** 2, block * block, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = self.proj(x).permute(0, 2, 3, 1)
        b = self.block
        gh, gw = m.shape[1] // b, m.shape[2] // b
        t = blockify(m, b)
        if self.dynamic:  # the table resampled over the block grid, each block's b*b*C entries kept
            n, c = self.pos.shape[2], self.pos.shape[3]
            pos = _resample(self.pos.reshape(1, self.grid ** 2, n * c), gh, gw, self.grid).reshape(1, gh * gw, n, c)
        else:
            pos = self.pos
        t = t + pos
        q, k, v = self.qkv(t).chunk(3, -1)
        t = t + (q @ k.transpose(-2, -1)).softmax(-1) @ v
        m = deblockify_to(t, b, gh, gw) if self.dynamic else deblockify(t, b)
        return self.head(F.max_pool2d(m.permute(0, 3, 1, 2), 2).mean((2, 3)))


def _pair(cls, **kw):
    torch.manual_seed(0)
    model = cls(**kw).eval()
    dynamic = cls(dynamic=True, **kw).eval()
    dynamic.load_state_dict(model.state_dict())
    return model, dynamic


def _runs(model, shape) -> bool:
    """Whether the eager model runs at `shape` (ground truth, not the analyser)."""
    try:
        with torch.no_grad():
            model(torch.randn(shape))
    except Exception:  # noqa: BLE001 - any failure means it does not run there
        return False
    return True


CASES = [  # (model, its options, example, square sizes checked against the dynamic variant)
    (SquareViT, {}, (1, 3, 32, 32), [(2, 3, 48, 48), (1, 3, 64, 64)]),
    (BlockNet, {}, (1, 3, 32, 32), [(1, 3, 48, 48), (2, 3, 64, 64)]),
    (BlockNet, {"img": 16}, (1, 3, 16, 16), [(1, 3, 32, 32), (1, 3, 48, 48)]),  # a 2x2 block grid
]


@pytest.mark.parametrize("cls, kw, shape, squares", CASES, ids=["vit-sqrt", "blocks-4x4", "blocks-2x2"])
def test_square_only_model_is_cured_with_the_constraint(cls, kw, shape, squares):
    model, dynamic = _pair(cls, **kw)
    x = torch.randn(shape)
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    assert result.classification_before == "fixed"
    assert result.classification_after in ("convolutional", "polymorphic")
    assert "H == W" in result.constraints and "H == W" in result.to_dict()["constraints"]
    assert any("square grids only" in n and "H == W" in n for n in result.notes), result.notes
    # the position table is resampled (a learned table per block too: not a mask rebuilt by window)
    assert [c.module for c in result.changes] == ["pos"]
    assert "resampled (bicubic)" in result.changes[0].after
    # verified at square sizes only, two of them besides the example
    ran = [s for s in result.verification.sizes[1:] if s.passed]
    assert len(ran) >= 2 and all(s.input_shape[2] == s.input_shape[3] != shape[2] for s in ran)
    with torch.no_grad():
        ref, out = model(x), result.module(x)
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
        for size in squares:  # eager forwards of the cured model at square sizes: runs, equals the dynamic one
            y = torch.randn(size)
            want, got = dynamic(y), result.module(y)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), size
    # the constraint is real: the cured model fails where H != W, as the square-only code does
    assert not _runs(result.module, (1, 3, squares[0][2], squares[0][2] + 2 * shape[2]))


def test_analysis_finds_the_square_constraint_not_a_rigid_node():
    """A model whose only size assumption is `int(sqrt(N))`: not fixed, constrained to H == W."""
    torch.manual_seed(0)
    model = SquareViT(fixed_pos=False).eval()
    assert _runs(model, (1, 3, 48, 48)) and not _runs(model, (1, 3, 48, 64))  # ground truth: eager runs
    report = mixfx.analyze(model, torch.randn(1, 3, 32, 32))
    assert report.classification == "polymorphic"  # the attention mixes every token
    assert report.rigid_nodes == []
    assert report.constraints[0] == "H == W"
    assert any("square sizes only" in n for n in report.notes)


class SquareThenTokenMLP(nn.Module):
    """Square-only unflatten, then a Linear over the 64 positions of an 8x8 map (no cure)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.tokens = nn.Linear(64, 64)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = square_unflatten(self.proj(x).flatten(2).transpose(1, 2))
        t = self.tokens(m.flatten(2))
        return self.head(t.mean(2))


def test_square_grid_does_not_hide_a_node_without_cure():
    """Past the square-only node the probe goes on at a square size, where the token MLP still
    fails: refused, naming it (a square size is no excuse for a weight over a fixed count)."""
    torch.manual_seed(0)
    model = SquareThenTokenMLP().eval()
    assert not _runs(model, (1, 3, 48, 48))  # ground truth: 144 tokens do not fit the 64-wide weight
    with pytest.raises(CureRefused) as info:
        mixfx.rewrite(model, to="polymorphic", example_input=torch.randn(1, 3, 32, 32))
    assert [u.module for u in info.value.nodes] == ["tokens"]
    assert "token mixing" in info.value.message


@pytest.mark.slow
def test_convit_cured_equals_timm_built_at_the_square_size():
    """timm's ConViT takes the grid side of its gated attention from sqrt(N): cured with H == W;
    at 256x256 equal to timm's own ConViT built for 256 (its table resampled by timm's
    `resample_abs_pos_embed`, same weights); it fails at 224x256."""
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    assert result.classification_before == "fixed" and result.classification_after == "polymorphic"
    assert result.constraints[0] == "H == W"
    assert {c.module for c in result.changes} == {"patch_embed", "pos_embed"}
    reference = timm.create_model("convit_tiny", pretrained=False, img_size=256).eval()
    state = model.state_dict()
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [16, 16], [14, 14], num_prefix_tokens=0)
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        y = torch.randn(1, 3, 256, 256)
        want = reference(y)
        assert (result.module(y) - want).abs().max() <= 1e-5 * want.abs().max()
    assert not _runs(result.module, (1, 3, 224, 256))
