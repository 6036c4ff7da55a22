"""patchify + Linear -> strided conv (kernel == stride).

A patch embedding written as "cut the image into patches, flatten each, apply a Linear" is a
convolution with kernel == stride. The pass finds Linears (`nn.Linear` or `F.linear` with a
parameter weight) fed by a chain of layout ops, reads the patch layout with the index probe of
`passes._patch_index` (so every spelling is handled alike), and puts a `ConvNd` with the reordered
weight in their place, followed by the layout ops (`flatten`, `transpose`/`permute`) that give
exactly the tensor the Linear gave (`[B, N, D]` tokens, `[B, gh, gw, D]`, ...).

Input domain: a reshape-based patchify needs `H % p == 0`; the conv drops the remainder. The
rewritten graph agrees with the original wherever the original runs and also accepts the sizes it
rejected; the pass says so in its notes (checked by re-running the chain one pixel larger).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from passes._fxutil import fresh_path, propagate_shapes, reshape_where_view_fails, views_note
from passes._patch_graph import (SPATIAL_NAMES, PatchChain, chain_into, copy_meta, evaluate, example_inputs,
                                 is_rearrange_op, is_unfold_op, remove_if_dead, replay,
                                 unfold_problem)
from passes._patch_index import WHOLE_DIMS, NotPatchify, PatchLayout, has_grid, index_probe, read_layout
from passes.base import Change, RewritePass, RewritePassResult, Skip

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class PatchifyToConv(RewritePass):
    name = "patchify_to_conv"

    def __init__(self, example_inputs: Sequence[Any] | None = None):
        super().__init__()
        self.example_inputs = example_inputs

    def call(self, graph_module: GraphModule) -> RewritePassResult:
        gm = graph_module
        candidates = [(n, lin) for n in gm.graph.nodes if (lin := _linear_parts(gm, n)) is not None]
        chains = {n: chain_into(gm, lin[0]) for n, lin in candidates}
        chains = {n: c for n, c in chains.items() if c.chain}
        if not chains:
            return RewritePassResult(gm, False)
        inputs = example_inputs(gm, self.example_inputs)
        # most Linears sit behind attention's `transpose.reshape`: their ranks (shapes from a meta
        # run) rule them out, so real values are computed only up to the chains that may cut patches
        ranks = {n: len(s) for n, s in propagate_shapes(gm, inputs).items()}
        chains = {n: c for n, c in chains.items() if _looks_like_patchify(gm, c, ranks)}
        if not chains:
            return RewritePassResult(gm, False)
        values = evaluate(gm, [c.chain[-1] for c in chains.values()], inputs)
        changes, skipped, notes = [], [], []
        outs: list[Node] = []  # the values now computed in another memory layout
        for node, chain in chains.items():
            x, weight, bias, module_path = _linear_parts(gm, node)
            try:
                layout = self._layout(gm, chain, values)
            except NotPatchify as exc:
                skipped.append(Skip(self.name, node.name, module_path, str(exc)))
                continue
            path = _conv_path(gm, node, module_path)
            try:
                layout, note = _check_sizes(gm, chain, values, layout, path)
            except NotPatchify as exc:
                skipped.append(Skip(self.name, node.name, module_path, str(exc)))
                continue
            conv = _make_conv(layout, weight, bias)
            _set_module(gm, path, conv)
            merge = _grid_merge_user(node, layout)
            if merge is not None:  # linear(...).flatten(1, d): emit the tokens layout directly
                layout = dataclasses.replace(layout, token_groups=((0,), tuple(range(1, len(layout.kernel) + 1))))
            out = _emit(gm, node, chain.source, path, layout)
            outs.append(out)
            if merge is not None:
                merge.replace_all_uses_with(out)
                gm.graph.erase_node(merge)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            remove_if_dead(gm, chain.chain[::-1])
            changes.append(Change(self.name, node.name, path, _describe_before(node, module_path, weight, layout),
                                  f"{conv} -> {_describe_layout(layout)}"))
            if note:
                notes.append(note)
        if changes:
            gm.graph.lint()
            _prune(gm)
            gm.recompile()
            # conv -> flatten/transpose: the Linear's values, not its (contiguous) memory layout
            outs = [n for n in outs if n.graph is not None]
            notes += views_note(self.name, reshape_where_view_fails(gm, outs, self.example_inputs))
        return RewritePassResult(gm, bool(changes), changes, skipped, notes)

    def _layout(self, gm: GraphModule, chain: PatchChain, values: dict[Node, Any]) -> PatchLayout:
        for n in chain.chain:
            if is_unfold_op(gm, n):
                problem = unfold_problem(gm, n, values)
                if problem:
                    raise NotPatchify(problem)
        shape = tuple(values[chain.source].shape)
        last = chain.chain[-1]
        # batch 2: big enough to see where the batch goes, small enough to keep the probe cheap
        tries = [shape] if shape[0] == 2 else [(2,) + shape[1:], shape]
        for i, probe_shape in enumerate(tries):
            try:
                probed = replay(gm, chain.source, last, index_probe(probe_shape), values)
            except Exception:  # noqa: BLE001 - the chain hard-codes the batch: use the example size
                if i + 1 < len(tries):
                    continue
                raise NotPatchify("the chain cannot be re-run on an index tensor")
            return read_layout(probe_shape, probed, require_grid=False)  # _check_sizes decides
        raise AssertionError("unreachable")


# --- recognising the Linear and its chain ------------------------------------------------------

def _linear_parts(gm: GraphModule, node: Node) -> tuple[Node, torch.Tensor, torch.Tensor | None, str | None] | None:
    """(input, weight, bias, module path) of an `nn.Linear` call or `F.linear` with parameters."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if type(m) is nn.Linear and isinstance(node.args[0], Node):
            return node.args[0], m.weight, m.bias, str(node.target)
        return None
    if node.op == "call_function" and node.target is F.linear:
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        if not isinstance(x, Node) or not isinstance(w, Node) or w.op != "get_attr":
            return None
        if b is not None and (not isinstance(b, Node) or b.op != "get_attr"):
            return None
        weight = _fetch(gm, str(w.target))
        bias = _fetch(gm, str(b.target)) if b is not None else None
        return x, weight, bias, None
    return None


