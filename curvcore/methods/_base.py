"""What every method shares: the public ``init``/``step`` around each method's flat step.

A method implements ``init_flat(params, model)`` and
``flat_step(model, loss, params, state, x, y, **kw)`` over flat lists of
arrays. :class:`Method` wraps them into the public, pure API:

* params (and the per-parameter fields of the state) are any pytree: they
  are flattened at entry and the same structure is returned
  (:mod:`curvcore.tree`);
* the structure of the inputs (library, dtype, device, shapes) is checked
  at the boundary, before anything is computed; the state must be this
  method's and match the params;
* a step never returns non-finite params: eagerly it raises
  (``validate=True``); inside ``jax.jit`` (or with ``validate=False``) it
  returns the old params and state and sets ``info["finite"]`` to False, a
  device-side select without a host sync (like optax's ``apply_if_finite``).
  The eager check is the step's one host sync: NaN/Inf in ``x``, ``y``, the
  params or the state, and bad labels, make the result non-finite, and only
  then are the inputs checked one by one to name the problem
  (``ValueError``), else ``FloatingPointError`` names the parameters whose
  update is not finite;
* models with state of their own (BatchNorm statistics, dropout RNG) run the
  step inside their ``step_scope()``; the updated buffers come back in
  ``info["buffers"]``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from array_api_compat import device

from .._namespace import array_namespace

from .. import tree
from .._checks import (
    all_finite, check_batch, check_later, check_named_finite, check_params, check_same_structure, concrete_bool,
    first_not_finite, quiet, step_method, step_scope,
)
from .._reduce import current, param_sums
from ..layers import LayerSpec, Records, layer_specs, records
from ..losses import get as get_loss
from ..protocol import LAYERS, Array, LayerModel, Loss, Model, RecordsModel, flat_model, provides, reduced_model
from ..tree_algebra import tree_axpy, tree_norm


@contextmanager
def method_errors(method: str) -> Iterator[None]:
    """Re-raise ``ValueError``/``TypeError``/``FloatingPointError`` with ``"<method>: "`` in front (once)."""
    try:
        yield
    except (ValueError, TypeError, FloatingPointError) as err:
        if str(err).startswith(f"{method}: "):
            raise
        raise type(err)(f"{method}: {err}") from None


class Method:
    """Base of curvcore methods: ``init(params, model=None) -> state`` and
    ``step(model, loss, params, state, x, y) -> (params, state, info)``.

    Methods are pure: ``step`` returns new params and a new state and never
    mutates its arguments. ``info`` is a dict of 0-d arrays (call ``float`` at
    the edge; inside ``jax.jit`` they stay traced); every method reports
    ``loss`` (before the step), ``step_norm`` and ``finite``.

    Subclasses implement :meth:`init_flat` and :meth:`flat_step` and set
    ``state_type`` (their state NamedTuple) and ``param_fields`` (the state
    fields shaped like params, returned in the params' tree structure).

    Attributes:
        validate: the one switch of value checks in a step (default True):
            check inputs for NaN/Inf (and labels for range) and raise on a
            non-finite result. It governs the whole step: the model's
            primitives and the loss called inside follow it, whatever the
            model's own ``validate`` (which only applies to primitives called
            directly, outside a step, such as :func:`curvcore.ggn_vp`). Set it
            to False in benchmarks: value checks force a device sync. Inside
            ``jax.jit`` value checks are skipped automatically.
        needs: the optional model primitives the method uses beyond
            :class:`~curvcore.protocol.Model`'s forward/jvp/vjp:
            :data:`~curvcore.protocol.LAYERS` (a
            :class:`~curvcore.protocol.LayerModel` or
            :class:`~curvcore.protocol.RecordsModel`),
            :data:`~curvcore.protocol.JET` (a :class:`~curvcore.protocol.JetModel`).
            They compare equal to their names (``"layers"``, ``"jet"``); the step
            checks them (:func:`~curvcore.protocol.provides`), the CLI and the
            test suite read them.
    """

    validate: bool = True
    needs: tuple[str, ...] = ()
    state_type: type | None = None
    param_fields: tuple[str, ...] = ()

    # -- to implement --------------------------------------------------------
    def init_flat(self, params: list[Array], model: Model | None = None) -> Any:  # pragma: no cover - abstract
        """The initial state for flat ``params``."""
        raise NotImplementedError

    def flat_step(self, model: Model, loss: Loss, params: list[Array], state: Any, x: Array, y: Array,
                  **kwargs: Any) -> tuple[list[Array], Any, dict]:  # pragma: no cover - abstract
        """One step over flat params (inputs already validated)."""
        raise NotImplementedError

    # -- the public API ------------------------------------------------------
    def init(self, params: Any, model: Model | None = None) -> Any:
        """The initial state for ``params`` (any pytree of float32/float64 arrays).

        Args:
            params: the parameters.
            model: optional; layer-wise methods read the layer structure from
                it (without it they read params as a plain MLP ``[W1, b1, ...]``).

        Raises:
            TypeError: leaves that are not arrays, mixed libraries, or an
                unsupported dtype (float16, bfloat16).
            ValueError: empty params; a layer structure that doesn't fit.
        """
        with method_errors(type(self).__name__):
            leaves, treedef = tree.flatten(params)
            check_params(leaves)
        flat = self.init_flat(leaves, None if model is None else flat_model(model, treedef))
        return self._tree_state(flat, treedef)

    def step(self, model: Model, loss: Loss | str, params: Any, state: Any, x: Array, y: Array, **kwargs: Any):
        """One step: ``(new_params, new_state, info)``, params in the structure given.

        Raises:
            TypeError: a state of another method, leaves that are not arrays,
                mixed libraries or dtypes, a model lacking a needed primitive.
            ValueError: shapes that differ, an empty batch, NaN/Inf in the
                inputs (``validate``), labels out of range, a state for
                another model.
            FloatingPointError: the step is not finite (``validate``, eager).
        """
        with method_errors(type(self).__name__):
            loss = get_loss(loss)
            leaves, treedef = tree.flatten(params)
            leaves = tree.detached(leaves)
            flat_state, state_fields = self._flat_state(state, leaves, treedef)
            fmodel = reduced_model(flat_model(model, treedef))
            for need in self.needs:
                if not provides(fmodel, need):
                    raise TypeError(f"{type(self).__name__} needs model.{need}(...); "
                                    f"{type(model).__name__} does not provide it")
            xp = check_batch(leaves, x, y, validate=False)

        def inputs() -> list[tuple[str, Array]]:  # named only when a check failed
            return [("x", x), ("y", y), *((f"params[{i}]", p) for i, p in enumerate(leaves)),
                    *((f"state.{f}[{i}]", a) for f, flat in state_fields.items() for i, a in enumerate(flat))]

        scope_fn = getattr(fmodel, "step_scope", None)
        model_scope = scope_fn() if scope_fn is not None else nullcontext()
        values = quiet(x) if self.validate else nullcontext()  # a validated step reports NaN/Inf itself
        with step_scope(self.validate, type(self).__name__) as running, model_scope as scope, values:
            try:
                new, new_state, info = self.flat_step(fmodel, loss, leaves, flat_state, x, y, **kwargs)
            except Exception:
                if self.validate:
                    self._name_bad_input(running, inputs)
                raise
            new, new_state, info = self._keep_finite(xp, leaves, flat_state, new, new_state, dict(info), fmodel,
                                                     running, inputs)
        buffers = getattr(scope, "buffers", None)
        if buffers is not None:
            info["buffers"] = buffers
        return tree.unflatten(treedef, new), self._tree_state(new_state, treedef), info

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # -- state trees ---------------------------------------------------------
    def _tree_state(self, state: Any, treedef: tree.TreeDef) -> Any:
        """The state with its per-parameter fields in the params' tree structure."""
        if not self.param_fields or treedef.kind == "list":
            return state
        fields = {f: tree.unflatten(treedef, getattr(state, f)) for f in self.param_fields if len(getattr(state, f))}
        return state._replace(**fields)

    def _flat_state(self, state: Any, params: list[Array], treedef: tree.TreeDef) -> tuple[Any, dict]:
        """The state with flat per-parameter fields (checks that it is this method's and matches the params),
        and those fields as ``{name: flat list}``."""
        name = type(self).__name__
        if self.state_type is not None and not isinstance(state, self.state_type):
            raise TypeError(f"{name}.step got a {type(state).__name__} as its state; a {name} needs the "
                            f"{self.state_type.__name__} made by {name}(...).init(params)")
        fields = {}
        for f in self.param_fields:
            value = getattr(state, f)
            if isinstance(value, list) and not value:
                continue
            flat, td = tree.flatten(value, what=f"state.{f}")
            if td != treedef:
                raise ValueError(f"state.{f} has the structure {td.describe()} but params have {treedef.describe()};"
                                 f" the state was made for other params")
            check_same_structure(f"state.{f}", flat, params)
            fields[f] = flat
        return (state._replace(**fields) if fields else state), fields

    # -- the non-finite guard ------------------------------------------------
    def _keep_finite(self, xp: Any, old: list[Array], old_state: Any, new: list[Array], new_state: Any,
                     info: dict, model: Model | None, running: Any, inputs: Callable[[], list]
                     ) -> tuple[list[Array], Any, dict]:
        """Raise (eager, ``validate``) or select the old params and state when the step is not finite.

        Eagerly with ``validate`` this is the step's one value check, one fused
        reduction over the new params and the loss: a non-finite input (x, y,
        params, state) or a bad label makes them non-finite, and only then are
        the inputs and the deferred checks run one by one, to name the problem.
        """
        finite = all_finite([*new, info["loss"]])
        info["finite"] = finite
        if self.validate:
            known = concrete_bool(finite)
            if known is True:
                return new, new_state, info
            if known is False:
                self._name_bad_input(running, inputs)
                raise FloatingPointError(self._not_finite_message(new, info["loss"], model))

        def select(n: Any, o: Any) -> Any:
            return xp.where(finite, n, o) if hasattr(n, "shape") and hasattr(o, "shape") else n

        return [select(n, o) for n, o in zip(new, old)], tree.map_leaves(select, new_state, old_state), info

    def _name_bad_input(self, running: Any, inputs: Callable[[], list]) -> None:
        """After a failed step: ``ValueError`` naming a non-finite input or a bad label, if there is one."""
        with method_errors(type(self).__name__):
            check_named_finite(inputs())
            running.run_deferred()

    def _not_finite_message(self, new: list[Array], loss_value: Array, model: Model | None) -> str:
        """Which quantity of a non-finite step is bad (the loss, the update of which parameter tensors)."""
        names = _param_names(model, new)
        bad = [names[i] for i, p in enumerate(new) if concrete_bool(all_finite([p])) is False]
        parts = []
        if concrete_bool(all_finite([loss_value])) is False:
            parts.append(f"the loss before the step is {float(loss_value)!r} (the model output or the loss "
                         "overflowed: check the data and the targets' scale)")
        if bad:
            parts.append(f"the update of {', '.join(bad)} is NaN or Inf (the direction overflowed or a solve "
                         "was singular: check the damping)")
        return f"{type(self).__name__}: the step is not finite: {'; '.join(parts)}; the params are left unchanged"


