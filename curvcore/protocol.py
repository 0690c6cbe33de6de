"""The model and loss protocols.

Every curvature method in curvcore talks to a model only through the
primitives below, so one method implementation serves every backend. The
protocols are split by what a method needs: every model is a :class:`Model`
(``forward``, ``jvp``, ``vjp``); the layer-wise methods need a
:class:`LayerModel` (``layers``) or a :class:`RecordsModel` (``layer_specs``,
``records``); the pseudo-Hessian a :class:`JetModel` (``jet``). A method lists
what it needs beyond :class:`Model` in ``needs`` (:data:`LAYERS`, :data:`JET`),
checked by :func:`provides` at the step's boundary. Losses are :class:`Loss`; ESN
and MK need a :class:`GranularLoss` (the granular term in closed form).

Params are any pytree of arrays (:mod:`curvcore.tree`); a model's primitives
take and return params in the structure the model uses (a list for the
array-API MLP and torch, a dict for flax). Inside a method the params are a
flat list, and :func:`flat_model` adapts a model to flat lists. Vectors over
params (gradients, directions, CurveBall's ``z``) have the params' structure.
Methods never mutate them: every helper returns new lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from array_api_compat import array_namespace

if TYPE_CHECKING:  # layers imports this module
    from .layers import LayerSpec, Records
    from .tree import TreeDef


Array = Any  # an array of any array-API library (numpy, torch, jax, cupy, ...)
Params = list  # list[Array]


class LayerRecord(NamedTuple):
    """What one dense layer ``z = a W^T + b``, ``h = act(z)`` saw in a pass.

    For a layer applied at ``S`` positions per example (a convolution, a dense
    layer on sequences) ``a`` and ``g`` are ``(B, S, D)`` and ``(B, S, n_out)``
    (``a`` holds the unfolded patches of a convolution; see
    :mod:`curvcore.layers`), and ``z``, ``dact``, ``h`` are ``None``: only the
    output chain of an MLP (what ESN and MK use) records them.

    Attributes:
        a: the layer input, shape ``(B, n_in)``.
        z: the pre-activation, shape ``(B, n_out)``, or ``None``.
        dact: the activation derivative ``act'(z)``, shape ``(B, n_out)``
            (all ones for a linear layer), or ``None``.
        g: the back-propagated gradient ``dL/dz`` for the cotangent given to
            :meth:`Model.layers`, shape ``(B, n_out)``. With the cotangent
            ``loss.grad(out, y)`` (which carries the 1/B of the batch mean),
            ``g.T @ a`` is the weight gradient and ``sum(g, axis=0)`` the bias
            gradient.
        h: the layer output ``act(z)``, shape ``(B, n_out)``; for the last
            layer this is the model output. ``None`` outside the output chain.
    """

    a: Array
    z: Array
    dact: Array
    g: Array
    h: Array


Cotangent = Array | Callable[[Array], Array]


@runtime_checkable
class Model(Protocol):
    """The primitives every model provides: ``forward``, ``jvp`` and ``vjp`` (all a method like SGD,
    Adam or CurveBall needs).

    Optional primitive (call it through :func:`linearize`, which falls back to
    ``jvp``/``vjp``): ``linearize(params, x) -> (f, jvp_fn, pullback)`` runs
    ONE forward pass; ``jvp_fn(tangent) = J tangent`` then propagates only the
    tangent through the cached activations and derivatives, and
    ``pullback(u) = J^T u`` (a params-like list) is a backward sweep over the
    same cached forward. A method needing ``J z``, ``J^T u`` and ``J dz`` at
    one point pays 1 forward + 2 tangent propagations + 1 backward, where
    separate ``jvp``/``vjp``/``jvp`` calls redo the forward three times.

    Optional attributes: ``xp`` (the array namespace of the model's arrays),
    ``validate`` (value checks of the primitives called directly; inside a
    method step the method's ``validate`` decides), ``step_scope()`` (model
    state such as BatchNorm buffers, see :class:`curvcore.Method`), ``names``
    (readable names of the params tensors for messages).

    ``isinstance(model, Model)`` works; methods check their needs with the
    faster :func:`satisfies`.
    """

    def forward(self, params: Params, x: Array) -> Array:
        """Return the output ``f(params, x)`` of shape ``(B, ...)``."""
        ...

    def jvp(self, params: Params, x: Array, tangent: Params) -> tuple[Array, Array]:
        """Return ``(f, J tangent)``, true forward mode where the framework has it."""
        ...

    def vjp(self, params: Params, x: Array) -> tuple[Array, Callable[[Array], Params]]:
        """Return ``(f, pullback)`` with ``pullback(u) = J^T u`` (a params-like list)."""
        ...


@runtime_checkable
class LayerModel(Model, Protocol):
    """A model that records its dense layers in a pass (ESN, MK, and the layer-wise methods on an MLP)."""

    def layers(self, params: Params, x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Return one :class:`LayerRecord` per dense layer, input to output.

        ``out_cotangent`` is the cotangent of the output, or a function
        ``out -> cotangent`` (so that a method needs only one forward pass to
        get the loss gradient and the records).
        """
        ...


@runtime_checkable
class RecordsModel(Model, Protocol):
    """A model that names its dense and convolution layers and records any of them in one pass
    (the torch and flax/equinox adapters; see :mod:`curvcore.layers`)."""

    def layer_specs(self, params: Params) -> list[LayerSpec]:
        """The model's layers (:class:`~curvcore.layers.LayerSpec`), in call order."""
        ...

    def records(self, params: Params, x: Array, cotangent: Cotangent, specs: Sequence[LayerSpec] | None = None,
                chain: bool = False) -> Records:
        """One forward and one backward pass recording the layers of ``specs``
        (:class:`~curvcore.layers.Records`)."""
        ...


@runtime_checkable
class JetModel(Model, Protocol):
    """A model with Taylor-mode derivatives along a direction (the pseudo-Hessian).

    Optional primitive (call it through :func:`jets`, which falls back to
    ``forward`` and ``jet``): ``jets(params, x) -> (f, jet_fn)`` runs ONE
    forward pass and caches what Taylor mode needs (the layer inputs and the
    activation derivatives up to order 3); ``jet_fn(tangent, order)`` returns
    ``[d1, ..., d_order]`` (order <= 3) pushing only the Taylor coefficients.
    A params-list ``tangent`` may hold ``None`` for tensors where it is zero:
    a direction supported on layer k costs no work below layer k.
    """

    def jet(self, params: Params, x: Array, tangent: Params, order: int) -> list[Array]:
        """``[f, d1, ..., d_order]`` with ``d_k = d^k/dt^k f(params + t tangent)`` at 0 (order 1, 2 or 3)."""
        ...


@runtime_checkable
class Loss(Protocol):
    """A loss on the model output with its derivatives in closed form (:mod:`curvcore.losses`).

    ``f`` is the output ``(B, ...)``, ``y`` the targets; the reduction over the
    batch (and its ``1/B``) is the loss's own.
    """

    def value(self, f: Array, y: Array) -> Array:
        """The loss, a 0-d array."""
        ...

    def grad(self, f: Array, y: Array) -> Array:
        """``dL/df``, shaped like ``f``."""
        ...

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        """``H_L v`` with ``H_L = d^2 L / df^2``, shaped like ``f``."""
        ...


@runtime_checkable
class GranularLoss(Loss, Protocol):
    """A :class:`Loss` with ESN/MK's granular term in closed form (:class:`~curvcore.losses.MSE`,
    :class:`~curvcore.losses.CrossEntropy`).

    Per sample ``p`` the granular term is the Newton step on the output bias
    alone, ``q_p = A_p⁺ ĝ_p`` with ``A_p = d²ℓ_p/df_p²`` the per-sample output
    Hessian and ``ĝ_p = dℓ_p/df_p`` the per-sample output gradient. ESN and MK
    call these two methods and nothing else of the loss beyond :class:`Loss`;
    a loss without them is refused (``NotImplementedError``) before the step.
    """

    def granular_term(self, f: Array, y: Array, ghat_n: Array) -> tuple[Array, Array]:
        """``(q, ĝ_nᵀ q)`` for outputs ``f`` ``(B, C)``, targets ``y`` and per-sample gradients ``ĝ_n`` ``(B, C)``:
        ``q`` is ``(B, C)``, ``ĝ_nᵀ q`` is ``(B,)``."""
        ...

    def granular_share(self, gq: Array, ghat_n: Array) -> Array:
        """``ĝ_nᵀq / ||ĝ_n||²`` per sample ``(B,)`` from ``gq = ĝ_nᵀ q``, formed without the square, 0 where
        ``ĝ_n = 0``."""
        ...


class Primitive(str):
    """The name of an optional model primitive (``"layers"``, ``"jet"``), as a method lists it in its ``needs``,
    carrying the protocols that provide it: a model satisfying any of them has it."""

    protocols: tuple[type, ...]

    def __new__(cls, name: str, *protocols: type) -> Primitive:
        obj = super().__new__(cls, name)
        obj.protocols = protocols
        return obj


LAYERS = Primitive("layers", LayerModel, RecordsModel)
JET = Primitive("jet", JetModel)
PRIMITIVES = {p: p for p in (LAYERS, JET)}

_MEMBERS: dict[type, tuple[str, ...]] = {}


def members(protocol: type) -> tuple[str, ...]:
    """The methods a protocol requires (its own and those of the protocols it extends)."""
    names = _MEMBERS.get(protocol)
    if names is None:
        names = _MEMBERS[protocol] = tuple(sorted({
            name for klass in protocol.__mro__ if Protocol in klass.__bases__
            for name, value in vars(klass).items() if callable(value) and not name.startswith("_")}))
    return names


def satisfies(model: object, protocol: type) -> bool:
    """Whether ``model`` has every method of ``protocol`` (``isinstance`` without its cost: a step checks this)."""
    return all(callable(getattr(model, name, None)) for name in members(protocol))


def provides(model: object, need: str) -> bool:
    """Whether ``model`` provides the primitive ``need`` (a :class:`Primitive` or its name): it satisfies one of
    the protocols that carry it (a model with ``records`` provides ``"layers"``)."""
    primitive = need if isinstance(need, Primitive) else PRIMITIVES.get(need)
    if primitive is None:
        return callable(getattr(model, need, None))
    return any(satisfies(model, protocol) for protocol in primitive.protocols)


def linearize(model: Model, params: Params, x: Array) -> tuple[Array, Callable[[Params], Array],
                                                             Callable[[Array], Params]]:
    """``(f, jvp_fn, pullback)``: ``jvp_fn(t) = J t``, ``pullback(u) = J^T u`` at ``params``.

    Calls ``model.linearize(params, x)`` (the optional primitive: one forward
    pass, then tangent-only propagations and backward sweeps over the cached
    forward) when the model has it; otherwise composes ``model.vjp`` (one
    forward) with a ``model.jvp`` per tangent (a forward each), so models that
    provide only the required primitives keep working.
    """
    own = getattr(model, "linearize", None)
    if own is not None:
        return own(params, x)
    return linearize_by_composition(model, params, x)


def linearize_by_composition(model: Model, params: Params, x: Array) -> tuple[Array, Callable[[Params], Array],
                                                                            Callable[[Array], Params]]:
    """``(f, jvp_fn, pullback)`` from ``model.vjp`` and one ``model.jvp`` per tangent (no shared forward)."""
    out, pullback = model.vjp(params, x)

    def jvp_fn(tangent: Params) -> Array:
        return model.jvp(params, x, tangent)[1]

    return out, jvp_fn, pullback


JetFn = Callable[[Params, int], list]


def jets(model: JetModel, params: Params, x: Array) -> tuple[Array, JetFn]:
    """``(f, jet_fn)``: ``jet_fn(tangent, order) = [d1, ..., d_order]``, ``d_k = d^k/dt^k f(params + t tangent)`` at 0.

    Calls ``model.jets(params, x)`` (the optional primitive: one forward pass,
    then Taylor coefficients only, ``None`` tangent entries skipped) when the
    model has it; otherwise :func:`jets_by_jet`, so models with only ``jet``
    keep working. ``order`` is 1, 2 or 3.
    """
    own = getattr(model, "jets", None)
    if own is not None:
        return own(params, x)
    return jets_by_jet(model, params, x)


def jets_by_jet(model: JetModel, params: Params, x: Array) -> tuple[Array, JetFn]:
    """``(f, jet_fn)`` from ``model.forward`` and one ``model.jet`` per call (``None`` entries filled with zeros)."""
    out = model.forward(params, x)

    def jet_fn(tangent: Params, order: int) -> list:
        check_jet_order(order)
        return model.jet(params, x, fill_zeros(tangent, params), order)[1:]

    return out, jet_fn


def fill_zeros(tangent: Any, params: Any) -> Any:
    """For params lists: ``tangent`` checked, its ``None`` entries replaced by zeros like ``params``
    (other trees are returned as given)."""
    if not isinstance(params, (list, tuple)):
        return tangent
    check_jet_tangent(tangent, params)
    return [array_namespace(p).zeros_like(p) if t is None else t for t, p in zip(tangent, params)]


def check_jet_order(order: Any) -> None:
    """``ValueError`` unless ``order`` is 1, 2 or 3."""
    if order not in (1, 2, 3) or isinstance(order, bool):
        raise ValueError(f"jet order must be 1, 2 or 3, got {order!r}")


def check_jet_tangent(tangent: Sequence[Any], params: Sequence[Array]) -> None:
    """``ValueError`` unless ``tangent`` is a list like ``params`` whose entries are ``None`` or of the params' shapes."""
    if not isinstance(tangent, (list, tuple)) or len(tangent) != len(params):
        size = len(tangent) if isinstance(tangent, (list, tuple)) else type(tangent).__name__
        raise ValueError(f"tangent must be a list of {len(params)} arrays or None (one per params tensor), got {size}")
    for i, (t, p) in enumerate(zip(tangent, params)):
        if t is not None and tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"Shape mismatch in tangent[{i}]: expected {tuple(p.shape)} or None, got {tuple(t.shape)}.")


