"""Swin-style model: 4x4 patchify conv, then blocks of attention inside fixed 7x7
windows (no shift) with a learned per-window [heads, 49, 49] bias, plus an MLP.
Expected mixfx verdict: convolutional (attention mixes only within 7x7 windows);
constraints (H/4) % 7 == 0 and (W/4) % 7 == 0, i.e. H % 28 == 0 and W % 28 == 0.
Rigid node: none (the 49x49 bias add has genuinely constant size).
Head: `mean` over (1, 2) of the NHWC map after `norm`, then `head` (nn.Linear).
"""
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 224, 224)
WINDOW = 7


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=WINDOW):
        super().__init__()
        n = window_size * window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_bias = nn.Parameter(torch.zeros(num_heads, n, n))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: [B * num_windows, 49, C]
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + self.attn_bias
        attn = attn.softmax(dim=-1)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size=WINDOW, mlp_ratio=4):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x):  # x: [B, H', W', C]
        B, H, W, C = x.shape
        ws = self.window_size
        shortcut = x
        x = self.norm1(x)
        # window partition -> [B * (H'/ws) * (W'/ws), ws * ws, C]
        x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        x = self.attn(x)
        # window reverse -> [B, H', W', C]
        x = x.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        x = shortcut + x
        x = x + self.mlp(self.norm2(x))
        return x


class SwinWindowed(nn.Module):
    def __init__(self, dim=32, depth=2, num_heads=2, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*[SwinBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)  # [B, C, H/4, W/4]
        x = x.permute(0, 2, 3, 1)  # [B, H/4, W/4, C]
        x = self.blocks(x)
        x = self.norm(x)
        x = x.mean((1, 2))
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return SwinWindowed().eval()
