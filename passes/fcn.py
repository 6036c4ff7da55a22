"""`--to fcn`: turn a classifier into a dense predictor (OverFeat, Sermanet et al. 2014; Long,
Shelhamer & Darrell, "Fully Convolutional Networks", 2015).

A classifier is a spatial part (convolutional: every map keeps varying with the input size) and
a head that throws the positions away: a global or adaptive pool, a flatten, Linears. The head
is rewritten so that it keeps the positions:

- flatten + Linear over a fixed k x k map -> a k x k conv with the same weights (flatten order
  C, k, k; channels-last maps are permuted); Linears on vectors -> 1x1 convs;
- adaptive pooling to a g x g grid -> a fixed pool with the kernel and stride it had at the
  example size (refused, with the windows, where they are uneven there); global pooling (mean,
  amax, sum over H, W; adaptive pooling to 1x1; any op that behaves like them) -> a pool over
  the example's window with stride 1;
- what sits between (activations, dropout, norms, reshapes of a 1x1 map) runs on the map.

The output becomes `[N, K, h, w]`: 1x1 at the example size with the original's values, a score
map at larger sizes. Every head op is matched by what it does, not by its name: each candidate
form is tried on random maps and kept only where every window of the map reproduces the op on
that window (a "probe"). The head is found the same way: it starts at the first node whose
shape stops varying with the input size (a meta-tensor run at twice the example size).

The pass needs the analysis report (`report=`) to refuse a model whose spatial part is not
convolutional (global attention, token mixing over a fixed count): rewriting its head would
still run, but a position of the map would not be a sliding-window classification.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from mixfx.errors import EXIT_VERIFY, MixfxError
from passes import _fxutil as fu
from passes._fcn_geometry import Axis, Geometry, map_geometry
from passes.base import Change, RewritePass, RewritePassResult

# probe maps are the window (the example's case) and this many positions larger (H != W, and 1-wide)
PROBE_EXTRAS = ((0, 0), (1, 2), (0, 2), (1, 0))


class FcnError(MixfxError):
    """The model has no fully convolutional form (or mixfx cannot prove one): nothing written."""

    exit_code = EXIT_VERIFY
    kind = "fcn"


@dataclass
class ScoreMap:
    """Where the converted model's output positions sit in the input (per axis H, W).

    Position (i, j) of the map sees input rows `[i*stride[0] + offset[0], ... + receptive_field[0])`
    (offset < 0: the field reaches into the zero padding). `output_shape` is the output in terms of
    the input's H and W. `None` where the geometry is unknown (`unknown_at` says where)."""

    feature_map: str  # the node of the spatial part the head reads
    window: tuple[int, int]  # its size at the example: the head's window
    head_stride: tuple[int, int]  # map positions step this many feature-map positions
    stride: tuple[int, int] | None = None
    offset: tuple[int, int] | None = None
    receptive_field: tuple[int, int] | None = None
    output_shape: list[str] | None = None
    padded_at: list[str] = field(default_factory=list)  # nodes that pad: positions differ from crops
    global_context: list[str] = field(default_factory=list)  # pooled summaries broadcast back
    unknown_at: str | None = None

    @property
    def padding_free(self) -> bool:
        return self.stride is not None and not self.padded_at and not self.global_context

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()} | {
            "padding_free": self.padding_free}

    def describe(self) -> str:
        if self.stride is None:
            return (f"score map geometry unknown (at `{self.unknown_at}`); the head reads `{self.feature_map}` "
                    f"through a {self.window[0]}x{self.window[1]} window, stepping {self.head_stride[0]}x"
                    f"{self.head_stride[1]} of its positions")
        sy, sx = self.stride
        (oy, ox), (ry, rx) = self.offset, self.receptive_field
        shape = ", ".join(self.output_shape) if self.output_shape else "?"
        return (f"score map [{shape}]: stride {sy}x{sx} input px, offset {oy},{ox}: position (i, j) sees input "
                f"rows {_span('i', sy, oy, ry)}, cols {_span('j', sx, ox, rx)} (receptive field {ry}x{rx})")


def _span(v: str, s: int, o: int, r: int) -> str:
    def at(c: int) -> str:
        return f"{s}{v}" if c == 0 else f"{s}{v} {'+' if c > 0 else '-'} {abs(c)}"
    return f"{at(o)} .. {at(o + r - 1)}"


