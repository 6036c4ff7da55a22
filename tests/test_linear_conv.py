"""LinearToConv and ConvToLinear on small hand-written models, pass by pass."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.fx  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from passes import _fxutil as fu  # noqa: E402
from passes.conv_to_linear import ConvToLinear  # noqa: E402
from passes.layout import LayoutCleanup  # noqa: E402
from passes.linear_to_conv import LinearToConv  # noqa: E402


def run_passes(model, x, *passes, other_sizes=()):
    """Trace, run `passes`, check outputs equal at x and at every shape in other_sizes."""
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    fu.annotate_example_inputs(gm, x)
    results = []
    for p in passes:
        r = p(gm)
        gm = r.graph_module
        results.append(r)
    gm.graph.lint()
    with torch.no_grad():
        for inp in [x] + [torch.randn(s) for s in other_sizes]:
            torch.testing.assert_close(gm(inp), model(inp), atol=1e-5, rtol=1e-4)
    return gm, results


def called(gm, cls):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


class ChannelsLastMLP(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.fc1 = nn.Linear(c, 10)
        self.fc2 = nn.Linear(10, c)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


class Tokens(nn.Module):
    """ViT/Mixer style: stem conv, tokens [B,N,C], channel MLP and token mixing."""

    def __init__(self, c=8, n=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.chan = nn.Linear(c, c)
        self.tok = nn.Linear(n, n)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)  # [B, N, C]
        x = x + self.chan(x)
        x = x + self.tok(x.transpose(1, 2)).transpose(1, 2)  # token mixing
        return self.head(x.mean(1))  # [B, C] -> rank-2 Linear


def test_channels_last_mlp_becomes_conv2d_without_permutes():
    model = ChannelsLastMLP()
    gm, (r1, r2) = run_passes(model, torch.randn(2, 6, 5, 7), LinearToConv(), LayoutCleanup(),
                              other_sizes=[(1, 6, 9, 4)])
    assert called(gm, nn.Linear) == []
    assert called(gm, nn.Conv2d) == ["fc1", "fc2"]  # module paths kept
    shapes = fu.propagate_shapes(gm, [torch.randn(2, 6, 5, 7)])
    assert not [n for n in gm.graph.nodes if fu.permutation_of(n, shapes)]
    assert {c.module for c in r1.changes} == {"fc1", "fc2"}
    assert all(c.pass_name == "linear_to_conv" for c in r1.changes)
    assert r2.changes and r2.notes


def test_weights_are_copied_not_reinitialised():
    model = ChannelsLastMLP().eval()
    gm, _ = run_passes(model, torch.randn(1, 6, 4, 4), LinearToConv())
    conv = gm.get_submodule("fc1")
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    torch.testing.assert_close(conv.weight.reshape(10, 6), model.fc1.weight)
    torch.testing.assert_close(conv.bias, model.fc1.bias)
    assert conv.weight.data_ptr() != model.fc1.weight.data_ptr()  # a copy, not shared storage
    assert isinstance(model.fc1, nn.Linear)  # the original is untouched


def test_tokens_token_mixing_and_head():
    model = Tokens()
    gm, (r1, _) = run_passes(model, torch.randn(2, 3, 6, 8), LinearToConv(), LayoutCleanup())
    assert called(gm, nn.Linear) == []
    assert sorted(called(gm, nn.Conv1d)) == ["chan", "head", "tok"]
    tok = gm.get_submodule("tok")
    assert tok.in_channels == 12 and tok.out_channels == 12  # tokens as channels
    after = {c.module: c.after for c in r1.changes}
    assert "[B,C,1]" in after["head"] and "[B,C,L]" in after["chan"]


def test_functional_linear_with_parameter_weight():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.linear(x.permute(0, 2, 3, 1), self.w, self.b).permute(0, 3, 1, 2)

    gm, (r1, r2) = run_passes(M(), torch.randn(2, 6, 3, 5), LinearToConv(), LayoutCleanup())
    assert len(called(gm, nn.Conv2d)) == 1
    assert not any(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes)
    assert "w" not in dict(gm.named_parameters())  # the old parameter is gone, its copy is in the conv


def test_functional_linear_with_computed_weight_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    gm, (r1,) = run_passes(M(), torch.randn(2, 3, 6), LinearToConv())
    assert not r1.changes and r1.skipped and "computed" in r1.skipped[0].reason


def test_shared_linear_called_at_two_ranks_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).sum() + self.fc(x.mean(1)).sum()

    gm, (r1,) = run_passes(M(), torch.randn(2, 3, 4), LinearToConv())
    assert not r1.changes and len(r1.skipped) == 2 and "different ranks" in r1.skipped[0].reason


def test_conv_to_linear_only_pointwise_convs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(4, 6, 1)
            self.k3 = nn.Conv2d(6, 6, 3, padding=1)
            self.strided = nn.Conv2d(6, 6, 1, stride=2)
            self.padded = nn.Conv2d(6, 6, 1, padding=1)
            self.dw = nn.Conv2d(6, 6, 1, groups=6)
            self.c1 = nn.Conv1d(6, 5, 1)

        def forward(self, x):
            x = self.dw(self.padded(self.strided(self.k3(self.pw(x)))))
            return self.c1(x.flatten(2))

    model = M()
    gm, (r1, r2) = run_passes(model, torch.randn(2, 4, 8, 6), ConvToLinear(), LayoutCleanup(),
                              other_sizes=[(1, 4, 10, 12)])
    assert sorted(called(gm, nn.Linear)) == ["c1", "pw"]
    reasons = {s.module: s.reason for s in r1.skipped}
    assert set(reasons) == {"k3", "strided", "padded", "dw"}
    assert "3x3" in reasons["k3"] and "stride" in reasons["strided"]
    assert "padding" in reasons["padded"] and "groups" in reasons["dw"]
    torch.testing.assert_close(gm.get_submodule("pw").weight, model.pw.weight.reshape(6, 4))


def test_conv_to_linear_then_layout_cancels_between_pointwise_convs():
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 4, 5, 6)
    gm, _ = run_passes(model, x, ConvToLinear(), LayoutCleanup(), other_sizes=[(3, 4, 2, 9)])
    shapes = fu.propagate_shapes(gm, [x])
    assert len([n for n in gm.graph.nodes if fu.permutation_of(n, shapes)]) == 2  # in and out only
    assert called(gm, nn.Linear) == ["0", "3"]


def test_unbatched_conv1d_and_weights():
    model = nn.Sequential(nn.Conv1d(3, 5, 1), nn.GELU(), nn.Conv1d(5, 2, 1))
    gm, _ = run_passes(model, torch.randn(3, 7), ConvToLinear(), LayoutCleanup())
    assert called(gm, nn.Linear) == ["0", "2"]


def test_pass_without_example_input_says_what_to_do():
    gm = torch.fx.symbolic_trace(ChannelsLastMLP())
    with pytest.raises(ValueError, match="annotate_example_inputs"):
        LinearToConv()(gm)
    # ...or the input can be given to the pass itself
    r = LinearToConv(example_inputs=[torch.randn(1, 6, 3, 3)])(gm)
    assert r.modified
