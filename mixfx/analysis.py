"""Is this network truly convolutional? The analyser behind `mixfx analyze`.

Pipeline (see DESIGN.md): trace -> one concrete run at the example size (the model must accept its
own example) -> one symbolic run (H, W as ShapeEnv symbols, guards attributed per node) -> meaning
of each guard (formulas.characterise) -> rigid nodes, head, global mixing, constraints, output
formula -> concrete runs at two other sizes (and at sizes that violate each constraint) to confirm
the verdict; where symbolic and concrete answers disagree the report says so, and the concrete
answer wins for rigidity.
"""
from __future__ import annotations

import operator
import time
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

from mixfx.errors import InputSpecError
from mixfx.formulas import GuardMeaning, characterise, format_expr, free_input_symbols
from mixfx.report import AnalysisReport, ConcreteCheck, GlobalMixing, HeadInfo, NodeInfo, RigidNode
from mixfx.shape_rules import TENSOR_LIKE
from mixfx.shapes import ConcreteRun, flatten_outputs, propagate_concrete, propagate_symbolic
from mixfx.tracing import Leaf, TraceResult, trace


# A symbolic run of a ResNet-50 takes ~0.3 s, of a ViT-L ~1 s; the few that take longer are windowed
# models whose size expressions grow with every padded stage (minutes, for Swin).
DEFAULT_SYMBOLIC_BUDGET_S = 5.0


# ----------------------------------------------------------------------------- node descriptions
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


