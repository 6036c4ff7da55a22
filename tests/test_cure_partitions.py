"""`--to polymorphic` on partitions whose sizes were written in at the example: a grid partition
(MaxViT's grid attention: a fixed g x g grid of tokens spread over the whole map, the cells grow
with the input) beside a window partition (fixed w x w windows, their count grows), with a
relative-position table over the g x g / w x w tokens; and Hiera's unroll (strides moved into
the batch, tokens back in unrolled order with a `-1` that is the batch at the example).

At an example where the map is g*g cells (16 = 4*4, or 8 = 8*1) the view's constants do not say
which factor follows the input; the cure must tell them apart by what the graph does. Ground truth
at other sizes: each model's own dynamic variant (the same weights, the runtime sizes written by
hand in eager code), never mixfx's output."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixfx  # noqa: E402

from test_cure import _pair  # the model and its hand-written dynamic variant, same weights


def relative_index(n: int) -> torch.Tensor:
    """Index of the (2n-1)^2 offsets between the cells of an n x n block (Swin/MaxViT)."""
    coords = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (n - 1)
    return rel[..., 0] * (2 * n - 1) + rel[..., 1]


class PartitionAttention(nn.Module):
    """Attention over the n*n tokens of each partition, with a relative-position bias table."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * n - 1) ** 2))
        self.register_buffer("index", relative_index(n), persistent=False)

    def forward(self, t):
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        logits = logits + self.table[self.index.reshape(-1)].reshape(self.n ** 2, self.n ** 2)
        return self.out(logits.softmax(-1) @ v)


