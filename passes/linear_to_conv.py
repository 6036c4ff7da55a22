"""Linear -> 1x1 convolution.

A Linear acts on the last dim, a 1x1 conv on dim 1. Each `nn.Linear` (and `F.linear` whose weight
is a parameter) is replaced by `permute(last -> 1) -> 1x1 conv -> permute(back)`:

- input `[B, H, W, C]` (channels-last map)  -> `Conv2d` on `[B, C, H, W]`
- input `[B, N, C]` (tokens, or `[B, C, N]` for token mixing) -> `Conv1d` on `[B, C, N]`; a
  token tensor is a flattened map, and a 1x1 `Conv1d` on `[B, C, H*W]` is exactly a 1x1 `Conv2d`
  on `[B, C, H, W]` flattened, so the cheaper-to-express `Conv1d` is used. Token mixing (a Linear
  over the token dim of `[B, C, N]`) becomes a 1x1 conv with the tokens as channels.
- input `[B, C]` -> `unsqueeze(-1) -> Conv1d -> squeeze(-1)` (a 1x1 conv on a length-1 signal)
- rank 5 -> `Conv3d`; rank 1 or above 5 is skipped.

The wrapping permutes are left for the layout pass (`passes.layout`) to cancel. The permute back
gives the Linear's values but not its contiguous memory layout: a later `x.view(...)` that no
longer fits the strides becomes `x.reshape(...)` (same values; the notes say which). Weights and biases
are copied, never re-initialised; a module keeps its path (`blocks.0.mlp.fc1` stays
`blocks.0.mlp.fc1`, now a conv), so analysis results can be compared before and after.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from passes import _fxutil as fu
from passes.base import Change, RewritePass, RewritePassResult, Skip

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_from_linear(weight: torch.Tensor, bias: torch.Tensor | None, spatial: int) -> nn.Module:
    """A 1x1 `Conv{spatial}d` computing the same map as `F.linear(., weight, bias)` on dim 1."""
    out_f, in_f = weight.shape
    conv = _CONV[spatial](in_f, out_f, 1, bias=bias is not None, device="meta", dtype=weight.dtype)
    conv.weight = nn.Parameter(weight.detach().clone().reshape(out_f, in_f, *([1] * spatial)),
                               requires_grad=weight.requires_grad)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return conv


def _is_plain_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


class LinearToConv(RewritePass):
    """Every Linear becomes a 1x1 conv wrapped in permutes; `passes.layout` removes the permutes."""

    name = "linear_to_conv"

    def __init__(self, example_inputs=None):
        super().__init__()
        self.example_inputs = example_inputs

    def call(self, gm: GraphModule) -> RewritePassResult:
        shapes = fu.propagate_shapes(gm, self.example_inputs)
        changes: list[Change] = []
        skipped: list[Skip] = []
        outs: list[Node] = []  # the values now computed in another memory layout

        # nn.Linear modules: all calls of one module must see the same rank (one conv replaces it).
        by_target: dict[str, list[Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(fu.module_of(gm, node), nn.Linear):
                by_target[node.target].append(node)
        get_attr_targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target, nodes in by_target.items():
            mod = gm.get_submodule(target)
            reason = None
            if not _is_plain_linear(mod):
                reason = f"{type(mod).__name__} overrides Linear.forward"
            elif any(t.startswith(target + ".") for t in get_attr_targets):
                reason = "its weight is also read elsewhere in the graph (tied weights)"
            ranks = {len(shapes[n.args[0]]) for n in nodes if isinstance(n.args[0], Node) and n.args[0] in shapes}
            if reason is None and len(ranks) != 1:
                reason = ("input shape unknown" if not ranks else
                          f"the module is called on inputs of different ranks {sorted(ranks)}")
            rank = next(iter(ranks)) if len(ranks) == 1 else None
            if reason is None:
                reason = _rank_problem(rank)
            if reason is not None:
                skipped += [Skip(self.name, n.name, target, reason) for n in nodes]
                continue
            conv = conv_from_linear(mod.weight, mod.bias, _spatial(rank))
            fu.set_module(gm, target, conv)
            for node in nodes:
                x = node.args[0]
                outs.append(_wrap(gm, node, rank, lambda g, inp, t=target: g.call_module(t, (inp,)), shapes))
                changes.append(Change(self.name, node.name, target, repr(mod),
                                      f"{_conv_repr(conv)} on {_layout(rank)} (input {fu.short_shape(shapes[x])})"))

        # F.linear(x, weight_param, bias_param)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not F.linear:
                continue
            x = node.args[0]
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            reason = None
            if not (isinstance(w, Node) and w.op == "get_attr"):
                reason = "the weight is computed, not a parameter"
            elif b is not None and not (isinstance(b, Node) and b.op == "get_attr"):
                reason = "the bias is computed, not a parameter"
            elif sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == w.target) > 1 or len(w.users) > 1:
                reason = "its weight is also read elsewhere in the graph (tied weights)"
            rank = len(shapes[x]) if isinstance(x, Node) and x in shapes else None
            if reason is None:
                reason = _rank_problem(rank) if rank is not None else "input shape unknown"
            if reason is not None:
                skipped.append(Skip(self.name, node.name, None, reason))
                continue
            weight = fu.fetch_attr(gm, w.target)
            bias = fu.fetch_attr(gm, b.target) if b is not None else None
            conv = conv_from_linear(weight, bias, _spatial(rank))
            path = fu.fresh_path(gm, w.target.rsplit(".", 1)[0] + "_conv" if "." in w.target else w.target + "_conv")
            gm.add_submodule(path, conv)
            outs.append(_wrap(gm, node, rank, lambda g, inp, t=path: g.call_module(t, (inp,)), shapes))
            for attr in (w, b):
                if attr is not None and not attr.users:
                    gm.graph.erase_node(attr)
            changes.append(Change(self.name, node.name, path, f"F.linear(weight={w.target} {tuple(weight.shape)})",
                                  f"{_conv_repr(conv)} on {_layout(rank)} (input {fu.short_shape(shapes[x])})"))

        notes: list[str] = []
        if changes:
            fu.prune_unused(gm)
            gm.graph.lint()
            gm.recompile()
            # permute -> conv -> permute back: same values, not the same strides as the Linear's
            notes += fu.views_note(self.name, fu.reshape_where_view_fails(gm, outs, self.example_inputs))
        return RewritePassResult(gm, bool(changes), changes, skipped, notes)


def _rank_problem(rank: int | None) -> str | None:
    if rank is None:
        return "input shape unknown"
    if rank < 2:
        return f"input of rank {rank} (no batch dim) has no channel dim to convolve"
    if rank > 5:
        return f"input of rank {rank}: no 1x1 conv of that many spatial dims"
    return None


def _spatial(rank: int) -> int:
    return 1 if rank == 2 else rank - 2


def _layout(rank: int) -> str:
    return {2: "[B,C,1]", 3: "[B,C,L]", 4: "[B,C,H,W]", 5: "[B,C,D,H,W]"}[rank]


def _conv_repr(conv: nn.Module) -> str:
    return f"{type(conv).__name__}({conv.in_channels}, {conv.out_channels}, 1x1, bias={conv.bias is not None})"


def _wrap(gm: GraphModule, node: Node, rank: int, make_conv, shapes: dict) -> Node:
    """Replace `node` (a Linear on the last dim of a rank-`rank` tensor) with
    layout-change -> conv -> layout-change-back; returns the node now holding its value."""
    g = gm.graph
    x = node.args[0]
    with g.inserting_before(node):
        if rank == 2:
            inp = g.call_method("unsqueeze", (x, -1))
            conv = make_conv(g, inp)
            out = g.call_method("squeeze", (conv, -1))
        else:
            to_cf = (0, rank - 1) + tuple(range(1, rank - 1))
            inp = g.call_method("permute", (x, *to_cf))
            conv = make_conv(g, inp)
            out = g.call_method("permute", (conv, *fu.inverse(to_cf)))
    if node in shapes:  # later candidates may read their input's shape from here
        shapes[out] = shapes.pop(node)
    node.replace_all_uses_with(out)
    g.erase_node(node)
    return out
