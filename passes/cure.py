"""`--to polymorphic`: cure the causes that pin a model to one input size.

The pass finds what breaks by running the graph on meta tensors at a second size
(`passes._cure_probe`), cures the failing node by what it does, and probes again until the graph
runs there (or a node has no cure):
- explicit size checks are dropped (`passes._cure_guard`);
- a constant table added to tokens or a map is resampled to the runtime grid (`passes._cure_pos`);
- view/reshape sizes and fold output sizes written as the example's constants are read from the
  runtime shape (`passes._cure_sizes`);
- a node that takes the grid's side from a token count (`int(sqrt(N))`) runs on square grids only:
  no cure, a constraint (`H == W`, `passes._cure_square`); the pass probes at a square size after it.
- a map brought to the attention window's grid by a fixed number of downsamplings is pooled
  adaptively to that grid (`passes._cure_query`).
Anything else that breaks (a weight over a fixed number of tokens, a flatten into a fixed-size
Linear) has no polymorphic cure: `CureRefused` names each such node with why, nothing is changed.
Equality at the example size, runs at other sizes and the re-analysis are checked by
`mixfx.rewrite` (the pass itself only makes the graph run at the probe size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from mixfx.errors import EXIT_VERIFY, MixfxError
from passes._cure_guard import drop_check, is_size_check
from passes._cure_pos import cure_concat_table, cure_position_add
from passes._cure_probe import Probe, nearest_grids, run_probe
from passes._cure_query import cure_pooled_grid
from passes._cure_relpos import cure_relative_bias
from passes._cure_windows import cure_window_table
from passes._cure_sizes import cure_fold, cure_view, regroups_at_probe, splits_off_grid_count
from passes._cure_square import passes_on_square, square_constraint
from passes._fxutil import depends_on_input, example_inputs_of
from passes.base import Change, RewritePass, RewritePassResult

CURES = (cure_window_table, cure_relative_bias, cure_position_add, cure_concat_table, cure_pooled_grid, cure_view,
         cure_fold)


@dataclass(frozen=True)
class Uncurable:
    """A node that pins the input size and has no polymorphic cure."""

    node: str
    module: str | None
    why: str

    def to_dict(self) -> dict:
        return {"node": self.node, "module": self.module, "why": self.why}


class CureRefused(MixfxError):
    """Some rigid node has no cure: nothing was rewritten or written (exit code 4)."""

    exit_code = EXIT_VERIFY
    kind = "cure"

    def __init__(self, model: str, nodes: Sequence[Uncurable], cured: Sequence[Change] = ()):
        listed = "; ".join(f"`{u.module or u.node}` ({u.node}): {u.why}" for u in nodes)
        where = list(dict.fromkeys(c.module or c.node for c in cured))
        done = (f" (The other {len(cured)} change(s) it would need have a cure: "
                + ", ".join(f"`{m}`" for m in where[:6]) + ("..." if len(where) > 6 else "") + ".)"
                if cured else "")
        hint = ("A flatten into a fixed-size Linear is what `--to fcn` converts." if any("--to fcn" in u.why for u in nodes)
                else "Run the model at its example size, or retrain it without the fixed-size weight.")
        super().__init__(f"{model} cannot be made polymorphic: {listed}.{done} Nothing was rewritten or written.", hint)
        self.nodes = list(nodes)
        self.cured = list(cured)


class Cure(RewritePass):
    """Cure each size-pinning node that has a cure; refuse (`CureRefused`) where one has none.

    `rigid_nodes`: the analysis' `report.rigid_nodes` (optional): their explicit size checks are
    dropped even where the probe size happens to pass them, and their module names and reasons
    label the changes and refusals. The probe stops at the first node without a cure, so a
    refusal names that node (later ones are not reached). Like every pass it changes the graph it
    is given, also when it then refuses: run it on a copy (`mixfx.rewrite` does). After a call,
    `constraints` lists what the cured graph requires of the input (`H == W` for a node that runs
    on square grids only) and `probe_size` the second size it was last probed at."""

    name = "cure"

    def __init__(self, rigid_nodes: Sequence[Any] = (), max_steps: int = 200, model_name: str = "the model"):
        self.rigid_nodes = list(rigid_nodes)
        self.max_steps = max_steps
        self.model_name = model_name
        self.constraints: list[str] = []
        self.probe_size: tuple[int, ...] | None = None

    def call(self, gm: GraphModule) -> RewritePassResult:
        inputs = example_inputs_of(gm)
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 3:
            raise CureRefused(self.model_name, [Uncurable("input", None, "needs an example input [B, C, *spatial]")])
        shape = tuple(inputs[0].shape)
        self.constraints = []
        other: tuple[int, ...] | None = None  # the second size: probe_shape's, or a square one
        by_name = {r.node: r for r in self.rigid_nodes}
        changes: list[Change] = []
        for node in list(gm.graph.nodes):  # the checks the analysis names
            rigid = by_name.get(node.name)
            if rigid is not None and getattr(rigid, "kind", "") == "guarded" and is_size_check(node):
                changes.append(self._dropped(gm, node, getattr(rigid, "module", None)))
        notes: list[str] = []
        last_failure: str | None = None
        regrouped_seen: set[str] = set()
        for _ in range(self.max_steps):
            probe = run_probe(gm, shape, other)
            self.probe_size = tuple(probe.other.input_shape)
            if probe.example.failure is not None:
                raise CureRefused(self.model_name, [Uncurable(
                    probe.example.failure.node, None,
                    f"the graph cannot be probed at its own example size ({probe.example.failure.error})")], changes)
            nodes = {n.name: n for n in gm.graph.nodes}
            failed_checks = [nodes[n] for n in probe.other.failed_asserts if n in nodes and is_size_check(nodes[n])]
            for node in failed_checks:
                changes.append(self._dropped(gm, node, self._module(gm, node)))
            regrouped = next((n for n in gm.graph.nodes if n.name not in regrouped_seen
                              and (regroups_at_probe(n, probe) or splits_off_grid_count(n, probe))), None)
            if regrouped is not None:  # a view whose -1 hides a hard-coded size: cure it before what fails after it
                regrouped_seen.add(regrouped.name)
                before = _describe_node(gm, regrouped)
                description = cure_view(gm, regrouped, probe)
                if description is not None:
                    self._recompile(gm)
                    changes.append(Change(self.name, regrouped.name, self._module(gm, regrouped), before, description))
                    continue
            failure = probe.failure
            if failure is None:
                if failed_checks:
                    self._recompile(gm)
                    continue
                break
            node = nodes.get(failure.node)
            if node is None or failure.node == last_failure or failure.kind != "shape":
                if node is not None and failure.node != last_failure and other is None:
                    other = self._square_only(gm, shape, node, probe, notes)
                    if other is not None:
                        continue
                why = (f"still fails at {_size(self.probe_size)} after its cure ({failure.error})"
                       if failure.node == last_failure else f"fails at {_size(self.probe_size)}: {failure.error}")
                raise CureRefused(self.model_name, [Uncurable(failure.node, self._module(gm, node), why)], changes)
            last_failure = failure.node
            before = _describe_node(gm, node)
            description = next((d for cure in CURES if (d := cure(gm, node, probe)) is not None), None)
            if description is None:
                if other is None:
                    other = self._square_only(gm, shape, node, probe, notes)
                    if other is not None:
                        last_failure = None
                        continue
                raise CureRefused(self.model_name, [self._uncurable(gm, node, probe, failure.error)], changes)
            self._recompile(gm)
            changes.append(Change(self.name, node.name, self._module(gm, node), before, description))
        else:
            raise CureRefused(self.model_name, [Uncurable("graph", None, f"more than {self.max_steps} cures needed")],
                              changes)
        if changes:
            notes.append(f"cured for the runtime size: probed at {_size(shape)} and {_size(self.probe_size or ())} "
                         f"on meta tensors after each of {len(changes)} change(s)")
        return RewritePassResult(gm, bool(changes), changes, notes=notes)

    # --- helpers -------------------------------------------------------------------------------

    def _square_only(self, gm: GraphModule, shape: tuple[int, ...], node: Node, probe: Probe,
                     notes: list[str]) -> tuple[int, ...] | None:
        """Where the graph gets past `node` at a square size (its side taken from a token count):
        the square constraint is recorded and the square size returned, to probe at from now on."""
        square = passes_on_square(gm, shape, node.name)
        if square is None:
            return None
        constraint = square_constraint(shape)
        self.constraints.append(constraint)
        size = _size(tuple(square.other.input_shape))
        notes.append(f"`{self._module(gm, node) or node.name}` ({node.name}) runs on square grids only: it fails at "
                     f"{_size(self.probe_size or ())} ({probe.failure.error}) and runs at {size}; no cure needed, "
                     f"the cured model takes inputs with {constraint}")
        return tuple(square.other.input_shape)

    def _dropped(self, gm: GraphModule, node: Node, module: str | None) -> Change:
        name = node.name
        message = drop_check(gm, node)
        self._recompile(gm)
        return Change(self.name, name, module, f"size check: {message}", "dropped")

    @staticmethod
    def _recompile(gm: GraphModule) -> None:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()

    def _module(self, gm: GraphModule, node: Node | None) -> str | None:
        if node is None:
            return None
        rigid = next((r for r in self.rigid_nodes if r.node == node.name), None)
        if rigid is not None and getattr(rigid, "module", None):
            return rigid.module
        if node.op == "call_module":
            return str(node.target)
        attrs = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        if attrs:
            return attrs[0]
        stack = node.meta.get("nn_module_stack")
        return next(reversed(stack), None) if stack else None

    def _uncurable(self, gm: GraphModule, node: Node, probe: Probe, error: str) -> Uncurable:
        """Why `node` has no polymorphic cure, in the user's terms."""
        module = self._module(gm, node)
        weight = _fixed_weight_width(gm, node)
        data = next((a for a in node.all_input_nodes if depends_on_input(a)), None)
        if weight is not None and data is not None:
            changed = probe.changed_dims(data)
            shape = probe.shape(data)
            if changed and shape is not None and changed[-1] == len(shape) - 1:
                grids = nearest_grids(data, probe)
                n = shape[-1]
                if grids:
                    g, (i, j) = grids[0]
                    gs = probe.shape(g)
                    cells = gs[i] * gs[j]
                    if n != cells and n % cells == 0:
                        return Uncurable(node.name, module, (
                            f"a flatten of the {gs[i]}x{gs[j]} map into a fixed-size weight (in_features={n}): "
                            "no polymorphic cure; `--to fcn` turns it into a convolution"))
                return Uncurable(node.name, module, (
                    f"a weight over a fixed count of {n} positions (token mixing): it has no meaning at another "
                    "count, so there is no cure"))
        rigid = next((r for r in self.rigid_nodes if r.node == node.name), None)
        if rigid is not None:
            return Uncurable(node.name, module, f"{rigid.reason}: no known cure for this kind of node")
        return Uncurable(node.name, module, f"fails at {_size(tuple(probe.other.input_shape))} "
                                            f"({error}): no known cure for this kind of node")


def _fixed_weight_width(gm: GraphModule, node: Node) -> int | None:
    """in_features of a Linear/Conv1d(kernel 1) module or of an F.linear/matmul with a constant weight."""
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(mod, nn.Linear):
            return mod.in_features
        if isinstance(mod, nn.Conv1d):
            return mod.in_channels
        return None
    if node.op == "call_function" and node.target in (F.linear, torch.matmul, torch.bmm, torch.einsum):
        consts = [a for a in node.all_input_nodes if not depends_on_input(a)]
        return 0 if consts else None
    return None


def _describe_node(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return repr(gm.get_submodule(str(node.target))).split("\n")[0][:80]
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.op})"


def _size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape[2:]))
