"""Regressions found by the zoo run (bench/zoo.py) on timm models, reproduced on small models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixfx


class GlobalSDPA(nn.Module):
    """Conv stem, then attention over every token with F.scaled_dot_product_attention."""

    def __init__(self, window: int | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.qkv = nn.Linear(16, 48)
        self.window = window
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        b, c, h, w = x.shape
        if self.window:  # (b * windows, window*window, c): attention inside fixed windows
            k = self.window
            x = x.view(b, c, h // k, k, w // k, k).permute(0, 2, 4, 3, 5, 1).reshape(-1, k * k, c)
        else:
            x = x.flatten(2).transpose(1, 2)
        q, kk, v = self.qkv(x).chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q.unsqueeze(1), kk.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return self.head(x.mean(1))


def test_sdpa_over_all_tokens_is_global_mixing():
    rep = mixfx.analyze(GlobalSDPA(), input_shape=(1, 3, 64, 64))
    assert rep.classification == "polymorphic"
    assert [m.op for m in rep.global_mixing] == ["scaled_dot_product_attention"]


def test_sdpa_inside_fixed_windows_is_local():
    rep = mixfx.analyze(GlobalSDPA(window=4), input_shape=(1, 3, 64, 64))
    assert rep.classification == "convolutional", rep.summary
    assert rep.global_mixing == []


class OptionalMask(nn.Module):
    """`if mask is not None:` — fx takes the branch when `mask` is a Proxy (timm's Hiera)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, mask=None):
        x = self.conv(x)
        if mask is not None:
            x = x * mask.view(x.shape[0], 1, *x.shape[2:])
        return x.mean((2, 3))


def test_optional_none_argument_is_traced_as_none():
    rep = mixfx.analyze(OptionalMask(), input_shape=(1, 3, 32, 32))
    assert rep.tracer == "fx"
    assert rep.classification == "convolutional"
    assert any("mask=None" in note for note in rep.notes)


class PosEmbedAfterGuard(nn.Module):
    """A position embedding behind a reshape whose guard only the example size meets: the probe
    sizes must still differ from the example (they used to be the example itself, which 'refuted'
    the rigid node, as on timm's convit/coat/volo)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 16, 16)
        self.pos = nn.Parameter(torch.zeros(1, 8, 14, 14))

    def forward(self, x):
        x = self.proj(x)
        x = x.reshape(x.shape[0], 8, 196).reshape(x.shape[0], 8, 14, 14)
        return (x + self.pos).mean((2, 3))


def test_probe_sizes_never_equal_the_example():
    rep = mixfx.analyze(PosEmbedAfterGuard(), input_shape=(1, 3, 224, 224))
    assert rep.classification == "fixed"
    probes = [c.input_shape for c in rep.concrete_checks[1:]]
    assert probes and all(p != [1, 3, 224, 224] for p in probes)
    assert all(not c.ok for c in rep.concrete_checks[1:])


@torch.fx.wrap
def relative_bias(attn: torch.Tensor, table: torch.Tensor, size: int) -> torch.Tensor:
    """Indexes a fixed-size table with positions computed from the size (MViTv2's cal_rel_pos_type)."""
    dist = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return attn + table[dist].sum(-1).mean()


class PositionTable(nn.Module):
    def __init__(self, grid: int = 14):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 16, 16)
        self.table = nn.Parameter(torch.zeros(2 * grid - 1, 4))

    def forward(self, x):
        x = self.proj(x)
        return relative_bias(x, self.table, x.shape[2]).mean((2, 3))


def test_value_probe_finds_a_table_indexed_past_its_end():
    """Issue 13 changed the verdict: the model runs at smaller sizes (the table covers them), so
    it is not fixed; the larger probe still fails, in a real forward (meta tensors do not check
    index bounds)."""
    model = PositionTable()
    with torch.no_grad():
        model(torch.randn(1, 3, 160, 240))  # ground truth: a smaller height runs
        with pytest.raises(IndexError):
            model(torch.randn(1, 3, 288, 192))
    rep = mixfx.analyze(model, input_shape=(1, 3, 224, 224))
    assert rep.classification != "fixed"
    assert any(not c.ok and c.input_shape[2] > 224 and "IndexError" in (c.error or "") for c in rep.concrete_checks)


class RowLSTM(nn.Module):
    """Sequencer-style: an LSTM along every row of the feature map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.rnn = nn.LSTM(8, 6, batch_first=True, bidirectional=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        y, _ = self.rnn(x.reshape(b * h, w, c))
        return self.head(y.reshape(b, h, w, -1).mean((1, 2)))


def test_rnn_along_rows_is_global_mixing_with_the_rnn_shape_rule():
    rep = mixfx.analyze(RowLSTM(), input_shape=(1, 3, 64, 96))
    assert rep.classification == "polymorphic"
    assert [m.op for m in rep.global_mixing] == ["LSTM"]
    assert "over W" in rep.global_mixing[0].reason  # along the rows: the extent in W grows
    out = {n.name: n.shape for n in rep.nodes}["rnn"]
    assert out.startswith("([H//4, W//4, 12], [2, H//4, 6], [2, H//4, 6])"), out


def test_rewrite_traces_optional_none_arguments_as_none():
    model = OptionalMask().eval()
    res = mixfx.rewrite(model, to="linear", example_input=torch.randn(1, 3, 16, 16), analyze=False)
    assert res.verification.passed


def test_zero_output_verification_is_flagged_as_proving_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    nn.init.zeros_(model[3].weight)
    nn.init.zeros_(model[3].bias)  # timm-style zero-initialised head
    res = mixfx.rewrite(model, to="conv", example_input=torch.randn(1, 3, 16, 16), analyze=False)
    # the check is made on copies with the zero head drawn at random: it proves something, so it passes
    assert res.verification.passed and not res.verification.degenerate
    assert res.verification.randomised == ["3.weight", "3.bias"]
    assert res.verification.sizes[0].ref_scale > 0.01
    assert any("drawn at random" in note for note in res.notes)
    nn.init.normal_(model[3].weight)
    res = mixfx.rewrite(model, to="conv", example_input=torch.randn(1, 3, 16, 16), analyze=False)
    assert res.verification.passed and not res.verification.degenerate


class ElementwiseLinear(nn.Module):
    """The same affine map as `linear`, summed in another order: equal up to rounding."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return (x.unsqueeze(-2) * self.linear.weight).sum(-1) + self.linear.bias


def test_float32_rounding_is_rechecked_in_float64_and_real_errors_still_fail():
    from mixfx.verify import verify

    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    x = torch.randn(2, 256)
    # zero tolerance: float32 fails on rounding alone, float64 shows the maps are equal
    v = verify(linear, ElementwiseLinear(linear), x, atol=0.0, rtol=0.0)
    assert not all(c.passed for c in v.sizes) and v.float64_sizes
    assert v.passed and v.float64_sizes[0].max_rel_err < 1e-12
    # a real error (one weight off by 1e-4 of the scale) fails in both
    wrong = nn.Linear(256, 64)
    with torch.no_grad():
        wrong.weight.copy_(linear.weight)
        wrong.bias.copy_(linear.bias)
        wrong.weight[0, 0] += 1e-4 * linear.weight.abs().max()
    v = verify(linear, wrong, x, atol=0.0, rtol=0.0)
    assert not v.passed and v.float64_sizes and not v.float64_sizes[0].passed


def test_symbolic_budget_counts_cpu_time_not_waiting():
    """The budget is CPU time: a run that is only waiting (a busy machine, a parallel job) is
    not cut short, so the report does not depend on the load."""
    import time

    import pytest

    from mixfx.shapes import SymbolicBudgetExceeded, time_budget

    with time_budget(0.2):
        time.sleep(0.5)  # no CPU used: no stop
    t0 = time.process_time()
    with pytest.raises(SymbolicBudgetExceeded, match="CPU-second budget"):
        with time_budget(0.2):
            while time.process_time() - t0 < 5:
                pass
    assert time.process_time() - t0 < 1


class CachedBias(nn.Module):
    """timm's EfficientFormerV2 attention: in eval mode the bias gathered from a table is cached
    per device in a plain dict attribute, filled inside forward()."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.table = nn.Parameter(torch.randn(8, 4))
        self.cache: dict = {}

    def bias(self, device):
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.table[:, :1].reshape(1, 8, 1, 1)
        return self.cache[key]

    def forward(self, x):
        return self.conv(x) + self.bias(x.device)


def test_a_model_that_caches_in_forward_analyses_twice():
    """The first trace left a Proxy in the cache, and the second trace's graph referenced a node
    of the first (efficientformerv2_s0 analysed twice in one process raised a TraceError)."""
    torch.manual_seed(0)
    model = CachedBias().eval()
    x = torch.randn(1, 3, 16, 20)
    with torch.no_grad():
        expected = model(x)
    first = mixfx.analyze(model, x)
    second = mixfx.analyze(model, x)
    assert first.tracer == second.tracer == "fx"
    assert first.classification == second.classification == "convolutional"
    assert not any(isinstance(v, torch.fx.Proxy) for v in model.cache.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
