"""One forward pass of a torch module under curvcore's interception (private to the torch adapter).

A :class:`Pass` is a ``TorchFunctionMode``: torch keeps function modes per
thread, so two threads stepping two models never see each other's
interception (forward hooks on a shared module would). During a pass it

* draws dropout masks from the pass's own ``torch.Generator`` (replayed for
  every pass of one step, so all of them see the same masks);
* records the ``F.linear``/``F.conv2d`` calls whose weight is one of the
  layers asked for: the input, and the output plus a zero tensor ``e`` that
  requires grad, so one backward pass gives ``dL/dz = dL/de`` for every layer
  of any architecture (residual blocks, BatchNorm, shared inputs).

Forward-mode AD levels are process-wide in torch (two threads calling
``torch.func.jvp`` at once corrupt each other), so every use holds
:data:`FORWARD_AD`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Array = Any

FORWARD_AD = threading.RLock()

_DROPOUT_MASK_DIMS = {F.dropout: None, F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3}
_UNSUPPORTED_RANDOM = (F.alpha_dropout, F.feature_alpha_dropout, F.rrelu)


class Call(NamedTuple):
    """One recorded layer call: the layer, its input, output (with ``e`` added), ``e``, and conv geometry."""

    layer: Any
    a: Array
    z: Array
    e: Array
    geometry: tuple | None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


class Pass(TorchFunctionMode):
    """Interception for one pass; see the module docstring.

    Args:
        generator: dropout masks come from it (``None``: no train-mode dropout allowed).
        layers: ``{id(weight tensor): layer}`` of the layers to record, or ``None``.
    """

    def __init__(self, generator: torch.Generator | None, layers: dict[int, Any] | None = None):
        super().__init__()
        self.generator, self.layers = generator, layers
        self.calls: list[Call] = []

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUT_MASK_DIMS:
            return self._dropout(func, args, kwargs)
        if func in _UNSUPPORTED_RANDOM and _arg(args, kwargs, 3 if func is F.rrelu else 2, "training", False):
            raise NotImplementedError(f"{func.__name__} in train mode is not supported by curvcore's torch adapter "
                                      "(its random draws can't be replayed across passes); put it in eval mode")
        if self.layers is not None and (func is F.linear or func is F.conv2d):
            weight = _arg(args, kwargs, 1, "weight", None)
            layer = self.layers.get(id(weight))
            if layer is not None:
                return self._record(func, layer, args, kwargs)
        return func(*args, **kwargs)

    def _dropout(self, func: Callable, args: tuple, kwargs: dict) -> Array:
        x = args[0]
        p = float(_arg(args, kwargs, 1, "p", 0.5))
        if not _arg(args, kwargs, 2, "training", True) or p == 0.0:
            return x
        if p == 1.0:
            return x * 0
        dims = _DROPOUT_MASK_DIMS[func]
        shape = tuple(x.shape) if dims is None else tuple(x.shape[: x.ndim - dims]) + (1,) * dims
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=self.generator)
        return x * mask / (1 - p)

    def _record(self, func: Callable, layer: Any, args: tuple, kwargs: dict) -> Array:
        z = func(*args, **kwargs)
        e = torch.zeros_like(z, requires_grad=True)
        geometry = None
        if func is F.conv2d:
            geometry = tuple(_arg(args, kwargs, i, name, d) for i, name, d in
                             ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))
        out = z + e
        self.calls.append(Call(layer, args[0], out, e, geometry))
        return out


def pair(v: Any) -> tuple[int, int]:
    """An int or a pair as a pair of ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int] | None:
    """Symmetric zero padding of a conv call as a pair, or ``None`` (asymmetric ``"same"``)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return None if any(t % 2 for t in total) else (total[0] // 2, total[1] // 2)
    return pair(padding)


def patches(call: Call, kernel: tuple[int, int]) -> Array | None:
    """The conv input unfolded to ``(B, S, C_in kh kw)`` (``F.unfold``), or ``None`` if not supported."""
    stride, padding, dilation, groups = call.geometry
    stride, dilation = pair(stride), pair(dilation)
    padding = conv_padding(padding, kernel, dilation)
    if groups != 1 or padding is None or call.a.ndim != 4:
        return None
    cols = F.unfold(call.a.detach(), kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def as_positions(a: Array) -> Array:
    """``(B, n)`` as it is; ``(B, ..., n)`` as ``(B, S, n)``; a conv map ``(B, C, H, W)`` as ``(B, H W, C)``."""
    return a if a.ndim == 2 else a.reshape(a.shape[0], -1, a.shape[-1])


def channels_last(g: Array) -> Array:
    """A conv output map ``(B, C, H, W)`` as ``(B, H W, C)``."""
    return g.flatten(2).transpose(1, 2)


def pattern_like(a: Array, period: int = 5) -> Array:
    """A deterministic, non-constant array (1 .. 2) of the shape of ``a``."""
    i = torch.arange(a.numel(), device=a.device, dtype=a.dtype).reshape(a.shape)
    return 1 + torch.remainder(i * 7, period) / (period - 1)


def nested_jet(fn: Callable[[list], Array], p: list, u: list, order: int) -> list[Array]:
    """``[f, d1, ..., d_order]`` along ``u`` by nested ``torch.func.jvp`` (hold :data:`FORWARD_AD`)."""
    if order == 0:
        return [fn(p)]
    primals, tangents = torch.func.jvp(lambda q: nested_jet(fn, q, u, order - 1), (p,), (u,))
    return list(primals) + [tangents[-1]]
