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
``jax.jvp``) work for any params list. ``layers`` needs ``apply_fn`` to take a
keyword ``tap`` and route every dense layer through it (see
:meth:`JaxModel.layers`); the built-in MLP (:func:`mlp_apply`) does.

Importing this module registers :func:`jax.lax.cond` and
:func:`jax.lax.while_loop` with :mod:`curvcore._control`, so the methods'
counter branches and early-exit loops trace under ``jax.jit``. It never changes ``jax_enable_x64``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvcore._checks import check_params_and_x, check_same_structure
from curvcore._control import register_cond, register_while_loop
from curvcore.protocol import Cotangent, LayerRecord, checked_pullback, linearize_by_composition, resolve_cotangent

from ._activations import LEAKY_SLOPE, check_activation

Array = Any

__all__ = [
    "JaxModel", "JitStep", "OptaxState", "as_optax", "build_mlp", "from_numpy", "jit_step", "mlp_apply",
    "no_tap", "synchronize", "to_numpy",
]

register_cond(lambda p: isinstance(p, jax.core.Tracer), lambda pred, t, f, *ops: jax.lax.cond(pred, t, f, *ops))
register_while_loop(lambda p: isinstance(p, jax.core.Tracer), lambda c, b, v: jax.lax.while_loop(c, b, v))

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
    return apply


def _takes_tap(fn: Callable[..., Any]) -> bool:
    try:
        return "tap" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class JaxModel:
    """Wrap a pure ``apply_fn(params, x) -> out`` as a curvcore model.

    Each primitive is one ``jax.jit``-compiled program (compiled once per
    shape and dtype), so eager method steps do not dispatch op by op; inside
    :func:`jit_step` the programs are inlined into the step.

    Args:
        apply_fn: pure function of a params list and a batch. For
            :meth:`layers`, it must accept a keyword ``tap`` and compute every
            dense layer as ``a_next = tap(a, z, act)`` with ``z = a W^T + b``
            (``params`` ``[W1, b1, W2, b2, ...]``, ``act`` an elementwise
            function or ``None`` for linear); see :func:`mlp_apply`.
        n_layers: the number of dense layers (checked in :meth:`layers`);
            ``None``: ``len(params) // 2``.
        validate: check batches (library, dtype, NaN/Inf). Value checks are
            skipped automatically inside ``jax.jit``.
        jit: compile the primitives (set False for an ``apply_fn`` that
            cannot be traced by ``jax.jit``).
    """

    xp = jnp

    def __init__(self, apply_fn: Callable[..., Array], n_layers: int | None = None, validate: bool = True,
                 jit: bool = True):
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
        self.apply_fn = apply_fn
        self.n_layers = n_layers
        self.validate = validate
        self.takes_tap = _takes_tap(apply_fn)
        self._forward, self._jvp, self._jet, self._taps = _programs(apply_fn, jit)

    def __repr__(self) -> str:
        return f"JaxModel({getattr(self.apply_fn, '__name__', self.apply_fn)!r}, n_layers={self.n_layers})"

    def _check(self, params: Sequence[Array], x: Array) -> None:
        check_params_and_x(params, x, self.validate)

    # -- primitives ------------------------------------------------------------
    def forward(self, params: Sequence[Array], x: Array) -> Array:
        """The output ``apply_fn(params, x)``."""
        self._check(params, x)
        return self._forward(list(params), x)

    def jvp(self, params: Sequence[Array], x: Array, tangent: Sequence[Array]) -> tuple[Array, Array]:
        """``(f, J tangent)`` by :func:`jax.jvp`."""
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        return tuple(self._jvp(list(params), x, list(tangent)))

    def vjp(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Array], list[Array]]]:
        """``(f, pullback)`` by :func:`jax.vjp` (of the compiled forward); ``pullback(u) = J^T u``."""
        self._check(params, x)
        out, pull = jax.vjp(lambda p: self._forward(p, x), list(params))
        return out, checked_pullback(out, pull)

    def linearize(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable, Callable]:
        """``(f, jvp_fn, pullback)`` at one point (the optional protocol primitive).

        Inside a trace (``jax.jit``): :func:`jax.linearize` of the forward
        (one primal pass; ``jvp_fn`` evaluates only the linear tangent
        program) and :func:`jax.linear_transpose` of that program as the
        pullback, so the step holds one primal forward (XLA would also
        deduplicate separate calls; nothing here adds a compilation).
        Eagerly, the compiled ``jvp``/``vjp`` programs are measured faster
        than op-by-op evaluation of the linearized program (2.4 vs 4.5 ms on
        a [64, 64, 10] net), so it composes them instead.
        """
        self._check(params, x)
        p = list(params)
        if not any(isinstance(a, jax.core.Tracer) for a in (*p, x)):
            return linearize_by_composition(self, p, x)
        out, lin = jax.linearize(lambda q: self._forward(q, x), p)
        transpose = jax.linear_transpose(lin, p)

        def jvp_fn(tangent: Sequence[Array]) -> Array:
            check_same_structure("tangent", tangent, p)
            return lin(list(tangent))

        return out, jvp_fn, checked_pullback(out, transpose)

    def jet(self, params: Sequence[Array], x: Array, tangent: Sequence[Array], order: int) -> list[Array]:
        """``[f, d1, ..., d_order]``, ``d_k = d^k/dt^k f(params + t tangent)`` at 0 (order <= 3).

        Nested :func:`jax.jvp` along the same tangent, compiled (XLA removes
        the duplicated work of the nesting).
        """
        if order not in (1, 2, 3):
            raise ValueError(f"jet order must be 1, 2 or 3, got {order!r}")
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        return list(self._jet(list(params), x, list(tangent), order))

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
        n = self.n_layers if self.n_layers is not None else len(params) // 2
        if not self.takes_tap:
            raise TypeError(
                "layers() needs apply_fn(params, x, tap=None) that routes every dense layer through "
                "a_next = tap(a, z, act); see curvcore.backends.jax.mlp_apply for an example"
            )
        if len(params) != 2 * n:
            raise TypeError(f"layers() needs params [W1, b1, ..., W{n}, b{n}] ({2 * n} arrays), got {len(params)}")
        eps = [jnp.zeros((x.shape[0], params[2 * k].shape[0]), dtype=params[0].dtype) for k in range(n)]
        p = list(params)
        out, pull, store = jax.vjp(lambda e: self._taps(p, x, e, n), eps, has_aux=True)
        u = resolve_cotangent(out_cotangent, out)
        if tuple(u.shape) != tuple(out.shape):
            raise ValueError(f"Shape mismatch in the output cotangent: expected {tuple(out.shape)}, got {tuple(u.shape)}.")
        gs = pull(u)[0]
        records = [LayerRecord(a=a, z=z, dact=d, g=g, h=h) for (a, z, d, h), g in zip(store, gs)]
        records[-1] = records[-1]._replace(h=out)
        return records



