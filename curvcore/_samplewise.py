"""Per-sample (row-wise) norms and ratios of ``(B, n)`` arrays, shared by the losses' granular terms and ESN/MK.

Array-API code; the reductions are over the feature axis 1 only (no batch
reduction, so nothing here goes through :mod:`curvcore._reduce`).
"""

from __future__ import annotations

from typing import Any

from ._namespace import array_namespace

Array = Any


def sq_norm(u: Array) -> Array:
    """Per-sample squared norm over features: (B, n) -> (B,) (``vecdot``: one read, no ``u * u`` temporary)."""
    return array_namespace(u).vecdot(u, u, axis=-1)


def norm(u: Array) -> Array:
    """Per-sample Euclidean norm over features, (B, n) -> (B,), scale-safe: ``t ||u/t||`` with
    ``t = max|u_i|``, finite whenever the entries are (``sqrt(sq_norm(u))`` overflows above ~1.3e154)."""
    xp = array_namespace(u)
    t = xp.max(xp.abs(u), axis=1)
    return t * xp.sqrt(sq_norm(u / xp.where(t > 0, t, xp.ones_like(t))[:, None]))


def per_gamma(x: Array, n: Array) -> Array:
    """``x / n²`` as ``(x/n)/n`` (no square of ``n`` is formed); 0 where ``n = 0``."""
    xp = array_namespace(x, n)
    pos = n > 0
    safe = xp.where(pos, n, xp.ones_like(n))
    return xp.where(pos, (x / safe) / safe, xp.zeros_like(x))
