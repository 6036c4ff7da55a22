"""Small models written for the verdict tests (issue 13), one per failure class, and the checks
that give their ground truth without the analyser: real forwards (does it run at this size?) and
a perturbation probe (does changing one corner of the input change the far corner of a map?)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

C = 8


def stem() -> nn.Module:
    return nn.Conv2d(3, C, 3, padding=1)


# ----------------------------------------------------------------------------- attention forms
class LeafAttention(nn.Module):
    """Global softmax attention over all pixels; made an fx leaf by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = (q @ k.transpose(-2, -1) / c ** 0.5).softmax(-1)
        return (a @ v).transpose(1, 2).reshape(b, c, h, w)


def attend(q, k, v):
    """Attention in a function fx does not trace into (torch.fx.wrap)."""
    return torch.softmax(q @ k.transpose(-2, -1), -1) @ v


torch.fx.wrap("attend")


class WrappedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.qkv = nn.Conv2d(C, 3 * C, 1)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        return attend(q, k, v).transpose(1, 2).reshape(b, c, h, w)


class LeafNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.attn = LeafAttention()
        self.out = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.out(self.attn(self.stem(x)))


class SpectralConv(nn.Module):
    """FNO layer: FFT over H, W, keep the lowest modes, weight them, inverse FFT."""

    def __init__(self, modes: int = 4) -> None:
        super().__init__()
        self.modes = modes
        self.weight = nn.Parameter(torch.randn(C, C, modes, modes, dtype=torch.cfloat) / C)

    def forward(self, x):
        f = torch.fft.rfft2(x)
        out = torch.zeros_like(f)
        m = self.modes
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", f[:, :, :m, :m], self.weight)
        return torch.fft.irfft2(out, s=x.shape[-2:])


class FNO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.spectral = SpectralConv()
        self.skip = nn.Conv2d(C, C, 1)

    def forward(self, x):
        x = self.stem(x)
        return F.gelu(self.spectral(x) + self.skip(x))


class LatentCrossAttention(nn.Module):
    """8 learned latents attend to every pixel (nn.MultiheadAttention): the length is the key's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.latents = nn.Parameter(torch.randn(8, C))
        self.xattn = nn.MultiheadAttention(C, 2, batch_first=True)
        self.fc = nn.Linear(8 * C, 10)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        q = self.latents.expand(t.shape[0], -1, -1)
        o, _ = self.xattn(q, t, t)
        return self.fc(o.flatten(1))


class GridAttention(nn.Module):
    """MaxViT-style grid attention: a fixed 4x4 count of positions, an input-dependent stride."""

    def __init__(self, grid: bool = True, g: int = 4) -> None:
        super().__init__()
        self.stem = stem()
        self.grid, self.g = grid, g
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        g = self.g
        if self.grid:  # positions (i*h/g + r): the g x g group is spread over the whole image
            t = x.view(b, c, g, h // g, g, w // g).permute(0, 3, 5, 2, 4, 1).reshape(-1, g * g, c)
        else:  # windows: the g x g group is adjacent
            t = x.view(b, c, h // g, g, w // g, g).permute(0, 2, 4, 3, 5, 1).reshape(-1, g * g, c)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)
        if self.grid:
            return o.view(b, h // g, w // g, g, g, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, h, w)
        return o.view(b, h // g, w // g, g, g, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class PooledAttention(nn.Module):
    """PVT-v2-li style: every pixel attends to a 4x4 adaptive pool of the map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.pool = nn.AdaptiveAvgPool2d(4)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q = self.q(x.flatten(2).transpose(1, 2))
        k, v = self.kv(self.pool(x).flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)


