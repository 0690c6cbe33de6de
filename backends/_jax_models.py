"""What the flax and equinox adapters share (private to the JAX adapter): model state and layer records.

**Model state.** :class:`ContextModel` is a :class:`~curvcore.backends.jax.JaxModel`
whose apply function also takes a *pass context* built from the model's
:class:`ModelState` (flax collections such as ``batch_stats``, and the
random keys of dropout). The model holds its state; ``bind(state)`` returns
a copy bound to another (possibly traced) state, ``next_state(info)`` the
state after a step (the step's ``info["buffers"]`` and the keys moved on),
``advance(info)`` moves the model itself. Every pass of one step sees the
same context, so the same dropout masks and the batch's statistics.

**Layer records.** A *tapped* forward runs the user's model with every dense and convolution
layer call intercepted (flax: ``nn.intercept_methods``; equinox: the layers
swapped for wrappers). Each intercepted call goes through a :class:`Tape`,
which adds a zero perturbation ``e_k`` to the output of the calls asked for
and keeps their input ``a`` and output ``z``. One ``jax.vjp`` over
``(params, e)`` then gives the parameter gradient and ``g_k = dL/dz_k`` for
every recorded layer of any architecture. Interception happens while JAX
traces, so all of it runs under ``jax.jit``.

Which calls a pass makes (layer, kind, shapes, convolution geometry) is found
once per argument signature by a :func:`jax.eval_shape` pass. Layers called
more than once per pass are left out (no single record), as on torch.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvcore.layers import LayerSpec, Records, output_cotangent, weight_matrix
from curvcore.protocol import Cotangent, LayerRecord

from .jax import CACHE_SIZE, BoundedJit, JaxModel

Array = Any


# ---------------------------------------------------------------------------
# model state
# ---------------------------------------------------------------------------


class ModelState(NamedTuple):
    """A model's own state, a pytree: what a step reads besides the params.

    Attributes:
        collections: flax variables other than ``params`` (``{"batch_stats": ...}``), ``{}`` if none.
        rngs: ``{stream: key}``: the keys of the next step (``{"dropout": key}``), ``{}`` if none.
    """

    collections: dict
    rngs: dict


class _Scope:
    """One method step: the updated collections of its first pass (``info["buffers"]``)."""

    buffers: dict | None = None


class _WithContext:
    """A primitive program of ``(params, (x, context), ...)`` called as ``(params, x, ...)``."""

    def __init__(self, program: Callable, model: ContextModel):
        self.program, self.model = program, model

    def __call__(self, params: Any, x: Array, *rest: Any) -> Any:
        return self.program(params, (x, self.model.pass_context()), *rest)

    def cache_size(self) -> int:
        return self.program.cache_size() if isinstance(self.program, BoundedJit) else 0


class ContextModel(JaxModel):
    """A :class:`JaxModel` whose ``apply_fn(params, (x, context))`` reads the model state.

    Args:
        apply_fn: ``(params, (x, (collections, rngs))) -> out``.
        updates_fn: ``(params, (x, context)) -> updated collections``, or
            ``None`` when the model updates none (no BatchNorm).
        state: the initial :class:`ModelState`.
    """

    def __init__(self, apply_fn: Callable, updates_fn: Callable | None, state: ModelState, validate: bool = True,
                 jit: bool = True):
        super().__init__(apply_fn, validate=validate, jit=jit)
        self._raw = (self._forward, self._jvp, self._jet)
        self._updates = None if updates_fn is None else (BoundedJit(updates_fn) if jit else updates_fn)
        self._discoveries = Memo()  # per signature, shared by the model's bound copies
        self._tapped_programs: dict = {}
        self._chains = Memo()  # (signature, chain) -> where the elementwise links start
        self._jit = jit
        self._attach(state)

    def _attach(self, state: ModelState) -> None:
        """Hold ``state``; the primitives of this instance read it."""
        self._state = state
        self._context = (state.collections, {k: jax.random.fold_in(v, 0) for k, v in state.rngs.items()})
        self._local = threading.local()
        forward, jvp, jets = self._raw
        self._forward, self._jvp = _WithContext(forward, self), _WithContext(jvp, self)
        self._jet = {k: _WithContext(v, self) for k, v in jets.items()}

    # -- the state -------------------------------------------------------------
    @property
    def state(self) -> ModelState:
        """The state the next step reads (settable, e.g. from a checkpoint)."""
        return self._state

    @state.setter
    def state(self, state: ModelState) -> None:
        self._check_state(state)
        self._attach(state)

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState (model.state, model.next_state(info)), got "
                            f"{type(state).__name__}")
        have, want = jax.tree_util.tree_structure(state), jax.tree_util.tree_structure(self._state)
        if have != want:
            raise ValueError(f"state must have the structure of model.state: {want}, got {have}")

    def bind(self, state: ModelState) -> ContextModel:
        """A copy of the model reading ``state`` (traced inside ``jax.jit``/``lax.scan``); this one is unchanged."""
        self._check_state(state)
        bound = copy.copy(self)
        bound._attach(state)
        return bound

    def next_state(self, info: dict | None = None) -> ModelState:
        """The state after a step: ``info["buffers"]`` (the step's updated collections, in the dtypes of the
        current ones, as torch's ``copy_`` keeps a buffer's dtype) and the keys moved on."""
        collections = dict(self._state.collections)
        for name, new in ((info or {}).get("buffers") or {}).items():
            old = collections.get(name)
            same = old is not None and jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
            collections[name] = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new, old) if same else new
        return ModelState(collections, {k: jax.random.fold_in(v, 1) for k, v in self._state.rngs.items()})

    def advance(self, info: dict | None = None) -> ModelState:
        """Move this model to :meth:`next_state` (after an eager step); returns the new state."""
        self.state = self.next_state(info)
        return self._state

    def pass_context(self) -> tuple[dict, dict]:
        """``(collections, rngs)`` every pass of the current step reads."""
        return self._context

    @contextmanager
    def step_scope(self) -> Iterator[_Scope]:
        """One method step: the first pass's updated collections are kept (``scope.buffers``)."""
        scope = _Scope()
        self._local.scope = scope
        try:
            yield scope
        finally:
            self._local.scope = None

    def _capture(self, params: Any, x: Array) -> None:
        """In a step, keep the updated collections of its first pass (at the step's params)."""
        scope = getattr(self._local, "scope", None)
        if scope is not None and scope.buffers is None and self._updates is not None:
            scope.buffers = self._updates(params, (x, self._context))

    def cache_size(self) -> int:
        """Compiled programs held by this model's primitives (each an LRU of at most ``CACHE_SIZE``)."""
        extra = [self._updates, *self._tapped_programs.values()]
        return super().cache_size() + sum(p.cache_size() for p in extra if isinstance(p, BoundedJit))

    # -- primitives: the first one of a step captures the updated collections -------
    def forward(self, params: Any, x: Array) -> Array:
        self._capture(params, x)
        return super().forward(params, x)

    def jvp(self, params: Any, x: Array, tangent: Any) -> tuple[Array, Array]:
        self._capture(params, x)
        return super().jvp(params, x, tangent)

    def vjp(self, params: Any, x: Array) -> tuple[Array, Callable]:
        self._capture(params, x)
        return super().vjp(params, x)

    def linearize(self, params: Any, x: Array) -> tuple[Array, Callable, Callable]:
        self._capture(params, x)
        return super().linearize(params, x)

    def jet(self, params: Any, x: Array, tangent: Any, order: int) -> list[Array]:
        self._capture(params, x)
        return super().jet(params, x, tangent, order)


