"""Equinox models as curvcore models, with no hand tagging (behind ``curvcore.backends.jax.from_equinox``).

>>> model, params = cj.from_equinox(eqx.nn.MLP(64, 10, 32, 2, key=jax.random.key(0)))
>>> state = cc.KFAC().init(params, model)

An equinox module acts on one sample; the adapter maps it over the batch axis
with :func:`jax.vmap`. ``params`` are the module's floating-point array leaves
(``eqx.partition(module, eqx.is_inexact_array)``); everything else is static.
The layer-wise methods find every ``eqx.nn.Linear`` and ``eqx.nn.Conv2d`` by
walking the module, and record them by swapping in wrappers while JAX traces.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import equinox as eqx
import jax

from curvcore.layers import LayerSpec

from ._jax_models import Conv, LayerModel, ModelState, Tape, Memo, signature

Array = Any

__all__ = ["EquinoxModel", "build"]

_STATEFUL = (eqx.nn.BatchNorm, eqx.nn.SpectralNorm)


def build(module: eqx.Module, validate: bool = True, jit: bool = True) -> tuple[EquinoxModel, Any]:
    """:func:`curvcore.backends.jax.from_equinox` (documented there)."""
    if not isinstance(module, eqx.Module):
        raise TypeError(f"from_equinox needs an equinox.Module, got {type(module).__name__}")
    for path, layer in _walk(module, lambda m: isinstance(m, (*_STATEFUL, eqx.nn.Dropout))):
        if isinstance(layer, _STATEFUL) or not layer.inference:
            raise NotImplementedError(
                f"from_equinox: {type(layer).__name__} at {jax.tree_util.keystr(path) or 'the root'} needs "
                "equinox state or a random key per call, which the adapter does not pass yet; use "
                "eqx.nn.inference_mode(module) for dropout, or a flax model (from_flax) for BatchNorm and dropout")
    params, static = eqx.partition(module, eqx.is_inexact_array)
    return EquinoxModel(params, static, validate, jit), params


class EquinoxModel(LayerModel):
    """An equinox module as a curvcore model over its array leaves (built by ``from_equinox``)."""

    per_sample = True

    def __init__(self, params: Any, static: Any, validate: bool = True, jit: bool = True):
        self.static = static
        super().__init__(lambda p, xs: jax.vmap(eqx.combine(p, static))(xs[0]), None, ModelState({}, {}),
                         validate, jit)
        self.names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        self._specs = Memo()

    def __repr__(self) -> str:
        return f"EquinoxModel({type(self.static).__name__})"

    def module(self, params: Any) -> eqx.Module:
        """The equinox module holding ``params`` (``eqx.combine``)."""
        return eqx.combine(params, self.static)

    def layer_specs(self, params: Any) -> list[LayerSpec]:
        """Every ``eqx.nn.Linear`` and ``eqx.nn.Conv2d`` (groups 1, zero padding) in the module, in tree order."""
        return self._specs.get(signature(params), lambda: _specs(eqx.combine(params, self.static), params))

    def tapped(self, params: Any, xs: Any, tape: Tape) -> Array:
        """The module over the batch with every Linear/Conv2d call routed through a per-sample tape."""
        module = jax.tree_util.tree_map_with_path(
            lambda path, m: _Tapped(m, jax.tree_util.keystr(path)) if _recordable(m) else m,
            self.module(params), is_leaf=_recordable)
        numbers = None if tape.perturb is None else list(tape.perturb)

        def one(x: Array, e: list) -> tuple[Array, list]:
            inner = Tape(tape.index, None if numbers is None else dict(zip(numbers, e)))
            with _recording(inner):
                out = module(x)
            tape.calls = inner.calls
            return out, inner.seen

        out, tape.seen = jax.vmap(one)(xs[0], [] if numbers is None else [tape.perturb[n] for n in numbers])
        return out


def _walk(module: Any, is_leaf: Any) -> list[tuple[Any, Any]]:
    """``(path, node)`` of every node of the module where ``is_leaf``."""
    return [(p, m) for p, m in jax.tree_util.tree_flatten_with_path(module, is_leaf=is_leaf)[0] if is_leaf(m)]


def _recordable(m: Any) -> bool:
    if isinstance(m, eqx.nn.Linear):
        return m.weight.ndim == 2
    return isinstance(m, eqx.nn.Conv2d) and m.groups == 1 and m.padding_mode == "ZEROS"


def _specs(module: eqx.Module, params: Any) -> list[LayerSpec]:
    index = {jax.tree_util.keystr(p): i for i, (p, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
    specs = []
    for path, layer in _walk(module, _recordable):
        name = jax.tree_util.keystr(path)
        weight = index.get(f"{name}.weight")
        if weight is None:  # a frozen layer (its weight is not a params leaf)
            continue
        bias = index.get(f"{name}.bias") if layer.use_bias else None
        kind = "dense" if isinstance(layer, eqx.nn.Linear) else "conv2d"
        specs.append(LayerSpec(kind, weight, bias, (0, 1) if kind == "dense" else (0, 1, 2, 3), name))
    return specs


_ACTIVE = threading.local()


@contextmanager
def _recording(tape: Tape) -> Iterator[None]:
    """Make ``tape`` the one the wrapped layers of this thread report to."""
    outer = getattr(_ACTIVE, "tape", None)
    _ACTIVE.tape = tape
    try:
        yield
    finally:
        _ACTIVE.tape = outer


class _Tapped(eqx.Module):
    """A Linear or Conv2d whose calls go through the active tape."""

    layer: eqx.Module
    name: str = eqx.field(static=True)

    def __call__(self, x: Array, *, key: Any = None) -> Array:
        z = self.layer(x, key=key)
        tape = getattr(_ACTIVE, "tape", None)
        if tape is None:
            return z
        if isinstance(self.layer, eqx.nn.Linear):
            return tape(self.name, "dense", x, z)
        layer = self.layer
        padding = layer.padding if isinstance(layer.padding, str) else tuple(tuple(p) for p in layer.padding)
        conv = Conv(tuple(layer.weight.shape[2:]), tuple(layer.stride), padding, tuple(layer.dilation), "NCHW")
        return tape(self.name, "conv2d", x, z, conv)