def _param_names(model: Model | None, params: Sequence[Array]) -> list[str]:
    """Readable names of the parameter tensors for messages: the model's ``names``, else
    ``params[i] (<layer> weight|bias)`` from its layer structure where it has one."""
    names = getattr(model, "names", None)
    if names is not None and len(names) == len(params):
        return list(names)
    labels = [f"params[{i}]" for i in range(len(params))]
    try:
        specs = layer_specs(model, params)
    except Exception:  # no layer structure (only a message is being built): indices only
        return labels
    for s in specs:
        labels[s.weight] += f" ({s.name or s.kind} weight)"
        if s.bias is not None:
            labels[s.bias] += f" ({s.name or s.kind} bias)"
    return labels


def init_state(method: Any, params: Any, model: Model | None = None) -> Any:
    """``method.init(params, model)``, or ``method.init(params)`` for a method whose ``init`` takes no model.

    The wrappers (torch ``Optimizer``, ``jit_step``, ``as_optax``) call this,
    so user methods written against the older ``init(params)`` keep working.
    """
    try:
        takes_model = len(inspect.signature(method.init).parameters) >= 2
    except (TypeError, ValueError):  # pragma: no cover - builtins
        takes_model = True
    return method.init(params, model) if takes_model else method.init(params)


# ---------------------------------------------------------------------------
# helpers for the methods
# ---------------------------------------------------------------------------


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def value_and_grad(model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array) -> tuple[Array, list[Array], Array]:
    """One forward and one VJP: ``(L, g, out)`` with ``g = J^T dL/df``."""
    out, pullback = model.vjp(params, x)
    fused = getattr(loss, "value_and_grad", None)  # one check and one softmax (user losses may lack it)
    value, grad = fused(out, y) if fused is not None else (loss.value(out, y), loss.grad(out, y))
    return value, pullback(grad), out


