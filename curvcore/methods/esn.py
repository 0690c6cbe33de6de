"""ESN: the exact stochastic Newton method (ICLR 2022 submission), spec ``shared/spec/esn_mk.md``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import device

from .._namespace import array_namespace

from .._checks import check_choice, check_interval, check_nonnegative, check_positive, check_shapes, concrete_bool
from .._linalg import cho_solve, eigh
from .._samplewise import sq_norm
from .._reduce import batch_any, batch_gram, batch_mean, batch_size, current
from ..protocol import Array, Model
from . import _layerwise as lw
from ._base import check_flag, check_grads_finite, count_as_float, zero_count
from ._ema import ema_moments
from ._registry import register

VARIANTS = ("newton", "saddle_free", "randomized")
RANDOMIZED_ONLY = ("damping", "solver", "estimator", "beta", "granular")  # hyperparameters of "randomized" alone


class ESNState(NamedTuple):
    """Step counter ``t`` (0-d int) and, for ``estimator="ema"``, the running moments per layer.

    ``C_k = E[ĝĝᵀ]``, ``R_k = E[ρĝaᵀ]``, ``m_k = E[a]`` (uncorrected EMAs) and,
    with the Sylvester solver, ``P_k = E[aaᵀ]`` (for ``Var(a) = P - mmᵀ``).
    Empty lists otherwise.
    """

    t: Any
    C: list
    R: list
    m: list
    P: list


# ---------------------------------------------------------------------------
# "newton" and "saddle_free" (corrected ICLR eq 17, eq 21): batch means of per-sample closed forms
# ---------------------------------------------------------------------------


def closed_form(terms: lw.Terms, variant: str, eps: float) -> tuple[list[Array], list[Array]]:
    """``[N_1, η_1, ..., N_n, η_n]`` (batch mean) and per-layer degenerate masks (B,), per sample:

        N_k = ρ_k ĝ_k a_kᵀ / γ_k
        η_k = ∓(ρ_k s_k / γ_k) ĝ_k + [k=n] q      (- for "newton", + for "saddle_free")

    A sample whose ``γ_k`` is ``<= eps`` contributes 0 to that layer (mask True).
    """
    sign = -1.0 if variant == "newton" else 1.0
    n = len(terms.ghat)
    direction: list[Array] = []
    masks: list[Array] = []
    for k, (ghat, a, rho) in enumerate(zip(terms.ghat, terms.a, terms.rho)):
        w_coef, bad = lw.weight_coef(ghat, rho, 0.0, eps)[:2]
        eta = batch_mean(ghat * (sign * sq_norm(a) * w_coef)[:, None])
        if k == n - 1:
            eta = eta + batch_mean(terms.q)
        direction += [lw.weight_mean(ghat, w_coef, a), eta]
        masks.append(bad)
    return direction, masks


def first_zero_gradient(terms: lw.Terms, eps: float) -> tuple[int, int] | None:
    """``(k, p)`` (1-based layer, 0-based sample) of the first ``γ_k <= eps`` with ``k >= 2``, or None.

    Returns None as well while tracing (abstract values).
    """
    xp = array_namespace(terms.ghat[0])
    for k in range(1, len(terms.ghat)):
        bad = sq_norm(terms.ghat[k]) <= eps
        if concrete_bool(batch_any(bad)):
            return k + 1, int(xp.argmax(xp.astype(bad, xp.int32)))
    return None


# ---------------------------------------------------------------------------
# "randomized" (ICLR eqs 24, 26; A.6): expectations and the per-layer solves
# ---------------------------------------------------------------------------


class Moments(NamedTuple):
    """Expectations of one layer: ``C = E[ĝĝᵀ]``, ``R = E[ρ ĝ aᵀ]``, ``m = E[a]``, ``P = E[aaᵀ]``.

    ``P`` is only needed by the Sylvester solver (``None`` otherwise).
    """

    C: Array
    R: Array
    m: Array
    P: Array | None


def batch_moments(ghat: Array, a: Array, rho: Array, second_moment: bool) -> Moments:
    """Batch-mean estimates of one layer's :class:`Moments` (B = 1: the rank-one spot estimate)."""
    B = batch_size(ghat)
    P = batch_gram(a, a) / B if second_moment else None
    return Moments(batch_gram(ghat, ghat) / B, batch_gram(ghat * rho[:, None], a) / B, batch_mean(a), P)


