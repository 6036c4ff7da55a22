"""`mixfx.rewrite(..., to="polymorphic")` on one small model per cause of fixed resolution.

Ground truth at other sizes is each model's own dynamic variant (`dynamic=True`): the same
weights with the runtime size written by hand in eager code (timm's `resample_abs_pos_embed`,
`F.interpolate`, `F.fold`, views of runtime sizes), never mixfx's output. At the example size the
cured graph must equal the original (max abs err <= 1e-6 * max|ref|)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixfx  # noqa: E402
from mixfx.errors import EXIT_VERIFY, MixfxError  # noqa: E402
from passes.cure import CureRefused  # noqa: E402


class Attention(nn.Module):
    """Single-head self-attention over tokens [B, N, C] (global mixing, any N)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, t, bias=None):
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if bias is not None:
            logits = logits + bias
        return self.out(logits.softmax(-1) @ v)


class TinyViT(nn.Module):
    """Class token + fixed position embedding for a 32x32 input, and an explicit size check."""

    def __init__(self, dynamic: bool = False, img: int = 32, patch: int = 4, dim: int = 16):
        super().__init__()
        self.dynamic, self.img, self.grid = dynamic, img, img // patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        if not self.dynamic:
            torch._assert(x.shape[2] == self.img, "input height must be 32")
            torch._assert(x.shape[3] == self.img, "input width must be 32")
        m = self.proj(x)
        t = m.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        pos = self.pos
        if self.dynamic:
            from timm.layers import resample_abs_pos_embed
            pos = resample_abs_pos_embed(pos, [m.shape[2], m.shape[3]], [self.grid, self.grid], num_prefix_tokens=1)
        t = t + pos
        t = t + self.attn(self.norm(t))
        return self.head(t[:, 0])


