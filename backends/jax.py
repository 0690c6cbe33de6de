"""JAX adapter: a pure apply function speaks the curvcore protocol, and whole steps jit.

>>> import jax, curvcore as cc
>>> from curvcore.backends import jax as cj
>>> jax.config.update("jax_enable_x64", True)          # for float64 (never done on import)
>>> model, params = cc.backends.mlp("jax", [4, 8, 3])   # JaxModel(cj.mlp_apply("tanh"), ...)
>>> opt, loss = cc.SGD(lr=0.1), cc.losses.CrossEntropy()
>>> step = cj.jit_step(opt, model, loss)                # jax.jit of the whole step
>>> state = opt.init(params)
>>> params, state, info = step(params, state, x, y)

``JaxModel(apply_fn)`` wraps any pure ``apply_fn(params, x)``; ``forward``,
``jvp`` (:func:`jax.jvp`), ``vjp`` (:func:`jax.vjp`) and ``jet`` (nested
``jax.jvp``) work for params of any pytree structure. ``layers`` needs
``apply_fn`` to take a keyword ``tap`` and route every dense layer through it
(see :meth:`JaxModel.layers`); the built-in MLP (:func:`mlp_apply`) does.
:func:`from_flax` and :func:`from_equinox` wrap flax.linen and equinox modules
with no tagging: their dense and convolution layers are found while JAX
traces, and flax BatchNorm statistics and dropout keys are the model's state,
which :func:`jit_step` threads through the compiled step.

Importing this module registers :func:`jax.lax.cond` and
:func:`jax.lax.while_loop` with :mod:`curvcore._control`, so the methods'
counter branches and early-exit loops trace under ``jax.jit``. It never changes ``jax_enable_x64``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvcore import tree as cc_tree
from curvcore._checks import check_params_and_x, in_step, value_checks_on
from curvcore._control import register_cond, register_while_loop
from curvcore._linalg import register_cho_solve
from curvcore.layers import check_cotangent_shape
from curvcore.methods import init_state
from curvcore.protocol import Cotangent, LayerRecord, jets_by_jet, linearize_by_composition, resolve_cotangent

from . import _jax_sharding as _sharding
from ._activations import LEAKY_SLOPE, check_activation
from ._adapter import parse_device
from ._mlp import ArrayAPIMLP

Array = Any

__all__ = [
    "JaxModel", "JitStep", "ModelState", "OptaxState", "as_optax", "build_mlp", "from_equinox", "from_flax",
    "from_numpy", "jit_step", "mlp_apply", "model_state", "namespace", "no_tap", "probe", "synchronize", "to_numpy",
]

register_cond(lambda p: isinstance(p, jax.core.Tracer), lambda pred, t, f, *ops: jax.lax.cond(pred, t, f, *ops))
register_while_loop(lambda p: isinstance(p, jax.core.Tracer), lambda c, b, v: jax.lax.while_loop(c, b, v))
register_cho_solve(lambda a: isinstance(a, (jax.Array, jax.core.Tracer)),
                   lambda A, B: jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(A, lower=True), B))


def _jax_tree(tree: Any) -> bool:
    """``jax.tree_util`` flattens trees that hold JAX arrays or JAX pytree nodes (flax dicts, equinox modules)."""
    return any(isinstance(a, (jax.Array, jax.core.Tracer)) for a in jax.tree_util.tree_leaves(tree)) or _custom_nodes(tree)


def _custom_nodes(tree: Any) -> bool:
    """Whether the tree has a node other than a plain dict, list or tuple."""
    if type(tree) is dict:
        return any(_custom_nodes(v) for v in tree.values())
    if type(tree) in (list, tuple):
        return any(_custom_nodes(v) for v in tree)
    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree))


cc_tree.register("jax", _jax_tree, jax.tree_util.tree_flatten, jax.tree_util.tree_unflatten)

_ACTIVATIONS: dict[str, Callable[[Array], Array] | None] = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    # jnp.where, not jnp.maximum/jax.nn: derivative at 0 is 0 (relu) and the slope (leaky), as everywhere
    "relu": lambda z: jnp.where(z > 0, z, jnp.zeros_like(z)),
    "leaky_relu": lambda z: jnp.where(z > 0, z, LEAKY_SLOPE * z),
    "softplus": jax.nn.softplus,
    "identity": None,
}


def no_tap(a: Array, z: Array, act: Callable[[Array], Array] | None = None) -> Array:
    """The default ``tap``: ``act(z)`` (``z`` for a linear layer)."""
    return z if act is None else act(z)


@functools.lru_cache(maxsize=None)
def mlp_apply(activation: str = "tanh") -> Callable[..., Array]:
    """The pure MLP function ``apply(params, x, tap=None)`` of :func:`build_mlp`.

    Layer k: ``z = a W^T + b``, ``a <- tap(a, z, act)``; the last layer is
    linear (``act=None``). The ``tap`` keyword is the :meth:`JaxModel.layers`
    contract; with ``tap=None`` it is a plain MLP.
    """
    act = _ACTIVATIONS[check_activation(activation)]

    def apply(params: Sequence[Array], x: Array, tap: Callable[..., Array] | None = None) -> Array:
        tap = no_tap if tap is None else tap
        n = len(params) // 2
        a = x
        for k in range(n):
            z = jnp.matmul(a, params[2 * k].T) + params[2 * k + 1]
            a = tap(a, z, act if k < n - 1 else None)
        return a

    apply.__name__ = f"mlp_{activation}"
    apply.mlp_activation = activation  # type: ignore[attr-defined]  # JaxModel.jets runs Taylor mode on it
    return apply


def _takes_tap(fn: Callable[..., Any]) -> bool:
    try:
        return "tap" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class JaxModel:
    """Wrap a pure ``apply_fn(params, x) -> out`` as a curvcore model.

    ``params`` may be any pytree (a list, a flax ``params`` dict, an equinox
    module's array leaves); every primitive takes and returns that
    structure. Each primitive is one compiled program per argument shape
    (kept in a bounded LRU cache, :data:`CACHE_SIZE` entries per primitive), so
    eager method steps do not dispatch op by op; inside :func:`jit_step` the
    primitives are inlined into the step.

    Args:
        apply_fn: pure function of the params and a batch. For :meth:`layers`
            (the layer-wise methods on an MLP), it must take params
            ``[W1, b1, W2, b2, ...]`` and a keyword ``tap``, and compute every
            dense layer as ``a_next = tap(a, z, act)`` with ``z = a W^T + b``
            (``act`` an elementwise function or ``None`` for linear); see
            :func:`mlp_apply`. Flax and equinox models need no tap: see
            ``from_flax`` and ``from_equinox``.
        n_layers: the number of dense layers (checked in :meth:`layers`);
            ``None``: ``len(params) // 2``.
        validate: check batches (library, dtype, NaN/Inf) when a primitive
            is called directly. Value checks are skipped inside ``jax.jit``.
        jit: compile the primitives (set False for an ``apply_fn`` that
            cannot be traced by ``jax.jit``).
        param_shapes: the shapes of the leaves of params, when known
            (:func:`build_mlp` sets them): every primitive, also inside a
            method step, then checks the params' count and shapes.

    Raises:
        ValueError (from the primitives): params that do not have
            ``param_shapes``; an exception raised by ``apply_fn`` (a wrong
            feature count, a params list that does not fit), re-raised as a
            ``ValueError`` naming the shape of ``x`` (the original as ``__cause__``).
    """

    xp = jnp

    def __init__(self, apply_fn: Callable[..., Array], n_layers: int | None = None, validate: bool = True,
                 jit: bool = True, param_shapes: Sequence[Sequence[int]] | None = None):
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
        self.apply_fn = apply_fn
        self.n_layers = n_layers
        self.param_shapes = None if param_shapes is None else [tuple(int(n) for n in s) for s in param_shapes]
        self.validate = validate
        self.takes_tap = _takes_tap(apply_fn)
        self._forward, self._jvp, self._jet, self._taps = _programs(apply_fn, jit)

    def __repr__(self) -> str:
        return f"JaxModel({getattr(self.apply_fn, '__name__', self.apply_fn)!r}, n_layers={self.n_layers})"

    def _check(self, params: Any, x: Array) -> None:
        leaves = jax.tree_util.tree_leaves(params)
        if self.param_shapes is not None:  # static shapes: checked inside a step and under jit too
            expected = self.param_shapes
            if len(leaves) != len(expected):
                raise ValueError(f"params must hold {len(expected)} arrays of shapes {expected} for this model, "
                                 f"got {len(leaves)}")
            for i, (p, s) in enumerate(zip(leaves, expected)):
                if tuple(p.shape) != s:
                    raise ValueError(f"Shape mismatch in params[{i}]: expected {s}, got {tuple(p.shape)}.")
        if not in_step():
            check_params_and_x(leaves, x, value_checks_on(self.validate))

    def cache_size(self) -> int:
        """Compiled programs held by this model's primitives (each an LRU of at most :data:`CACHE_SIZE`)."""
        progs = [self._forward, self._jvp, *self._jet.values(), *self._taps.values()]
        return sum(p.cache_size() for p in progs if callable(getattr(p, "cache_size", None)))

    # -- primitives ------------------------------------------------------------
    def forward(self, params: Any, x: Array) -> Array:
        """The output ``apply_fn(params, x)``."""
        self._check(params, x)
        return self._forward(params, x)

    def jvp(self, params: Any, x: Array, tangent: Any) -> tuple[Array, Array]:
        """``(f, J tangent)`` by :func:`jax.jvp`."""
        self._check(params, x)
        _check_like("tangent", tangent, params)
        return tuple(self._jvp(params, x, tangent))

    def vjp(self, params: Any, x: Array) -> tuple[Array, Callable[[Array], Any]]:
        """``(f, pullback)`` by :func:`jax.vjp` (of the compiled forward); ``pullback(u) = J^T u`` like params."""
        self._check(params, x)
        out, pull = jax.vjp(lambda p: self._forward(p, x), params)
        return out, _pullback(out, pull)

    def linearize(self, params: Any, x: Array) -> tuple[Array, Callable, Callable]:
        """``(f, jvp_fn, pullback)`` at one point (the optional protocol primitive).

        Inside a trace (``jax.jit``): :func:`jax.linearize` of the forward
        (one primal pass; ``jvp_fn`` evaluates only the linear tangent
        program) and :func:`jax.linear_transpose` of that program as the
        pullback, so the step holds one primal forward. Eagerly, the compiled
        ``jvp``/``vjp`` programs are measured faster than op-by-op evaluation
        of the linearized program (2.4 vs 4.5 ms on a [64, 64, 10] net), so it
        composes them instead.
        """
        self._check(params, x)
        if not any(isinstance(a, jax.core.Tracer) for a in (*jax.tree_util.tree_leaves(params), x)):
            return linearize_by_composition(self, params, x)
        out, lin = jax.linearize(lambda q: self._forward(q, x), params)
        transpose = jax.linear_transpose(lin, params)

        def jvp_fn(tangent: Any) -> Array:
            _check_like("tangent", tangent, params)
            return lin(tangent)

        return out, jvp_fn, _pullback(out, transpose)

    def jet(self, params: Any, x: Array, tangent: Any, order: int) -> list[Array]:
        """``[f, d1, ..., d_order]``, ``d_k = d^k/dt^k f(params + t tangent)`` at 0 (order <= 3).

        Nested :func:`jax.jvp` along the same tangent, compiled (XLA removes
        the duplicated work of the nesting).
        """
        if order not in (1, 2, 3):
            raise ValueError(f"jet order must be 1, 2 or 3, got {order!r}")
        self._check(params, x)
        _check_like("tangent", tangent, params)
        return list(self._jet[order](params, x, tangent))

    def jets(self, params: Any, x: Array) -> tuple[Array, Callable[[Any, int], list[Array]]]:
        """``(f, jet_fn)``, ``jet_fn(tangent, order) = [d1, ..., d_order]`` (the optional protocol primitive).

        Inside a trace (``jax.jit``) with the built-in MLP (:func:`mlp_apply`,
        params ``[W1, b1, ...]``): one forward pass, then Taylor mode over the
        cached activations (``ArrayAPIMLP.jets`` on ``jax.numpy`` arrays;
        ``None`` tangent entries skipped, a direction on layer k starts at
        layer k). Otherwise a forward and one compiled nested-JVP :meth:`jet`
        per call (``None`` entries filled with zeros): eagerly, one compiled
        program per call beats op-by-op dispatch.
        """
        self._check(params, x)
        activation = getattr(self.apply_fn, "mlp_activation", None)
        traced = any(isinstance(a, jax.core.Tracer) for a in (*jax.tree_util.tree_leaves(params), x))
        if activation is None or not traced or not isinstance(params, (list, tuple)) or len(params) % 2:
            return jets_by_jet(self, params, x)
        sizes = [params[0].shape[1]] + [params[k].shape[0] for k in range(0, len(params), 2)]
        return ArrayAPIMLP(sizes, activation, xp=jnp, validate=False).jets(list(params), x)

    def layers(self, params: Sequence[Array], x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """One :class:`LayerRecord` per dense layer: one forward and one backward pass.

        ``apply_fn`` runs once under :func:`jax.vjp` with a ``tap`` that adds a
        zero perturbation ``e_k`` to each pre-activation and records ``a``,
        ``z``, ``act(z)`` and ``act'(z)`` (a JVP of the elementwise ``act``
        with a ones tangent). The pullback of the output cotangent with
        respect to the ``e_k`` is ``g_k = dL/dz_k``.

        Raises:
            TypeError: ``apply_fn`` takes no ``tap`` keyword, or called it a
                different number of times than there are dense layers.
        """
        self._check(params, x)
        if not self.takes_tap:
            raise TypeError(
                "layers() needs apply_fn(params, x, tap=None) that routes every dense layer through "
                "a_next = tap(a, z, act); see curvcore.backends.jax.mlp_apply for an example, or build the "
                "model with from_flax/from_equinox"
            )
        n = self.n_layers if self.n_layers is not None else len(params) // 2
        if not isinstance(params, (list, tuple)) or len(params) != 2 * n:
            raise TypeError(f"layers() needs params [W1, b1, ..., W{n}, b{n}] ({2 * n} arrays)")
        eps = [jnp.zeros((x.shape[0], params[2 * k].shape[0]), dtype=params[0].dtype) for k in range(n)]
        p = list(params)
        out, pull, store = jax.vjp(lambda e: self._taps[n](p, x, e), eps, has_aux=True)
        u = resolve_cotangent(out_cotangent, out)
        check_cotangent_shape(u, out)
        gs = pull(u)[0]
        records = [LayerRecord(a=a, z=z, dact=d, g=g, h=h) for (a, z, d, h), g in zip(store, gs)]
        records[-1] = records[-1]._replace(h=out)
        return records


def _check_like(name: str, tree: Any, params: Any) -> None:
    """``ValueError`` unless ``tree`` has the structure and leaf shapes of ``params``."""
    t_leaves, t_def = jax.tree_util.tree_flatten(tree)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    if t_def != p_def:
        raise ValueError(f"{name} must have the structure of params: {p_def}, got {t_def}")
    for i, (a, b) in enumerate(zip(t_leaves, p_leaves)):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"Shape mismatch in {name} leaf {i}: expected {tuple(b.shape)}, got {tuple(a.shape)}.")


def _pullback(out: Array, pull: Callable[[Array], tuple]) -> Callable[[Array], Any]:
    """A ``jax.vjp``-style pullback (returning a 1-tuple) as ``u -> J^T u`` in the params' structure."""

    def pullback(u: Array) -> Any:
        check_cotangent_shape(u, out)
        return pull(u)[0]

    return pullback


class AdapterError(TypeError):
    """A named error of an adapter (a broken ``tap`` contract, a flax collection not given): raised through
    ``apply_fn`` unchanged, never re-raised as a forward error."""


def _call(apply_fn: Callable[..., Array], params: Any, x: Array, **kwargs: Any) -> Array:
    """``apply_fn(params, x, **kwargs)``; an exception it raises becomes a ``ValueError`` naming ``x``'s shape."""
    try:
        return apply_fn(params, x, **kwargs)
    except AdapterError:
        raise
    except Exception as err:
        batch = x[0] if isinstance(x, tuple) else x  # adapters may pass (x, their per-pass context)
        raise ValueError(
            f"apply_fn {getattr(apply_fn, '__name__', apply_fn)!r} failed on x of shape "
            f"{tuple(getattr(batch, 'shape', ()))} ({getattr(batch, 'dtype', type(batch).__name__)}); check that "
            f"x has the shape the model expects and that params fit the model. {type(err).__name__}: {err}") from err


def _tapped(apply_fn: Callable[..., Array], p: list, x: Array, e: list, n: int) -> tuple[Array, list]:
    """``apply_fn`` with ``z_k + e_k`` at every dense layer; aux: ``(a, z, act'(z), act(z))`` per layer."""
    store: list[tuple[Array, Array, Array, Array]] = []

    def tap(a: Array, z: Array, act: Callable[[Array], Array] | None = None) -> Array:
        k = len(store)
        if k >= n:
            raise AdapterError(f"apply_fn called tap more than n_layers={n} times")
        z = z + e[k]
        if act is None:
            h, dact = z, jnp.ones_like(z)
        else:
            h = act(z)
            dact = jax.jvp(act, (jax.lax.stop_gradient(z),), (jnp.ones_like(z),))[1]
        store.append((a, z, dact, h))
        return h

    out = _call(apply_fn, p, x, tap=tap)
    if len(store) != n:
        raise TypeError(f"apply_fn called tap {len(store)} times but the model has {n} dense layers")
    return out, store


CACHE_SIZE = 16
"""Compiled programs kept per primitive (per argument shapes), least recently used dropped first."""


class BoundedJit:
    """``jax.jit(fn)`` with a bounded number of compiled executables.

    ``jax.jit`` keeps one executable per argument signature for the life of
    the process (about 30 MB per batch size for a small net). Called with
    concrete arrays, this keeps an LRU of at most ``maxsize`` ahead-of-time
    compiled programs instead (the least recently used is dropped first), so
    eager training on many batch sizes stays bounded. Called with tracers
    (inside ``jax.vjp`` or another ``jax.jit``), it calls ``jax.jit(fn)``,
    whose own cache is cleared whenever it holds more than ``maxsize``
    executables.
    """

    def __init__(self, fn: Callable[..., Any], maxsize: int = CACHE_SIZE, **jit_kwargs: Any):
        self.fn, self.maxsize = fn, maxsize
        self._jit = jax.jit(fn, **jit_kwargs)
        self._compiled: OrderedDict[Any, Any] = OrderedDict()
        self.compiles = 0

    def __call__(self, *args: Any) -> Any:
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(args)):
            if self._jit._cache_size() >= self.maxsize:
                self._jit.clear_cache()
            return self._jit(*args)
        return self.executable(*args)(*args)

    def executable(self, *args: Any) -> Any:
        """The compiled program for these concrete arguments, from the LRU (compiled on a miss)."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple(_signature(a) for a in leaves))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._jit.lower(*args).compile()
            self.compiles += 1
            self._compiled[key] = compiled
            while len(self._compiled) > self.maxsize:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled

    def lower(self, *args: Any) -> Any:
        """``jax.jit(fn).lower(*args)`` (HLO, cost analysis)."""
        return self._jit.lower(*args)

    def cache_size(self) -> int:
        """Compiled executables held: the LRU's (at most ``maxsize``) and ``jax.jit``'s (at most ``maxsize``)."""
        return len(self._compiled) + self._jit._cache_size()


def _signature(a: Any) -> Any:
    """What a compiled program depends on for one argument leaf."""
    if isinstance(a, (jax.Array, np.ndarray, np.generic)):
        sharding = getattr(a, "sharding", None) if isinstance(a, jax.Array) else None
        return (tuple(a.shape), str(a.dtype), getattr(a, "weak_type", False), sharding)
    return (type(a).__name__, a)


_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # apply_fn -> {jit flag: programs}


def _programs(apply_fn: Callable[..., Array], jit: bool) -> tuple[Any, ...]:
    """The forward, jvp, jets (by order) and tapped-forward (by layer count) programs of ``apply_fn``.

    Shared by every ``JaxModel`` of the same function while it lives.
    """
    cached = _PROGRAMS.get(apply_fn, {}).get(jit) if _weakrefable(apply_fn) else None
    if cached is not None:
        return cached
    wrap = BoundedJit if jit else (lambda f: f)
    call = functools.partial(_call, apply_fn)
    progs = (
        wrap(lambda p, x: call(p, x)),
        wrap(lambda p, x, u: jax.jvp(lambda q: call(q, x), (p,), (u,))),
        {order: wrap(functools.partial(lambda p, x, u, k: _nested_jet(lambda q: call(q, x), p, u, k), k=order))
         for order in (1, 2, 3)},
        _LazyPrograms(lambda n: wrap(functools.partial(lambda p, x, e, n: _tapped(apply_fn, p, x, e, n), n=n))),
    )
    if _weakrefable(apply_fn):
        _PROGRAMS.setdefault(apply_fn, {})[jit] = progs
    return progs


def _weakrefable(fn: Any) -> bool:
    try:
        weakref.ref(fn)
        hash(fn)
        return True
    except TypeError:
        return False


class _LazyPrograms(dict):
    """``{n: program}`` built on first use (the tapped forward per number of layers)."""

    def __init__(self, make: Callable[[int], Any]):
        super().__init__()
        self.make = make

    def __missing__(self, n: int) -> Any:
        self[n] = self.make(n)
        return self[n]


def _nested_jet(fn: Callable[[list], Array], p: list, u: list, order: int) -> list[Array]:
    """``[f, d1, ..., d_order]`` along ``u`` by nested ``jax.jvp``."""
    if order == 0:
        return [fn(p)]
    primals, tangents = jax.jvp(lambda q: _nested_jet(fn, q, u, order - 1), (p,), (u,))
    return list(primals) + [tangents[-1]]


# ---------------------------------------------------------------------------
# arrays
# ---------------------------------------------------------------------------


def _x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def _device(device: Any) -> Any:
    """A jax Device from ``None``, a Device, ``"cpu"``, ``"cuda"``/``"gpu"`` or ``"cuda:1"``."""
    if device is None or not isinstance(device, str):
        return device
    kind, index = parse_device(device)
    try:
        return jax.devices({"cuda": "gpu"}.get(kind, kind))[index]
    except (RuntimeError, IndexError) as err:
        raise ValueError(f"JAX has no device {device!r} here (available: {jax.devices()})") from err


def from_numpy(a: np.ndarray, device: Any = None) -> Array:
    """A JAX array holding a NumPy array (dtype kept), on ``device``.

    Raises:
        TypeError: a float64/complex128 array while ``jax_enable_x64`` is off
            (JAX would silently round it to 32 bits).
    """
    a = np.asarray(a)
    if not _x64_enabled():
        if a.dtype in (np.float64, np.complex128):
            raise TypeError(
                f"{a.dtype} requested but JAX 64-bit mode is off; call "
                "jax.config.update('jax_enable_x64', True) (or curvcore.backends.enable_jax_x64()) before "
                "creating JAX arrays, or use dtype='float32'"
            )
        if a.dtype in (np.int64, np.uint64):
            a = a.astype(np.int32 if a.dtype == np.int64 else np.uint32)
    # committed to a device (like the outputs of a jitted step and curvcore's own counters), so a
    # compiled program sees the same argument shardings on every call and does not compile twice
    return jax.device_put(a, _device(device) or jax.devices()[0])


def probe() -> None:
    """JAX runs wherever it imports (on CPU at least)."""


def namespace() -> Any:
    """``jax.numpy``."""
    return jnp


def to_numpy(a: Array) -> np.ndarray:
    """A NumPy copy of a JAX array."""
    return np.array(a, copy=True)


def synchronize(tree: Any = None) -> Any:
    """``jax.block_until_ready(tree)``: wait for the work producing ``tree``."""
    return jax.block_until_ready(tree) if tree is not None else tree


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[JaxModel, list[Array]]:
    """The MLP as ``JaxModel(mlp_apply(activation))`` with ``params_np`` as JAX arrays; the model knows
    their shapes (``param_shapes``), so params of another net are refused, also inside steps and jit.

    Raises:
        TypeError: float64 params while ``jax_enable_x64`` is off.
    """
    params = [from_numpy(p, device=device) for p in params_np]
    model = JaxModel(mlp_apply(activation), n_layers=len(sizes) - 1, param_shapes=[p.shape for p in params_np])
    return model, params


# ---------------------------------------------------------------------------
# jit and optax
# ---------------------------------------------------------------------------


class JitStep:
    """A ``jax.jit``-ed ``(params, state, x, y, **kw) -> (params, state, info)`` of one method.

    The method, model and loss are closed over (their hyperparameters are
    read when the step is traced: changing ``method.lr`` later needs a new
    ``jit_step``). Params may be any pytree. Keyword arguments
    (``cov_batch=``) are traced arrays; passing or omitting one is a
    different signature and compiles once more. Every call first commits its
    arguments to the params' device, so params fresh from ``flax``/``equinox``
    init (uncommitted) and the committed outputs of the previous step share
    one executable. At most :data:`CACHE_SIZE` executables are kept (LRU).
    Value checks (NaN/Inf) are skipped inside the trace; a non-finite step
    keeps the old params and sets ``info["finite"]`` to False.

    **Model state.** A model with state of its own (``from_flax`` with
    BatchNorm or dropout: ``model.state``, ``model.bind(state)``,
    ``model.next_state(info)``) gets it as a traced argument: the step runs
    on ``model.bind(state)`` and returns ``model.next_state(info)``, which
    is written back to ``model.state`` after the call (the BatchNorm
    statistics of ``info["buffers"]``, the dropout keys moved on).

    **Data parallel.** ``jit_step(..., mesh=mesh, batch_axis="data")``, or
    an ``x`` sharded along axis 0: the batch is split over the mesh axis,
    everything else replicated (see :func:`jit_step`).

    Attributes:
        traces: how many times the step was traced; a stable training loop
            traces once per argument signature (see also :meth:`cache_size`).
    """

    def __init__(self, method: Any, model: Any, loss: Any, donate: bool = False, mesh: Any = None,
                 batch_axis: Any = None):
        self.method, self.model, self.loss = method, model, loss
        self.donate = donate
        self.layout = _sharding.check_layout(mesh, batch_axis)
        self.traces = 0
        self._jitted: dict[Any, BoundedJit] = {}

    def _step(self, params: Any, state: Any, model_state: Any, x: Array, y: Array, kwargs: dict) -> tuple:
        self.traces += 1
        model = self.model if model_state is None else self.model.bind(model_state)
        params, state, info = self.method.step(model, self.loss, params, state, x, y, **kwargs)
        return params, state, info, None if model_state is None else model.next_state(info)

    def _compiled(self, params: Any) -> tuple[BoundedJit, Any]:
        """``(the jitted step, device)`` for the device of ``params`` (input sharding fixed to it)."""
        dev = _device_of(jax.tree_util.tree_leaves(params)[0])
        if dev not in self._jitted:
            kw = {} if dev is None else {"in_shardings": jax.sharding.SingleDeviceSharding(dev)}
            self._jitted[dev] = BoundedJit(self._step, donate_argnums=(0, 1) if self.donate else (), **kw)
        return self._jitted[dev], dev

    def _data_parallel(self, layout: Any) -> BoundedJit:
        """The jitted step of a data-parallel layout (outputs replicated over its mesh)."""
        if layout not in self._jitted:
            self._jitted[layout] = BoundedJit(_sharding.shard_step(self._step, self.model, layout),
                                              donate_argnums=(0, 1) if self.donate else ())
        return self._jitted[layout]

    def _args(self, params: Any, state: Any, x: Array, y: Array, kwargs: dict) -> tuple[BoundedJit, tuple]:
        layout = _sharding.layout_of(self.layout, x)
        if layout is not None:
            return self._data_parallel(layout), _sharding.place(layout, params, state, model_state(self.model),
                                                                x, y, kwargs)
        step, dev = self._compiled(params)
        args = (params, state, model_state(self.model), x, y, kwargs)
        return step, (args if dev is None else jax.device_put(args, dev))

    def __call__(self, params: Any, state: Any, x: Array, y: Array, **kwargs: Any) -> tuple:
        step, args = self._args(params, state, x, y, kwargs)
        params, state, info, new_model_state = step(*args)
        if new_model_state is not None:
            self.model.state = new_model_state
        return params, state, info

    def lower(self, params: Any, state: Any, x: Array, y: Array, **kwargs: Any) -> Any:
        """``jax.jit(...).lower`` for inspection (HLO, cost analysis)."""
        step, args = self._args(params, state, x, y, kwargs)
        return step.lower(*args)

    def executable(self, params: Any, state: Any, x: Array, y: Array, **kwargs: Any) -> Any:
        """The compiled program a call with these arguments runs (``.as_text()``: its optimized HLO,
        with the collectives of a data-parallel step); compiled here on a miss, then reused by the call."""
        step, args = self._args(params, state, x, y, kwargs)
        return step.executable(*args)

    def cache_size(self) -> int:
        """Compiled executables held: one per argument signature (at most :data:`CACHE_SIZE` per device)."""
        return sum(f.cache_size() for f in self._jitted.values())


def model_state(model: Any) -> Any:
    """``model.state`` for a model with state of its own (it has ``bind`` and ``next_state``), else ``None``."""
    if callable(getattr(model, "bind", None)) and callable(getattr(model, "next_state", None)):
        return model.state
    return None


def _device_of(a: Array) -> Any:
    """The single device of a concrete JAX array, else ``None`` (a tracer, or sharded)."""
    try:
        devices = a.devices()
    except Exception:
        return None
    return next(iter(devices)) if len(devices) == 1 else None


def jit_step(method: Any, model: Any, loss: Any, donate: bool = False, mesh: Any = None,
             batch_axis: Any = None) -> JitStep:
    """``jax.jit`` of ``method.step`` bound to ``model`` and ``loss``; data-parallel over a device mesh.

    **Data parallel.** With ``mesh`` (or an ``x`` already sharded along its
    axis 0 with a ``NamedSharding``, whose mesh and axis are then used), each
    call splits ``x``, ``y`` and array keyword arguments (``cov_batch``)
    over the mesh's ``batch_axis`` and replicates params, method state and
    model state on every device of the mesh (also when they arrive on one
    device); the outputs are replicated. XLA turns the step's sums over the
    batch into all-reduces, and the step equals the one-device step up to
    rounding (see the distributed training page).

    Args:
        method: a curvcore method instance.
        model: a :class:`JaxModel` (or any protocol model over JAX arrays).
        loss: a :mod:`curvcore.losses` instance.
        donate: donate the params and state buffers to the step (saves
            device memory; the inputs must not be used afterwards).
        mesh: a ``jax.sharding.Mesh`` to train data-parallel on.
        batch_axis: the mesh axis (or tuple of axes) the batch is split over;
            may be omitted for a mesh with one axis.

    Returns:
        a :class:`JitStep`: ``step(params, state, x, y, **kw) -> (params, state, info)``.

    Raises:
        TypeError: ``mesh`` is not a ``Mesh``.
        ValueError: ``batch_axis`` is not an axis of ``mesh`` (or missing for a
            mesh of several axes, or given without ``mesh``). At a call,
            before anything runs: a batch size the batch axis cannot split
            evenly, params or state sharded over several devices, an ``x``
            sharded along an axis other than 0.
    """
    return JitStep(method, model, loss, donate, mesh, batch_axis)


class OptaxState(NamedTuple):
    """State of :func:`as_optax`: the method's state, the loss before the last update, and the
    model's own state (``None`` for a model without: see :class:`JitStep`)."""

    inner: Any
    loss: Array
    model_state: Any = None


