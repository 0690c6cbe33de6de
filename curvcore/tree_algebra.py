"""Elementwise algebra over flat lists of arrays (vectors over params), array API only.

Methods work on flat lists of arrays (:mod:`curvcore.tree`); these helpers
treat such a list as one vector: sums, scalings, inner products and norms.
They never mutate their inputs: every helper returns a new list (or a 0-d
array).

A backend may register fused versions for its array type
(:func:`register_fused`): PyTorch does a whole list in one ``torch._foreach_*``
call instead of one small operation per array. They compute the same
quantities (to rounding: a fused multiply-add, a norm of norms).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ._namespace import array_namespace
from ._reduce import vdot

Array = Any

__all__ = ["FusedTreeOps", "register_fused", "tree_add", "tree_axpy", "tree_dot", "tree_map", "tree_norm",
           "tree_scale", "tree_size", "tree_sub", "tree_zeros_like"]


class FusedTreeOps:
    """Fused list operations of one array library; every entry is optional (None: the generic form).

    Attributes:
        add: ``(a, b) -> a + b``.
        sub: ``(a, b) -> a - b``.
        scale: ``(a, s) -> s a`` for a Python number ``s``.
        axpy: ``(alpha, x, y) -> alpha x + y`` for a Python number ``alpha``.
        norm: ``a -> ||a||`` (0-d).
    """

    def __init__(self, add: Callable | None = None, sub: Callable | None = None, scale: Callable | None = None,
                 axpy: Callable | None = None, norm: Callable | None = None):
        self.add, self.sub, self.scale, self.axpy, self.norm = add, sub, scale, axpy, norm


_FUSED: dict[type, FusedTreeOps] = {}
_NONE = FusedTreeOps()


def register_fused(array_type: type, ops: FusedTreeOps) -> None:
    """Use ``ops`` for lists whose first array is exactly of ``array_type`` (e.g. ``torch.Tensor``)."""
    _FUSED[array_type] = ops


def _fused(a: Sequence[Array]) -> FusedTreeOps:
    return _FUSED.get(type(a[0]), _NONE) if len(a) else _NONE


def _number(s: Any) -> bool:
    return isinstance(s, (int, float)) and not isinstance(s, bool)



def tree_map(fn: Callable[..., Array], *trees: Sequence[Array]) -> list[Array]:
    """Apply ``fn`` leaf by leaf to lists of the same structure."""
    first = trees[0]
    for t in trees[1:]:
        if len(t) != len(first):
            raise ValueError(f"Structure mismatch: lists of length {len(first)} and {len(t)}.")
    return [fn(*leaves) for leaves in zip(*trees)]


def tree_add(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a + b``."""
    fused = _fused(a).add
    if fused is not None and len(a) == len(b):
        return fused(a, b)
    return tree_map(lambda u, v: u + v, a, b)


def tree_sub(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a - b``."""
    fused = _fused(a).sub
    if fused is not None and len(a) == len(b):
        return fused(a, b)
    return tree_map(lambda u, v: u - v, a, b)


def tree_scale(a: Sequence[Array], s: Any) -> list[Array]:
    """``s * a`` for a scalar (Python or 0-d array) ``s``."""
    fused = _fused(a).scale
    if fused is not None and _number(s):
        return fused(a, s)
    return [s * u for u in a]


def tree_axpy(alpha: Any, x: Sequence[Array], y: Sequence[Array]) -> list[Array]:
    """``alpha * x + y``."""
    fused = _fused(x).axpy
    if fused is not None and _number(alpha) and len(x) == len(y):
        return fused(alpha, x, y)
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
    fused = _fused(a).norm
    if fused is not None:
        return fused(a)
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
