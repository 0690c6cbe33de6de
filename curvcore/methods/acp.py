"""ACP: the amortized covariance preconditioner (T. George, MSc thesis, 2017, ch. 6, Alg 4).

A member of the Kronecker-factored family (:mod:`.kronecker`): K-FAC with the
output factor replaced by ``α I``, the input covariance whitened and the
gradient centred (thesis eqs 6.2.3-6.2.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .._namespace import array_namespace

from .._checks import check_finite, check_int, check_nonnegative, check_positive, concrete_bool, namespace
from ..layers import Records, records
from ..protocol import Array, LayerRecord, Loss, Model
from . import kronecker as kr
from ._base import check_flag
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
    ``C_k = U_k diag(s_k) U_k^T`` of the input covariance from the last refresh, the
    statistics-batch mean ``mu_k`` (for inspection) and, for a constant ``alpha``, the
    preconditioner ``P_k = U_k diag(1/(alpha s_k + eps)) U_k^T`` ``(n_in, n_in)`` computed at the
    refresh (``(0, 0)`` for ``alpha="adaptive"``, whose preconditioner changes every step). A
    ``P_k`` of zeros (``init``'s) is not used: the step computes it from ``s_k, U_k``; set it to
    zeros after editing ``s`` or ``U`` by hand. Memory ``2 sum_k n_in^2`` (``sum_k n_in^2`` adaptive)."""

    count: Any
    s: list
    U: list
    mu: list
    P: list


