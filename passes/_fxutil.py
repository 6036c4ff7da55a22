"""Graph helpers shared by the Linear/conv and layout passes.

Passes need tensor shapes (which dim is the channel dim, what rank a Linear sees). They get them
by running the graph once on the example input recorded on the placeholders
(`annotate_example_inputs`), so a pass can be called on its own with only a GraphModule.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx import GraphModule, Node

EXAMPLE_KEY = "mixfx_example"


def annotate_example_inputs(gm: GraphModule, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> None:
    """Record the example input(s) on the placeholders (`node.meta['mixfx_example']`)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        node.meta[EXAMPLE_KEY] = value
    for node in placeholders[len(example_inputs):]:
        if node.args:  # an argument with a default value (timm's ViT: attn_mask=None)
            node.meta[EXAMPLE_KEY] = node.args[0]


def clear_example_inputs(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(EXAMPLE_KEY, None)


def example_inputs_of(gm: GraphModule) -> list[Any] | None:
    values = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if EXAMPLE_KEY in node.meta:
            values.append(node.meta[EXAMPLE_KEY])
        elif node.args:  # a default value
            values.append(node.args[0])
        else:
            return None
    return values


SMALL_INPUT = 1 << 14  # elements; below this a real run beats fake tensors on CPU


class _ShapeRecorder(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.shapes: dict[Node, torch.Size] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = result.shape
        return result


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[Any] | None = None) -> dict[Node, torch.Size]:
    """Shape of every tensor-valued node at the example input: on fake tensors (no compute), or by
    running the graph for real (no grad) where an op has no fake kernel."""
    inputs = list(example_inputs) if example_inputs is not None else example_inputs_of(gm)
    if inputs is None:
        raise ValueError(
            "this pass needs shapes: record an example input first with "
            "passes._fxutil.annotate_example_inputs(gm, x), or give example_inputs= to the pass")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mixfx.shapes import meta_tensor_shapes

    try:  # meta tensors with mixfx's shape rules: ~50x cheaper than fake tensors on a ResNet-50
        by_name = meta_tensor_shapes(gm, inputs)
        return {n: by_name[n.name] for n in gm.graph.nodes if n.name in by_name}
    except Exception:  # noqa: BLE001 - an op without a meta kernel, a data-dependent size: run below
        pass
    rec = _ShapeRecorder(gm)
    small = all(t.numel() <= SMALL_INPUT for t in inputs if isinstance(t, torch.Tensor))
    if small:  # tiny inputs: a real run is cheaper than fake-tensor dispatch
        with torch.no_grad():
            rec.run(*inputs)
        return rec.shapes
    try:  # fake tensors: shapes without the compute (weights are converted on the fly)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            rec.run(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs])
        return rec.shapes
    except Exception:  # noqa: BLE001 - an op without a fake kernel: run it for real
        rec = _ShapeRecorder(gm)
        with torch.no_grad():
            rec.run(*inputs)
        return rec.shapes


# --- views whose input's strides a rewrite changed ----------------------------------------------

def is_size_view(node: Node) -> bool:
    """`x.view(*sizes)` / `Tensor.view(x, sizes)` (not `x.view(dtype)`): a view that needs strides
    compatible with the new shape, where `reshape` (same values) would copy instead."""
    if not (node.op == "call_method" and node.target == "view"
            or node.op == "call_function" and node.target is torch.Tensor.view):
        return False
    sizes = list(node.args[1:]) + list(node.kwargs.values())
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = list(sizes[0])
    return bool(sizes) and all(isinstance(s, (int, Node)) and not isinstance(s, bool) for s in sizes)


def _closure(nodes: Iterable[Node], step) -> set[Node]:
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def descendants(nodes: Iterable[Node]) -> set[Node]:
    """`nodes` and every node that uses them, directly or not."""
    return _closure(nodes, lambda n: n.users)


def ancestors(nodes: Iterable[Node]) -> set[Node]:
    """`nodes` and every node they read, directly or not."""
    return _closure(nodes, lambda n: n.all_input_nodes)


class _ViewFixer(torch.fx.Interpreter):
    """Runs the ancestors of `views` only; a view in `views` that fails on its input's strides
    becomes a `reshape` (same values, a copy where the strides do not allow a view)."""

    def __init__(self, gm: GraphModule, views: set[Node]):
        super().__init__(gm)
        self.views = views
        self.need = ancestors(views)
        self.fixed: list[Node] = []
        self.memo: Any = None  # a `mixfx.shape_memo.ShapeMemo` on meta tensors: repeated blocks run once

    def run(self, *inputs: Any) -> None:  # type: ignore[override]
        placeholders = iter(inputs)
        with torch.no_grad():
            for node in self.graph.nodes:
                if node.op == "placeholder":
                    value = next(placeholders, None)
                    self.env[node] = node.args[0] if value is None and node.args else value
                elif node in self.need:
                    self.env[node] = self.run_node(node)

    def run_node(self, n: Node) -> Any:
        if n not in self.views:
            if self.memo is None:
                return super().run_node(n)
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                key = self.memo.key(n, args, kwargs)
                out = self.memo.get(key)
                if out is None:
                    out = getattr(self, n.op)(n.target, args, kwargs)
                    self.memo.put(key, out)
                return out
        try:
            return super().run_node(n)
        except (RuntimeError, ValueError):
            target = n.target
            n.target = "reshape" if n.op == "call_method" else torch.Tensor.reshape
            try:
                out = super().run_node(n)
            except Exception:  # noqa: BLE001 - not a stride problem: leave the view (and its error)
                n.target = target
                raise
            self.fixed.append(n)
            return out


def reshape_where_view_fails(gm: GraphModule, changed: Iterable[Node],
                             example_inputs: Sequence[Any] | None = None) -> list[Node]:
    """After a rewrite that changes the strides of some values (a `permute` back to the original
    layout gives the same values, not the same memory layout), a later `x.view(...)` the original
    graph ran may now fail. Each such view (downstream of `changed`) becomes `reshape`, which
    computes the same values; views that still work are left alone. Returns the nodes changed.
    The graph is run on the example input (meta tensors, else fake, else real ones), and only
    as far as the views need. (A reshape that copies no longer aliases its input: an in-place op
    on one of them would not show in the other. Verification compares the outputs.)"""
    views = {n for n in descendants(changed) if is_size_view(n)}
    if not views:
        return []
    inputs = list(example_inputs) if example_inputs is not None else example_inputs_of(gm)
    if inputs is None:
        return []
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mixfx.shape_memo import ShapeMemo
    from mixfx.shapes import meta_weights

    def on_meta(fixer: _ViewFixer) -> None:  # the kernels' strides, no compute, no weight copies
        fixer.memo = ShapeMemo(gm)  # exact: a memoised output is the kernel's, strides included
        with meta_weights(gm):
            fixer.run(*[torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                        if isinstance(t, torch.Tensor) else t for t in inputs])

    def on_fake(fixer: _ViewFixer) -> None:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fixer.run(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs])

    def on_real(fixer: _ViewFixer) -> None:
        fixer.run(*inputs)

    # each run is a fallback for the one before (an op without a meta or fake kernel, a
    # data-dependent size); tiny inputs skip fake tensors, which cost more than a real run
    small = all(t.numel() <= SMALL_INPUT for t in inputs if isinstance(t, torch.Tensor))
    runs = [on_meta, on_real] if small else [on_meta, on_fake, on_real]
    fixed: list[Node] = []  # shared by the runs: a view made `reshape` stays so
    for i, run in enumerate(runs):
        fixer = _ViewFixer(gm, views)
        fixer.fixed = fixed
        try:
            run(fixer)
            break
        except Exception:  # noqa: BLE001 - the next run; the last one's error is the caller's
            if i == len(runs) - 1:
                raise
    if fixed:
        gm.recompile()
    return fixed