def _tapped(apply_fn: Callable[..., Array], p: list, x: Array, e: list, n: int) -> tuple[Array, list]:
    """``apply_fn`` with ``z_k + e_k`` at every dense layer; aux: ``(a, z, act'(z), act(z))`` per layer."""
    store: list[tuple[Array, Array, Array, Array]] = []

    def tap(a: Array, z: Array, act: Callable[[Array], Array] | None = None) -> Array:
        k = len(store)
        if k >= n:
            raise TypeError(f"apply_fn called tap more than n_layers={n} times")
        z = z + e[k]
        if act is None:
            h, dact = z, jnp.ones_like(z)
        else:
            h = act(z)
            dact = jax.jvp(act, (jax.lax.stop_gradient(z),), (jnp.ones_like(z),))[1]
        store.append((a, z, dact, h))
        return h

    out = apply_fn(p, x, tap=tap)
    if len(store) != n:
        raise TypeError(f"apply_fn called tap {len(store)} times but the model has {n} dense layers")
    return out, store


_PROGRAMS: dict = {}  # apply_fn -> {jit flag: programs}; kept for the life of the process


def _programs(apply_fn: Callable[..., Array], jit: bool) -> tuple[Callable[..., Any], ...]:
    """The forward, jvp, jet and tapped-forward programs of ``apply_fn``, compiled once per function.

    Cached per ``apply_fn`` for the life of the process, so every ``JaxModel``
    of the same function shares the compiled executables (one compilation per
    shape and dtype).
    """
    key = (jit,)
    cached = _PROGRAMS.get(apply_fn, {}).get(key)
    if cached is not None:
        return cached
    wrap = jax.jit if jit else (lambda f, **kw: f)
    progs = (
        wrap(lambda p, x: apply_fn(p, x)),
        wrap(lambda p, x, u: jax.jvp(lambda q: apply_fn(q, x), (p,), (u,))),
        wrap(lambda p, x, u, order: _nested_jet(lambda q: apply_fn(q, x), p, u, order), static_argnums=3),
        wrap(lambda p, x, e, n: _tapped(apply_fn, p, x, e, n), static_argnums=3),
    )
    try:
        _PROGRAMS.setdefault(apply_fn, {})[key] = progs
    except TypeError:  # unhashable callable: no sharing
        pass
    return progs


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
    kind, _, index = device.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    try:
        return jax.devices(kind)[int(index or 0)]
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


def to_numpy(a: Array) -> np.ndarray:
    """A NumPy copy of a JAX array."""
    return np.array(a, copy=True)


def synchronize(tree: Any = None) -> Any:
    """``jax.block_until_ready(tree)``: wait for the work producing ``tree``."""
    return jax.block_until_ready(tree) if tree is not None else tree


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[JaxModel, list[Array]]:
    """The MLP as ``JaxModel(mlp_apply(activation))`` with ``params_np`` as JAX arrays.

    Raises:
        TypeError: float64 params while ``jax_enable_x64`` is off.
    """
    params = [from_numpy(p, device=device) for p in params_np]
    return JaxModel(mlp_apply(activation), n_layers=len(sizes) - 1), params


