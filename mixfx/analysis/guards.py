"""Guards -> rigid nodes and input constraints: what the symbolic run's guards mean in the user's
terms (`formulas.characterise`), which node pinned the size, and which guards are real input
constraints (a size that violates one, and keeps the others, must fail to run: checked on the
eager model, `size_search.probe`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from mixfx.analysis.nodes import _format_dim, _has_param, _tensors, module_path, op_name
from mixfx.formulas import GuardMeaning, characterise
from mixfx.report import RigidNode


class GuardStage:
    """Mixed into the analyser: reads `self.sym`, `self.symbols`, `self.example_sizes`."""

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
        self.rigid_exprs: dict[str, list] = {}  # structural rigid node -> its pinning guards
        example_txt = "x".join(str(v) for v in self.example_sizes.values())
        self.pin_exprs = [m.expr for entries in meanings.values() for _, ms in entries for m in ms
                          if m.kind == "fixed" and m.expr is not None]
        for n in self.nodes:
            if n.name in self.assert_meanings:
                cond, ms = self.assert_meanings[n.name]
                fixed = [m for m in ms if m.kind == "fixed"]
                self.pin_exprs += [m.expr for m in fixed if m.expr is not None]
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
                self.rigid_exprs[n.name] = [m.expr for _, ms in meanings.get(n.name, []) for m in ms
                                            if m.kind == "fixed" and m.expr is not None]
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
                run = self.probe(size)  # the eager model, never the traced graph
                if run.ok:
                    kept.remove(m)
                    dropped.append(f"{m.text} (the model runs at {'x'.join(map(str, size[2:]))})")
        one_dim = [m for m in kept if len(m.symbols) == 1 or m.kind != "other"]
        texts = summarise_domain([m.expr for m in one_dim], self.symbols, self.example_sizes)
        texts += [m.text for m in kept if m not in one_dim]
        return list(dict.fromkeys(texts)), dropped

    def _counterexample(self, mine, others, dims, window: int) -> tuple[int, ...] | None:
        """The size nearest the example (one dim varied; all of them together where the model runs
        on square grids only) where `mine` fails and all `others` hold."""
        best = None
        square = getattr(self, "square_only", False)
        for name in dims:
            ex = self.example_sizes[name]
            for x in sorted(range(2, ex + 2 * window), key=lambda v: abs(v - ex)):
                sizes = {n: x for n in self.dim_names} if square else {**self.example_sizes, name: x}
                if not mine(**sizes) and all(o(**sizes) for o in others):
                    if best is None or abs(x - ex) < best[0]:
                        best = (abs(x - ex), sizes)
                    break
        if best is None:
            return None
        return (*self.example[:2], *(best[1][n] for n in self.dim_names))


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


