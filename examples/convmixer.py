"""ConvMixer (Trockman & Kolter, "Patches Are All You Need?"): patchify conv,
then blocks of residual depthwise conv + pointwise conv, each with GELU + BN.

Expected mixfx verdict: convolutional.  Rigid node: none.
Head: `pool` (nn.AdaptiveAvgPool2d(1)), then flatten + `head` (nn.Linear).
"""
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 224, 224)


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def convmixer_block(dim, kernel_size=5):
    return nn.Sequential(
        Residual(nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding=kernel_size // 2),
            nn.GELU(),
            nn.BatchNorm2d(dim),
        )),
        nn.Conv2d(dim, dim, 1),
        nn.GELU(),
        nn.BatchNorm2d(dim),
    )


class ConvMixer(nn.Module):
    def __init__(self, dim=32, depth=3, patch_size=8, kernel_size=5, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.stem_act = nn.GELU()
        self.stem_norm = nn.BatchNorm2d(dim)
        self.blocks = nn.Sequential(*[convmixer_block(dim, kernel_size) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem_norm(self.stem_act(self.stem(x)))
        x = self.blocks(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return ConvMixer().eval()
