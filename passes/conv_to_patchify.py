"""strided conv (kernel == stride) -> patchify + Linear.

A `ConvNd` whose kernel equals its stride (no padding, no dilation, groups 1) looks at disjoint
patches: it is a reshape into patches followed by a matmul. Some hardware runs such a conv (a
video ViT's 2x16x16 Conv3d above all) far slower than the matmul, which is why people rewrite it
by hand.

Emitted, for `[B, C, H, W]` and kernel `(kh, kw)`:
    x[:, :, :H//kh*kh, :W//kw*kw]                      # drop the remainder, as the conv does
     .reshape(B, C, H//kh, kh, W//kw, kw).permute(0, 2, 4, 1, 3, 5).flatten(3)   # [B, gh, gw, C*kh*kw]
    -> Linear(C*kh*kw, O) -> permute(0, 3, 1, 2)       # back to the conv's [B, O, gh, gw]
The patch is flattened `c p1 p2`, the conv weight's own order, so the Linear weight is
`conv.weight.reshape(O, -1)`. All sizes are read from the tensor (`x.size(i) // k`), so the graph
still runs at other input sizes; the leading slice keeps the accepted input domain exactly the
conv's (`exact_domain=False` leaves it out, and then `H % kh == 0` is required: the notes say which).
The closing permute is left out where the conv's only use is the ViT tokens layout
`flatten(2).transpose(1, 2)` (the Linear output is flattened over the grid instead) or a
channels-last `permute(0, 2, 3, 1)` (ConvNeXt's stem + LayerNorm2d: the Linear output
`[B, gh, gw, O]` is that tensor already); elsewhere it is left for the layout pass to cancel.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from passes._fxutil import fresh_path, reshape_where_view_fails, views_note
from passes._patch_graph import (SPATIAL_NAMES, copy_meta, evaluate, example_inputs, floordiv, mul,
                                 size_nodes)
from passes.base import Change, RewritePass, RewritePassResult, Skip

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def patchify_problem(conv: nn.Module) -> str | None:
    """Why `conv` is not a patch embedding (None when it is). Kernel 1 gives "1x1, handled by
    conv_to_linear"."""
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    if all(v == 1 for v in k) and all(v == 1 for v in s):
        return "1x1, handled by conv_to_linear"
    if k != s:
        how = "overlapping" if any(b < a for a, b in zip(k, s)) else "gapped"
        return f"kernel {k} != stride {s} ({how} windows): not a patch embedding"
    if isinstance(conv.padding, str):
        if conv.padding != "valid":
            return f"padding='{conv.padding}'"
    elif any(p != 0 for p in conv.padding):
        return f"padding {tuple(conv.padding)}: patches would include padding"
    if any(d != 1 for d in conv.dilation):
        return f"dilation {tuple(conv.dilation)}: a patch is not a contiguous block"
    if conv.groups != 1:
        return f"groups={conv.groups}: a grouped conv is not one Linear"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    return None


