"""Elementwise activations and their first three derivatives, array-API code.

Each entry maps ``z`` to ``(act(z), act'(z), act''(z), act'''(z))`` lazily via
``derivatives(name, z, order)``; the MLP backend needs order 1 for JVP/VJP and
layer records and order 3 for Taylor-mode jets.
"""

from __future__ import annotations

from typing import Any

from curvcore._namespace import array_namespace

Array = Any

LEAKY_SLOPE = 0.01
NAMES = ("tanh", "sigmoid", "relu", "leaky_relu", "softplus", "identity")


def check_activation(name: str) -> str:
    """Return ``name`` if it is a known activation, else raise ``ValueError``."""
    if name not in NAMES:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(NAMES)}")
    return name


def _sigmoid(xp: Any, z: Array) -> Array:
    # stable for large |z|: exp of a non-positive number only
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


def derivatives(name: str, z: Array, order: int) -> list[Array]:
    """``[act(z), act'(z), ..., act^(order)(z)]`` for ``order`` in 0..3 (only those are computed)."""
    xp = array_namespace(z)
    if name == "tanh":
        t = xp.tanh(z)
        return _chain([t], order, lambda: 1 - t * t, lambda d1: -2 * t * d1, lambda d1: d1 * (6 * t * t - 2))
    if name in ("sigmoid", "softplus"):
        s = _sigmoid(xp, z)
        ds = [lambda: s * (1 - s), lambda d1: d1 * (1 - 2 * s), lambda d1: d1 * (1 - 6 * s + 6 * s * s)]
        if name == "sigmoid":
            return _chain([s], order, *ds)
        # softplus = log(1 + e^z), stable form; its derivatives are the sigmoid's
        sp = xp.where(z > 0, z, xp.zeros_like(z)) + xp.log(1 + xp.exp(-xp.abs(z)))
        return [sp, *_chain([s], order - 1, *ds)] if order else [sp]
    if name in ("relu", "leaky_relu", "identity"):
        return _piecewise_linear(xp, name, z, order)
    check_activation(name)
    raise AssertionError("unreachable")  # pragma: no cover


def _chain(out: list[Array], order: int, first: Any, *higher: Any) -> list[Array]:
    """``out`` extended to ``order`` derivatives: ``first()``, then each of ``higher`` applied to the first."""
    if order >= 1:
        d1 = first()
        out.append(d1)
        out += [h(d1) for h in higher[: order - 1]]
    return out


def _piecewise_linear(xp: Any, name: str, z: Array, order: int) -> list[Array]:
    """``[act, act', 0, 0][:order + 1]`` of relu, leaky_relu or identity."""
    if name == "identity" and not order:
        return [z]
    one, zero = xp.ones_like(z), xp.zeros_like(z)
    if name == "relu":
        pos = z > 0
        out = [xp.where(pos, z, zero), xp.where(pos, one, zero)]
    elif name == "leaky_relu":
        pos = z > 0
        out = [xp.where(pos, z, LEAKY_SLOPE * z), xp.where(pos, one, LEAKY_SLOPE * one)]
    else:
        out = [z, one]
    return (out + [zero, zero])[: order + 1]
