"""flax.linen models as curvcore models, with no hand tagging (behind ``curvcore.backends.jax.from_flax``).

>>> model, params = cj.from_flax(module, variables)          # params = variables["params"]
>>> state = cc.KFAC().init(params, model)

The layer-wise methods find every ``nn.Dense`` and ``nn.Conv`` (2-d) call by
:func:`flax.linen.intercept_methods` while JAX traces; their kernels stay in
flax's layout (``LayerSpec.weight_axes``). BatchNorm statistics and dropout
keys are the model's :class:`~curvcore.backends._jax_models.ModelState`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import flax
import flax.linen as nn
import jax
from flax.linen.linear import canonicalize_padding

from curvcore.layers import LayerSpec

from ._jax_models import Conv, LayerModel, Memo, ModelState, Tape, signature
from .jax import AdapterError

Array = Any

__all__ = ["FlaxModel", "build"]


def build(module: nn.Module, variables: dict, rngs: Any = None, mutable: Sequence[str] | None = None,
          apply_kwargs: dict | None = None, validate: bool = True, jit: bool = True) -> tuple[FlaxModel, Any]:
    """:func:`curvcore.backends.jax.from_flax` (documented there)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_flax needs a flax.linen.Module, got {type(module).__name__} (flax.nnx modules are "
                        "not supported yet)")
    if not hasattr(variables, "keys") or "params" not in variables:
        raise TypeError(f"variables must be the dict of module.init with a 'params' collection, got "
                        f"{type(variables).__name__} {list(variables) if hasattr(variables, 'keys') else ''}")
    model = FlaxModel(module, variables, rngs, mutable, apply_kwargs, validate, jit)
    return model, variables["params"]


class FlaxModel(LayerModel):
    """A flax.linen module as a curvcore model over its ``params`` dict (built by ``from_flax``).

    Every pass of a step applies the module with the model's collections and
    keys (:attr:`state`); the first pass's updated collections come back in
    ``info["buffers"]``. See :mod:`curvcore.backends._jax_models` for
    ``bind``, ``next_state`` and ``advance``.
    """

    def __init__(self, module: nn.Module, variables: dict, rngs: Any = None, mutable: Sequence[str] | None = None,
                 apply_kwargs: dict | None = None, validate: bool = True, jit: bool = True):
        collections = {k: v for k, v in variables.items() if k != "params"}
        mutable = tuple(collections) if mutable is None else tuple(mutable)
        self.module, self.mutable, self.apply_kwargs = module, mutable, dict(apply_kwargs or {})
        run = functools.partial(_apply, module, mutable, self.apply_kwargs)
        updates = (lambda p, xs: run(p, xs)[1]) if mutable else None
        super().__init__(lambda p, xs: run(p, xs)[0], updates, ModelState(collections, _rngs(rngs)), validate, jit)
        self._run = run
        paths = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        self.names = ["/".join(_key_name(k) for k in path) for path, _ in paths]
        self._specs = Memo()

    def __repr__(self) -> str:
        return f"FlaxModel({type(self.module).__name__}, mutable={list(self.mutable)})"

    def variables(self, params: Any) -> dict:
        """``{"params": params, **collections}`` for ``module.apply`` (evaluation, checkpoints)."""
        return {"params": params, **self.state.collections}

    def layer_specs(self, params: Any) -> list[LayerSpec]:
        """Every ``kernel`` of a 2-d (dense) or 4-d (conv) shape in ``params``, with its sibling ``bias``.

        Read from the params tree, so it works without a batch (at ``init``);
        a pass records only those that it calls as ``nn.Dense``/``nn.Conv``.
        Weight axes: ``(1, 0)`` for a dense kernel ``(in, out)``, ``(3, 2, 0, 1)``
        for a conv kernel ``(kh, kw, C_in, C_out)`` (the patches' feature order).
        """
        return self._specs.get(signature(params), lambda: _specs(params))

    def tapped(self, params: Any, xs: Any, tape: Tape) -> Array:
        """The module applied with every ``nn.Dense``/``nn.Conv`` call routed through ``tape``."""
        with nn.intercept_methods(functools.partial(_intercept, tape)):
            return self._run(params, xs)[0]


