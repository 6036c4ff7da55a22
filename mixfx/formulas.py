"""Symbolic sizes and guards, written in the user's terms (H, W), and what a guard *means*.

torch's ShapeEnv speaks in `s36`, `FloorDiv` and `Eq(Mod(...))`. Users want `ceil(H/32)` and
`H % 16 == 0`. Rather than pattern-match every guard spelling, a guard is turned into a Python
predicate and *evaluated* on a window of sizes around the example: a guard true for all sizes is
noise, one true on a bounded interval pins the size (rigidity), one true on a periodic set is a
divisibility constraint, one true from some size up is a minimum size.
"""
from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import sympy
from torch.utils._sympy.functions import FloorDiv, PythonMod
from torch.utils._sympy.printers import PythonPrinter

_PRINTER = PythonPrinter()


def free_input_symbols(expr, symbols: Mapping[str, sympy.Symbol]) -> set[str]:
    free = getattr(expr, "free_symbols", set())
    return {name for name, sym in symbols.items() if sym in free}


def _int(e) -> int | None:
    return int(e) if isinstance(e, sympy.Integer) or (hasattr(e, "is_Integer") and e.is_Integer) else None


def format_expr(expr, symbols: Mapping[str, sympy.Symbol]) -> str:
    """A size expression as the user reads it: `ceil(H/32)`, `H//16`, `(H//16)*(W//16) + 1`."""
    if isinstance(expr, int):
        return str(expr)
    return _format_cached(sympy.sympify(expr), tuple(symbols.items()))


@functools.lru_cache(maxsize=4096)
def _format_cached(expr, symbols: tuple) -> str:
    """Cached: a report formats the same few size expressions for hundreds of nodes."""
    names = {sym: sympy.Symbol(name, integer=True, positive=True) for name, sym in symbols}
    return _fmt(expr.xreplace(names))


def _split_const(expr) -> tuple[sympy.Expr, int]:
    """expr = rest + c with c an integer constant."""
    if isinstance(expr, sympy.Add):
        const = sum((_int(a) for a in expr.args if _int(a) is not None), 0)
        rest = sympy.Add(*[a for a in expr.args if _int(a) is None])
        return rest, const
    return expr, 0


def _fmt(e) -> str:
    if _int(e) is not None:
        return str(_int(e))
    if isinstance(e, sympy.Symbol):
        return e.name
    if isinstance(e, sympy.Add):
        # floor((X + a)/k) + b  ==  floor((X + a + b*k)/k): print as X//k or ceil(X/k)
        floors = [a for a in e.args if isinstance(a, FloorDiv)]
        rest, const = _split_const(e)
        if len(floors) == 1 and rest == floors[0] and _int(floors[0].args[1]) is not None:
            x, k = floors[0].args
            k = _int(k)
            inner, a = _split_const(x)
            total = a + const * k
            if total == 0:
                return f"{_atom(inner)}//{k}"
            if total == k - 1:
                return f"ceil({_fmt(inner)}/{k})"
        terms = [_fmt(a) for a in e.args if _int(a) is None]
        out = " + ".join(terms)
        if const:
            out += f" + {const}" if const > 0 else f" - {-const}"
        return out
    if isinstance(e, sympy.Mul):
        coeff = [a for a in e.args if _int(a) is not None]
        others = [f"({_fmt(a)})" if isinstance(a, (FloorDiv, sympy.floor)) else _atom(a)
                  for a in e.args if _int(a) is None]
        return "*".join([str(_int(c)) for c in coeff] + others)
    if isinstance(e, FloorDiv):
        return f"{_atom(e.args[0])}//{_atom(e.args[1])}"
    if isinstance(e, (sympy.Mod, PythonMod)) and len(e.args) == 2:
        a = e.args[0]
        return f"{f'({_fmt(a)})' if isinstance(a, (FloorDiv, sympy.floor)) else _atom(a)} % {_atom(e.args[1])}"
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        # guards read back from torch's log: `floor((1/16)*H)` is H//16, `ceiling(H/32)` ceil(H/32)
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if _int(den) is not None and _int(den) > 0:
            return (f"{_atom(num)}//{_int(den)}" if isinstance(e, sympy.floor)
                    else f"ceil({_fmt(num)}/{_int(den)})")
    if isinstance(e, sympy.Max):
        return "max(" + ", ".join(_fmt(a) for a in e.args) + ")"
    if isinstance(e, sympy.Min):
        return "min(" + ", ".join(_fmt(a) for a in e.args) + ")"
    if isinstance(e, sympy.Pow) and _int(e.args[1]) is not None:
        return f"{_atom(e.args[0])}**{_int(e.args[1])}"
    return _PRINTER.doprint(e)