class LinearAttention(nn.Module):
    """ReLU linear attention: k^T v sums over every position, then each query reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.qkv = nn.Conv2d(C, 3 * C, 1)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = F.relu(self.qkv(x)).flatten(2).chunk(3, dim=1)  # b, c, n
        kv = k @ v.transpose(1, 2)  # b, c, c: sums over the n positions
        return (kv.transpose(1, 2) @ q).reshape(b, c, h, w)


class ContextNet(nn.Module):
    """Squeeze-excite gate and GroupNorm: global context, not mixing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.gate = nn.Sequential(nn.Conv2d(C, 4, 1), nn.ReLU(), nn.Conv2d(4, C, 1), nn.Sigmoid())
        self.norm = nn.GroupNorm(2, C)

    def forward(self, x):
        x = self.conv(self.stem(x))
        x = x * self.gate(x.mean((2, 3), keepdim=True))
        return self.norm(x)


class WindowNet(GridAttention):
    def __init__(self) -> None:
        super().__init__(grid=False)


# ----------------------------------------------------------------------------- sizes and heads
class ResizeThenConv(nn.Module):
    """Resizes every input to 24x24 first: runs at any size, but nothing after varies with it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(stem(), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1))
        self.fc = nn.Linear(C, 10)

    def forward(self, x):
        x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
        return self.fc(self.body(x).mean((2, 3)))


class PoolToGridThenConv(nn.Module):
    """Pools every input to a 6x6 grid (nn.AdaptiveAvgPool2d) and goes on convolving the grid:
    a resize to a constant size by pooling, not a head (positions go on being positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.body = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1))
        self.fc = nn.Linear(C, 10)

    def forward(self, x):
        return self.fc(self.body(self.pool(self.stem(x))).mean((2, 3)))


class InputSizeBranch(nn.Module):
    """Halves tall inputs before anything else (`if H > 40`, on the input itself: torch.fx cannot
    trace it); at a 32x48 example the branch is not taken."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()

    def forward(self, x):
        if x.shape[-2] > 40:
            x = F.avg_pool2d(x, 2)
        return self.stem(x)


class SizeBranch(nn.Module):
    """Downsamples only wide inputs: `if W > 48` is an input constraint at a 32x64 example."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.down = nn.Conv2d(C, C, 2, stride=2)

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 48:
            x = self.down(x)
        return x


