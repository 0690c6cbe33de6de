"""A protocol model from user functions: ``forward``, ``jvp`` and ``vjp`` over any params list.

Methods that need only forward/JVP/VJP (CurveBall, SGD, Adam) then run on any
differentiable model, not only W/b-pair MLPs: a Rosenbrock function with a
1-array params list, a hand-written layer, a model differentiated by the
user's own framework (``jax.jvp``/``jax.vjp``, ``torch.func``).

>>> import numpy as np
>>> def forward(p, x):   # f(w, x) = x w (one linear map, params [w] of shape (n,))
...     return x @ p[0][:, None]
>>> def jvp(p, x, t):
...     return forward(p, x), x @ t[0][:, None]
>>> def vjp(p, x):
...     return forward(p, x), lambda u: [x.T @ u[:, 0]]
>>> model = FunctionModel(forward, jvp, vjp)

The adapter checks structure and shapes (a tangent like params, a pullback that
returns a params-like list, output tangents of the output's shape); it adds no
math of its own. ``layers`` and ``jet`` are not provided, so layer-wise methods
(``needs = ("layers",)``) refuse such a model with a ``TypeError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from curvcore._namespace import array_namespace

from curvcore._checks import check_same_structure

Array = Any

__all__ = ["FunctionModel"]


class FunctionModel:
    """A model of the curvcore protocol built from three user functions.

    Args:
        forward: ``forward(params, x) -> out`` with ``out`` of shape ``(B, C)``.
        jvp: ``jvp(params, x, tangent) -> (out, J tangent)``; ``tangent`` is a
            list like ``params``.
        vjp: ``vjp(params, x) -> (out, pullback)`` with ``pullback(u) = J^T u``
            returning a list like ``params``.
        xp: the array namespace of the params; ``None`` infers it from the
            params of each call (``array_api_compat.array_namespace``).

    Raises:
        TypeError: one of the functions is not callable.
    """

    def __init__(self, forward: Callable, jvp: Callable, vjp: Callable, xp: Any = None) -> None:
        for name, fn in (("forward", forward), ("jvp", jvp), ("vjp", vjp)):
            if not callable(fn):
                raise TypeError(f"FunctionModel: {name} must be callable, got {type(fn).__name__}")
        self._forward, self._jvp, self._vjp = forward, jvp, vjp
        self.xp = xp

    def __repr__(self) -> str:
        return f"FunctionModel(forward={getattr(self._forward, '__name__', self._forward)!r})"

    def _params(self, params: Sequence[Array]) -> list[Array]:
        params = list(params)
        if not params:
            raise ValueError("FunctionModel: params must be a non-empty list of arrays")
        if self.xp is None:
            self.xp = array_namespace(*params)
        return params

    def forward(self, params: Sequence[Array], x: Array) -> Array:
        """``forward(params, x)``."""
        return self._forward(self._params(params), x)

    def jvp(self, params: Sequence[Array], x: Array, tangent: Sequence[Array]) -> tuple[Array, Array]:
        """``(out, J tangent)``; ``ValueError`` if the tangent or the result has the wrong shape."""
        params = self._params(params)
        tangent = list(tangent)
        check_same_structure("tangent", tangent, params)
        out, jt = self._jvp(params, x, tangent)
        if tuple(jt.shape) != tuple(out.shape):
            raise ValueError(
                f"FunctionModel: jvp returned J tangent of shape {tuple(jt.shape)} for an output of shape "
                f"{tuple(out.shape)}"
            )
        return out, jt

    def vjp(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Array], list[Array]]]:
        """``(out, pullback)``; the pullback checks its cotangent and its result."""
        params = self._params(params)
        out, pull = self._vjp(params, x)
        out_shape = tuple(out.shape)

        def pullback(u: Array) -> list[Array]:
            if tuple(u.shape) != out_shape:
                raise ValueError(
                    f"Shape mismatch in the output cotangent: expected {out_shape}, got {tuple(u.shape)}."
                )
            grads = list(pull(u))
            check_same_structure("the pullback result", grads, params)
            return grads

        return out, pullback
