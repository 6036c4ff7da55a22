"""Where each position of a score map sits in the input: stride, offset, receptive field, size.

A small private helper of `passes.fcn` (the general receptive-field analysis is a separate
module). It walks a graph from one map node to the output through conv / pool / pad geometry
(Araujo, Norris & Sim, "Computing Receptive Fields of CNNs", Distill 2019). Per spatial axis:

- position `i` of a map sees input pixels `[i*stride + offset, i*stride + offset + field)`;
  a layer with kernel k, stride s, padding p, dilation d maps (S, o, R) to
  (S*s, o - p*S, R + (k-1)*d*S); branches that meet (add, cat, mul) take the union;
- the map's size is `floor((H + a) / S)`: each layer adds `(2p - d(k-1) - 1 + s) * S` to `a`
  (nested floors of integers compose, `floor(floor(x/b)/c) = floor(x/(b*c))`).

Ops without a known geometry that keep the spatial size (activations, norms, 1x1 work,
layout changes) are transparent; any other op makes the geometry unknown, and the walk says
where. A node whose output does not vary with the input size but reads a map (an SE gate's
pooled vector) is global context: it has no position, and the positions it feeds see the
whole input (`global_at`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node


@dataclass(frozen=True)
class Axis:
    stride: int = 1
    offset: int = 0  # first input pixel position 0 sees (negative: inside the zero padding)
    field: int = 1  # receptive field, in input pixels
    a: int = 0  # size = floor((H + a) / stride)

    def size(self, length: int) -> int:
        return (length + self.a) // self.stride

    def formula(self, name: str) -> str:
        """`(H - 92)//8 + 1` style (the form JAX and the analyser print)."""
        shift = self.stride - self.a  # floor((H + a)/S) = (H - (S - a))//S + 1
        if self.stride == 1:
            return name if shift == 1 else f"{name} {'-' if shift > 1 else '+'} {abs(shift - 1)}"
        inner = name if shift == 0 else f"{name} {'-' if shift > 0 else '+'} {abs(shift)}"
        return f"({inner})//{self.stride} + 1"


@dataclass
class Geometry:
    axes: tuple[Axis, Axis] | None  # (H, W); None when unknown
    unknown_at: str | None = None  # the node whose geometry is unknown
    padded_at: list[str] = field(default_factory=list)  # nodes that pad (or pool in ceil mode)
    global_at: list[str] = field(default_factory=list)  # global context feeding the map


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _conv(axis: Axis, k: int, s: int, p: int, d: int, ceil: bool = False) -> Axis:
    c = 2 * p - d * (k - 1) - 1 + s + (s - 1 if ceil else 0)
    return Axis(axis.stride * s, axis.offset - p * axis.stride, axis.field + (k - 1) * d * axis.stride,
                axis.a + c * axis.stride)


def _pad(axis: Axis, before: int, after: int) -> Axis:
    return replace(axis, offset=axis.offset - before * axis.stride, a=axis.a + (before + after) * axis.stride)


def _union(axes: Sequence[Axis]) -> Axis | None:
    if len({a.stride for a in axes}) != 1:
        return None
    start = min(a.offset for a in axes)
    end = max(a.offset + a.field for a in axes)
    return Axis(axes[0].stride, start, end - start, axes[0].a)


def _has_kernels(mod: nn.Module) -> bool:
    return any(getattr(m, "kernel_size", None) not in (None, 1, (1, 1)) for m in mod.modules())


def _arg(node: Node, i: int, name: str, default: Any, consts: dict[Node, Any]) -> Any:
    v = node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
    return consts.get(v, v) if isinstance(v, Node) else v


def _layer(gm: GraphModule, node: Node, shapes: dict[str, tuple], consts: dict[Node, Any]):
    """(kind, params) of a node with a known spatial geometry: ("conv", (k, s, p, d, ceil) per
    axis) or ("pad", ((before, after) per axis)); None when it has none; "unknown" when it
    is a spatial op whose geometry this helper does not know."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and type(mod).forward in (
                nn.Conv2d.forward, nn.MaxPool2d.forward, nn.AvgPool2d.forward):
            k, s = _pair(mod.kernel_size), _pair(mod.stride if mod.stride is not None else mod.kernel_size)
            d = _pair(getattr(mod, "dilation", 1))
            pad = mod.padding
            if pad == "valid":
                pad = 0
            if pad == "same":
                return "unknown"  # torch pads unevenly for even kernels: rare here, say so
            p = _pair(pad)
            ceil = bool(getattr(mod, "ceil_mode", False))
            return "conv", tuple((k[i], s[i], p[i], d[i], ceil) for i in range(2))
        if isinstance(mod, nn.modules.padding._ConstantPadNd | nn.modules.padding._ReflectionPadNd
                      | nn.modules.padding._ReplicationPadNd | nn.ZeroPad2d):
            wl, wr, ht, hb = (list(mod.padding) * 4)[:4] if isinstance(mod.padding, tuple) else [mod.padding] * 4
            return "pad", ((ht, hb), (wl, wr))
        return "unknown" if _has_kernels(mod) and not isinstance(mod, (nn.Conv2d,)) else None
    if node.op == "call_function":
        t = node.target
        if t in (F.conv2d, getattr(__import__("torch"), "conv2d")):
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            kshape = shapes.get(w.name) if isinstance(w, Node) else None
            if kshape is None:
                return "unknown"
            s = _pair(_arg(node, 3, "stride", 1, consts))
            pad = _arg(node, 4, "padding", 0, consts)
            if isinstance(pad, str):
                if pad != "valid":
                    return "unknown"
                pad = 0
            p, d = _pair(pad), _pair(_arg(node, 5, "dilation", 1, consts))
            return "conv", tuple((kshape[2 + i], s[i], p[i], d[i], False) for i in range(2))
        if t in (F.max_pool2d, F.avg_pool2d):
            k = _pair(_arg(node, 1, "kernel_size", None, consts))
            stride = _arg(node, 2, "stride", None, consts)
            s = _pair(stride) if stride not in (None, [], ()) else k
            p = _pair(_arg(node, 3, "padding", 0, consts))
            if t is F.max_pool2d:
                d, ceil = _pair(_arg(node, 4, "dilation", 1, consts)), bool(_arg(node, 5, "ceil_mode", False, consts))
            else:
                d, ceil = (1, 1), bool(_arg(node, 4, "ceil_mode", False, consts))
            return "conv", tuple((k[i], s[i], p[i], d[i], ceil) for i in range(2))
        if t is F.pad:
            pads = list(_arg(node, 1, "pad", (), consts)) + [0, 0, 0, 0]
            return "pad", ((pads[2], pads[3]), (pads[0], pads[1]))
        name = getattr(t, "__name__", "")
        if name in ("interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle", "conv_transpose2d", "unfold",
                    "fold", "grid_sample"):
            return "unknown"
    return None


