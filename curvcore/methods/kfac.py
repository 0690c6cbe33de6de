"""K-FAC, simplest block-diagonal form (Martens & Grosse 2015; thesis §6.4.1). Spec: ``shared/spec/acp.md`` §5."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from .._control import cond
from .._linalg import inv_psd
from .._reduce import batch_gram, batch_size, batch_sum
from ..protocol import Array
from ._base import Method, check_grads_finite, step_info, zero_count
from ._registry import register
from ._base import loss_and_records
from .acp import check_layer_state, concrete_count, method_errors

FISHERS = ("empirical", "mc")


class KFACState(NamedTuple):
    """``count`` (0-d int) and per layer the damped inverse factors from the last refresh:
    ``A_inv`` ``(n_in+1, n_in+1)`` and ``G_inv`` ``(n_out, n_out)``."""

    count: Any
    A_inv: list
    G_inv: list


class KFAC(Method):
    """Block-diagonal K-FAC with two Kronecker factors per dense layer.

    On the augmented ``[W b]`` (n_out, n_in+1), with ``a1_i = (a_i; 1)`` and the
    per-example output gradient ``delta_i = B g_i``::

        A = 1/B sum_i a1_i a1_i^T          G = 1/B sum_i delta_i delta_i^T = B g^T g
        [dW db] = -lr (G + sqrt(damping) I)^-1 [g^T a, sum_i g_i] (A + sqrt(damping) I)^-1

    i.e. ``-lr ((G + sqrt(d) I) kron (A + sqrt(d) I))^-1 vec_row(grad)``
    (factored damping with pi = 1, ours: the thesis gives none). The factors and
    their inverses are recomputed when ``count % refresh_every == 0`` on the
    update minibatch and kept in the state otherwise; the inverses use a
    Cholesky solve (:func:`curvcore._linalg.inv_psd`).

    ``fisher="empirical"``: ``delta`` from the true labels (deterministic; for
    one-hot CE thesis eq 3.4.1). ``fisher="mc"``: ``delta`` from one target per
    example sampled from the model, drawn with NumPy from
    ``numpy.random.default_rng([seed, count])`` so every backend sees the same
    draws: MSE ``y~ = f + rng.standard_normal((B, C))``; CE ``u = rng.random(B)``,
    ``y~_i = #{c : cumsum(softmax(f_i))_c < u_i}``. The draw needs a concrete
    step count, so ``fisher="mc"`` is not ``jax.jit``-able (a ``TypeError`` says
    so); ``"empirical"`` is.

    Cost per step: one forward + one backward, ``O(n_out^2 n_in + n_out n_in^2)``
    per layer; a refresh adds two Cholesky inverses per layer and, for ``"mc"``,
    one more forward + backward.

    Args:
        lr: learning rate > 0.
        damping: >= 0; ``sqrt(damping)`` is added to each factor's diagonal.
        refresh_every: recompute factors and inverses every this many steps (int >= 1).
        fisher: ``"empirical"`` or ``"mc"``.
        seed: int >= 0 for the MC draws.

    Raises:
        ValueError: invalid hyperparameters.
    """

    needs = ("layers",)

    def __init__(self, lr: float = 0.1, damping: float = 1e-2, refresh_every: int = 1, fisher: str = "empirical",
                 seed: int = 0):
        check_positive("lr", lr)
        check_nonnegative("damping", damping)
        check_int("refresh_every", refresh_every, 1)
        check_choice("fisher", fisher, FISHERS)
        check_int("seed", seed, 0)
        self.lr, self.damping, self.refresh_every, self.fisher, self.seed = lr, damping, refresh_every, fisher, seed

    def init(self, params: Sequence[Array]) -> KFACState:
        """Count 0 (the first step computes the factors), identity inverses."""
        xp = array_namespace(*params)
        A_inv, G_inv = [], []
        for W in params[0::2]:
            n_out, n_in = W.shape
            A_inv.append(xp.eye(n_in + 1, dtype=W.dtype, device=device(W)))
            G_inv.append(xp.eye(n_out, dtype=W.dtype, device=device(W)))
        return KFACState(count=zero_count(params), A_inv=A_inv, G_inv=G_inv)

    def step(self, model: Any, loss: Any, params: Sequence[Array], state: KFACState, x: Array,
             y: Array) -> tuple[list[Array], KFACState, dict[str, Array]]:
        """One K-FAC update; ``info``: ``loss`` (before), ``step_norm``, ``refreshed`` (1.0/0.0).

        Raises:
            ValueError: bad shapes, NaN/Inf in the batch, a factor that is not
                positive definite (damping 0).
            TypeError: mixed libraries or dtypes; ``fisher="mc"`` inside ``jax.jit``.
            FloatingPointError: the layer gradients overflowed.
        """
        with method_errors("KFAC"):
            xp = self._check_inputs(model, params, x, y)
            check_layer_state("A_inv", state.A_inv, [(W.shape[1] + 1,) * 2 for W in params[0::2]])
            check_layer_state("G_inv", state.G_inv, [(W.shape[0],) * 2 for W in params[0::2]])
        value, recs = loss_and_records(model, loss, params, x, y)
        with method_errors("KFAC"):
            check_grads_finite([r.g for r in recs], self.validate)

        def refresh(*_: Any) -> tuple[list, list, Array]:
            stat = recs if self.fisher == "empirical" else model.layers(
                params, x, self._mc_cotangent(loss, state.count))
            A_inv, G_inv = [], []
            for k, (rec, srec) in enumerate(zip(recs, stat)):
                A, G = self._factors(xp, rec.a, srec.g)
                with method_errors("KFAC"):
                    A_inv.append(inv_psd(A, f"the damped input factor A + sqrt(damping) I of layer {k}"))
                    G_inv.append(inv_psd(G, f"the damped gradient factor G + sqrt(damping) I of layer {k}"))
            return A_inv, G_inv, xp.asarray(1.0, dtype=params[0].dtype, device=device(params[0]))

        def keep(A_inv: list, G_inv: list) -> tuple[list, list, Array]:
            return list(A_inv), list(G_inv), xp.asarray(0.0, dtype=params[0].dtype, device=device(params[0]))

        A_inv, G_inv, refreshed = cond(state.count % self.refresh_every == 0, refresh, keep,
                                       state.A_inv, state.G_inv)
        deltas = []
        for rec, Ai, Gi in zip(recs, A_inv, G_inv):
            grad = xp.concat([batch_gram(rec.g, rec.a), batch_sum(rec.g)[:, None]], axis=1)
            D = -self.lr * xp.matmul(xp.matmul(Gi, grad), Ai)
            n_in = rec.a.shape[1]
            deltas += [D[:, :n_in], D[:, n_in]]
        info = step_info(value, deltas, refreshed=refreshed)
        new_params = [p + d for p, d in zip(params, deltas)]
        return new_params, KFACState(count=state.count + 1, A_inv=A_inv, G_inv=G_inv), info

    def _factors(self, xp: Any, a: Array, g: Array) -> tuple[Array, Array]:
        """Damped ``A + sqrt(d) I`` (from inputs ``a``) and ``G + sqrt(d) I`` (from ``g = dL/dz``)."""
        B, root = batch_size(a), math.sqrt(self.damping)
        a1 = xp.concat([a, xp.ones((B, 1), dtype=a.dtype, device=device(a))], axis=1)
        A = batch_gram(a1, a1) / B + root * xp.eye(a1.shape[1], dtype=a.dtype, device=device(a))
        G = B * batch_gram(g, g) + root * xp.eye(g.shape[1], dtype=g.dtype, device=device(g))
        return A, G

    def _mc_cotangent(self, loss: Any, count: Array) -> Any:
        """The output cotangent ``dL/df`` at targets sampled from the model (see the class docstring)."""
        c = concrete_count("KFAC", count, "fisher='mc' (NumPy draws from default_rng([seed, count]))")
        rng = importlib.import_module("numpy").random.default_rng([self.seed, c])
        name = getattr(loss, "name", None)
        if name not in ("mse", "ce"):
            raise ValueError(f"KFAC: fisher='mc' supports the losses 'mse' and 'ce', got {loss!r}")

        def cotangent(out: Array) -> Array:
            xp = array_namespace(out)
            B, C = out.shape
            if name == "mse":
                noise = xp.asarray(rng.standard_normal((B, C)), dtype=out.dtype, device=device(out))
                return loss.grad(out, out + noise)
            u = xp.asarray(rng.random((B, 1)), dtype=out.dtype, device=device(out))
            below = xp.astype(xp.cumulative_sum(loss.softmax(out), axis=1) < u, xp.int64)
            labels = xp.minimum(xp.sum(below, axis=1), xp.asarray(C - 1, dtype=xp.int64, device=device(out)))
            return loss.grad(out, labels)

        return cotangent


register(
    "kfac", KFAC,
    compare={"lr": 0.3, "damping": 1e-2, "refresh_every": 1},
    test={"lr": 0.1, "damping": 1e-2, "refresh_every": 2},
    description="K-FAC, block-diagonal, two Kronecker factors per layer (Martens & Grosse 2015)",
)