def _atom(e) -> str:
    s = _fmt(e)
    if isinstance(e, (sympy.Symbol, FloorDiv)) or _int(e) is not None or s.startswith(("ceil(", "max(", "min(")):
        return s
    return f"({s})"


def format_relation(expr, symbols: Mapping[str, sympy.Symbol]) -> str:
    """A guard (Eq/Ne/inequality) in user terms: `(H//16)*(W//16) == 196`."""
    ops = {sympy.Eq: "==", sympy.Ne: "!=", sympy.Ge: ">=", sympy.Gt: ">", sympy.Le: "<=", sympy.Lt: "<"}
    for cls, op in ops.items():
        if isinstance(expr, cls):
            return f"{format_expr(expr.args[0], symbols)} {op} {format_expr(expr.args[1], symbols)}"
    return format_expr(expr, symbols)


def predicate(expr, symbols: Mapping[str, sympy.Symbol]) -> Callable[..., bool]:
    """Compile a guard over the input symbols into a fast Python predicate f(**{name: int})."""
    names = list(symbols)
    src = _PRINTER.doprint(expr)
    for name, sym in symbols.items():
        src = src.replace(str(sym), f"__{name}")
    code = compile(src, "<guard>", "eval")
    env = {"max": max, "min": min, "floor": math.floor, "ceil": math.ceil, "math": math}  # printers spell math.ceil

    def f(**sizes: int) -> bool:
        scope = {f"__{n}": sizes[n] for n in names}
        try:
            return bool(eval(code, env, scope))  # noqa: S307 - our own printed sympy expression
        except (ZeroDivisionError, ValueError, TypeError, NameError):
            return False

    return f


@dataclass
class GuardMeaning:
    """What a guard demands of the input sizes.

    kind: "always" (noise), "fixed" (true on a bounded set: pins the size), "divisible",
    "min_size", "max_size", "equal" (H == W) or "other"; `text` is the readable constraint."""

    kind: str
    text: str
    symbols: tuple[str, ...]
    modulus: int | None = None
    bound: int | None = None
    counterexample: dict[str, int] | None = None  # sizes near the example that violate it
    expr: object = None  # the raw guard


WINDOW = 96  # sizes 1 .. example+WINDOW are sampled per dim