def as_optax(method: Any, model: Any, loss: Any) -> Any:
    """The method as an optax ``GradientTransformationExtraArgs``.

    ``init(params)`` is ``method.init(params, model)`` (any pytree);
    ``update(updates, state, params, x=..., y=..., **kw)`` computes the step
    from the model and the batch and **ignores the incoming ``updates``**
    (the method computes its own derivatives). It returns
    ``(new_params - params, state)`` in the params' structure, so
    ``optax.apply_updates(params, updates)`` takes the method's step (up to
    one rounding of the addition).

    Put it **first** in an ``optax.chain``: transformations after it act on
    the curvature step (``optax.chain(as_optax(...), optax.clip_by_global_norm(1.0))``
    clips it); a transformation before it has no effect, since its output
    is ignored.

    >>> tx = cj.as_optax(cc.SGD(lr=0.1), model, cc.losses.CrossEntropy())
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(None, opt_state, params, x=x, y=y)
    >>> params = optax.apply_updates(params, updates)

    A model with state of its own (flax BatchNorm, dropout) keeps it in
    ``OptaxState.model_state`` (updated by every ``update``, like the rest of
    an optax state); the model object is not changed.

    Returns the optax type when optax is installed, else a NamedTuple with the
    same ``init``/``update`` fields.
    """

    def init(params: Any) -> OptaxState:
        leaf = jax.tree_util.tree_leaves(params)
        return OptaxState(init_state(method, params, model), jnp.zeros((), dtype=leaf[0].dtype if leaf else jnp.float32),
                          model_state(model))

    def update(updates: Any, state: OptaxState, params: Any = None, *, x: Array = None,
               y: Array = None, **kwargs: Any) -> tuple[Any, OptaxState]:
        if params is None or x is None or y is None:
            raise TypeError("the curvcore optax transform needs update(updates, state, params, x=..., y=...)")
        bound = model if state.model_state is None else model.bind(state.model_state)
        new, inner, info = method.step(bound, loss, params, state.inner, x, y, **kwargs)
        after = None if state.model_state is None else bound.next_state(info)
        return jax.tree_util.tree_map(lambda n, p: n - p, new, params), OptaxState(inner, info["loss"], after)

    try:
        import optax

        return optax.GradientTransformationExtraArgs(init, update)
    except ImportError:  # pragma: no cover - optax is in the jax extra
        return _Transform(init, update)


