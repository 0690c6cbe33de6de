"""Exponential moving averages with Adam's bias correction: the one implementation.

``S_t = β S_{t-1} + (1 - β) Ŝ_t`` is stored; ``S_t / (1 - β^t)`` is used
(Kingma & Ba 2015, Alg. 1). Adam, the pseudo-Hessian's ``"adam"`` direction
and ESN's ``estimator="ema"`` moments all go through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._namespace import array_namespace
from ..protocol import Array
from ..tree_algebra import tree_addcmul, tree_div, tree_lerp, tree_scale, tree_shift, tree_sqrt


def ema(old: Array, new: Array, beta: float) -> Array:
    """``β old + (1 - β) new``."""
    return beta * old + (1 - beta) * new


def correction(beta: float, t: Array) -> Array:
    """``1 - β^t``: the weight an EMA started at zero has collected after ``t`` steps."""
    return 1 - beta**t


def debias(value: Array, beta: float, t: Array) -> Array:
    """Adam-style bias correction ``value / (1 - β^t)`` (``t >= 1`` a float 0-d array)."""
    return value / correction(beta, t)


def ema_moments(old: Any, new: Any, beta: float, t: Array) -> tuple[Any, Any]:
    """``(raw EMAs to store, bias-corrected EMAs to use)`` of every field of a named tuple (or a tuple).

    ``t`` is the new step count; a ``None`` field stays ``None``.
    """
    raw = [None if v is None else ema(o, v, beta) for o, v in zip(old, new)]
    fresh = [None if v is None else debias(v, beta, t) for v in raw]
    if hasattr(old, "_fields"):
        return type(old)(*raw), type(old)(*fresh)
    return type(old)(raw), type(old)(fresh)


def adam_direction(g: Sequence[Array], m: Sequence[Array], v: Sequence[Array], betas: tuple[float, float],
                   eps: float, t: Array) -> tuple[list[Array], list[Array], list[Array]]:
    """Adam's ``(mhat / (sqrt(vhat) + eps), m, v)`` after updating the moments with the gradient ``g``.

    ``m <- ema(m, g, b1)``, ``v <- ema(v, g², b2)``, ``mhat = debias(m, b1, t)``,
    ``vhat = debias(v, b2, t)``; ``t >= 1`` the new step count as a float 0-d array.
    Written as whole-list operations (one fused kernel each on torch): the
    update is memory-bound, about ten passes over the parameters.
    """
    b1, b2 = betas
    m = tree_lerp(m, g, 1 - b1)
    v = tree_addcmul(tree_scale(v, b2), g, g, 1 - b2)
    root_c2 = array_namespace(t).sqrt(correction(b2, t))
    denominator = tree_shift(tree_scale(tree_sqrt(v), 1 / root_c2), eps)  # sqrt(vhat) + eps
    return tree_scale(tree_div(m, denominator), 1 / correction(b1, t)), m, v
