"""Output shapes of the hottest ops, computed directly instead of through fake-tensor dispatch.

Why: on fake tensors with symbolic sizes, a convolution costs ~2-9 ms (backend selection), a
`torch.cat` ~30 ms (the reference decomposition clones), an `F.layer_norm` ~75 ms (decomposed into
mean/var), and a fake BatchNorm was 60% of a symbolic ResNet-50 run; yet their output shapes are
one line of arithmetic. Each rule makes the same size checks as the kernel, written as Python
comparisons on SymInts, so the ShapeEnv records the same guards (a token-mixing Linear still
records `Eq(tokens, 196)`, a convolution its minimum input size) and a mismatch still raises.

A rule returns `NOT_HANDLED` for any call it does not fully understand (an unusual signature,
transposed or reflect-padded convolutions, ...): the op then runs normally.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NOT_HANDLED = object()

# Output shape == input shape, and no check beyond the channel count (done below for BatchNorm).
SHAPE_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.PReLU,
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def contiguous_strides(shape: tuple) -> tuple:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return tuple(strides)


class ShapeOnly:
    """A tensor known only by its metadata: what a rule returns in a propagation run.

    Why: creating a fake tensor with symbolic sizes costs ~0.5 ms (its strides, numel and
    contiguity are worked out symbolically), more than the rule itself. Rules read and return
    these; the interpreter turns one into a real (fake or meta) tensor, `materialise()`, only when
    an op without a rule consumes it. `strides` None means contiguous."""

    __slots__ = ("shape", "dtype", "device", "strides", "_like", "_cache", "_tensor")

    def __init__(self, like: Any, shape: tuple, dtype: torch.dtype | None = None, strides: tuple | None = None,
                 cache: dict | None = None):
        self._like = like._like if isinstance(like, ShapeOnly) else like
        self._cache = like._cache if isinstance(like, ShapeOnly) and cache is None else cache
        self.shape = torch.Size(shape)
        self.dtype = dtype or like.dtype
        self.device = like.device
        self.strides = strides
        self._tensor: torch.Tensor | None = None

    def dim(self) -> int:
        return len(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def stride(self) -> tuple:
        return self.strides if self.strides is not None else contiguous_strides(tuple(self.shape))

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> Any:
        n = 1
        for d in self.shape:
            n = n * d
        return n

    def __repr__(self) -> str:
        return f"ShapeOnly({list(self.shape)}, {self.dtype})"

    def materialise(self) -> torch.Tensor:
        if self._tensor is None:
            key = (tuple(_expr(d) for d in self.shape),
                   None if self.strides is None else tuple(_expr(d) for d in self.strides), self.dtype)
            t = self._cache.get(key) if self._cache is not None else None
            if t is None:
                t = (self._like.new_empty(self.shape, dtype=self.dtype) if self.strides is None
                     else self._like.new_empty_strided(self.shape, self.strides, dtype=self.dtype))
                if self._cache is not None:
                    self._cache[key] = t
            self._tensor = t
        return self._tensor


TENSOR_LIKE = (torch.Tensor, ShapeOnly)


def _expr(d: Any) -> Any:
    return d.node.expr if isinstance(d, torch.SymInt) else d


def materialise(value: Any) -> Any:
    """`value` with every `ShapeOnly` inside (tuples, lists, dicts) made a real tensor."""
    if isinstance(value, ShapeOnly):
        return value.materialise()
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        items = [materialise(v) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    if isinstance(value, dict):
        return {k: materialise(v) for k, v in value.items()}
    return value


class ShapeRules:
    """The rules. With `lazy=True` (the interpreter) outputs are `ShapeOnly`; otherwise (rules
    inside an eager forward, where any code may consume the output) real tensors."""

    def __init__(self, lazy: bool = False, share_outputs: bool = True) -> None:
        self.lazy = lazy
        # equal-shaped outputs share one empty tensor, unless a caller tells tensors apart by identity
        self.share_outputs = share_outputs
        self._empty: dict[Any, Any] = {}

    def empty(self, like: Any, sizes: tuple, dtype: torch.dtype | None = None, strides: tuple | None = None) -> Any:
        dtype = dtype or like.dtype
        if self.lazy:
            return ShapeOnly(like, sizes, dtype, strides, cache=self._empty)
        if isinstance(like, ShapeOnly):
            like = like.materialise()
        key = (tuple(_expr(s) for s in sizes), None if strides is None else tuple(_expr(s) for s in strides),
               dtype, like.device)
        if not self.share_outputs:
            self._empty.pop(key, None)
        if key not in self._empty:
            self._empty[key] = (like.new_empty(sizes, dtype=dtype) if strides is None
                                else like.new_empty_strided(sizes, strides, dtype=dtype))
        return self._empty[key]

    # -- modules --------------------------------------------------------------------------------
    def module(self, mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if type(mod) in (nn.LSTM, nn.GRU, nn.RNN) and args and isinstance(args[0], TENSOR_LIKE) and not kwargs \
                and all(a is None for a in args[1:]):
            return self.rnn(mod, args[0])
        if len(args) != 1 or kwargs or not isinstance(args[0], TENSOR_LIKE):
            return NOT_HANDLED
        x = args[0]
        if isinstance(mod, SHAPE_PRESERVING_MODULES):
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (x.dim() < 2 or x.shape[1] != mod.num_features):
                raise RuntimeError(f"{type(mod).__name__} expects {mod.num_features} channels, got shape {list(x.shape)}")
            return x
        if type(mod) is nn.Linear:
            return self.linear(x, mod.in_features, mod.out_features)
        if type(mod) is nn.LayerNorm:
            return self.layer_norm(x, tuple(mod.normalized_shape))
        if type(mod) in _CONVS:
            return self.conv(mod, x)
        if type(mod) is nn.GroupNorm:
            if x.dim() < 2 or x.shape[1] != mod.num_channels:
                raise RuntimeError(f"GroupNorm expects {mod.num_channels} channels, got shape {list(x.shape)}")
            return x
        if type(mod) in (nn.MaxPool1d, nn.AvgPool1d) and not getattr(mod, "return_indices", False):
            # the fake kernel of max_pool1d specialises the length (a guard L == example)
            return self.pool1d(x, mod.kernel_size, mod.stride, mod.padding, getattr(mod, "dilation", 1),
                               mod.ceil_mode)
        if type(mod) in (nn.MaxPool2d, nn.AvgPool2d) and not getattr(mod, "return_indices", False):
            return self.pool2d(x, mod.kernel_size, mod.stride, mod.padding, getattr(mod, "dilation", 1),
                               mod.ceil_mode)
        if type(mod) is nn.AdaptiveAvgPool2d:
            return self.adaptive_pool2d(x, mod.output_size)
        if type(mod) is nn.Flatten:
            return self.flatten(x, mod.start_dim, mod.end_dim)
        if type(mod) in (nn.Softmax, nn.LogSoftmax) and mod.dim is not None:
            return self.same_layout(x, mod.dim)
        if type(mod) is nn.Upsample:
            return self.interpolate(x, mod.size, mod.scale_factor, mod.mode, mod.align_corners,
                                    mod.recompute_scale_factor)
        if _is_timm_same_padded(mod):
            return self.same_padded(mod, x)
        return NOT_HANDLED

    def pool2d(self, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> Any:
        """Max/average pooling: torch's own `pooling_output_shape`, and the minimum-size check."""
        from torch._meta_registrations import pooling_output_shape

        if x.dim() not in (3, 4) or not x.is_floating_point():
            return NOT_HANDLED
        pair = [_ntuple(v, 2) for v in (kernel, stride if stride else kernel, padding, dilation)]
        if any(p is None for p in pair):
            return NOT_HANDLED
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair
        h, w = x.shape[-2], x.shape[-1]
        oh = pooling_output_shape(h, kh, ph, sh, dh, ceil_mode)
        ow = pooling_output_shape(w, kw, pw, sw, dw, ceil_mode)
        if oh < 1 or ow < 1:  # torch's own wording
            raise RuntimeError(f"Given input size: ({'x'.join(map(str, x.shape[-3:]))}). Calculated output size: "
                               f"({x.shape[-3]}x{oh}x{ow}). Output size is too small")
        return self.empty(x, (*x.shape[:-2], oh, ow))

    def pool1d(self, x: Any, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> Any:
        """Max/average pooling over the last dim, as `pool2d` does it."""
        from torch._meta_registrations import pooling_output_shape

        if x.dim() not in (2, 3) or not x.is_floating_point():
            return NOT_HANDLED
        one = [_ntuple(v, 1) for v in (kernel, stride if stride else kernel, padding, dilation)]
        if any(p is None for p in one):
            return NOT_HANDLED
        (k,), (st,), (pd,), (dl,) = one
        n = x.shape[-1]
        out = pooling_output_shape(n, k, pd, st, dl, ceil_mode)
        if out < 1:
            raise RuntimeError(f"Given input size: ({'x'.join(map(str, x.shape[-2:]))}). Calculated output size: "
                               f"({x.shape[-2]}x{out}). Output size is too small")
        return self.empty(x, (*x.shape[:-1], out))

    def adaptive_pool2d(self, x: Any, output_size: Any) -> Any:
        out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if x.dim() not in (3, 4) or len(out) != 2 or not x.is_floating_point():
            return NOT_HANDLED
        for d in x.shape[-2:]:
            if d == 0:
                raise RuntimeError("adaptive_avg_pool2d(): Expected input to have non-zero size for non-batch "
                                   f"dimensions, but input has sizes {list(x.shape)}")
        sizes = tuple(x.shape[-2 + i] if o is None else o for i, o in enumerate(out))
        return self.empty(x, (*x.shape[:-2], *sizes))

    def interpolate(self, x: Any, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                    align_corners: Any = None, recompute_scale_factor: Any = None, antialias: bool = False) -> Any:
        """F.interpolate to an explicit size, or by whole-number scale factors. On meta tensors the
        bicubic/bilinear decompositions compute their weights (~80 ms per call)."""
        rank = {"linear": 3, "bilinear": 4, "bicubic": 4, "trilinear": 5}.get(mode)
        if mode not in ("nearest", "nearest-exact", "area", "linear", "bilinear", "bicubic", "trilinear") \
                or not 3 <= x.dim() <= 5 or (rank is not None and x.dim() != rank) or not x.is_floating_point() \
                or (align_corners is not None and rank is None) or (antialias and mode not in ("bilinear", "bicubic")):
            return NOT_HANDLED
        dim = x.dim() - 2
        if size is not None and scale_factor is None and not recompute_scale_factor:
            sizes = list(size) if isinstance(size, (tuple, list)) else [size] * dim
            if len(sizes) != dim or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)
                                            for v in sizes):
                return NOT_HANDLED
        elif scale_factor is not None and size is None:
            scales = list(scale_factor) if isinstance(scale_factor, (tuple, list)) else [scale_factor] * dim
            if len(scales) != dim or not all(isinstance(v, (int, float)) and float(v).is_integer() and v >= 1
                                             for v in scales):
                return NOT_HANDLED
            sizes = [x.shape[2 + i] * int(v) for i, v in enumerate(scales)]
        else:
            return NOT_HANDLED
        return self.empty(x, (*x.shape[:2], *sizes))

    def same_padded(self, mod: nn.Module, x: Any) -> Any:
        """timm's TF-style "same" convolution and pooling (Conv2dSame, MaxPool2dSame,
        AvgPool2dSame): the input is padded so that the output is ceil(size / stride) whatever the
        kernel, with no other size check. The padding arithmetic (ceil and max on SymInts) cost
        ~75 ms per call."""
        if x.dim() != 4 or getattr(mod, "ceil_mode", False):
            return NOT_HANDLED
        if isinstance(mod, nn.Conv2d):
            if mod.padding_mode != "zeros" or any(p != 0 for p in _ntuple(mod.padding, 2) or (1,)):
                return NOT_HANDLED
            if x.shape[1] != mod.in_channels:
                raise RuntimeError(f"{type(mod).__name__} expects {mod.in_channels} input channels, got shape "
                                   f"{list(x.shape)}")
            channels = mod.out_channels
        else:
            channels = x.shape[1]
        stride = _ntuple(mod.stride, 2)
        if stride is None:
            return NOT_HANDLED
        sizes = tuple((x.shape[2 + i] + stride[i] - 1) // stride[i] for i in range(2))
        return self.empty(x, (x.shape[0], channels, *sizes))

    def linear(self, x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise RuntimeError(f"Linear expects {in_features} input features, got shape {list(x.shape)}")
        if out_features == in_features:
            return x
        return self.empty(x, (*x.shape[:-1], out_features))

    def layer_norm(self, x: torch.Tensor, normalized_shape: tuple) -> torch.Tensor:
        k = len(normalized_shape)
        if x.dim() < k or any(a != b for a, b in zip(x.shape[-k:], normalized_shape)):
            raise RuntimeError(f"LayerNorm over {list(normalized_shape)} got shape {list(x.shape)}")
        return x

    def rnn(self, mod: nn.RNNBase, x: torch.Tensor) -> Any:
        """LSTM/GRU/RNN without an initial state: on meta tensors the recurrence is decomposed
        step by step in Python (0.3 s per call for Sequencer's short rows)."""
        if x.dim() != 3:
            return NOT_HANDLED  # unbatched input
        if x.shape[-1] != mod.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {mod.input_size}, got "
                               f"{x.shape[-1]}")
        d = 2 if mod.bidirectional else 1
        out = mod.proj_size if getattr(mod, "proj_size", 0) else mod.hidden_size
        batch = x.shape[0] if mod.batch_first else x.shape[1]
        output = self.empty(x, (*x.shape[:2], d * out))
        h_n = self.empty(x, (d * mod.num_layers, batch, out))
        if isinstance(mod, nn.LSTM):
            return output, (h_n, self.empty(x, (d * mod.num_layers, batch, mod.hidden_size)))
        return output, h_n

    def conv(self, mod: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> Any:
        if mod.padding_mode != "zeros":
            return NOT_HANDLED  # reflect/circular padding: let the kernel decide
        return self.conv_shape(x, mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                               mod.dilation, type(mod).__name__)

    def conv_shape(self, x: Any, in_channels: int, out_channels: int, kernel: tuple, stride: tuple,
                   padding: Any, dilation: tuple, what: str) -> Any:
        nd = len(kernel)
        if x.dim() != nd + 2 or not all(len(v) == nd for v in (stride, dilation)) \
                or not (isinstance(padding, str) or len(padding) == nd):
            return NOT_HANDLED  # unbatched inputs: let the kernel decide
        if x.shape[1] != in_channels:
            raise RuntimeError(f"{what} expects {in_channels} input channels, got shape {list(x.shape)}")
        sizes = []
        for i in range(nd):
            n, k, s, d = x.shape[2 + i], kernel[i], stride[i], dilation[i]
            if padding == "same":
                sizes.append(n)
                continue
            p = 0 if padding == "valid" else padding[i]
            if n + 2 * p < d * (k - 1) + 1:  # torch's own wording
                raise RuntimeError(f"Calculated padded input size per channel: ({n + 2 * p}). Kernel size: "
                                   f"({d * (k - 1) + 1}). Kernel size can't be greater than actual input size")
            sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return self.empty(x, (x.shape[0], out_channels, *sizes))

    def functional_conv(self, x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                        dilation: Any = 1, groups: int = 1) -> Any:
        """F.conv1d/2d/3d (timm's StdConv2d, weight-standardised convs): the weight gives the
        kernel and channel counts."""
        if not isinstance(weight, TENSOR_LIKE) or not isinstance(groups, int) or weight.dim() != x.dim() \
                or not all(isinstance(d, int) for d in weight.shape):
            return NOT_HANDLED
        nd = weight.dim() - 2
        tup = [_ntuple(v, nd) for v in (stride, dilation)]
        pad = padding if isinstance(padding, str) else _ntuple(padding, nd)
        if None in tup or pad is None or (isinstance(pad, str) and pad not in ("same", "valid")):
            return NOT_HANDLED
        return self.conv_shape(x, weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), tup[0], pad,
                               tup[1], "conv")

    def split(self, x: Any, size: Any, dim: Any = 0) -> Any:
        """torch.split / Tensor.split: views along `dim`; an int chunk size needs a known length."""
        if not isinstance(dim, int) or _norm_dim(dim, x.dim()) is None or x.dim() == 0:
            return NOT_HANDLED
        d = _norm_dim(dim, x.dim())
        n = x.shape[d]
        if isinstance(size, int) and not isinstance(size, bool):
            if not isinstance(n, int) or size <= 0:
                return NOT_HANDLED
            sections = [min(size, n - i) for i in range(0, n, size)] or [0]
        elif isinstance(size, (tuple, list)) and all(isinstance(v, (int, torch.SymInt)) for v in size):
            sections = list(size)
            if sum(sections[1:], sections[0]) != n:  # torch's own wording
                raise RuntimeError(f"split_with_sizes expects split_sizes to sum exactly to {n} (input tensor's "
                                   f"size at dimension {d}), but got split_sizes={sections}")
        else:
            return NOT_HANDLED
        strides = _view_strides(x)
        return tuple(self._view(x, (*x.shape[:d], k, *x.shape[d + 1:]), tuple(strides)) for k in sections)

    def stack(self, tensors: Any, dim: Any = 0) -> Any:
        if not isinstance(tensors, (tuple, list)) or not tensors or not all(isinstance(t, TENSOR_LIKE) for t in tensors) \
                or not isinstance(dim, int) or len({(t.dtype, t.device) for t in tensors}) != 1:
            return NOT_HANDLED
        first = tensors[0]
        d = _norm_dim(dim, first.dim() + 1)
        if d is None:
            return NOT_HANDLED
        for i, t in enumerate(tensors[1:], 1):
            if t.dim() != first.dim() or any(a != b for a, b in zip(t.shape, first.shape)):  # torch's own wording
                raise RuntimeError(f"stack expects each tensor to be equal size, but got {list(first.shape)} at "
                                   f"entry 0 and {list(t.shape)} at entry {i}")
        return self.empty(first, (*first.shape[:d], len(tensors), *first.shape[d:]))

    def index(self, x: Any, idx: Any) -> Any:
        """Basic indexing (ints, slices, None, ...) of dims whose length is known, and full slices
        of any dim: a view. Anything else (tensors as indices, slices of symbolic dims) runs."""
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if not all(i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool))
                   for i in items) or sum(i is Ellipsis for i in items) > 1:
            return NOT_HANDLED
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        if consumed > x.dim():
            return NOT_HANDLED
        if Ellipsis in items:
            at = items.index(Ellipsis)
            items[at:at + 1] = [slice(None)] * (x.dim() - consumed)
        else:
            items += [slice(None)] * (x.dim() - consumed)
        strides = _view_strides(x)
        sizes, out_strides, d = [], [], 0
        for i in items:
            if i is None:
                sizes.append(1)
                out_strides.append(1)
                continue
            n, st = x.shape[d], strides[d]
            d += 1
            if isinstance(i, int):
                if not isinstance(n, int):
                    return NOT_HANDLED
                if not -n <= i < n:  # torch's own wording
                    raise IndexError(f"index {i} is out of bounds for dimension {d - 1} with size {n}")
                continue
            if i == slice(None):
                sizes.append(n)
                out_strides.append(st)
                continue
            if not isinstance(n, int) or not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                                                 for v in (i.start, i.stop, i.step)) or (i.step or 1) <= 0:
                return NOT_HANDLED
            sizes.append(len(range(*i.indices(n))))
            out_strides.append(st * (i.step or 1))
        return self._view(x, tuple(sizes), tuple(out_strides))

    def reduce(self, x: Any, dim: Any = None, keepdim: bool = False, **kwargs: Any) -> Any:
        """mean / sum over dims of a floating tensor."""
        if kwargs or not isinstance(keepdim, bool) or not x.is_floating_point():
            return NOT_HANDLED
        rank = x.dim()
        dims = list(range(rank)) if dim is None else [dim] if isinstance(dim, int) else dim
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return NOT_HANDLED
        norm = {_norm_dim(d, rank) for d in dims}
        if None in norm or len(norm) != len(dims):
            return NOT_HANDLED
        sizes = tuple(1 if i in norm else d for i, d in enumerate(x.shape) if keepdim or i not in norm)
        return self.empty(x, sizes)

    # -- methods --------------------------------------------------------------------------------
    def method(self, name: str, args: tuple, kwargs: dict) -> Any:
        if not args or not isinstance(args[0], TENSOR_LIKE):
            return NOT_HANDLED
        x, rest = args[0], args[1:]
        if name in ("mean", "sum"):
            return self.reduce(x, *rest, **kwargs)
        if name == "split" and len(rest) <= 2 and set(kwargs) <= {"dim"}:
            return self.split(x, *rest, **kwargs)
        if name in ("softmax", "log_softmax") and len(rest) == 1 and (not kwargs or set(kwargs) == {"dtype"}):
            return self.same_layout(x, rest[0]) if kwargs.get("dtype") is None else NOT_HANDLED
        if kwargs:
            return NOT_HANDLED
        if name == "reshape":
            return self.reshape(x, rest)
        if name in ("add", "mul", "sub", "div") and len(args) == 2:
            return self.elementwise(x, rest[0])
        if name == "view" and rest and not (len(rest) == 1 and isinstance(rest[0], torch.dtype)):
            return self.reshape(x, rest) if _strides(x) is None else self.split_view(x, rest)
        if name == "permute":
            return self.permute(x, rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
        if name in ("transpose", "swapaxes", "swapdims") and len(rest) == 2:
            return self.transpose(x, *rest)
        if name == "flatten" and len(rest) <= 2:
            return self.flatten(x, *rest)
        if name == "contiguous" and not rest:
            return x if _strides(x) is None else self.empty(x, tuple(x.shape))
        if name == "unbind" and len(rest) <= 1:
            return self.unbind(x, *rest)
        if name in ("sigmoid", "relu", "tanh", "exp", "sqrt", "rsqrt", "abs", "neg", "clone") and not rest:
            return x if x.is_floating_point() else NOT_HANDLED
        if name == "pow" and len(rest) == 1 and isinstance(rest[0], (int, float)) and not isinstance(rest[0], bool):
            return x if x.is_floating_point() else NOT_HANDLED
        if name == "__getitem__" and len(rest) == 1:
            return self.index(x, rest[0])
        if name == "reshape_as" and len(rest) == 1 and isinstance(rest[0], TENSOR_LIKE):
            return self.reshape(x, (tuple(rest[0].shape),))
        return NOT_HANDLED

    def split_view(self, x: Any, sizes: tuple) -> Any:
        """`view` of a strided tensor that only splits dims (`view(B, H//8, 8, W//8, 8, C)` of a
        permuted map), on symbolic sizes: each dim's stride is split, and a dim whose parts are not
        structurally its size gets torch's check (`8*(H//8) == H`, a guard). torch's own `view`
        splits off the outer part and writes the inner one `H//(H//8)`: windowed models' sizes
        then nest at every stage. Anything else (merges, -1, sizes of 1 that are symbols) runs
        normally."""
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if isinstance(x, ShapeOnly) or not all(isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool)
                                               for d in sizes):
            return NOT_HANDLED
        if not any(isinstance(d, torch.SymInt) for d in (*sizes, *x.shape)):
            return NOT_HANDLED
        hint = [_hint(d) for d in sizes]
        in_hint = [_hint(d) for d in x.shape]
        if None in hint or None in in_hint or any(h < 1 for h in hint) \
                or any(h == 1 and not isinstance(d, int) for h, d in zip((*hint, *in_hint), (*sizes, *x.shape))):
            return NOT_HANDLED
        strides = x.stride()
        out_strides: list = [None] * len(sizes)
        j = 0
        for i, (s, st) in enumerate(zip(x.shape, strides)):
            if isinstance(s, int) and s == 1:
                continue
            while j < len(sizes) and hint[j] == 1:
                out_strides[j] = 1
                j += 1
            start, prod = j, 1
            while j < len(sizes) and prod < in_hint[i]:
                prod *= hint[j]
                j += 1
            if prod != in_hint[i] or j == start:
                return NOT_HANDLED
            run = sizes[start:j]
            if len(run) > 1 or _expr(run[0]) != _expr(s):
                if _factors([_expr(d) for d in run], read_max1=False) != _factors([_expr(s)], read_max1=False):
                    total = 1
                    for d in run:
                        total = total * d
                    if total != s:  # torch's check, as a guard on the sizes
                        raise RuntimeError(f"shape '{list(sizes)}' is invalid for input of size {x.numel()}")
            inner = st
            for k in range(j - 1, start - 1, -1):
                out_strides[k] = inner
                inner = inner * sizes[k]
        while j < len(sizes) and hint[j] == 1:
            out_strides[j] = 1
            j += 1
        if j != len(sizes) or any(st is None for st in out_strides):
            return NOT_HANDLED
        return self._view(x, tuple(sizes), tuple(out_strides))

    def same_layout(self, x: Any, dim: Any) -> Any:
        """softmax-like ops: the input's shape (and layout), after the dim check."""
        if not isinstance(dim, int) or not x.is_floating_point() or _norm_dim(dim, x.dim()) is None:
            return NOT_HANDLED
        return x

    def permute(self, x: Any, dims: Any) -> Any:
        """A view: sizes and strides permuted (so a later `.view` still sees the real layout)."""
        rank = x.dim()
        if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
            return NOT_HANDLED
        order = [_norm_dim(d, rank) for d in dims]
        if None in order or sorted(order) != list(range(rank)):
            return NOT_HANDLED
        if order == list(range(rank)):
            return x
        strides = _view_strides(x)
        return self._view(x, tuple(x.shape[i] for i in order), tuple(strides[i] for i in order))

    def transpose(self, x: Any, a: Any, b: Any) -> Any:
        rank = x.dim()
        if not (isinstance(a, int) and isinstance(b, int)) or rank == 0:
            return NOT_HANDLED
        a, b = _norm_dim(a, rank), _norm_dim(b, rank)
        if a is None or b is None:
            return NOT_HANDLED
        order = list(range(rank))
        order[a], order[b] = order[b], order[a]
        return self.permute(x, order)

    def _view(self, x: Any, sizes: tuple, strides: tuple) -> Any:
        contiguous = contiguous_strides(sizes)
        same = all(_expr(s) == _expr(c) or _is_one(n) for s, c, n in zip(strides, contiguous, sizes))
        return self.empty(x, sizes, strides=None if same else strides)

    def flatten(self, x: Any, start: Any = 0, end: Any = -1) -> Any:
        """Contiguous inputs only (a view); others may copy: the op runs normally."""
        rank = max(x.dim(), 1)
        if not (isinstance(start, int) and isinstance(end, int)) or _strides(x) is not None:
            return NOT_HANDLED
        a, b = _norm_dim(start, rank), _norm_dim(end, rank)
        if a is None or b is None or a > b:
            return NOT_HANDLED
        if x.dim() == 0:
            return self.empty(x, (1,))
        merged = 1
        for d in x.shape[a:b + 1]:
            merged = merged * d
        return self.empty(x, (*x.shape[:a], merged, *x.shape[b + 1:]))

    def unbind(self, x: Any, dim: Any = 0) -> Any:
        """Views along a dim of known (not symbolic) length."""
        rank = x.dim()
        d = _norm_dim(dim, rank) if isinstance(dim, int) else None
        if d is None or not isinstance(x.shape[d], int):
            return NOT_HANDLED
        strides = _view_strides(x)
        sizes = tuple(s for i, s in enumerate(x.shape) if i != d)
        out = self._view(x, sizes, tuple(s for i, s in enumerate(strides) if i != d))
        return tuple(out for _ in range(x.shape[d]))

    def elementwise(self, a: Any, b: Any) -> Any:
        """A binary op on floating tensors (or a tensor and a Python number): the broadcast shape,
        with the kernel's checks (equal sizes, or one of them 1)."""
        tensors = [t for t in (a, b) if isinstance(t, TENSOR_LIKE)]
        if not tensors or any(not isinstance(t, (*TENSOR_LIKE, int, float)) or isinstance(t, bool) for t in (a, b)) \
                or any(not t.is_floating_point() for t in tensors) or len({t.device for t in tensors}) != 1:
            return NOT_HANDLED
        if len(tensors) == 1:
            return tensors[0]
        if a.dtype != b.dtype:
            return NOT_HANDLED  # type promotion between tensors: let the kernel decide
        if a.shape == b.shape:
            return a
        sizes = []
        for i in range(1, max(a.dim(), b.dim()) + 1):
            x = a.shape[-i] if i <= a.dim() else 1
            y = b.shape[-i] if i <= b.dim() else 1
            if isinstance(x, int) and x == 1:
                sizes.append(y)
            elif isinstance(y, int) and y == 1:
                sizes.append(x)
            elif x == y:
                sizes.append(x)
            else:  # torch's own wording
                raise RuntimeError(f"The size of tensor a ({x}) must match the size of tensor b ({y}) at "
                                   f"non-singleton dimension {max(a.dim(), b.dim()) - i}")
        return self.empty(a if a.dim() >= b.dim() else b, tuple(reversed(sizes)))

    def reshape(self, x: torch.Tensor, sizes: tuple) -> Any:
        """`reshape` without the reference implementation's stride analysis (which guards on every
        symbolic stride): the size check and the inferred -1, as `infer_size` does. The result is
        contiguous, as a reshape that copies would be."""
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if not all(isinstance(d, (int, torch.SymInt)) and not isinstance(d, bool) for d in sizes):
            return NOT_HANDLED
        free = [i for i, d in enumerate(sizes) if isinstance(d, int) and d == -1]
        if len(free) > 1 or any(isinstance(d, int) and d < -1 for d in sizes):
            return NOT_HANDLED
        given = [d for i, d in enumerate(sizes) if i not in free]
        exact = _exact_quotient(tuple(x.shape), given)
        if exact is not None:  # the sizes' factors are among the input's: no division, no guard
            if free:
                return self.empty(x, tuple(exact if i in free else d for i, d in enumerate(sizes)))
            if isinstance(exact, int) and exact == 1:
                return self.empty(x, sizes)
        numel = 1
        for d in x.shape:
            numel = numel * d
        known = 1
        for d in given:
            known = known * d
        if free:
            if known == 0 or numel % known != 0:
                raise RuntimeError(f"shape '{list(sizes)}' is invalid for input of size {numel}")
            sizes = tuple(numel // known if i in free else d for i, d in enumerate(sizes))
        elif known != numel:
            raise RuntimeError(f"shape '{list(sizes)}' is invalid for input of size {numel}")
        return self.empty(x, sizes)

    # -- functions ------------------------------------------------------------------------------
    def function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target is operator.getitem and len(args) == 2 and isinstance(args[0], (tuple, list)) \
                and isinstance(args[1], int) and not kwargs:
            return args[0][args[1]]  # an element of a tuple output (unbind, RNN)
        if target in _UNARY_FUNCTIONS and len(args) == 1 and isinstance(args[0], TENSOR_LIKE) \
                and set(kwargs) <= {"inplace", "approximate"} and not kwargs.get("inplace"):
            return args[0] if args[0].is_floating_point() else NOT_HANDLED
        if target is F.dropout and args and isinstance(args[0], TENSOR_LIKE) and not kwargs.get("inplace") \
                and not (len(args) > 3 and args[3]):
            return args[0]
        if target in (F.softmax, torch.softmax) and args and isinstance(args[0], TENSOR_LIKE) \
                and set(kwargs) <= {"dim", "dtype", "_stacklevel"} and kwargs.get("dtype") is None:
            dims = [*args[1:], *([kwargs["dim"]] if "dim" in kwargs else [])]  # dim given once
            return self.same_layout(args[0], dims[0]) if len(dims) == 1 else NOT_HANDLED
        if target is torch.flatten and args and isinstance(args[0], TENSOR_LIKE) and not kwargs and len(args) <= 3:
            return self.flatten(*args)
        if target is torch.permute and len(args) == 2 and isinstance(args[0], TENSOR_LIKE) and not kwargs:
            return self.permute(args[0], args[1])
        if target is torch.transpose and len(args) == 3 and isinstance(args[0], TENSOR_LIKE) and not kwargs:
            return self.transpose(*args)
        if target is torch.unbind and args and isinstance(args[0], TENSOR_LIKE) and not kwargs and len(args) <= 2:
            return self.unbind(*args)
        if target is operator.getitem and len(args) == 2 and isinstance(args[0], TENSOR_LIKE) and not kwargs:
            return self.index(*args)
        if target in (operator.pow, torch.pow) and len(args) == 2 and isinstance(args[0], TENSOR_LIKE) \
                and isinstance(args[1], (int, float)) and not isinstance(args[1], bool) and not kwargs:
            return args[0] if args[0].is_floating_point() else NOT_HANDLED
        if target in (torch.mean, torch.sum) and args and isinstance(args[0], TENSOR_LIKE):
            return self.reduce(*args, **kwargs)
        if target is torch.split and len(args) >= 2 and isinstance(args[0], TENSOR_LIKE) and set(kwargs) <= {"dim"}:
            return self.split(*args, **kwargs)
        if target is torch.stack and set(kwargs) <= {"dim"} and 1 <= len(args) <= 2:
            return self.stack(*args, **kwargs)
        if target in (F.conv1d, F.conv2d, F.conv3d) and len(args) >= 2 and isinstance(args[0], TENSOR_LIKE) \
                and not kwargs:
            return self.functional_conv(*args)
        if target is F.batch_norm and args and isinstance(args[0], TENSOR_LIKE) and args[0].is_floating_point():
            mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            if mean is not None and (not isinstance(mean, TENSOR_LIKE) or args[0].dim() < 2
                                     or mean.shape[0] != args[0].shape[1]):
                return NOT_HANDLED
            if training and not (all(isinstance(d, int) for d in args[0].shape) and args[0].numel() > args[0].shape[1]):
                return NOT_HANDLED  # training mode needs more than one value per channel: let it check
            return args[0]
        if target is F.pad and args and isinstance(args[0], TENSOR_LIKE):
            return self.pad(*args, **kwargs)
        if target is F.adaptive_avg_pool2d and len(args) == 2 and isinstance(args[0], TENSOR_LIKE) and not kwargs:
            return self.adaptive_pool2d(*args)
        if target is F.interpolate and args and isinstance(args[0], TENSOR_LIKE):
            return self.interpolate(*args, **kwargs)
        if target in (operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul) \
                and len(args) == 2 and not kwargs:
            return self.elementwise(args[0], args[1])
        if target is F.scaled_dot_product_attention:
            return self.attention(args, kwargs)
        if target in (torch.matmul, operator.matmul) and len(args) == 2 and not kwargs:
            return self.matmul(*args)
        if target is torch.reshape and len(args) == 2 and isinstance(args[0], TENSOR_LIKE) and not kwargs:
            return self.reshape(args[0], (args[1],))
        if target in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(args, kwargs)
        if target is F.group_norm and len(args) >= 2 and isinstance(args[0], TENSOR_LIKE) \
                and isinstance(args[1], int) and args[0].dim() >= 2:
            if args[0].shape[1] % args[1] != 0:
                raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got "
                                   f"input of shape {list(args[0].shape)} and num_groups={args[1]}")
            return args[0]
        if target is F.normalize and args and isinstance(args[0], TENSOR_LIKE):
            return args[0]
        if target is F.layer_norm and args and isinstance(args[0], TENSOR_LIKE):
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            if isinstance(shape, (tuple, list, torch.Size)):
                return self.layer_norm(args[0], tuple(shape))
        return NOT_HANDLED

    def pad(self, x: Any, pad: Any, mode: str = "constant", value: Any = None) -> Any:
        """Constant padding by non-negative amounts, on symbolic sizes only (concrete runs keep
        the kernel). A size padded up to a multiple (`H + (7 - H % 7) % 7`) is written
        `7*((H + 6)//7)`, so that `Hp // 7` and a view into 7-wide windows cancel exactly."""
        if mode != "constant" or not isinstance(pad, (tuple, list)) or len(pad) % 2 or len(pad) // 2 > x.dim() \
                or not (value is None or isinstance(value, (int, float))):
            return NOT_HANDLED
        if not any(isinstance(v, torch.SymInt) for v in (*pad, *x.shape)):
            return NOT_HANDLED
        if not all(isinstance(p, (int, torch.SymInt)) and not isinstance(p, bool) and _known_nonnegative(p)
                   for p in pad):
            return NOT_HANDLED
        sizes = list(x.shape)
        for i in range(len(pad) // 2):
            d = x.dim() - 1 - i
            sizes[d] = _rounded_up(sizes[d] + pad[2 * i] + pad[2 * i + 1])
        return self.empty(x, tuple(sizes))

    def matmul(self, a: Any, b: Any) -> Any:
        """Batched matmul with equal batch dims (broadcasting ones run normally)."""
        if not (isinstance(a, TENSOR_LIKE) and isinstance(b, TENSOR_LIKE)) or a.dim() < 2 or b.dim() < 2 \
                or (b.dim() > 2 and a.shape[:-2] != b.shape[:-2]) or a.device != b.device:
            return NOT_HANDLED
        if a.shape[-1] != b.shape[-2]:
            raise RuntimeError(f"Expected size for first two dimensions of batch2 tensor to be: "
                               f"{list(a.shape)} @ {list(b.shape)} (mat1 and mat2 shapes cannot be multiplied)")
        return self.empty(a, (*a.shape[:-1], b.shape[-1]), torch.promote_types(a.dtype, b.dtype))

    def attention(self, args: tuple, kwargs: dict) -> Any:
        """F.scaled_dot_product_attention without a mask (or with a None one): out = q's shape with
        v's last dim; keys and values must have one length, queries and keys one width."""
        names = ("query", "key", "value")
        qkv = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
        rest = {k: v for k, v in kwargs.items() if k not in names}
        mask = rest.get("attn_mask")
        if len(args) > 3 or set(rest) - {"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"} \
                or rest.get("enable_gqa") or (mask is not None and (not isinstance(mask, TENSOR_LIKE) or rest.get("is_causal"))):
            return NOT_HANDLED
        q, k, v = qkv
        if not all(isinstance(t, TENSOR_LIKE) and t.dim() >= 3 for t in qkv) or not q.dim() == k.dim() == v.dim() \
                or not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
            return NOT_HANDLED  # broadcast or grouped-query heads: let the kernel decide
        if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
            raise RuntimeError(f"scaled_dot_product_attention: query {list(q.shape)}, key {list(k.shape)} and value "
                               f"{list(v.shape)} do not fit")
        if mask is not None:  # must broadcast to (..., L, S): a relative-position bias pins L and S
            scores = (*q.shape[:-1], k.shape[-2])
            if mask.dim() > len(scores):
                return NOT_HANDLED
            for i in range(1, mask.dim() + 1):
                m, t = mask.shape[-i], scores[-i]
                if not _is_one(m) and m != t:
                    raise RuntimeError(f"scaled_dot_product_attention: attn_mask {list(mask.shape)} does not "
                                       f"broadcast to the attention scores {list(scores)}")
        return self.empty(q, (*q.shape[:-1], v.shape[-1]))

    def cat(self, args: tuple, kwargs: dict) -> Any:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        if set(kwargs) - {"tensors", "dim", "axis"} or not isinstance(tensors, (tuple, list)) or not tensors \
                or not all(isinstance(t, TENSOR_LIKE) for t in tensors) or not isinstance(dim, int):
            return NOT_HANDLED
        tensors = [t for t in tensors if not (t.dim() == 1 and t.shape[0] == 0)]  # legacy empty inputs
        if not tensors or len({t.dim() for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
            return NOT_HANDLED
        first = tensors[0]
        rank = first.dim()
        if not -rank <= dim < rank:
            return NOT_HANDLED
        dim %= rank
        for t in tensors[1:]:
            for i in range(rank):
                if i != dim and t.shape[i] != first.shape[i]:
                    raise RuntimeError(f"torch.cat: sizes of tensors must match except in dimension {dim}; got "
                                       f"{list(first.shape)} and {list(t.shape)}")
        total = sum((t.shape[dim] for t in tensors[1:]), first.shape[dim])
        dtype = first.dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        return self.empty(first, (*first.shape[:dim], total, *first.shape[dim + 1:]), dtype)


_UNARY_FUNCTIONS = frozenset({
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.sigmoid, F.tanh, torch.sigmoid,
    torch.tanh, torch.relu, torch.exp, torch.sqrt, torch.rsqrt,
})


def _norm_dim(dim: int, rank: int) -> int | None:
    """`dim` in [0, rank), or None when out of range (the op then runs and raises its own error)."""
    rank = max(rank, 1)
    return dim % rank if -rank <= dim < rank else None


def _is_one(n: Any) -> bool:
    """A size-1 dim (its stride does not matter), told without a guard on a symbolic size."""
    return isinstance(n, int) and n == 1


def _ntuple(v: Any, n: int) -> tuple | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return tuple(v)
    return None


def _strides(x: Any) -> tuple | None:
    """None when `x` is known to be contiguous, else its strides. For real fake tensors the test is
    structural (the stride expressions equal the contiguous ones), so it adds no guard."""
    if isinstance(x, ShapeOnly):
        return x.strides
    strides = x.stride()
    shape = tuple(x.shape)
    want = contiguous_strides(shape)
    if all(_expr(a) == _expr(b) or _is_one(n) or _same_product(a, shape[i + 1:])
           for i, (a, b, n) in enumerate(zip(strides, want, shape))):
        return None
    return tuple(strides)


def _same_product(stride: Any, sizes: tuple) -> bool:
    """Is `stride` the product of `sizes`, written as torch writes a fresh tensor's strides
    (`96*Max(1, H)*Max(1, W)`, where `contiguous_strides` gives `H*(96*W)`)? Compared factor by
    factor, `Max(1, e)` read as `e` (they differ only at e == 0, where the tensor is empty and
    any view of it is valid): structural, so it adds no guard. Without it every padded map
    (`F.pad`'s output) looks strided, and `.view` goes to torch's reshape, whose `split_dim`
    writes a window of 7 as `Hp//(Hp//7)`: Swin's sizes then grow without bound."""
    return _factors([_expr(stride)]) == _factors([_expr(s) for s in sizes])


def _hint(d: Any) -> int | None:
    if isinstance(d, int):
        return d
    h = d.node.hint
    return int(h) if h is not None else None


def _known_nonnegative(v: Any) -> bool:
    if isinstance(v, int):
        return v >= 0
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(v >= 0)  # no guard: value ranges only


def _rounded_up(size: Any) -> Any:
    """`x + Mod(k - Mod(x, k), k)` (and `x + Mod(x, 2)`), a size padded up to a multiple of k,
    as the equal `k*FloorDiv(x + k - 1, k)`; anything else unchanged."""
    if not isinstance(size, torch.SymInt):
        return size
    from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

    mods = (Mod, PythonMod)
    e = size.node.expr
    if not getattr(e, "is_Add", False) or len(e.args) != 2:
        return size
    for x, m in (e.args, e.args[::-1]):
        if not isinstance(m, mods) or not getattr(m.args[1], "is_Integer", False) or int(m.args[1]) < 2:
            continue
        k = int(m.args[1])
        inner = m.args[0]
        up = (k == 2 and inner == x) or (getattr(inner, "is_Add", False) and len(inner.args) == 2 and k in inner.args
                                          and any(isinstance(-t, mods) and (-t).args == (x, m.args[1])
                                                  for t in inner.args))
        if up:
            env = size.node.shape_env
            return env.create_symintnode(k * FloorDiv(x + k - 1, k), hint=size.node.hint)
    return size


def _exact_quotient(dims: tuple, by: list) -> Any:
    """prod(dims) / prod(by) when every factor of `by` is a factor of `dims` (as an int or a
    SymInt of the same ShapeEnv), else None. `view(-1, Hp//7, Wp//7, 7, 7, C)` of a tensor of
    (Hp//7)*(Wp//7) windows then infers 1, where `numel // known` writes a quotient of two
    products that sympy cannot cancel (Swin: expressions that double with every block)."""
    symbolic = [d for d in (*dims, *by) if isinstance(d, torch.SymInt)]
    if not symbolic:
        return None
    env = symbolic[0].node.shape_env
    if env is None or any(d.node.shape_env is not env for d in symbolic):
        return None
    dims_e, by_e = [_expr(d) for d in dims], [_expr(d) for d in by]
    n_coeff, n_rest = _factors(dims_e, read_max1=False)
    k_coeff, k_rest = _factors(by_e, read_max1=False)
    if k_coeff == 0 or n_coeff % k_coeff or any(n_rest.get(f, 0) < p for f, p in k_rest.items()):
        # a quotient an earlier view inferred (`view(-1, 64, ...)` of B_ windows: B_//64, with the
        # guard B_ % 64 == 0) is the exact B_/64: with that, its factors may cancel (Swin's mask
        # view and the reshape back to (B_, N, C), whose C was a quotient of two products)
        dims_e = [_exact_divisions(e, env) for e in dims_e]
        if dims_e == [_expr(d) for d in dims]:
            return None
        n_coeff, n_rest = _factors(dims_e, read_max1=False)
        if n_coeff % k_coeff or any(n_rest.get(f, 0) < p for f, p in k_rest.items()):
            return None
    expr: Any = n_coeff // k_coeff
    for f, p in n_rest.items():
        if p > k_rest.get(f, 0):
            expr = expr * f ** (p - k_rest.get(f, 0))
    if isinstance(expr, int) or getattr(expr, "is_Number", False):
        return int(expr)
    hints = [d.node.hint if isinstance(d, torch.SymInt) else d for d in (*dims, *by)]
    hint = None
    if all(isinstance(h, int) for h in hints):
        num, den = math.prod(hints[:len(dims)]), math.prod(hints[len(dims):])
        hint = num // den if den else None
    return env.create_symintnode(expr, hint=hint)


def _exact_divisions(expr: Any, env: Any) -> Any:
    """`expr` with each `FloorDiv(x, k)` (k an integer) that the shape env's guards say divides
    exactly (`Mod(c*x, c*k) == 0`) written as the rational `x/k`."""
    from torch.utils._sympy.functions import FloorDiv

    if isinstance(expr, int) or not getattr(expr, "has", None) or not expr.has(FloorDiv):
        return expr
    known = [g.expr for g in getattr(env, "guards", ())]
    swaps = {}
    for fd in expr.atoms(FloorDiv):
        x, k = fd.args
        if getattr(k, "is_Integer", False) and int(k) > 0 and _guarded_divisible(known, env, x, int(k)):
            swaps[fd] = x / k
    return expr.xreplace(swaps) if swaps else expr


def _guarded_divisible(guards: list, env: Any, x: Any, k: int) -> bool:
    import sympy
    from torch.utils._sympy.functions import Mod, PythonMod

    def says(mod: Any) -> bool:
        if not isinstance(mod, (Mod, PythonMod, sympy.Mod)):
            return False
        a, m = mod.args
        c = a / x
        return bool(getattr(c, "is_Integer", False) and getattr(m, "is_Integer", False) and int(m) == int(c) * k)

    if any(says(m) for m in getattr(env, "divisible", ())):
        return True
    for g in guards:
        if isinstance(g, sympy.Eq) and 0 in g.args:
            other = g.args[0] if g.args[1] == 0 else g.args[1]
            if says(other):
                return True
    return False


def _factors(exprs: list, read_max1: bool = True) -> tuple[Any, dict]:
    """(numeric coefficient, {factor: power}) of a product of size expressions; with
    `read_max1`, `Max(1, e)` (a stride) counts as `e`."""
    from torch.utils._sympy.functions import Max

    coeff: Any = 1
    rest: dict = {}
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if isinstance(e, int) or getattr(e, "is_Integer", False):
            coeff = coeff * int(e)
        elif getattr(e, "is_Rational", False):  # x/k of an exact division
            coeff = coeff * e
        elif getattr(e, "is_Mul", False):
            stack.extend(e.args)
        elif getattr(e, "is_Pow", False) and getattr(e.args[1], "is_Integer", False) and int(e.args[1]) > 0:
            stack.extend([e.args[0]] * int(e.args[1]))
        elif read_max1 and isinstance(e, Max) and len(e.args) == 2 and 1 in e.args:
            stack.append(e.args[1] if e.args[0] == 1 else e.args[0])
        else:
            rest[e] = rest.get(e, 0) + 1
    return coeff, rest


def _view_strides(x: Any) -> tuple:
    """The strides a view of `x` is computed from: its own, or the canonical contiguous ones (a
    fake tensor's contiguous strides may be written differently, e.g. with Max(1, size))."""
    strides = _strides(x)
    return strides if strides is not None else contiguous_strides(tuple(x.shape))


def _is_timm_same_padded(mod: nn.Module) -> bool:
    cls = type(mod)
    return cls.__name__ in ("Conv2dSame", "MaxPool2dSame", "AvgPool2dSame") and cls.__module__.startswith("timm.")
