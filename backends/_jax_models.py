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

from curvcore._checks import value_checks_on
from curvcore.layers import LayerSpec, Records, output_cotangent, weight_matrix
from curvcore.protocol import Cotangent, LayerRecord

from .jax import BoundedJit, JaxModel

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
        self._discoveries: OrderedDict = OrderedDict()  # shared by the model's bound copies
        self._tapped_programs: dict = {}
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
        """The state after a step: ``info["buffers"]`` (the step's updated collections) and the keys moved on."""
        buffers = (info or {}).get("buffers")
        collections = self._state.collections if buffers is None else {**self._state.collections, **buffers}
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
        index: ``{layer key: params index of its weight}`` of the layers that
            may be recorded (others pass through untouched).
        perturb: ``{call number: e}``; those calls return ``z + e`` and keep
            ``(a, z + e)`` in :attr:`seen`. ``None``: keep every call (the
            discovery pass).
    """

    def __init__(self, index: dict, perturb: dict | None = None):
        self.index, self.perturb = index, perturb
        self.calls: list[Call] = []
        self.seen: list[tuple[Array, Array]] = []
        self.last: Array | None = None
        self.output_is_last = False

    def __call__(self, key: Any, kind: str | None, a: Array, z: Array, conv: Conv | None = None) -> Array:
        """The output of one layer call (``z``, or ``z + e`` for a perturbed call)."""
        weight = self.index.get(key)
        if weight is None or kind is None:
            return z
        n = len(self.calls)
        self.calls.append(Call(weight, kind, tuple(a.shape), tuple(z.shape), z.dtype, conv))
        if self.perturb is None or n in self.perturb:
            z = z if self.perturb is None else z + self.perturb[n]
            self.seen.append((a, z))
        self.last = z
        return z

    def finish(self, out: Array) -> Array:
        """Note whether ``out`` (the model output, where the layers are called) is the last call's output."""
        self.output_is_last = self.last is not None and out is self.last
        return out


class Discovery(NamedTuple):
    """The layer calls of one pass, in call order, and whether the last one is the model output."""

    calls: list
    output_is_last: bool


