"""The zoo's independent oracles (bench/oracles.py) on small models whose answers are known by
construction: a size search for fixed vs not, a perturbation probe for local vs global."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from oracles import SizeSearch, candidate_sizes, perturbation_probe, size_search  # noqa: E402


class CNN(nn.Module):
    def __init__(self, se: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.se = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8)) if se else None
        self.c3 = nn.Conv2d(8, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        if self.se is not None:  # squeeze-excite: a mean over all positions gates every position
            x = x * torch.sigmoid(self.se(x.mean((2, 3))))[:, :, None, None]
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


class TokenMixer(nn.Module):
    """MLP-Mixer's token MLP: a Linear over the flattened patches (16 at 32x32)."""

    def __init__(self, tokens: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, 8)
        self.tok = nn.Linear(tokens, tokens)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.stem(x).flatten(2)  # [B, C, N]
        t = t + self.tok(t)
        return self.fc(t.mean(2))


class HybridTokens(nn.Module):
    """R+ViT hybrids: a "same"-padded stride-4 stem (ceil) then an 8x8 patchify (floor) into a
    fixed position table (144 tokens: 12x12 at 384x384)."""

    def __init__(self, dim: int = 4, tokens: int = 144) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, 4, padding=1)  # ceil(H / 4)
        self.patch = nn.Conv2d(dim, dim, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.patch(self.stem(x)).flatten(2).transpose(1, 2) + self.pos
        return self.fc(t.mean(1))


class AxisMixer(nn.Module):
    """Mixes along each image axis with a Linear over its pixels (sMLP-like): H and W are pinned."""

    def __init__(self, h: int = 32, w: int = 32) -> None:
        super().__init__()
        self.along_w = nn.Linear(w, w)
        self.along_h = nn.Linear(h, h)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        x = self.along_w(x)
        x = self.along_h(x.transpose(-1, -2)).transpose(-1, -2)
        return self.fc(x.mean((2, 3)))


class ResampledViT(nn.Module):
    """A ViT whose position embedding is resampled to the runtime grid (timm's dynamic_img_size)."""

    def __init__(self, dim: int = 16, patch: int = 4, grid: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, dim, grid, grid) * 0.1)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x)
        x = x + F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.fc(self.norm(t).mean(1))


class Windowed(nn.Module):
    """A stride-8 stem, then a token MLP inside 7x7 windows: H // 8 and W // 8 must be multiples
    of 7. The sizes a 32-multiple guess tries fail; 56-multiples run. Local (fixed windows)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, 8)
        self.win = nn.Linear(49, 49)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        t = x.view(b, c, h // 7, 7, w // 7, 7).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 7, w // 7, 49)
        t = t + self.win(t)
        x = t.reshape(b, c, h // 7, w // 7, 7, 7).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
        return self.fc(x.mean((2, 3)))


class IndexedTable(nn.Module):
    """Adds rows of a 16-row table indexed by token position, and refuses other heights: wider
    inputs pass a meta forward (meta tensors do not check index bounds) but fail for real."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, 8)
        self.table = nn.Parameter(torch.randn(16, dim))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        if x.shape[-2] != 32 or x.shape[-1] < 32 or 32 < x.shape[-1] < 40:
            raise ValueError("height must be 32, width 32 or at least 40")
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.table[torch.arange(t.shape[1])]
        return self.fc(t.mean(1))


def _oracles(model: nn.Module, shape=(1, 3, 32, 32)):
    torch.manual_seed(0)
    model = model.eval()
    search = size_search(model, shape)
    return search, perturbation_probe(model, shape, search, flop_budget=2e8)  # seconds, not minutes


def test_candidates_never_square_never_one_and_both_sides_of_the_example():
    cands = candidate_sizes((224, 224))
    assert cands and (224, 224) not in cands
    assert all(h != w and h > 1 and w > 1 for h, w in cands)
    assert any(h * w < 224 * 224 for h, w in cands) and any(h * w > 224 * 224 for h, w in cands)
    assert (112, 448) in cands  # the example's pixel count, other shape
    assert any(h % 56 == 0 and w % 56 == 0 and h % 32 and w % 32 for h, w in cands)


def test_cnn_is_not_fixed_and_local():
    search, probe = _oracles(CNN())
    assert search.fixed is False and search.confirmed_real
    assert (33, 35) in search.runs  # no divisibility needed
    assert search.divisors == (1, 1)
    assert probe.verdict == "local", probe.reason
    assert probe.probe_size[-1] >= 2 * probe.rf_estimate
    assert probe.left_changed and probe.right_changed and probe.both_changed == 0


def test_se_cnn_is_global_by_its_context():
    search, probe = _oracles(CNN(se=True))
    assert search.fixed is False
    assert probe.verdict == "global", probe.reason
    assert probe.both_changed > 0


