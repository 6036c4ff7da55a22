"""Small models that index a fixed-size table at positions computed from the input size (issue
13, index bounds): they run up to a size and fail past it, which meta tensors cannot see."""
from __future__ import annotations

import torch
from torch import nn

C = 8


class RelPosAttention(nn.Module):
    """Attention over the whole grid with a relative-position bias read from fixed-length tables
    (MViTv2's `rel_pos_h` / `rel_pos_w`): distances built from `arange` of the grid sides index
    tables of 2*8-1 rows (H) and 2*12-1 rows (W), so the grid runs up to 8 x 12."""

    def __init__(self, rows: int = 8, cols: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.qkv = nn.Conv2d(C, 3 * C, 1)
        self.rel_h = nn.Parameter(torch.randn(2 * rows - 1))
        self.rel_w = nn.Parameter(torch.randn(2 * cols - 1))
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        dist_h = torch.arange(h, device=x.device)[:, None] - torch.arange(h, device=x.device)[None, :] + (h - 1)
        dist_w = torch.arange(w, device=x.device)[:, None] - torch.arange(w, device=x.device)[None, :] + (w - 1)
        bias = self.rel_h[dist_h][:, None, :, None] + self.rel_w[dist_w][None, :, None, :]  # (h, w, h, w)
        attn = (q @ k.transpose(-2, -1) + bias.reshape(h * w, h * w)).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(b, c, h, w)
        return self.head(x.mean((2, 3)))


class RowEmbedding(nn.Module):
    """A conv net that adds a learned embedding per row, read from an `nn.Embedding` of 16 rows
    at `arange(h)`: local, but the map may have at most 16 rows (input height <= 16*4+3)."""

    def __init__(self, rows: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.rows = nn.Embedding(rows, C)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        x = self.stem(x)
        pos = self.rows(torch.arange(x.shape[2], device=x.device))  # (h, C)
        x = self.conv(x + pos.t()[None, :, :, None])
        return self.head(x.mean((2, 3)))


class GatherOwnRows(nn.Module):
    """Reads its own map at `arange`-built positions (every other row, flipped): the index grows
    with the size, and so does what it indexes; no bound."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        x = self.stem(x)
        h = x.shape[2]
        rows = torch.arange(h - 1, -1, -2, device=x.device)
        x = x.index_select(2, rows)
        return self.head(x.mean((2, 3)))


class FlatPositionTable(nn.Module):
    """A table of 128 positions read at `arange(h * w)`: the grid may have at most 128 cells, a
    bound on H and W together."""

    def __init__(self, cells: int = 128) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(cells, C))
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.pos[torch.arange(h * w, device=x.device)]
        return self.head(tokens.mean(1))
