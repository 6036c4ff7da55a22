"""Graph plumbing shared by the patchify passes: example values, patch-extraction chains, replay.

The patchify <-> strided-conv passes need concrete values (the size of the tensor a patch chain
starts from, the ints its reshapes were given) and the ability to re-run a handful of nodes on a
different tensor (the index probe of `passes._patch_index`). Both are here, together with the list
of ops that only move elements around and so may appear in a patch-extraction chain.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from passes._fxutil import ancestors, module_of

EXAMPLE_KEY = "mixfx_example"  # same key as passes._fxutil.annotate_example_inputs

# --- ops that only rearrange elements -----------------------------------------------------------

_LAYOUT_METHODS = {
    "view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "flatten", "unflatten",
    "contiguous", "unfold", "movedim", "moveaxis", "squeeze", "unsqueeze",
}
_LAYOUT_FUNCTIONS: set[Any] = {
    torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.flatten,
    torch.unflatten, torch.movedim, torch.moveaxis, torch.squeeze, torch.unsqueeze, F.unfold,
    torch.Tensor.contiguous, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.permute,
    torch.Tensor.transpose, torch.Tensor.flatten, torch.Tensor.unfold,
}
_LAYOUT_MODULES: tuple[type, ...] = (nn.Unfold, nn.Flatten, nn.Unflatten, nn.Identity)

try:  # einops is optional: its rearrange is a pure layout op when it shows up in a graph
    import einops
    from einops.layers.torch import Rearrange

    _LAYOUT_FUNCTIONS.add(einops.rearrange)
    _LAYOUT_MODULES = _LAYOUT_MODULES + (Rearrange,)
except ImportError:  # pragma: no cover - depends on the environment
    Rearrange = None  # type: ignore[assignment,misc]


def _is_slicing(node: Node) -> bool:
    """`x[a:b, ...]` with plain slices only (no ints, None or tensors): a sub-block, still a gather."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return False
    index = node.args[1]
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, slice) or i is Ellipsis for i in items)


def _is_shape(node: Node) -> bool:
    return ((node.op == "call_function" and node.target is getattr)
            or (node.op == "call_method" and node.target in ("size", "dim")))


def is_layout_op(gm: GraphModule, node: Node) -> bool:
    """True for ops whose output elements are all elements of their first (tensor) argument."""
    if _is_slicing(node):
        x = node.args[0]
        return isinstance(x, Node) and not _is_shape(x)
    if node.op == "call_method":
        ok = node.target in _LAYOUT_METHODS
    elif node.op == "call_function":
        ok = node.target in _LAYOUT_FUNCTIONS
    elif node.op == "call_module":
        ok = isinstance(module_of(gm, node), _LAYOUT_MODULES)
    else:
        return False
    return ok and bool(node.args) and isinstance(node.args[0], Node)


def is_unfold_op(gm: GraphModule, node: Node) -> bool:
    return ((node.op == "call_function" and node.target is F.unfold)
            or (node.op == "call_module" and isinstance(module_of(gm, node), nn.Unfold))
            or (node.op == "call_method" and node.target == "unfold")
            or (node.op == "call_function" and node.target is torch.Tensor.unfold))


def is_rearrange_op(gm: GraphModule, node: Node) -> bool:
    if Rearrange is None:
        return False
    return ((node.op == "call_function" and node.target is einops.rearrange)
            or (node.op == "call_module" and isinstance(module_of(gm, node), Rearrange)))


@dataclass
class PatchChain:
    """`source -> chain[0] -> ... -> chain[-1]`: layout ops from a tensor to a Linear's input."""

    source: Node
    chain: list[Node]  # in execution order; chain[-1] feeds the Linear


def chain_into(gm: GraphModule, node: Node) -> PatchChain:
    """Walk back from `node` through layout ops (possibly none) to the tensor they start from."""
    chain: list[Node] = []
    cur = node
    while is_layout_op(gm, cur):
        chain.append(cur)
        cur = cur.args[0]  # type: ignore[assignment]
    chain.reverse()
    return PatchChain(cur, chain)


