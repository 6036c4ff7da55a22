"""Locality by spatial extent (issue 13): one small model per form of global mixing, global
context and local mixing. The ground truth comes from real forwards (a perturbation of one corner
reaches the far corner, or not; context changes it only by a per-channel scale and shift), never
from the analyser; the analyser must then name the module where the op lives."""
from __future__ import annotations

import pytest
import torch

import mixfx
from verdict_models import (AdditiveAttention, AxialAttention, ContextNet, CrossCovarianceAttention,
                            EllipsisChannelAttention, FNO, GridAttention, GridPoolClassifier, LatentCrossAttention,
                            LeafNet, LinearAttention, ModuleGateNet, PaddedWindowNet, PooledAttention,
                            PyramidPoolingNet, ResponseNormNet, RowLSTM, RowScan, SamePadSENet, SpatialNormalizeNet,
                            StripPoolGate, WindowNet, WrappedAttention, far_change_is_per_channel_affine,
                            far_end_changes, reach_grows)

SHAPE = (1, 3, 32, 48)
WIDE = (1, 3, 24, 32)  # wider than any of these models' local receptive fields (stem 3x3, 4x4 windows)
WIDER = (1, 3, 48, 64)


def _analyse(model, **kw):
    torch.manual_seed(0)
    return mixfx.analyze(model.eval(), torch.randn(SHAPE), **kw)


# (model factory, analyse kwargs, module that holds the mixing op)
GLOBAL_MIXING = {
    "attention_in_fx_leaf": (LeafNet, {"leaves": ("LeafAttention",)}, "attn"),
    "attention_in_wrapped_function": (WrappedAttention, {}, "attend"),
    "fft_spectral_layer": (FNO, {}, "spectral"),
    "grid_attention": (GridAttention, {}, None),
    "attention_over_pooled_tokens": (PooledAttention, {}, None),
    "linear_attention_kTv": (LinearAttention, {}, None),
    "cross_covariance_attention_after_a_sequential_stem": (CrossCovarianceAttention, {}, None),
    "additive_attention_pooling": (AdditiveAttention, {}, None),
    "scan_along_W": (RowScan, {}, None),
    "recurrence_along_W": (RowLSTM, {}, "rnn"),
    "axial_attention_with_bmm": (AxialAttention, {}, None),
    "channel_attention_with_einsum_ellipses": (EllipsisChannelAttention, {}, None),
}


@pytest.mark.parametrize("case", sorted(GLOBAL_MIXING))
def test_global_mixing_is_found_where_it_happens(case):
    factory, kw, module = GLOBAL_MIXING[case]
    torch.manual_seed(0)
    model = factory().eval()
    # ground truth: a change at one corner travels further on a larger input
    assert reach_grows(model, WIDE, WIDER)
    r = _analyse(model, **kw)
    assert r.classification == "polymorphic", r.summary
    assert r.global_mixing, r.summary
    if module is not None:
        assert module in {m.module for m in r.global_mixing}
    else:  # an op of the top-level forward: attributed to its own graph node
        nodes = {n.name: n for n in r.nodes}
        assert all(m.node in nodes for m in r.global_mixing)


def test_cross_attention_from_learned_latents_reads_the_key_length():
    """8 learned queries attend to every pixel: the query length is constant, the key's grows."""
    torch.manual_seed(0)
    model = LatentCrossAttention().eval()
    x = torch.randn(WIDE)
    y = x.clone()
    y[..., :4, :4] += 5.0
    with torch.no_grad():
        base, moved = model(x), model(y)
        # the far corner alone also moves every latent: each one reads all pixels
        z = x.clone()
        z[..., -4:, -4:] += 5.0
        far = model(z)
    assert not torch.allclose(base, moved) and not torch.allclose(base, far)
    r = _analyse(model)
    assert r.classification == "polymorphic", r.summary
    assert [m.module for m in r.global_mixing] == ["xattn"]


def test_window_attention_is_local():
    torch.manual_seed(0)
    model = WindowNet().eval()
    assert not far_end_changes(model, WIDE) and not reach_grows(model, WIDE, WIDER)
    r = _analyse(model)
    assert r.classification == "convolutional", r.summary
    assert r.global_mixing == [] and r.global_context == []


def test_se_gate_and_group_norm_are_global_context_not_mixing():
    torch.manual_seed(0)
    model = ContextNet().eval()
    # ground truth: the far corner changes, but only by a per-channel scale and shift
    assert far_end_changes(model, WIDE) and reach_grows(model, WIDE, WIDER)
    assert far_change_is_per_channel_affine(model, WIDE)
    r = _analyse(model)
    assert r.classification == "convolutional", r.summary
    assert r.global_mixing == []
    ops = {c.op for c in r.global_context}
    assert "GroupNorm" in ops and "mean" in ops, r.global_context
    assert "norm" in {c.module for c in r.global_context}
    d = r.to_dict()
    assert {c["op"] for c in d["global_context"]} == ops
    assert any(n["status"] == "global_context" for n in d["nodes"])