def loss_and_records(model: LayerModel, loss: Loss, params: Sequence[Array], x: Array, y: Array) -> tuple[Array, list]:
    """One forward + one backward: ``(L, records)`` with ``g = dL/dz`` of the batch-mean loss (MLP layers)."""
    recs = model.layers(params, x, lambda out: loss.grad(out, y))
    return loss.value(recs[-1].h, y), recs


def check_grads_finite(grads: Sequence[Array], validate: bool, what: str | Sequence[str] = "gradient") -> None:
    """Raise ``FloatingPointError`` naming the running method and the first non-finite array if the
    gradient overflowed (``what``: a name for the list, or one name per array).

    Inside a step the check is deferred (:func:`~curvcore._checks.check_later`): a non-finite gradient
    makes the step's result non-finite (or a solve raise), and only then does this check run and name it,
    so a validated step keeps its one host sync. Outside a step it runs at once.
    """
    if validate:
        check_later(lambda: _raise_if_not_finite(grads, what))


def _raise_if_not_finite(grads: Sequence[Array], what: str | Sequence[str]) -> None:
    names = [f"{what}[{i}]" for i in range(len(grads))] if isinstance(what, str) else list(what)
    bad = first_not_finite(list(zip(names, grads)))
    if bad is None:
        return
    method = step_method()
    raise FloatingPointError(f"{method + ': ' if method else ''}{bad} contains NaN or Inf (the loss or the model "
                             "overflowed)")


