"""Layout clean-up: push permutes through layout-agnostic ops and cancel inverse pairs.

The Linear <-> conv passes wrap every converted op in explicit layout changes
(`permute -> conv -> permute back`). This pass removes the ones that cancel, the way compiler
transpose optimisers do:

1. Cancel/fuse: from a permute `P`, walk forward along single-user, layout-agnostic ops. If
   another permute `Q` follows, `P` moves down to it: the ops in between are rewritten to work on
   the un-permuted tensor, and `Q . P` becomes one permute (none when it is the identity).
2. Hoist: `add(P a, P b)` (same permutation on both operands) becomes `P add(a, b)`.
3. Prefer native ops: `ChannelLayerNorm -> permute(channels last)` becomes
   `permute -> nn.LayerNorm` (this is what makes `--to linear` give back the original modules).

Layout-agnostic ops, and how they change when a permute moves across them:
- elementwise activations, dropout, identity, casts, `contiguous`: unchanged;
- add/sub/mul/div with a scalar, with the same tensor, or with a constant (a parameter of the
  model, broadcast): the constant is reshaped (a `[C]` gamma becomes `[C,1,1]`); only where a
  reshape suffices, so no new permute is ever created;
- LayerNorm over the last dim, when the permute moves channels there (ConvNeXt's
  `permute -> LayerNorm -> permute`): becomes a `ChannelLayerNorm` over dim 1, and back.
Everything else stops the walk (a `view` among them: no permute is moved past one). Each step
removes at least one permute (or, for step 3, one `ChannelLayerNorm`), so the pass terminates.
Values the pass recomputes keep their values, not always their strides: a later `view` that no
longer fits the strides becomes `reshape` (`_fxutil.reshape_where_view_fails`, said in the notes).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from passes import _fxutil as fu
from passes.base import Change, RewritePass, RewritePassResult
from passes.modules import ChannelLayerNorm, channel_layer_norm

POINTWISE_MODULES: tuple[type, ...] = (
    nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Dropout, nn.AlphaDropout, nn.Identity,
)
POINTWISE_FUNCTIONS = {
    F.gelu, F.relu, F.relu6, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
    F.celu, F.selu, F.softplus, F.tanh, F.sigmoid, F.dropout, F.alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt,
    torch.erf, torch.clamp, torch.square, operator.neg, torch.dropout,
}
POINTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "exp", "neg", "abs", "sqrt", "rsqrt", "erf", "square", "clamp", "clamp_min",
    "clamp_max", "contiguous", "float", "double", "half", "bfloat16", "to", "type", "detach", "pow",
}

Apply = Callable[[Node, Node, Node], Node]  # (op node, old input, new input) -> node now holding its value


def _has_node(obj) -> bool:
    found = []
    map_aggregate(obj, lambda a: found.append(a) if isinstance(a, Node) else None)
    return bool(found)


def _binary_operands(node: Node) -> tuple[object, object] | None:
    if node.op == "call_function" and node.target in fu.ARITH_BINARY:
        args = node.args
    elif node.op == "call_method" and node.target in fu.ARITH_BINARY_METHODS:
        args = node.args
    else:
        return None
    if len(args) != 2 or _has_node(node.kwargs):
        return None
    return args[0], args[1]


class LayoutCleanup(RewritePass):
    """Cancel the permutes/transposes the other passes leave (see the module docstring)."""

    name = "layout"

    def __init__(self, example_inputs=None, max_steps: int = 100_000):
        super().__init__()
        self.example_inputs = example_inputs
        self.max_steps = max_steps

    # -- driver ----------------------------------------------------------------------------------
    def call(self, gm: GraphModule) -> RewritePassResult:
        self.gm = gm
        self.shapes = fu.propagate_shapes(gm, self.example_inputs)
        self._input_dependent: set[Node] | None = None
        self.changes: list[Change] = []
        self.touched: list[Node] = []  # nodes whose value is now computed in another memory layout
        before = self._count_permutes()
        steps = 0
        progress = True
        # sweep the graph, applying every rule that fires, until a sweep changes nothing (a sweep
        # goes on after a change instead of starting over: linear, not quadratic, in the graph size)
        while progress and steps < self.max_steps:
            progress = False
            for node in list(gm.graph.nodes):
                if steps >= self.max_steps:
                    break
                if node.graph is None or getattr(node, "_erased", False):
                    continue
                if self._try_cancel(node) or self._try_hoist(node) or self._try_native(node):
                    progress = True
                    steps += 1
        notes = []
        after = self._count_permutes()
        if self.changes:
            fu.prune_unused(gm)
            gm.graph.lint()
            gm.recompile()
            notes.append(f"layout: permutes/transposes in the graph {before} -> {after}")
            touched = [n for n in self.touched if n.graph is not None and not getattr(n, "_erased", False)]
            notes += fu.views_note(self.name, fu.reshape_where_view_fails(gm, touched, self.example_inputs))
        result = RewritePassResult(gm, bool(self.changes), self.changes, [], notes)
        del self.gm, self.shapes, self.touched
        return result

    def _depends_on_input(self, node: Node) -> bool:
        """`fu.depends_on_input`, answered from the input-dependent nodes of the graph as it was
        first asked (a rewrite never makes a constant depend on the input); new nodes are searched."""
        if self._input_dependent is None:
            self._input_dependent = fu.descendants(n for n in self.gm.graph.nodes if n.op == "placeholder")
        return node in self._input_dependent or fu.depends_on_input(node)

    def _count_permutes(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if fu.permutation_of(n, self.shapes) is not None)

    def _erase(self, node: Node) -> None:
        self.gm.graph.erase_node(node)
        node._erased = True  # type: ignore[attr-defined]
        self.shapes.pop(node, None)

    def _describe(self, node: Node) -> str:
        if node.op == "call_module":
            return type(self.gm.get_submodule(node.target)).__name__
        return getattr(node.target, "__name__", str(node.target))

    # -- 1. cancel / fuse --------------------------------------------------------------------------
    def _try_cancel(self, P: Node) -> bool:
        p = fu.permutation_of(P, self.shapes)
        if p is None:
            return False
        chain: list[tuple[Node, Apply]] = []
        cur = P
        while True:
            if len(cur.users) != 1:
                return False
            (u,) = cur.users
            q = fu.permutation_of(u, self.shapes)
            if q is not None and u.args[0] is cur and len(q) == len(p):
                break
            rule = self._rule(u, cur, p)
            if rule is None:
                return False
            chain.append((u, rule))
            cur = u
        Q = u
        x = P.args[0]
        before = " -> ".join([f"permute{p}"] + [self._describe(n) for n, _ in chain] + [f"permute{q}"])
        # Rewrite the chain on the un-permuted tensor.
        old, new = P, x
        rewritten = []
        for node, apply in chain:
            old_shape = self.shapes.get(node)
            replacement = apply(node, old, new)
            if old_shape is not None:
                self.shapes[replacement] = fu.permute_shape(old_shape, fu.inverse(p))
            old, new = node, replacement
            rewritten.append(replacement)
        composed = fu.compose(p, q)
        q_shape = self.shapes.get(Q)
        g = self.gm.graph
        if fu.is_identity(composed):
            Q.replace_all_uses_with(new)
            after_last = []
        else:
            with g.inserting_before(Q):
                fused = g.call_method("permute", (new, *composed))
            self.shapes[fused] = q_shape
            Q.replace_all_uses_with(fused)
            after_last = [f"permute{composed}"]
        self._erase(Q)
        if not P.users:
            self._erase(P)
        self.touched += rewritten + ([fused] if after_last else [])
        after = " -> ".join([self._describe(n) for n in rewritten] + after_last) or "(nothing)"
        modules = [n.target for n, _ in chain if n.op == "call_module"]
        self.changes.append(Change(self.name, f"{P.name}..{Q.name}", ", ".join(modules) or None, before, after))
        return True

    # -- rules: how an op changes when the permute p moves from before it to after it ------------
    def _rule(self, u: Node, cur: Node, p: tuple[int, ...]) -> Apply | None:
        shapes = self.shapes
        if u not in shapes or cur not in shapes or shapes[u] != shapes[cur]:
            return None
        r = len(p)
        if u.op == "call_module":
            mod = self.gm.get_submodule(u.target)
            if u.args[:1] != (cur,) or len(u.args) != 1 or u.kwargs:
                return None
            if isinstance(mod, POINTWISE_MODULES) and type(mod).forward is _base_forward(mod):
                return _replace_input
            if type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1:
                if p[-1] == r - 1:
                    return _replace_input
                if p[-1] == 1 and r >= 3:
                    return self._module_swap(lambda m: ChannelLayerNorm.from_layer_norm(m, r - 2))
                return None
            if type(mod) is ChannelLayerNorm and mod.spatial_dims == r - 2:
                if p[1] == 1:
                    return _replace_input
                if p[1] == r - 1:
                    return self._module_swap(lambda m: m.to_layer_norm())
            return None
        if u.op in ("call_function", "call_method") and u.args and u.args[0] is cur:
            if (u.op == "call_function" and u.target in POINTWISE_FUNCTIONS) or (
                    u.op == "call_method" and u.target in POINTWISE_METHODS):
                if _has_node(u.args[1:]) or _has_node(u.kwargs):
                    return None
                return _replace_input
            if u.op == "call_function" and u.target is F.layer_norm:
                return self._functional_ln_rule(u, cur, p)
            if u.op == "call_function" and u.target is channel_layer_norm:
                return self._functional_cln_rule(u, cur, p)
        operands = _binary_operands(u)
        if operands is not None:
            return self._binary_rule(u, cur, p, *operands)
        return None

    def _module_swap(self, make: Callable[[nn.Module], nn.Module]) -> Apply:
        def apply(u: Node, old: Node, new: Node) -> Node:
            mod = self.gm.get_submodule(u.target)
            replacement = make(mod)
            if fu.call_count(self.gm, u.target) == 1:
                fu.set_module(self.gm, u.target, replacement)
            else:
                path = fu.fresh_path(self.gm, u.target + "_" + type(replacement).__name__.lower())
                self.gm.add_submodule(path, replacement)
                u.target = path
            u.replace_input_with(old, new)
            return u
        return apply

    def _functional_ln_rule(self, u: Node, cur: Node, p: tuple[int, ...]) -> Apply | None:
        r = len(p)
        args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), u.args))
        args.update(u.kwargs)
        shape = args.get("normalized_shape")
        if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 1 or _has_node(shape):
            return None
        if p[-1] == r - 1:
            return _replace_input
        if p[-1] != 1 or r < 3:
            return None

        def apply(u: Node, old: Node, new: Node) -> Node:
            g = self.gm.graph
            with g.inserting_before(u):
                out = g.call_function(channel_layer_norm, (new, args.get("weight"), args.get("bias"),
                                                           args.get("eps", 1e-5), r - 2))
            u.replace_all_uses_with(out)
            self._erase(u)
            return out
        return apply

    def _functional_cln_rule(self, u: Node, cur: Node, p: tuple[int, ...]) -> Apply | None:
        r = len(p)
        args = dict(zip(("x", "weight", "bias", "eps", "spatial_dims"), u.args))
        args.update(u.kwargs)
        if args.get("spatial_dims", 2) != r - 2:
            return None
        if p[1] == 1:
            return _replace_input
        if p[1] != r - 1:
            return None
        channels = self.shapes[cur][1]

        def apply(u: Node, old: Node, new: Node) -> Node:
            g = self.gm.graph
            with g.inserting_before(u):
                out = g.call_function(F.layer_norm, (new, (int(channels),), args.get("weight"), args.get("bias"),
                                                     args.get("eps", 1e-5)))
            u.replace_all_uses_with(out)
            self._erase(u)
            return out
        return apply

    def _binary_rule(self, u: Node, cur: Node, p: tuple[int, ...], a, b) -> Apply | None:
        others = [o for o in (a, b) if o is not cur]
        if len(others) == 0:  # x * x
            return _replace_input
        (other,) = others
        if not isinstance(other, Node):
            return _replace_input if isinstance(other, (int, float, bool)) else None
        if other not in self.shapes or self._depends_on_input(other):
            return None
        r = len(p)
        o_shape = tuple(self.shapes[other])
        if len(o_shape) > r:
            return None
        padded = (1,) * (r - len(o_shape)) + o_shape
        inv = fu.inverse(p)
        target = tuple(fu.permute_shape(padded, inv))
        big = [inv[j] for j in range(r) if padded[inv[j]] != 1]
        if big != sorted(big):
            return None  # would need a permute of the constant; keep the permute instead
        if all(s == 1 for s in padded):
            return _replace_input

        def apply(u: Node, old: Node, new: Node) -> Node:
            g = self.gm.graph
            with g.inserting_before(u):
                reshaped = g.call_method("reshape", (other, target))
            self.shapes[reshaped] = torch.Size(target)
            u.replace_input_with(other, reshaped)
            u.replace_input_with(old, new)
            return u
        return apply

    # -- 2. hoist a common permute out of a binary op ----------------------------------------------
    def _try_hoist(self, u: Node) -> bool:
        operands = _binary_operands(u)
        if operands is None:
            return False
        a, b = operands
        if not (isinstance(a, Node) and isinstance(b, Node)) or a is b:
            return False
        pa, pb = fu.permutation_of(a, self.shapes), fu.permutation_of(b, self.shapes)
        if pa is None or pa != pb or len(a.users) != 1 or len(b.users) != 1:
            return False
        if not (self.shapes.get(a) == self.shapes.get(b) == self.shapes.get(u)):
            return False
        xa, xb = a.args[0], b.args[0]
        out_shape = self.shapes[u]
        g = self.gm.graph
        u.replace_input_with(a, xa)
        u.replace_input_with(b, xb)
        with g.inserting_after(u):
            moved = g.call_method("permute", (u, *pa))
        u.replace_all_uses_with(moved, delete_user_cb=lambda n: n is not moved)
        self.shapes[u] = self.shapes[xa]
        self.shapes[moved] = out_shape
        self._erase(a)
        self._erase(b)
        self.touched.append(moved)
        self.changes.append(Change(self.name, u.name, None, f"{self._describe(u)}(permute{pa}, permute{pa})",
                                   f"permute{pa}({self._describe(u)})"))
        return True

    # -- 3. prefer native ops: ChannelLayerNorm -> channels-last permute ---------------------------
    def _try_native(self, Q: Node) -> bool:
        q = fu.permutation_of(Q, self.shapes)
        if q is None or q[-1] != 1 or len(q) < 3:
            return False
        v = Q.args[0]
        if not isinstance(v, Node) or len(v.users) != 1 or not v.args or not isinstance(v.args[0], Node):
            return False
        is_module = v.op == "call_module" and type(self.gm.get_submodule(v.target)) is ChannelLayerNorm
        is_function = v.op == "call_function" and v.target is channel_layer_norm
        if not (is_module or is_function):
            return False
        y = v.args[0]
        g = self.gm.graph
        with g.inserting_before(v):
            moved = g.call_method("permute", (y, *q))
        self.shapes[moved] = self.shapes[Q]
        if is_module:
            self._module_swap(lambda m: m.to_layer_norm())(v, y, moved)
            out = v
        else:
            out = self._functional_cln_rule(v, y, fu.inverse(q))(v, y, moved)  # type: ignore[misc]
        self.shapes[out] = self.shapes[Q]
        Q.replace_all_uses_with(out)
        self._erase(Q)
        self.touched.append(out)
        self.changes.append(Change(self.name, Q.name, v.target if is_module else None,
                                   f"ChannelLayerNorm -> permute{q}", f"permute{q} -> LayerNorm"))
        return True


def _replace_input(u: Node, old: Node, new: Node) -> Node:
    u.replace_input_with(old, new)
    return u


def _base_forward(mod: nn.Module):
    """The forward of the first torch.nn class in `mod`'s MRO (a subclass overriding it is not trusted)."""
    for cls in type(mod).__mro__:
        if cls.__module__.startswith("torch.nn"):
            return cls.forward
    return None
