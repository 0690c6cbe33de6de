"""Checkpoints: one backend-neutral ``.npz`` file with the method, its hyperparameters, params and state.

>>> import curvcore as cc, numpy as np, tempfile, os
>>> model, params = cc.backends.mlp("numpy", [4, 5, 3], seed=0)
>>> opt = cc.CurveBall()
>>> state = opt.init(params)
>>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
>>> cc.save(path, opt, params, state)
>>> opt2, params2, state2 = cc.load(path, like="numpy")      # or like=<target params>, like="torch"

The file holds every array as NumPy (float64 stays float64, counters stay
integers), the method's registered name and constructor hyperparameters, a
format version, and the structure of the params and the state. ``load``
rebuilds them on any backend: ``like`` is either the target params (any
pytree: the file's params are poured into its structure, on its library and
device) or a backend name (for params that are lists, tuples or dicts).
Continuing on the same backend is bit-identical to not having stopped.
Writing is atomic: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from . import tree
from .methods import REGISTRY

FORMAT = 1
__all__ = ["FORMAT", "load", "save"]


def _hyperparameters(method: Any) -> dict[str, Any]:
    """The method's public attributes, JSON-safe (tuples become lists)."""
    out = {}
    for k, v in vars(method).items():
        if k.startswith("_"):
            continue
        try:
            json.dumps(v)
        except TypeError:
            v = repr(v)
        out[k] = v
    return out


def _structure(t: Any) -> Any:
    """A JSON description of nested dicts/lists/tuples/NamedTuples with array leaves (``"#"``)."""
    if isinstance(t, dict):  # sorted keys: the order of tree.flatten's leaves
        return {"dict": {str(k): _structure(t[k]) for k in sorted(t)}}
    if isinstance(t, tuple) and hasattr(t, "_fields"):
        return {"namedtuple": {f: _structure(v) for f, v in zip(t._fields, t)}}
    if isinstance(t, (list, tuple)):
        return {type(t).__name__: [_structure(v) for v in t]}
    return "#"


def _plain(t: Any) -> bool:
    """Whether a tree is made of plain dicts, lists and tuples only (rebuildable without a template)."""
    if type(t) is dict:
        return all(_plain(v) for v in t.values())
    if type(t) in (list, tuple):
        return all(_plain(v) for v in t)
    return hasattr(t, "shape")


def _rebuild(desc: Any, leaves: list, state_type: type | None = None) -> Any:
    """The inverse of :func:`_structure` (leaves consumed in order)."""
    if desc == "#":
        return leaves.pop(0)
    (kind, body), = desc.items()
    if kind == "dict":
        return {k: _rebuild(v, leaves) for k, v in body.items()}
    if kind == "namedtuple":
        values = {f: _rebuild(v, leaves) for f, v in body.items()}
        return state_type(**values) if state_type is not None else values
    items = [_rebuild(v, leaves) for v in body]
    return items if kind == "list" else tuple(items)


def _state_parts(method: Any, state: Any) -> tuple[Any, list]:
    """``(structure, leaves)`` of a state; per-parameter fields are flattened like params."""
    fields = getattr(method, "param_fields", ())
    flat = state
    if fields and isinstance(state, tuple) and hasattr(state, "_fields"):
        flat = state._replace(**{f: tree.flatten(getattr(state, f), what=f"state.{f}")[0]
                                 for f in fields if not (isinstance(getattr(state, f), list) and not getattr(state, f))})
    return _structure(flat), tree.leaves_of(flat)


