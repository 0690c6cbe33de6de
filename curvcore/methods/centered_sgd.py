"""Centered gradient descent (T. George, MSc thesis, 2017, §6.3.1, Alg 3). Spec: ``shared/spec/acp.md`` §5."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from ..protocol import Array
from ._base import Method, check_grads_finite, step_info, zero_count
from ._registry import register
from ._base import loss_and_records
from .acp import centered_gradient, method_errors
from .._checks import check_positive


class CenteredSGDState(NamedTuple):
    """The step counter (0-d int array); the method keeps no other state."""

    count: Any


class CenteredSGD(Method):
    """Centered gradient descent: the centering part of ACP alone (Alg 3).

    Per dense layer, with the minibatch input mean ``a_bar``::

        dW = -lr g^T (a - a_bar)          db = -lr sum_i g_i   (- dW a_bar if bias_correction)

    Alg 3 has no bias correction; ``bias_correction=True`` adds ``-dW a_bar``,
    which is ACP with ``C := I``, ``alpha = 1``, ``eps = 0`` and restores exact
    input-shift invariance. When a layer's input has zero batch mean the step
    equals SGD's. Cost: one forward + one backward (``model.layers``).

    Args:
        lr: learning rate > 0.
        bias_correction: add ``-dW a_bar`` to the bias update.

    Raises:
        ValueError: invalid hyperparameters.
    """

    needs = ("layers",)

    def __init__(self, lr: float = 0.1, bias_correction: bool = False):
        check_positive("lr", lr)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be True or False, got {bias_correction!r}")
        self.lr, self.bias_correction = lr, bias_correction

    def init(self, params: Sequence[Array]) -> CenteredSGDState:
        """Count 0."""
        return CenteredSGDState(count=zero_count(params))

    def step(self, model: Any, loss: Any, params: Sequence[Array], state: CenteredSGDState, x: Array,
             y: Array) -> tuple[list[Array], CenteredSGDState, dict[str, Array]]:
        """One centered step; returns ``(params, state, info)`` with ``loss`` (before), ``step_norm``.

        Raises:
            ValueError: bad shapes or NaN/Inf in the batch.
            TypeError: mixed libraries or dtypes.
            FloatingPointError: the layer gradients overflowed.
        """
        with method_errors("CenteredSGD"):
            xp = self._check_inputs(model, params, x, y)
        value, recs = loss_and_records(model, loss, params, x, y)
        with method_errors("CenteredSGD"):
            check_grads_finite([r.g for r in recs], self.validate)
        deltas = []
        for rec in recs:
            a_bar, G_hat, g_hat = centered_gradient(rec)
            dW = -self.lr * G_hat
            db = -self.lr * g_hat
            if self.bias_correction:
                db = db - xp.matmul(dW, a_bar)
            deltas += [dW, db]
        new_params = [p + d for p, d in zip(params, deltas)]
        return new_params, CenteredSGDState(count=state.count + 1), step_info(value, deltas)


register(
    "centered_sgd", CenteredSGD,
    compare={"lr": 1.0},
    test={"lr": 0.1},
    description="centered gradient descent (George 2017, Alg 3): the centering part of ACP",
)
