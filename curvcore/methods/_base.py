"""What every method shares: the first-order pass, input checks, state checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace, device

from .._checks import check_batch, check_same_structure, check_tree_finite
from ..protocol import Array, tree_norm


class Method:
    """Base of curvcore methods: ``init(params) -> state`` and
    ``step(model, loss, params, state, x, y) -> (params, state, info)``.

    Methods are pure: ``step`` returns new lists and a new state and never
    mutates its arguments. ``info`` is a dict of 0-d arrays (call ``float`` at
    the edge; inside ``jax.jit`` they stay traced).

    Attributes:
        validate: check batches and params for NaN/Inf, shapes and libraries
            on every step (default True). Set it to False in benchmarks; the
            checks force a device sync.
        needs: protocol primitives the method uses beyond forward/jvp/vjp
            (``"layers"``, ``"jet"``); the CLI and the test suite read it.
    """

    validate: bool = True
    needs: tuple[str, ...] = ()

    def init(self, params: Sequence[Array]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, model: Any, loss: Any, params: Sequence[Array], state: Any, x: Array, y: Array, **kwargs: Any):  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses ------------------------------------------
    def _check_inputs(self, model: Any, params: Sequence[Array], x: Array, y: Array) -> Any:
        """Validate the batch; return the namespace."""
        for need in self.needs:
            if not callable(getattr(model, need, None)):
                raise TypeError(
                    f"{type(self).__name__} needs model.{need}(...); {type(model).__name__} does not provide it"
                )
        return check_batch(params, x, y, validate=self.validate)

    def _check_state_tree(self, name: str, tree: Sequence[Array], params: Sequence[Array]) -> None:
        check_same_structure(name, tree, params)


def value_and_grad(model: Any, loss: Any, params: Sequence[Array], x: Array, y: Array) -> tuple[Array, list[Array], Array]:
    """One forward and one VJP: ``(L, g, out)`` with ``g = J^T dL/df``."""
    out, pullback = model.vjp(params, x)
    return loss.value(out, y), pullback(loss.grad(out, y)), out


def loss_and_records(model: Any, loss: Any, params: Sequence[Array], x: Array, y: Array) -> tuple[Array, list]:
    """One forward + one backward: ``(L, records)`` with ``g = dL/dz`` of the batch-mean loss."""
    recs = model.layers(params, x, lambda out: loss.grad(out, y))
    return loss.value(recs[-1].h, y), recs


def check_grads_finite(grads: Sequence[Array], validate: bool) -> None:
    """Raise ``FloatingPointError`` if the gradient overflowed."""
    if validate:
        try:
            check_tree_finite("gradient", grads)
        except ValueError as err:
            raise FloatingPointError(f"{err} (the loss or the model overflowed)") from None


def step_info(loss_value: Array, delta: Sequence[Array], **extra: Array) -> dict[str, Array]:
    """The common ``info`` entries: ``loss`` before the step and ``step_norm = ||delta||``."""
    return {"loss": loss_value, "step_norm": tree_norm(delta), **extra}


def zero_count(params: Sequence[Array]) -> Array:
    """A 0-d integer step counter on the params' device (jit-stable state)."""
    return array_namespace(params[0]).asarray(0, device=device(params[0]))


def count_as_float(count: Array, like: Array) -> Array:
    """The counter cast to the dtype of ``like`` (for bias corrections like ``1 - beta**t``)."""
    return array_namespace(like).astype(count, like.dtype)
