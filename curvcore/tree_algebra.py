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

__all__ = ["FusedTreeOps", "register_fused", "tree_add", "tree_addcmul", "tree_axpy", "tree_div", "tree_dot",
           "tree_lerp", "tree_map", "tree_norm", "tree_scale", "tree_shift", "tree_size", "tree_sqrt",
           "tree_sub", "tree_zeros_like"]


class FusedTreeOps:
    """Fused list operations of one array library; every entry is optional (None: the generic form).

    A scalar ``s`` below is a Python number or a 0-d array of the library.

    Attributes:
        add: ``(a, b) -> a + b``.
        sub: ``(a, b) -> a - b``.
        div: ``(a, b) -> a / b``.
        scale: ``(a, s) -> s a``.
        shift: ``(a, s) -> a + s``.
        sqrt: ``a -> sqrt(a)``.
        axpy: ``(alpha, x, y) -> alpha x + y`` for a Python number ``alpha``.
        lerp: ``(a, b, w) -> a + w (b - a)`` for a Python number ``w``.
        addcmul: ``(a, b, c, w) -> a + w b c`` for a Python number ``w``.
        norm: ``a -> ||a||`` (0-d).
    """

    def __init__(self, **ops: Callable):
        for name in self.NAMES:
            setattr(self, name, ops.pop(name, None))
        if ops:
            raise TypeError(f"unknown fused operations: {', '.join(sorted(ops))}")

    NAMES = ("add", "sub", "div", "scale", "shift", "sqrt", "axpy", "lerp", "addcmul", "norm")


_FUSED: dict[type, FusedTreeOps] = {}
_NONE = FusedTreeOps()


def register_fused(array_type: type, ops: FusedTreeOps) -> None:
    """Use ``ops`` for lists whose first array is exactly of ``array_type`` (e.g. ``torch.Tensor``)."""
    _FUSED[array_type] = ops


def _fused(a: Sequence[Array]) -> FusedTreeOps:
    return _FUSED.get(type(a[0]), _NONE) if len(a) else _NONE


def _number(s: Any) -> bool:
    return isinstance(s, (int, float)) and not isinstance(s, bool)


def _scalar(s: Any, like: Sequence[Array]) -> bool:
    """A Python number or a 0-d array of the list's own type."""
    return _number(s) or (type(s) is type(like[0]) and s.ndim == 0)


def _same(a: Sequence[Array], *others: Sequence[Array]) -> bool:
    return all(len(o) == len(a) for o in others)



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
    if fused is not None and _same(a, b):
        return fused(a, b)
    return tree_map(lambda u, v: u + v, a, b)


def tree_sub(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a - b``."""
    fused = _fused(a).sub
    if fused is not None and _same(a, b):
        return fused(a, b)
    return tree_map(lambda u, v: u - v, a, b)


def tree_scale(a: Sequence[Array], s: Any) -> list[Array]:
    """``s * a`` for a scalar (Python or 0-d array) ``s``."""
    fused = _fused(a).scale
    if fused is not None and _scalar(s, a):
        return fused(a, s)
    return [s * u for u in a]


def tree_axpy(alpha: Any, x: Sequence[Array], y: Sequence[Array]) -> list[Array]:
    """``alpha * x + y``."""
    fused = _fused(x).axpy
    if fused is not None and _number(alpha) and _same(x, y):
        return fused(alpha, x, y)
    return tree_map(lambda u, v: alpha * u + v, x, y)


def tree_div(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a / b`` elementwise."""
    fused = _fused(a).div
    return fused(a, b) if fused is not None and _same(a, b) else tree_map(lambda u, v: u / v, a, b)


def tree_shift(a: Sequence[Array], s: Any) -> list[Array]:
    """``a + s`` for a scalar (Python or 0-d array) ``s``."""
    fused = _fused(a).shift
    return fused(a, s) if fused is not None and _scalar(s, a) else [u + s for u in a]


def tree_sqrt(a: Sequence[Array]) -> list[Array]:
    """``sqrt(a)`` elementwise."""
    fused = _fused(a).sqrt
    return fused(a) if fused is not None else [array_namespace(u).sqrt(u) for u in a]


def tree_lerp(a: Sequence[Array], b: Sequence[Array], w: float) -> list[Array]:
    """``a + w (b - a)``: an exponential moving average ``(1 - w) a + w b`` for ``w = 1 - β``."""
    fused = _fused(a).lerp
    if fused is not None and _number(w) and _same(a, b):
        return fused(a, b, w)
    return tree_map(lambda u, v: u + w * (v - u), a, b)


def tree_addcmul(a: Sequence[Array], b: Sequence[Array], c: Sequence[Array], w: float) -> list[Array]:
    """``a + w b c`` elementwise."""
    fused = _fused(a).addcmul
    if fused is not None and _number(w) and _same(a, b, c):
        return fused(a, b, c, w)
    return tree_map(lambda u, v, z: u + w * (v * z), a, b, c)


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
