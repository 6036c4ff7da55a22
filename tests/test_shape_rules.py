"""The shape rules agree with torch's own kernels (hypothesis).

A rule replaces an op's fake-tensor dispatch, so a wrong rule would silently change what the
analysis concludes. Each test runs random configurations through the rule and through the real op
on meta tensors, and requires the same output shape and strides, or an error from both.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mixfx.shape_rules import NOT_HANDLED, ShapeOnly, ShapeRules
from mixfx.shapes import propagate_symbolic

SETTINGS = dict(deadline=None, max_examples=60, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _real(fn, *args):
    try:
        return fn(*args), None
    except (RuntimeError, ValueError, IndexError) as exc:
        return None, exc


def _rule_or_error(fn, *args):
    try:
        return fn(*args), None
    except RuntimeError as exc:
        return None, exc


def _assert_same(rule_out, rule_err, real_out, real_err):
    assert rule_out is not NOT_HANDLED
    if real_err is not None or rule_err is not None:
        assert real_err is not None and rule_err is not None, (rule_out, rule_err, real_out, real_err)
        return
    got = rule_out if isinstance(rule_out, (tuple, list)) else [rule_out]
    want = real_out if isinstance(real_out, (tuple, list)) else [real_out]
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    # strides of size-1 dims mean nothing (torch's contiguity and `view` ignore them)
    assert [_strides(t) for t in got] == [_strides(t) for t in want]


def _strides(t):
    return tuple(s for s, n in zip(t.stride(), t.shape) if n != 1)


@settings(**SETTINGS)
@given(kind=st.sampled_from(["max", "avg"]), k=st.integers(1, 5), s=st.integers(1, 4), pad=st.integers(0, 2),
       d=st.integers(1, 2), ceil=st.booleans(), h=st.integers(1, 40), w=st.integers(1, 40))
def test_pool_rule_matches_the_kernel(kind, k, s, pad, d, ceil, h, w):
    if kind == "max":
        mod = nn.MaxPool2d(k, s, pad, d, ceil_mode=ceil)
    else:
        mod = nn.AvgPool2d(k, s, pad, ceil_mode=ceil)
    x = torch.empty(2, 3, h, w, device="meta")
    out, err = _rule_or_error(ShapeRules().module, mod, (x,), {})
    _assert_same(out, err, *_real(mod, x))


@settings(**SETTINGS)
@given(kind=st.sampled_from(["Conv2dSame", "MaxPool2dSame", "AvgPool2dSame"]), k=st.integers(1, 7),
       s=st.integers(1, 4), d=st.integers(1, 3), h=st.integers(1, 50), w=st.integers(1, 50))
def test_timm_same_padding_rule_matches_the_module(kind, k, s, d, h, w):
    pytest.importorskip("timm")
    from timm.layers import pool2d_same
    from timm.layers.conv2d_same import Conv2dSame
    if kind == "Conv2dSame":
        mod = Conv2dSame(3, 5, k, stride=s, dilation=d)
    elif kind == "MaxPool2dSame":
        mod = pool2d_same.MaxPool2dSame(k, stride=s, dilation=d)
    else:
        mod = pool2d_same.AvgPool2dSame(k, stride=s)
    mod = mod.to("meta")
    x = torch.empty(1, 3, h, w, device="meta")
    out, err = _rule_or_error(ShapeRules().module, mod, (x,), {})
    _assert_same(out, err, *_real(mod, x))


@settings(**SETTINGS)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_view_rules_match_the_kernels(shape, data):
    """permute/transpose/flatten/unbind/mean/contiguous, on contiguous and permuted inputs: same
    shapes and strides as torch (a later `.view` must see the real layout)."""
    rank = len(shape)
    x = torch.empty(shape, device="meta")
    if data.draw(st.booleans()):
        x = x.permute(*data.draw(st.permutations(range(rank))))
    rules = ShapeRules()
    op = data.draw(st.sampled_from(["permute", "transpose", "flatten", "unbind", "mean", "contiguous", "view"]))
    if op == "permute":
        dims = data.draw(st.permutations(range(rank)))
        args = (dims,)
    elif op == "transpose":
        args = (data.draw(st.integers(-rank, rank - 1)), data.draw(st.integers(-rank, rank - 1)))
    elif op == "flatten":
        args = tuple(sorted([data.draw(st.integers(0, rank - 1)), data.draw(st.integers(0, rank - 1))]))
    elif op == "unbind":
        args = (data.draw(st.integers(-rank, rank - 1)),)
    elif op == "mean":
        args = (data.draw(st.integers(-rank, rank - 1)), data.draw(st.booleans()))
    elif op == "view":
        args = (-1,)
    else:
        args = ()
    out = rules.method(op, (x, *args), {})
    if out is NOT_HANDLED:  # allowed: flatten/view of a non-contiguous input run normally
        assert op in ("flatten", "view") and not x.is_contiguous()
        return
    _assert_same(out, None, *_real(getattr(x, op), *args))


def test_rules_in_a_symbolic_run_return_shape_only_values_and_keep_guards():
    """In the interpreter, rule outputs are `ShapeOnly` (no fake tensor is built for them), and
    a rule's size check still becomes a constraint: a ceil-mode pool and a stride-2 conv."""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                               nn.MaxPool2d(3, 2, ceil_mode=True), nn.Flatten(2)))
    run = propagate_symbolic(gm, (1, 3, 64, 64))
    assert run.failure is None
    out = run.values[[n.name for n in gm.graph.nodes][-2]]
    assert isinstance(out, ShapeOnly)
    for h, w in [(64, 64), (33, 50), (17, 9)]:
        subs = {run.symbols["H"]: h, run.symbols["W"]: w}
        got = [int(d.node.expr.xreplace(subs)) if isinstance(d, torch.SymInt) else d for d in out.shape]
        want = list(gm(torch.zeros(1, 3, h, w)).shape)
        assert got == want