class ACP(kr.KroneckerMethod):
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

    Cost per step: one forward + one backward (``model.layers``), plus per layer
    ``n_out n_in^2`` multiply-adds (``G_hat P`` with the cached ``P``; twice that
    for ``alpha="adaptive"``: ``(G_hat U) diag(1/d) U^T``); a refresh adds one
    forward + backward with a zero cotangent on ``cov_batch`` (none when it is
    ``None``), one ``eigh`` of ``n_in x n_in`` per layer and, for a constant
    ``alpha``, the product ``P = U diag(1/d) U^T``.

    Args:
        lr: learning rate > 0 (default 1, tuned: the best grid point on the digits MLP and CNN).
        eps: Tikhonov damping >= 0 (default 1, tuned with ``lr``); enters as ``eps/alpha`` on ``C``. ``eps=0`` needs
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

    def __init__(self, lr: float = 1.0, eps: float = 1.0, alpha: float | str = 1.0, refresh_every: int = 100,
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

    def factor_shapes(self, n_out: int, D: int) -> dict[str, tuple[int, ...]]:
        """Per layer: ``s`` ``(n_in,)``, ``U`` ``(n_in, n_in)``, ``mu`` ``(n_in,)``, ``P`` (class docstring)."""
        cached = (0, 0) if self.alpha == "adaptive" else (D, D)
        return {"s": (D,), "U": (D, D), "mu": (D,), "P": cached}

    def initial_factor(self, field: str, xp: Any, n_out: int, D: int, dtype: Any, dev: Any) -> Array:
        """``s = 0``, ``U = I``, ``mu = 0``, ``P = 0`` (not computed; the first step refreshes)."""
        shape = self.factor_shapes(n_out, D)[field]
        return xp.eye(D, dtype=dtype, device=dev) if field == "U" else xp.zeros(shape, dtype=dtype, device=dev)

    def needs_refresh(self, state: ACPState) -> bool:
        """Whether the next ``step`` refreshes the covariance (then pass ``cov_batch``).

        A Python bool; call it outside ``jax.jit``.
        """
        return kr.concrete_count("ACP", state.count, "needs_refresh") % self.refresh_every == 0

    def flat_step(self, model: Model, loss: Loss, params: Sequence[Array], state: ACPState, x: Array, y: Array,
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
        return super().flat_step(model, loss, params, state, x, y, cov_batch=cov_batch)

    def check_step_inputs(self, params: Sequence[Array], x: Array, cov_batch: Array | None = None) -> None:
        if cov_batch is not None:
            check_extra_batch("cov_batch", params, x, cov_batch, self.validate)

    def refresh_factors(self, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, rec: Records,
                        count: Array, cov_batch: Array | None = None) -> list[dict[str, Array]]:
        """Per recorded layer ``eigh(C)`` of the input covariance on ``cov_batch`` (else ``x``), its mean
        and the cached ``P`` (one owner per layer in data-parallel training)."""
        src = rec if cov_batch is None else records(model, params, cov_batch,
                                                    lambda out: array_namespace(out).zeros_like(out), rec.specs)
        covs = [kr.input_covariance(r.a) for r in src.layers]
        n_cached = 0 if self.alpha == "adaptive" else 1
        stacked = kr.owned(lambda C, what: self._eig_and_preconditioner(C), [(C, sp.describe()) for (C, _), sp in
                                                                              zip(covs, src.specs)],
                           lambda C: ((1 + n_cached) * C.shape[0] + 1, C.shape[1]))
        out = []
        for (C, mu), Us in zip(covs, stacked):
            n = C.shape[0]
            P = Us[n + 1:, :] if n_cached else Us[:0, :0]
            out.append({"s": Us[n, :], "U": Us[:n, :], "mu": mu, "P": P})
        return out

    def _eig_and_preconditioner(self, C: Array) -> Array:
        """``[U; s]`` of :func:`kr.covariance_eig`, and below, for a constant ``alpha``, ``P`` rows."""
        Us = kr.covariance_eig(C)
        if self.alpha == "adaptive":
            return Us
        xp = array_namespace(C)
        n = C.shape[0]
        return xp.concat([Us, kr.whitening_matrix(Us[:n, :], self.alpha * Us[n, :] + self.eps)], axis=0)

    def step_factors(self, xp: Any, factors: dict[str, list]) -> dict[str, list]:
        """The factors and, for a constant ``alpha``, ``cached``: per layer whether its ``P`` was computed
        (:func:`kr.cached_flags`: one host sync per step on an eager backend, not one per layer)."""
        if self.alpha == "adaptive":
            return factors
        return {**factors, "cached": kr.cached_flags(factors["P"])}

    def layer_step(self, xp: Any, k: int, rec: LayerRecord, grad: kr.LayerGradient,
                   factors: dict[str, Array]) -> tuple[Array, dict]:
        """``(ΔΘ, {"alpha": α})`` of one layer (spec §2): ``ΔW = -lr Ĝ P``, ``Δb = -(lr/α) ĝ - ΔW ā``."""
        s, U, P = factors["s"], factors["U"], factors["P"]
        a_bar, G_hat, g_hat = kr.centered_gradient(rec, grad)
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
        if positive is None:
            cached = factors["cached"]
            precondition = lambda G: kr.whiten_cached(G, P, U, d, cached)  # noqa: E731 - G P, P = U diag(1/d) U^T
        else:  # alpha = 0 (all g = 0): G_hat = 0, avoid 0/0
            d = xp.where(positive, d, xp.ones_like(d))
            precondition = lambda G: kr.whiten(G, U, d)  # noqa: E731
        dW, db = kr.centered_step(self.lr, G_hat, g_hat, a_bar, inv_alpha, precondition, self.bias_correction)
        return xp.concat([dW, db[:, None]], axis=1), {"alpha": alpha}

    def step_extras(self, xp: Any, state: ACPState, refreshed: Array, extras: list[dict],
                    cov_batch: Array | None = None) -> dict[str, Array]:
        """``cov_from_minibatch``, ``alpha_min``, ``alpha_max`` and ``count`` (docstring of :meth:`flat_step`)."""
        alphas = xp.stack([e["alpha"] for e in extras])
        return {"cov_from_minibatch": refreshed if cov_batch is None else kr.flag(xp, 0.0, refreshed),
                "alpha_min": xp.min(alphas), "alpha_max": xp.max(alphas), "count": state.count}

    def covariance_eigs(self, model: Model, params: Sequence[Array], x: Array) -> list[tuple[Array, Array, Array]]:
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
