"""Property tests across the analyser (hypothesis).

1. Random conv/pool networks, with or without a global-pool head, are `convolutional` (fully
   convolutional without a head); the same networks with a rigid layer inserted (flatten + Linear
   over C*H*W, a reshape to tokens + Linear over the token axis, a fixed-size position embedding)
   are `fixed`. The class is known by construction.
2. Random inputs of every rank and size, fed to random networks, never crash with a raw
   traceback: the analyser either returns a report or raises a MixfxError (an exit code and a
   message on the CLI).
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from mixfx.analysis import analyze
from mixfx.errors import MixfxError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                derandomize=True)


class Net(nn.Module):
    def __init__(self, body: nn.Module, rigid: str | None, head: str, c: int, h: int, w: int):
        super().__init__()
        self.body = body
        self.rigid = rigid
        self.head = head
        with torch.no_grad():
            feat = body(torch.zeros(1, 3, h, w))
        _, fc, fh, fw = feat.shape
        if rigid == "flatten_linear":
            self.fc = nn.Linear(fc * fh * fw, 10)
        elif rigid == "token_linear":
            self.fc = nn.Linear(fh * fw, fh * fw)  # Mixer-style token mixing over the positions
        elif rigid == "pos_embed":
            self.pos = nn.Parameter(torch.zeros(1, fc, fh, fw))
        if head == "pool":
            self.cls = nn.Linear(fc, 10)

    def forward(self, x):
        x = self.body(x)
        if self.rigid == "flatten_linear":
            return self.fc(x.flatten(1))
        if self.rigid == "token_linear":
            b, c, h, w = x.shape
            x = self.fc(x.reshape(b, c, h * w)).reshape(b, c, h, w)
        elif self.rigid == "pos_embed":
            x = x + self.pos
        if self.head == "pool":
            return self.cls(x.mean((2, 3)))
        return x


@st.composite
def conv_body(draw, max_layers: int = 5):
    layers: list[nn.Module] = []
    c = 3
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(["conv", "conv", "pool", "act", "bn"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3, 5]))
            stride = draw(st.sampled_from([1, 1, 2]))
            pad = draw(st.integers(0, k // 2))
            out = draw(st.sampled_from([4, 8]))
            groups = draw(st.sampled_from([1, c])) if out % c == 0 else 1
            layers.append(nn.Conv2d(c, out, k, stride=stride, padding=pad, groups=groups))
            c = out
        elif kind == "pool":
            layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(3, 2, 1), nn.MaxPool2d(3, 1, 1)])))
        elif kind == "act":
            layers.append(draw(st.sampled_from([nn.ReLU(), nn.GELU(), nn.SiLU()])))
        else:
            layers.append(nn.BatchNorm2d(c))
    return nn.Sequential(*layers), c


@st.composite
def known_nets(draw):
    body, c = draw(conv_body())
    rigid = draw(st.sampled_from([None, None, "flatten_linear", "token_linear", "pos_embed"]))
    head = "none" if rigid == "flatten_linear" else draw(st.sampled_from(["none", "pool"]))
    h = draw(st.integers(24, 48))
    w = draw(st.integers(24, 48).filter(lambda v: v != h))
    try:
        net = Net(body, rigid, head, c, h, w).eval()
    except RuntimeError:  # the body shrinks this input to nothing: not a case
        assume(False)
    return net, (1, 3, h, w), rigid, head


COUNTS = {"classified": 0, "inputs": 0}


@settings(max_examples=40, **SETTINGS)
@given(known_nets())
def test_classification_known_by_construction(case):
    model, shape, rigid, head = case
    report = analyze(model, torch.randn(shape))
    COUNTS["classified"] += 1
    expected = "fixed" if rigid else "convolutional"
    assert report.classification == expected, (rigid, head, model, report.summary)
    if rigid is None:
        assert report.fully_convolutional == (head == "none"), report.summary
        assert not report.rigid_nodes
    else:
        assert report.rigid_nodes, report.summary


@st.composite
def any_input(draw):
    rank = draw(st.integers(0, 6))
    shape = tuple(draw(st.integers(1, 40)) for _ in range(rank))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.int64]))
    return shape, dtype


@settings(max_examples=60, **SETTINGS)
@given(known_nets(), any_input())
def test_any_input_never_crashes(case, inp):
    model, _, _, _ = case
    shape, dtype = inp
    x = torch.zeros(shape, dtype=dtype)
    COUNTS["inputs"] += 1
    try:
        report = analyze(model, x)
    except MixfxError as exc:
        assert exc.message and exc.exit_code in (2, 3), exc
        return
    assert report.classification in ("convolutional", "polymorphic", "fixed")
