"""1x1 convolution -> Linear.

Only a conv that is a per-position matrix product qualifies: `Conv1d`/`Conv2d` with a 1x1 kernel,
stride 1, padding 0 and groups 1 (dilation does not matter for a 1x1 kernel). It becomes
`permute(channels -> last) -> Linear -> permute(back)`; the layout pass then cancels the permutes
between consecutive Linears and elementwise ops (a later `view` that no longer fits the strides of
the permuted result becomes `reshape`). Every other conv is left alone and reported as
skipped with the reason. Modules keep their paths; weights and biases are copied.
"""
from __future__ import annotations

from collections import defaultdict

from torch import nn
from torch.fx import GraphModule, Node

from passes import _fxutil as fu
from passes.base import Change, RewritePass, RewritePassResult, Skip

_SUPPORTED = (nn.Conv1d, nn.Conv2d)


def linear_from_conv(conv: nn.Module) -> nn.Linear:
    w = conv.weight
    lin = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().clone().reshape(conv.out_channels, conv.in_channels),
                              requires_grad=w.requires_grad)
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return lin


def why_not_pointwise(conv: nn.Module) -> str | None:
    """None when `conv` is a 1x1, stride-1, unpadded, ungrouped Conv1d/Conv2d, else the reason."""
    if type(conv) not in _SUPPORTED:
        if isinstance(conv, nn.Conv3d) and type(conv) is nn.Conv3d:
            return "Conv3d is not rewritten (only Conv1d and Conv2d)"
        if isinstance(conv, _SUPPORTED):
            return f"{type(conv).__name__} subclasses {type(conv).__mro__[1].__name__} and may change its forward"
        return f"{type(conv).__name__} is not rewritten (only Conv1d and Conv2d)"
    reasons = []
    if any(k != 1 for k in conv.kernel_size):
        reasons.append(f"kernel {'x'.join(map(str, conv.kernel_size))} is not 1x1")
    if any(s != 1 for s in conv.stride):
        reasons.append(f"stride {'x'.join(map(str, conv.stride))}")
    padding = conv.padding
    if isinstance(padding, str):
        if padding != "valid" and any(k != 1 for k in conv.kernel_size):
            reasons.append(f"padding '{padding}'")
    elif any(p != 0 for p in padding):
        reasons.append(f"padding {'x'.join(map(str, padding))}")
    if conv.groups != 1:
        reasons.append(f"groups={conv.groups}" + (" (depthwise)" if conv.groups == conv.in_channels else ""))
    if conv.transposed:
        reasons.append("transposed conv")
    return "; ".join(reasons) or None


class ConvToLinear(RewritePass):
    name = "conv_to_linear"

    def __init__(self, example_inputs=None):
        super().__init__()
        self.example_inputs = example_inputs

    def call(self, gm: GraphModule) -> RewritePassResult:
        shapes = fu.propagate_shapes(gm, self.example_inputs)
        changes: list[Change] = []
        skipped: list[Skip] = []
        outs: list[Node] = []  # the values now computed in another memory layout
        by_target: dict[str, list[Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if isinstance(fu.module_of(gm, node), nn.modules.conv._ConvNd):
                by_target[node.target].append(node)
        get_attr_targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target, nodes in by_target.items():
            conv = gm.get_submodule(target)
            reason = why_not_pointwise(conv)
            ranks = {len(shapes[n.args[0]]) for n in nodes if n.args and isinstance(n.args[0], Node) and n.args[0] in shapes}
            if reason is None and any(t.startswith(target + ".") for t in get_attr_targets):
                reason = "its weight is also read elsewhere in the graph (tied weights)"
            if reason is None and len(ranks) != 1:
                reason = "input shape unknown" if not ranks else f"called on inputs of different ranks {sorted(ranks)}"
            if reason is not None:
                skipped += [Skip(self.name, n.name, target, reason) for n in nodes]
                continue
            rank = next(iter(ranks))
            channel_dim = rank - len(conv.kernel_size) - 1  # 1 when batched, 0 when not
            to_last = tuple(d for d in range(rank) if d != channel_dim) + (channel_dim,)
            lin = linear_from_conv(conv)
            fu.set_module(gm, target, lin)
            g = gm.graph
            for node in nodes:
                x = node.args[0]
                with g.inserting_before(node):
                    inp = g.call_method("permute", (x, *to_last))
                    out_lin = g.call_module(target, (inp,))
                    out = g.call_method("permute", (out_lin, *fu.inverse(to_last)))
                if node in shapes:  # later candidates may read their input's shape from here
                    shapes[out] = shapes.pop(node)
                node.replace_all_uses_with(out)
                g.erase_node(node)
                outs.append(out)
                changes.append(Change(self.name, node.name, target, repr(conv),
                                      f"{lin!r} on the channels-last tensor (input {fu.short_shape(shapes[x])})"))
        notes: list[str] = []
        if changes:
            gm.graph.lint()
            gm.recompile()
            # permute -> Linear -> permute back: same values, not the same strides as the conv's
            notes += fu.views_note(self.name, fu.reshape_where_view_fails(gm, outs, self.example_inputs))
        return RewritePassResult(gm, bool(changes), changes, skipped, notes)