def _shifted(C: Array, damping: float) -> Array:
    xp = array_namespace(C)
    return C + damping * xp.eye(C.shape[0], dtype=C.dtype, device=device(C))


def _singular(den_min: Array, den_max: Array, eps: float, layer: int, what: str) -> Array:
    """``ValueError`` naming the layer when the system is singular (``den_min <= eps den_max``); else the
    0-d mask, abstract inside ``jax.jit``, where :func:`_nan_where` turns the solution into NaN instead."""
    singular = den_min <= eps * den_max
    if concrete_bool(singular):
        raise ValueError(
            f"ESN randomized: the system of layer {layer} ({what}) is singular; use damping > 0"
        )
    return singular


def _nan_where(singular: Array, N: Array) -> Array:
    """NaN where the system was singular, so the step's guard keeps the old params (``info["finite"]`` False)."""
    xp = array_namespace(N)
    return xp.where(singular, xp.full_like(N, float("nan")), N)


def solve_identity(C: Array, R: Array, damping: float, eps: float, layer: int) -> Array:
    """ICLR eq 26: ``N = (δI + C)⁻¹ R``.

    With ``δ > 0`` a Cholesky solve (NaN if ``δI + C`` is not numerically
    positive definite); with ``δ = 0`` an eigendecomposition that raises
    ``ValueError`` naming the layer when ``C`` is singular
    (``σ_min <= eps σ_max``; NaN inside ``jax.jit``).
    """
    xp = array_namespace(C, R)
    if damping > 0:
        return cho_solve(_shifted(C, damping), R)
    sigma, U = eigh(C)
    singular = _singular(xp.min(sigma), xp.max(xp.abs(sigma)), eps, layer, "E[ĝĝᵀ]")
    coef = xp.matmul(xp.matrix_transpose(U), R) / sigma[:, None]
    return _nan_where(singular, xp.matmul(U, coef))


def batch_system(ghat: Array) -> bool:
    """Whether :func:`solve_identity_batch` takes the B x B system: ``B < n_out`` and the whole batch in this process."""
    return ghat.shape[0] < ghat.shape[1] and not current().distributed


def solve_identity_batch(ghat: Array, a: Array, rho: Array, damping: float, validate: bool) -> Array:
    """ICLR eq 26 with batch expectations from the samples, by Cholesky on the smaller system (``δ > 0``):

        N = (δI + ĜᵀĜ/B)⁻¹ Ĝᵀ diag(ρ) A / B,   Ĝ (δI + ĜᵀĜ/B)⁻¹ = (δI + ĜĜᵀ/B)⁻¹ Ĝ   (push-through)

    (``Ĝ`` the (B, n_out) per-sample gradients, ``A`` the (B, n_in) inputs).
    The system is ``n_out x n_out`` or, where :func:`batch_system`, ``B x B``
    (Woodbury); its right-hand sides are ``Ĝ`` (then ``N = (ρ ⊙ ĜS⁻¹)ᵀA/B``)
    or ``diag(ρ)A`` (``n_in`` columns), whichever is narrower. Equals
    :func:`solve_identity` on the batch moments; the cost is
    ``B m M + m³/3 + 2 m² min(M, n_in) + B n_out n_in`` with ``m, M`` the
    smaller and larger of ``B, n_out`` (the moments' route: ``m = n_out``, ``n_in`` columns).

    Raises:
        FloatingPointError: the Gram matrix overflowed (``validate``, eager).
    """
    xp = array_namespace(ghat, a, rho)
    B, n_out, n_in = batch_size(ghat), ghat.shape[1], a.shape[1]
    weights = (rho / B)[:, None]
    if batch_system(ghat):
        K = _shifted(xp.matmul(ghat, xp.matrix_transpose(ghat)) / B, damping)
        check_grads_finite([K], validate, "the batch Gram matrix ĜĜᵀ/B")
        if n_out <= n_in:
            return batch_gram(cho_solve(K, ghat) * weights, a)
        return batch_gram(ghat, cho_solve(K, a * weights))
    S = _shifted(batch_gram(ghat, ghat) / B, damping)
    check_grads_finite([S], validate, "the Gram matrix ĜᵀĜ/B")
    if B <= n_in:
        return batch_gram(xp.matrix_transpose(cho_solve(S, xp.matrix_transpose(ghat))) * weights, a)
    return cho_solve(S, batch_gram(ghat * weights, a))


