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


class ShapeRules:
    """The rules, with a per-run cache of outputs by shape (creating a fake tensor with symbolic
    sizes is itself the expensive step, and only shapes are read)."""

    def __init__(self) -> None:
        self._empty: dict[Any, torch.Tensor] = {}

    def empty(self, like: torch.Tensor, sizes: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        key = (tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in sizes), dtype, like.device)
        if key not in self._empty:
            self._empty[key] = like.new_empty(sizes, dtype=dtype)
        return self._empty[key]

    # -- modules --------------------------------------------------------------------------------
    def module(self, mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        if type(mod) in (nn.LSTM, nn.GRU, nn.RNN) and args and isinstance(args[0], torch.Tensor) and not kwargs \
                and all(a is None for a in args[1:]):
            return self.rnn(mod, args[0])
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
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
        return NOT_HANDLED

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
        nd = len(mod.kernel_size)
        if mod.padding_mode != "zeros" or x.dim() != nd + 2:
            return NOT_HANDLED  # reflect/circular padding and unbatched inputs: let the kernel decide
        if x.shape[1] != mod.in_channels:
            raise RuntimeError(f"{type(mod).__name__} expects {mod.in_channels} input channels, got shape "
                               f"{list(x.shape)}")
        sizes = []
        for i in range(nd):
            n, k, s, d = x.shape[2 + i], mod.kernel_size[i], mod.stride[i], mod.dilation[i]
            if mod.padding == "same":
                sizes.append(n)
                continue
            p = 0 if mod.padding == "valid" else mod.padding[i]
            if n + 2 * p < d * (k - 1) + 1:  # torch's own wording
                raise RuntimeError(f"Calculated padded input size per channel: ({n + 2 * p}). Kernel size: "
                                   f"({d * (k - 1) + 1}). Kernel size can't be greater than actual input size")
            sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return self.empty(x, (x.shape[0], mod.out_channels, *sizes))

    # -- methods --------------------------------------------------------------------------------
    def method(self, name: str, args: tuple, kwargs: dict) -> Any:
        if not args or not isinstance(args[0], torch.Tensor) or kwargs:
            return NOT_HANDLED
        if name == "reshape":
            return self.reshape(args[0], args[1:])
        if name in ("add", "mul", "sub", "div") and len(args) == 2:
            return self.elementwise(args[0], args[1])
        return NOT_HANDLED

    def elementwise(self, a: Any, b: Any) -> Any:
        """A binary op on floating tensors (or a tensor and a Python number): the broadcast shape,
        with the kernel's checks (equal sizes, or one of them 1)."""
        tensors = [t for t in (a, b) if isinstance(t, torch.Tensor)]
        if not tensors or any(not isinstance(t, (torch.Tensor, int, float)) or isinstance(t, bool) for t in (a, b)) \
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
        numel = 1
        for d in x.shape:
            numel = numel * d
        known = 1
        for i, d in enumerate(sizes):
            if i not in free:
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
        if target in (operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul) \
                and len(args) == 2 and not kwargs:
            return self.elementwise(args[0], args[1])
        if target is F.scaled_dot_product_attention:
            return self.attention(args, kwargs)
        if target in (torch.matmul, operator.matmul) and len(args) == 2 and not kwargs:
            return self.matmul(*args)
        if target is torch.reshape and len(args) == 2 and isinstance(args[0], torch.Tensor) and not kwargs:
            return self.reshape(args[0], (args[1],))
        if target in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(args, kwargs)
        if target is F.group_norm and len(args) >= 2 and isinstance(args[0], torch.Tensor) \
                and isinstance(args[1], int) and args[0].dim() >= 2:
            if args[0].shape[1] % args[1] != 0:
                raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got "
                                   f"input of shape {list(args[0].shape)} and num_groups={args[1]}")
            return args[0]
        if target is F.normalize and args and isinstance(args[0], torch.Tensor):
            return args[0]
        if target is F.layer_norm and args and isinstance(args[0], torch.Tensor):
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            if isinstance(shape, (tuple, list, torch.Size)):
                return self.layer_norm(args[0], tuple(shape))
        return NOT_HANDLED

    def matmul(self, a: Any, b: Any) -> Any:
        """Batched matmul with equal batch dims (broadcasting ones run normally)."""
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2 \
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
        if len(args) > 3 or rest.get("attn_mask") is not None or set(rest) - {"attn_mask", "dropout_p", "is_causal",
                                                                              "scale", "enable_gqa"}:
            return NOT_HANDLED
        q, k, v = qkv
        if not all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in qkv) or not q.dim() == k.dim() == v.dim() \
                or not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
            return NOT_HANDLED  # broadcast or grouped-query heads: let the kernel decide
        if k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
            raise RuntimeError(f"scaled_dot_product_attention: query {list(q.shape)}, key {list(k.shape)} and value "
                               f"{list(v.shape)} do not fit")
        return self.empty(q, (*q.shape[:-1], v.shape[-1]))

    def cat(self, args: tuple, kwargs: dict) -> Any:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
        if set(kwargs) - {"tensors", "dim", "axis"} or not isinstance(tensors, (tuple, list)) or not tensors \
                or not all(isinstance(t, torch.Tensor) for t in tensors) or not isinstance(dim, int):
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