class PositionMapCNN(nn.Module):
    """A learned position map [1, C, 16, 16] added to the feature map of a 32x32 input."""

    def __init__(self, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 16, 16))
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        m = self.stem(x)
        pos = self.pos
        if self.dynamic:
            pos = F.interpolate(pos, size=m.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
        m = torch.relu(self.conv(m + pos))
        return self.head(m.mean((2, 3)))


class HardViewNet(nn.Module):
    """Tokens put back on the grid with the example's sizes written in: view(B, 8, 8, C)."""

    def __init__(self, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.proj = nn.Conv2d(3, 16, 4, 4)
        self.mlp = nn.Linear(16, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        m = self.proj(x)
        h, w = (m.shape[2], m.shape[3]) if self.dynamic else (8, 8)
        t = self.mlp(m.flatten(2).transpose(1, 2))
        m = t.view(t.shape[0], h, w, 16).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.conv(m)).mean((2, 3)))


class WindowNet(nn.Module):
    """Swin-style window attention with a relative-position bias table, the map's 16x16 size
    written into the window partition and reverse (a square example: h and w must not mix)."""

    def __init__(self, dynamic: bool = False, ws: int = 4, dim: int = 16):
        super().__init__()
        self.dynamic, self.ws, self.dim = dynamic, ws, dim
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.attn = Attention(dim)
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        m = self.proj(x).permute(0, 2, 3, 1)  # [B, H, W, C]
        B, ws, C = m.shape[0], self.ws, self.dim
        H, W = (m.shape[1], m.shape[2]) if self.dynamic else (16, 16)
        win = m.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        bias = self.table[self.index.reshape(-1)].reshape(ws * ws, ws * ws)
        win = win + self.attn(win, bias)
        m = win.reshape(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        # a position-dependent readout, so that a mix-up of rows and columns shows in the output
        weights = torch.linspace(0.5, 1.5, m.shape[1] * m.shape[2]).reshape(1, m.shape[1], m.shape[2], 1)
        return self.head((m * weights).mean((1, 2)))


class RelPosViT(nn.Module):
    """BEiT-style attention bias: a table of (2g-1)^2 offsets + 3 class-token entries, gathered
    with an index buffer built for the 8x8 grid of a 32x32 input, added to the logits."""

    def __init__(self, dynamic: bool = False, grid: int = 8, dim: int = 16):
        super().__init__()
        self.dynamic, self.grid = dynamic, grid
        self.proj = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.table = nn.Parameter(torch.randn((2 * grid - 1) ** 2 + 3))
        self.register_buffer("index", self.relative_index(grid, grid), persistent=False)
        self.attn = Attention(dim)
        self.head = nn.Linear(dim, 10)

    @staticmethod
    def relative_index(h: int, w: int) -> torch.Tensor:
        """BEiT's index: grid pairs by offset, then cls->token, token->cls, cls->cls."""
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        offsets = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        n, extra = h * w, (2 * h - 1) * (2 * w - 1)
        index = torch.zeros(n + 1, n + 1, dtype=torch.long)
        index[1:, 1:] = offsets
        index[0, 1:], index[1:, 0], index[0, 0] = extra, extra + 1, extra + 2
        return index

    def forward(self, x):
        m = self.proj(x)
        t = torch.cat([self.cls.expand(m.shape[0], -1, -1), m.flatten(2).transpose(1, 2)], dim=1)
        table, index = self.table, self.index
        if self.dynamic:  # the offsets table resized to the runtime grid, the index rebuilt for it
            g, h, w = self.grid, m.shape[2], m.shape[3]
            offsets = table[: (2 * g - 1) ** 2].reshape(1, 1, 2 * g - 1, 2 * g - 1)
            offsets = F.interpolate(offsets, size=(2 * h - 1, 2 * w - 1), mode="bicubic", antialias=True)
            table = torch.cat([offsets.flatten(), table[(2 * g - 1) ** 2:]])
            index = self.relative_index(h, w)
        bias = table[index.reshape(-1)].reshape(index.shape)
        t = t + self.attn(t, bias)
        return self.head(t[:, 0])


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Swin's attention mask [nW, N, N] for an h x w map: -100 between tokens of a window that
    come from different regions of the cyclic shift."""
    regions = torch.zeros(1, h, w, 1)
    label = 0
    for rows in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for cols in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            regions[:, rows, cols, :] = label
            label += 1
    windows = regions.reshape(1, h // ws, ws, w // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    diff = windows[:, None, :] - windows[:, :, None]
    return diff.masked_fill(diff != 0, -100.0)


class ShiftedWindowNet(nn.Module):
    """Shifted-window attention whose mask is a buffer built at construction for the 16x16 map
    (and whose window count 16 is read off that buffer): the runtime mask of the dynamic variant
    is built for the actual map."""

    def __init__(self, dynamic: bool = False, ws: int = 4, shift: int = 2, dim: int = 16):
        super().__init__()
        self.dynamic, self.ws, self.shift = dynamic, ws, shift
        self.proj = nn.Conv2d(3, dim, 2, 2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.register_buffer("mask", shifted_window_mask(16, 16, ws, shift), persistent=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        if not self.dynamic:  # as timm's PatchEmbed (without it the model runs, wrongly, at 64x64)
            torch._assert(x.shape[2] == 32, "expects 32x32")
            torch._assert(x.shape[3] == 32, "expects 32x32")
        m = self.proj(x).permute(0, 2, 3, 1)
        B, H, W, C = m.shape
        ws, n = self.ws, self.ws * self.ws
        s = torch.roll(m, (-self.shift, -self.shift), (1, 2))
        win = s.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C)
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        logits = q @ k.transpose(-2, -1) * C ** -0.5
        mask = shifted_window_mask(H, W, ws, self.shift) if self.dynamic else self.mask
        logits = logits.view(-1, mask.shape[0], n, n) + mask.unsqueeze(0)
        out = logits.view(-1, n, n).softmax(-1) @ v
        out = out.reshape(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        out = torch.roll(out, (self.shift, self.shift), (1, 2)) + m
        weights = torch.linspace(0.5, 1.5, H * W).reshape(1, H, W, 1)
        return self.head((out * weights).mean((1, 2)))


class FoldNet(nn.Module):
    """Patches processed one by one and put back with nn.Fold(output_size=(32, 32))."""

    def __init__(self, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.unfold = nn.Unfold(4, stride=4)
        self.fc = nn.Linear(48, 48)
        self.fold = nn.Fold((32, 32), 4, stride=4)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        p = self.fc(self.unfold(x).transpose(1, 2)).transpose(1, 2)
        y = F.fold(p, x.shape[-2:], 4, stride=4) if self.dynamic else self.fold(p)
        y = torch.relu(self.conv(y + x))
        return self.head((y * torch.arange(y.shape[-1], dtype=y.dtype)).mean((2, 3)))


class CheckedCNN(nn.Module):
    """A plain CNN behind an explicit size check (the only cause)."""

    def __init__(self, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        if not self.dynamic:
            torch._assert(x.shape[2] == 32, "expects 32x32 inputs")  # both dims, as timm's PatchEmbed
            torch._assert(x.shape[3] == 32, "expects 32x32 inputs")
        return self.head(torch.relu(self.conv(x)).amax((2, 3)))


class CoordCNN(nn.Module):
    """CoordConv: a fixed coordinate buffer [1, 2, 32, 32] (linspace -1..1) concatenated to the input."""

    def __init__(self, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        self.register_buffer("coords", torch.stack([ys, xs])[None])
        self.conv = nn.Conv2d(5, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        coords = self.coords
        if self.dynamic:
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, x.shape[2]), torch.linspace(-1, 1, x.shape[3]), indexing="ij")
            coords = torch.stack([ys, xs])[None]
        coords = coords + x.new_zeros(x.shape[0], 1, 1, 1)  # one per batch element
        y = torch.relu(self.conv(torch.cat([x, coords], dim=1)))
        return self.head(y.mean((2, 3)))


class TokenMixer(nn.Module):
    """An MLP-Mixer block: a Linear over the 64 token positions (no cure)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, 4)
        self.tokens = nn.Linear(64, 64)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        t = self.proj(x).flatten(2)  # [B, C, N]
        return self.head((t + self.tokens(t)).mean(-1))


class FlattenHead(nn.Module):
    """A CNN whose 8x8 map is flattened into a fixed-size Linear (`--to fcn`'s case, no cure here)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 4, 4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _pair(cls, seed=0):
    torch.manual_seed(seed)
    model = cls().eval()
    dynamic = cls(dynamic=True).eval()
    dynamic.load_state_dict(model.state_dict())
    return model, dynamic


CASES = [  # (model, the kinds of change expected, example input)
    (TinyViT, {"dropped", "resampled"}, (1, 3, 32, 32)),
    (PositionMapCNN, {"resampled"}, (1, 3, 32, 32)),
    (HardViewNet, {"view"}, (1, 3, 32, 32)),
    (WindowNet, {"reshape"}, (1, 3, 32, 32)),
    (RelPosViT, {"relative-position bias"}, (1, 3, 32, 32)),
    (ShiftedWindowNet, {"per window", "window count"}, (1, 3, 32, 32)),
    (FoldNet, {"fold"}, (1, 3, 32, 32)),
    (CheckedCNN, {"dropped"}, (1, 3, 32, 32)),
    (CoordCNN, {"resampled (linear)"}, (1, 3, 32, 32)),
]
OTHER_SIZES = [(2, 3, 48, 40), (1, 3, 24, 56)]


@pytest.mark.parametrize("cls, kinds, shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_cure_matches_the_dynamic_model(cls, kinds, shape):
    model, dynamic = _pair(cls)
    x = torch.randn(shape)
    before = mixfx.analyze(model, x)
    assert before.classification == "fixed"
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    assert result.classification_before == "fixed"
    assert result.classification_after in ("convolutional", "polymorphic")
    text = " ".join(f"{c.before} {c.after}" for c in result.changes)
    for kind in kinds:
        assert kind in text, text
    with torch.no_grad():
        ref, out = model(x), result.module(x)
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
        for size in OTHER_SIZES:
            y = torch.randn(size)
            want, got = dynamic(y), result.module(y)
            assert got.shape == want.shape
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), size
    ran = [s for s in result.verification.sizes[1:] if s.passed]
    assert len(ran) >= 2 and all(tuple(s.input_shape) != shape for s in ran)


def test_position_table_is_the_parameter_itself_at_the_example_size():
    """Identity at the example grid: the cured graph's output is bit-equal to the original's."""
    model, _ = _pair(TinyViT)
    x = torch.randn(1, 3, 32, 32)
    result = mixfx.rewrite(model, to="polymorphic", example_input=x)
    with torch.no_grad():
        assert torch.equal(model(x), result.module(x))


@pytest.mark.parametrize("cls, node, words", [
    (TokenMixer, "tokens", "token mixing"),
    (FlattenHead, "fc", "--to fcn"),
])
def test_refuses_without_a_cure(cls, node, words):
    torch.manual_seed(0)
    model = cls().eval()
    with pytest.raises(CureRefused) as info:
        mixfx.rewrite(model, to="polymorphic", example_input=torch.randn(1, 3, 32, 32))
    exc = info.value
    assert isinstance(exc, MixfxError) and exc.exit_code == EXIT_VERIFY
    assert [u.module for u in exc.nodes] == [node]
    assert words in exc.message


def test_a_model_that_is_not_fixed_is_returned_unchanged():
    torch.manual_seed(0)
    model = CheckedCNN(dynamic=True).eval()
    result = mixfx.rewrite(model, to="polymorphic", example_input=torch.randn(1, 3, 32, 32))
    assert result.changes == [] and result.classification_before != "fixed"
    assert any("nothing to cure" in n for n in result.notes)
