"""ACP: the amortized covariance preconditioner (T. George, MSc thesis, 2017, ch. 6, Alg 4).

Spec: ``shared/spec/acp.md``. This module also holds the layer-wise helpers
that :mod:`.centered_sgd` and :mod:`.kfac` share (centered gradients, input
covariances, error prefixes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

from .._checks import (
    check_finite, check_int, check_nonnegative, check_positive, check_shapes, concrete_bool, namespace,
)
from .._control import cond
from .._linalg import eigh
from .._reduce import batch_gram, batch_mean, batch_size, batch_sum
from ..protocol import Array, LayerRecord
from ._base import Method, check_grads_finite, loss_and_records, step_info, zero_count
from ._registry import register

# ---------------------------------------------------------------------------
# layer-wise helpers shared by ACP, CenteredSGD and KFAC
# ---------------------------------------------------------------------------


@contextmanager
def method_errors(method: str) -> Iterator[None]:
    """Re-raise ``ValueError``/``TypeError``/``FloatingPointError`` with ``"<method>: "`` in front."""
    try:
        yield
    except (ValueError, TypeError, FloatingPointError) as err:
        raise type(err)(f"{method}: {err}") from None


def input_records(model: Any, params: Sequence[Array], x: Array) -> list[LayerRecord]:
    """Layer records of a batch with a zero output cotangent: only the inputs ``a`` are used."""
    return model.layers(params, x, lambda out: array_namespace(out).zeros_like(out))


def centered_gradient(rec: LayerRecord) -> tuple[Array, Array, Array]:
    """``(a_bar, G_hat, g_hat)``: batch-mean input, ``g^T (a - a_bar)`` and ``sum_i g_i``."""
    a_bar = batch_mean(rec.a)
    return a_bar, batch_gram(rec.g, rec.a - a_bar), batch_sum(rec.g)


def input_covariance_eig(a: Array) -> tuple[Array, Array, Array]:
    """``(s, U, mu)``: ``C = (a - mu)^T (a - mu) / B = U diag(s) U^T`` (biased), ``s`` clipped at 0."""
    xp = array_namespace(a)
    mu = batch_mean(a)
    ac = a - mu
    s, U = eigh(batch_gram(ac, ac) / batch_size(a))
    return xp.maximum(s, xp.zeros_like(s)), canonical_signs(U), mu


def canonical_signs(U: Array) -> Array:
    """Flip eigenvector columns so each one's largest-magnitude entry is positive (sklearn's ``svd_flip``).

    The step does not depend on the signs; fixing them makes the stored state the
    same on every backend (LAPACK, torch and JAX pick different signs).
    """
    xp = array_namespace(U)
    n = U.shape[0]
    rows = xp.reshape(xp.arange(n, device=device(U)), (n, 1))
    first_max = rows == xp.reshape(xp.argmax(xp.abs(U), axis=0), (1, n))  # argmax: first occurrence
    pick = xp.sum(xp.where(first_max, U, xp.zeros_like(U)), axis=0)
    return U * xp.where(pick < 0, -xp.ones_like(pick), xp.ones_like(pick))


def per_example_alpha(g: Array) -> Array:
    """Adaptive alpha of thesis §6.3.2: ``max_{i,j} (B g_ij)^2`` (0-d).

    ``B g_i`` is the per-example ``dl_i/dz`` (erratum E7). A max over the batch:
    a data-parallel version must all-reduce it with ``max``.
    """
    xp = array_namespace(g)
    return xp.max((batch_size(g) * g) ** 2)


def check_extra_batch(name: str, params: Sequence[Array], x: Array, extra: Array, validate: bool) -> None:
    """A second input batch (``cov_batch``) must match ``x`` in library, width and dtype, and be finite.

    Raises:
        TypeError: other library or dtype.
        ValueError: not 2-d, wrong number of features, NaN/Inf.
    """
    namespace(params[0], extra, what=f"params and {name}")
    if extra.ndim != 2 or extra.shape[0] < 1:
        raise ValueError(f"{name} must be a 2-d batch (B_c, n_in) of inputs, got shape {tuple(extra.shape)}")
    if extra.shape[1] != x.shape[1]:
        raise ValueError(f"{name} has {extra.shape[1]} features but x has {x.shape[1]}")
    if extra.dtype != params[0].dtype:
        raise TypeError(f"dtype mismatch: params are {params[0].dtype} but {name} is {extra.dtype}")
    if validate:
        check_finite(name, extra)


def check_layer_state(name: str, arrays: Sequence[Array], shapes: Sequence[tuple[int, ...]]) -> None:
    """Raise ``ValueError`` unless the per-layer state arrays have the expected shapes."""
    check_shapes(f"state.{name}", arrays, shapes, unit="layers")


def flag(xp: Any, value: float, like: Array) -> Array:
    """A 0-d float array (dtype and device of ``like``) for ``info``."""
    return xp.asarray(value, dtype=like.dtype, device=device(like))


def concrete_count(method: str, count: Array, why: str) -> int:
    """``int(count)``; a ``TypeError`` explaining ``why`` when it is abstract (inside ``jax.jit``)."""
    try:
        return int(count)
    except Exception:
        raise TypeError(f"{method}: {why} needs a concrete step count and cannot run inside jax.jit") from None


# ---------------------------------------------------------------------------
# ACP
# ---------------------------------------------------------------------------


class ACPState(NamedTuple):
    """``count`` (completed updates, 0-d int) and, per layer k, the eigendecomposition
    ``C_k = U_k diag(s_k) U_k^T`` of the input covariance from the last refresh and the
    statistics-batch mean ``mu_k`` (for inspection). Memory ``sum_k n_in^2``."""

    count: Any
    s: list
    U: list
    mu: list


class ACP(Method):
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

    needs = ("layers",)

    def __init__(self, lr: float = 0.1, eps: float = 1e-2, alpha: float | str = 1.0, refresh_every: int = 100,
                 bias_correction: bool = True):
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

    def init(self, params: Sequence[Array]) -> ACPState:
        """Count 0 (the first step refreshes), ``s = 0``, ``U = I``, ``mu = 0`` per layer."""
        xp = array_namespace(*params)
        s, U, mu = [], [], []
        for W in params[0::2]:
            n_in, dev = W.shape[1], device(W)
            s.append(xp.zeros((n_in,), dtype=W.dtype, device=dev))
            U.append(xp.eye(n_in, dtype=W.dtype, device=dev))
            mu.append(xp.zeros((n_in,), dtype=W.dtype, device=dev))
        return ACPState(count=zero_count(params), s=s, U=U, mu=mu)

    def needs_refresh(self, state: ACPState) -> bool:
        """Whether the next ``step`` refreshes the covariance (then pass ``cov_batch``).

        A Python bool; call it outside ``jax.jit``.
        """
        return concrete_count("ACP", state.count, "needs_refresh") % self.refresh_every == 0

    def step(self, model: Any, loss: Any, params: Sequence[Array], state: ACPState, x: Array, y: Array,
             cov_batch: Array | None = None) -> tuple[list[Array], ACPState, dict[str, Array]]:
        """One ACP update.

        Args:
            model: a protocol model with ``layers``.
            loss: a curvcore loss.
            params: ``[W1, b1, ...]``.
            state: from :meth:`init` or the previous step.
            x: update minibatch inputs ``(B, n_in)``; y: its targets.
            cov_batch: statistics-batch inputs ``(B_c, n_in)`` (no labels), used only
                when a refresh is due (ignored, bitwise, otherwise). ``None`` at a
                refresh uses ``x`` (``info["cov_from_minibatch"] = 1``).

        Returns:
            ``(params, state, info)``; ``info``: ``loss`` (before the step),
            ``step_norm``, ``refreshed`` (1.0/0.0), ``cov_from_minibatch`` (1.0 when
            a refresh used ``x``), ``alpha_min``, ``alpha_max`` (over layers),
            ``count`` (the index of this update = ``state.count`` before it).

        Raises:
            ValueError: bad shapes, NaN/Inf in x, y or cov_batch, singular
                ``alpha C + eps I``.
            TypeError: mixed libraries or dtypes.
            FloatingPointError: the layer gradients overflowed.
        """
        with method_errors("ACP"):
            xp = self._check_inputs(model, params, x, y)
            shapes = [(W.shape[1],) for W in params[0::2]]
            check_layer_state("s", state.s, shapes)
            check_layer_state("U", state.U, [(n, n) for (n,) in shapes])
            check_layer_state("mu", state.mu, shapes)
            if cov_batch is not None:
                check_extra_batch("cov_batch", params, x, cov_batch, self.validate)
        value, recs = loss_and_records(model, loss, params, x, y)
        with method_errors("ACP"):
            check_grads_finite([r.g for r in recs], self.validate)
        one, zero = flag(xp, 1.0, params[0]), flag(xp, 0.0, params[0])

        def refresh(*_: Any) -> tuple[list, list, list, Array]:
            src = recs if cov_batch is None else input_records(model, params, cov_batch)
            eig = [input_covariance_eig(r.a) for r in src]
            return [e[0] for e in eig], [e[1] for e in eig], [e[2] for e in eig], one

        def keep(s: list, U: list, mu: list) -> tuple[list, list, list, Array]:
            return list(s), list(U), list(mu), zero

        s, U, mu, refreshed = cond(state.count % self.refresh_every == 0, refresh, keep,
                                   state.s, state.U, state.mu)
        deltas, alphas = [], []
        for k, rec in enumerate(recs):
            dW, db, alpha = self._layer_step(xp, k, rec, s[k], U[k])
            deltas += [dW, db]
            alphas.append(alpha)
        alpha_all = xp.stack(alphas)
        info = step_info(value, deltas, refreshed=refreshed,
                         cov_from_minibatch=refreshed if cov_batch is None else zero,
                         alpha_min=xp.min(alpha_all), alpha_max=xp.max(alpha_all), count=state.count)
        new_params = [p + d for p, d in zip(params, deltas)]
        return new_params, ACPState(count=state.count + 1, s=s, U=U, mu=mu), info

    def _layer_step(self, xp: Any, k: int, rec: LayerRecord, s: Array, U: Array) -> tuple[Array, Array, Array]:
        """``(dW, db, alpha)`` of one layer (spec §2)."""
        a_bar, G_hat, g_hat = centered_gradient(rec)
        if self.alpha == "adaptive":
            alpha = per_example_alpha(rec.g)
            positive = alpha > 0
            inv_alpha = xp.where(positive, 1 / xp.where(positive, alpha, xp.ones_like(alpha)),
                                 xp.zeros_like(alpha))
        else:
            alpha, positive = flag(xp, self.alpha, s), None
            inv_alpha = 1 / self.alpha
        d = alpha * s + self.eps
        self._check_nonsingular(xp, k, d, positive)
        if positive is not None:  # alpha = 0 (all g = 0): G_hat = 0, avoid 0/0
            d = xp.where(positive, d, xp.ones_like(d))
        dW = -self.lr * xp.matmul(xp.matmul(G_hat, U) / d, xp.matrix_transpose(U))
        db = -self.lr * inv_alpha * g_hat
        if self.bias_correction:
            db = db - xp.matmul(dW, a_bar)
        return dW, db, alpha

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
)
