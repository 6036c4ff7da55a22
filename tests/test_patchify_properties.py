"""Property tests (hypothesis) for the patchify <-> strided conv passes: any patch size, channel
count, input size, flattening order and token order gives the same outputs after either rewrite."""
from __future__ import annotations

import torch
import torch.fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from passes._fxutil import annotate_example_inputs
from passes.conv_to_patchify import ConvToPatchify
from passes.patchify_to_conv import PatchifyToConv

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Patchify2d(nn.Module):
    """reshape -> permute(tokens..., features...) -> reshape -> Linear, any orders."""

    def __init__(self, c, p, d, feature_order, token_order, grid_out):
        super().__init__()
        self.p, self.feature_order, self.token_order, self.grid_out = p, feature_order, token_order, grid_out
        self.proj = nn.Linear(c * p[0] * p[1], d)

    def forward(self, x):
        B, C, H, W = x.shape
        p1, p2 = self.p
        x = x.reshape(B, C, H // p1, p1, W // p2, p2).permute(0, *self.token_order, *self.feature_order)
        if self.grid_out:  # [B, g, g', C*p1*p2]
            return self.proj(x.flatten(3))
        return self.proj(x.reshape(B, (H // p1) * (W // p2), C * p1 * p2))


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _run(pass_, gm, x):
    annotate_example_inputs(gm, x)
    return pass_(gm)


patch = st.integers(1, 4)


@SETTINGS
@given(c=st.integers(1, 3), p1=patch, p2=patch, gh=st.integers(1, 3), gw=st.integers(1, 3),
       feature_order=st.permutations([1, 3, 5]), token_order=st.permutations([2, 4]), grid_out=st.booleans(),
       batch=st.integers(1, 2))
def test_patchify_to_conv_any_order(c, p1, p2, gh, gw, feature_order, token_order, grid_out, batch):
    torch.manual_seed(0)
    model = Patchify2d(c, (p1, p2), 5, tuple(feature_order), tuple(token_order), grid_out).eval()
    x = torch.randn(batch, c, gh * p1, gw * p2)
    res = _run(PatchifyToConv(), torch.fx.symbolic_trace(model), x)
    if p1 == p2 == 1:  # one pixel per token: a plain Linear, left to linear_to_conv
        assert not res.modified
        return
    # even a 1-wide grid (one patch == the whole example) is told apart from a Linear over whole
    # dims, by probing the chain at a larger size
    assert res.modified, res.skipped
    gm = res.graph_module
    assert not any(isinstance(m, nn.Linear) for m in gm.modules())
    with torch.no_grad():
        for shape in [x.shape, (2, c, (gh + 1) * p1, (gw + 2) * p2)]:
            xi = torch.randn(shape)
            assert _close(model(xi), gm(xi)), shape


@SETTINGS
@given(dims=st.integers(1, 3), c=st.integers(1, 3), data=st.data(), tokens=st.booleans())
def test_conv_to_patchify_any_size(dims, c, data, tokens):
    kernel = tuple(data.draw(st.integers(1, 3 if dims == 3 else 4)) for _ in range(dims))
    if all(k == 1 for k in kernel):
        kernel = (2,) + kernel[1:]
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](c, 4, kernel, kernel, bias=data.draw(st.booleans()))

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = conv

        def forward(self, x):
            y = self.proj(x)
            return y.flatten(2).transpose(1, 2) if tokens else y * 2

    model = Embed().eval()
    sizes = [tuple(data.draw(st.integers(k, 3 * k + 2)) for k in kernel) for _ in range(2)]
    x = torch.randn((1, c) + sizes[0])
    res = _run(ConvToPatchify(), torch.fx.symbolic_trace(model), x)
    assert res.modified
    with torch.no_grad():
        for size in sizes:
            xi = torch.randn((2, c) + size)
            assert _close(model(xi), res.graph_module(xi)), size
        # and back: the patchify form is recognised as a strided conv again
        back = _run(PatchifyToConv(), res.graph_module, x)
        assert back.modified, back.skipped
        for size in sizes:
            xi = torch.randn((2, c) + size)
            assert _close(model(xi), back.graph_module(xi)), size