def test_pool_module_gate_after_a_sequential_stem_is_global_context():
    """A legacy SE gate (an AdaptiveAvgPool2d module, not x.mean) behind a built-in container
    whose leaves the shape shortcuts answer: the container must not erase the map's positions."""
    torch.manual_seed(0)
    model = ModuleGateNet().eval()
    assert far_end_changes(model, WIDE) and reach_grows(model, WIDE, WIDER)
    assert far_change_is_per_channel_affine(model, WIDE)
    r = _analyse(model)
    assert r.classification == "convolutional", r.summary
    assert r.global_mixing == []
    assert any(c.module.startswith("gate") for c in r.global_context), r.global_context


def test_pyramid_pooling_to_fixed_grids_is_global_context():
    """Adaptive pools to 1x1, 2x2 and 4x4 grids upsampled back onto the map: the reach of one
    pixel grows with the input (eager ground truth), by fixed weights (context, not mixing)."""
    torch.manual_seed(0)
    model = PyramidPoolingNet().eval()
    assert reach_grows(model, WIDE, WIDER)
    r = _analyse(model)
    assert r.classification == "convolutional", r.summary
    assert r.global_mixing == []
    found = {(c.module, c.op) for c in r.global_context}
    assert any((m or "").startswith("levels.1") for m, _ in found), found  # the 2x2 grid level
    assert any("adaptive_max_pool2d" in op for _, op in found), found  # the 4x4 grid, a function call
    assert not r.tileable


def test_grid_pool_into_the_classifier_is_the_head_not_context():
    torch.manual_seed(0)
    r = _analyse(GridPoolClassifier())
    assert r.classification == "convolutional", r.summary
    assert r.global_context == [] and r.global_mixing == []


@pytest.mark.parametrize("factory, op", [(SamePadSENet, "mean"), (ResponseNormNet, "norm"),
                                         (SpatialNormalizeNet, "normalize")])
def test_summaries_over_positions_applied_back_are_global_context(factory, op):
    """A squeeze-excite gate behind timm's TF-"same" padding (pads computed from the size: the
    padded map keeps its positions; tf_efficientnet_b0's gates were missed), a vector norm over
    H, W (ConvNeXt-V2's GRN; convnextv2_atto was judged local) and F.normalize over the
    positions: per-channel statistics of the whole map, applied back."""
    torch.manual_seed(0)
    model = factory().eval()
    assert far_end_changes(model, WIDE) and far_change_is_per_channel_affine(model, WIDE)
    r = _analyse(model)
    assert r.classification == "convolutional", r.summary
    assert r.global_mixing == []
    assert [c.op for c in r.global_context] == [op], r.global_context


@pytest.mark.parametrize("factory", [RowScan, RowLSTM])
def test_mixing_along_one_axis_is_judged_at_a_size_that_changes_that_axis(factory):
    """At a 16x24 example the largest other size that runs is 32x24: the same W, so a scan along
    W combined as many positions there as at the example and was judged local."""
    torch.manual_seed(0)
    model = factory().eval()
    assert reach_grows(model, WIDE, WIDER)
    r = mixfx.analyze(model, torch.randn(1, 3, 16, 24))
    assert r.classification == "polymorphic", r.summary
    assert r.global_mixing and "W" in r.global_mixing[0].reason, r.global_mixing


def test_a_gate_pooled_along_one_axis_is_global_context():
    """The pooled grid is 1 x W: its size follows the input along W, so its event must pair
    with the one at the other size (keyed without its sizes) to be judged at all."""
    torch.manual_seed(0)
    model = StripPoolGate().eval()
    x = torch.randn(1, 3, 48, 16)
    y = x.clone()
    y[..., :4, :] += 5.0
    with torch.no_grad():  # ground truth: the top rows reach the bottom rows, column by column
        assert not torch.allclose(model(x)[..., -4:, :], model(y)[..., -4:, :])
    r = _analyse(model)
    assert r.classification == "convolutional", r.summary
    assert [c.op for c in r.global_context] == ["adaptive_avg_pool2d"], r.global_context


def test_window_attention_on_a_map_padded_to_the_window_is_local():
    """The padded map's positions go on past the image at the same spacing: the windows split
    from it are 7 positions wide at every size (was judged global: the pad lost the positions at
    sizes that needed one, not at the example)."""
    torch.manual_seed(0)
    model = PaddedWindowNet().eval()
    assert not far_end_changes(model, (1, 3, 24, 40)) and not reach_grows(model, (1, 3, 24, 40), (1, 3, 40, 64))
    r = mixfx.analyze(model, torch.randn(1, 3, 28, 42))
    assert r.classification == "convolutional", r.summary
    assert r.global_mixing == []
    # the two runs the judgement compares: nothing padded at 28x42, W padded at 28x48
    from mixfx.analysis import locality

    first, second = locality.record_ops(model, (1, 3, 28, 42)), locality.record_ops(model, (1, 3, 28, 48))
    windows = [e.extent for e in second.events if e.kind == "mixing"]
    assert windows == [e.extent for e in first.events if e.kind == "mixing"] and set(windows[0]) == {0, 1}
    assert locality.judge(first, second, ["H", "W"]) == []