@dataclass
class FcnPlan:
    """What the verification needs: the original head as its own module (feature map -> output),
    and how map positions correspond to windows of the feature map."""

    head: GraphModule
    feature_map: str
    layout: str  # of the feature map: "nchw" or "nhwc"
    window: tuple[int, int]
    head_stride: tuple[int, int]
    score_map: ScoreMap
    converted: list[str] = field(default_factory=list)  # module paths / node names the head rewrite replaced

    def window_of(self, features: torch.Tensor, i: int, j: int) -> torch.Tensor:
        (h, w), (sh, sw) = self.window, self.head_stride
        if self.layout == "nhwc":  # contiguous: the original head may `view` it
            return features[:, i * sh:i * sh + h, j * sw:j * sw + w, :].contiguous()
        return features[..., i * sh:i * sh + h, j * sw:j * sw + w].contiguous()


# --- forms: how a converted map relates to the original value --------------------------------

@dataclass(frozen=True)
class _Form:
    """The original's value at the example is `original(M[window])` for the converted map M
    (always NCHW). vec: `[N, F]` plus `ones` trailing 1s (1x1 window); grid: the window itself,
    in `layout`; flat: the window flattened from dim 1; seq: the window with its positions
    flattened into one dim (`[N, C, h*w]`, or tokens `[N, h*w, C]` for nhwc)."""

    kind: str
    window: tuple[int, int] = (1, 1)
    layout: str = "nchw"
    ones: int = 0

    def original(self, m: torch.Tensor) -> torch.Tensor:
        if self.kind == "vec":
            v = m[:, :, 0, 0]
            return v.reshape(*v.shape, *([1] * self.ones))
        if self.layout == "nhwc":
            m = m.permute(0, 2, 3, 1)
            return {"grid": m, "flat": m.flatten(1), "seq": m.flatten(1, 2)}[self.kind]
        return {"grid": m, "flat": m.flatten(1), "seq": m.flatten(2)}[self.kind]

    def channels(self, shape: Sequence[int]) -> int:
        if self.kind == "vec" or (self.layout == "nchw" and self.kind != "flat"):
            return int(shape[1])
        if self.kind == "flat":
            return int(shape[1]) // (self.window[0] * self.window[1])
        return int(shape[-1])

    def describe(self) -> str:
        if self.kind == "vec":
            return "a vector per position"
        return f"{self.kind} {self.window[0]}x{self.window[1]} ({self.layout})"


def _forms(window: tuple[int, int]) -> list[_Form]:
    if window == (1, 1):  # grid/flat/seq of a 1x1 window in NCHW are vectors with 2/0/1 trailing ones
        return [_Form("vec", ones=t) for t in range(3)] + [_Form(k, window, "nhwc") for k in ("grid", "seq")]
    return [_Form(k, window, lay) for k in ("grid", "flat", "seq") for lay in ("nchw", "nhwc")]


def _forms_with(window: tuple[int, int], channels: int, n: int, shape: tuple) -> list[_Form]:
    dummy = torch.zeros(n, channels, *window)
    return [f for f in _forms(window) if tuple(f.original(dummy).shape) == tuple(shape)]


@dataclass
class _Candidate:
    """One way to compute a head node on maps: `impl` for the probe, `emit` for the graph."""

    describe: str
    impl: Callable[..., torch.Tensor]
    emit: Callable[[Graph, list[Node]], Node]
    out_form: _Form
    stride: tuple[int, int] = (1, 1)
    replaces: str | None = None  # module path or node name the conversion takes over


# --- the pass ---------------------------------------------------------------------------------