class Memo:
    """Values computed once per key, the :data:`~curvcore.backends.jax.CACHE_SIZE` most recent kept."""

    def __init__(self) -> None:
        self._values: OrderedDict = OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = self._values[key] = make()
        while len(self._values) > CACHE_SIZE:
            self._values.popitem(last=False)
        return value


class Conv(NamedTuple):
    """The geometry of a recorded 2-d convolution (what the patches need)."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: Any  # "SAME", "VALID" or ((lo, hi), (lo, hi))
    dilation: tuple[int, int]
    layout: str  # "NHWC" (flax) or "NCHW" (equinox)


class Call(NamedTuple):
    """One intercepted layer call: the params index of its weight, its kind, shapes and geometry."""

    weight: int
    kind: str
    in_shape: tuple
    out_shape: tuple
    dtype: Any
    conv: Conv | None


class Tape:
    """What one tapped pass does at each layer call.

    Args:
        index: ``{layer name: params index of its weight}`` of the layers that
            may be recorded (others pass through untouched).
        perturb: ``{call number: e}``; those calls return ``z + e`` and keep
            ``(a, z + e)`` in :attr:`seen`. ``None``: keep every call (the
            discovery pass).
    """

    def __init__(self, index: dict, perturb: dict | None = None):
        self.index, self.perturb = index, perturb
        self.calls: list[Call] = []
        self.seen: list[tuple[Array, Array]] = []
        self.trace = _trace_state()  # made where the pass is traced: calls inside a nested transform differ

    def __call__(self, key: Any, kind: str | None, a: Array, z: Array, conv: Conv | None = None) -> Array:
        """The output of one layer call (``z``, or ``z + e`` for a perturbed call).

        A call inside a JAX transformation of the model's own (``jax.vmap``
        over a sequence, ``nn.remat``, ``nn.scan``) passes through unrecorded:
        its values live in that transformation only.
        """
        weight = self.index.get(key)
        if weight is None or kind is None or _trace_state() != self.trace:
            return z
        n = len(self.calls)
        self.calls.append(Call(weight, kind, tuple(a.shape), tuple(z.shape), z.dtype, conv))
        if self.perturb is None or n in self.perturb:
            z = z if self.perturb is None else z + self.perturb[n]
            self.seen.append((a, z))
        return z


def _trace_state() -> Any:
    """An opaque token of the JAX trace running now (what flax compares to spot lifted transforms)."""
    try:
        from jax.extend.core import get_opaque_trace_state
    except ImportError:  # pragma: no cover - jax < 0.10
        from jax.core import get_opaque_trace_state
    return get_opaque_trace_state(convention="flax")


def signature(tree: Any) -> Any:
    """A hashable key of a tree's structure, shapes and dtypes (concrete arrays or tracers)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else (type(a), a) for a in leaves)


