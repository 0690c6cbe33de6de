"""Centered gradient descent (T. George, MSc thesis, 2017, §6.3.1, Alg 3): the centring part of ACP alone.

A member of the Kronecker-factored family (:mod:`.kronecker`): ACP with the
input covariance replaced by ``I``, ``α = 1`` and ``ε = 0``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .._checks import check_positive
from ..protocol import Array, LayerRecord
from . import kronecker as kr
from ._base import check_flag
from ._registry import register


class CenteredSGDState(NamedTuple):
    """The step counter (0-d int array); the method keeps no other state."""

    count: Any


class CenteredSGD(kr.KroneckerMethod):
    """Centered gradient descent: the centering part of ACP alone (Alg 3).

    Per dense layer, with the minibatch input mean ``a_bar``::

        dW = -lr g^T (a - a_bar)          db = -lr sum_i g_i   (- dW a_bar if bias_correction)

    Alg 3 has no bias correction; ``bias_correction=True`` adds ``-dW a_bar``,
    which is ACP with ``C := I``, ``alpha = 1``, ``eps = 0`` and restores exact
    input-shift invariance. When a layer's input has zero batch mean the step
    equals SGD's. Every parameter outside a dense layer takes the SGD step.
    Cost: one forward + one backward (the layer records).

    Args:
        lr: learning rate > 0 (default 1, tuned: the best grid point on the digits MLP and CNN).
        bias_correction: add ``-dW a_bar`` to the bias update.
        strict: raise instead of taking an SGD step on parameters outside dense layers.

    Raises:
        ValueError: invalid hyperparameters.
    """

    preconditions = ("dense",)
    state_type = CenteredSGDState

    def __init__(self, lr: float = 1.0, bias_correction: bool = False, strict: bool = False):
        check_positive("lr", lr)
        self.lr, self.bias_correction = lr, check_flag("bias_correction", bias_correction)
        self.strict = check_flag("strict", strict)

    def layer_step(self, xp: Any, k: int, rec: LayerRecord, grad: kr.LayerGradient,
                   factors: dict[str, Array]) -> tuple[Array, dict]:
        """``ΔW = -lr Ĝ``, ``Δb = -lr ĝ`` (``- ΔW ā`` with ``bias_correction``), joined as ``[ΔW Δb]``."""
        a_bar, G_hat, g_hat = kr.centered_gradient(rec, grad)
        dW, db = kr.centered_step(self.lr, G_hat, g_hat, a_bar, 1.0, None, self.bias_correction)
        return xp.concat([dW, db[:, None]], axis=1), {}


register(
    "centered_sgd", CenteredSGD,
    compare={"lr": 1.0},
    test={"lr": 0.1},
    description="centered gradient descent (George 2017, Alg 3): the centering part of ACP",
    tune={"lr": [0.03, 0.1, 0.3, 1.0, 3.0]},
)