class _ExampleRun(torch.fx.Interpreter):
    """Shapes of tensor nodes and values of everything else, at the example input."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.shapes: dict[Node, tuple[int, ...]] = {}
        self.consts: dict[Node, Any] = {}
        self.result: Any = None

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        elif not any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out)):
            self.consts[n] = out
        if n.op == "output":
            self.result = out
        return out


class Convolutionalise(RewritePass):
    """Rewrite a classifier's head into convolutions (see the module docstring). `report` is the
    analysis of the model (`mixfx.analyze`); `plan` is set after a run (for the verification)."""

    name = "fcn"

    def __init__(self, report: Any = None, example_inputs: Sequence[Any] | None = None):
        super().__init__()
        self.report = report
        self.example_inputs = example_inputs
        self.plan: FcnPlan | None = None

    # -- entry point --
    def call(self, gm: GraphModule) -> RewritePassResult:
        self._refuse_if_not_convolutional()
        inputs = list(self.example_inputs) if self.example_inputs is not None else fu.example_inputs_of(gm)
        tensors = [t for t in inputs or [] if isinstance(t, torch.Tensor)]
        if len(tensors) != 1 or tensors[0].dim() != 4:
            raise FcnError(f"--to fcn needs one image input [N, C, H, W]; this model takes "
                           f"{[tuple(t.shape) for t in tensors]}.", "Give a 4-D example input (--input 1x3x224x224).")
        x = tensors[0]
        gm.eval()
        run = _ExampleRun(gm)
        with torch.no_grad():
            run.run(*inputs)
        self.gm, self.run, self.n = gm, run, int(x.shape[0])
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        result = out_node.args[0]
        if not (isinstance(result, Node) and run.shapes.get(result) is not None):
            raise FcnError(f"the model returns {type(run.result).__name__}, not one tensor of class scores: "
                           "--to fcn converts a classifier whose output is [N, K].",
                           "Wrap the model so that it returns the logits only.")
        big_shape = (x.shape[0], x.shape[1], 2 * x.shape[2], 2 * x.shape[3])
        from mixfx.shapes import propagate_concrete

        self.small = propagate_concrete(gm, tuple(x.shape))  # same format as `big` (tuple outputs too)
        self.big = propagate_concrete(gm, tuple(big_shape))
        out_shape = run.shapes[result]
        if len(out_shape) != 2:
            already = self._varying(result) and len(out_shape) == 4
            raise FcnError(
                f"the model's output {list(out_shape)} is " + (
                    "a map that grows with the input: the model is already fully convolutional, nothing to convert."
                    if already else "not [N, K] class scores: --to fcn converts a classifier's head."),
                None if already else "Wrap the model so that it returns [N, K] logits.")
        try:
            features, head = self._find_head(result)
            plan_head = _extract_head(gm, features, head, result, run.consts)
            changes, form_stride = self._convert(features, head, result, out_node)
        except FcnError as exc:
            raise self._explained(exc) from None
        converted = [n.name for n in head] + [str(n.target) for n in head if n.op == "call_module"]
        self._refuse_unconverted_rigid(converted)
        fu.prune_unused(gm)
        gm.graph.lint()
        gm.recompile()
        lay = self._layout(features)
        shape = run.shapes[features]
        window = (shape[2], shape[3]) if lay == "nchw" else (shape[1], shape[2])
        score_map = self._score_map(gm, x, features, window, form_stride)
        self.plan = FcnPlan(plan_head, features.name, lay, window, form_stride, score_map, converted)
        notes = [score_map.describe()]
        return RewritePassResult(gm, True, changes, [], notes)

    # -- refusals --
    def _refuse_if_not_convolutional(self) -> None:
        r = self.report
        if r is None:
            return
        mixing = list(getattr(r, "global_mixing", []) or [])
        if mixing:
            g = mixing[0]
            more = f" (and {len(mixing) - 1} more)" if len(mixing) > 1 else ""
            raise FcnError(
                f"the spatial part is not convolutional: `{g.module or g.node}` ({g.op}, node {g.node}) mixes "
                f"positions globally{more}: {g.reason}. A map position would see the whole input, not a window, "
                "so the model has no fully convolutional form.",
                "--to fcn needs a model that `mixfx analyze` calls convolutional.")

    def _refuse_unconverted_rigid(self, converted: list[str]) -> None:
        rigid = [r for r in getattr(self.report, "rigid_nodes", []) or []
                 if r.module not in converted and r.node not in converted]
        if rigid:
            r = rigid[0]
            raise FcnError(
                f"the spatial part is not convolutional: polymorphism breaks at `{r.module or r.node}` ({r.op}, "
                f"{r.kind}, node {r.node}) before the head: {r.reason}. The converted head would still fail "
                "at other sizes.", (f"Cure: {r.cure}" if r.cure else "--to fcn needs a convolutional spatial part."))

    def _explained(self, exc: FcnError) -> FcnError:
        """A structural refusal, with the analyser's explanation first where it has one."""
        rigid = list(getattr(self.report, "rigid_nodes", []) or [])
        failure = getattr(self.big, "failure", None)
        msg = exc.message
        if failure is not None:
            msg += f" (At twice the example size the original fails at `{failure.node}`: {failure.error}.)"
        head_like = all(r.kind == "structural" and "linear" in r.op.lower() for r in rigid)
        if rigid and not head_like:  # a rigid node the head rewrite could not have cured: say it first
            r = next(r for r in rigid if r.kind != "structural" or "linear" not in r.op.lower())
            msg = (f"the spatial part is not convolutional: polymorphism breaks at `{r.module or r.node}` ({r.op}, "
                   f"{r.kind}): {r.reason}. Converting the head failed too: {msg}")
        return FcnError(msg, exc.hint)

    # -- which nodes are the head --
    def _varying(self, node: Node) -> bool:
        """Its shape follows the input size, positions kept apart from the batch. A view that folds
        positions into the batch dim (`x.view(-1, 16 * 5 * 5)` of the PyTorch tutorial, a window
        partition) does not count: what follows sees a fixed-size vector."""
        s1, s2 = self.small.shapes.get(node.name), self.big.shapes.get(node.name)
        if s1 is None or s2 is None or s1 == s2:
            return False
        tensor = isinstance(s1, tuple) and all(isinstance(d, int) for d in s1)
        return not tensor or len(s1) != len(s2) or s1[0] == s2[0]

    def _layout(self, node: Node) -> str | None:
        """"nchw"/"nhwc" for a map (rank 4, batch and one other dim fixed, two adjacent dims varying)."""
        s1, s2 = self.run.shapes.get(node), self.big.shapes.get(node.name)
        if s1 is None or s2 is None or len(s1) != 4:
            return None
        vary = tuple(i for i in range(4) if s1[i] != s2[i])
        return {(2, 3): "nchw", (1, 2): "nhwc"}.get(vary)

    def _find_head(self, result: Node) -> tuple[Node, list[Node]]:
        """The feature map the head reads and the head's nodes (topological order). The head starts
        at the first nodes whose shape stops varying with the input (the collapse: a pool, a
        Linear over a flattened map), reaching back over the varying non-map nodes that lead to
        them (a flatten), and contains everything after them."""
        nodes = list(self.gm.graph.nodes)
        collapse = [n for n in nodes if n.op.startswith("call") and n in self.run.shapes and not self._varying(n)
                    and any(self._varying(a) for a in n.all_input_nodes)]
        # a pooled summary broadcast back onto the map (a squeeze-excite gate) is not the head
        collapse = [n for n in collapse if not any(self._varying(d) for d in fu.descendants([n]))]
        if not collapse:
            said = getattr(self.report, "head", None)
            said = f" (the analyser puts the head at `{said.module or said.node}`)" if said is not None else ""
            raise FcnError(f"no head found: the output {list(self.run.shapes[result])} does not come from a node that "
                           f"pools or flattens a map that grows with the input{said}.")
        chain: set[Node] = set()
        maps: set[Node] = set()
        stack = [a for c in collapse for a in c.all_input_nodes if self._varying(a)]
        while stack:
            a = stack.pop()
            if a in chain or a in maps:
                continue
            if self._layout(a) is not None:
                maps.add(a)
                continue
            chain.add(a)
            stack += [b for b in a.all_input_nodes if self._varying(b)]
        if len(maps) != 1:
            names = ", ".join(f"`{m.name}`" for m in sorted(maps, key=nodes.index)) or "none"
            raise FcnError(f"the head reads {len(maps)} feature maps ({names}): --to fcn converts a head that "
                           "reads one map of the spatial part.")
        features = next(iter(maps))
        head = chain | set(collapse) | fu.descendants(collapse)
        head = {n for n in head if n.op.startswith("call")}
        for n in head:
            for u in n.users:
                if u not in head and u.op != "output":
                    raise FcnError(f"`{n.name}` belongs to the head but `{u.name}` outside it also reads it: the "
                                   "positions cannot be separated from the rest of the graph.")
        return features, [n for n in nodes if n in head]

    # -- the conversion --
    def _convert(self, features: Node, head: list[Node], result: Node, out_node: Node
                 ) -> tuple[list[Change], tuple[int, int]]:
        gm, run = self.gm, self.run
        graph = gm.graph
        lay = self._layout(features)
        fshape = run.shapes[features]
        window = (fshape[2], fshape[3]) if lay == "nchw" else (fshape[1], fshape[2])
        forms: dict[Node, _Form] = {features: _Form("grid", window, lay)}
        strides: dict[Node, tuple[int, int]] = {features: (1, 1)}
        maps: dict[Node, Node] = {}
        self._maps = maps
        changes: list[Change] = []
        with graph.inserting_before(out_node):
            maps[features] = features if lay == "nchw" else graph.call_method("permute", (features, 0, 3, 1, 2))
            for n in head:
                if n in run.consts:  # a size or other non-tensor value: recomputed where still needed
                    maps[n] = graph.node_copy(n, lambda a: maps.get(a, a))
                    continue
                ins = [a for a in n.all_input_nodes if a in forms]
                if n not in run.shapes or not ins:
                    raise FcnError(f"the head has no convolutional form at `{n.name}` ({_op_name(gm, n)}): it "
                                   + ("returns several values" if n not in run.shapes else "reads no map")
                                   + ", which mixfx cannot compute per position.",
                                   "Rewrite that part of the head by hand.")
                for a in n.all_input_nodes:
                    if a not in forms and a in run.shapes and a.op != "get_attr":
                        raise FcnError(f"the head node `{n.name}` ({_op_name(gm, n)}) also reads `{a.name}`, a "
                                       "tensor computed outside the head: no convolutional form.")
                if len({forms[a].window for a in ins}) != 1:
                    raise FcnError(f"the head node `{n.name}` ({_op_name(gm, n)}) combines values of different "
                                   f"windows ({', '.join(forms[a].describe() for a in ins)}): no convolutional form.")
                cand, reasons = self._choose(n, ins, forms)
                if cand is None:
                    why = "; ".join(dict.fromkeys(reasons)) or "no candidate form applies"
                    raise FcnError(
                        f"the head has no convolutional form at `{n.name}` ({_op_name(gm, n)}, module "
                        f"{n.target if n.op == 'call_module' else '-'}) on {forms[ins[0]].describe()} "
                        f"{list(run.shapes[ins[0]])} -> {list(run.shapes[n])}: {why}.",
                        "Rewrite that part of the head by hand, or convert only the layers before it.")
                before = f"{_op_name(gm, n)} -> {list(run.shapes[n])}"
                maps[n] = cand.emit(graph, [maps[a] for a in ins])
                forms[n] = cand.out_form
                st = strides[ins[0]]
                strides[n] = (st[0] * cand.stride[0], st[1] * cand.stride[1])
                if cand.describe:
                    changes.append(Change(self.name, n.name, cand.replaces if n.op == "call_module" else None,
                                          before, cand.describe))
        final = forms.get(result)
        if final != _Form("vec"):
            raise FcnError(f"the output `{result.name}` is {final.describe() if final else 'not reached'}, "
                           "not a vector of scores per position.")
        out_node.args = (maps[result],)
        for n in reversed(list(graph.nodes)):
            if n.op not in ("output", "placeholder") and not n.users and (n in head or n in maps.values()):
                graph.erase_node(n)
        return changes, strides[result]

    def _choose(self, n: Node, ins: list[Node], forms: dict[Node, _Form]) -> tuple[_Candidate | None, list[str]]:
        reasons: list[str] = []
        for cand in self._candidates(n, ins, forms, reasons):
            ok, why = self._probe(n, ins, forms, cand)
            if ok:
                return cand, reasons
            if why:
                reasons.append(why)
        return None, reasons

    def _candidates(self, n: Node, ins: list[Node], forms: dict[Node, _Form], reasons: list[str]):
        gm, run = self.gm, self.run
        fin = forms[ins[0]]
        shape_out = run.shapes[n]
        c_in = fin.channels(run.shapes[ins[0]])
        linear = _linear_of(gm, n)
        if linear is not None and len(ins) == 1 and fin.kind in ("flat", "vec"):
            if fin.kind == "vec" and fin.ones:
                reasons.append("a Linear over a trailing dim of size 1")
            else:
                yield self._linear_candidate(n, fin, c_in, *linear)
                reasons.append("its weights as a conv do not reproduce it")
                return
        if len(ins) == 1 and fin.kind in ("grid", "seq"):
            yield from self._pool_candidates(n, fin, c_in, shape_out, reasons)
        # the op itself, on the maps
        if fin.kind == "vec":
            out = _Form("vec", ones=len(shape_out) - 2) if len(shape_out) >= 2 else None
        else:
            out = fin
        if out is not None:
            yield _Candidate(f"{_op_name(gm, n)} on the map", lambda *ms: self._call_with(n, ins, ms),
                             lambda g, ms: g.node_copy(n, self._arg_map(ins, ms)), out)
        # a pure reshape of what is already there (flatten of a 1x1 map, view(N, -1), squeeze)
        for f in _forms_with(fin.window, c_in, self.n, shape_out):
            if f != fin or fin.kind == "vec":
                yield _Candidate("", lambda m: m, lambda g, ms: ms[0], f)
        # an op on the last dim (a vector's features, a channels-last map's channels): channels-last
        # around it; BatchNorm1d-like: [N, C, h*w] around it
        last = _Form("vec") if fin == _Form("vec") and len(shape_out) == 2 else (
            fin if fin.kind == "grid" and fin.layout == "nhwc" else None)
        if last is not None and all(forms[a] == fin for a in ins):
            def channels_last(*ms: torch.Tensor) -> torch.Tensor:
                return self._call_with(n, ins, [m.permute(0, 2, 3, 1) for m in ms]).permute(0, 3, 1, 2)

            yield _Candidate(f"{_op_name(gm, n)} per position (channels-last)", channels_last,
                             self._emit_channels_last(n, ins), last)
        if fin == _Form("vec") and len(shape_out) == 2 and all(forms[a] == fin for a in ins):
            def positions_flat(*ms: torch.Tensor) -> torch.Tensor:
                return self._call_with(n, ins, [m.flatten(2) for m in ms]).unflatten(2, ms[0].shape[2:])

            yield _Candidate(f"{_op_name(gm, n)} per position ([N, C, h*w])", positions_flat,
                             self._emit_positions_flat(n, ins), _Form("vec"))

    def _linear_candidate(self, n: Node, fin: _Form, c_in: int, weight: torch.Tensor, bias: torch.Tensor | None,
                          path: str | None) -> _Candidate:
        out_f = weight.shape[0]
        kh, kw = fin.window if fin.kind == "flat" else (1, 1)
        w = weight.detach()
        w = (w.reshape(out_f, kh, kw, c_in).permute(0, 3, 1, 2) if fin.layout == "nhwc" and fin.kind == "flat"
             else w.reshape(out_f, c_in, kh, kw)).contiguous().clone()
        b = None if bias is None else bias.detach().clone()
        gm = self.gm

        def emit(g: Graph, ms: list[Node]) -> Node:
            conv = nn.Conv2d(c_in, out_f, (kh, kw), bias=b is not None, device=w.device, dtype=w.dtype)
            conv.weight = nn.Parameter(w.clone(), requires_grad=weight.requires_grad)
            if b is not None:
                conv.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
            target = path if path is not None and fu.call_count(gm, path) == 1 else fu.fresh_path(
                gm, (path or n.name) + "_conv")
            fu.set_module(gm, target, conv)
            return g.call_module(target, (ms[0],))

        what = (f"Conv2d({c_in}, {out_f}, {kh}x{kw}) on the map" + (
            f" (weights of the flatten order {'C,h,w' if fin.layout == 'nchw' else 'h,w,C'})" if kh * kw > 1 else ""))
        return _Candidate(what, lambda m: F.conv2d(m, w, b), emit, _Form("vec"), replaces=path or n.name)

    def _pool_candidates(self, n: Node, fin: _Form, c_in: int, shape_out: tuple, reasons: list[str]):
        """Fixed pools that reproduce `n` on the example's window: global (stride 1) or to a grid
        (the adaptive windows at the example size, where they are even)."""
        (gh, gw) = fin.window
        plans: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = []  # kernel, stride, out window
        plans.append(((gh, gw), (1, 1), (1, 1)))
        out_grid = tuple(shape_out[2:]) if len(shape_out) == 4 and shape_out[1] == c_in else None
        if out_grid and out_grid != (1, 1):
            axes = [_adaptive_windows(g, o) for g, o in zip(fin.window, out_grid)]
            bad = [a for a in axes if isinstance(a, str)]
            if bad:
                reasons.append(f"if it is an adaptive pool to {out_grid[0]}x{out_grid[1]}: {bad[0]}")
            else:
                plans.append((tuple(a[0] for a in axes), tuple(a[1] for a in axes), out_grid))
        for kernel, stride, out_window in plans:
            out_forms = _forms_with(out_window, c_in, self.n, shape_out)
            if out_window != (1, 1):
                out_forms = [f for f in out_forms if f.kind == "grid" and f.layout == "nchw"]
            for kind in ("avg", "max", "sum"):
                pool = _pool_module(kind, kernel, stride)
                for f in out_forms:
                    yield _Candidate(f"{type(pool).__name__}(kernel {kernel[0]}x{kernel[1]}, stride {stride[0]}x"
                                     f"{stride[1]})" + (", divisor 1 (a sum)" if kind == "sum" else ""),
                                     pool, self._emit_module(n, pool), f, stride, replaces=n.target
                                     if n.op == "call_module" else n.name)

    # -- probing --
    def _probe(self, n: Node, ins: list[Node], forms: dict[Node, _Form], cand: _Candidate) -> tuple[bool, str]:
        """Whether `cand` reproduces `n` on every window of random maps: of the example's size (one
        window, as at the example input: a squeeze of a 1x1 map shows there) and larger ones."""
        gen = torch.Generator().manual_seed(0)
        fin = forms[ins[0]]
        (gh, gw), (sh, sw) = fin.window, cand.stride
        (oh, ow) = cand.out_form.window
        dtype = next((t.dtype for t in self.gm.parameters()), torch.float32)
        for eh, ew in PROBE_EXTRAS:
            ms = [torch.randn(self.n, forms[a].channels(self.run.shapes[a]), gh + sh * eh, gw + sw * ew,
                              generator=gen).to(dtype) for a in ins]
            try:
                with torch.no_grad():
                    out = cand.impl(*[m.clone() for m in ms])
            except Exception:  # noqa: BLE001 - this form does not apply
                return False, ""
            if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[2:]) != (eh + oh, ew + ow):
                return False, ""
            for i in range(eh + 1):
                for j in range(ew + 1):
                    wins = [forms[a].original(m[..., i * sh:i * sh + gh, j * sw:j * sw + gw]).clone()
                            for a, m in zip(ins, ms)]
                    try:
                        with torch.no_grad():
                            ref = self._call_with(n, ins, wins)
                    except Exception as exc:  # noqa: BLE001
                        return False, f"the op fails on a window of the map ({type(exc).__name__}: {exc})"[:200]
                    got = cand.out_form.original(out[..., i:i + oh, j:j + ow])
                    if not isinstance(ref, torch.Tensor) or ref.shape != got.shape:
                        return False, ""
                    tol = 1e-5 * (1.0 + float(ref.detach().abs().max())) if ref.numel() else 0.0
                    if not torch.allclose(ref, got, rtol=1e-4, atol=tol, equal_nan=True):
                        return False, ""
        return True, ""

    def _value(self, a: Any) -> Any:
        if isinstance(a, Node):
            if a.op == "get_attr":
                return fu.fetch_attr(self.gm, a.target)
            if a in self.run.consts:
                return self.run.consts[a]
            raise FcnError(f"`{a.name}` has no value outside the run")
        return a

    def _call_with(self, n: Node, ins: list[Node], values: Sequence[torch.Tensor]) -> Any:
        env = dict(zip(ins, values))
        args = torch.fx.node.map_arg(n.args, lambda a: env[a] if a in env else self._value(a))
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a] if a in env else self._value(a))
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    # -- emission --
    def _arg_map(self, ins: list[Node], ms: list[Node]):
        env = dict(zip(ins, ms))
        return lambda a: env[a] if a in env else self._maps.get(a, a)

    def _emit_module(self, n: Node, module: nn.Module):
        gm = self.gm

        def emit(g: Graph, ms: list[Node]) -> Node:
            base = n.target if n.op == "call_module" and fu.call_count(gm, n.target) == 1 else f"{n.name}_pool"
            target = base if n.op == "call_module" and base == n.target else fu.fresh_path(gm, base)
            fu.set_module(gm, target, module)
            return g.call_module(target, (ms[0],))
        return emit

    def _emit_channels_last(self, n: Node, ins: list[Node]):
        def emit(g: Graph, ms: list[Node]) -> Node:
            last = [g.call_method("permute", (m, 0, 2, 3, 1)) for m in ms]
            y = g.node_copy(n, self._arg_map(ins, last))
            return g.call_method("permute", (y, 0, 3, 1, 2))
        return emit

    def _emit_positions_flat(self, n: Node, ins: list[Node]):
        def emit(g: Graph, ms: list[Node]) -> Node:
            flat = [g.call_method("flatten", (m, 2)) for m in ms]
            y = g.node_copy(n, self._arg_map(ins, flat))
            hw = g.call_function(operator.getitem, (g.call_method("size", (ms[0],)), slice(2, None)))
            return g.call_method("unflatten", (y, 2, hw))
        return emit

    # -- where the map's positions sit --
    def _score_map(self, gm: GraphModule, x: torch.Tensor, features: Node, window: tuple[int, int],
                   head_stride: tuple[int, int]) -> ScoreMap:
        from mixfx.shapes import propagate_concrete

        n, c, h, w = x.shape
        small = propagate_concrete(gm, (n, c, h, w))
        big = propagate_concrete(gm, (n, c, 2 * h, 2 * w))
        placeholder = next(p for p in gm.graph.nodes if p.op == "placeholder")
        geo: Geometry = map_geometry(gm, placeholder, small.shapes, big.shapes, self.run.consts)
        sm = ScoreMap(features.name, window, head_stride, padded_at=geo.padded_at, global_context=geo.global_at,
                      unknown_at=geo.unknown_at)
        if geo.axes is None:
            return sm
        ay, ax = geo.axes
        sm.stride, sm.offset, sm.receptive_field = (ay.stride, ax.stride), (ay.offset, ax.offset), (ay.field, ax.field)
        out = next(p for p in gm.graph.nodes if p.op == "output").args[0]
        k = (small.shapes.get(out.name) or (None, "K"))[1]
        if _formula_holds(gm, (n, c, h, w), ay, ax):
            sm.output_shape = [str(n), str(k), ay.formula("H"), ax.formula("W")]
        return sm


