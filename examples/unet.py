"""Zero-padded U-Net (Ronneberger et al. with 'same' convs): max-pool down, resample up
(nearest, bilinear or a transposed conv), skip concatenations over channels.

Expected mixfx verdict: convolutional, fully convolutional (output [B, 5, H, W]), constraints
H % 16 == 0 and W % 16 == 0; a bounded receptive field, so `mixfx.tile` applies.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 3, 128, 160)


class Block(nn.Module):
    def __init__(self, i: int, o: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o)

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class UNet(nn.Module):
    def __init__(self, c: int = 16, depth: int = 4, up: str = "bilinear", out: int = 2):
        super().__init__()
        self.up = up
        self.downs, self.ups, self.tconvs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        ch, skips = 3, []
        for d in range(depth):
            self.downs.append(Block(ch, c * 2 ** d))
            ch = c * 2 ** d
            skips.append(ch)
        self.mid = Block(ch, 2 * ch)
        ch *= 2
        for d in reversed(range(depth)):
            if up == "tconv":
                self.tconvs.append(nn.ConvTranspose2d(ch, ch, 2, stride=2))
            self.ups.append(Block(ch + skips[d], skips[d]))
            ch = skips[d]
        self.out = nn.Conv2d(ch, out, 1)

    def forward(self, x):
        skips = []
        for block in self.downs:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.mid(x)
        for i, block in enumerate(self.ups):
            x = self.tconvs[i](x) if self.up == "tconv" else F.interpolate(x, scale_factor=2, mode=self.up)
            x = block(torch.cat([x, skips.pop()], 1))
        return self.out(x)


def randomise_norm_statistics(model: nn.Module, mean: float = 0.5) -> nn.Module:
    """Batch-norm statistics away from (0, 1), so that a wrong tile offset shows numerically."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-mean, mean)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return randomise_norm_statistics(UNet(c=8, depth=4, out=5), 0.2)