class ConvToPatchify(RewritePass):
    name = "conv_to_patchify"

    def __init__(self, exact_domain: bool = True, example_inputs: Sequence[Any] | None = None):
        super().__init__()
        self.exact_domain = exact_domain
        self.example_inputs = example_inputs

    def call(self, graph_module: GraphModule) -> RewritePassResult:
        gm = graph_module
        convs = [n for n in gm.graph.nodes if n.op == "call_module"
                 and type(gm.get_submodule(str(n.target))) in _CONV_TYPES]
        changes, skipped, notes = [], [], []
        todo = []
        for node in convs:
            conv = gm.get_submodule(str(node.target))
            problem = patchify_problem(conv)
            if problem is None:
                todo.append(node)
            elif _reportable(conv, problem):
                skipped.append(Skip(self.name, node.name, str(node.target), problem))
        ranks = self._input_ranks(gm, todo)
        by_path: dict[str, list[Node]] = {}
        for node in todo:
            conv = gm.get_submodule(str(node.target))
            want = len(conv.kernel_size) + 2
            if ranks.get(node, want) != want:
                skipped.append(Skip(self.name, node.name, str(node.target),
                                    f"unbatched input (rank {ranks[node]}): only [B, C, *spatial] is rewritten"))
                continue
            by_path.setdefault(str(node.target), []).append(node)
        outs: list[Node] = []  # the values now computed in another memory layout
        for path, nodes in by_path.items():
            conv = gm.get_submodule(path)
            all_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]
            lin_path = path if len(all_calls) == len(nodes) else fresh_path(gm, path + "_linear")
            linear = _linear_from(conv)
            for node in nodes:
                tokens = _tokens_user(node, len(conv.kernel_size))
                layout = (" + permute to channels-first" if tokens is None else
                          " (channels-last [B, *grid, D])" if tokens.args[0] is node else " (tokens [B, N, D])")
                out = self._emit(gm, node, lin_path, conv)
                outs.append(out)
                node.replace_all_uses_with(out)
                gm.graph.erase_node(node)
                k = "x".join(map(str, conv.kernel_size))
                changes.append(Change(self.name, node.name, lin_path, repr(conv),
                                      f"patchify {k} (c {' '.join(f'p{i + 1}' for i in range(len(conv.kernel_size)))})"
                                      f" + {linear}" + layout))
            _put_module(gm, lin_path, linear)
            notes.append(self._domain_note(lin_path, conv))
        if changes:
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
            # Linear -> permute to channels-first: the conv's values, not its memory layout
            outs = [n for n in outs if n.graph is not None]
            notes += views_note(self.name, reshape_where_view_fails(gm, outs, self.example_inputs))
        return RewritePassResult(gm, bool(changes), changes, skipped, notes)

    def _input_ranks(self, gm: GraphModule, nodes: list[Node]) -> dict[Node, int]:
        """Rank of each conv's input: from `meta` if a shape propagation left it, else by running
        the graph up to the convs on the example input; unknown (assumed batched) if neither."""
        ranks, missing = {}, []
        for node in nodes:
            x = node.args[0]
            meta = x.meta.get("tensor_meta") or x.meta.get("val")
            if getattr(meta, "shape", None) is not None:
                ranks[node] = len(meta.shape)
            else:
                missing.append(node)
        if missing:
            try:
                inputs = example_inputs(gm, self.example_inputs)
            except ValueError:
                return ranks
            values = evaluate(gm, [n.args[0] for n in missing], inputs)
            ranks.update({n: values[n.args[0]].dim() for n in missing if hasattr(values.get(n.args[0]), "dim")})
        return ranks

    def _emit(self, gm: GraphModule, node: Node, lin_path: str, conv: nn.Module) -> Node:
        g = gm.graph
        kernel = tuple(conv.kernel_size)
        d = len(kernel)
        with g.inserting_before(node):
            x = node.args[0]
            batch, *spatial = size_nodes(g, x, [0, *range(2, d + 2)])
            grid = [floordiv(g, s, k) for s, k in zip(spatial, kernel)]
            if self.exact_domain:
                ends = [mul(g, n, k) for n, k in zip(grid, kernel)]
                x = g.call_function(operator.getitem, (x, (slice(None), slice(None), *(slice(None, e) for e in ends))))
            split = [batch, conv.in_channels] + [v for n, k in zip(grid, kernel) for v in (n, k)]
            x = copy_meta(g.call_method("reshape", (x, *split)), node)
            perm = (0, *range(2, 2 + 2 * d, 2), 1, *range(3, 3 + 2 * d, 2))
            x = copy_meta(g.call_method("permute", (x, perm)), node)
            x = copy_meta(g.call_method("flatten", (x, d + 1)), node)
            y = copy_meta(g.call_module(lin_path, (x,)), node)
            tokens = _tokens_user(node, d)
            if tokens is not None:
                if tokens.args[0] is node:  # conv.permute(0, 2.., 1) (channels-last) == linear output
                    out = y
                else:  # conv.flatten(2).transpose(1, 2) == linear output.flatten(1, d)
                    out = copy_meta(g.call_method("flatten", (y, 1, d)), node) if d > 1 else y
                tokens.replace_all_uses_with(out)
                _erase_chain(g, tokens, node)
                return y
            return copy_meta(g.call_method("permute", (y, (0, d + 1, *range(1, d + 1)))), node)

    def _domain_note(self, path: str, conv: nn.Module) -> str:
        names = SPATIAL_NAMES[len(conv.kernel_size)]
        conds = " and ".join(f"{n} % {k} == 0" for n, k in zip(names, conv.kernel_size))
        if self.exact_domain:
            return (f"`{path}`: accepted input domain unchanged: a slice drops the remainder before the reshape, "
                    f"as the strided conv does (so {conds} is not required)")
        return f"`{path}`: the accepted input domain changed: the reshape into patches requires {conds}"