def unfold_problem(gm: GraphModule, node: Node, values: dict[Node, Any]) -> str | None:
    """Why an unfold (`F.unfold`, `nn.Unfold`, `Tensor.unfold`) is not a patch extraction, or None."""
    if node.op == "call_module":
        m = module_of(gm, node)
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, m.padding, m.stride
    elif node.target is F.unfold:
        bound = _bind(lambda input, kernel_size, dilation=1, padding=0, stride=1: None, node, values)
        kernel, dilation, padding, stride = (bound[k] for k in ("kernel_size", "dilation", "padding", "stride"))
    else:  # Tensor.unfold(dim, size, step)
        bound = _bind(lambda self, dimension, size, step: None, node, values)
        kernel, dilation, padding, stride = bound["size"], 1, 0, bound["step"]
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    if any(p != 0 for p in pair(padding)):
        return f"unfold with padding={padding}: the patches contain zeros that are not in the input"
    if any(d != 1 for d in pair(dilation)):
        return f"unfold with dilation={dilation}: a patch is not a contiguous block"
    if pair(kernel) != pair(stride):
        how = "overlapping" if any(s < k for k, s in zip(pair(kernel), pair(stride))) else "gapped"
        return f"{how} unfold (kernel {kernel}, stride {stride}): not a patch embedding"
    return None


def _bind(signature, node: Node, values: dict[Node, Any]) -> dict[str, Any]:
    import inspect

    args = torch.fx.node.map_arg(node.args, lambda n: values.get(n, n))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values.get(n, n))
    bound = inspect.signature(signature).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


# --- concrete values ----------------------------------------------------------------------------

def example_inputs(gm: GraphModule, given: Sequence[Any] | None = None) -> list[Any]:
    """The example inputs: `given`, else those recorded on the placeholders (`mixfx_example`),
    else random tensors of the shapes ShapeProp / FakeTensorProp left in `meta`, else the
    placeholder's default value (timm's ViT: `attn_mask=None`)."""
    if given is not None:
        return list(given)
    values = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if EXAMPLE_KEY in node.meta:
            values.append(node.meta[EXAMPLE_KEY])
            continue
        meta = node.meta.get("tensor_meta") or node.meta.get("val")
        shape = getattr(meta, "shape", None)
        if (shape is None or not all(isinstance(s, int) for s in shape)) and node.args:
            values.append(node.args[0])  # an argument with a default value, nothing recorded
            continue
        if shape is None or not all(isinstance(s, int) for s in shape):
            raise ValueError(
                "the patchify passes need an example input: record one with "
                "passes._fxutil.annotate_example_inputs(gm, x) or pass example_inputs= to the pass")
        values.append(torch.randn(tuple(shape), dtype=getattr(meta, "dtype", torch.float32)))
    return values


def evaluate(gm: GraphModule, wanted: Iterable[Node], inputs: Sequence[Any]) -> dict[Node, Any]:
    """Values of `wanted` and their ancestors (only those: a patch embedding near the input costs
    next to nothing even in a big model)."""
    need = ancestors(wanted)
    interp = torch.fx.Interpreter(gm)
    placeholders = iter(inputs)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                value = next(placeholders, None)
                if value is None and node.args:
                    value = node.args[0]
                interp.env[node] = value
            elif node in need:
                interp.env[node] = interp.run_node(node)
    return dict(interp.env)


def replay(gm: GraphModule, source: Node, target: Node, probe: torch.Tensor,
           values: dict[Node, Any]) -> Any:
    """Re-run the nodes between `source` and `target` with `source` replaced by `probe`. Size
    computations that read `source.shape` are re-run too, so the probe may have another size."""
    between = ancestors([target])
    downstream = _descendants(source) & between
    interp = torch.fx.Interpreter(gm)
    interp.env = dict(values)
    interp.env[source] = probe
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in downstream and node is not source:
                interp.env[node] = interp.run_node(node)
    return interp.env[target]


def _descendants(node: Node) -> set[Node]:
    seen: set[Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def remove_if_dead(gm: GraphModule, nodes: Iterable[Node]) -> None:
    """Erase `nodes` and their ancestors that no longer have users (the old chain, its size
    arithmetic), leaving every other node alone."""
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output"):
            continue
        if n.op == "call_function" and n.target in (torch._assert,):
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        stack.extend(inputs)


def copy_meta(dst: Node, src: Node) -> Node:
    """Keep `nn_module_stack` / `stack_trace` so the analyser attributes new nodes to the module."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    return dst


def size_nodes(graph: torch.fx.Graph, x: Node, dims: Sequence[int]) -> list[Node]:
    """`x.size(d)` for each d: sizes read from the tensor, so the graph works at any input size."""
    return [graph.call_method("size", (x, d)) for d in dims]


def floordiv(graph: torch.fx.Graph, a: Node, b: int) -> Node:
    return graph.call_function(operator.floordiv, (a, b))


def mul(graph: torch.fx.Graph, a: Node, b: int) -> Node:
    return graph.call_function(operator.mul, (a, b))


SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("T", "H", "W")}