def descend(loss_value: Array, params: Sequence[Array], direction: Sequence[Array], lr: float,
            **extra: Array) -> tuple[list[Array], dict[str, Array]]:
    """``params - lr direction`` and the common ``info`` (``step_norm = lr ||direction||``): one fused
    operation each on backends that register them, no separate ``delta`` list."""
    return tree_axpy(-lr, direction, params), {"loss": loss_value, "step_norm": lr * tree_norm(direction), **extra}


def step_info(loss_value: Array, delta: Sequence[Array], **extra: Array) -> dict[str, Array]:
    """The common ``info`` entries: ``loss`` before the step and ``step_norm = ||delta||``."""
    return {"loss": loss_value, "step_norm": tree_norm(delta), **extra}


def zero_count(params: Sequence[Array]) -> Array:
    """A 0-d integer step counter on the params' device (jit-stable state)."""
    return array_namespace(params[0]).asarray(0, device=device(params[0]))


def count_as_float(count: Array, like: Array) -> Array:
    """The counter cast to the dtype of ``like`` (for bias corrections like ``1 - beta**t``)."""
    return array_namespace(like).astype(count, like.dtype)


# ---------------------------------------------------------------------------
# layer-wise methods: which layers are preconditioned, the rest a gradient step
# ---------------------------------------------------------------------------