def _tokens_user(conv: Node, d: int) -> Node | None:
    """The node ending `conv -> [flatten(2) ->] transpose(1, 2)` or `conv -> permute(0, 2.., 1)`,
    when the conv output has no other use: the ViT tokens layout (or channels-last), which the
    patchify form produces directly. Saves the layout pass a permute it would have to cancel."""
    def only_user(n: Node) -> Node | None:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def is_flatten2(n: Node) -> bool:
        if n.op == "call_method" and n.target == "flatten" or n.op == "call_function" and n.target is torch.flatten:
            args = list(n.args[1:]) + [n.kwargs.get("start_dim", 0), n.kwargs.get("end_dim", -1)][len(n.args) - 1:]
            return args[0] == 2 and args[1] in (-1, d + 1)
        return False

    def is_swap12(n: Node, rank: int) -> bool:
        if n.op == "call_method" and n.target in ("transpose", "swapaxes", "swapdims") or (
                n.op == "call_function" and n.target in (torch.transpose, torch.swapaxes, torch.swapdims)):
            return rank == 3 and len(n.args) == 3 and {a % 3 for a in n.args[1:]} == {1, 2}
        if n.op == "call_method" and n.target == "permute" or n.op == "call_function" and n.target is torch.permute:
            dims = n.args[1:] if not (len(n.args) == 2 and isinstance(n.args[1], (tuple, list))) else n.args[1]
            return tuple(dims) == (0, *range(2, rank), 1)
        return False

    user = only_user(conv)
    if user is None:
        return None
    if is_swap12(user, d + 2):  # channels-last view of the conv output
        return user
    if d > 1 and is_flatten2(user):
        nxt = only_user(user)
        if nxt is not None and is_swap12(nxt, 3):
            return nxt
    return None


def _erase_chain(g, last: Node, stop: Node) -> None:
    """Erase `last` and its inputs back to (not including) `stop` (they have no other users)."""
    n = last
    while n is not stop:
        prev = n.args[0]
        g.erase_node(n)
        n = prev


def _reportable(conv: nn.Module, problem: str) -> bool:
    """Report a skip only for convs that look like patch embeddings (kernel == stride > 1 with
    padding, dilation, groups...); ordinary convs (kernel != stride) are no candidates."""
    return not problem.startswith("1x1") and tuple(conv.kernel_size) == tuple(conv.stride)


def _linear_from(conv: nn.Module) -> nn.Linear:
    out_ch, in_ch = conv.out_channels, conv.in_channels
    features = in_ch * math.prod(conv.kernel_size)
    w = conv.weight
    lin = nn.Linear(features, out_ch, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.reshape(out_ch, features))
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    lin.weight.requires_grad_(w.requires_grad)
    return lin


def _put_module(gm: GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if name in parent._modules:
        parent._modules[name] = module
    else:
        gm.add_submodule(path, module)