def _formula_holds(gm: GraphModule, shape: tuple, ay: Axis, ax: Axis) -> bool:
    """The size formula against meta runs at the example and a few sizes off the stride."""
    from mixfx.shapes import propagate_concrete

    n, c, h, w = shape
    checked = 0
    for dh, dw in ((0, 0), (ay.stride, 2 * ax.stride), (ay.stride + 1, ax.stride - 1 if ax.stride > 1 else 3),
                   (2 * ay.stride - 1, 3 * ax.stride + 2)):
        run = propagate_concrete(gm, (n, c, h + dh, w + dw), allow_real=False)
        if run.failure is not None:
            continue  # a divisibility constraint of the spatial part: not this formula's business
        out = next(p for p in gm.graph.nodes if p.op == "output").args[0]
        got = run.shapes.get(out.name)
        if got is None or tuple(got[2:]) != (ay.size(h + dh), ax.size(w + dw)):
            return False
        checked += 1
    return checked >= 2


def _adaptive_windows(size: int, out: int) -> tuple[int, int] | str:
    """(kernel, stride) of a fixed pool with the windows adaptive pooling uses from `size` to
    `out` (start floor(i*size/out), end ceil((i+1)*size/out)), or why there is none."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]
    sizes = {e - s for s, e in zip(starts, ends)}
    steps = {b - a for a, b in zip(starts, starts[1:])}
    if out == 1:
        return size, 1
    if len(sizes) == 1 and len(steps) == 1 and next(iter(steps)) > 0:
        return next(iter(sizes)), next(iter(steps))
    return (f"its windows from {size} to {out} positions are uneven at the example size (starts {starts}, "
            f"sizes {[e - s for s, e in zip(starts, ends)]}), so no fixed pool reproduces it; use an example "
            f"input whose feature map there is a multiple of {out} positions")


def _pool_module(kind: str, kernel: tuple[int, int], stride: tuple[int, int]) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(kernel, stride)
    return nn.AvgPool2d(kernel, stride, divisor_override=1 if kind == "sum" else None)  # sum: divisor 1


def _linear_of(gm: GraphModule, n: Node) -> tuple[torch.Tensor, torch.Tensor | None, str | None] | None:
    """(weight, bias, module path) of a plain `nn.Linear` call or `F.linear` with parameter weights."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward:
            return mod.weight, mod.bias, n.target
        return None
    if n.op == "call_function" and n.target is F.linear:
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if isinstance(w, Node) and w.op == "get_attr" and (b is None or isinstance(b, Node) and b.op == "get_attr"):
            return fu.fetch_attr(gm, w.target), (fu.fetch_attr(gm, b.target) if b is not None else None), None
    return None