def resolve_cotangent(out_cotangent: Cotangent, out: Array) -> Array:
    """Return the output cotangent, calling it on ``out`` if it is a function."""
    return out_cotangent(out) if callable(out_cotangent) else out_cotangent


def checked_pullback(out: Array, pull: Callable[[Array], tuple]) -> Callable[[Array], list[Array]]:
    """Wrap a framework pullback (``torch.func.vjp``/``jax.vjp`` style, returning a
    1-tuple) so that it checks the cotangent's shape and returns a params list."""

    def pullback(u: Array) -> list[Array]:
        if tuple(u.shape) != tuple(out.shape):
            raise ValueError(f"Shape mismatch in the cotangent: expected {tuple(out.shape)}, got {tuple(u.shape)}.")
        return list(pull(u)[0])

    return pullback


# the tree algebra lives in curvcore.tree_algebra; these names stay importable from here
from .tree_algebra import (  # noqa: E402,F401
    tree_add, tree_axpy, tree_dot, tree_map, tree_norm, tree_scale, tree_size, tree_sub, tree_zeros_like,
)


# ---------------------------------------------------------------------------
# flat view of a model whose params are a pytree
# ---------------------------------------------------------------------------

_PRIMITIVES = ("forward", "jvp", "vjp", "linearize", "jet", "jets", "layers", "records", "layer_specs", "step_scope")