def views_note(pass_name: str, fixed: Sequence[Node]) -> list[str]:
    if not fixed:
        return []
    names = ", ".join(n.name for n in fixed[:5]) + (f" and {len(fixed) - 5} more" if len(fixed) > 5 else "")
    return [f"{pass_name}: {len(fixed)} `view` call(s) ({names}) became `reshape`: their input now has another "
            f"memory layout (same values), which a view cannot always express"]


# --- permutations -----------------------------------------------------------------------------

_PERMUTE_FNS = {torch.permute}
_TRANSPOSE_FNS = {torch.transpose, torch.swapaxes, torch.swapdims}


def permutation_of(node: Node, shapes: dict[Node, torch.Size]) -> tuple[int, ...] | None:
    """The permutation `p` if `node` computes `x.permute(p)` (permute, transpose, swapaxes), else None."""
    if node.op not in ("call_method", "call_function") or not node.args:
        return None
    x = node.args[0]
    if not isinstance(x, Node) or x not in shapes:
        return None
    rank = len(shapes[x])
    target = node.target
    is_permute = (node.op == "call_method" and target == "permute") or (node.op == "call_function" and target in _PERMUTE_FNS)
    is_transpose = (node.op == "call_method" and target in ("transpose", "swapaxes", "swapdims")) or (
        node.op == "call_function" and target in _TRANSPOSE_FNS)
    try:
        if is_permute:
            dims = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = tuple(dims[0])
            if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
                return None
            perm = tuple(d % rank for d in dims)
            return perm if sorted(perm) == list(range(rank)) else None
        if is_transpose:
            ab = list(node.args[1:3])
            ab += [node.kwargs.get("dim0"), node.kwargs.get("dim1")][len(ab):]
            a, b = ab
            if not isinstance(a, int) or not isinstance(b, int):
                return None
            perm = list(range(rank))
            a, b = a % rank, b % rank
            perm[a], perm[b] = perm[b], perm[a]
            return tuple(perm)
    except (TypeError, ZeroDivisionError):
        return None
    return None