def _rngs(rngs: Any) -> dict:
    if rngs is None:
        return {}
    return dict(rngs) if isinstance(rngs, dict) else {"dropout": rngs}


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _specs(params: Any) -> list[LayerSpec]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    index = {tuple(_key_name(k) for k in path): i for i, (path, _) in enumerate(flat)}
    specs = []
    for path, i in index.items():
        W = flat[i][1]
        kind = {2: "dense", 4: "conv2d"}.get(W.ndim) if path[-1] == "kernel" else None
        if kind is None:
            continue
        b = index.get(path[:-1] + ("bias",))
        if b is not None and tuple(flat[b][1].shape) != (W.shape[-1],):
            b = None
        specs.append(LayerSpec(kind, i, b, (1, 0) if kind == "dense" else (3, 2, 0, 1), "/".join(path[:-1])))
    return specs


def _apply(module: nn.Module, mutable: tuple, kwargs: dict, params: Any, xs: Any) -> tuple[Array, dict]:
    """``(out, updated collections)`` of ``module.apply`` in the pass context; flax's errors named."""
    x, (collections, rngs) = xs
    with _named_errors(mutable):
        res = module.apply({"params": params, **collections}, x, rngs=rngs or None,
                           mutable=list(mutable) if mutable else False, **kwargs)
    out, updates = res if mutable else (res, {})
    if not isinstance(out, jax.Array):
        raise AdapterError(f"from_flax needs a module whose apply returns one array; {type(module).__name__} "
                        f"returned a {type(out).__name__}")
    return out, updates


@contextmanager
def _named_errors(mutable: tuple) -> Iterator[None]:
    """flax's errors about collections and random streams, as ``TypeError`` naming the ``from_flax`` argument."""
    try:
        yield
    except (flax.errors.ModifyScopeVariableError, flax.errors.ScopeCollectionNotFound) as err:
        raise AdapterError(f"mutable: the flax module needs a collection that from_flax was not given as mutable "
                        f"(mutable={list(mutable)}): {str(err).split(' (https')[0]}. Pass variables holding it "
                        "(from module.init) and mutable=[...] naming it") from None
    except flax.errors.InvalidRngError as err:
        raise AdapterError(f"rngs: the flax module draws random numbers: {str(err).split(' (https')[0]}. Pass "
                        "from_flax(..., rngs=jax.random.key(seed)) (or {stream: key})") from None


def _intercept(tape: Tape, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """The ``nn.intercept_methods`` interceptor: ``nn.Dense``/``nn.Conv`` calls go through ``tape``."""
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.Conv)):
        return next_fun(*args, **kwargs)
    z = next_fun(*args, **kwargs)
    a = args[0] if args else kwargs.get("inputs")
    if isinstance(mod, nn.Dense):
        return tape("/".join(mod.path), "dense", a, z)
    conv = _geometry(mod)
    return tape("/".join(mod.path), None if conv is None else "conv2d", a, z, conv)


def _pair(v: Any) -> tuple[int, int]:
    if v is None:
        return (1, 1)
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)


def _geometry(mod: nn.Conv) -> Conv | None:
    """The patches' geometry of an ``nn.Conv`` call, or ``None`` if it isn't a plain 2-d convolution."""
    kernel = _pair(mod.kernel_size)
    if len(kernel) != 2 or mod.feature_group_count != 1 or _pair(mod.input_dilation) != (1, 1) \
            or mod.mask is not None:
        return None
    padding = canonicalize_padding(mod.padding, 2)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return None  # CIRCULAR, REFLECT, CAUSAL
    else:
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return Conv(kernel, _pair(mod.strides), padding, _pair(mod.kernel_dilation), "NHWC")
