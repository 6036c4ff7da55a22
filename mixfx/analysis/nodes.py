"""Naming fx nodes (module path, op) and reading the symbolic values the shape run left on them."""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch import nn

from mixfx.formulas import format_expr, free_input_symbols
from mixfx.shapes import flatten_outputs


@contextlib.contextmanager
def global_module_hooks(pre: Callable, post: Callable) -> Iterator[None]:
    """`pre`/`post` as forward pre-/post-hooks of every module while the block runs (global hooks
    see modules the eager forward calls inside leaves and helpers too); removed on exit."""
    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def module_path(node: torch.fx.Node) -> str | None:
    """The module a node belongs to: its target for call_module, else the innermost entry of
    `nn_module_stack`, else the parameter it reads (`pos_embed`)."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            return str(arg.target)
    return None


def op_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return type(mod).__name__
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        overload = getattr(node.target, "_overloadpacket", None)
        return f"aten.{overload.__name__}" if overload is not None else name
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


_MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm", "__matmul__",
                   "aten.matmul", "aten.bmm", "aten.einsum", "aten.mm"}
_SDPA_TARGETS = {"scaled_dot_product_attention", "aten.scaled_dot_product_attention",
                 "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention"}
_SEQUENCE_MODULES = (nn.MultiheadAttention, nn.RNNBase)


# ----------------------------------------------------------------------------- helpers on values
def _tensors(value: Any) -> list[torch.Tensor]:
    return flatten_outputs(value)


def _dim_symbols(size: Any, symbols) -> set[str]:
    if isinstance(size, torch.SymInt):
        return free_input_symbols(size.node.expr, symbols)
    return set()


def _depends(value: Any, symbols) -> set[str]:
    out: set[str] = set()
    for t in _tensors(value):
        for d in t.shape:
            out |= _dim_symbols(d, symbols)
    if isinstance(value, torch.SymInt):
        out |= _dim_symbols(value, symbols)
    return out


def _format_shape(value: Any, symbols) -> str | None:
    ts = _tensors(value)
    if not ts:
        if isinstance(value, (int, torch.SymInt)):
            return format_expr(value.node.expr if isinstance(value, torch.SymInt) else value, symbols)
        return None
    parts = ["[" + ", ".join(_format_dim(d, symbols) for d in t.shape) + "]" for t in ts[:4]]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + (", ..." if len(ts) > 4 else "") + ")"


def _format_dim(d: Any, symbols) -> str:
    return format_expr(d.node.expr, symbols) if isinstance(d, torch.SymInt) else str(int(d))


def _concrete_depends(a: Any, b: Any) -> bool:
    return a is not None and b is not None and a != b



def _has_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _map_nodes(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, torch.fx.Node):
        return values.get(value.name)
    if isinstance(value, (tuple, list)):
        return [_map_nodes(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _map_nodes(v, values) for k, v in value.items()}
    return value