def compose(p: Sequence[int], q: Sequence[int]) -> tuple[int, ...]:
    """`x.permute(p).permute(q) == x.permute(compose(p, q))`."""
    return tuple(p[i] for i in q)


def inverse(p: Sequence[int]) -> tuple[int, ...]:
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    return tuple(inv)


def is_identity(p: Sequence[int]) -> bool:
    return all(i == d for i, d in enumerate(p))


def permute_shape(shape: Sequence[int], p: Sequence[int]) -> torch.Size:
    return torch.Size(shape[d] for d in p)


# --- modules ----------------------------------------------------------------------------------

def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def call_count(gm: GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def set_module(gm: GraphModule, path: str, module: nn.Module) -> None:
    """Put `module` at `path` (replacing whatever is there), creating parents as needed."""
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if name in parent._modules:
        parent._modules[name] = module
    else:
        gm.add_submodule(path, module)


def fresh_path(gm: GraphModule, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... whichever does not name an attribute yet."""
    def taken(path: str) -> bool:
        try:
            gm.get_submodule(path)
            return True
        except AttributeError:
            pass
        owner, _, attr = path.rpartition(".")
        try:
            return hasattr(gm.get_submodule(owner) if owner else gm, attr)
        except AttributeError:
            return False

    path, i = base, 0
    while taken(path):
        i += 1
        path = f"{base}_{i}"
    return path


def fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def prune_unused(gm: GraphModule) -> None:
    """Drop submodules, parameters and buffers no node uses any more (after a replacement)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}

    def in_called(path: str) -> bool:
        return any(path == c or path.startswith(c + ".") for c in called)

    for kind in ("parameters", "buffers"):
        for path, _ in list(getattr(gm, f"named_{kind}")(remove_duplicate=False)):
            if path in used or in_called(path):
                continue
            if any(path.startswith(u + ".") for u in used):
                continue
            owner, _, name = path.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            store = mod._parameters if kind == "parameters" else mod._buffers
            store.pop(name, None)
    gm.delete_all_unused_submodules()


def depends_on_input(node: Node, follow: Callable[[Node], bool] | None = None) -> bool:
    """True when the node's value depends on a placeholder (i.e. it is not a constant of the model).
    `follow(n)` False stops the walk at `n` (its inputs are not followed)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if follow is None or follow(n):
            stack.extend(n.all_input_nodes)
    return False


def short_shape(shape: Iterable[int] | None) -> str:
    return "?" if shape is None else "[" + ",".join(str(int(s)) for s in shape) + "]"


ARITH_BINARY = {
    operator.add, operator.sub, operator.mul, operator.truediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.subtract, torch.multiply,
}
ARITH_BINARY_METHODS = {"add", "sub", "mul", "div", "subtract", "multiply", "true_divide"}
