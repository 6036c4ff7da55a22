"""MLP-Mixer (Tolstikhin et al.) with timm's module naming, dim 32, depth 2.

Expected mixfx verdict: fixed.  First rigid node: `blocks.0.mlp_tokens.fc1`, an
nn.Linear over the 196 = (H/16)*(W/16) tokens (token mixing pins H*W).
Head: the token `mean` (x.mean(dim=1)) after `norm`, then `head` (nn.Linear).
"""
import torch
import torch.nn as nn

INPUT_SHAPE = (1, 3, 224, 224)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size=16, in_chans=3, dim=32):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x):
        # [B, C, H, W] -> [B, N, dim]; no image-size assert on purpose
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, dim, num_tokens, tokens_hidden, channels_hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp_tokens = Mlp(num_tokens, tokens_hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_hidden)

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp_channels(self.norm2(x))
        return x


class MlpMixer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, dim=32, depth=2, num_classes=10):
        super().__init__()
        num_tokens = (img_size // patch_size) ** 2
        self.stem = PatchEmbed(patch_size, 3, dim)
        self.blocks = nn.Sequential(*[
            MixerBlock(dim, num_tokens, tokens_hidden=dim, channels_hidden=4 * dim)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.blocks(x)
        x = self.norm(x)
        x = x.mean(dim=1)
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MlpMixer().eval()