class MaxVitLike(nn.Module):
    """A window-attention block then a grid-attention block (MaxViT), the map's size at the
    example (`img // stride`) written into both partitions and their reverses."""

    def __init__(self, dynamic: bool = False, img: int = 32, stride: int = 2, n: int = 4, dim: int = 16):
        super().__init__()
        self.dynamic, self.n, self.dim, self.size = dynamic, n, dim, img // stride
        self.proj = nn.Conv2d(3, dim, stride, stride)
        self.window_attn = PartitionAttention(dim, n)
        self.grid_attn = PartitionAttention(dim, n)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = self.proj(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        B, n, C = m.shape[0], self.n, self.dim
        H, W = (m.shape[1], m.shape[2]) if self.dynamic else (self.size, self.size)
        # window partition: fixed n x n windows, (H/n) x (W/n) of them
        t = m.reshape(B, H // n, n, W // n, n, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n * n, C)
        t = t + self.window_attn(t)
        m = t.reshape(B, H // n, W // n, n, n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        # grid partition: a fixed n x n grid, each cell (H/n) x (W/n): tokens strided over the map
        t = m.reshape(B, n, H // n, n, W // n, C).permute(0, 2, 4, 1, 3, 5).reshape(-1, n * n, C)
        t = t + self.grid_attn(t)
        m = t.reshape(B, H // n, W // n, n, n, C).permute(0, 3, 1, 4, 2, 5).reshape(B, H, W, C)
        # a position-dependent readout, so that a mix-up of positions shows in the output
        weights = torch.linspace(0.5, 1.5, m.shape[1] * m.shape[2]).reshape(1, m.shape[1], m.shape[2], 1)
        return self.head((m * weights).mean((1, 2)))


class GridOnly(MaxVitLike):
    """Grid attention alone, at an example where the cells are 1x1 (an 8x8 map, an 8x8 grid:
    MaxViT's last stage at 256 px): `view(B, 8, 1, 8, 1, C)`."""

    def __init__(self, dynamic: bool = False):
        super().__init__(dynamic, img=32, stride=4, n=8)

    def forward(self, x):
        m = self.proj(x).permute(0, 2, 3, 1)
        B, n, C = m.shape[0], self.n, self.dim
        H, W = (m.shape[1], m.shape[2]) if self.dynamic else (self.size, self.size)
        t = m.reshape(B, n, H // n, n, W // n, C).permute(0, 2, 4, 1, 3, 5).reshape(-1, n * n, C)
        t = t + self.grid_attn(t)
        m = t.reshape(B, H // n, W // n, n, n, C).permute(0, 3, 1, 4, 2, 5).reshape(B, H, W, C)
        weights = torch.linspace(0.5, 1.5, m.shape[1] * m.shape[2]).reshape(1, m.shape[1], m.shape[2], 1)
        return self.head((m * weights).mean((1, 2)))


class UnrollNet(nn.Module):
    """Hiera's unroll and reroll with the sizes fixed at init: tokens [B, N, C] put on the 8x8
    grid, 2x2 strides moved into the batch (`[4B, h/2, w/2, C]`), back to `[B, N, C]` in unrolled
    order (`reshape(-1, 64, C)`), a max over the strides (Hiera's pooling in unrolled order) and
    the pooled tokens rolled back onto the `(h/2, w/2)` grid."""

    def __init__(self, dynamic: bool = False, img: int = 32, dim: int = 16):
        super().__init__()
        self.dynamic, self.size = dynamic, img // 4
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 1, dim))  # broadcast over tokens: not size-pinning
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = self.proj(x)
        B, C = m.shape[0], m.shape[1]
        h, w = (m.shape[2], m.shape[3]) if self.dynamic else (self.size, self.size)
        t = m.flatten(2).transpose(1, 2) + self.pos
        u = t.view(B, h, w, C).view(B, h // 2, 2, w // 2, 2, C).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        t = u.reshape(-1, h * w, C)  # [B, N, C], the four strides outermost
        t = t + self.mlp(t)
        t = t.view(B, 4, -1, C).max(dim=1).values  # [B, N/4, C] on the (h/2, w/2) grid
        m = t.view(B, h // 2, w // 2, C)
        weights = torch.linspace(0.5, 1.5, m.shape[1] * m.shape[2]).reshape(1, m.shape[1], m.shape[2], 1)
        return self.head((m * weights).mean((1, 2)))


@pytest.mark.parametrize("cls, other_sizes", [
    (MaxVitLike, [(2, 3, 48, 40), (1, 3, 24, 56)]),
    (GridOnly, [(2, 3, 64, 96), (1, 3, 96, 32)]),
    (UnrollNet, [(2, 3, 48, 40), (1, 3, 24, 56)]),
], ids=["window+grid", "grid-1x1-cells", "unroll-reroll"])
def test_partitions_cured_like_the_dynamic_model(cls, other_sizes):
    """Equal at the example, equal to the dynamic model at sizes with H != W and batch 2 (a
    change taken by the batch, or rows swapped with columns, shows in the output)."""
    model, dynamic = _pair(cls)
    x = torch.randn(1, 3, 32, 32)
    assert mixfx.analyze(model, x).classification == "fixed"
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    assert result.classification_after in ("convolutional", "polymorphic")
    with torch.no_grad():
        ref = model(x)
        assert (result.module(x) - ref).abs().max() <= 1e-6 * ref.abs().max()
        for size in other_sizes:
            y = torch.randn(size)
            want, got = dynamic(y), result.module(y)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), size


class BatchAbsorbing(nn.Module):
    """Tokens regrouped with the example's count written in, `reshape(-1, 64, C)`: at a larger
    size it runs, with the extra tokens turned into extra images."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, 4)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2).reshape(-1, 64, 16)
        return self.head(t.mean(1))


def test_a_size_change_taken_by_the_batch_fails_verification():
    """Running is not enough: an output whose batch grew with the input size is refused."""
    from mixfx.errors import VerificationError
    from mixfx.rewrite import rewrite_polymorphic

    torch.manual_seed(0)
    model = BatchAbsorbing().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape[0] == 6  # the failure mode itself
    with pytest.raises(VerificationError) as info:
        rewrite_polymorphic(model, x, passes=[])
    assert "the size change went into the batch" in info.value.message


class GlobalQueryNet(nn.Module):
    """GCViT's global query: the 16x16 map max-pooled twice (k3 s2 p1) to the 4x4 window grid,
    repeated for every window as the query of the window attention (keys and values from the
    window's 16 tokens). Its dynamic variant pools adaptively to the window grid after the fixed
    chain (the cure's reading: identity at the example, a whole-map summary elsewhere)."""

    def __init__(self, dynamic: bool = False, n: int = 4, dim: int = 16):
        super().__init__()
        self.dynamic, self.n, self.dim = dynamic, n, dim
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.pool2 = nn.MaxPool2d(3, 2, 1)
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = self.proj(x)
        g = self.pool2(self.pool1(m))
        if self.dynamic:
            g = torch.nn.functional.adaptive_max_pool2d(g, (self.n, self.n))
        q = self.norm(g.permute(0, 2, 3, 1))  # [B, n, n, C]
        m = m.permute(0, 2, 3, 1)
        B, H, W, C = m.shape
        n = self.n
        win = m.view(B, H // n, n, W // n, n, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n * n, C)
        N = win.shape[1]
        q = q.repeat_interleave(win.shape[0] // B, dim=0).reshape(win.shape[0], N, C)
        k, v = self.kv(win).chunk(2, dim=-1)
        attn = (q @ k.transpose(-2, -1) * C ** -0.5).softmax(-1)
        win = win + self.out(attn @ v)
        m = win.view(B, H // n, W // n, n, n, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        weights = torch.linspace(0.5, 1.5, H * W).reshape(1, H, W, 1)
        return self.head((m * weights).mean((1, 2)))


def test_global_query_pooled_to_the_window_grid():
    model, dynamic = _pair(GlobalQueryNet)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(RuntimeError):  # fixed: the query has 64 tokens at 64x64, the windows 16
        model(torch.randn(1, 3, 64, 64))
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    assert any("pooled (max, adaptive) to 4x4" in c.after for c in result.changes), result.changes
    assert result.classification_after in ("convolutional", "polymorphic")
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(result.module(x), ref)
        for size in [(2, 3, 64, 96), (1, 3, 48, 40)]:
            y = torch.randn(size)
            want, got = dynamic(y), result.module(y)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), size
