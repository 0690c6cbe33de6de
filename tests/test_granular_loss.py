"""The GranularLoss protocol: ESN and MK get the granular term ``q = A⁺ĝ_n`` from the loss, so a user's loss
that provides it runs through them, one without it is refused before the step, and MSE's and CrossEntropy's
closed forms equal a dense pseudo-inverse in float64."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from curvcore import protocol as P
from backend_list import params as backend_params

METHODS = [
    pytest.param(lambda: cc.MK(lr=0.1), id="MK"),
    pytest.param(lambda: cc.ESN(lr=0.1), id="ESN-randomized"),
    pytest.param(lambda: cc.ESN(lr=0.1, estimator="ema", solver="sylvester", granular=True), id="ESN-ema-granular"),
    pytest.param(lambda: cc.ESN(lr=0.1, variant="saddle_free"), id="ESN-saddle_free"),
]


class HalfSquares(cc.losses.Loss):
    """``(1/2B) Σ ||f - y||²`` written here (not an MSE subclass), with its granular term: ``A = I``, ``q = ĝ``."""

    def value(self, f, y):
        return ((f - y) ** 2).sum() / (2 * f.shape[0])

    def grad(self, f, y):
        return (f - y) / f.shape[0]

    def hvp(self, f, y, v):
        return v / f.shape[0]

    def granular_term(self, f, y, ghat_n):
        return ghat_n, (ghat_n * ghat_n).sum(axis=1)

    def granular_share(self, gq, ghat_n):
        return (np.abs(ghat_n).sum(axis=1) > 0).astype(gq.dtype)


class DuckHalfSquares:
    """The same loss without curvcore's base class: the protocol alone is what a method needs."""

    value, grad, hvp = HalfSquares.value, HalfSquares.grad, HalfSquares.hvp
    granular_term, granular_share = HalfSquares.granular_term, HalfSquares.granular_share


class NoGranular(cc.losses.Loss):
    """A loss with value/grad/hvp but no granular term."""

    value, grad, hvp = HalfSquares.value, HalfSquares.grad, HalfSquares.hvp


class CountingModel:
    """A model that counts its recorded passes (to show the refusal comes first)."""

    def __init__(self, model):
        self.model, self.passes = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def layers(self, *args, **kwargs):
        self.passes += 1
        return self.model.layers(*args, **kwargs)


def _problem(loss="mse", seed=0):
    model, params = cc.backends.mlp("numpy", [4, 6, 3], activation="tanh", seed=seed)
    rng = np.random.default_rng(seed + 1)
    params = [p + 0.1 * rng.standard_normal(p.shape) if p.ndim == 1 else p for p in params]
    x = rng.standard_normal((5, 4))
    y = rng.standard_normal((5, 3)) if loss == "mse" else rng.integers(0, 3, size=5)
    return model, params, x, y


def test_the_losses_are_granular_losses():
    for loss in (cc.losses.MSE(), cc.losses.CrossEntropy(), HalfSquares()):
        assert isinstance(loss, P.GranularLoss) and P.satisfies(loss, P.GranularLoss)
    assert not P.satisfies(NoGranular(), P.GranularLoss) and P.satisfies(NoGranular(), P.Loss)
    assert P.members(P.GranularLoss) == ("grad", "granular_share", "granular_term", "hvp", "value")


@pytest.mark.parametrize("make", METHODS)
def test_a_user_loss_with_the_protocol_steps_like_mse(make):
    """Three steps with the user's loss equal three MSE steps (params, state and info) to 1e-12 relative."""
    model, params, x, y = _problem()
    runs = []
    for loss in (cc.losses.MSE(), HalfSquares(), DuckHalfSquares()):
        opt = make()
        p, state = params, opt.init(params)
        for _ in range(3):
            p, state, info = opt.step(model, loss, p, state, x, y)
        runs.append((p, info))
    (p_mse, info_mse), *users = runs
    for p_user, info_user in users:
        for got, want in zip(p_user, p_mse):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.max(np.abs(want)))
        assert float(info_user["loss"]) == pytest.approx(float(info_mse["loss"]), rel=1e-12)
    moved = max(np.max(np.abs(a - b)) for a, b in zip(p_mse, params))
    assert moved > 1e-3  # the steps did something