class _Transform(NamedTuple):
    init: Callable[..., Any]
    update: Callable[..., Any]



# ---------------------------------------------------------------------------
# flax and equinox (imported on first use: both are optional)
# ---------------------------------------------------------------------------


def from_flax(module: Any, variables: Any, rngs: Any = None, mutable: Sequence[str] | None = None,
              apply_kwargs: dict | None = None, validate: bool = True, jit: bool = True) -> tuple[Any, Any]:
    """``(model, params)`` for a ``flax.linen`` module: ``params = variables["params"]``.

    Every method runs on the model; the layer-wise ones find its ``nn.Dense``
    and ``nn.Conv`` layers themselves. BatchNorm statistics and dropout keys
    are the model's state (``model.state``; see the JAX section of the backends page).

    Args:
        module: the module; ``module.apply(variables, x, **apply_kwargs)``
            returns one array, samples on axis 0.
        variables: from ``module.init``: ``{"params": ..., "batch_stats": ...}``.
        rngs: the dropout key (``jax.random.key(0)``) or ``{stream: key}``,
            needed when ``apply`` draws random numbers.
        mutable: the collections ``apply`` updates (default: every collection
            of ``variables`` but ``params``).
        apply_kwargs: keyword arguments of every ``apply`` (``{"train": True}``).
        validate: as for :class:`JaxModel`.
        jit: as for :class:`JaxModel`.

    Raises:
        TypeError: not a linen module (``flax.nnx`` is not supported yet), or
            ``variables`` without ``params``.
    """
    from ._flax import build

    return build(module, variables, rngs, mutable, apply_kwargs, validate, jit)


def from_equinox(module: Any, validate: bool = True, jit: bool = True) -> tuple[Any, Any]:
    """``(model, params)`` for an equinox module acting on one sample (the model vmaps it over the batch).

    ``params`` are the module's floating-point array leaves
    (``eqx.partition(module, eqx.is_inexact_array)``); ``model.module(params)``
    puts them back into a module. The layer-wise methods find its
    ``eqx.nn.Linear`` and ``eqx.nn.Conv2d`` layers themselves.

    Raises:
        TypeError: not an equinox module.
        NotImplementedError: a layer with equinox state (``BatchNorm``,
            ``SpectralNorm``) or a ``Dropout`` in training mode.
    """
    from ._equinox import build

    return build(module, validate, jit)


from ._jax_models import ModelState  # noqa: E402  (it builds on JaxModel)

_LAZY = {"FlaxModel": "_flax", "EquinoxModel": "_equinox"}


def __getattr__(name: str) -> Any:
    """The model classes of :func:`from_flax` and :func:`from_equinox`, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__package__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
