"""The analyser: runs the stages of `mixfx.analysis` in data-flow order and writes the report.

trace -> concrete run at the example size (the model must accept its own example) -> symbolic run
(H, W as ShapeEnv symbols, guards attributed per node; `guards`) -> size search on the eager model
(`size_search`: fixed means no other size runs) -> concrete graph runs at sizes that run, for
which node depends on the input size (`head`) -> every torch call of the eager forward judged by
the extent it combines (`locality`) -> verdict, constraints, output formula.
"""
from __future__ import annotations

import dataclasses

import contextlib
import gc
import re
import threading
import time
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

from mixfx.analysis import index_bounds, locality, size_search
from mixfx.analysis.graph_mixing import GraphMixingStage
from mixfx.analysis.guards import GuardStage
from mixfx.analysis.head import HeadStage
from mixfx.analysis.nodes import _format_dim, _format_shape, _map_nodes, _tensors, module_path, op_name
from mixfx.errors import InputSpecError
from mixfx.formulas import GuardMeaning, characterise, predicate
from mixfx.report import (AnalysisReport, ConcreteCheck, GlobalContext, GlobalMixing, HeadInfo, NodeInfo,
                          RigidNode)
from mixfx.shapes import ConcreteRun, propagate_concrete, propagate_symbolic
from mixfx.tracing import Leaf, TraceResult, trace

# A symbolic run of a ResNet-50 takes ~0.3 s, of a ViT-L ~1 s; the few that take longer are windowed
# models whose size expressions grow with every padded stage (minutes, for Swin).
DEFAULT_SYMBOLIC_BUDGET_S = 5.0

# raw sympy in a constraint's text: not for users
_RAW = re.compile(r"Mod\(|FloorDiv|CeilToInt|ModularIndexing|PythonMod|IntTrueDiv|Piecewise|Max\(|Min\(")


# where torch.export's guard log says a guard came from torch's own code
_TORCH_INTERNAL = re.compile(r"(^|/)(_subclasses|_refs|_decomp|_prims|_prims_common|_meta_registrations|fx|_ops|"
                             r"_higher_order_ops|_export|export|nn/functional|_dynamo|utils)/|_ops\.py|functional\.py")


