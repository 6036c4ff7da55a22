"""Property tests: random stacks of Linear, 1x1/3x3 convs, permutes, activations, LayerNorm (module
and functional), parameter scales and residual adds rewrite with equal outputs, in both
directions, and survive a round trip."""
from __future__ import annotations

import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from mixfx.rewrite import rewrite  # noqa: E402
from passes.conv_to_linear import why_not_pointwise  # noqa: E402

SIZES = st.integers(2, 5)
BASIC = st.one_of(
    st.tuples(st.just("linear"), SIZES),
    st.tuples(st.just("conv1x1"), SIZES),
    st.tuples(st.just("conv3x3"), SIZES),
    st.tuples(st.just("permute"), st.integers(0, 23)),
    st.tuples(st.just("act"), st.sampled_from(["gelu", "relu", "gelu_fn", "relu_fn", "dropout", "silu_method"])),
    st.tuples(st.just("ln"), st.booleans()),
    st.tuples(st.just("scale"), st.booleans()),
    st.tuples(st.just("add_scalar"), st.floats(-2, 2)),
)
OPS = st.lists(
    st.one_of(BASIC, BASIC, st.tuples(st.just("residual"), st.lists(BASIC, min_size=1, max_size=4)),
              st.tuples(st.just("tokens"), st.just(0))),
    min_size=1, max_size=7)


class Stack(nn.Module):
    """Interprets a list of abstract ops; sizes are simulated at build time."""

    def __init__(self, ops, in_shape):
        super().__init__()
        self.mods = nn.ModuleList()
        self.params = nn.ParameterList()
        self.shape = list(in_shape)
        self.lay = list(range(len(in_shape)))  # current dim -> logical dim id
        self.plan = self._build(ops, top=True)

    def _mod(self, m):
        self.mods.append(m)
        return ("mod", len(self.mods) - 1)

    def _conv(self, cin, cout, k):
        rank = len(self.shape)
        cls = nn.Conv1d if rank == 3 else nn.Conv2d
        return cls(cin, cout, k, padding=k // 2)

    def _permute(self, perm):
        self.shape = [self.shape[d] for d in perm]
        self.lay = [self.lay[d] for d in perm]
        return ("permute", tuple(perm))

    def _build(self, ops, top):
        plan = []
        for op in ops:
            kind = op[0]
            rank = len(self.shape)
            if kind == "linear":
                plan.append(self._mod(nn.Linear(self.shape[-1], op[1])))
                self.shape[-1] = op[1]
            elif kind in ("conv1x1", "conv3x3"):
                plan.append(self._mod(self._conv(self.shape[1], op[1], 1 if kind == "conv1x1" else 3)))
                self.shape[1] = op[1]
            elif kind == "permute":
                perms = list(itertools.permutations(range(1, rank)))
                plan.append(self._permute((0,) + perms[op[1] % len(perms)]))
            elif kind == "act":
                if op[1] == "gelu":
                    plan.append(self._mod(nn.GELU()))
                elif op[1] == "relu":
                    plan.append(self._mod(nn.ReLU()))
                elif op[1] == "dropout":
                    plan.append(self._mod(nn.Dropout(0.5)))
                else:
                    plan.append((op[1],))
            elif kind == "ln":
                if op[1]:
                    plan.append(self._mod(nn.LayerNorm(self.shape[-1])))
                else:
                    self.params.append(nn.Parameter(torch.randn(self.shape[-1])))
                    self.params.append(nn.Parameter(torch.randn(self.shape[-1])))
                    plan.append(("fln", len(self.params) - 2, self.shape[-1]))
            elif kind == "scale":
                shape = [self.shape[-1]] if op[1] else [self.shape[1]] + [1] * (rank - 2)
                self.params.append(nn.Parameter(torch.randn(shape)))
                plan.append(("mul", len(self.params) - 1))
            elif kind == "add_scalar":
                plan.append(("add_scalar", float(op[1])))
            elif kind == "tokens":
                if top and rank == 4:
                    plan.append(("tokens",))
                    self.shape = [self.shape[0], self.shape[2] * self.shape[3], self.shape[1]]
                    self.lay = [self.lay[0], 99, self.lay[1]]
            elif kind == "residual":
                entry_shape = dict(zip(self.lay, self.shape))
                entry_lay = list(self.lay)
                sub = self._build(op[1], top=False)
                # restore every logical dim's size with a Linear over it, then the layout
                for logical, size in entry_shape.items():
                    j = self.lay.index(logical)
                    if self.shape[j] != size:
                        if j != len(self.shape) - 1:
                            sub.append(self._permute([d for d in range(len(self.shape)) if d != j] + [j]))
                        sub.append(self._mod(nn.Linear(self.shape[-1], size)))
                        self.shape[-1] = size
                back = [self.lay.index(logical) for logical in entry_lay]
                if back != list(range(len(back))):
                    sub.append(self._permute(back))
                plan.append(("residual", sub))
        return plan

    def _run(self, plan, x):
        for step in plan:
            kind = step[0]
            if kind == "mod":
                x = self.mods[step[1]](x)
            elif kind == "permute":
                x = x.permute(*step[1])
            elif kind == "gelu_fn":
                x = F.gelu(x)
            elif kind == "relu_fn":
                x = torch.relu(x)
            elif kind == "silu_method":
                x = F.silu(x).contiguous()
            elif kind == "fln":
                x = F.layer_norm(x, (step[2],), self.params[step[1]], self.params[step[1] + 1])
            elif kind == "mul":
                x = x * self.params[step[1]]
            elif kind == "add_scalar":
                x = x + step[1]
            elif kind == "tokens":
                x = x.flatten(2).transpose(1, 2)
            elif kind == "residual":
                x = x + self._run(step[1], x)
        return x

    def forward(self, x):
        return self._run(self.plan, x)


def _build(ops, h, w):
    torch.manual_seed(0)
    model = Stack(ops, (2, 3, h, w)).eval()
    x = torch.randn(2, 3, h, w)
    return model, x


def _check(model, x, to):
    with torch.no_grad():
        ref = model(x)
    res = rewrite(model, to, x, analyze=False, verify_sizes=())
    with torch.no_grad():
        out = res.module(x)
    assert res.verification.passed, res.verification.summary()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4), (out - ref).abs().max()
    return res


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(max_examples=100, **SETTINGS)
@given(ops=OPS, h=st.integers(3, 4), w=st.integers(5, 6))
def test_random_stacks_to_conv(ops, h, w):
    model, x = _build(ops, h, w)
    res = _check(model, x, "conv")
    gm = res.module
    left = [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    assert not left, f"Linear left after --to conv: {left}"


@settings(max_examples=100, **SETTINGS)
@given(ops=OPS, h=st.integers(3, 4), w=st.integers(5, 6))
def test_random_stacks_to_linear(ops, h, w):
    model, x = _build(ops, h, w)
    res = _check(model, x, "linear")
    gm = res.module
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                assert why_not_pointwise(mod) is not None, f"1x1 conv left after --to linear: {n.target}"


@settings(max_examples=40, **SETTINGS)
@given(ops=OPS, h=st.integers(3, 4), w=st.integers(5, 6))
def test_random_stacks_round_trip(ops, h, w):
    model, x = _build(ops, h, w)
    conv = _check(model, x, "conv").module
    back = rewrite(conv, "linear", x, analyze=False, verify_sizes=()).module
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5, rtol=1e-4)
    # every Linear of the original is a Linear again, at the same path
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            assert isinstance(back.get_submodule(name), nn.Linear), name
