"""Small ConvNeXt (timm conv_mlp=False flavour): 4x4 patchify stem + LayerNorm2d,
blocks of depthwise 7x7 conv -> channels-last LayerNorm -> Linear MLP -> layer scale,
two stages with a LayerNorm2d + 2x2 stride-2 conv downsample between them.
Expected mixfx verdict: convolutional (the nn.Linear layers act per pixel on channels).
Rigid node: none.  Head: global average `mean` over (2, 3), then `head_norm` + `head`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 3, 128, 128)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim, ls_init_value=1e-1):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)  # NHWC
        x = self.norm(x)
        x = self.mlp(x)
        x = x.mul(self.gamma)
        x = x.permute(0, 3, 1, 2)  # NCHW
        return x + shortcut


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim, out_dim, depth):
        super().__init__()
        if in_dim != out_dim:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim),
                nn.Conv2d(in_dim, out_dim, 2, stride=2),
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    def __init__(self, dims=(32, 64), depths=(2, 2), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], 4, stride=4),
            LayerNorm2d(dims[0]),
        )
        self.stages = nn.Sequential(
            ConvNeXtStage(dims[0], dims[0], depths[0]),
            ConvNeXtStage(dims[0], dims[1], depths[1]),
        )
        self.head_norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.stages(x)
        x = x.mean((2, 3))
        x = self.head_norm(x)
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return ConvNeXt().eval()
