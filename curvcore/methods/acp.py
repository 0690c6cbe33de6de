"""ACP: the amortized covariance preconditioner (T. George, MSc thesis, 2017, ch. 6, Alg 4).

A member of the Kronecker-factored family (:mod:`._kronecker`): K-FAC with the
output factor replaced by ``α I``, the input covariance whitened and the
gradient centred (thesis eqs 6.2.3-6.2.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import device

from .._namespace import array_namespace

from .._checks import check_finite, check_int, check_nonnegative, check_positive, check_shapes, concrete_bool, namespace
from ..layers import records
from ..protocol import Array, LayerRecord
from . import _kronecker as kr
from ._base import (LayerwiseMethod, check_flag, check_grads_finite, method_errors, n_preconditioned, step_info,
                    zero_count)
from ._registry import register


def check_extra_batch(name: str, params: Sequence[Array], x: Array, extra: Array, validate: bool) -> None:
    """A second input batch (``cov_batch``) must match ``x`` in library, sample shape and dtype, and be finite.

    Raises:
        TypeError: other library or dtype.
        ValueError: an empty batch, another sample shape, NaN/Inf.
    """
    namespace(params[0], extra, what=f"params and {name}")
    if extra.ndim != x.ndim or extra.shape[0] < 1:
        like = "a 2-d batch (B_c, n_in)" if x.ndim == 2 else f"a batch (B_c, ...) like x {tuple(x.shape)}"
        raise ValueError(f"{name} must be {like} of inputs, got shape {tuple(extra.shape)}")
    if tuple(extra.shape[1:]) != tuple(x.shape[1:]):
        what = (f"{extra.shape[1]} features but x has {x.shape[1]}" if x.ndim == 2 else
                f"samples of shape {tuple(extra.shape[1:])} but x has {tuple(x.shape[1:])}")
        raise ValueError(f"{name} has {what}")
    if extra.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but {name} is {extra.dtype}")
    if validate:
        check_finite(name, extra)


class ACPState(NamedTuple):
    """``count`` (completed updates, 0-d int) and, per layer k, the eigendecomposition
    ``C_k = U_k diag(s_k) U_k^T`` of the input covariance from the last refresh and the
    statistics-batch mean ``mu_k`` (for inspection). Memory ``sum_k n_in^2``."""

    count: Any
    s: list
    U: list
    mu: list


class ACP(LayerwiseMethod):
    """Amortized covariance preconditioner (thesis eqs 6.2.4, 6.2.5, §6.3.2, Alg 4).

    Per dense layer, with the update minibatch's input mean ``a_bar``, centered
    gradient ``G_hat = g^T (a - a_bar)``, ``g_hat = sum_i g_i`` and the stored
    ``C = U diag(s) U^T``::

        dW = -(lr/alpha) G_hat (C + (eps/alpha) I)^-1 = -lr (G_hat U) diag(1/(alpha s + eps)) U^T
        db = -(lr/alpha) g_hat - dW a_bar        (bias_correction=False: without -dW a_bar, Alg 4)

    This is ``-lr M^-1 grad`` for the damped block ``M = (alpha/B) sum_i J_i^T J_i +
    eps diag(1 on W, 0 on b)`` (thesis eq 6.2.3, damping on W only: erratum E3),
    i.e. K-FAC with the output factor replaced by ``alpha I``, and the minimiser of
    the local criterion of §6.1. ``alpha="adaptive"`` uses ``max_{i,j} (B g_ij)^2``
    per layer and minibatch (erratum E7: the per-example gradient is ``B g``); with
    ``alpha = 0`` (all gradients zero) the layer's step is zero.

    Amortization: when ``count % refresh_every == 0`` (before updates 0, N, 2N, ...)
    the covariance of every layer's inputs on ``cov_batch`` (else the update
    minibatch ``x``) at the current params is computed (biased, ``1/B_c``,
    erratum E5) and its eigendecomposition stored. Storing ``eigh(C)`` rather than
    Alg 4's ``inv(C + eps/alpha I)`` keeps adaptive alpha exact (erratum E4).
    The branch goes through :func:`curvcore._control.cond` on the counter, so the
    step is ``jax.jit``-able (``cov_batch=None`` vs an array traces twice).

    Cost per step: one forward + one backward (``model.layers``), plus
    ``O(n_out n_in^2)`` per layer; a refresh adds one forward + backward with a
    zero cotangent on ``cov_batch`` (none when it is ``None``) and one ``eigh``
    of ``n_in x n_in`` per layer.

    Args:
        lr: learning rate > 0.
        eps: Tikhonov damping >= 0; enters as ``eps/alpha`` on ``C``. ``eps=0`` needs
            a full-rank covariance.
        alpha: the output-curvature constant > 0, or ``"adaptive"``.
            ``(lr, alpha, eps)`` and ``(k lr, k alpha, k eps)`` give the same step.
        refresh_every: ``N`` of Alg 4, an int >= 1 (the thesis uses 100).
        bias_correction: include ``-dW a_bar`` in the bias update (eq 6.2.5,
            erratum E1); ``False`` reproduces Alg 4 line 13.

    Raises:
        ValueError: invalid hyperparameters.
    """

    preconditions = ("dense",)
    state_type = ACPState

    def __init__(self, lr: float = 0.1, eps: float = 1e-2, alpha: float | str = 1.0, refresh_every: int = 100,
                 bias_correction: bool = True, strict: bool = False):
        check_positive("lr", lr)
        check_nonnegative("eps", eps)
        if isinstance(alpha, str):
            if alpha != "adaptive":
                raise ValueError(f"alpha must be a number > 0 or 'adaptive', got {alpha!r}")
        else:
            check_positive("alpha", alpha)
        check_int("refresh_every", refresh_every, 1)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be True or False, got {bias_correction!r}")
        self.lr, self.eps, self.alpha = lr, eps, alpha
        self.refresh_every, self.bias_correction = refresh_every, bias_correction
        self.strict = check_flag("strict", strict)

    def init_flat(self, params: Sequence[Array], model: Any = None) -> ACPState:
        """Count 0 (the first step refreshes), ``s = 0``, ``U = I``, ``mu = 0`` per dense layer."""
        xp = array_namespace(*params)
        dt, dev = params[0].dtype, device(params[0])
        s, U, mu = [], [], []
        for spec in self.layer_candidates(params, model):
            n_in = kr.joint_dims(params, spec)[1]
            s.append(xp.zeros((n_in,), dtype=dt, device=dev))
            U.append(xp.eye(n_in, dtype=dt, device=dev))
            mu.append(xp.zeros((n_in,), dtype=dt, device=dev))
        return ACPState(count=zero_count(params), s=s, U=U, mu=mu)

    def needs_refresh(self, state: ACPState) -> bool:
        """Whether the next ``step`` refreshes the covariance (then pass ``cov_batch``).

        A Python bool; call it outside ``jax.jit``.
        """
        return kr.concrete_count("ACP", state.count, "needs_refresh") % self.refresh_every == 0

    def flat_step(self, model: Any, loss: Any, params: Sequence[Array], state: ACPState, x: Array, y: Array,
                  cov_batch: Array | None = None) -> tuple[list[Array], ACPState, dict[str, Array]]:
        """One ACP update.

        Args:
            x: update minibatch inputs; y: its targets.
            cov_batch: statistics-batch inputs ``(B_c, ...)`` (no labels), used only
                when a refresh is due (ignored, bitwise, otherwise). ``None`` at a
                refresh uses ``x`` (``info["cov_from_minibatch"] = 1``).

        Returns:
            ``(params, state, info)``; ``info``: ``loss`` (before the step),
            ``step_norm``, ``refreshed`` (1.0/0.0), ``cov_from_minibatch`` (1.0 when
            a refresh used ``x``), ``alpha_min``, ``alpha_max`` (over layers),
            ``count`` (the index of this update = ``state.count`` before it),
            ``n_preconditioned``.

        Raises:
            ValueError: bad shapes, NaN/Inf in cov_batch, singular ``alpha C + eps I``.
            TypeError: mixed libraries or dtypes.
            FloatingPointError: the layer gradients overflowed.
        """
        xp = array_namespace(params[0])
        specs = self.layer_candidates(params, model)
        with method_errors("ACP"):
            dims = kr.layer_state_shapes(params, specs, lambda o, d: (d,))
            check_shapes("state.s", state.s, dims, unit="layers")
            check_shapes("state.U", state.U, [(n, n) for (n,) in dims], unit="layers")
            check_shapes("state.mu", state.mu, dims, unit="layers")
            if cov_batch is not None:
                check_extra_batch("cov_batch", params, x, cov_batch, self.validate)
        value, rec = self.record(model, loss, params, x, y, specs)
        with method_errors("ACP"):
            check_grads_finite([r.g for r in rec.layers], self.validate)
        one, zero = kr.flag(xp, 1.0, params[0]), kr.flag(xp, 0.0, params[0])
        slot = {sp.weight: i for i, sp in enumerate(specs)}

        def refresh(*_: Any) -> tuple[list, list, list, Array]:
            src = rec if cov_batch is None else records(model, params, cov_batch,
                                                        lambda out: array_namespace(out).zeros_like(out), rec.specs)
            s, U, mu = list(state.s), list(state.U), list(state.mu)
            covs = [kr.input_covariance(r.a) for r in src.layers]
            eigs = kr.owned(lambda C, what: kr.covariance_eig(C), [(C, sp.describe()) for (C, _), sp in
                                                                     zip(covs, src.specs)],
                            lambda C: (C.shape[0] + 1, C.shape[1]))
            for sp, (_, m), Us in zip(src.specs, covs, eigs):
                i = slot[sp.weight]
                s[i], U[i], mu[i] = Us[-1, :], Us[:-1, :], m
            return s, U, mu, one

        def keep(s: list, U: list, mu: list) -> tuple[list, list, list, Array]:
            return list(s), list(U), list(mu), zero

        s, U, mu, refreshed = kr.refresh_every(state.count, self.refresh_every, refresh, keep,
                                               state.s, state.U, state.mu)
        deltas: dict[int, Array] = {}
        alphas = []
        for sp, r in zip(rec.specs, rec.layers):
            i = slot[sp.weight]
            dW, db, alpha = self._layer_step(xp, i, r, s[i], U[i])
            deltas.update(kr.split_joint(xp.concat([dW, db[:, None]], axis=1), sp, params))
            alphas.append(alpha)
        alpha_all = xp.stack(alphas)
        info = step_info(value, self.all_deltas(params, rec.grads, deltas, self.lr), refreshed=refreshed,
                         cov_from_minibatch=refreshed if cov_batch is None else zero,
                         alpha_min=xp.min(alpha_all), alpha_max=xp.max(alpha_all), count=state.count,
                         n_preconditioned=n_preconditioned(xp, rec, params[0]))
        return self.assemble(params, rec.grads, deltas), ACPState(count=state.count + 1, s=s, U=U, mu=mu), info

    def _layer_step(self, xp: Any, k: int, rec: LayerRecord, s: Array, U: Array) -> tuple[Array, Array, Array]:
        """``(dW, db, alpha)`` of one layer (spec §2)."""
        a_bar, G_hat, g_hat = kr.centered_gradient(rec)
        if self.alpha == "adaptive":
            alpha = kr.per_example_alpha(rec)
            positive = alpha > 0
            inv_alpha = xp.where(positive, 1 / xp.where(positive, alpha, xp.ones_like(alpha)),
                                 xp.zeros_like(alpha))
        else:
            alpha, positive = kr.flag(xp, self.alpha, s), None
            inv_alpha = 1 / self.alpha
        d = alpha * s + self.eps
        self._check_nonsingular(xp, k, d, positive)
        if positive is not None:  # alpha = 0 (all g = 0): G_hat = 0, avoid 0/0
            d = xp.where(positive, d, xp.ones_like(d))
        dW, db = kr.centered_step(self.lr, G_hat, g_hat, a_bar, inv_alpha,
                                  lambda G: xp.matmul(xp.matmul(G, U) / d, xp.matrix_transpose(U)),
                                  self.bias_correction)
        return dW, db, alpha

    def covariance_eigs(self, model: Any, params: Sequence[Array], x: Array) -> list[tuple[Array, Array, Array]]:
        """What a refresh stores for each preconditioned layer on inputs ``x``: ``(s, U, mu)``.

        One forward with a zero output cotangent gives the layer inputs; then per layer
        ``C = U diag(s) U^T``, the biased input covariance over rows, and its mean ``mu``.
        """
        rec = records(model, list(params), x, lambda out: array_namespace(out).zeros_like(out),
                      self.layer_candidates(list(params), model))
        return [kr.input_covariance_eig(r.a) for r in rec.layers]

    def _check_nonsingular(self, xp: Any, k: int, d: Array, positive: Array | None) -> None:
        """Raise unless ``min(alpha s + eps) > 1e-12 max(1, max(alpha s + eps))`` (skipped under jit)."""
        if not self.validate:
            return
        dmin = xp.min(d)
        bad = xp.logical_or(dmin <= 1e-12, dmin <= 1e-12 * xp.max(d))
        if positive is not None:
            bad = xp.logical_and(bad, positive)
        if concrete_bool(bad):
            raise ValueError(
                f"ACP: alpha*C + eps*I is singular (layer {k}, n_in = {d.shape[0]}): the input covariance "
                f"from the last refresh is rank-deficient (B_c samples give rank <= B_c - 1; constant inputs "
                f"give zero variance) and eps = {self.eps!r}; raise eps above 0 or refresh with a larger "
                f"cov_batch"
            )


register(
    "acp", ACP,
    compare={"lr": 1.0, "eps": 1e-1, "alpha": 1.0, "refresh_every": 20},  # standardised digits, tanh [64,32,10]
    test={"lr": 0.1, "eps": 1e-2, "alpha": 1.0, "refresh_every": 3},
    description="amortized covariance preconditioner (George 2017, ch. 6): centered, input-whitened steps",
    tune={"lr": [0.1, 0.3, 1.0], "eps": [1e-2, 1e-1, 1.0]},
)
