"""Adam (Kingma & Ba 2015): the adaptive first-order baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .._checks import check_interval, check_nonnegative, check_positive
from ..protocol import Array, Loss, Model
from ..tree_algebra import tree_zeros_like
from ._base import Method, count_as_float, descend, value_and_grad, zero_count
from ._ema import adam_direction
from ._registry import register


class AdamState(NamedTuple):
    """First and second moment estimates (like params) and the step counter."""

    m: list
    v: list
    count: Any


class Adam(Method):
    """Adam: ``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``,
    ``theta <- theta - lr mhat / (sqrt(vhat) + eps)`` with bias-corrected
    ``mhat = m/(1-b1^t)``, ``vhat = v/(1-b2^t)``. Cost: one forward, one VJP.

    Args:
        lr: learning rate > 0.
        betas: ``(b1, b2)``, each in [0, 1).
        eps: denominator offset > 0.
    """

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        check_positive("lr", lr)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
        check_interval("betas[0]", betas[0], 0.0, 1.0, "[)")
        check_interval("betas[1]", betas[1], 0.0, 1.0, "[)")
        check_nonnegative("eps", eps)
        self.lr, self.betas, self.eps = lr, tuple(betas), eps

    state_type = AdamState
    param_fields = ("m", "v")

    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> AdamState:
        """Zero moments, count 0."""
        return AdamState(m=tree_zeros_like(params), v=tree_zeros_like(params), count=zero_count(params))

    def flat_step(self, model: Model, loss: Loss, params: Sequence[Array], state: AdamState, x: Array, y: Array):
        """One Adam step; ``info``: ``loss``, ``step_norm``."""
        value, g, _ = value_and_grad(model, loss, params, x, y)
        count = state.count + 1
        u, m, v = adam_direction(g, state.m, state.v, self.betas, self.eps, count_as_float(count, params[0]))
        new, info = descend(value, params, u, self.lr)
        return new, AdamState(m=m, v=v, count=count), info


register("adam", Adam, compare={"lr": 1e-2}, test={"lr": 1e-2}, description="Adam (baseline)",
         tune={"lr": [1e-3, 3e-3, 1e-2, 3e-2]})