def solve_sylvester(C: Array, V: Array, R: Array, damping: float, eps: float, layer: int) -> Array:
    """ICLR eq 24: ``(δI + C) N + N V = R`` with ``V = Var(a)``, via two eigendecompositions.

    ``δI + C = UΣUᵀ``, ``V = QΘQᵀ``: ``N = U [(UᵀRQ)_ij / (Σ_i + Θ_j)] Qᵀ``
    (denominators >= δ since ``V`` is PSD). With ``δ = 0`` a singular system
    raises ``ValueError`` naming the layer (NaN inside ``jax.jit``).
    """
    xp = array_namespace(C, V, R)
    sigma, U = eigh(_shifted(C, damping))
    theta, Q = eigh(V)
    den = sigma[:, None] + theta[None, :]
    singular = None if damping > 0 else _singular(xp.min(den), xp.max(xp.abs(den)), eps, layer, "Sylvester operator")
    rot = xp.matmul(xp.matmul(xp.matrix_transpose(U), R), Q)
    N = xp.matmul(xp.matmul(U, rot / den), xp.matrix_transpose(Q))
    return N if singular is None else _nan_where(singular, N)


class ESN(lw.ChainMethod):
    """Exact Stochastic Newton (ICLR 2022 eqs 17, 21, 24, 26; spec §2-§6).

    Per sample ``p`` and layer ``k`` (``ĝ_k`` per-sample gradient at the
    pre-activation, ``a_k`` the layer input, ``γ = ||ĝ||²``, ``s = ||a||²``,
    ``q = A⁺ĝ_n`` the granular term), the update is ``W ← W - lr N``,
    ``b ← b - lr η`` with, averaged over the batch:

    * ``"newton"`` (corrected eq 17): ``N_k = ρ_k ĝ_k a_kᵀ/γ_k``,
      ``η_k = -(ρ_k s_k/γ_k) ĝ_k + [k=n] q``. For B = 1 and ``reg_grad`` it
      solves ``H d = ∇J_R`` exactly, ``J_R = ℓ + Σ_{k>=2} ρ_k/2 ||a_k||²``
      (the ρ held fixed). Not a descent direction: for checks, not training.
    * ``"saddle_free"`` (eq 21): the same with ``η_k = +(ρ_k s_k/γ_k) ĝ_k + [k=n] q``.
    * ``"randomized"`` (eq 26, the default): ``N_k = (δI + C_k)⁻¹ R_k``,
      ``η_k = N_k m_k`` (``+ [k=n] E[q]`` if ``granular``), ``C = E[ĝĝᵀ]``,
      ``R = E[ρĝaᵀ]``, ``m = E[a]``; ``solver="sylvester"`` solves eq 24,
      ``(δI + C)N + N Var(a) = R``, instead. Expectations are batch means
      (``estimator="batch"``; B = 1 is the rank-one method of A.6) or
      bias-corrected EMAs (``"ema"``, the direct method of A.6; ``E[q]`` stays
      the batch mean).

    ``ρ`` (spec §4): ``lam`` a float or a list ``[ρ_1..ρ_n]``, or ``"auto"``
    (MK eq 65 + white layer): ``ρ_1 = ||ĝ_1||``, ``ρ_k = ||ĝ_k|| / max|act'(z_{k-1})|``
    from the non-regularised gradient.

    Paper corrections (spec §7, each checked in ``tests/test_esn_mk.py``):
    the granular term has the sign ``q = A⁺ĝ_n`` with update ``b - η`` (ICLR
    §A.3 and MK eqs 34/35 print the opposite sign, which leaves a Newton
    residual ~2; ours < 1e-10); the theorem needs neither strict
    monotonicity nor a specific ``ρ_1`` (layer 1's part lies in ker H) but
    non-zero ``ĝ_k`` for ``k >= 2``, and its direction is not the min-norm
    solution; eq 26 is not the minimiser of eq 23 (that is the Sylvester
    solution, eq 24) unless ``Var(a) = I``; only B = 1 is exact.

    Cost per step: one forward + one backward (``model.layers``), plus one
    matmul per layer (``newton``/``saddle_free``, ≈ an SGD step) or, for
    ``randomized``, a Gram matrix and a Cholesky solve per layer: with batch
    expectations on the smaller of the ``n_k x n_k`` and ``B x B`` systems
    (:func:`solve_identity_batch`), with EMAs on ``n_k x n_k``; two
    eigendecompositions for Sylvester, one for ``damping=0``. ``reg_grad``
    adds one backward sweep of matmuls (no model call).

    Args:
        lr: learning rate > 0.
        lam: ``"auto"``, a float >= 0, or a list of n floats >= 0 (ρ_1..ρ_n).
        variant: ``"newton"``, ``"saddle_free"`` or ``"randomized"``.
        damping: ``δ >= 0`` of the randomized solve (the paper's 1).
        solver: ``"identity"`` (eq 26) or ``"sylvester"`` (eq 24).
        estimator: ``"batch"`` or ``"ema"``.
        beta: EMA factor in (0, 1).
        granular: add ``E[q]`` to the output bias (randomized; A.6 drops it).
        reg_grad: use the gradient of ``J_R`` (regularised backward);
            ``None`` = True for ``"newton"`` (required there), False otherwise.
        eps: a sample whose denominator ``γ_k`` is ``<= eps`` is dropped from
            that layer and counted in ``info["skipped"]``; also the relative
            singularity threshold of the ``damping=0`` solves.

    Raises:
        ValueError: invalid hyperparameters; randomized-only settings changed
            for another variant; ``reg_grad=False`` with ``"newton"``.
    """

    def __init__(self, lr: float = 0.01, lam: Any = "auto", variant: str = "randomized", damping: float = 1.0,
                 solver: str = "identity", estimator: str = "batch", beta: float = 0.99, granular: bool = False,
                 reg_grad: bool | None = None, eps: float = 1e-12, strict: bool = False) -> None:
        check_positive("lr", lr)
        check_choice("variant", variant, VARIANTS)
        check_nonnegative("damping", damping)
        check_choice("solver", solver, ("identity", "sylvester"))
        check_choice("estimator", estimator, ("batch", "ema"))
        check_interval("beta", beta, 0.0, 1.0, "()")
        check_nonnegative("eps", eps)
        if not isinstance(granular, bool):
            raise ValueError(f"granular must be True or False, got {granular!r}")
        given = {"damping": damping, "solver": solver, "estimator": estimator, "beta": beta, "granular": granular}
        if variant != "randomized":
            defaults = inspect.signature(ESN.__init__).parameters
            changed = [k for k in RANDOMIZED_ONLY if given[k] != defaults[k].default]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to variant='randomized', not {variant!r}")
        if reg_grad is None:
            reg_grad = variant == "newton"
        if not isinstance(reg_grad, bool):
            raise ValueError(f"reg_grad must be None, True or False, got {reg_grad!r}")
        if variant == "newton" and not reg_grad:
            raise ValueError("variant='newton' needs reg_grad=True: the exact Newton direction "
                             "uses the gradient of J_R")
        self.lr, self.lam, self.variant = lr, lw.check_lam(lam), variant
        self.damping, self.solver, self.estimator, self.beta, self.granular = damping, solver, estimator, beta, granular
        self.reg_grad, self.eps, self.strict = reg_grad, eps, check_flag("strict", strict)

    state_type = ESNState

    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> ESNState:
        """``t = 0``; zero moments per dense layer for ``estimator="ema"`` (``P`` only with the Sylvester solver)."""
        t = zero_count(params)
        candidates = self.layer_candidates(params, model)
        if self.variant != "randomized" or self.estimator != "ema":
            return ESNState(t, [], [], [], [])
        xp = array_namespace(*params)
        dt, dev = params[0].dtype, device(params[0])
        shapes = [self._dims(params, s) for s in candidates]
        C = [xp.zeros((o, o), dtype=dt, device=dev) for o, _ in shapes]
        R = [xp.zeros((o, i), dtype=dt, device=dev) for o, i in shapes]
        m = [xp.zeros((i,), dtype=dt, device=dev) for _, i in shapes]
        P = [xp.zeros((i, i), dtype=dt, device=dev) for _, i in shapes] if self.solver == "sylvester" else []
        return ESNState(t, C, R, m, P)

    @staticmethod
    def _dims(params: Sequence[Array], spec: Any) -> tuple[int, int]:
        """``(n_out, n_in)`` of a dense layer."""
        shape = tuple(params[spec.weight].shape)
        return int(shape[spec.weight_axes[0]]), int(shape[spec.weight_axes[1]])

    def chain_direction(self, terms: lw.Terms, rec: Any, params: Sequence[Array], state: ESNState,
                  candidates: Sequence[Any]) -> tuple[list[Array], ESNState, dict[str, Array]]:
        """The direction ``d = [N_1, η_1, ...]`` over the chain (update ``params - lr d``), new state, info extras.

        Raises:
            ValueError: ``"newton"`` with a zero back-propagated gradient in a
                layer ``k >= 2``; a singular ``damping=0`` system; a state for another model.
        """
        xp = array_namespace(params[0])
        if self.variant == "newton":
            bad = first_zero_gradient(terms, self.eps)
            if bad is not None:
                raise ValueError(f"ESN newton: backpropagated gradient of layer {bad[0]} is zero for sample {bad[1]}; "
                                 "the exact Newton direction does not exist")
        masks: list[Array] = []
        if self.variant == "randomized":
            d, state = self.randomized(terms, rec, state, params, candidates)
        else:
            d, masks = closed_form(terms, self.variant, self.eps)
            state = state._replace(t=state.t + 1)
        damping = self.damping if self.variant == "randomized" else 0.0
        extras = {"lam_mean": lw.mean_rho(terms.rho), "skipped": lw.count(masks, zero_count(params)),
                  "damping": xp.asarray(damping, dtype=params[0].dtype, device=device(params[0]))}
        return d, state, extras

    def _check_ema_state(self, state: ESNState, params: Sequence[Array], candidates: Sequence[Any]) -> None:
        shapes = [self._dims(params, s) for s in candidates]
        check_shapes("state.C", state.C, [(o, o) for o, _ in shapes], unit="layers")
        check_shapes("state.R", state.R, shapes, unit="layers")
        check_shapes("state.m", state.m, [(i,) for _, i in shapes], unit="layers")
        if self.solver == "sylvester":
            check_shapes("state.P", state.P, [(i, i) for _, i in shapes], unit="layers")

    def randomized(self, terms: lw.Terms, rec: Any, state: ESNState, params: Sequence[Array],
                   candidates: Sequence[Any]) -> tuple[list[Array], ESNState]:
        """ICLR eq 26 / eq 24 per chain layer, with batch or EMA expectations: ``([N_1, η_1, ...], new state)``.

        ``terms`` and ``rec`` come from :meth:`terms`; ``candidates`` from ``layer_candidates``.
        """
        xp = array_namespace(*params)
        ema = self.estimator == "ema"
        sylvester = self.solver == "sylvester"
        if ema:
            self._check_ema_state(state, params, candidates)
        slot = {s.weight: i for i, s in enumerate(candidates)}
        t = state.t + 1
        tf = count_as_float(t, params[0])
        C, R, m, P = (list(v) for v in (state.C, state.R, state.m, state.P))
        from_samples = not ema and not sylvester and self.damping > 0
        d: list[Array] = []
        for k, (ghat, a, rho) in enumerate(zip(terms.ghat, terms.a, terms.rho)):
            if from_samples:
                N, mean_a = solve_identity_batch(ghat, a, rho, self.damping, self.validate), batch_mean(a)
                d += [N, xp.matmul(N, mean_a)]
                continue
            mom = batch_moments(ghat, a, rho, sylvester)
            if ema:
                i = slot[rec.specs[k].weight]
                old = Moments(C[i], R[i], m[i], P[i] if sylvester else None)
                raw, mom = ema_moments(old, mom, self.beta, tf)
                C[i], R[i], m[i] = raw.C, raw.R, raw.m
                if sylvester:
                    P[i] = raw.P
            N = self._solve_moments(mom, k + 1)
            d += [N, xp.matmul(N, mom.m)]
        if self.granular:
            d[-1] = d[-1] + batch_mean(terms.q)
        return d, ESNState(t, C, R, m, P)

    def _solve_moments(self, mom: Moments, layer: int) -> Array:
        """Eq 26, or eq 24 for ``solver="sylvester"``, from one layer's expectations."""
        check_grads_finite([mom.C, mom.R], self.validate)
        if self.solver == "sylvester":
            V = mom.P - mom.m[:, None] * mom.m[None, :]
            return solve_sylvester(mom.C, V, mom.R, self.damping, self.eps, layer)
        return solve_identity(mom.C, mom.R, self.damping, self.eps, layer)


register("esn", ESN, compare={"lr": 0.3}, test={"lr": 0.01},
         losses=("mse", "ce"),
         description="Exact Stochastic Newton, randomized eq 26 (per-layer (I+E[gg^T])^-1 E[rho g a^T])",
         tune={"lr": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0], "damping": [0.1, 1.0]})
