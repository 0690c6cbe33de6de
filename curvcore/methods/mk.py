"""MK: the damped saddle-free exact stochastic second-order step (Mehouachi & Kasmi 2021), spec ``esn_mk.md``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import device

from .._namespace import array_namespace

from .._checks import check_nonnegative, check_positive
from .._samplewise import sq_norm
from .._reduce import batch_mean
from ..protocol import Array, Model
from . import _layerwise as lw
from ._base import check_flag, zero_count
from ._registry import register


class MKState(NamedTuple):
    """The step counter ``t`` (0-d int array); MK keeps no other state."""

    t: Any


class MK(lw.ChainMethod):
    """MK direction with damping (MK eq 42, generalised to cross-entropy; spec §3.3-§4).

    Per sample and layer (``ĝ_k`` per-sample gradient at the pre-activation,
    ``a_k`` the layer input, ``γ = ||ĝ||²``, ``s = ||a||²``, ``q = A⁺ĝ_n``):

        N_k = ρ_k ĝ_k a_kᵀ / (μ ρ_k + γ_k)
        η_k = c_k ĝ_k / (μ c_k + γ_k),   c_k = ρ_k s_k + [k=n] ĝ_nᵀ q

    averaged over the batch; update ``W ← W - lr N``, ``b ← b - lr η``.
    ``N_k`` solves ``(μI + ĝĝᵀ/ρ) N = G`` (MK eq 41, Sherman-Morrison). For
    MSE ``ĝ_nᵀq = ||out - y||²`` (the paper's term) and ``mu=0`` is MK eq 40
    (≡ ESN ``"saddle_free"``); ``μ d(μ) → ∇ℓ`` as ``μ → ∞``. Each per-sample
    step is a descent direction (``<N_k, G_k> = ρ s γ/(μρ + γ) >= 0``,
    ``<η_k, g_k> = c γ/(μc + γ) >= 0``); the batch mean is not guaranteed to be.

    ``ρ``: ``lam`` a float, a list ``[ρ_1..ρ_n]``, or ``"auto"`` (MK eq 65 +
    white layer, from the non-regularised gradient): ``ρ_1 = ||ĝ_1||``,
    ``ρ_k = ||ĝ_k|| / max|act'(z_{k-1})|``, so that
    ``N_k = ĝ_k a_kᵀ / (μ + m_{k-1}||ĝ_k||)``: a per-sample, per-layer
    normalised gradient. ``lam_out`` (MK eqs 67-68): every ``ρ_k`` is divided
    by ``λ_n`` (a float, or ``"auto"``: ``λ_n = ||∂ℓ/∂out||`` per sample).

    Paper corrections (spec §7, checked in ``tests/test_esn_mk.py``): the
    granular term is ``q = A⁺ĝ_n`` (eqs 34/35 print the opposite sign and
    contradict eq 36; with the printed sign the Newton residual is ~2); MK
    eq 38 assumes ``η_n ∥ ĝ_n``, true only for MSE, so for cross-entropy the
    rank-one bias form above keeps ``η_n ∥ ĝ_n`` (ESN ``"saddle_free"`` uses
    the full ``q``); the eigenvalue claims of eqs 60-70 are false (only the
    inertia of H is as stated), so eq 65 is a heuristic, not the ρ that
    minimises ρ(H). The default ``mu=1.0`` (not the paper's 0): undamped MK
    diverged on digits at lr 0.01.

    Cost per step: one forward + one backward (``model.layers``) and one
    matmul per layer, about an SGD step; ``reg_grad`` adds one backward sweep
    of matmuls (no model call).

    Args:
        lr: learning rate > 0.
        lam: ``"auto"``, a float >= 0, or a list of n floats >= 0 (ρ_1..ρ_n).
        mu: damping ``μ >= 0`` (0 = MK eq 40).
        lam_out: ``λ_n``: a float > 0 (1.0 = off) or ``"auto"``.
        reg_grad: use the gradient of ``J_R`` (regularised backward, MK eq 19).
        eps: a sample whose denominator ``μρ + γ`` (or ``μc + γ``) is
            ``<= eps`` contributes nothing to that layer; counted in ``info["skipped"]``.

    Raises:
        ValueError: invalid hyperparameters.
    """

    def __init__(self, lr: float = 0.01, lam: Any = "auto", mu: float = 1.0, lam_out: Any = 1.0,
                 reg_grad: bool = False, eps: float = 1e-12, strict: bool = False) -> None:
        check_positive("lr", lr)
        check_nonnegative("mu", mu)
        if lam_out != "auto":
            check_positive("lam_out", lam_out)
            lam_out = float(lam_out)
        if not isinstance(reg_grad, bool):
            raise ValueError(f"reg_grad must be True or False, got {reg_grad!r}")
        check_nonnegative("eps", eps)
        self.lr, self.lam, self.mu, self.lam_out, self.reg_grad, self.eps = (
            lr, lw.check_lam(lam), float(mu), lam_out, reg_grad, eps)
        self.strict = check_flag("strict", strict)

    state_type = MKState

    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> MKState:
        """``t = 0`` (checks that the model has dense layers to precondition)."""
        self.layer_candidates(params, model)
        return MKState(zero_count(params))

    def chain_direction(self, terms: lw.Terms, rec: Any, params: Sequence[Array], state: MKState,
                  candidates: Sequence[Any]) -> tuple[list[Array], MKState, dict[str, Array]]:
        """The MK direction ``d = [N_1, η_1, ...]`` over the chain (update ``params - lr d``), new state, extras."""
        xp = array_namespace(params[0])
        d, masks = mk_direction(terms, self.mu, self.eps)
        extras = {"lam_mean": lw.mean_rho(terms.rho), "skipped": lw.count(masks, zero_count(params)),
                  "mu": xp.asarray(self.mu, dtype=params[0].dtype, device=device(params[0]))}
        return d, MKState(state.t + 1), extras


def mk_direction(terms: lw.Terms, mu: float, eps: float) -> tuple[list[Array], list[Array]]:
    """MK eq 42 as the batch mean of per-sample steps: ``[N_1, η_1, ..., N_n, η_n]`` and per-layer masks (B,).

        N_k = ρ_k ĝ_k a_kᵀ / (μ ρ_k + γ_k)
        η_k = c_k ĝ_k / (μ c_k + γ_k),   c_k = ρ_k s_k + [k=n] ĝ_nᵀ q

    A sample whose denominator ``μρ_k + γ_k`` or ``μc_k + γ_k`` is ``<= eps``
    contributes 0 to that layer (mask True). ``c/γ`` is formed as
    ``(ρ/γ) s + [k=n] ĝ_nᵀq/γ`` (:func:`~._layerwise.damped_ratio`), so
    per-sample gradients whose squared norms overflow still give a finite step.
    """
    n = len(terms.ghat)
    direction: list[Array] = []
    masks: list[Array] = []
    for k, (ghat, a, rho) in enumerate(zip(terms.ghat, terms.a, terms.rho)):
        last = k == n - 1
        w_coef, w_bad, rho_rel, gamma = lw.weight_coef(ghat, rho, mu, eps)
        s = sq_norm(a)
        c = rho * s + (terms.gq if last else 0.0)
        b_coef, b_bad = lw.damped_ratio(rho_rel * s + (terms.gq_rel if last else 0.0), mu * c + gamma, mu, eps)
        direction += [lw.weight_mean(ghat, w_coef, a), batch_mean(ghat * b_coef[:, None])]
        masks.append(w_bad | b_bad)
    return direction, masks


register("mk", MK, compare={"lr": 0.5}, test={"lr": 0.01}, losses=("mse", "ce"),
         description="Mehouachi-Kasmi damped saddle-free exact stochastic step (per-sample normalised gradient)",
         tune={"lr": [0.03, 0.1, 0.3, 1.0, 3.0], "mu": [0.1, 1.0]})
