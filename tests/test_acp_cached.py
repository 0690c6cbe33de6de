"""ACP's cached preconditioner over several steps across refreshes, against a dense float64 reference, and the
once-per-step decision whether the cached ``P`` was computed (no host sync per layer on an eager backend)."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import needs, params as backend_params
from reference import assert_rel, grads, layer_inputs, to_np

SIZES = [4, 6, 5, 3]


def _problem(backend, loss_name, sizes=SIZES, seed=5):
    model, params = cc.backends.mlp(backend, sizes, activation="tanh", seed=seed)
    rng = np.random.default_rng(seed)
    params = [cc.backends.asarray(backend, p + 0.1 * rng.standard_normal(p.shape)) for p in to_np(params)]
    x = rng.standard_normal((9, sizes[0])) + 0.6
    y = rng.standard_normal((9, sizes[-1])) if loss_name == "mse" else rng.integers(0, sizes[-1], size=9)
    return model, params, x, y


def _reference_step(ps, x, y, loss_name, covs, lr, alpha, eps):
    """Per layer ``ΔW = -lr Ĝ (αC + εI)⁻¹``, ``Δb = -(lr/α) ĝ - ΔW ā`` with ``Ĝ = ∇W - ĝ āᵀ`` (thesis eqs
    6.2.4-6.2.5), ``C`` the biased input covariance of the last refresh, gradients by complex step."""
    g = grads(SIZES, "tanh", loss_name, ps, x, y)
    new = []
    for k, a in enumerate(layer_inputs(SIZES, "tanh", ps, x)):
        gW, gb, a_bar = g[2 * k], g[2 * k + 1], a.mean(0)
        dW = -lr * np.linalg.solve((alpha * covs[k] + eps * np.eye(a.shape[1])).T, (gW - np.outer(gb, a_bar)).T).T
        new += [ps[2 * k] + dW, ps[2 * k + 1] - (lr / alpha) * gb - dW @ a_bar]
    return new


def _covariances(ps, x):
    return [np.cov(a, rowvar=False, bias=True) for a in layer_inputs(SIZES, "tanh", ps, x)]


@pytest.mark.parametrize("backend", backend_params(("numpy", "array_api_strict", "torch")))
@pytest.mark.parametrize("loss_name", ["mse", "ce"])
def test_steps_across_refreshes_equal_the_dense_reference(backend, loss_name):
    """Seven steps with ``refresh_every=3`` (refreshes at 0, 3, 6), one of them from a state whose ``P`` was
    zeroed by hand (recomputed from ``s, U``): every step equals the reference to 1e-10 relative."""
    lr, alpha, eps = 0.3, 0.4, 0.05
    model, params, x, y = _problem(backend, loss_name)
    opt = cc.ACP(lr=lr, eps=eps, alpha=alpha, refresh_every=3)
    state, ps = opt.init(params), to_np(params)
    xb, yb = cc.backends.asarray(backend, x), cc.backends.asarray(backend, y)
    for t in range(7):
        if t % 3 == 0:
            covs = _covariances(ps, x)
        if t == 4:
            state = state._replace(P=[P * 0 for P in state.P])
        params, state, info = opt.step(model, loss_name, params, state, xb, yb)
        want = _reference_step(ps, x, y, loss_name, covs, lr, alpha, eps)
        for k, (got, ref) in enumerate(zip(to_np(params), want)):
            assert_rel(got - ps[k], ref - ps[k], 1e-10, f"step {t} params[{k}]")
        assert float(info["refreshed"]) == float(t % 3 == 0)
        ps = to_np(params)


@needs("torch")
def test_the_cached_preconditioner_check_is_one_host_sync_per_step_not_one_per_layer(torch_syncs):
    """With ``validate=False`` an ACP step on torch converts as many tensors to Python values on a 2-layer
    net as on a 5-layer net (the refresh schedule and the "P computed" decision, once each)."""
    per_step = {}
    for sizes in ([4, 6, 3], [4, 6, 6, 6, 6, 3]):
        model, params, x, y = _problem("torch", "ce", sizes)
        x, y = cc.backends.asarray("torch", x), cc.backends.asarray("torch", y)
        opt = cc.ACP(refresh_every=2)
        opt.validate = False
        per_step[len(sizes) - 1] = torch_syncs.per_step(opt, model, params, x, y, steps=4)[0]
    assert per_step[2] == per_step[5], per_step
    assert max(per_step[5]) <= 2, per_step