def _fetch(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _looks_like_patchify(gm: GraphModule, chain: PatchChain, ranks: dict[Node, int]) -> bool:
    """A chain worth a probe (and a Skip if it fails): it unfolds, rearranges, or splits a dim.
    Chains that only merge or permute dims (attention's `transpose.reshape`, a head's `flatten`)
    can never cut patches out of a grid and are left alone silently."""
    rank = lambda n: ranks.get(n, -1)  # noqa: E731
    if rank(chain.source) < 3:
        return False
    prev = chain.source
    for n in chain.chain:
        if is_unfold_op(gm, n) or is_rearrange_op(gm, n) or rank(n) > rank(prev):
            return True
        prev = n
    return False


# --- building the replacement ------------------------------------------------------------------

def _grid_merge_user(linear: Node, layout: PatchLayout) -> Node | None:
    """The Linear's only user when it is `flatten(1, d)` over a `[B, g1..gd, D]` output."""
    d = len(layout.kernel)
    plain = layout.token_order == tuple(range(d + 1)) and layout.token_groups == tuple((i,) for i in range(d + 1))
    if not plain or d < 2 or len(linear.users) != 1:
        return None
    user = next(iter(linear.users))
    is_flatten = (user.op == "call_method" and user.target == "flatten") or (
        user.op == "call_function" and user.target is torch.flatten)
    if is_flatten and not user.kwargs and tuple(user.args[1:]) == (1, d):
        return user
    return None


def _make_conv(layout: PatchLayout, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    d = len(layout.kernel)
    out_features = weight.shape[0]
    conv = _CONVS[d](layout.in_channels, out_features, layout.kernel, stride=layout.kernel, bias=bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        w = torch.zeros_like(conv.weight)
        index = tuple(layout.feature_index[:, i] for i in range(1 + d))
        w[(slice(None),) + index] = weight
        conv.weight.copy_(w)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.weight.requires_grad_(weight.requires_grad)
    return conv


def _conv_path(gm: GraphModule, node: Node, module_path: str | None) -> str:
    """The Linear's own path when it has no other call site (keeps names like `stem.proj`)."""
    if module_path is not None:
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module_path]
        if len(calls) == 1:
            return module_path
        return fresh_path(gm, module_path + "_conv")
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    base = str(weight_node.target).rpartition(".")[0] or "patch"
    return fresh_path(gm, base + ".conv" if base != "patch" else "patch_conv")


def _set_module(gm: GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if name in parent._modules:
        parent._modules[name] = module
    else:
        gm.add_submodule(path, module)


def _emit(gm: GraphModule, linear: Node, source: Node, path: str, layout: PatchLayout) -> Node:
    """conv(source) and the layout ops that turn `[B, O, g1..gd]` into the Linear's output layout."""
    g = gm.graph
    d = len(layout.kernel)
    with g.inserting_before(linear):
        x = source
        if layout.channels_last:  # [B, *S, C] -> [B, C, *S]
            x = copy_meta(g.call_method("permute", (x, (0, len(layout.source_shape) - 1, *layout.spatial_dims))),
                          linear)
        y = copy_meta(g.call_module(path, (x,)), linear)
        order, groups = layout.token_order, layout.token_groups  # token axes: 0 = batch, j = g_j
        plain = order == tuple(range(d + 1)) and groups[0] == (0,) and all(groups[1:])
        if plain:  # flatten the grid channels-first, then move channels last: flatten(2).transpose(1, 2)
            for group in reversed(groups[1:]):
                if len(group) > 1:
                    ends = (group[0] + 1,) if group[-1] == d else (group[0] + 1, group[-1] + 1)
                    y = g.call_method("flatten", (y, *ends))
            rank = 1 + len(groups)
            if rank == 3:
                y = g.call_method("transpose", (y, 1, 2))
            else:
                y = g.call_method("permute", (y, (0, *range(2, rank), 1)))
            return copy_meta(y, linear)
        # general case: channels last, token axes in their order, then flatten each group
        z_axis = lambda a: 0 if a == 0 else a + 1  # noqa: E731 - token axis -> conv output axis
        y = copy_meta(g.call_method("permute", (y, (*(z_axis(a) for a in order), 1))), linear)
        position, spans = 0, []
        for group in groups:
            spans.append((position, position + len(group) - 1))
            position += len(group)
        for start, end in reversed(spans):
            if end > start:
                y = copy_meta(g.call_method("flatten", (y, start, end)), linear)
        for i, (start, end) in enumerate(spans):
            if end < start:  # an empty group: a size-1 dim of the Linear's input
                y = copy_meta(g.call_method("unsqueeze", (y, i)), linear)
        return y


def _prune(gm: GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for path, _ in list(gm.named_parameters(remove_duplicate=False)):
        if path in used or any(path.startswith(u + ".") for u in used):
            continue
        owner, _, name = path.rpartition(".")
        gm.get_submodule(owner)._parameters.pop(name, None) if owner else gm._parameters.pop(name, None)
    gm.delete_all_unused_submodules()


# --- reporting ---------------------------------------------------------------------------------

def _describe_before(node: Node, module_path: str | None, weight: torch.Tensor, layout: PatchLayout) -> str:
    lin = f"Linear({weight.shape[1]}, {weight.shape[0]})" if module_path else f"F.linear[{weight.shape[1]}->{weight.shape[0]}]"
    k = "x".join(map(str, layout.kernel))
    return f"patchify {k} ({layout.flatten_order}) + {lin}"


def _describe_layout(layout: PatchLayout) -> str:
    groups = ["(" + " ".join(_axis_name(a, layout) for a in grp) + ")" if len(grp) != 1 else _axis_name(grp[0], layout)
              for grp in layout.token_groups]
    return "[" + ", ".join(groups + ["D"]) + "]"


def _axis_name(axis: int, layout: PatchLayout) -> str:
    return "B" if axis == 0 else f"g{axis}"


def _check_sizes(gm: GraphModule, chain: PatchChain, values: dict[Node, Any], layout: PatchLayout,
                 path: str) -> tuple[PatchLayout, str | None]:
    """Check the layout holds at other sizes and say how the accepted input domain changes.

    The chain is re-run one patch larger along every spatial dim: it must cut the same patches
    (else it depends on the size in a way the conv does not, e.g. a fixed-size slice:
    NotPatchify). There every grid dim is >= 2, so the token order read there is the one to keep
    (at a 1-wide grid any order fits). Then one element larger along each dim: a reshape rejects
    that, the conv drops the remainder: the domain note."""
    names = SPATIAL_NAMES[len(layout.kernel)]
    bigger = list(layout.source_shape)
    for dim, k in zip(layout.spatial_dims, layout.kernel):
        bigger[dim] += k
    fixed_size = False
    grid_seen = has_grid(layout.kernel, layout.grid)
    try:
        probed = replay(gm, chain.source, chain.chain[-1], index_probe(tuple(bigger)), values)
    except Exception:  # noqa: BLE001 - hard-coded sizes: the original only runs at the example size
        fixed_size = True
        if not grid_seen:
            raise NotPatchify(WHOLE_DIMS)
    else:
        try:
            other = read_layout(tuple(bigger), probed)
        except NotPatchify:
            if not grid_seen:
                raise NotPatchify(WHOLE_DIMS)
            raise
        same = (other.kernel == layout.kernel and other.channel_dim == layout.channel_dim
                and len(other.token_groups) == len(layout.token_groups)
                and torch.equal(other.feature_index, layout.feature_index))
        if not same:
            if not grid_seen:
                raise NotPatchify(WHOLE_DIMS)
            raise NotPatchify("the chain cuts patches differently at another input size (fixed sizes in it?)")
        layout = dataclasses.replace(layout, token_order=other.token_order, token_groups=other.token_groups)
    if fixed_size:
        return layout, (f"`{path}`: the accepted input domain changed: the patch extraction hard-codes the example "
                        f"size; the strided conv accepts any size")
    rejected = []
    for i, (dim, k) in enumerate(zip(layout.spatial_dims, layout.kernel)):
        shape = list(layout.source_shape)
        shape[dim] += 1
        try:
            replay(gm, chain.source, chain.chain[-1], index_probe(tuple(shape)), values)
        except Exception:  # noqa: BLE001
            rejected.append(f"{names[i]} % {k} == 0")
    if not rejected:
        return layout, None
    return layout, (f"`{path}`: the accepted input domain changed: the patch extraction required {' and '.join(rejected)}; "
            f"the strided conv accepts any size and drops the remainder (outputs agree wherever the original ran)")