def _op_name(gm: GraphModule, n: Node) -> str:
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return type(mod).__name__
    if n.op == "call_method":
        return f".{n.target}()"
    return getattr(n.target, "__name__", str(n.target))


def _extract_head(gm: GraphModule, features: Node, head: list[Node], result: Node, consts: dict[Node, Any]
                  ) -> GraphModule:
    """The original head as its own GraphModule: feature map -> original output. Sizes the head
    reads from outside (x.size(0)) are recomputed from the feature map where they derive from
    it, else fixed at their example value. Shares (not copies) the head's modules; the rewrite
    replaces modules in the converted graph's parents, so this one keeps the originals."""
    g = Graph()
    env: dict[Node, Any] = {features: g.placeholder("features")}

    def derivable(a: Node) -> bool:
        return a in env or a.op == "get_attr" or (a.op.startswith("call") and a in consts and all(
            derivable(b) for b in a.all_input_nodes))

    def copy(a: Node) -> Any:
        if a in env:
            return env[a]
        if a.op == "get_attr":
            env[a] = g.get_attr(a.target)
        elif derivable(a):
            env[a] = g.node_copy(a, copy)
        elif a in consts:
            env[a] = consts[a]
        else:
            raise FcnError(f"the head reads `{a.name}` from outside the head: no convolutional form.")
        return env[a]

    for n in head:
        env[n] = g.node_copy(n, copy)
    g.output(env[result])
    head_gm = GraphModule(gm, g)
    head_gm.eval()
    return head_gm
