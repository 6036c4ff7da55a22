"""Which nodes depend on the input size, and where the spatial part of the network ends (the head:
where positions stop being treated as positions)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from mixfx.analysis.nodes import _concrete_depends, _depends, _tensors
from mixfx.shapes import ConcreteRun


class HeadStage:
    """Mixed into the analyser: reads `self.nodes`, `self.sym`, `self.symbols`."""

    # -- spatial dependence, head, global mixing ---------------------------------------------------
    def _spatial_nodes(self, base: ConcreteRun, others: list[ConcreteRun]) -> dict[str, set[str]]:
        """Per node, the input dims its output depends on. Where every concrete run reached the
        node, the concrete shapes decide (a dim equal at all sizes is constant, however the
        symbolic expression looks); the symbolic expression then names the dims."""
        out: dict[str, set[str]] = {}
        self.constant_nodes: set[str] = set()
        self.unknown_nodes: set[str] = set()  # neither the symbolic nor every concrete run got here
        for n in self.nodes:
            symbolic = _depends(self.sym.values[n.name], self.symbols) if n.name in self.sym.values else None
            reached = bool(others) and all(n.name in r.shapes for r in others) and n.name in base.shapes
            if symbolic is None and not reached and n.op not in ("get_attr", "output"):
                self.unknown_nodes.add(n.name)
            if reached:
                varies = any(_concrete_depends(base.shapes.get(n.name), r.shapes[n.name]) for r in others)
                if not varies:
                    out[n.name] = set()
                    self.constant_nodes.add(n.name)
                else:
                    out[n.name] = symbolic or set(self.dim_names)
            else:
                out[n.name] = symbolic if symbolic is not None else set()
        return out

    def _node_spatial(self, n: torch.fx.Node | None, spatial: dict[str, set[str]]) -> set[str]:
        if n is None:
            return set()
        if n.op == "output":
            deps: set[str] = set()
            for a in n.all_input_nodes:
                deps |= spatial.get(a.name, set())
            return deps
        return spatial.get(n.name, set())

    def _output_node(self) -> torch.fx.Node | None:
        return next((n for n in reversed(self.nodes) if n.op == "output"), None)

    def _head_nodes(self, spatial: dict[str, set[str]], rigid: set[str]) -> list[torch.fx.Node]:
        """Nodes that end the spatial part: non-spatial output from a spatial input, with no spatial
        node downstream (so squeeze-excite pooling, broadcast back onto the map, is not a head)."""
        downstream_spatial: dict[str, bool] = {}
        for n in reversed(self.nodes):
            downstream_spatial[n.name] = any(
                bool(spatial.get(u.name)) or downstream_spatial.get(u.name, False) or _writes_into_spatial(u, spatial)
                for u in n.users)
        heads = []
        for n in self.nodes:
            if n.op in ("placeholder", "output", "get_attr") or spatial.get(n.name) or n.name in rigid \
                    or n.name in self.unknown_nodes:
                continue
            if not self._is_tensor(n.name):
                continue  # sizes and other Python values are not the head
            if any(spatial.get(a.name) and self._is_tensor(a.name) for a in n.all_input_nodes) \
                    and not downstream_spatial[n.name]:
                heads.append(n)
        return heads

    def _is_tensor(self, name: str) -> bool:
        """A tensor-valued node: by its symbolic value, else (the symbolic run stopped before it) by
        the example run's shape."""
        if name in self.sym.values:
            return bool(_tensors(self.sym.values[name]))
        return isinstance(getattr(self, "base_shapes", {}).get(name), tuple)



_VIEW_OPS = {"slice", "select", "view", "getitem", "narrow", "as_strided", "alias", "unsqueeze", "squeeze",
             "permute", "transpose", "expand", "diagonal", "unfold", "t"}


def _target_name(n: torch.fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    packet = getattr(n.target, "_overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(n.target, "__name__", "") or ""


def _writes_into_spatial(n: torch.fx.Node, spatial: dict[str, set[str]]) -> bool:
    """An in-place write (`out[..., :4, :4] = f`, `x.copy_(f)`, `x.add_(f)`, export's aten `copy_`
    into a slice) into a spatial tensor, or into a view of one: the value written reaches the map,
    however the write's own output looks."""
    import operator

    if n.op not in ("call_function", "call_method"):
        return False
    name = _target_name(n)
    inplace = n.target is operator.setitem or (name.endswith("_") and not name.startswith("_"))
    target = n.args[0] if n.args else None
    while inplace and isinstance(target, torch.fx.Node):
        if spatial.get(target.name):
            return True
        if target.op not in ("call_function", "call_method") or _target_name(target).strip("_") not in _VIEW_OPS:
            return False
        target = target.args[0] if target.args else None
    return False