def test_functional_rules_match_the_kernels():
    x = torch.empty(2, 4, 7, 9, device="meta")
    rules = ShapeRules()
    for fn, args in [(F.gelu, (x,)), (F.softmax, (x, -1)), (torch.flatten, (x, 1)), (torch.permute, (x, (0, 2, 3, 1))),
                     (torch.transpose, (x, 1, 3)), (F.adaptive_avg_pool2d, (x, (1, None))), (F.dropout, (x,))]:
        _assert_same(rules.function(fn, args, {}), None, *_real(fn, *args))


def test_a_pool_rule_minimum_size_is_a_constraint_not_specialisation_noise():
    """`out >= 1` on a pooled size reads like 0/1-specialisation noise (`x >= 1`) but pins a
    minimum input size; the smallest size that runs for real must be the reported one."""
    from mixfx.analysis import analyze

    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.AvgPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 2, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()

    def runs(h):
        try:
            model(torch.zeros(1, 3, h, 64))
            return True
        except RuntimeError:
            return False

    smallest = next(h for h in range(1, 64) if runs(h))
    report = analyze(model, torch.zeros(1, 3, 64, 64))
    assert f"H >= {smallest}" in [str(c) for c in report.constraints]


@settings(**SETTINGS)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_split_stack_index_and_sum_rules_match_the_kernels(shape, data):
    rank = len(shape)
    x = torch.empty(shape, device="meta")
    if data.draw(st.booleans()):
        x = x.permute(*data.draw(st.permutations(range(rank))))
    rules = ShapeRules()
    dim = data.draw(st.integers(-rank, rank - 1))
    op = data.draw(st.sampled_from(["split_int", "split_list", "stack", "index", "sum"]))
    if op == "split_int":
        size = data.draw(st.integers(1, 7))
        out, real = rules.function(torch.split, (x, size, dim), {}), _real(torch.split, x, size, dim)
    elif op == "split_list":
        n = x.shape[dim]
        cut = data.draw(st.integers(0, n))
        sections = [cut, n - cut] if data.draw(st.booleans()) else [cut, n - cut + 1]  # the second one is wrong
        out, real = _rule_or_error(rules.function, torch.split, (x, sections, dim), {}), _real(torch.split, x,
                                                                                                  sections, dim)
        _assert_same(*out, *real)
        return
    elif op == "stack":
        other = x if data.draw(st.booleans()) else torch.empty([s + 1 for s in x.shape], device="meta")
        d = data.draw(st.integers(-rank - 1, rank))
        got = _rule_or_error(rules.function, torch.stack, ([x, other], d), {})
        _assert_same(*got, *_real(torch.stack, [x, other], d))
        return
    elif op == "index":
        items = []
        for n in x.shape:
            kind = data.draw(st.sampled_from(["full", "int", "slice", "none"]))
            if kind == "int":
                items.append(data.draw(st.integers(-n, n - 1)))
            elif kind == "slice":
                items.append(slice(data.draw(st.one_of(st.none(), st.integers(-n, n))),
                                   data.draw(st.one_of(st.none(), st.integers(-n, n))), data.draw(st.integers(1, 3))))
            elif kind == "none":
                items += [None, slice(None)]
            else:
                items.append(slice(None))
        idx = tuple(items[:data.draw(st.integers(0, len(items)))])
        import operator
        out, real = rules.function(operator.getitem, (x, idx), {}), _real(operator.getitem, x, idx)
    else:
        keep = data.draw(st.booleans())
        out, real = rules.method("sum", (x, dim, keep), {}), _real(x.sum, dim, keep)
    _assert_same(out, None, *real)


@settings(**SETTINGS)
@given(k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       h=st.integers(1, 20), padding_mode=st.sampled_from(["int", "same", "valid"]))
def test_functional_conv_rule_matches_the_kernel(k, s, p, d, groups, h, padding_mode):
    x = torch.empty(2, 4, h, h + 3, device="meta")
    w = torch.empty(6, 4 // groups, k, k, device="meta")
    pad = p if padding_mode == "int" else padding_mode
    if pad == "same":
        s = 1
    got = _rule_or_error(ShapeRules().function, F.conv2d, (x, w, None, s, pad, d, groups), {})
    _assert_same(*got, *_real(F.conv2d, x, w, None, s, pad, d, groups))


@pytest.mark.parametrize("mask_shape", [None, (1, 1, 7, 9), (2, 3, 7, 9), (7, 9), (1, 1, 7, 8), (3, 1, 9)])
def test_attention_rule_with_a_mask_matches_the_kernel(mask_shape):
    q, k, v = (torch.empty(2, 3, 7, 16, device="meta"), torch.empty(2, 3, 9, 16, device="meta"),
               torch.empty(2, 3, 9, 5, device="meta"))
    mask = None if mask_shape is None else torch.empty(mask_shape, device="meta")
    got = _rule_or_error(ShapeRules().function, F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask})
    _assert_same(*got, *_real(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