def _period(values: list[bool]) -> int | None:
    n = len(values)
    for k in range(2, n // 3):
        if all(values[i] == values[i + k] for i in range(n - k)):
            return k
    return None


def is_specialisation_noise(expr) -> bool:
    """0/1 specialisation guards (`Ne(x, 1)`, `x > 1`, `x >= 2`, `Ne(Mod(1, x), 0)`): the fake
    kernels assume no dim is 1; they say nothing about which sizes the model accepts."""
    if isinstance(expr, (sympy.Ne, sympy.Gt, sympy.Ge)) and len(expr.args) == 2:
        rhs = _int(expr.args[1])
        if isinstance(expr, sympy.Ne):  # a branch decision (contiguity, no-op view), never a requirement
            return True
        if isinstance(expr, sympy.Gt) and rhs in (0, 1):
            return True
        if isinstance(expr, sympy.Ge) and rhs in (1, 2):
            return True
    return False


def characterise(expr, symbols: Mapping[str, sympy.Symbol], example: Mapping[str, int]) -> list[GuardMeaning]:
    """Classify a guard by evaluating it on sizes 1..example+WINDOW (see module docstring).
    A guard over H and W that is a conjunction of one condition per dim is split in two."""
    used = tuple(sorted(free_input_symbols(expr, symbols), key=list(symbols).index))
    rel = format_relation(expr, symbols)
    if not used:
        return [GuardMeaning("always", rel, used)]
    noise = is_specialisation_noise(expr)
    if noise and isinstance(expr, sympy.Ne):
        return [GuardMeaning("specialisation", rel, used)]
    if isinstance(expr, sympy.Eq) and len(used) == 2 and _is_symbol_pair(expr, symbols):
        return [GuardMeaning("equal", rel, used)]
    f = predicate(expr, symbols)
    base = {n: example[n] for n in symbols}
    slices: dict[str, tuple[list[int], list[bool]]] = {}
    try:
        for name in used:
            xs = list(range(1, example[name] + WINDOW + 1))
            slices[name] = (xs, [f(**{**base, name: x}) for x in xs])
    except Exception:  # noqa: BLE001 - an unevaluable `x >= 1`-style guard keeps the syntactic reading
        if noise:
            return [GuardMeaning("specialisation", rel, used)]
        raise
    # a `x >= 1`-style guard is 0/1-specialisation noise only if it holds for every size >= 2;
    # `(H - 2)//2 + 1 >= 1` on a pooled size is a real minimum input size
    if noise and all(all(vals[1:]) for _, vals in slices.values()):
        return [GuardMeaning("specialisation", rel, used)]
    if len(used) == 1:
        out = [_widen_pin(_characterise_1d(used[0], *slices[used[0]], rel), f, base, example, rel)]
    elif any(_bounded(vals) for _, vals in slices.values()):
        out = [GuardMeaning("fixed", _readable_pin(rel, slices), used)]
    elif not _separable(f, used, base, slices):
        out = [GuardMeaning("other", rel, used)]
    else:
        out = [m for m in (_widen_pin(_characterise_1d(name, *slices[name], rel), f, base, example, rel)
                           for name in used) if m.kind != "always"]
        out = out or [GuardMeaning("always", rel, used)]
    for m in out:
        m.counterexample = _counterexample(m.symbols or used, base, slices)
        m.expr = expr
    return out


def summarise_domain(exprs: list, symbols: Mapping[str, sympy.Symbol], example: Mapping[str, int]) -> list[str]:
    """The accepted sizes of each dim under *all* the given guards at once (other dims as in the
    example), as at most two readable constraints per dim: a divisibility and a minimum size.
    Many guards of one reshape chain (`H//(4*(H//28)) == 7`, ...) collapse to `(H//4) % 7 == 0`."""
    preds = [(predicate(e, symbols), free_input_symbols(e, symbols)) for e in exprs]
    out: list[str] = []
    base = {n: example[n] for n in symbols}
    for name in symbols:
        mine = [p for p, used in preds if name in used]
        if not mine:
            continue
        xs = list(range(1, example[name] + 2 * WINDOW + 1))
        vals = [all(p(**{**base, name: x}) for p in mine) for x in xs]
        if all(vals) or not any(vals):
            continue
        first = xs[vals.index(True)]
        tail_xs, tail = xs[xs.index(first):], vals[xs.index(first):]
        if all(tail):
            out.append(f"{name} >= {first}")
            continue
        m = _characterise_1d(name, tail_xs, tail, "")
        if m.kind == "divisible":
            out.append(m.text)
            smallest = next(x for x in xs if x % (m.modulus or 1) == 0) if m.modulus else 1
            if first > smallest:
                out.append(f"{name} >= {first}")
        elif m.modulus:  # periodic from the smallest size that runs (a CLIP ResNet's attention pool)
            residues = sorted({x % m.modulus for x, v in zip(tail_xs, tail) if v})
            out.append(f"{name} % {m.modulus} in {{{', '.join(map(str, residues))}}}")
            if first > next(x for x in xs if x % m.modulus in residues):
                out.append(f"{name} >= {first}")
        else:
            full = _characterise_1d(name, xs, vals, "")
            if full.kind not in ("divisible", "min_size", "max_size") and not full.modulus:
                # a period longer than a third of the window (HaloNet: 256) looks like a pin:
                # look again over three times the example size
                xs = list(range(1, 3 * example[name] + 2 * WINDOW + 1))
                vals = [all(p(**{**base, name: x}) for p in mine) for x in xs]
                full = _characterise_1d(name, xs, vals, "")
            if full.kind in ("divisible", "min_size", "max_size"):
                out.append(full.text)
            elif full.modulus:
                residues = sorted({x % full.modulus for x, v in zip(xs, vals) if v})
                out.append(f"{name} % {full.modulus} in {{{', '.join(map(str, residues))}}}")
            else:
                ok = [x for x, v in zip(xs, vals) if v]
                out.append(f"{name} in {{{', '.join(map(str, ok[:6]))}{', ...' if len(ok) > 6 else ''}}}")
    return out


def _counterexample(names, base: dict[str, int], slices) -> dict[str, int] | None:
    """The violating size nearest to the example along one dim (others as in the example)."""
    best = None
    for name in names:
        if name not in slices:
            continue
        xs, vals = slices[name]
        false_xs = [x for x, v in zip(xs, vals) if not v and x >= 8]
        if false_xs:
            x = min(false_xs, key=lambda x: abs(x - base[name]))
            if best is None or abs(x - base[name]) < abs(best[1] - base[best[0]]):
                best = (name, x)
    return {**base, best[0]: best[1]} if best else None


FIXED_SPAN = 64  # a guard true only on one short run of sizes pins the size


def _bounded(vals: list[bool]) -> bool:
    """True on one contiguous, short run of sizes and false elsewhere: the guard pins the size."""
    true_idx = [i for i, v in enumerate(vals) if v]
    if not true_idx or vals[-1]:
        return False
    lo, hi = true_idx[0], true_idx[-1]
    return hi - lo < FIXED_SPAN and len(true_idx) == hi - lo + 1


def _separable(f, used, base, slices) -> bool:
    """f(a, b) == f(a, b0) and f(a0, b) on a grid mixing true and false points of each slice."""
    picks = {}
    for name in used:
        xs, vals = slices[name]
        true_xs = [x for x, v in zip(xs, vals) if v][-4:]
        false_xs = [x for x, v in zip(xs, vals) if not v][-4:]
        picks[name] = true_xs + false_xs
    a, b = used[0], used[1]
    fa = dict(zip(*slices[a]))
    fb = dict(zip(*slices[b]))
    for x in picks[a]:
        for y in picks[b]:
            if f(**{**base, a: x, b: y}) != (fa[x] and fb[y]):
                return False
    return True


def _characterise_1d(name: str, xs: list[int], vals: list[bool], rel: str) -> GuardMeaning:
    if all(vals):
        return GuardMeaning("always", rel, (name,))
    k = _period(vals)
    if k is not None:
        residues = sorted({x % k for x, v in zip(xs, vals) if v})
        if residues == [0]:
            return GuardMeaning("divisible", f"{name} % {k} == 0", (name,), modulus=k)
        q = len(residues)
        if q and residues == list(range(q)) and k % q == 0:
            return GuardMeaning("divisible", f"({name}//{q}) % {k // q} == 0", (name,), modulus=k)
        return GuardMeaning("other", rel, (name,), modulus=k)
    if not any(vals):
        return GuardMeaning("other", rel, (name,))
    if vals[-1]:
        first = next(x for x, v in zip(xs, vals) if v)
        if all(vals[xs.index(first):]):
            return GuardMeaning("min_size", f"{name} >= {first}", (name,), bound=first)
        return GuardMeaning("other", rel, (name,))
    true_xs = [x for x, v in zip(xs, vals) if v]
    if vals[0] and all(vals[: xs.index(true_xs[-1]) + 1]) and true_xs[-1] > FIXED_SPAN:
        return GuardMeaning("max_size", f"{name} <= {true_xs[-1]}", (name,), bound=true_xs[-1])
    if _bounded(vals):
        return GuardMeaning("fixed", _readable_pin(rel, {name: (xs, vals)}), (name,))
    return GuardMeaning("other", rel, (name,))


def _widen_pin(m: GuardMeaning, f: Callable[..., bool], base: dict[str, int], example: Mapping[str, int],
               rel: str) -> GuardMeaning:
    """A guard that looks like a pin within 1..example+WINDOW may repeat with a longer period
    (HaloNet: H % 256 in {0, 253, 254, 255}, read as `H in {253, ..., 256}`): look again over
    three times the example size, only for pins (few guards, so the extra evaluations are cheap)."""
    if m.kind != "fixed" or len(m.symbols) != 1:
        return m
    name = m.symbols[0]
    xs = list(range(1, 3 * example[name] + WINDOW + 1))
    try:
        vals = [f(**{**base, name: x}) for x in xs]
    except Exception:  # noqa: BLE001 - keep the narrow reading
        return m
    wide = _characterise_1d(name, xs, vals, rel)
    return m if wide.kind == "fixed" else wide


READABLE_RELATION = 60  # characters; longer pinning relations are shown as the sizes they accept


def _readable_pin(rel: str, slices: dict[str, tuple[list[int], list[bool]]]) -> str:
    """A pinning guard as written when short (`(H//16)*(W//16) == 196`), else as the run of sizes
    it accepts along each dim with the others at the example (`197 <= H <= 224 and ...`): the
    windowed models' raw relations run to kilobytes."""
    if len(rel) <= READABLE_RELATION:
        return rel
    parts = []
    for name, (xs, vals) in slices.items():
        ok = [x for x, v in zip(xs, vals) if v]
        if not ok:
            continue
        lo, hi = ok[0], ok[-1]
        parts.append(f"{name} == {lo}" if lo == hi else f"{lo} <= {name} <= {hi}")
    return " and ".join(parts) or rel


def _is_symbol_pair(expr, symbols) -> bool:
    syms = set(symbols.values())
    return all(a in syms for a in expr.args)