class _FlatModel:
    """A model over flat params lists, for a model whose own params are a pytree (see :func:`flat_model`)."""

    def __init__(self, model: Model, treedef: TreeDef):
        from . import tree

        self.model, self.treedef, self.xp = model, treedef, getattr(model, "xp", None)
        self._tree = tree

    def __repr__(self) -> str:
        return f"flat_model({self.model!r})"

    def __getattr__(self, name: str) -> Any:
        if name in _PRIMITIVES and callable(getattr(self.model, name, None)):
            return getattr(self, f"_{name}")
        if name in _PRIMITIVES:
            raise AttributeError(f"{type(self.model).__name__} has no {name}()")
        return getattr(self.model, name)

    def _up(self, flat: Sequence[Array]) -> Any:
        return self._tree.unflatten(self.treedef, flat)

    def _down(self, tree: Any) -> list:
        return self._tree.flatten(tree, what="gradient")[0]

    def _forward(self, params: Params, x: Array) -> Array:
        return self.model.forward(self._up(params), x)

    def _jvp(self, params: Params, x: Array, tangent: Params) -> tuple[Array, Array]:
        return self.model.jvp(self._up(params), x, self._up(tangent))

    def _vjp(self, params: Params, x: Array) -> tuple[Array, Callable[[Array], list]]:
        out, pull = self.model.vjp(self._up(params), x)
        return out, lambda u: self._down(pull(u))

    def _linearize(self, params: Params, x: Array) -> tuple[Array, Callable, Callable]:
        out, jvp_fn, pull = self.model.linearize(self._up(params), x)
        return out, lambda t: jvp_fn(self._up(t)), lambda u: self._down(pull(u))

    def _jet(self, params: Params, x: Array, tangent: Params, order: int) -> list[Array]:
        return self.model.jet(self._up(params), x, self._up(tangent), order)

    def _jets(self, params: Params, x: Array) -> tuple[Array, JetFn]:
        out, jet_fn = self.model.jets(self._up(params), x)
        return out, lambda t, order: jet_fn(self._up(fill_zeros(t, params)), order)

    def _layers(self, params: Params, x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        return self.model.layers(self._up(params), x, out_cotangent)

    def _records(self, params: Params, x: Array, cotangent: Cotangent, specs: Any = None, chain: bool = False) -> Any:
        rec = self.model.records(self._up(params), x, cotangent, specs, chain)
        return rec._replace(grads=self._down(rec.grads))

    def _layer_specs(self, params: Params) -> list:
        return self.model.layer_specs(self._up(params))

    def _step_scope(self) -> Any:
        return self.model.step_scope()


def flat_model(model: Model, treedef: TreeDef) -> Model:
    """``model`` itself when its params are a plain list, else a view whose primitives take flat lists."""
    return model if treedef.kind == "list" else _FlatModel(model, treedef)


# ---------------------------------------------------------------------------
# data-parallel view: parameter-space results of pullbacks summed over processes
# ---------------------------------------------------------------------------


class _ReducedModel:
    """A model whose pullbacks (``J^T u`` over the local shard of the batch) are summed over processes.

    ``records`` is left as it is: its ``grads`` stay this process's partial sums, and a layer-wise
    method all-reduces only the ones it uses (the parameters it does not precondition).
    """

    def __init__(self, model: Model):
        from . import _reduce

        self.model, self.xp, self._sums = model, getattr(model, "xp", None), _reduce.param_sums

    def __repr__(self) -> str:
        return f"reduced_model({self.model!r})"

    def __getattr__(self, name: str) -> Any:
        if name in ("vjp", "linearize") and callable(getattr(self.model, name, None)):
            return getattr(self, f"_{name}")
        return getattr(self.model, name)

    def _vjp(self, params: Params, x: Array) -> tuple[Array, Callable[[Array], list]]:
        out, pull = self.model.vjp(params, x)
        return out, lambda u: self._sums(pull(u))

    def _linearize(self, params: Params, x: Array) -> tuple[Array, Callable, Callable]:
        out, jvp_fn, pull = linearize(self.model, params, x)
        return out, jvp_fn, lambda u: self._sums(pull(u))


def reduced_model(model: Model) -> Model:
    """``model`` itself in one process; under a data-parallel reducer, a view whose pullbacks are all-reduced."""
    from ._reduce import current

    return _ReducedModel(model) if current().distributed else model