# ----------------------------------------------------------------------------- the analyser
class _Analyser:
    def __init__(self, gm: torch.fx.GraphModule, example_shape: tuple[int, ...], model_name: str, tracer: str,
                 is_timm: bool, symbolic_budget_s: float | None = None):
        self.gm = gm
        self.symbolic_budget_s = symbolic_budget_s
        self.example = tuple(example_shape)
        self.model_name = model_name
        self.tracer = tracer
        self.is_timm = is_timm
        self.nodes = list(gm.graph.nodes)
        self.by_name = {n.name: n for n in self.nodes}
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.example_run: ConcreteRun | None = None  # the tracer's clean run at the example, if any

    # -- runs -------------------------------------------------------------------------------
    def run(self) -> AnalysisReport:
        t0 = time.perf_counter()
        base = self.example_run if self.example_run is not None else propagate_concrete(self.gm, self.example)
        self.base_probe_failures = base.probe_failures
        self.notes.extend(base.notes)
        self._require_example_ok(base)
        self.timings["concrete_example_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sym = propagate_symbolic(self.gm, self.example, budget_s=self.symbolic_budget_s)
        self.timings["symbolic_s"] = time.perf_counter() - t0
        self.sym = sym
        self.symbols = sym.symbols
        self.dim_names = list(self.symbols)
        self.example_sizes = {name: self.example[2 + i] for i, name in enumerate(self.dim_names)}
        if sym.failure is not None:
            n = self.by_name.get(sym.failure.node)
            self.notes.append(
                f"Symbolic propagation stopped at `{sym.failure.node}`"
                f"{f' ({module_path(n)})' if n is not None and module_path(n) else ''}: {sym.failure.error} "
                f"[{sym.failure.kind}]. Nodes after it are judged from concrete runs only.")

        t0 = time.perf_counter()
        meanings = self._guard_meanings()
        rigid = self._rigid_nodes(meanings)
        constraints = self._constraints(meanings)
        self.timings["guards_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sizes = self._other_sizes(constraints)
        others = [propagate_concrete(self.gm, s, example_probe_failures=base.probe_failures) for s in sizes]
        spatial = self._spatial_nodes(base, others)
        head_nodes = self._head_nodes(spatial, {r.node for r in rigid})
        mixing = [m for m in self._global_mixing()
                  if not self._contracted_is_constant(m.node, base, others)]
        mixing += self._concrete_mixing(base, others)
        checks, disagreements, rigid = self._confirm(rigid, base, others)
        kept, dropped_constraints = self._confirm_constraints(constraints, bool(rigid))
        self.timings["concrete_checks_s"] = time.perf_counter() - t0

        outputs = self._outputs()
        out_spatial = any(self._node_spatial(self._output_node(), spatial))
        if rigid:
            cls = "fixed"
        elif mixing:
            cls = "polymorphic"
        else:
            cls = "convolutional"
        head = head_nodes[0] if head_nodes else None
        report = AnalysisReport(
            model=self.model_name,
            input_shape=list(self.example),
            tracer=self.tracer,
            classification=cls,
            fully_convolutional=(cls == "convolutional" and out_spatial),
            summary="",
            rigid_nodes=rigid,
            head=HeadInfo(head.name, module_path(head), op_name(head, self.gm)) if head is not None else None,
            global_mixing=mixing,
            constraints=kept,
            output_shape=outputs[0] if outputs else [],
            outputs=outputs,
            concrete_checks=checks,
            disagreements=disagreements,
            notes=self.notes,
            dropped_guards=dropped_constraints + self.noise,
            unknown_nodes=[sym.failure.node] if sym.failure is not None else [],
        )
        report.nodes = self._node_table(spatial, rigid, mixing, head_nodes)
        report.summary = _summary(report)
        return report

    def _require_example_ok(self, base: ConcreteRun) -> None:
        if base.failure is None:
            if base.failed_asserts:
                self.notes.append("The example input fails the model's own size check(s): "
                                  + ", ".join(base.failed_asserts) + ".")
            return
        n = self.by_name.get(base.failure.node)
        where = f"`{base.failure.node}`" + (f" ({module_path(n)}, {op_name(n, self.gm)})" if n is not None else "")
        if base.failure.kind in ("unsupported", "data_dependent"):
            self.notes.append(f"Concrete shape propagation cannot run {where}: {base.failure.error}.")
            return
        raise InputSpecError(
            f"The model fails on its example input of shape {'x'.join(map(str, self.example))} at {where}: "
            f"{base.failure.error}.",
            "Check the input shape (--input, or the model file's INPUT_SHAPE / example_inputs()): its rank and "
            "channel count must be what the model expects.")

    # -- guards ---------------------------------------------------------------------------------
    def _guard_meanings(self) -> dict[str, list[tuple[Any, list[GuardMeaning]]]]:
        cache: dict[str, list[GuardMeaning]] = {}
        out: dict[str, list[tuple[Any, list[GuardMeaning]]]] = {}

        def meaning(expr):
            key = str(expr)
            if key not in cache:
                cache[key] = characterise(expr, self.symbols, self.example_sizes)
            return cache[key]

        for name, exprs in self.sym.guards.items():
            out[name] = [(e, meaning(e)) for e in exprs]
        self.assert_meanings = {}
        for name, cond in self.sym.asserts.items():
            if cond is None or isinstance(cond, bool):
                continue
            try:
                self.assert_meanings[name] = (cond, meaning(cond))
            except Exception:  # noqa: BLE001 - an unreadable check is reported, not fatal
                self.notes.append(f"Could not read the size check at `{name}`.")
        return out

    def _rigid_nodes(self, meanings) -> list[RigidNode]:
        rigid: list[RigidNode] = []
        seen: set[str] = set()
        example_txt = "x".join(str(v) for v in self.example_sizes.values())
        for n in self.nodes:
            if n.name in self.assert_meanings:
                cond, ms = self.assert_meanings[n.name]
                fixed = [m for m in ms if m.kind == "fixed"]
                if fixed:
                    text = " and ".join(dict.fromkeys(m.text for m in fixed))
                    mod = self._assert_module(n)
                    rigid.append(RigidNode(
                        n.name, mod, "assert", "guarded",
                        f"explicit size check: requires {text} (the input must be {example_txt})",
                        text, self._cure_for_guard(mod)))
            texts = [m.text for _, ms in meanings.get(n.name, []) for m in ms if m.kind == "fixed"]
            new = [t for t in dict.fromkeys(texts) if t not in seen]
            seen.update(texts)
            if new:
                rigid.append(self._structural(n, " and ".join(new), example_txt))
        return _merge_guards(rigid, example_txt)

    def _assert_module(self, n: torch.fx.Node) -> str | None:
        mod = module_path(n)
        if mod:
            return mod
        for user_or_arg in [*n.all_input_nodes]:
            m = module_path(user_or_arg)
            if m:
                return m
        # the size check sits before the first module that reads the input
        for m in self.nodes:
            if m.op == "call_module":
                return str(m.target).rsplit(".", 1)[0] or str(m.target)
        return None

    def _cure_for_guard(self, mod: str | None) -> str | None:
        if self.is_timm:
            return "timm: build the model with dynamic_img_size=True (or img_size=your size)."
        return "Remove or relax the explicit size check if the layers after it accept other sizes."

    def _structural(self, n: torch.fx.Node, condition: str, example_txt: str) -> RigidNode:
        op = op_name(n, self.gm)
        mod = module_path(n)
        in_val = self.sym.values.get(n.args[0].name) if n.args and isinstance(n.args[0], torch.fx.Node) else None
        cure = None
        if n.op == "call_module" and isinstance(self.gm.get_submodule(str(n.target)), (nn.Linear, nn.Conv1d)):
            sub = self.gm.get_submodule(str(n.target))
            width = sub.in_features if isinstance(sub, nn.Linear) else sub.in_channels
            dim = _format_dim(_tensors(in_val)[0].shape[-1 if isinstance(sub, nn.Linear) else 1], self.symbols) \
                if _tensors(in_val) else "?"
            what = "Linear" if isinstance(sub, nn.Linear) else "Conv1d (tokens as channels)"
            reason = (f"{what} over {width} tokens = {dim}: a fixed-size weight mixes along a spatial dim, so the "
                      f"input must satisfy {condition} (e.g. {example_txt})")
            cure = "None short of changing the architecture: token mixing over a fixed token count is what makes it fixed."
        elif op in ("aten.linear", "linear") and len(n.args) > 1 and isinstance(n.args[1], torch.fx.Node) \
                and n.args[1].op == "get_attr" and _tensors(in_val):
            weight = self.gm.get_parameter(str(n.args[1].target)) if _has_param(self.gm, str(n.args[1].target)) else None
            width = weight.shape[1] if weight is not None else "?"
            dim = _format_dim(_tensors(in_val)[0].shape[-1], self.symbols)
            reason = (f"Linear over {width} positions = {dim}: a fixed-size weight mixes along a spatial dim, so the "
                      f"input must satisfy {condition} (e.g. {example_txt})")
            cure = "None short of changing the architecture: mixing over a fixed number of positions is what makes it fixed."
        elif any(a.op == "get_attr" for a in n.all_input_nodes) and op in ("add", "aten.add", "mul", "aten.mul", "iadd"):
            param = next(a for a in n.all_input_nodes if a.op == "get_attr")
            p = self.gm.get_parameter(str(param.target)) if _has_param(self.gm, str(param.target)) else None
            shape = list(p.shape) if p is not None else "?"
            mod = str(param.target)
            reason = (f"adds the fixed-size parameter `{param.target}` {shape} (a position embedding) to a "
                      f"spatial tensor: requires {condition} (e.g. {example_txt})")
            cure = ("Interpolate the position embedding to the token grid"
                    + (" (timm: dynamic_img_size=True)." if self.is_timm else "."))
        elif op in ("view", ".view()", ".reshape()", "reshape", "aten.view", "aten.reshape", "aten._unsafe_view"):
            reason = f"reshape to hard-coded sizes: requires {condition} (e.g. {example_txt})"
            cure = "Compute the target shape from x.shape instead of constants."
        else:
            reason = f"{op} only works when {condition} (e.g. {example_txt})"
        return RigidNode(n.name, mod, op, "structural", reason, condition, cure)

    def _constraints(self, meanings) -> list[GuardMeaning]:
        out: dict[str, GuardMeaning] = {}
        self.noise: list[str] = []
        all_meanings = [ms for entries in meanings.values() for _, ms in entries]
        all_meanings += [ms for _, ms in self.assert_meanings.values()]
        for ms in all_meanings:
            for m in ms:
                if m.kind in ("always", "specialisation"):
                    continue
                out.setdefault(m.text, m)
        # minimum sizes last, largest first: confirmation keeps the largest that holds per dim
        rest = [m for m in out.values() if m.kind != "min_size"]
        mins = sorted((m for m in out.values() if m.kind == "min_size"), key=lambda m: -(m.bound or 0))
        return rest + mins

    # -- concrete sizes -------------------------------------------------------------------------
    def _other_sizes(self, constraints: list[GuardMeaning]) -> list[tuple[int, ...]]:
        """Two sizes with H != W, near 1.25x/0.875x and 0.75x/1.125x of the example, that satisfy
        every non-pinning guard at once (searched with the guards' own predicates)."""
        from mixfx.formulas import predicate

        if not self.dim_names:
            return []
        exprs = {str(m.expr): m.expr for m in constraints if m.kind != "fixed" and m.expr is not None}
        preds = [predicate(e, self.symbols) for e in exprs.values()]

        def ok(sizes: dict[str, int]) -> bool:
            return all(p(**sizes) for p in preds)

        sizes = []
        for factors in ((1.25, 0.875, 1.125), (0.75, 1.125, 0.875)):
            dims = dict(self.example_sizes)
            for i, name in enumerate(self.dim_names):
                ex = self.example_sizes[name]
                target = max(int(round(ex * factors[i % len(factors)])), 2)
                taken = {dims[n] for n in self.dim_names[:i]} | {ex}
                # at least 1/8 away from the example: a size next to it often rounds to the same
                # token grid (ceil(223/4) == ceil(224/4)) and proves nothing
                near = max(1, ex // 8)
                # nearest size that keeps every guard; if none does (a guard only the example
                # meets), the target itself: a run at the example size would prove nothing
                dims[name] = target if target not in taken else target + 1
                for delta in range(0, 4 * ex):
                    cands = [c for c in (target + delta, target - delta)
                             if c >= 2 and c not in taken and abs(c - ex) >= near]
                    hit = next((c for c in cands if ok({**dims, name: c})), None)
                    if hit is not None:
                        dims[name] = hit
                        break
            sizes.append((*self.example[:2], *(dims[n] for n in self.dim_names)))
        return sizes

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
                bool(spatial.get(u.name)) or downstream_spatial.get(u.name, False) for u in n.users)
        heads = []
        for n in self.nodes:
            if n.op in ("placeholder", "output", "get_attr") or spatial.get(n.name) or n.name in rigid \
                    or n.name in self.unknown_nodes:
                continue
            if not _tensors(self.sym.values.get(n.name)) and n.name in self.sym.values:
                continue  # sizes and other Python values are not the head
            if any(spatial.get(a.name) and _tensors(self.sym.values.get(a.name, 1)) for a in n.all_input_nodes) \
                    and not downstream_spatial[n.name]:
                heads.append(n)
        return heads

    def _global_mixing(self) -> list[GlobalMixing]:
        activations = self._activation_nodes()
        found = []
        for n in self.nodes:
            reason = self._mixing_reason(n, activations)
            if reason:
                found.append(GlobalMixing(n.name, module_path(n), op_name(n, self.gm), reason))
        return found

    def _concrete_mixing(self, base: ConcreteRun, others: list[ConcreteRun]) -> list[GlobalMixing]:
        """Global mixing where the symbolic run did not reach (it stopped or ran out of budget):
        attention, a matmul of two activations or an RNN whose length differs between the
        concrete runs."""
        if not others or self.sym.failure is None:
            return []
        activations = self._activation_nodes()
        found = []
        for n in self.nodes:
            if n.name in self.sym.values or n.op not in ("call_function", "call_method", "call_module"):
                continue
            match = self._contracted_operand(n)
            if match is None or (match[0] != "sequence" and sum(
                    isinstance(a, torch.fx.Node) and a.name in activations for a in n.args) < 2):
                continue
            lengths = self._concrete_lengths(match[1], match[2], base, others)
            if lengths is not None and len(set(lengths)) > 1:
                sizes = ", ".join(f"{length} at {'x'.join(map(str, run.input_shape[2:]))}"
                                  for length, run in zip(lengths, (base, *others)))
                found.append(GlobalMixing(n.name, module_path(n), op_name(n, self.gm),
                                          f"runs along a length that grows with the input ({sizes}; from concrete "
                                          "runs): every position mixes with every other"))
        return found

    def _contracted_operand(self, n: torch.fx.Node) -> tuple[str, torch.fx.Node, int] | None:
        """(kind, operand, axis) a mixing op runs along: the key's tokens for "attention", the
        first operand's last dim for a "matmul", the sequence dim for a "sequence" module
        (RNN/MultiheadAttention)."""
        name = op_name(n, self.gm)
        if name in _SDPA_TARGETS or getattr(n.target, "__name__", "") == "scaled_dot_product_attention":
            kind, operand, axis = "attention", (n.args[1] if len(n.args) > 1 else n.kwargs.get("key")), -2
        elif (n.target in _MATMUL_TARGETS or name in _MATMUL_TARGETS) and "einsum" not in name and n.args:
            kind, operand, axis = "matmul", n.args[0], -1
        elif n.op == "call_module" and isinstance(self.gm.get_submodule(str(n.target)), _SEQUENCE_MODULES) and n.args:
            batch_first = getattr(self.gm.get_submodule(str(n.target)), "batch_first", False)
            kind, operand, axis = "sequence", n.args[0], (1 if batch_first else 0)
        else:
            return None
        return (kind, operand, axis) if isinstance(operand, torch.fx.Node) else None

    def _contracted_is_constant(self, node: str, base: ConcreteRun, others: list[ConcreteRun]) -> bool:
        """Windowed attention: the contracted dim looks symbolic but is the same at every size."""
        found = self._contracted_operand(self.by_name[node])
        if not others or found is None:
            return False
        _, operand, axis = found
        lengths = self._concrete_lengths(operand, axis, base, others)
        return lengths is not None and len(set(lengths)) == 1

    @staticmethod
    def _concrete_lengths(operand: torch.fx.Node, axis: int, base: ConcreteRun,
                          others: list[ConcreteRun]) -> list[int] | None:
        shapes = [run.shapes.get(operand.name) for run in (base, *others)]
        if any(not isinstance(sh, tuple) or len(sh) <= (axis if axis >= 0 else -axis - 1) for sh in shapes):
            return None
        return [sh[axis] for sh in shapes]

    def _activation_nodes(self) -> set[str]:
        act: set[str] = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a.name in act for a in n.all_input_nodes):
                act.add(n.name)
        return act

    def _mixing_reason(self, n: torch.fx.Node, activations: set[str]) -> str | None:
        name = op_name(n, self.gm)
        act_args = [a for a in n.args if isinstance(a, torch.fx.Node) and a.name in activations]
        if "einsum" in name and len(act_args) >= 2:
            eq = n.args[0] if isinstance(n.args[0], str) else None
            ops = [v for v in (self.sym.values.get(a.name) for a in n.args if isinstance(a, torch.fx.Node))
                   if isinstance(v, TENSOR_LIKE)]
            if eq and "->" in eq:
                lhs, rhs = eq.replace(" ", "").split("->")
                for letters, t in zip(lhs.split(","), ops):
                    for letter, size in zip(letters, t.shape):
                        if letter not in rhs and _dim_symbols(size, self.symbols):
                            return f"einsum contracts '{letter}' of size {_format_dim(size, self.symbols)} between activations"
            return None
        found = self._contracted_operand(n)
        if found is None or (found[0] == "matmul" and len(act_args) < 2):
            return None
        kind, operand, axis = found
        value = self.sym.values.get(operand.name)
        if not isinstance(value, TENSOR_LIKE) or value.dim() < (axis + 1 if axis >= 0 else -axis):
            return None
        length = value.shape[axis]
        deps = _dim_symbols(length, self.symbols)
        if not deps:
            return None
        size = _format_dim(length, self.symbols)
        if kind == "matmul":
            return (f"matmul of two activations contracts a dim of size {size} (depends on {', '.join(sorted(deps))}): "
                    "every position mixes with every other (global attention)")
        if kind == "attention":
            return f"attention over a sequence of {size} positions (global attention)"
        return f"{type(self.gm.get_submodule(str(n.target))).__name__} runs along a sequence of {size} positions"

    # -- confirmation ---------------------------------------------------------------------------
    def _confirm(self, rigid: list[RigidNode], base: ConcreteRun, others: list[ConcreteRun]):
        checks = [self._check(base, True)]
        disagreements = []
        expect_ok = not rigid
        for run in others:
            check = self._check(run, expect_ok)
            checks.append(check)
            if check.agrees:
                continue
            size = "x".join(map(str, run.input_shape[2:]))
            if expect_ok and run.failure is not None and run.failure.kind == "shape":
                n = self.by_name.get(run.failure.node)
                if all(r.node != run.failure.node for r in rigid):
                    rigid.append(RigidNode(
                        run.failure.node, module_path(n) if n is not None else None,
                        op_name(n, self.gm) if n is not None else "?", "structural",
                        f"fails at {size} although the symbolic run found no size constraint: {run.failure.error}",
                        f"fails at {size}", None, source="concrete"))
                disagreements.append(
                    f"Symbolic analysis found no rigid node, but the concrete run at {size} fails at "
                    f"`{run.failure.node}`; the concrete result wins.")
            elif expect_ok and run.failed_asserts:
                disagreements.append(f"The concrete run at {size} fails the size check(s) "
                                     f"{', '.join(run.failed_asserts)} that the symbolic run could not read.")
            elif expect_ok:
                disagreements.append(f"The concrete run at {size} could not run: {run.failure.error if run.failure else '?'}")
            else:
                disagreements.append(
                    f"Symbolic analysis found rigid node(s) {', '.join(r.node for r in rigid)}, yet the model runs at "
                    f"{size}.")
        if not expect_ok and others and all(c.ok and not c.failed_asserts for c in checks[1:]):
            # every other size runs: the pinning guards were branches taken at the example size
            # (e.g. `if new_size == old_size: return`), not requirements. The concrete answer wins.
            for r in rigid:
                self.notes.append(f"`{r.node}` ({r.module}) branches on {r.condition} at the example size, but the "
                                  "model runs at other sizes: not rigid.")
            rigid = []
            disagreements = []  # explained: the notes above say which branch the example size took
            for c in checks:
                c.expected_ok = True
        return checks, disagreements, rigid

    def _check(self, run: ConcreteRun, expected: bool) -> ConcreteCheck:
        n = self.by_name.get(run.failure.node) if run.failure else None
        return ConcreteCheck(list(run.input_shape), run.ok, run.failure.node if run.failure else None,
                             module_path(n) if n is not None else None, run.failure.error if run.failure else None,
                             list(run.failed_asserts), expected)

    def _confirm_constraints(self, constraints: list[GuardMeaning], fixed: bool) -> tuple[list[str], list[str]]:
        """Keep a guard as an input constraint only if a size that violates it *and satisfies
        every other guard* fails to run. A guard no such size exists for is implied by the others
        (dropped as redundant); one whose violating size runs is a branch taken at the example
        size, not a requirement. The survivors are summarised per dim."""
        from mixfx.formulas import WINDOW, predicate, summarise_domain

        guards = [m for m in constraints if m.kind != "fixed" and m.expr is not None]
        unique = list({str(m.expr): m for m in guards}.values())
        kept: list[GuardMeaning] = list(unique)
        dropped: list[str] = []
        if not fixed:
            runs = 0
            # most complex first: a tangle of reshape guards is dropped as implied by the simple
            # divisibility it encodes, not the other way round
            for m in sorted(unique, key=lambda g: -len(str(g.expr))):
                others = [predicate(o.expr, self.symbols) for o in kept if o is not m]
                mine = predicate(m.expr, self.symbols)
                size = self._counterexample(mine, others, m.symbols, WINDOW)
                if size is None:
                    kept.remove(m)
                    continue
                if runs >= 12:
                    continue
                runs += 1
                run = propagate_concrete(self.gm, size, example_probe_failures=self.base_probe_failures)
                if run.ok and not run.failed_asserts:
                    kept.remove(m)
                    dropped.append(f"{m.text} (the model runs at {'x'.join(map(str, size[2:]))})")
        one_dim = [m for m in kept if len(m.symbols) == 1 or m.kind != "other"]
        texts = summarise_domain([m.expr for m in one_dim], self.symbols, self.example_sizes)
        texts += [m.text for m in kept if m not in one_dim]
        return list(dict.fromkeys(texts)), dropped

    def _counterexample(self, mine, others, dims, window: int) -> tuple[int, ...] | None:
        """The size nearest the example (one dim varied) where `mine` fails and all `others` hold."""
        best = None
        for name in dims:
            ex = self.example_sizes[name]
            for x in sorted(range(2, ex + 2 * window), key=lambda v: abs(v - ex)):
                sizes = {**self.example_sizes, name: x}
                if not mine(**sizes) and all(o(**sizes) for o in others):
                    if best is None or abs(x - ex) < best[0]:
                        best = (abs(x - ex), sizes)
                    break
        if best is None:
            return None
        return (*self.example[:2], *(best[1][n] for n in self.dim_names))

    # -- outputs & node table ------------------------------------------------------------------
    def _outputs(self) -> list[list[str]]:
        out = self._output_node()
        if out is None:
            return []
        value = out.args[0] if out.args else None
        shapes = []
        for t in _tensors(_map_nodes(value, self.sym.values)):
            shapes.append([_format_dim(d, self.symbols) for d in t.shape])
        return shapes

    def _node_table(self, spatial, rigid, mixing, heads) -> list[NodeInfo]:
        rigid_by = {r.node: r for r in rigid}
        mixing_by = {m.node: m for m in mixing}
        head_names = {h.name for h in heads}
        table = []
        for n in self.nodes:
            if n.op == "output":
                continue
            value = self.sym.values.get(n.name)
            if n.name in rigid_by:
                status, detail = ("guarded" if rigid_by[n.name].kind == "guarded" else "rigid"), rigid_by[n.name].reason
            elif n.name in mixing_by:
                status, detail = "global_mixing", mixing_by[n.name].reason
            elif n.name in head_names:
                status, detail = "head", "ends the spatial part of the network"
            elif self.sym.failure is not None and n.name == self.sym.failure.node:
                status, detail = "unknown", self.sym.failure.error
            elif n.name not in self.sym.values and n.op != "get_attr":
                status, detail = "unknown", None
            else:
                status, detail = ("spatial" if spatial.get(n.name) else "static"), None
            table.append(NodeInfo(n.name, op_name(n, self.gm), module_path(n), _format_shape(value, self.symbols),
                                  status, sorted(spatial.get(n.name, set()), key=self.dim_names.index),
                                  [a.name for a in n.all_input_nodes], detail))
        return table


def _merge_guards(rigid: list[RigidNode], example_txt: str) -> list[RigidNode]:
    """One entry per explicit size check site: `H == 224` and `W == 224` at `stem` read as one."""
    out: list[RigidNode] = []
    for r in rigid:
        prev = out[-1] if out else None
        if prev is not None and r.kind == prev.kind == "guarded" and r.module == prev.module:
            prev.condition = f"{prev.condition} and {r.condition}"
            prev.reason = f"explicit size check: requires {prev.condition} (the input must be {example_txt})"
            continue
        out.append(r)
    return out


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


def _summary(r: AnalysisReport) -> str:
    if r.classification == "fixed":
        structural = [n for n in r.rigid_nodes if n.kind == "structural"]
        guarded = [n for n in r.rigid_nodes if n.kind == "guarded"]
        first = (structural or guarded)[0]
        text = f"fixed-resolution: polymorphism breaks at `{first.module or first.node}` ({first.op}): {first.reason}."
        if structural and guarded:
            text += f" An explicit size check at `{guarded[0].module or guarded[0].node}` also pins the input."
        return text
    if r.classification == "polymorphic":
        m = r.global_mixing[0]
        return (f"shape-polymorphic but not convolutional: global mixing at `{m.module or m.node}` ({m.op}): "
                f"{m.reason}.")
    kind = "fully convolutional (the output is spatial)" if r.fully_convolutional else "truly convolutional"
    head = f" up to the head `{r.head.module or r.head.node}` ({r.head.op})" if r.head else ""
    return f"{kind}: every tensor keeps varying with the input size{head}."


# ----------------------------------------------------------------------------- public entry point
def analyze(
    model: nn.Module | TraceResult,
    example_input: torch.Tensor | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    leaves: Sequence[Leaf] = (),
    name: str | None = None,
    symbolic_budget_s: float | None = DEFAULT_SYMBOLIC_BUDGET_S,
) -> AnalysisReport:
    """Analyse `model` at `example_input` (or a random input of `input_shape`, default
    1x3x224x224). Works on models built on the meta device: no forward computation is done.

    `symbolic_budget_s` caps the symbolic run in CPU-seconds (None: no cap); past it, the nodes not reached are
    judged from concrete runs only, and the report's notes say so.

    Raises `InputSpecError` if the model fails on its own example input and `TraceError` if it
    cannot be traced."""
    t_start = time.perf_counter()
    if example_input is None:
        shape = tuple(input_shape) if input_shape else (1, 3, 224, 224)
        example_input = torch.empty(shape, device="meta")
    if example_input.dim() < 3:
        kind = "token ids, a sequence model?" if not example_input.is_floating_point() else f"rank {example_input.dim()}"
        raise InputSpecError(
            f"non-image input: no spatial dims. The example input has shape {list(example_input.shape)} "
            f"({str(example_input.dtype).replace('torch.', '')}, {kind}); mixfx analyses image-like inputs "
            f"(batch, channels, *spatial) and varies their spatial sizes.",
            "For an image model pass --input with a batch, a channel and at least one spatial dim, e.g. "
            "--input 1x3x224x224; sequence models have no H, W to analyse.")
    t0 = time.perf_counter()
    if isinstance(model, TraceResult):
        traced = model
    elif isinstance(model, torch.fx.GraphModule):
        traced = TraceResult(model, "given")
    else:
        traced = trace(model, example_input, leaves=leaves)
    trace_s = time.perf_counter() - t0
    root = model.graph_module if isinstance(model, TraceResult) else model
    is_timm = type(root).__module__.startswith("timm.") or any(
        type(m).__module__.startswith("timm.") for m in list(root.modules())[:50])
    analyser = _Analyser(traced.graph_module, tuple(example_input.shape), name or type(root).__name__,
                         traced.tracer, is_timm, symbolic_budget_s)
    analyser.notes.extend(f"Tracer fallback: {a}" for a in traced.attempts)
    run = traced.example_run
    if run is not None and run.failure is None and tuple(run.input_shape) == tuple(example_input.shape):
        analyser.example_run = run
    report = analyser.run()
    t0 = time.perf_counter()  # issue 14: receptive fields, report.receptive_field / .tileable
    from mixfx.receptive_field import attach_receptive_fields
    attach_receptive_fields(report, traced.graph_module)
    analyser.timings["receptive_field_s"] = time.perf_counter() - t0
    report.timings = {"trace_s": trace_s, **analyser.timings, "total_s": time.perf_counter() - t_start}
    return report
