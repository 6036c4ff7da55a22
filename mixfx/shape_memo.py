"""Memoised shape propagation: a node whose op and input shapes were already seen reuses the
earlier output instead of running again.

Why: a symbolic run costs 0.6-2 ms per op (fake-tensor dispatch, decompositions and symbolic
stride arithmetic), and real networks repeat themselves: the 12 blocks of a ViT, the bottlenecks
within a ResNet stage, the blocks within a Swin stage see the same shapes. Only shapes matter to
the analysis, so an identical call (same op and configuration, same sizes/strides/dtypes, same
Python arguments) can share the earlier output tensor. A hit adds no guard: the first call
already recorded every guard that the op makes.

Only calls whose output is a function of what the key holds are memoised: torch / operator
functions, Tensor methods, and built-in `torch.nn` modules keyed by their type, plain attributes
and parameter shapes. User functions, timm's autowrapped helpers and custom leaf modules (which
may read arbitrary state) always run. In-place metadata changes (`unsqueeze_`, `resize_`, ...)
would mutate a shared output, so a graph containing one is not memoised at all.
"""
from __future__ import annotations

from typing import Any, Hashable

import torch
import torch.fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

METADATA_MUTATING_METHODS = frozenset({
    "resize_", "resize_as_", "unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_", "swapaxes_",
    "as_strided_", "set_", "unflatten_", "flatten_",
})


class Unkeyable(Exception):
    """An argument whose effect on the output shape cannot be captured in a key."""


def _dim_key(d: Any) -> Hashable:
    if isinstance(d, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", d.node.expr)
    return d


def value_key(value: Any) -> Hashable:
    """A hashable description of everything about `value` that can affect an op's output shape."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(_dim_key(d) for d in value.shape), tuple(_dim_key(s) for s in value.stride()),
                _dim_key(value.storage_offset()), value.dtype, value.device.type, value.is_sparse)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _dim_key(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                           torch.layout, type(Ellipsis))):
        return (type(value).__name__, value)
    if isinstance(value, slice):
        return ("slice", value_key(value.start), value_key(value.stop), value_key(value.step))
    if isinstance(value, (tuple, list, torch.Size)):
        return (type(value).__name__, tuple(value_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, value_key(v)) for k, v in value.items()))
    raise Unkeyable(type(value).__name__)


def is_torch_target(target: Any) -> bool:
    """A torch/operator function (not in-place): its result follows from its arguments."""
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", "") or ""
    if name.endswith("_") and not name.endswith("__") or name.startswith("__i"):  # in-place: x.add_, iadd
        return False
    return module.startswith("torch") or module in ("_operator", "operator") or \
        isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket)


def module_key(mod: nn.Module) -> Hashable | None:
    """Configuration of a built-in torch.nn module (and its children), or None for other modules."""
    keys = []
    for sub in mod.modules():
        if not type(sub).__module__.startswith("torch.nn.modules"):
            return None
        attrs = []
        for k, v in vars(sub).items():
            if k.startswith("_") and k not in ("_reversed_padding_repeated_twice",):
                continue
            try:
                attrs.append((k, value_key(v)))
            except Unkeyable:
                continue  # hooks, callables: not shape-relevant for built-in modules
        params = tuple((k, tuple(p.shape), p.dtype) for k, p in
                       [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)] if p is not None)
        keys.append((type(sub), tuple(attrs), params))
    return tuple(keys)


class ShapeMemo:
    """Per-run memo of node outputs keyed by (op, configuration, input shapes)."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.enabled = not any(n.op == "call_method" and n.target in METADATA_MUTATING_METHODS
                               for n in gm.graph.nodes)
        self._modules: dict[str, Hashable | None] = {}
        self._outputs: dict[Hashable, Any] = {}
        self.hits = 0
        self.gm = gm

    def key(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> Hashable | None:
        if not self.enabled:
            return None
        if n.op == "call_module":
            target = str(n.target)
            if target not in self._modules:
                self._modules[target] = module_key(self.gm.get_submodule(target))
            op = self._modules[target]
            if op is None:
                return None
        elif n.op == "call_method":
            if n.target.endswith("_") and not n.target.endswith("__"):
                return None
            op = ("method", n.target)
        elif n.op == "call_function":
            if not is_torch_target(n.target):
                return None
            op = ("function", n.target)
        else:
            return None
        try:
            return (n.op, op, value_key(args), value_key(kwargs))
        except (Unkeyable, TypeError):  # TypeError: an unhashable sympy/other object
            return None

    def get(self, key: Hashable | None) -> Any:
        if key is None:
            return None
        try:
            out = self._outputs.get(key)
        except TypeError:
            return None
        if out is not None:
            self.hits += 1
        return out

    def put(self, key: Hashable | None, out: Any) -> None:
        if key is None or not _is_tensor_output(out) or free_unbacked_symbols(out):
            return  # unbacked sizes (nonzero, masks) are data-dependent: each call gets its own
        try:
            self._outputs[key] = out
        except TypeError:
            pass


def _is_tensor_output(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    if isinstance(out, (tuple, list)) and out:
        return all(isinstance(o, torch.Tensor) for o in out)
    return False