def test_token_mixer_runs_only_at_its_token_count():
    """A Linear over 16 flattened patches accepts every size with 16 patches (16x64 for 32x32):
    fixed by the size search (no tensor varies), which says the runs keep the count of positions."""
    search, probe = _oracles(TokenMixer())
    assert search.runs and search.same_count_only
    assert search.fixed is True  # it runs elsewhere only at the example's count of positions
    assert (16, 64) in search.runs
    # no two widths of one height run: the last tensor that varies (the stem) would not see the
    # token MLP's mixing, so the probe does not judge
    assert probe.verdict == "inconclusive", probe.reason


def test_axis_mixer_is_fixed():
    search, probe = _oracles(AxisMixer())
    assert search.fixed is True
    assert len(search.fails) == len(search.tried)
    assert probe.verdict == "inconclusive"


def test_resampled_vit_is_not_fixed_and_global():
    search, probe = _oracles(ResampledViT())
    assert search.fixed is False
    assert probe.verdict == "global", probe.reason
    assert probe.map_module == "norm"  # the last spatial tensor before the mean over tokens


def test_divisibility_constraint_is_not_a_pin():
    model = Windowed().eval()
    for size in ((80, 48), (96, 128)):  # the example shrunk by 32x64, ~0.75H x 1.125W on 32s
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, *size))
    search, probe = _oracles(model, (1, 3, 112, 112))
    assert search.fixed is False
    assert all((h // 8) % 7 == 0 and (w // 8) % 7 == 0 for h, w in search.runs)
    assert probe.verdict == "local", probe.reason


def test_meta_runs_are_confirmed_by_real_forwards():
    search, _ = _oracles(IndexedTable())
    assert search.meta_runs  # wider inputs pass on the meta device ...
    assert search.refuted  # ... and fail for real (index out of bounds)
    assert search.fixed is True


def test_a_sweep_out_of_time_decides_nothing():
    """No size tried is not 'no other size runs': the verdict stays open."""
    search = size_search(CNN().eval(), (1, 3, 32, 32), time_budget=0.0)
    assert search.stopped_early and not search.runs
    assert search.fixed is None


class Patchify(nn.Module):
    """A stride-8 patchify then a Linear over the 16 patches: a 33x35 input floors to the same
    4x4 grid, and its extra pixels are never read."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 8, 8)
        self.tok = nn.Linear(16, 16)

    def forward(self, x):
        t = self.stem(x).flatten(2)
        return self.tok(t).mean(1)


def test_extra_pixels_that_are_never_read_are_not_another_size():
    search = size_search(Patchify().eval(), (1, 3, 32, 32),
                         candidates=[(33, 35), (34, 38), (36, 33)])  # all on the 4x4 grid
    assert search.meta_runs == [(33, 35), (34, 38), (36, 33)]
    assert all("never reads" in why for why in search.refuted.values())
    assert search.fixed is True


class SaturatedGateCNN(nn.Module):
    """Convs whose activations grow 20x per layer under default batch-norm statistics, then a
    hard-sigmoid gate over the global mean (an effective-SE block): saturated at 0 or 1 unless the
    statistics are those of real data."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 8, 3, 1, 1)
        with torch.no_grad():
            for conv in (self.body[0], self.body[3]):
                conv.weight.mul_(20.0)
            self.fc.weight.mul_(10.0)

    def forward(self, x):
        x = self.body(x)
        x = x * F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return self.out(x).mean((2, 3))


def test_probe_calibrates_norm_statistics_so_a_saturated_gate_shows_its_mixing(monkeypatch):
    import oracles

    search, probe = _oracles(SaturatedGateCNN())
    assert probe.verdict == "global", probe.reason
    # without the calibration the gate sits at 1 and the far end cannot change it
    monkeypatch.setattr(oracles, "calibrate_norm_statistics", lambda model, x: None)
    _, uncalibrated = _oracles(SaturatedGateCNN())
    assert uncalibrated.verdict == "local", uncalibrated.reason


def test_a_token_count_reached_by_two_roundings_is_still_a_fixed_count():
    """ceil(H/4) then floor(/8): 385x387 (the same 12x12 grid) and 189x770 (6x24) both keep the
    144 tokens (eager runs), where one rounding at stride 32 reads 189x770 as 5x24 or 6x25: the
    registry's size search read vit_tiny_r_s16_p8_384 as not fixed from exactly these runs."""
    model = HybridTokens().eval()
    runs = [(385, 387), (189, 770), (192, 768)]
    with torch.no_grad():
        for h, w in runs:
            model(torch.zeros(1, 3, h, w))  # runs: 144 tokens
        with pytest.raises(RuntimeError):
            model(torch.zeros(1, 3, 416, 384))  # 13x12 tokens
    search = SizeSearch(example=(384, 384), runs=runs)
    assert search.same_count_only and search.fixed is True