# ---------------------------------------------------------------------------
# jit and optax
# ---------------------------------------------------------------------------


class JitStep:
    """A ``jax.jit``-ed ``(params, state, x, y, **kw) -> (params, state, info)`` of one method.

    The method, model and loss are closed over (their hyperparameters are
    read when the step is traced: changing ``method.lr`` later needs a new
    ``jit_step``). Keyword arguments (``cov_batch=``) are traced arrays;
    passing or omitting one is a different signature and compiles once more.
    Value checks (NaN/Inf) are skipped inside the trace; check ``info``.

    Attributes:
        traces: how many times the step was traced; a stable training loop
            traces once per keyword signature (see also :meth:`cache_size`).
    """

    def __init__(self, method: Any, model: Any, loss: Any, donate: bool = False):
        self.method, self.model, self.loss = method, model, loss
        self.donate = donate
        self.traces = 0
        self._jitted: dict[Any, Any] = {}

    def _step(self, params: list, state: Any, x: Array, y: Array, kwargs: dict) -> tuple:
        self.traces += 1
        return self.method.step(self.model, self.loss, params, state, x, y, **kwargs)

    def _compiled(self, params: Sequence[Array]) -> Any:
        """The jitted step for the device of ``params``.

        The input sharding is fixed to that device: otherwise the first call
        (arguments not yet committed to a device) and the next ones (the
        committed outputs of the first) would compile twice.
        """
        dev = _device_of(params[0])
        if dev not in self._jitted:
            kw = {} if dev is None else {"in_shardings": jax.sharding.SingleDeviceSharding(dev)}
            self._jitted[dev] = jax.jit(self._step, donate_argnums=(0, 1) if self.donate else (), **kw)
        return self._jitted[dev]

    def __call__(self, params: Sequence[Array], state: Any, x: Array, y: Array, **kwargs: Any) -> tuple:
        return self._compiled(params)(list(params), state, x, y, kwargs)

    def lower(self, params: Sequence[Array], state: Any, x: Array, y: Array, **kwargs: Any) -> Any:
        """``jax.jit(...).lower`` for inspection (HLO, cost analysis)."""
        return self._compiled(params).lower(list(params), state, x, y, kwargs)

    def cache_size(self) -> int:
        """Compiled executables held (jax's ``_cache_size``): one per argument signature."""
        return sum(f._cache_size() for f in self._jitted.values())


def _device_of(a: Array) -> Any:
    """The single device of a concrete JAX array, else ``None`` (a tracer, or sharded)."""
    try:
        devices = a.devices()
    except Exception:
        return None
    return next(iter(devices)) if len(devices) == 1 else None


def jit_step(method: Any, model: Any, loss: Any, donate: bool = False) -> JitStep:
    """``jax.jit`` of ``method.step`` bound to ``model`` and ``loss``.

    Args:
        method: a curvcore method instance.
        model: a :class:`JaxModel` (or any protocol model over JAX arrays).
        loss: a :mod:`curvcore.losses` instance.
        donate: donate the params and state buffers to the step (saves
            device memory; the inputs must not be used afterwards).

    Returns:
        a :class:`JitStep`: ``step(params, state, x, y, **kw) -> (params, state, info)``.
    """
    return JitStep(method, model, loss, donate)


class OptaxState(NamedTuple):
    """State of :func:`as_optax`: the method's state and the loss before the last update."""

    inner: Any
    loss: Array


def as_optax(method: Any, model: Any, loss: Any) -> Any:
    """The method as an optax ``GradientTransformationExtraArgs``.

    ``update(updates, state, params, x=..., y=..., **kw)`` ignores the
    incoming ``updates`` (the method computes its own derivatives) and returns
    ``(new_params - params, state)``, so ``optax.apply_updates(params, updates)``
    takes the method's step (up to one rounding of the addition).

    >>> tx = cj.as_optax(cc.SGD(lr=0.1), model, cc.losses.CrossEntropy())
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(None, opt_state, params, x=x, y=y)
    >>> params = optax.apply_updates(params, updates)

    Returns the optax type when optax is installed, else a NamedTuple with the
    same ``init``/``update`` fields.
    """

    def init(params: Sequence[Array]) -> OptaxState:
        return OptaxState(method.init(list(params)), jnp.zeros((), dtype=params[0].dtype))

    def update(updates: Any, state: OptaxState, params: Sequence[Array] | None = None, *, x: Array = None,
               y: Array = None, **kwargs: Any) -> tuple[list[Array], OptaxState]:
        if params is None or x is None or y is None:
            raise TypeError("the curvcore optax transform needs update(updates, state, params, x=..., y=...)")
        new, inner, info = method.step(model, loss, list(params), state.inner, x, y, **kwargs)
        return [n - p for n, p in zip(new, params)], OptaxState(inner, info["loss"])

    try:
        import optax

        return optax.GradientTransformationExtraArgs(init, update)
    except ImportError:  # pragma: no cover - optax is in the jax extra
        return _Transform(init, update)


class _Transform(NamedTuple):
    init: Callable[..., Any]
    update: Callable[..., Any]
