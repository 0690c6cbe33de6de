"""Parameter trees: any pytree of arrays in, flat lists inside the methods, the same pytree out.

Methods work on flat lists of arrays. :func:`flatten` turns the user's params
(a list, a dict, a flax ``params`` dict, the array leaves of an equinox
module, ...) into ``(leaves, treedef)``; :func:`unflatten` rebuilds the same
structure. A plain list stays a list. Nested ``dict``/``list``/``tuple``
containers are handled here (dict keys sorted, as ``jax.tree_util`` does);
backends register flatteners for their own containers with :func:`register`
(the JAX backend registers ``jax.tree_util``), so the core imports no
framework. The elementwise algebra over flat lists (``tree_add``,
``tree_dot``, ...) is :mod:`curvcore.tree_algebra` (its names are importable from here too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from array_api_compat import is_array_api_obj

Array = Any

__all__ = [
    "TreeDef", "flatten", "unflatten", "register", "leaves_of", "map_leaves",
    "tree_add", "tree_axpy", "tree_dot", "tree_map", "tree_norm", "tree_scale", "tree_size", "tree_sub",
    "tree_zeros_like",
]


class TreeDef(NamedTuple):
    """The structure of a flattened tree: how to rebuild it from its leaves.

    ``kind`` is ``"list"`` for a plain list, ``"builtin"`` for nested
    dicts/lists/tuples, or the name of a registered flattener; ``spec`` is what
    that flattener needs to rebuild (compared with ``==`` to check that two
    trees have the same structure).
    """

    kind: str
    spec: Any

    def describe(self) -> str:
        """A short human-readable structure for error messages."""
        return f"a list of {self.spec} arrays" if self.kind == "list" else repr(self.spec)[:200]


class _Flattener(NamedTuple):
    name: str
    applies: Callable[[Any], bool]
    flatten: Callable[[Any], tuple[list, Any]]
    unflatten: Callable[[Any, list], Any]


_FLATTENERS: list[_Flattener] = []


def register(name: str, applies: Callable[[Any], bool], flatten_fn: Callable[[Any], tuple[list, Any]],
             unflatten_fn: Callable[[Any, list], Any]) -> None:
    """Register a flattener for trees where ``applies(tree)`` (later registrations are tried first).

    ``flatten_fn(tree) -> (leaves, spec)`` and ``unflatten_fn(spec, leaves) -> tree``;
    ``spec`` must support ``==`` (structure equality). Re-registering a name replaces it.
    """
    _FLATTENERS[:] = [f for f in _FLATTENERS if f.name != name]
    _FLATTENERS.append(_Flattener(name, applies, flatten_fn, unflatten_fn))


def _builtin_flatten(tree: Any) -> tuple[list, Any]:
    if isinstance(tree, Mapping):
        keys = sorted(tree)
        parts = [_builtin_flatten(tree[k]) for k in keys]
        return [leaf for p in parts for leaf in p[0]], ("dict", tuple(keys), tuple(p[1] for p in parts))
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        parts = [_builtin_flatten(v) for v in tree]
        return [leaf for p in parts for leaf in p[0]], ("namedtuple", type(tree), tuple(p[1] for p in parts))
    if isinstance(tree, (list, tuple)):
        parts = [_builtin_flatten(v) for v in tree]
        return [leaf for p in parts for leaf in p[0]], (type(tree).__name__, len(tree), tuple(p[1] for p in parts))
    return [tree], "leaf"


def _builtin_unflatten(spec: Any, leaves: list) -> Any:
    it = iter(leaves)

    def build(s: Any) -> Any:
        if s == "leaf":
            return next(it)
        kind, meta, children = s
        values = [build(c) for c in children]
        if kind == "dict":
            return dict(zip(meta, values))
        if kind == "namedtuple":
            return meta(*values)
        return values if kind == "list" else tuple(values)

    return build(spec)


_ARRAY_TYPES: set[type] = set()


def _is_array(a: Any) -> bool:
    """``array_api_compat.is_array_api_obj``, cached by type (it is type-based)."""
    if type(a) in _ARRAY_TYPES:
        return True
    if is_array_api_obj(a):
        _ARRAY_TYPES.add(type(a))
        return True
    return False


def flatten(tree: Any, what: str = "params") -> tuple[list[Array], TreeDef]:
    """``(leaves, treedef)`` of a tree of arrays; every leaf must be an array.

    Raises:
        TypeError: a leaf is not an array (a string, ``None`` inside a list,
            a number), naming its position; or the tree has no arrays.
    """
    if isinstance(tree, list) and tree and all(_is_array(a) for a in tree):  # the common case, checked
        return list(tree), TreeDef("list", len(tree))
    for f in reversed(_FLATTENERS):
        if f.applies(tree):
            leaves, spec = f.flatten(tree)
            treedef = TreeDef(f.name, spec)
            break
    else:
        leaves, spec = _builtin_flatten(tree)
        treedef = TreeDef("builtin", spec)
    if not leaves:
        raise TypeError(f"{what} holds no arrays (got {type(tree).__name__}); pass a list or pytree of arrays")
    for i, leaf in enumerate(leaves):
        if not _is_array(leaf):
            raise TypeError(f"{what} leaf {i} is a {type(leaf).__name__} ({leaf!r:.60}), not an array; "
                            "every leaf of the params must be an array")
    return leaves, treedef


def unflatten(treedef: TreeDef, leaves: Sequence[Array]) -> Any:
    """Rebuild the tree of ``treedef`` from ``leaves`` (a plain list stays a list)."""
    if treedef.kind == "list":
        return list(leaves)
    if treedef.kind == "builtin":
        return _builtin_unflatten(treedef.spec, list(leaves))
    for f in _FLATTENERS:
        if f.name == treedef.kind:
            return f.unflatten(treedef.spec, list(leaves))
    raise TypeError(f"no flattener named {treedef.kind!r} is registered")  # pragma: no cover


_DETACHERS: list[tuple[Callable[[Any], bool], Callable[[Any], Any]]] = []


def register_detach(applies: Callable[[Any], bool], detach_fn: Callable[[Any], Any]) -> None:
    """Register ``detach_fn`` for arrays where ``applies(array)`` (torch: tensors that carry autograd history)."""
    _DETACHERS.append((applies, detach_fn))


def detached(leaves: Sequence[Array]) -> list[Array]:
    """The leaves without autograd history, so that a method's outputs never chain graphs across steps."""
    out = list(leaves)
    for applies, detach_fn in _DETACHERS:
        out = [detach_fn(a) if applies(a) else a for a in out]
    return out


def leaves_of(tree: Any) -> list[Any]:
    """Every non-container leaf of nested NamedTuples, dicts, lists and tuples (state, info)."""
    if isinstance(tree, Mapping):
        return [leaf for k in sorted(tree, key=str) for leaf in leaves_of(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in leaves_of(v)]
    return [tree]


def map_leaves(fn: Callable[..., Any], *trees: Any) -> Any:
    """``fn`` over the leaves of trees of the same nested NamedTuple/dict/list/tuple structure."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: map_leaves(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(map_leaves(fn, *parts) for parts in zip(*trees)))
    if isinstance(first, (list, tuple)):
        return type(first)(map_leaves(fn, *parts) for parts in zip(*trees))
    return fn(*trees)


# the elementwise algebra over flat lists lives in curvcore.tree_algebra; these names stay importable from here
from .tree_algebra import (  # noqa: E402,F401
    tree_add, tree_axpy, tree_dot, tree_map, tree_norm, tree_scale, tree_size, tree_sub, tree_zeros_like,
)
