"""Elementwise algebra over flat lists of arrays (vectors over params), array API only.

Methods work on flat lists of arrays (:mod:`curvcore.tree`); these helpers
treat such a list as one vector: sums, scalings, inner products and norms.
They never mutate their inputs: every helper returns a new list (or a 0-d
array).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._namespace import array_namespace
from ._reduce import vdot

Array = Any

__all__ = ["tree_add", "tree_axpy", "tree_dot", "tree_map", "tree_norm", "tree_scale", "tree_size", "tree_sub",
           "tree_zeros_like"]



def tree_map(fn: Callable[..., Array], *trees: Sequence[Array]) -> list[Array]:
    """Apply ``fn`` leaf by leaf to lists of the same structure."""
    first = trees[0]
    for t in trees[1:]:
        if len(t) != len(first):
            raise ValueError(f"Structure mismatch: lists of length {len(first)} and {len(t)}.")
    return [fn(*leaves) for leaves in zip(*trees)]


def tree_add(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a + b``."""
    return tree_map(lambda u, v: u + v, a, b)


def tree_sub(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a - b``."""
    return tree_map(lambda u, v: u - v, a, b)


def tree_scale(a: Sequence[Array], s: Any) -> list[Array]:
    """``s * a`` for a scalar (Python or 0-d array) ``s``."""
    return [s * u for u in a]


def tree_axpy(alpha: Any, x: Sequence[Array], y: Sequence[Array]) -> list[Array]:
    """``alpha * x + y``."""
    return tree_map(lambda u, v: alpha * u + v, x, y)


def tree_zeros_like(a: Sequence[Array]) -> list[Array]:
    """Zeros of the same shapes, dtypes and devices."""
    return [array_namespace(u).zeros_like(u) for u in a]


def tree_dot(a: Sequence[Array], b: Sequence[Array]) -> Array:
    """``<a, b>``: the sum over the list of elementwise products (a 0-d array)."""
    terms = tree_map(vdot, a, b)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def tree_norm(a: Sequence[Array]) -> Array:
    """Euclidean norm over the whole list (a 0-d array)."""
    return array_namespace(a[0]).sqrt(tree_dot(a, a))


def tree_size(a: Sequence[Array]) -> int:
    """Total number of scalars in the list."""
    total = 0
    for u in a:
        n = 1
        for d in u.shape:
            n *= int(d)
        total += n
    return total