class LayerModel(ContextModel):
    """A :class:`ContextModel` with the ``layer_specs``, ``records`` and ``layers`` primitives.

    The subclass provides ``tapped(params, xs, tape) -> out`` (its forward
    with every layer call routed through ``tape`` under the layer's
    ``LayerSpec.name``; ``xs`` is the batch and the pass context) and
    ``layer_specs(params)``; ``per_sample`` is True when layer shapes
    exclude the batch axis (equinox).
    """

    per_sample = False
    # -- the passes ----------------------------------------------------------
    def tapped(self, params: Any, xs: Any, tape: Tape) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def _tapped_program(self, keep: tuple[int, ...]) -> Callable:
        """``(params, xs, e) -> (out, [(a, z + e) per kept call])``, compiled once per ``keep`` and signature."""
        programs = self._tapped_programs
        if keep not in programs:
            def run(params: Any, xs: Any, e: list) -> tuple[Array, list]:
                tape = Tape(self._layer_index(params), dict(zip(keep, e)))
                return self.tapped(params, xs, tape), tape.seen

            programs[keep] = BoundedJit(run) if self._jit else run
        return programs[keep]

    def _discover(self, params: Any, xs: Any) -> list[Call]:
        """The layer calls of a pass at these shapes (one ``jax.eval_shape`` per signature, cached)."""

        def discover() -> list[Call]:
            box: dict = {}

            def run(p: Any, xs_: Any) -> tuple[Array, list]:
                tape = Tape(self._layer_index(p))
                out = self.tapped(p, xs_, tape)
                box["found"] = tape.calls
                return out, tape.seen

            jax.eval_shape(run, params, xs)
            return box["found"]

        return self._discoveries.get(signature((params, xs)), discover)

    def _layer_index(self, params: Any) -> dict:
        """``{layer name: params index of its weight}`` (see :meth:`layer_specs`)."""
        return {s.name: s.weight for s in self.layer_specs(params)}

    # -- the primitives ------------------------------------------------------------
    def records(self, params: Any, x: Array, cotangent: Cotangent, specs: Sequence[LayerSpec] | None = None,
                chain: bool = False) -> Records:
        """One forward and one backward: the output, ``J^T cotangent`` (params-like) and the records of ``specs``.

        Every layer asked for that the forward calls exactly once as the
        layer type its params say is recorded in weight-sharing format (a
        convolution's input as patches ``(B, S, C_in kh kw)`` from
        :func:`jax.lax.conv_general_dilated_patches`). With ``chain=True``
        only the output chain of dense layers is kept, with ``z``, ``dact``
        and ``h`` (see :func:`chain_records`).
        """
        self._check(params, x)
        self._capture(params, x)
        xs = (x, self._context)
        every = {s.weight: s for s in self.layer_specs(params)}
        specs = list(every.values()) if specs is None else list(specs)
        wanted = {s.weight for s in specs}
        considered = {w for w, s in every.items() if s.kind == "dense"} if chain else wanted
        found = self._discover(params, xs)
        count = Counter(c.weight for c in found)
        keep = tuple(n for n, c in enumerate(found)
                     if c.weight in considered and count[c.weight] == 1 and every[c.weight].kind == c.kind
                     and _supported(c, self.per_sample))
        e = [jnp.zeros(self._batched(x, found[n].out_shape), dtype=found[n].dtype) for n in keep]
        program = self._tapped_program(keep)
        out, pull, seen = jax.vjp(lambda p, e_: program(p, xs, e_), params, e, has_aux=True)
        grads, g_of = pull(output_cotangent(cotangent, out))
        calls = [found[n] for n in keep]
        if chain:
            last = bool(keep) and keep[-1] == len(found) - 1  # the last layer called may give the output
            kept, recs = chain_records(self, program, params, xs, e, calls if last else [], seen, g_of, out,
                                       wanted, every)
        else:
            kept = [every[c.weight] for c in calls]
            recs = [layer_record(c, a, g, self.per_sample) for c, (a, _), g in zip(calls, seen, g_of)]
        return Records(out, grads, kept, recs)

    def layers(self, params: Any, x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Records of the output chain of dense layers (all of them for an MLP), input to output.

        Raises:
            TypeError: the model has no chain of dense layers ending at the output.
        """
        rec = self.records(params, x, out_cotangent, None, chain=True)
        if not rec.layers:
            raise TypeError("layers() needs dense layers ending at the output, with elementwise operations between "
                            "them; this model has none (use records())")
        return rec.layers

    def _batched(self, x: Array, shape: tuple) -> tuple:
        return (x.shape[0], *shape) if self.per_sample else shape


def _supported(call: Call, per_sample: bool) -> bool:
    """Whether a call's record fits the weight-sharing format: a batch axis, and a 2-d image for a conv."""
    batch_dims = 0 if per_sample else 1
    if call.kind == "conv2d":
        return call.conv is not None and len(call.in_shape) == 3 + batch_dims
    return len(call.in_shape) >= 1 + batch_dims


# ---------------------------------------------------------------------------
# records in weight-sharing format
# ---------------------------------------------------------------------------


def layer_record(call: Call, a: Array, g: Array, per_sample: bool) -> LayerRecord:
    """A dense record ``a (B, D)``/``(B, S, D)``, or a conv record of patches ``(B, S, C_in kh kw)``."""
    if call.kind == "dense":
        return LayerRecord(a=_positions(a), z=None, dact=None, g=_positions(g), h=None)
    if call.conv.layout == "NCHW":
        return LayerRecord(a=patches(a, call.conv), z=None, dact=None, g=_channels_last(g), h=None)
    return LayerRecord(a=patches(a, call.conv), z=None, dact=None, g=_positions(g), h=None)


def _positions(a: Array) -> Array:
    """``(B, n)`` as it is; ``(B, ..., n)`` as ``(B, S, n)``."""
    return a if a.ndim == 2 else a.reshape(a.shape[0], -1, a.shape[-1])


def _channels_last(g: Array) -> Array:
    """``(B, C, H, W)`` as ``(B, H W, C)``."""
    return jnp.moveaxis(g.reshape(g.shape[0], g.shape[1], -1), 1, 2)


@functools.partial(jax.jit, static_argnums=1)
def patches(a: Array, conv: Conv) -> Array:
    """The conv input as patches ``(B, H_out W_out, C_in kh kw)``, features in ``(C_in, kh, kw)`` order.

    :func:`jax.lax.conv_general_dilated_patches` orders a patch's features
    channel first, then the kernel rows and columns (checked against a direct
    convolution in the tests), which is the order of a torch or equinox
    weight ``(C_out, C_in, kh, kw)`` flattened, and of a flax kernel
    ``(kh, kw, C_in, C_out)`` permuted by ``(3, 2, 0, 1)``.
    """
    spec = (conv.layout, "OIHW" if conv.layout == "NCHW" else "HWIO", conv.layout)
    cols = jax.lax.conv_general_dilated_patches(a, conv.kernel, conv.strides, conv.padding,
                                                rhs_dilation=conv.dilation, dimension_numbers=spec,
                                                precision=jax.lax.Precision.HIGHEST)
    return _channels_last(cols) if conv.layout == "NCHW" else _positions(cols)


# ---------------------------------------------------------------------------
# the output chain (ESN, MK)
# ---------------------------------------------------------------------------


def chain_records(model: LayerModel, program: Callable, params: Any, xs: Any, e: list, calls: list, seen: list,
                  g_of: list, out: Array, wanted: set, every: dict) -> tuple[list, list]:
    """The output chain: the longest run of dense calls (all in ``wanted``) ending at the output.

    Between two chain layers the model must apply an elementwise function;
    ``act'(z)`` is the JVP of the pass along a ones perturbation of the
    lower layer's output, read at the upper layer's input. Whether the
    links are elementwise without skip connections is checked once per
    argument signature on random values (:func:`elementwise_from`), so an
    eager step and a jitted one find the same chain.
    """
    if not calls or out.ndim != 2 or calls[-1].weight not in wanted or tuple(seen[-1][1].shape) != tuple(out.shape):
        return [], []
    n = len(calls)
    start = n - 1
    while start > 0 and calls[start - 1].weight in wanted and seen[start - 1][0].ndim == 2 \
            and tuple(seen[start][0].shape) == tuple(seen[start - 1][1].shape):
        start -= 1
    key = (signature((params, xs)), tuple(c.weight for c in calls), start)
    start = model._chains.get(key, lambda: elementwise_from(program, params, xs, e, tuple(out.shape),
                                                            [every[c.weight] for c in calls], start))
    if start == n:
        return [], []
    links = tuple(range(start, n - 1))
    dacts = input_tangents(program, params, xs, e, links, [jnp.ones_like(e[k]) for k in links]) if links else []
    recs = [LayerRecord(a=seen[-1][0], z=out, dact=jnp.ones_like(out), g=g_of[-1], h=out)]
    for k, dact in zip(range(start, n - 1), dacts):
        recs.insert(len(recs) - 1, LayerRecord(a=seen[k][0], z=seen[k][1], dact=dact, g=g_of[k], h=seen[k + 1][0]))
    return [every[c.weight] for c in calls[start:]], recs


@functools.partial(jax.jit, static_argnums=(0, 4))
def input_tangents(program: Callable, params: Any, xs: Any, e: list, layers: tuple[int, ...],
                   seeds: list[Array]) -> list[Array]:
    """Per ``k`` of ``layers`` and its seed ``t``: the JVP of layer ``k + 1``'s input along ``e_k = t``.

    One JVP of the pass per direction, vmapped (and compiled: eagerly it is one program).
    """
    tangents = [jnp.stack([t if k == i else jnp.zeros_like(ei) for k, t in zip(layers, seeds)])
                for i, ei in enumerate(e)]

    def inputs_tangent(t: list) -> list:
        return jax.jvp(lambda e_: [a for a, _ in program(params, xs, e_)[1]], (e,), (t,))[1]

    moved = jax.vmap(inputs_tangent)(tangents)
    return [moved[k + 1][d] for d, k in enumerate(layers)]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _link_values(program: Callable, params: Any, xs: Any, e: list, links: tuple[int, ...], u: Array,
                 patterns: list[Array]) -> tuple:
    """``(z of the last layer, out, g per layer for the cotangent u, tangents along ones, along the patterns)``."""
    out, pull, seen = jax.vjp(lambda p_, e_: program(p_, xs, e_), params, e, has_aux=True)
    g = pull(u)[1]
    if not links:
        return seen[-1][1], out, g, [], []
    moved = input_tangents(program, params, xs, e, links + links, [jnp.ones_like(e[k]) for k in links] + patterns)
    return seen[-1][1], out, g, moved[: len(links)], moved[len(links):]


def elementwise_from(program: Callable, params: Any, xs: Any, e: list, out_shape: tuple, specs: list[LayerSpec],
                     start: int) -> int:
    """The lowest ``k >= start`` such that every link from layer ``k`` up to the output is elementwise
    (``len(specs)`` if the output is not the last layer's).

    Evaluated on random values of the arguments' shapes (concrete even
    inside a trace, one compiled program): the output must equal the last
    layer's ``z``; a link ``k`` holds when a patterned perturbation ``r`` of
    ``z_k`` moves the next layer's input by ``act'(z_k) * r`` and ``g_k =
    (g_{k+1} W_{k+1}) * act'(z_k)`` for a random output cotangent.
    """
    n = len(specs)
    links = tuple(range(start, n - 1))
    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval():  # values are made with NumPy: nothing but _link_values runs here
        p, xs_ = _surrogate(params, rng, 0.0), (_surrogate(xs[0], rng, 0.0), _surrogate(xs[1], rng, 0.5))
        zeros = [np.zeros(ei.shape, ei.dtype) for ei in e]
        patterns = [_pattern(zeros[k].shape, zeros[k].dtype) for k in links]
        u = rng.standard_normal(out_shape).astype(zeros[-1].dtype)
        values = _link_values(program, p, xs_, zeros, links, u, patterns)
    z_last, out, g, dact, moved = jax.tree_util.tree_map(np.asarray, values)  # NumPy from here: nothing is traced
    if not _close(z_last, out):
        return n
    leaves = jax.tree_util.tree_leaves(p)
    k = n - 1
    while k > start:
        W, d = np.asarray(weight_matrix(leaves[specs[k].weight], specs[k])), k - 1 - start
        if not (_close(moved[d], dact[d] * patterns[d]) and _close(g[k] @ W * dact[d], g[k - 1])):
            break
        k -= 1
    return k


def _surrogate(tree: Any, rng: np.random.Generator, low: float) -> Any:
    """Random NumPy values like ``tree``: floats normal (``low > 0``: uniform in ``[low, low + 1]``),
    integers zero; random keys split from key 0."""

    def one(a: Any) -> Any:
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), math.prod(a.shape)).reshape(a.shape)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return np.zeros(a.shape, a.dtype)
        values = rng.uniform(low, low + 1, a.shape) if low > 0 else rng.standard_normal(a.shape)
        return values.astype(a.dtype)

    return jax.tree_util.tree_map(one, tree)


def _pattern(shape: tuple, dtype: Any, period: int = 5) -> np.ndarray:
    """A deterministic, non-constant array (1 .. 2)."""
    i = np.arange(math.prod(shape)).reshape(shape)
    return (1 + np.remainder(i * 7, period) / (period - 1)).astype(dtype)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    rtol = max(1e-6, 1000 * float(np.finfo(b.dtype).eps))
    return bool(np.allclose(a, b, rtol=rtol, atol=rtol * (float(np.max(np.abs(b))) + 1e-300)))
