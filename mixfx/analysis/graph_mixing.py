"""Global mixing read off the fx graph (the fallback when the eager forward cannot be recorded,
`locality.record_ops`): attention, a matmul of two activations or a recurrence whose contracted
length depends on the input size."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from mixfx.analysis.nodes import (_MATMUL_TARGETS, _SDPA_TARGETS, _SEQUENCE_MODULES, _dim_symbols, _format_dim,
                                  module_path, op_name)
from mixfx.report import GlobalMixing
from mixfx.shape_rules import TENSOR_LIKE
from mixfx.shapes import ConcreteRun


class GraphMixingStage:
    """Mixed into the analyser: reads `self.nodes`, `self.sym`, `self.gm`."""

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