@pytest.mark.parametrize("make", METHODS)
def test_a_loss_without_the_protocol_is_refused_before_the_step(make):
    model, params, x, y = _problem()
    counting = CountingModel(model)
    before = [p.copy() for p in params]
    opt = make()
    state = opt.init(params)
    with pytest.raises(NotImplementedError, match=r"GranularLoss.*MSE and CrossEntropy; got NoGranular"):
        opt.step(counting, NoGranular(), params, state, x, y)
    assert counting.passes == 0
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)


def _dense(loss_name, f, y):
    """Per sample the dense output Hessian ``A`` of ``ℓ_p`` and ``ĝ = dℓ_p/df`` (B, C, C), (B, C), in float64."""
    As, gs = [], []
    for fp, yp in zip(f, y):
        if loss_name == "mse":  # ℓ_p = ½||f - y||²
            As.append(np.eye(fp.size))
            gs.append(fp - yp)
        else:  # ℓ_p = logsumexp(f) - f_y
            p = np.exp(fp - fp.max())
            p = p / p.sum()
            As.append(np.diag(p) - np.outer(p, p))
            gs.append(p - np.eye(fp.size)[int(yp)])
    return np.array(As), np.array(gs)


def _pinv_apply(A, g):
    return np.array([np.linalg.pinv(a, rcond=1e-13) @ v for a, v in zip(A, g)])


@pytest.mark.parametrize("backend", backend_params(("numpy", "array_api_strict", "torch")))
@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_closed_forms_equal_a_dense_pseudo_inverse(backend, loss_name):
    rng = np.random.default_rng(3)
    B, C = 6, 4
    f = rng.standard_normal((B, C)) * 2
    y = rng.standard_normal((B, C)) if loss_name == "mse" else rng.integers(0, C, size=B)
    A, g = _dense(loss_name, f, y)
    q_ref = _pinv_apply(A, g)
    loss = cc.losses.get(loss_name)
    on = lambda a: cc.backends.asarray(backend, a)  # noqa: E731
    q, gq = (cc.backends.to_numpy(t) for t in loss.granular_term(on(f), on(y), on(g)))
    np.testing.assert_allclose(q, q_ref, rtol=0, atol=1e-12 * np.max(np.abs(q_ref)))
    np.testing.assert_allclose(gq, np.sum(g * q_ref, 1), rtol=1e-12)

    g[2] = 0.0  # a sample with ĝ_n = 0 has share 0
    gq_in = np.sum(g * _pinv_apply(A, g), 1)
    share = cc.backends.to_numpy(loss.granular_share(on(gq_in), on(g)))
    keep = np.arange(B) != 2
    assert share[2] == 0.0
    if loss_name == "mse":  # q = ĝ: exactly 1
        np.testing.assert_array_equal(share[keep], np.ones(B - 1))
    else:
        np.testing.assert_allclose(share[keep], gq_in[keep] / np.sum(g * g, 1)[keep], rtol=1e-12)


def test_ce_floors_an_underflowed_p_y_at_the_smallest_normal():
    """``p_y = exp(-800)`` underflows to 0 in float64: ``q`` and ``ĝᵀq`` stay finite, with ``p_y = 2^-1022``."""
    f = np.array([[0.0, 800.0, 0.0]])
    y = np.array([0])
    q, gq = cc.losses.CrossEntropy().granular_term(f, y, f)
    tiny = np.finfo(np.float64).smallest_normal
    np.testing.assert_array_equal(q, (np.array([[1 / 3, 1 / 3, 1 / 3]]) - np.array([[1.0, 0, 0]])) / tiny)
    np.testing.assert_array_equal(gq, np.array([(1 - tiny) / tiny]))
