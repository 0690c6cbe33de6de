"""Every reduction over the batch or over parameters, in one place.

Methods call these instead of ``xp.sum``/``xp.mean`` over the batch axis, so
that data-parallel training can later swap this module's functions for
all-reduces (``torch.distributed``, JAX sharding) without touching a method.
"""

from __future__ import annotations

from typing import Any

from ._namespace import array_namespace

Array = Any


def batch_sum(a: Array) -> Array:
    """Sum over the batch axis 0: ``(B, ...) -> (...)``."""
    return array_namespace(a).sum(a, axis=0)


def batch_mean(a: Array) -> Array:
    """Mean over the batch axis 0: ``(B, ...) -> (...)``."""
    return array_namespace(a).mean(a, axis=0)


def batch_sum_all(a: Array) -> Array:
    """Sum of every entry of a batch-major array (0-d): a loss summed over samples and positions."""
    return array_namespace(a).sum(a)


def global_count(n: Any) -> Any:
    """A count over the local batch (an int or a 0-d array) as a count over the whole batch."""
    return n


def batch_size(a: Array) -> int:
    """The (global) batch size of a batch-major array."""
    return int(a.shape[0])


def batch_gram(u: Array, v: Array) -> Array:
    """``u^T v`` summed over the batch: ``(B, m), (B, n) -> (m, n)``."""
    xp = array_namespace(u, v)
    return xp.matmul(xp.matrix_transpose(u), v)


def vdot(a: Array, b: Array) -> Array:
    """Sum of the elementwise product of two arrays of equal shape (0-d)."""
    xp = array_namespace(a, b)
    return xp.sum(a * b)


def batch_vdot(a: Array, b: Array) -> Array:
    """Output-space dot product summed over the batch (0-d), e.g. ``<Jz, H Jz>``."""
    return vdot(a, b)
