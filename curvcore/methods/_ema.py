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
from ..tree import tree_map


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
    """
    b1, b2 = betas
    m = tree_map(lambda mi, gi: ema(mi, gi, b1), m, g)
    v = tree_map(lambda vi, gi: ema(vi, gi * gi, b2), v, g)
    xp = array_namespace(*g)
    c1, c2 = correction(b1, t), correction(b2, t)
    u = tree_map(lambda mi, vi: (mi / c1) / (xp.sqrt(vi / c2) + eps), m, v)
    return u, m, v