def signature(tree: Any) -> Any:
    """A hashable key of a tree's structure, shapes and dtypes (concrete arrays or tracers)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else (type(a), a) for a in leaves)


class LayerModel(ContextModel):
    """A :class:`ContextModel` with the ``layer_specs``, ``records`` and ``layers`` primitives.

    The subclass provides ``tapped(params, xs, tape) -> out`` (its forward
    with every layer call routed through ``tape``; ``xs`` is the batch and
    the pass context), ``layer_specs(params)`` and ``_layer_key(spec)`` (the
    key its tape calls use); ``per_sample`` is True when layer shapes exclude
    the batch axis (equinox).
    """

    per_sample = False
    MAX_SIGNATURES = 16

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

    def _discover(self, params: Any, xs: Any) -> Discovery:
        """The layer calls of a pass at these shapes (one ``jax.eval_shape`` per signature, cached)."""
        key = signature((params, xs))
        found = self._discoveries.get(key)
        if found is None:
            box: dict = {}

            def run(p: Any, xs_: Any) -> tuple[Array, list]:
                tape = Tape(self._layer_index(p))
                out = self.tapped(p, xs_, tape)
                box["found"] = Discovery(tape.calls, tape.output_is_last)
                return out, tape.seen

            try:
                jax.eval_shape(run, params, xs)
            except jax.errors.UnexpectedTracerError as err:
                raise TypeError(
                    "a dense or convolution layer of this model is called inside a JAX transformation of its own "
                    "(jax.vmap, lax.scan, a flax lifted transform); the layer-wise methods can't record it. Use a "
                    "method that needs no layers (CurveBall, PseudoHessian, SGD, Adam)") from err
            found = self._discoveries[key] = box["found"]
            while len(self._discoveries) > self.MAX_SIGNATURES:
                self._discoveries.popitem(last=False)
        return found

    def _layer_index(self, params: Any) -> dict:
        """``{layer key: params index of its weight}`` (see :meth:`layer_specs`)."""
        return {self._layer_key(s): s.weight for s in self.layer_specs(params)}

    def _layer_key(self, spec: LayerSpec) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

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
        count = Counter(c.weight for c in found.calls)
        keep = tuple(n for n, c in enumerate(found.calls)
                     if c.weight in considered and count[c.weight] == 1 and every[c.weight].kind == c.kind
                     and _supported(c, self.per_sample))
        e = [jnp.zeros(self._batched(x, found.calls[n].out_shape), dtype=found.calls[n].dtype) for n in keep]
        program = self._tapped_program(keep)
        out, pull, seen = jax.vjp(lambda p, e_: program(p, xs, e_), params, e, has_aux=True)
        grads, g_of = pull(output_cotangent(cotangent, out))
        calls = [found.calls[n] for n in keep]
        if chain:
            last = found.output_is_last and keep and keep[-1] == len(found.calls) - 1
            kept, recs = chain_records(self, program, params, xs, e, calls, seen, g_of, out, wanted, every,
                                       bool(last))
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


def chain_records(model: Any, program: Callable, params: Any, xs: Any, e: list, calls: list, seen: list,
                  g_of: list, out: Array, wanted: set, every: dict, output_is_last: bool) -> tuple[list, list]:
    """The output chain: the longest run of dense calls (all in ``wanted``) ending at the output.

    Between two chain layers the model must apply an elementwise function:
    ``act'(z)`` is the JVP of the pass along a ones perturbation of the
    lower layer's output, read at the upper layer's input. When values are
    concrete and ``validate`` is on, two checks cut the chain where they
    fail: a patterned tangent gives ``act'(z) * pattern`` (elementwise), and
    ``g_k = (g_{k+1} W_{k+1}) * act'(z_k)`` (no skip connection). Inside
    ``jax.jit`` only the shapes are checked.
    """
    if not calls or not output_is_last or out.ndim != 2 or calls[-1].weight not in wanted:
        return [], []
    n = len(calls)
    start = n - 1
    while start > 0 and calls[start - 1].weight in wanted and seen[start - 1][0].ndim == 2 \
            and tuple(seen[start][0].shape) == tuple(seen[start - 1][1].shape):
        start -= 1
    validate = value_checks_on(model.validate) and not _traced(params, xs)
    dacts = _chain_derivatives(program, params, xs, e, range(start, n - 1), validate)
    recs = [LayerRecord(a=seen[-1][0], z=out, dact=jnp.ones_like(out), g=g_of[-1], h=out)]
    kept = [every[calls[-1].weight]]
    for k in range(n - 2, start - 1, -1):
        dact, ok = dacts[k]
        if validate and not (ok and _chain_rule_holds(g_of[k], g_of[k + 1], params, every[calls[k + 1].weight],
                                                      dact)):
            break
        recs.insert(0, LayerRecord(a=seen[k][0], z=seen[k][1], dact=dact, g=g_of[k], h=seen[k + 1][0]))
        kept.insert(0, every[calls[k].weight])
    return kept, recs


def _traced(*trees: Any) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(trees))


def _pattern(shape: tuple, dtype: Any, period: int = 5) -> Array:
    """A deterministic, non-constant array (1 .. 2)."""
    i = jnp.arange(math.prod(shape), dtype=dtype).reshape(shape)
    return 1 + jnp.remainder(i * 7, period) / (period - 1)


def _chain_derivatives(program: Callable, params: Any, xs: Any, e: list, layers: range,
                       validate: bool) -> dict[int, tuple[Array, bool]]:
    """``{k: (act'(z_k), elementwise?)}`` from one vmapped JVP of the pass per direction.

    Direction ``k`` perturbs ``e_k`` by ones (and, when validating, a
    second by a pattern ``r``); the tangent of layer ``k + 1``'s input is
    ``act'(z_k)`` (resp. ``act'(z_k) * r`` if the function is elementwise).
    """
    layers = list(layers)
    if not layers:
        return {}
    seeds = [(k, jnp.ones_like(e[k])) for k in layers]
    if validate:
        seeds += [(k, _pattern(e[k].shape, e[k].dtype)) for k in layers]
    tangents = [jnp.stack([t if k == i else jnp.zeros_like(ei) for k, t in seeds]) for i, ei in enumerate(e)]

    def inputs_tangent(t: list) -> list:
        return jax.jvp(lambda e_: [a for a, _ in program(params, xs, e_)[1]], (e,), (t,))[1]

    moved = jax.vmap(inputs_tangent)(tangents)
    result = {}
    for d, k in enumerate(layers):
        dact = moved[k + 1][d]
        ok = True
        if validate:
            r = seeds[len(layers) + d][1]
            ok = _close(moved[k + 1][len(layers) + d], dact * r, 1e-6, 1e-12)
        result[k] = (dact, ok)
    return result


def _chain_rule_holds(g: Array, g_next: Array, params: Any, spec_next: LayerSpec, dact: Array) -> bool:
    W = weight_matrix(jax.tree_util.tree_leaves(params)[spec_next.weight], spec_next)
    return _close(jnp.matmul(g_next, W) * dact, g, 1e-6, 1e-9)


def _close(a: Array, b: Array, rtol: float, atol_scale: float) -> bool:
    scale = float(jnp.max(jnp.abs(b))) + 1e-300
    return bool(jnp.allclose(a, b, rtol=rtol, atol=atol_scale * scale))
