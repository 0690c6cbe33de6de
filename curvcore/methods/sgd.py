"""Stochastic gradient descent with (heavy-ball or Nesterov) momentum: the baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .._checks import check_interval, check_nonnegative, check_positive
from ..protocol import Array, Loss, Model
from ..tree_algebra import tree_axpy, tree_norm, tree_zeros_like
from ._base import Method, descend, value_and_grad, zero_count
from ._registry import register


class SGDState(NamedTuple):
    """Momentum buffer ``v`` (like params) and the step counter (0-d int array)."""

    v: list
    count: Any


class SGD(Method):
    """SGD with momentum: ``v <- momentum v + g + wd theta``, ``theta <- theta - lr v``.

    With ``nesterov=True`` the step uses ``g + momentum v`` (PyTorch's form).
    Cost: one forward and one VJP.

    Args:
        lr: learning rate > 0.
        momentum: heavy-ball coefficient in [0, 1).
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient >= 0 added to the gradient.
    """

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        check_positive("lr", lr)
        check_interval("momentum", momentum, 0.0, 1.0, "[)")
        check_nonnegative("weight_decay", weight_decay)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.lr, self.momentum, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay

    state_type = SGDState
    param_fields = ("v",)

    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> SGDState:
        """Zero momentum, count 0."""
        return SGDState(v=tree_zeros_like(params), count=zero_count(params))

    def flat_step(self, model: Model, loss: Loss, params: Sequence[Array], state: SGDState, x: Array, y: Array):
        """One SGD step; ``info``: ``loss``, ``step_norm``, ``grad_norm``."""
        value, g, _ = value_and_grad(model, loss, params, x, y)
        if self.weight_decay:
            g = tree_axpy(self.weight_decay, params, g)
        v = tree_axpy(self.momentum, state.v, g) if self.momentum else g
        direction = tree_axpy(self.momentum, v, g) if self.nesterov else v
        new, info = descend(value, params, direction, self.lr, grad_norm=tree_norm(g))
        return new, SGDState(v=v if self.momentum else state.v, count=state.count + 1), info


register("sgd", SGD, compare={"lr": 0.1, "momentum": 0.9}, test={"lr": 0.1, "momentum": 0.9},
         description="SGD with momentum (baseline)",
         tune={"lr": [0.01, 0.03, 0.1, 0.3], "momentum": [0.0, 0.9]})