def _is_shape(s: Any) -> bool:
    return isinstance(s, (tuple, list)) and all(isinstance(d, int) for d in s)


def _spatial_numel(shape: tuple | None, other: tuple | None) -> int | None:
    """Product of the dims that differ between the two sizes (the spatial ones)."""
    if not (_is_shape(shape) and _is_shape(other)) or len(shape) != len(other):
        return None
    n = 1
    for a, b in zip(shape, other):
        if a != b:
            n *= a
    return n


def map_geometry(gm: GraphModule, start: Node, shapes: dict[str, tuple], shapes_big: dict[str, tuple],
                 consts: dict[Node, Any], start_axes: tuple[Axis, Axis] = (Axis(), Axis())) -> Geometry:
    """Geometry of the graph's output in units of `start`'s positions (the input placeholder:
    input pixels). `shapes`/`shapes_big` are node-name -> shape at the example size and at a
    larger size (which dims are spatial), `consts` the example values of non-tensor nodes."""
    geo: dict[Node, tuple[Axis, Axis] | None] = {start: start_axes}
    padded: list[str] = []
    glob: list[str] = []
    out_node = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out_node = node
            break
        if node is start or node.op in ("placeholder", "get_attr"):
            continue
        inputs = [a for a in node.all_input_nodes if a in geo]
        if not inputs:
            continue
        s1, s2 = shapes.get(node.name), shapes_big.get(node.name)
        if s1 is None or s2 is None or s1 == s2:  # no positions: a pooled summary (global) or a size
            if _is_shape(s1) and any(geo[a] is not None or a.name in glob for a in inputs):
                glob.append(node.name)
            geo[node] = None
            continue
        known = [geo[a] for a in inputs if geo[a] is not None]
        if not known:  # broadcast of a global summary back onto nothing spatial
            geo[node] = None
            continue
        merged = tuple(_union([g[i] for g in known]) for i in range(2))
        if None in merged:
            return Geometry(None, node.name, padded, glob)
        layer = _layer(gm, node, shapes, consts)
        if layer == "unknown":
            return Geometry(None, node.name, padded, glob)
        if layer is None and not _is_shape(s1):  # several outputs (chunk, split): read per getitem
            geo[node] = merged  # type: ignore[assignment]
            continue
        if layer is None:
            ins = [_spatial_numel(shapes.get(a.name), shapes_big.get(a.name)) for a in inputs if geo[a] is not None]
            if any(n is not None and n != _spatial_numel(s1, s2) for n in ins):
                return Geometry(None, node.name, padded, glob)
            geo[node] = merged  # type: ignore[assignment]
            continue
        kind, params = layer
        if kind == "conv":
            if any(p[2] > 0 or p[4] for p in params):
                padded.append(node.name)
            geo[node] = tuple(_conv(merged[i], *params[i]) for i in range(2))  # type: ignore[assignment]
        else:
            if any(b or a for b, a in params):
                padded.append(node.name)
            geo[node] = tuple(_pad(merged[i], *params[i]) for i in range(2))  # type: ignore[assignment]
    result = out_node.args[0] if out_node is not None else None
    axes = geo.get(result) if isinstance(result, Node) else None
    if axes is None:
        return Geometry(None, getattr(result, "name", None), padded, glob)
    return Geometry(axes, None, padded, glob)
