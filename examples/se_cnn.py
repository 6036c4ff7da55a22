"""CNN with squeeze-and-excitation blocks (per-block global pooling gates channels).

Expected mixfx verdict: convolutional.  The SE global means are a channel gate
multiplied back onto the full-resolution map, so they are NOT the head.
Rigid node: none.  Head: `pool` (nn.AdaptiveAvgPool2d(1)), then flatten + `fc`.
"""
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 96, 96)


class SEBlock(nn.Module):
    def __init__(self, in_ch, out_ch, stride, reduction=4):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU(inplace=True)
        self.se_reduce = nn.Conv2d(out_ch, out_ch // reduction, 1)
        self.se_act = nn.ReLU(inplace=True)
        self.se_expand = nn.Conv2d(out_ch // reduction, out_ch, 1)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        s = x.mean((2, 3), keepdim=True)
        s = self.se_expand(self.se_act(self.se_reduce(s)))
        return x * torch.sigmoid(s)


class SECNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.blocks = nn.Sequential(
            SEBlock(3, 16, 2),
            SEBlock(16, 32, 2),
            SEBlock(32, 64, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.blocks(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return SECNN().eval()