class _Analyser(GuardStage, HeadStage, GraphMixingStage):
    def __init__(self, gm: torch.fx.GraphModule, example_shape: tuple[int, ...], model_name: str, tracer: str,
                 is_timm: bool, symbolic_budget_s: float | None = None, eager: nn.Module | None = None,
                 export_guards: Sequence[tuple[str, str]] = ()):
        self.gm = gm
        self.eager = eager if eager is not None else gm  # every "does it run" question goes here
        self.export_guards = list(export_guards)
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
        self.probes: dict[tuple[int, ...], size_search.Probe] = {}
        self.example_log: locality.OpLog | None = None
        self.specialised = False  # the graph was exported at the example size only
        self.pinned_constraints: list[str] = []  # pins of some dims only, where the others vary
        self.partial_pins: list[RigidNode] = []  # the nodes that make them: rigid, but not fixed
        self.square_only = False  # the size search ran square sizes only (set by run)
        self.expect_batch: int | None = None  # the outputs' leading dim at the example (set by run)

    def _output_batch(self, base: ConcreteRun) -> int | None:
        """The batch, where every tensor output leads with it at the example: another size whose
        outputs lead with something else does not run as the model means to."""
        out = self._output_node()
        shapes = [base.shapes.get(a.name) for a in (out.all_input_nodes if out is not None else [])]
        shapes = [s for s in shapes if isinstance(s, tuple)]
        batch = int(self.example[0])
        return batch if shapes and all(s and int(s[0]) == batch for s in shapes) else None

    def probe(self, shape: Sequence[int]) -> size_search.Probe:
        """Does the eager model run at `shape`? (memoised)"""
        shape = tuple(int(s) for s in shape)
        if shape not in self.probes:
            self.probes[shape] = size_search.probe(self.eager, shape, expect_batch=self.expect_batch)
        return self.probes[shape]

    # -- runs -------------------------------------------------------------------------------
    def run(self) -> AnalysisReport:
        t0 = time.perf_counter()
        base = self.example_run if self.example_run is not None else propagate_concrete(self.gm, self.example)
        self.base_probe_failures = base.probe_failures
        self.base_shapes = base.shapes
        self.expect_batch = self._output_batch(base)
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
        # constraints from the size search: the symbolic run stopped, or ran on a specialised graph
        self.cut_short = (sym.failure is not None and sym.failure.kind == "timeout") or self.specialised
        if sym.failure is not None:
            n = self.by_name.get(sym.failure.node)
            self.notes.append(
                f"Symbolic propagation stopped at `{sym.failure.node}`"
                f"{f' ({module_path(n)})' if n is not None and module_path(n) else ''}: {sym.failure.error} "
                f"[{sym.failure.kind}]. Nodes after it are judged from concrete runs"
                + (" and the constraints come from a size search on the eager model; for the full symbolic "
                   "answer raise the budget (--symbolic-budget SECONDS, 0 for none)." if self.cut_short else " only."))

        t0 = time.perf_counter()
        meanings = self._guard_meanings()
        rigid = self._rigid_nodes(meanings)
        constraints = self._constraints(meanings)
        self.branches = self._export_constraints()
        self.timings["guards_s"] = time.perf_counter() - t0

        # fixed means fixed: which other sizes does the eager model run at?
        t0 = time.perf_counter()
        with index_bounds.collect() as reads:
            search = self._size_search(constraints)
        self.square_only = search.square_only  # H == W: the guards' counterexamples keep it
        self.timings["size_search_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.bounds = self._index_bounds(reads, search)
        running = search.running
        self.timings["index_bounds_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        sizes = self._spatial_sizes(running)
        # shapes only: whether the eager model runs there is the size search's answer, so no value probes
        others = [propagate_concrete(self.gm, s, probe_values=False, allow_real=False) for s in sizes]
        usable = [r for r in others if r.ok]
        for r in others:
            if not r.ok and self.tracer == "export":
                self.notes.append(
                    f"The exported graph fails at {'x'.join(map(str, r.input_shape[2:]))} where the eager model runs: "
                    "torch.export specialised it to the example size; the verdict uses the eager model.")
        spatial = self._spatial_nodes(base, usable)
        checks, disagreements, rigid = self._reconcile(rigid, search)
        self.timings["concrete_checks_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        findings = self._locality(running)
        resized_findings = [f for f in findings or [] if f.kind == "resized"]
        resized = [self._resized_node(f) for f in resized_findings]
        # a resize to a constant size ends the spatial dependence, but positions go on being
        # positions after it: it is not the head
        not_heads = {r.node for r in rigid + self.partial_pins} | {r.node for r in resized} | {
            n.name for n in self.nodes for f in resized_findings
            if (f.function and getattr(n.target, "__name__", None) == f.function)
            or (f.module and (module_path(n) or "").startswith(f.module))}
        head_nodes = self._head_nodes(spatial, not_heads)
        if not running and self.example_log is not None:
            # no other size runs: past a pin every shape is constant, so spatial dependence
            # cannot place the head; positions can (the recorded forward's layouts)
            head_nodes = self._head_from_log(self.example_log) or head_nodes
        if not head_nodes and resized:
            head_nodes = self._head_after(resized, base)
        head = head_nodes[0] if head_nodes else None
        if findings is None:
            mixing = [m for m in self._global_mixing() if not self._contracted_is_constant(m.node, base, usable)]
            mixing += self._concrete_mixing(base, usable)
            context: list[GlobalContext] = []
        else:
            mixing = [GlobalMixing(*self._attribute(f), f.reason) for f in findings if f.kind == "mixing"]
            context = [GlobalContext(*self._attribute(f), f.reason) for f in findings if f.kind == "context"]
        mixing = self._before_head(mixing, head)
        # a summary at the head itself is the head's pooling (spatial pyramid pooling's cells
        # concatenated into the classifier), not context broadcast back onto a map
        context = [c for c in self._before_head(context, head) if head is None or c.node != head.name]
        self.timings["locality_s"] = time.perf_counter() - t0

        fixed = bool(rigid)
        kept, dropped_constraints = self._final_constraints(constraints, rigid, search)
        if not fixed:
            kept += [b.text() for b in self.bounds]
        kept = list(dict.fromkeys(self.pinned_constraints + kept))
        if search.square_only and not fixed:
            square = " == ".join(self.dim_names)
            kept.insert(0, square)
            ran = ", ".join("x".join(map(str, s[2:])) for s in running)
            self.notes.append(f"The model runs at square sizes only ({ran}; none with H != W ran): it requires "
                              f"{square} (a grid's side taken from a token count, `int(sqrt(N))`, does).")
        outputs = self._outputs(search)
        out_spatial = any(self._node_spatial(self._output_node(), spatial))
        if fixed:
            cls = "fixed"
        elif mixing or resized or self.partial_pins:
            cls = "polymorphic"
        else:
            cls = "convolutional"
        report = AnalysisReport(
            model=self.model_name,
            input_shape=list(self.example),
            tracer=self.tracer,
            classification=cls,
            fully_convolutional=(cls == "convolutional" and out_spatial),
            summary="",
            rigid_nodes=rigid + resized + self.partial_pins,
            head=HeadInfo(head.name, module_path(head), op_name(head, self.gm)) if head is not None else None,
            global_mixing=mixing,
            global_context=context,
            constraints=kept,
            output_shape=outputs[0] if outputs else [],
            outputs=outputs,
            concrete_checks=checks,
            disagreements=disagreements,
            notes=self.notes,
            dropped_guards=dropped_constraints + self.noise,
            unknown_nodes=[sym.failure.node] if sym.failure is not None else [],
        )
        report.nodes = self._node_table(spatial, rigid + resized + self.partial_pins, mixing, head_nodes, context)
        report.summary = _summary(report)
        return report

    # -- size search ------------------------------------------------------------------------------
    def _size_search(self, constraints: list[GuardMeaning]) -> size_search.SizeSearch:
        exprs = [m.expr for m in constraints if m.kind != "fixed" and m.expr is not None and not self.cut_short]
        preds = [predicate(e, self.symbols) for e in {str(e): e for e in exprs}.values()]

        def prefer(shape: tuple[int, ...]) -> bool:
            sizes = {n: shape[2 + i] for i, n in enumerate(self.dim_names)}
            return all(p(**sizes) for p in preds)

        search = size_search.search(self.eager, self.example, want=2, prefer=prefer if preds else None,
                                    expect_batch=self.expect_batch)
        for p in search.probes:
            self.probes.setdefault(p.input_shape, p)
        self.search = search
        return search

    def _index_bounds(self, reads: list[index_bounds.IndexRead],
                      search: size_search.SizeSearch) -> list[index_bounds.IndexBound]:
        """Upper bounds from index reads that grow with the input size into a table that does not
        (meta runs cannot see them); where the size search found too few sizes that run, more
        within the bounds."""
        if not index_bounds.size_dependent(reads) or not self.dim_names:
            return []
        bounds = index_bounds.find_bounds(self.probe, self.example, self.dim_names)
        if bounds:
            self.notes.append(index_bounds.note(bounds))
        if len(bounds) > 1:  # each was found with the other dims at the example: do they hold together?
            corner = list(self.example)
            for b in bounds:
                corner[2 + self.dim_names.index(b.dim)] = b.largest
            got = self.probe(tuple(corner))
            if not got.ok and index_bounds.is_bound_error(got.error):
                self.notes.append(f"The index bounds are joint: at {'x'.join(map(str, corner[2:]))} (each dim at its "
                                  f"bound) an index read still fails ({got.error}); each bound holds with the other "
                                  "dims at the example.")
        if bounds and len(search.running) < 2:
            for shape in index_bounds.sizes_within(self.example, bounds, self.dim_names):
                if search.probe_at(shape) is None:
                    search.probes.append(self.probe(shape))
                if len(search.running) >= 2:
                    break
        return bounds

    def _divisibility_base(self, search: size_search.SizeSearch) -> tuple[int, ...]:
        """Where the divisibility search steps up from: the example, or under index bounds (every
        step up from the example may break one) the smallest sizes that ran, where they run."""
        if not self.bounds or not search.running:
            return self.example
        low = tuple(min(s[k] for s in (self.example, *search.running)) for k in range(len(self.example)))
        return low if low != self.example and self.probe(low).ok else self.example

    def _spatial_sizes(self, running: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Sizes for the graph runs that decide which node depends on the input size: one that runs,
        plus a much larger one when the example is small (at 8x8 a stride-32 map is 1x1 at every
        nearby size, and would look constant)."""
        # the largest size that ran: one is enough beside the symbolic expressions (a dim is spatial
        # if it changes there); two cost a graph run more for the same answer
        sizes = sorted(running, key=lambda s: -sum(s[2:]))[:1]
        spatial = self.example[2:]
        if spatial and min(spatial) < 64:
            k = -(-64 // min(spatial))
            big = (*self.example[:2], *(s * k + 8 * i for i, s in enumerate(spatial)))
            if self.probe(big).ok:
                sizes.append(big)
        return sizes

    def _reconcile(self, rigid: list[RigidNode], search: size_search.SizeSearch):
        """The symbolic pins against the eager size search: a model that runs at another size is
        not fixed (its pins were branches taken at the example size); one that runs at none is,
        even where the symbolic run found no pin."""
        example_check = ConcreteCheck(list(self.example), True, expected_ok=True)
        checks = [example_check]
        disagreements: list[str] = []
        running = search.running
        for p in search.probes:
            checks.append(ConcreteCheck(list(p.input_shape), p.ok, self._node_of(p.module), p.module, p.error, [],
                                        expected_ok=bool(running)))
        if rigid and running:
            size = "x".join(map(str, running[0][2:]))
            for r in rigid:
                dims = [i for i, name in enumerate(self.dim_names) if re.search(rf"\b{name}\b", r.condition)]
                if dims and all(s[2 + i] == self.example[2 + i] for s in running for i in dims):
                    # a pin on some dims only (`H == 32`): the others vary, so the model is not fixed,
                    # but every size that runs keeps the pinned dims: a real input constraint
                    self.pinned_constraints.append(r.condition)
                    self.partial_pins.append(dataclasses.replace(
                        r, reason=f"{r.reason}; the other dims vary (the eager model runs at {size}): not fixed, "
                                  f"but {r.condition} holds at every size, so the map does not keep varying"))
                    self.notes.append(f"`{r.module or r.node}` pins {r.condition}; the eager model runs at {size} "
                                      "and other sizes that keep it: not fixed, but not convolutional either.")
                    continue
                self.notes.append(f"`{r.node}` ({r.module}) branches on {r.condition} at the example size, but the "
                                  f"eager model runs at {size}: a branch taken there (or a specialisation), not rigid.")
            return checks, disagreements, []
        if rigid and not running:
            rigid = self._drop_passed(rigid, search)
        if not rigid and not running and search.probes:
            fails = [p for p in search.probes if not p.ok]
            first = fails[0]
            sizes = ", ".join("x".join(map(str, p.input_shape[2:])) for p in fails[:4])
            node, module, op = self._failing_node(first)
            where = module or node or "?"
            rigid = [RigidNode(node or where, module, op, "structural",
                               f"the model runs at no other size tried ({sizes}{', ...' if len(fails) > 4 else ''}); "
                               f"first failure at `{where}`: {first.error}", "the example size only", None,
                               source="concrete")]
            disagreements.append(f"The symbolic run found no rigid node, but the eager model runs at none of "
                                 f"{len(fails)} other sizes (first failure at `{where}`).")
        return checks, disagreements, rigid

    def _drop_passed(self, rigid: list[RigidNode], search: size_search.SizeSearch) -> list[RigidNode]:
        """A pin the graph ran through at a size it rules out was a fake kernel's guard, not a
        requirement (`rfft2` guards on a product of sizes; the filter multiply after it is what
        fails): the rigid nodes are those the first failing size did not pass."""
        fails = [p for p in search.probes if not p.ok]
        exprs = getattr(self, "rigid_exprs", {})
        if not fails or len(rigid) < 2 or not any(exprs.get(r.node) for r in rigid):
            return rigid
        shape = tuple(fails[0].input_shape)
        run = propagate_concrete(self.gm, shape, allow_real=False, example_probe_failures=self.base_probe_failures)
        sizes = dict(zip(self.dim_names, shape[2:]))
        kept = []
        for r in rigid:
            ran = r.node in run.shapes and (run.failure is None or run.failure.node != r.node)
            try:
                violated = bool(exprs.get(r.node)) and not all(predicate(e, self.symbols)(**sizes)
                                                               for e in exprs[r.node])
            except Exception:  # noqa: BLE001 - unevaluable: keep the node
                violated = False
            if r.kind == "structural" and ran and violated:
                dropped = {str(e) for e in exprs[r.node]}
                self.pin_exprs = [e for e in getattr(self, "pin_exprs", []) if str(e) not in dropped]
                self.notes.append(f"`{r.node}` guarded {r.condition} on symbolic shapes, but the graph runs through it "
                                  f"at {'x'.join(map(str, shape[2:]))}: not what pins the size.")
                continue
            kept.append(r)
        return kept or rigid

    # -- locality -------------------------------------------------------------------------------
    def _locality(self, running: list[tuple[int, ...]]) -> list[locality.Finding] | None:
        """Every torch call of the eager forward at the example size and, where another size runs,
        at the largest of them; None when the eager forward cannot be recorded."""
        first = locality.record_ops(self.eager, self.example)
        self.example_log = first if first.error is None else None
        if first.error is not None:
            self.notes.append(f"Could not record the eager forward for the locality check ({first.error}); "
                              "global mixing is read off the graph only.")
            return None
        second = None
        # a second run only where the first has something to judge: an op that combined
        # positions, or a summary broadcast back (a plain CNN's only event is its global pool)
        # (a resize or grid pool counts only where spatial processing follows it: a crop that only
        # drops a class token, or a resize into the classifier, cannot make a finding)
        judged = any(e.kind in ("mixing", "norm", "broadcast") or (e.kind in ("resize", "gridpool") and e.followed)
                     for e in first.events)
        if running and judged:
            # a size that differs from the example along every axis it can (a scan over W is
            # judged on a change of W), then the largest
            big = max(running, key=lambda s: (sum(a != b for a, b in zip(s[2:], self.example[2:])), sum(s[2:])))
            second = locality.record_ops(self.eager, big)
            if second.error is not None:
                second = None
        return locality.judge(first, second, self.dim_names or ["H", "W"])

    def _failing_node(self, probe: Any) -> tuple[str | None, str | None, str]:
        """(node, module, op) where the eager run at a probe's size fails. A failure in the root's
        own forward (a `view(-1, 400)` before the classifier) has no module: the traced graph,
        run at that size on meta tensors, names the node."""
        if probe.module:
            node = self._node_of(probe.module)
            n = self.by_name.get(node) if node else None
            return node, probe.module, op_name(n, self.gm) if n is not None else "?"
        run = propagate_concrete(self.gm, tuple(probe.input_shape), allow_real=False,
                                 example_probe_failures=self.base_probe_failures)
        n = self.by_name.get(run.failure.node) if run.failure is not None else None
        if n is None and run.failure is None and self.expect_batch is not None:
            n = self._batch_taker(run)
        if n is None:
            return None, None, "?"
        return n.name, module_path(n), op_name(n, self.gm)

    def _batch_taker(self, run: ConcreteRun) -> torch.fx.Node | None:
        """The first node whose leading dim is the batch at the example and not at `run`'s size."""
        batch = self.expect_batch
        for n in self.nodes:
            a, b = self.base_shapes.get(n.name), run.shapes.get(n.name)
            if isinstance(a, tuple) and isinstance(b, tuple) and a and b and a[0] == batch and b[0] != batch:
                return n
        return None

    def _node_of(self, module: str | None) -> str | None:
        """The fx node that runs `module` (or the deepest module above it that the graph has)."""
        if module is None:
            return None
        if not hasattr(self, "_module_nodes"):
            self._module_nodes: dict[str, str] = {}
            for n in self.nodes:  # the last tensor-valued node of each module: where its work ends
                mod = module_path(n)
                if mod and n.op not in ("get_attr", "placeholder", "output") and \
                        (n.name not in self.sym.values or _tensors(self.sym.values[n.name])):
                    self._module_nodes[mod] = n.name
        parts = module.split(".")
        for k in range(len(parts), 0, -1):
            got = self._module_nodes.get(".".join(parts[:k]))
            if got is not None:
                return got
        return None

    def _attribute(self, f: locality.Finding) -> tuple[str, str | None, str]:
        """(fx node, module, op) of a finding: the node that runs its module; for code at the top
        level, the node that calls the model's function the op was made in (an autowrapped helper)."""
        node = self._node_of(f.module) if f.module else None
        if node is None:
            node = self._node_by_op(f)
            if node is not None:
                return node, module_path(self.by_name[node]), f.op
        if node is None and f.function:
            node = next((n.name for n in self.nodes if n.op == "call_function"
                         and getattr(n.target, "__name__", None) == f.function), None)
            if node is not None and not f.module:
                return node, f.function, f.op
        return node or f.module or "(top level)", f.module or None, f.op

    def _node_by_op(self, f: locality.Finding) -> str | None:
        """The `f.index`-th node of the finding's op among the nodes of its module (for ops the
        model's own forward makes at the top level)."""
        wanted = f.op.split(".")[-1]
        found = [n.name for n in self.nodes if n.op in ("call_function", "call_method")
                 and (module_path(n) or "") == (f.module or "") and self._is_tensor(n.name)
                 and _node_target_name(n) in (wanted, wanted.replace("multi_head_attention", "multi_head_attention_forward"))]
        if not found:
            return None
        return found[min(f.index, len(found) - 1)]

    def _resized_node(self, f: locality.Finding) -> RigidNode:
        node, module, op = self._attribute(f)
        size = "x".join(map(str, f.out_sizes))
        return RigidNode(node, module, op, "resized",
                         f"{f.reason} (the model accepts any size only because it resizes to {size} first)",
                         f"resized to {size}", "Process the input at its own size (drop the resize), or resize "
                         "outside the model.", source="concrete")

    def _head_from_log(self, log: locality.OpLog) -> list[torch.fx.Node]:
        """The fx node of the recorded op where positions stop being positions."""
        end = log.head()
        if end is None:
            return []
        module, op, index = end
        finding = locality.Finding("head", module, op, "", index=index)
        node = self._node_by_op(finding) if not module or self._node_of(module) is None else None
        if node is None and module:
            exact = [n for n in self.nodes if n.op == "call_module" and str(n.target) == module]
            node = exact[0].name if exact else self._node_of(module)
        return [self.by_name[node]] if node in self.by_name else []

    def _head_after(self, resized: list[RigidNode], base: ConcreteRun) -> list[torch.fx.Node]:
        """After a resize to a constant size nothing depends on the input size, but positions go
        on being positions: the head is the first node after it that turns a map or a token
        sequence (rank >= 3) into vectors (rank <= 2, or every dim after the channels 1)."""
        index = {n.name: i for i, n in enumerate(self.nodes)}
        start = min((index.get(r.node, len(self.nodes)) for r in resized), default=len(self.nodes))

        def shape(name: str) -> tuple | None:
            got = base.shapes.get(name)
            return got if isinstance(got, tuple) else None

        for n in self.nodes[start + 1:]:
            out = shape(n.name)
            if out is None or n.op in ("placeholder", "output", "get_attr"):
                continue
            pooled = len(out) <= 2 or all(int(d) == 1 for d in out[2:])
            if pooled and any((s := shape(a.name)) is not None and len(s) >= 3 and any(int(d) > 1 for d in s[2:])
                              for a in n.all_input_nodes):
                return [n]
        return []

    def _before_head(self, found: list, head: torch.fx.Node | None) -> list:
        """A verdict never depends on what happens after the head."""
        if head is None:
            return found
        index = {n.name: i for i, n in enumerate(self.nodes)}
        limit = index[head.name]
        return [f for f in found if index.get(f.node, -1) <= limit]

    # -- constraints ----------------------------------------------------------------------------
    def _export_constraints(self) -> list[str]:
        """Guards torch.export added while tracing: branches on sizes (`if W > 48`) are input
        constraints; a pin (`int()` of a size) is said, never made a rigid node (the eager size
        search decides)."""
        out: list[str] = []
        if not self.export_guards or not self.dim_names:
            return out
        import sympy

        local = {f"d{2 + i}": self.symbols[n] for i, n in enumerate(self.dim_names)}
        for text, where in self.export_guards:
            if _TORCH_INTERNAL.search(where):
                continue  # a kernel's own check (slicing bounds), not the model's code
            try:
                expr = sympy.sympify(text, locals=local)
                meanings = characterise(expr, self.symbols, self.example_sizes)
            except Exception:  # noqa: BLE001 - an unreadable guard is not a constraint we can state
                continue
            for m in meanings:
                branch = _bounded_branch(m, self.symbols, self.example_sizes) if m.kind == "fixed" else None
                if branch is not None:
                    out.append(f"{branch} (a branch taken at the example size, at {where})")
                elif m.kind == "fixed":
                    self.notes.append(f"torch.export specialised the traced graph to {m.text} at {where} (an int() "
                                      "of a size or a branch on it): the graph holds at that size only; whether the "
                                      "model runs elsewhere is decided on the eager model.")
                elif m.kind not in ("always", "specialisation"):
                    out.append(f"{m.text} (a branch taken at the example size, at {where})")
        return list(dict.fromkeys(out))

    def _pinned_sizes(self, exprs: list) -> list[str]:
        """Per dim (the others at the example), the sizes every pin allows: `H == 224`,
        `209 <= H <= 224`."""
        preds = [predicate(e, self.symbols) for e in exprs]
        out = []
        for name, ex in self.example_sizes.items():
            ok = [x for x in range(2, 3 * ex + 1) if all(p(**{**self.example_sizes, name: x}) for p in preds)]
            if not ok:
                return []
            if ok == list(range(ok[0], ok[-1] + 1)):
                out.append(f"{name} == {ok[0]}" if len(ok) == 1 else f"{ok[0]} <= {name} <= {ok[-1]}")
            else:
                out.append(f"{name} in {{{', '.join(map(str, ok[:6]))}{', ...' if len(ok) > 6 else ''}}}")
        return out

    def _final_constraints(self, constraints: list[GuardMeaning], rigid: list[RigidNode],
                           search: size_search.SizeSearch) -> tuple[list[str], list[str]]:
        if rigid:
            # the pin is the constraint; the others hold at the pinned size and would contradict it
            example = "x".join(map(str, self.example[2:]))
            pins = [r.condition if r.condition and not _RAW.search(r.condition) and len(r.condition) <= 80
                    else f"{example} only" for r in rigid]
            exprs = list({str(e): e for e in getattr(self, "pin_exprs", [])}.values())
            if len(exprs) > 1:  # several pins: the sizes they allow together, per dim
                try:
                    together = self._pinned_sizes(exprs)
                except Exception:  # noqa: BLE001 - the pins as they are, then
                    together = []
                pins = together or pins
            return list(dict.fromkeys(pins)), [m.text for m in constraints]
        kept, dropped = self._confirm_constraints(constraints, False)
        readable = []
        for text in kept:
            if _RAW.search(text) or len(text) > 80:
                dropped.append(f"{text[:120]} (not readable in input terms)")
            else:
                readable.append(text)
        if self.cut_short:
            # the guards seen before the budget ran out are a partial list: divisibility comes
            # from the size search instead
            found = size_search.divisibility(self.eager, self._divisibility_base(search), self.dim_names, search)
            for p in search.probes:
                self.probes.setdefault(p.input_shape, p)
            partial = [t for t in readable if "%" in t]
            dropped += [f"{t} (partial: the symbolic run stopped at its budget)" for t in partial]
            readable = [t for t in readable if t not in partial] + [f"{t} (from the size search)" for t in found]
        # a branch is a constraint although other sizes run: they run down the other branch
        return readable + [b for b in self.branches if b not in readable], dropped

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

    # -- outputs & node table ------------------------------------------------------------------
    def _outputs(self, search: size_search.SizeSearch) -> list[list[str]]:
        """Output shapes as formulas of the input dims: from the symbolic run, else (cut short)
        fitted to the eager outputs at the sizes that ran."""
        out = self._output_node()
        if out is None:
            return []
        value = out.args[0] if out.args else None
        mapped = _map_nodes(value, self.sym.values)
        if _tensors(mapped) and all(self.sym.values.get(a.name) is not None for a in out.all_input_nodes):
            return [[_format_dim(d, self.symbols) for d in t.shape] for t in _tensors(mapped)]
        runs = [self.probe(self.example)] + [self.probe(s) for s in search.running]
        runs = [r for r in runs if r.ok and r.out_shapes]
        if not runs:
            return []
        shapes = []
        for k, shape in enumerate(runs[0].out_shapes):
            dims = []
            for j, v in enumerate(shape):
                vals = [(r.input_shape, r.out_shapes[k][j]) for r in runs if len(r.out_shapes) > k
                        and len(r.out_shapes[k]) > j]
                dims.append(_fit_dim(vals, self.dim_names))
            shapes.append(dims)
        return shapes

    def _node_table(self, spatial, rigid, mixing, heads, context=()) -> list[NodeInfo]:
        rigid_by = {r.node: r for r in rigid}
        mixing_by = {m.node: m for m in mixing}
        context_by = {c.node: c for c in context}
        head_names = {h.name for h in heads}
        table = []
        for n in self.nodes:
            if n.op == "output":
                continue
            value = self.sym.values.get(n.name)
            if n.name in rigid_by:
                kind = rigid_by[n.name].kind
                status = {"guarded": "guarded", "resized": "resized"}.get(kind, "rigid")
                detail = rigid_by[n.name].reason
            elif n.name in mixing_by:
                status, detail = "global_mixing", mixing_by[n.name].reason
            elif n.name in head_names:
                status, detail = "head", "ends the spatial part of the network"
            elif n.name in context_by:
                status, detail = "global_context", context_by[n.name].reason
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


def _node_target_name(n: torch.fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    packet = getattr(n.target, "_overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(n.target, "__name__", "") or ""


def _fit_dim(vals: list[tuple[tuple[int, ...], int]], names: list[str]) -> str:
    """A formula for one output dim from (input shape, size) pairs: a constant, or
    ceil(X/k) / X//k of one input dim."""
    sizes = {v for _, v in vals}
    if len(sizes) == 1:
        return str(vals[0][1])
    for i, name in enumerate(names):
        for k in range(1, 129):
            if all(v == -(-shape[2 + i] // k) for shape, v in vals):
                return name if k == 1 else f"ceil({name}/{k})"
            if all(v == shape[2 + i] // k for shape, v in vals):
                return f"{name}//{k}"
    return f"? (varies: {', '.join(str(v) for _, v in vals)})"


def _summary(r: AnalysisReport) -> str:
    if r.classification == "fixed":
        structural = [n for n in r.rigid_nodes if n.kind == "structural"]
        structural = structural or [n for n in r.rigid_nodes if n.kind == "resized"]
        guarded = [n for n in r.rigid_nodes if n.kind == "guarded"]
        first = (structural or guarded)[0]
        text = f"fixed-resolution: polymorphism breaks at `{first.module or first.node}` ({first.op}): {first.reason}."
        if structural and guarded:
            text += f" An explicit size check at `{guarded[0].module or guarded[0].node}` also pins the input."
        return text
    resized = [n for n in r.rigid_nodes if n.kind == "resized"]
    if r.classification == "polymorphic" and resized and not r.global_mixing:
        first = resized[0]
        return (f"accepts any size but is not convolutional: {first.reason} (at `{first.module or first.node}`, "
                f"{first.op}).")
    if r.classification == "polymorphic" and not r.global_mixing:
        first = next(n for n in r.rigid_nodes if n.kind != "resized")
        return (f"accepts other sizes but is not convolutional: `{first.module or first.node}` ({first.op}) pins "
                f"{first.condition} while the other dims vary.")
    if r.classification == "polymorphic":
        m = r.global_mixing[0]
        return (f"shape-polymorphic but not convolutional: global mixing at `{m.module or m.node}` ({m.op}): "
                f"{m.reason}.")
    kind = "fully convolutional (the output is spatial)" if r.fully_convolutional else "truly convolutional"
    head = f" up to the head `{r.head.module or r.head.node}` ({r.head.op})" if r.head else ""
    context = (f"; global context (not mixing) at `{r.global_context[0].module or r.global_context[0].node}`"
               if r.global_context else "")
    return f"{kind}: every tensor keeps varying with the input size{head}{context}."


# ----------------------------------------------------------------------------- public entry point
_frozen = threading.local()


@contextlib.contextmanager
def _collect_own_garbage_only() -> Any:
    """A full garbage collection walks every object the process holds: with torch, timm and
    sympy loaded, 0.15-0.3 CPU-s each, and an analysis allocates enough to trigger several (a
    ResNet-50: 0.46 s with them, 0.16 s without). `gc.freeze()` sets the objects that exist
    before the analysis aside (O(1)), so collections during it walk only its own; `unfreeze()`
    gives them back to the oldest generation. Outermost call only (an analysis inside one)."""
    if getattr(_frozen, "active", False) or not gc.isenabled():
        yield
        return
    _frozen.active = True
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        _frozen.active = False


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
    with _collect_own_garbage_only():
        return _analyze(model, example_input, input_shape=input_shape, leaves=leaves, name=name,
                        symbolic_budget_s=symbolic_budget_s)


def _analyze(model: nn.Module | TraceResult, example_input: torch.Tensor | None, *, input_shape: Sequence[int] | None,
             leaves: Sequence[Leaf], name: str | None, symbolic_budget_s: float | None) -> AnalysisReport:
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
        traced = trace(model, example_input, leaves=leaves,
                       export_budget_s=None if symbolic_budget_s is None else max(10.0, 2 * symbolic_budget_s))
    trace_s = time.perf_counter() - t0
    root = model.graph_module if isinstance(model, TraceResult) else model
    is_timm = type(root).__module__.startswith("timm.") or any(
        type(m).__module__.startswith("timm.") for m in list(root.modules())[:50])
    eager = model if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule) else None
    analyser = _Analyser(traced.graph_module, tuple(example_input.shape), name or type(root).__name__,
                         traced.tracer, is_timm, symbolic_budget_s, eager=eager,
                         export_guards=traced.export_guards)
    analyser.specialised = traced.specialised
    analyser.notes.extend(f"Tracer fallback: {a}" for a in traced.attempts)
    run = traced.example_run
    if run is not None and run.failure is None and tuple(run.input_shape) == tuple(example_input.shape):
        analyser.example_run = run
    report = analyser.run()
    t0 = time.perf_counter()  # receptive fields: report.receptive_field / .tileable, per node
    from mixfx.receptive_field import attach_receptive_fields
    attach_receptive_fields(report, traced.graph_module)
    analyser.timings["receptive_field_s"] = time.perf_counter() - t0
    report.timings = {"trace_s": trace_s, **analyser.timings, "total_s": time.perf_counter() - t_start}
    return report


def _bounded_branch(m, symbols: dict, example: dict[str, int]) -> str | None:
    """A guard of one dim that holds on every size up to a bound (`H <= 40` from `if H > 40:` at
    H = 32) is a branch the example took, not a pin: its bound, read over 1..3x the example."""
    from mixfx.formulas import predicate

    if len(m.symbols) != 1 or m.expr is None:
        return None
    name = m.symbols[0]
    f = predicate(m.expr, symbols)
    try:
        xs = [x for x in range(1, 3 * example[name] + 1) if f(**{**example, name: x})]
    except Exception:  # noqa: BLE001 - unreadable: stays a pin
        return None
    # a half-line from the smallest sizes up: `H // 32 == 7` (an int() of a size) holds on
    # 224..255, a specialisation of the trace, not a branch of the model
    if len(xs) < 2 or xs[0] > 2 or xs != list(range(xs[0], xs[-1] + 1)):
        return None
    return f"{name} <= {xs[-1]}"