class LayerwiseMethod(Method):
    """Base of the methods that precondition whole layers (K-FAC, ACP, CenteredSGD, ESN, MK).

    ``preconditions`` names the layer kinds the method preconditions
    (``"dense"``, ``"conv2d"``); ``chain=True`` keeps only the output chain of
    dense layers (ESN, MK). Every other parameter takes the plain gradient
    step ``-lr g``; ``info["n_preconditioned"]`` counts the preconditioned
    tensors, a warning lists the others once, and ``strict=True`` raises
    instead.
    """

    needs = (LAYERS,)
    preconditions: tuple[str, ...] = ("dense",)
    chain: bool = False
    strict: bool = False
    lr: float

    def layer_candidates(self, params: Sequence[Array], model: Model | None) -> list[LayerSpec]:
        """The layers of the model this method can precondition (kind and a bias), in spec order.

        Raises:
            ValueError: no model and params that are not a plain MLP; with
                ``strict``, a parameter that no candidate layer owns.
        """
        specs = layer_specs(model, params)
        kept = [s for s in specs if s.kind in self.preconditions and s.bias is not None]
        if self.strict:
            self._check_strict(params, model, kept, "is not in a layer it preconditions")
        if not kept:
            raise ValueError(f"{type(self).__name__}: the model has no {' or '.join(self.preconditions)} layer "
                             "with a bias to precondition; use a method that needs no layers (CurveBall, "
                             "PseudoHessian, SGD, Adam)")
        return kept

    def _check_strict(self, params: Sequence[Array], model: Model | None, kept: Sequence[LayerSpec], why: str) -> None:
        rest = self._others(params, model, kept)
        if rest:
            raise ValueError(f"{type(self).__name__}(strict=True): {', '.join(rest)} {why} "
                             f"({' and '.join(self.preconditions)} layers"
                             f"{', output chain' if self.chain else ''}); it would take a plain gradient step")

    def _others(self, params: Sequence[Array], model: Model | None, kept: Sequence[LayerSpec]) -> list[str]:
        owned = {i for s in kept for i in s.tensors()}
        names = getattr(model, "names", None) or [f"params[{i}]" for i in range(len(params))]
        return [names[i] for i in range(len(params)) if i not in owned]

    def record(self, model: LayerModel | RecordsModel, loss: Loss, params: Sequence[Array], x: Array, y: Array,
               specs: Sequence[LayerSpec]) -> tuple[Array, Records]:
        """One recorded pass with the loss gradient as cotangent: ``(L, records)``; checks coverage."""
        rec = records(model, params, x, lambda out: loss.grad(out, y), specs, chain=self.chain)
        if current().distributed:  # only the gradients of the parameters taking a plain step are needed
            owned = {i for s in rec.specs for i in s.tensors()}
            rest = [i for i in range(len(params)) if i not in owned]
            summed = dict(zip(rest, param_sums([rec.grads[i] for i in rest]))) if rest else {}
            rec = rec._replace(grads=[summed.get(i, g) for i, g in enumerate(rec.grads)])
        if self.strict:
            self._check_strict(params, model, rec.specs, "is not preconditioned in this pass")
        elif not getattr(self, "_warned", False):
            rest = self._others(params, model, rec.specs)
            if rest:
                warnings.warn(f"{type(self).__name__} preconditions {len(params) - len(rest)} of {len(params)} "
                              f"parameter tensors; these take a plain gradient step: {', '.join(rest)}",
                              stacklevel=4)
            self._warned = True
        return loss.value(rec.out, y), rec

    def assemble(self, params: Sequence[Array], grads: Sequence[Array], deltas: dict[int, Array]) -> list[Array]:
        """New params: ``params + deltas[i]`` where given, ``params - lr grads`` elsewhere."""
        return [p + deltas[i] if i in deltas else p - self.lr * grads[i] for i, p in enumerate(params)]

    @staticmethod
    def all_deltas(params: Sequence[Array], grads: Sequence[Array], deltas: dict[int, Array], lr: float) -> list[Array]:
        """Every update as a list (the plain ``-lr g`` where no layer delta is given), for ``step_norm``."""
        return [deltas[i] if i in deltas else -lr * grads[i] for i in range(len(grads))]


def n_preconditioned(xp: Any, rec: Records, like: Array) -> Array:
    """``info["n_preconditioned"]``: the number of params tensors in recorded layers (0-d, dtype of ``like``)."""
    return xp.asarray(float(sum(len(s.tensors()) for s in rec.specs)), dtype=like.dtype, device=device(like))