def save(path: str | os.PathLike, method: Any, params: Any, state: Any, **extra: Any) -> None:
    """Write ``method`` (name and hyperparameters), ``params`` and ``state`` to ``path`` (``.npz``), atomically.

    Args:
        path: the file to write (a ``.npz`` suffix is conventional).
        method: the method instance (its class must be registered).
        params: the parameters (any pytree of arrays of any backend).
        state: the method's state.
        **extra: JSON-able metadata to keep (epoch, learning rate, ...); ``load`` ignores it,
            :func:`read_metadata` returns it.

    Raises:
        ValueError: the method is not registered.
    """
    from .backends import to_numpy

    name = next((n for n, spec in REGISTRY.items() if spec.cls is type(method)), None)
    if name is None:
        raise ValueError(f"{type(method).__name__} is not a registered method; register it to checkpoint it")
    p_leaves, _ = tree.flatten(params)
    s_desc, s_leaves = _state_parts(method, state)
    meta = {"format": FORMAT, "method": name, "class": type(method).__name__,
            "hyperparameters": _hyperparameters(method), "n_params": len(p_leaves),
            "params_structure": _structure(params) if _plain(params) else None,
            "params_shapes": [list(map(int, p.shape)) for p in p_leaves],
            "state_structure": s_desc, "extra": extra}
    arrays = {f"p{i}": to_numpy(a) for i, a in enumerate(p_leaves)}
    arrays.update({f"s{i}": to_numpy(a) if hasattr(a, "shape") else np.asarray(a) for i, a in enumerate(s_leaves)})
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".curvcore-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, __meta__=np.asarray(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint (method, hyperparameters, format, shapes, ``extra``)."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["__meta__"]))


def load(path: str | os.PathLike, method: Any = None, like: Any = "numpy") -> tuple[Any, Any, Any]:
    """Read a checkpoint written by :func:`save`: ``(method, params, state)``.

    Args:
        path: the file.
        method: the method to continue with; ``None`` rebuilds it from the
            file (its registered class and hyperparameters). A method of
            another class is refused.
        like: the target params (any pytree of the target backend: the
            file's params take its structure, library and device), or a
            backend name (``"numpy"``, ``"torch"``, ``"jax"``, ...) for params
            saved as lists/tuples/dicts.

    Raises:
        ValueError: a newer format version, another method, params of
            another network shape, or ``like`` a backend name for params
            saved from a custom pytree.
    """
    from .backends import asarray, backend_of

    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        if meta.get("format", 0) > FORMAT:
            raise ValueError(f"{path} has checkpoint format {meta['format']}, newer than this curvcore's ({FORMAT}); "
                             "upgrade curvcore to read it")
        p_np = [data[f"p{i}"] for i in range(meta["n_params"])]
        s_np = [data[k] for k in sorted((k for k in data.files if k.startswith("s")), key=lambda k: int(k[1:]))]
    spec = REGISTRY.get(meta["method"])
    if method is None:
        if spec is None:
            raise ValueError(f"{path} holds a {meta['class']!r} state, which is not registered here")
        method = spec.cls(**meta["hyperparameters"])
    elif type(method).__name__ != meta["class"]:
        raise ValueError(f"{path} holds a {meta['class']} checkpoint; it can't continue a {type(method).__name__}")
    if isinstance(like, str):
        backend = like
        if meta["params_structure"] is None:
            raise ValueError(f"{path} holds params of a custom pytree; pass like=<the target params> to rebuild them")
        params = _rebuild(meta["params_structure"], [asarray(backend, a) for a in p_np])
        template_leaves = tree.flatten(params)[0]
    else:
        template_leaves, treedef = tree.flatten(like, what="like")
        shapes = [list(map(int, p.shape)) for p in template_leaves]
        if shapes != meta["params_shapes"]:
            raise ValueError(f"{path} holds params of shapes {meta['params_shapes']}, but like= has {shapes}: "
                             "another network")
        backend = backend_of(template_leaves[0])
        params = tree.unflatten(treedef, [_like(asarray(backend, a), t) for a, t in zip(p_np, template_leaves)])
    device = getattr(template_leaves[0], "device", None) if not isinstance(like, str) else None
    state_leaves = [asarray(backend, a, device=device) for a in s_np]
    state = _rebuild(meta["state_structure"], state_leaves, getattr(method, "state_type", None))
    _, p_def = tree.flatten(params)
    state = _unflatten_state(method, state, p_def)
    return method, params, state


def _like(a: Any, template: Any) -> Any:
    """``a`` on the device of ``template`` (torch tensors; other libraries keep their default)."""
    to = getattr(a, "to", None)
    return to(template.device) if to is not None and hasattr(template, "device") else a


def _unflatten_state(method: Any, state: Any, treedef: tree.TreeDef) -> Any:
    fields = getattr(method, "param_fields", ())
    if not fields or treedef.kind == "list" or not hasattr(state, "_replace"):
        return state
    return state._replace(**{f: tree.unflatten(treedef, getattr(state, f)) for f in fields if len(getattr(state, f))})
