"""What ESN and MK share (spec ``esn_mk.md``), as pure functions: records -> per-sample terms.

The per-sample gradients, the penalty weights ``ρ``, the regularised
backward sweep, the granular term and the batch means are here; each
method's own equations are in :mod:`.esn` and :mod:`.mk`. Everything here works on the protocol's layer records (``LayerRecord``) and
plain arrays, over the array API. Notation (spec §1), per sample ``p`` and
layer ``k = 1..n`` (list index ``k - 1``):

* ``a_k``: the layer input (B, n_{k-1}); ``D_k``: ``act'(z_k)`` (B, n_k);
* ``ĝ_k = B * record.g``: the per-sample gradient ``dℓ_p/dz_k`` (B, n_k);
* ``ρ_k``: the penalty weight on ``a_k`` (per sample, shape (B,)); the
  regularised per-sample objective is ``J_R = ℓ + Σ_{k>=2} ρ_k/2 ||a_k||²``;
* ``γ_k = ||ĝ_k||²``, ``s_k = ||a_k||²``, ``m_k = max_i |D_{k,i}|``;
* ``q = A⁺ ĝ_n``: the granular term (Newton step on the output bias alone).

Reductions over the batch go through :mod:`curvcore._reduce`; reductions over
features (per-sample norms) are plain ``xp.sum(..., axis=1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .._namespace import array_namespace
from array_api_compat import device as _dev

from .._checks import check_nonnegative, concrete_bool
from .._reduce import batch_gram, batch_mean, batch_size, batch_sum
from ..layers import LayerSpec, Records, matrix_to_weight, weight_matrix
from .._samplewise import norm, per_gamma
from ..protocol import Array, GranularLoss, LayerRecord, Model, satisfies
from ._base import LayerwiseMethod, check_grads_finite, n_preconditioned, step_info


class Terms(NamedTuple):
    """The per-sample pieces of one step (lists have one entry per layer).

    Attributes:
        a: layer inputs ``a_k`` (B, n_{k-1}).
        ghat: per-sample gradients ``ĝ_k`` used by the formulas (regularised
            when ``reg_grad``), (B, n_k).
        rho: penalty weights ``ρ_k`` (B,).
        q: granular term ``A⁺ ĝ_n`` (B, C).
        gq: ``ĝ_nᵀ q`` (B,).
        gq_rel: ``ĝ_nᵀ q / ||ĝ_n||²`` (B,), formed without the square (0 where ``ĝ_n = 0``).
    """

    a: list
    ghat: list
    rho: list
    q: Array
    gq: Array
    gq_rel: Array



def check_lam(lam: Any) -> Any:
    """Validate ``lam``: ``"auto"``, a float >= 0 or a list of floats >= 0 (ρ_1..ρ_n).

    Raises:
        ValueError: anything else.
    """
    if isinstance(lam, str):
        if lam != "auto":
            raise ValueError(f"lam must be 'auto', a float >= 0 or a list of floats >= 0, got {lam!r}")
        return lam
    if isinstance(lam, (list, tuple)):
        if not lam:
            raise ValueError("lam must not be an empty list")
        for i, v in enumerate(lam):
            check_nonnegative(f"lam[{i}]", v)
        return [float(v) for v in lam]
    check_nonnegative("lam", lam)
    return float(lam)


# ---------------------------------------------------------------------------
# records -> per-sample quantities
# ---------------------------------------------------------------------------


def check_linear_output(recs: Sequence[LayerRecord]) -> None:
    """Raise ``NotImplementedError`` unless the last layer is linear (``dact`` all ones).

    Skipped (no error) while tracing, where the values are abstract.
    """
    d = recs[-1].dact
    xp = array_namespace(d)
    if concrete_bool(xp.all(d == 1)) is False:
        raise NotImplementedError("ESN/MK need a linear output layer")


def sample_grads(recs: Sequence[LayerRecord]) -> list[Array]:
    """``ĝ_k = B * g_k``: per-sample gradients (the records hold the batch-MEAN gradient)."""
    return [r.g * batch_size(r.g) for r in recs]


def safe_ratio(num: Array, den: Array, eps: float) -> tuple[Array, Array]:
    """``(num/den where den > eps else 0, den <= eps)``; never divides by a small number."""
    xp = array_namespace(num, den)
    bad = den <= eps
    return xp.where(bad, xp.zeros_like(num), num / xp.where(bad, xp.ones_like(den), den)), bad


def damped_ratio(r: Array, den: Array, mu: float, eps: float) -> tuple[Array, Array]:
    """``x/(μx + γ)`` from ``r = x/γ`` as ``r/(μr + 1)``, and the mask ``den = μx + γ <= eps`` (ratio 0 there).

    Scale-safe: ``x`` and ``γ`` may each overflow (per-sample gradients
    beyond ~1e154 square to inf) while ``r`` does not, so no ``inf/inf``. For
    ``μ > 0``, ``r`` is capped at ``2^60/μ``, where the ratio equals ``1/μ``
    to working precision.
    """
    xp = array_namespace(r, den)
    bad = den <= eps
    if mu > 0:
        r = xp.minimum(r, xp.full_like(r, 2.0**60 / mu))
    r = xp.where(bad, xp.zeros_like(r), r)
    return r / (mu * r + 1), bad


def rho_fixed(lam: float | Sequence[float], n: int, like: Array) -> list[Array]:
    """Constant ``ρ_k`` broadcast to (B,): a float for every layer or a list of n floats.

    Raises:
        ValueError: the list does not have one entry per layer.
    """
    xp = array_namespace(like)
    values = list(lam) if isinstance(lam, (list, tuple)) else [lam] * n
    if len(values) != n:
        raise ValueError(f"lam lists {len(values)} values but the model has {n} layers (ρ_1..ρ_n)")
    ones = xp.ones((like.shape[0],), dtype=like.dtype, device=_dev(like))
    return [float(v) * ones for v in values]


def rho_auto(ghat: Sequence[Array], dacts: Sequence[Array]) -> list[Array]:
    """MK eq 65 + white layer (spec §4): ``ρ_1 = ||ĝ_1||``, ``ρ_k = ||ĝ_k|| / m_{k-1}`` (0 if ``m_{k-1} = 0``).

    ``ĝ`` must be the NON-regularised gradients (MK §5.2).
    """
    xp = array_namespace(ghat[0])
    rho = [norm(ghat[0])]
    for k in range(1, len(ghat)):
        m_prev = xp.max(xp.abs(dacts[k - 1]), axis=1)
        rho.append(safe_ratio(norm(ghat[k]), m_prev, 0.0)[0])
    return rho


def output_scale_auto(ghat_n: Array) -> Array:
    """MK eq 68: ``λ_n = ||∂ℓ/∂out|| / m_n`` per sample; ``= ||ĝ_n||`` for the required linear output."""
    return norm(ghat_n)


def scale_rho(rho: Sequence[Array], lam_out: Array | float) -> list[Array]:
    """``ρ_k / λ_n`` (spec §4, MK eqs 67-68); a per-sample ``λ_n = 0`` leaves ``ρ`` unchanged."""
    if isinstance(lam_out, (int, float)):
        return [r / lam_out for r in rho]
    xp = array_namespace(lam_out)
    safe = xp.where(lam_out > 0, lam_out, xp.ones_like(lam_out))
    return [r / safe for r in rho]


def regularized_backward(ghat: Sequence[Array], recs: Sequence[LayerRecord], weights: Sequence[Array],
                         rho: Sequence[Array]) -> list[Array]:
    """Gradient of ``J_R`` w.r.t. the pre-activations (spec §5 step 3, MK eq 19).

    ``ĝ_n`` is kept; for k = n-1..1: ``ĝ_k = D_k ⊙ (ĝ_{k+1} W_{k+1} + ρ_{k+1} a_{k+1})``.
    Cost: one extra backward sweep of matmuls (no model call).
    """
    xp = array_namespace(ghat[0])
    out = list(ghat)
    for k in range(len(ghat) - 2, -1, -1):
        up = xp.matmul(out[k + 1], weights[k + 1]) + rho[k + 1][:, None] * recs[k + 1].a
        out[k] = recs[k].dact * up
    return out


def granular_term(loss: GranularLoss, out: Array, y: Array, ghat_n: Array) -> tuple[Array, Array]:
    """``q = A⁺ ĝ_n`` and ``ĝ_nᵀ q`` in closed form (spec §1), for a linear output layer: the loss's own
    :meth:`~curvcore.protocol.GranularLoss.granular_term`, after :func:`check_loss`.

    Raises:
        NotImplementedError: a loss without a closed-form granular term.
    """
    check_loss(loss)
    return loss.granular_term(out, y, ghat_n)


def compute_terms(rec: Records, loss: GranularLoss, y: Array, weights: Sequence[Array], lam: Any, reg_grad: bool,
                  lam_out: Any = 1.0, validate: bool = True) -> Terms:
    """Spec §5 steps 2-4 from the records of ONE pass (one forward, one backward) of the output chain.

    ``rec.layers`` are the chain's records, ``weights`` their ``(n_out, n_in)``
    weight matrices. ``ρ`` comes from the non-regularised ``ĝ``
    (``lam="auto"``) or the constants, divided by ``λ_n`` (``lam_out``); with
    ``reg_grad`` the gradients are then recomputed for ``J_R``.

    Raises:
        NotImplementedError: a loss without a closed-form granular term (not a
                :class:`~curvcore.protocol.GranularLoss`), a non-linear output layer.
        FloatingPointError: the output or the back-propagated gradients are not finite.
    """
    check_loss(loss)
    recs = rec.layers
    out = recs[-1].h
    ghat = sample_grads(recs)
    if validate:
        check_linear_output(recs)
        check_grads_finite([out, *ghat], validate, ["the model output", *(f"the per-sample gradient of layer {k}"
                                                                             for k in range(len(ghat)))])
    rho = rho_auto(ghat, [r.dact for r in recs]) if lam == "auto" else rho_fixed(lam, len(recs), out)
    if lam_out == "auto":
        rho = scale_rho(rho, output_scale_auto(ghat[-1]))
    elif lam_out != 1.0:
        rho = scale_rho(rho, lam_out)
    if reg_grad:
        ghat = regularized_backward(ghat, recs, weights, rho)
    q, gq = loss.granular_term(out, y, ghat[-1])
    return Terms([r.a for r in recs], ghat, rho, q, gq, loss.granular_share(gq, ghat[-1]))


def check_loss(loss: Any) -> None:
    """Raise ``NotImplementedError`` unless ``loss`` has the granular term in closed form
    (:class:`~curvcore.protocol.GranularLoss`: ``granular_term`` and ``granular_share``)."""
    if not satisfies(loss, GranularLoss):
        raise NotImplementedError(
            f"ESN/MK support losses with a closed-form granular term (curvcore.protocol.GranularLoss: "
            f"granular_term and granular_share), such as MSE and CrossEntropy; got {type(loss).__name__}")


# ---------------------------------------------------------------------------
# pieces of the closed forms (ESN newton/saddle_free, MK): batch means of per-sample steps
# ---------------------------------------------------------------------------


def weight_coef(ghat: Array, rho: Array, mu: float, eps: float) -> tuple[Array, Array, Array, Array]:
    """The per-sample coefficient of ``ĝ aᵀ`` in ``N_k`` and what the bias formulas reuse.

    Returns ``(ρ/(μρ + γ), μρ + γ <= eps, ρ/γ, γ)`` with ``γ = ||ĝ||²`` (B,) each
    (``μ = 0`` for ESN's ``ρ/γ``). The ratio is formed from ``ρ/γ``
    (:func:`damped_ratio`), so per-sample gradients whose squared norms
    overflow still give a finite coefficient; a masked sample's coefficient is 0.
    """
    g_norm = norm(ghat)
    gamma = g_norm * g_norm  # for the masks only (an overflow to inf is still > eps)
    rho_rel = per_gamma(rho, g_norm)
    coef, bad = damped_ratio(rho_rel, mu * rho + gamma, mu, eps)
    return coef, bad, rho_rel, gamma


def weight_mean(ghat: Array, coef: Array, a: Array) -> Array:
    """``(1/B) Σ_p coef_p ĝ_p a_pᵀ``: one matmul, shape like ``W``."""
    return batch_gram(ghat * coef[:, None], a) / batch_size(ghat)


def count(masks: Sequence[Array], like: Array) -> Array:
    """Number of True entries over all masks, as a 0-d array of ``like``'s dtype."""
    xp = array_namespace(like)
    total = xp.zeros((), dtype=like.dtype, device=_dev(like))
    for m in masks:
        total = total + batch_sum(xp.astype(m, like.dtype))
    return total


def mean_rho(rho: Sequence[Array]) -> Array:
    """Mean of ``ρ`` over samples and layers (0-d)."""
    total = batch_mean(rho[0])
    for r in rho[1:]:
        total = total + batch_mean(r)
    return total / len(rho)


class ChainMethod(LayerwiseMethod):
    """Base of ESN and MK: they precondition the output chain of dense layers; ``step`` = ``direction``
    then ``params - lr d`` (every other parameter: ``params - lr g``).
    """

    chain = True
    preconditions = ("dense",)

    def chain_direction(self, terms: Terms, rec: Records, params: Sequence[Array], state: Any,
                        candidates: Sequence[LayerSpec]) -> tuple[list[Array], Any, dict[str, Array]]:  # pragma: no cover
        """``([N_1, η_1, ...], new state, info extras)`` over the chain's layers (abstract)."""
        raise NotImplementedError

    def terms(self, model: Model, loss: GranularLoss, params: Sequence[Array], x: Array, y: Array,
              candidates: Sequence[LayerSpec] | None = None) -> tuple[Array, Records, Terms]:
        """``(loss, records, per-sample terms)`` of the output chain from one recorded pass (spec §5 steps 1-4).

        Raises:
            ValueError: the model has no chain of dense layers ending at the output.
            NotImplementedError: a loss without a closed-form granular term (not a
                :class:`~curvcore.protocol.GranularLoss`), a non-linear output layer.
        """
        candidates = self.layer_candidates(params, model) if candidates is None else candidates
        check_loss(loss)
        value, rec = self.record(model, loss, params, x, y, candidates)
        if not rec.specs:
            raise ValueError(f"{type(self).__name__}: the model has no chain of dense layers ending at the output "
                             "(Linear layers with elementwise activations between them); use another method")
        weights = [weight_matrix(params[s.weight], s) for s in rec.specs]
        return value, rec, compute_terms(rec, loss, y, weights, self.lam, self.reg_grad, getattr(self, "lam_out", 1.0),
                                         validate=self.validate)

    def direction(self, model: Model, loss: GranularLoss, params: Sequence[Array], state: Any, x: Array, y: Array
                  ) -> tuple[list[Array], Any, dict[str, Array]]:
        """The direction ``d = [N_1, η_1, ..., N_n, η_n]`` over the output chain (update ``params - lr d``),
        the new state and the info extras (``loss``, ``n_preconditioned``, the records as ``records``).

        One forward and one backward (the chain's records). For a plain MLP
        the chain is every layer, and ``d`` is the whole update direction.

        Raises:
            NotImplementedError: a loss without a closed-form granular term (not a
                :class:`~curvcore.protocol.GranularLoss`), a non-linear output layer.
            FloatingPointError: the forward/backward pass overflowed.
        """
        candidates = self.layer_candidates(params, model)
        value, rec, terms = self.terms(model, loss, params, x, y, candidates)
        d, new_state, extras = self.chain_direction(terms, rec, params, state, candidates)
        xp = array_namespace(params[0])
        return d, new_state, {"loss": value, "n_preconditioned": n_preconditioned(xp, rec, params[0]),
                              "records": rec, **extras}

    def flat_step(self, model: Model, loss: GranularLoss, params: Sequence[Array], state: Any, x: Array, y: Array):
        """One step; ``info``: ``loss``, ``step_norm``, ``n_preconditioned`` and the method's extras."""
        d, new_state, extras = self.direction(model, loss, params, state, x, y)
        rec, value = extras.pop("records"), extras.pop("loss")
        deltas = {}
        for k, s in enumerate(rec.specs):
            deltas[s.weight] = -self.lr * matrix_to_weight(d[2 * k], s, params[s.weight].shape)
            deltas[s.bias] = -self.lr * array_namespace(d[2 * k + 1]).reshape(d[2 * k + 1], params[s.bias].shape)
        new = self.assemble(params, rec.grads, deltas)
        return new, new_state, step_info(value, self.all_deltas(params, rec.grads, deltas, self.lr), **extras)