class Conv1dNet(nn.Module):
    """Conv1d features, MaxPool1d, then flatten into a Linear over a fixed length: the Linear is
    what pins the length, not the pool."""

    def __init__(self, length: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, C, 5, padding=2)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(C * (length // 2), 10)

    def forward(self, x):
        return self.fc(self.pool(F.relu(self.conv(x))).flatten(1))


class BlockDivisible(nn.Module):
    """Needs H and W divisible by 64 (8x8 windows of a stride-8 map): 160x112 and 96x144 fail,
    128x192 runs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, C, 8, stride=8)
        self.mix = nn.Linear(C, C)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        t = x.view(b, c, h // 8, 8, w // 8, 8).permute(0, 2, 4, 3, 5, 1)
        t = self.mix(t.reshape(b, h // 8, w // 8, 64, c).contiguous())
        return t.mean((1, 2, 3))


# ----------------------------------------------------------------------------- ground truth
def runs_at(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """A real forward at `shape` (random input)."""
    try:
        with torch.no_grad():
            model(torch.randn(shape))
        return True
    except Exception:  # noqa: BLE001 - failing is the answer
        return False


def far_end_changes(model: nn.Module, shape: tuple[int, ...], pick: Callable[[torch.Tensor], torch.Tensor]
                    | None = None) -> bool:
    """Perturb the top-left corner of the input; does the bottom-right corner of the output map
    change? (Inputs here are much wider than the models' receptive fields.)"""
    torch.manual_seed(0)
    x = torch.randn(shape)
    y = x.clone()
    y[..., :4, :4] += 5.0
    with torch.no_grad():
        a, b = model(x), model(y)
    if pick is not None:
        a, b = pick(a), pick(b)
    return not torch.allclose(a[..., -4:, -4:], b[..., -4:, -4:], atol=1e-5)


def reach(model: nn.Module, shape: tuple[int, ...]) -> int:
    """How far (in output positions, Chebyshev distance) a change of the input's top-left 4x4
    corner travels in the output map (in float64, so that a change damped by many layers of a
    randomly initialised network still shows above rounding)."""
    import copy

    model = copy.deepcopy(model).double()
    for p in model.parameters():  # .double() leaves complex weights (a spectral layer's) as they were
        if p.is_complex():
            p.data = p.data.to(torch.complex128)
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    y = x.clone()
    y[..., :4, :4] += 5.0
    with torch.no_grad():
        a = model(x)
        diff = (a - model(y)).abs().amax(dim=(0, 1))
        changed = diff > 1e-10 * float(a.abs().max())
    rows, cols = torch.nonzero(changed, as_tuple=True)
    return int(torch.maximum(rows, cols).max()) if len(rows) else 0


def reach_grows(model: nn.Module, small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    """Global: the change travels further on a larger input (a local op's reach is bounded by
    its receptive field, whatever the input size)."""
    return reach(model, big) > reach(model, small)


def far_change_is_per_channel_affine(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Global context (a gate or a norm's statistics) changes the far end only by a per-channel
    scale and shift of what was there; mixing does not."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    y = x.clone()
    y[..., :4, :4] += 5.0
    with torch.no_grad():
        a, b = model(x)[0, :, -8:, -8:], model(y)[0, :, -8:, -8:]
    for ch in range(a.shape[0]):
        u, v = a[ch].flatten(), b[ch].flatten()
        design = torch.stack([u, torch.ones_like(u)], 1)
        coef = torch.linalg.lstsq(design, v[:, None]).solution
        if (design @ coef - v[:, None]).abs().max() > 1e-4:
            return False
    return True


# ----------------------------------------------------------------------------- built-in containers
def conv_stem() -> nn.Module:
    """A stem made only of built-in leaves in a built-in container (every call in it is answered
    by the shape shortcuts; the container itself makes no torch call) that halves the map, so
    that its output's layout cannot be read off its input's shape."""
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(), nn.MaxPool2d(2))


class ModuleGateNet(nn.Module):
    """A legacy squeeze-excite gate: an nn.AdaptiveAvgPool2d(1) module, 1x1 convs and a sigmoid,
    multiplied back onto the map, after a Sequential stem (global context)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_stem()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(C, 4, 1), nn.ReLU(), nn.Conv2d(4, C, 1),
                                  nn.Sigmoid())

    def forward(self, x):
        x = self.conv(self.stem(x))
        return x * self.gate(x)


class PyramidPoolingNet(nn.Module):
    """PSPNet's pyramid pooling: the map pooled to fixed 1x1, 2x2 and 4x4 grids (nn.AdaptiveAvgPool2d
    modules and F.adaptive_max_pool2d), each upsampled back and concatenated: every cell summarises
    a part of the map that grows with the input (global context)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_stem()
        self.levels = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(g), nn.Conv2d(C, 2, 1)) for g in (1, 2))
        self.fuse = nn.Conv2d(C + 6, C, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        size = x.shape[-2:]
        pooled = [F.interpolate(level(x), size=size, mode="bilinear", align_corners=False)
                  for level in self.levels]
        grid = F.interpolate(F.adaptive_max_pool2d(x[:, :2], 4), size=size, mode="nearest")
        return self.fuse(torch.cat([x, *pooled, grid], 1))


class GridPoolClassifier(nn.Module):
    """VGG's classifier: the map pooled to a fixed 2x2 grid and flattened into a Linear. The pool is
    the head (positions stop there), not context."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_stem()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * C, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stem(x)), 1))


class SamePadSENet(nn.Module):
    """TF-"same" padding (F.pad by amounts computed from the size, as timm's Conv2dSame does) in
    front of every conv, and a squeeze-excite gate (global context) after them."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, C, 3, stride=2)
        self.c2 = nn.Conv2d(C, C, 3)
        self.fc = nn.Conv2d(C, C, 1)

    @staticmethod
    def same(x, k: int, s: int):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def forward(self, x):
        x = torch.relu(self.c1(self.same(x, 3, 2)))
        x = self.c2(self.same(x, 3, 1))
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class CrossCovarianceAttention(nn.Module):
    """XCiT's attention: q k^T contracts over the N positions into a C x C map that then mixes
    the channels of every position (global mixing), after a Sequential stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_stem()
        self.qkv = nn.Conv2d(C, 3 * C, 1)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)  # b, c, n
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # b, c, c
        return (attn @ v).reshape(b, c, h, w)


class AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention: per-position scores, normalised over the
    positions, weight a sum of the queries over every position (attention pooling: weights that
    depend on the input, global mixing), multiplied back onto the keys."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.q = nn.Conv2d(C, C, 1)
        self.k = nn.Conv2d(C, C, 1)
        self.w_g = nn.Parameter(torch.randn(C, 1))
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q = F.normalize(self.q(x).flatten(2).transpose(1, 2), dim=-1)  # b, n, c
        k = F.normalize(self.k(x).flatten(2).transpose(1, 2), dim=-1)
        score = F.normalize(q @ self.w_g, dim=1)  # b, n, 1
        g = torch.sum(score * q, dim=1, keepdim=True)  # b, 1, c
        return (self.proj(g * k) + q).transpose(1, 2).reshape(b, c, h, w)


class ResponseNormNet(nn.Module):
    """ConvNeXt-V2's global response norm: the L2 norm of each channel over H, W (`x.norm(p=2,
    dim=(2, 3))`, a reduction whose dims come third), divided by its mean over channels and
    multiplied back onto the map (global context)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_stem()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((1, C, 1, 1), 0.5))

    def forward(self, x):
        x = self.conv(self.stem(x))
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        return x + self.gamma * (x * (g / (g.mean(dim=1, keepdim=True) + 1e-6)))


class SpatialNormalizeNet(nn.Module):
    """Each channel scaled to unit L2 norm over all positions (`F.normalize` over the flattened
    H*W axis): global context by a norm, not mixing."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_stem()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        x = self.conv(self.stem(x))
        return F.normalize(x.flatten(2), dim=-1).view_as(x)


class RowScan(nn.Module):
    """A running sum along W (`cumsum`): each position sees every one to its left, however wide
    the input (global mixing along W only)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.out = nn.Conv2d(C, C, 1)

    def forward(self, x):
        return self.out(self.stem(x).cumsum(-1))


class RowLSTM(nn.Module):
    """An LSTM along each row (ReNet-style): a recurrence over W."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.rnn = nn.LSTM(C, C, batch_first=True)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        rows, _ = self.rnn(x.permute(0, 2, 3, 1).reshape(b * h, w, c))
        return rows.reshape(b, h, w, c).permute(0, 3, 1, 2)


class LearnedSamplingGrid(nn.Module):
    """Samples the map at a learned 12x12 grid (`F.grid_sample` with a parameter grid) and goes on
    convolving: a resize to a constant size, like `interpolate(size=...)`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.grid = nn.Parameter(torch.rand(1, 12, 12, 2) * 2 - 1)
        self.body = nn.Conv2d(C, C, 3, padding=1)
        self.fc = nn.Linear(C, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.grid_sample(x, self.grid.expand(x.shape[0], -1, -1, -1), align_corners=False)
        return self.fc(self.body(x).mean((2, 3)))


class FoldToFixedSize(nn.Module):
    """Blocks of 4x4 (`F.unfold`) folded back onto a map of a fixed 32x48 (`F.fold`): the fold
    pins the number of blocks; its output is still a map of positions (no head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.out = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.out(F.fold(F.unfold(self.stem(x), 4, stride=4), (32, 48), 4, stride=4))


class BatchAbsorbingView(nn.Module):
    """Tokens viewed onto a hard-coded 8x12 grid with the batch as -1: at another size the view
    does not fail, the batch takes the change (2 images out for 1 in at 64x48)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, 4)
        self.fc = nn.Linear(C, 10)

    def forward(self, x):
        return self.fc(self.embed(x).flatten(2).view(-1, C, 8, 12).mean((2, 3)))


class GlobalFilter(nn.Module):
    """GFNet's global filter: rfft2 of the map, times a learned filter of the example's frequency
    grid, irfft2 back. The filter multiply pins the size; the FFT itself runs at any size."""

    def __init__(self, grid: tuple[int, int] = (8, 8)) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, 4)
        self.filter = nn.Parameter(torch.randn(C, grid[0], grid[1] // 2 + 1, 2) * 0.02)
        self.fc = nn.Linear(C, 10)

    def forward(self, x):
        x = self.embed(x)
        spectrum = torch.fft.rfft2(x, norm="ortho") * torch.view_as_complex(self.filter)
        return self.fc(torch.fft.irfft2(spectrum, s=x.shape[-2:], norm="ortho").mean((2, 3)))


class RowsAsFeatures(nn.Module):
    """Averages over W, then a Linear over the 32 rows: H is pinned to 32, W varies freely."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.stem(x).mean(-1)).mean(1)


class StripPoolGate(nn.Module):
    """A gate from the map pooled over H only (`adaptive_avg_pool2d(x, (1, None))`), multiplied
    back: every row sees a summary of its whole column (global context along H)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.gate = nn.Conv2d(C, C, 1)
        self.out = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.out(x * torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, (1, None)))))


class PaddedWindowNet(nn.Module):
    """Swin's padding: the channels-last map padded to a multiple of the 7x7 window, attention
    inside each window, the padding cropped off. At a 28x42 example nothing is padded; at most
    other sizes something is."""

    def __init__(self, window: int = 7) -> None:
        super().__init__()
        self.stem = stem()
        self.qkv = nn.Linear(C, 3 * C)
        self.k = window

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        k = self.k
        x = F.pad(x, (0, 0, 0, (k - w % k) % k, 0, (k - h % k) % k))
        hp, wp = x.shape[1], x.shape[2]
        t = x.view(b, hp // k, k, wp // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)
        q, kk, v = self.qkv(t).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, kk, v)
        o = o.view(b, hp // k, wp // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return o[:, :h, :w].permute(0, 3, 1, 2)


class AxialAttention(nn.Module):
    """Attention along each column (axial attention) with `torch.bmm` in the top-level forward:
    global mixing along H, attributed to the bmm node."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x.permute(0, 3, 2, 1).reshape(b * w, h, c)).chunk(3, dim=-1)
        att = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        return torch.bmm(att, v).reshape(b, w, h, c).permute(0, 3, 2, 1)


class EllipsisChannelAttention(nn.Module):
    """XCiT-style channel attention written with einsum ellipses (`'...cn,...dn->...cd'`): the
    C x C map sums over all positions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()

    def forward(self, x):
        x = self.stem(x)
        t = x.flatten(2)
        att = (torch.einsum("...cn,...dn->...cd", t, t) / t.shape[-1]).softmax(-1)
        return torch.einsum("...cd,...dn->...cn", att, t).view_as(x)


class CenterCropThenConv(nn.Module):
    """Crops a 16x16 center out of any input and convolves it: a resize to a constant size by
    slicing (slices computed from the size)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(stem(), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1))
        self.fc = nn.Linear(C, 10)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = x[..., h // 2 - 8:h // 2 + 8, w // 2 - 8:w // 2 + 8]
        return self.fc(self.body(x).mean((2, 3)))


class SpatialPyramidPooling(nn.Module):
    """SPP-net's head: the map max-pooled to 1x1, 2x2 and 4x4 grids, flattened and concatenated
    into a Linear. Positions stop at the pools: the head, not context."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = stem()
        self.fc = nn.Linear(C * 21, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.cat([F.adaptive_max_pool2d(x, g).flatten(1) for g in (1, 2, 4)], 1))
