"""K-FAC and centered gradient descent: check C7 of shared/spec/acp.md §8, MC Fisher, the PSD solver.

References: explicit ``np.kron`` solves, complex-step gradients and per-example
``dL/dz`` (``tests/reference/``), ``numpy.linalg``.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import ALL_SLOW_BEYOND_ARRAY_API, REFERENCE, require
from cases import CENTERED_SGD_CASES, KFAC_CASES, case_id, case_model, case_problem, net
from curvcore import _linalg
from reference import assert_rel, grads, kfac_kron_step, layer_inputs, mc_delta, per_example_dz, softmax, to_np


def _deltas(new, old):
    return [a - b for a, b in zip(to_np(new), to_np(old))]


# --------------------------------------------------------------------------- C7 (K-FAC)
@pytest.mark.parametrize("backend", REFERENCE)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("case", KFAC_CASES["explicit_kronecker"], ids=case_id)
def test_c7_kfac_equals_explicit_kronecker_solve(backend, case, fisher):
    """C7: K-FAC == -lr (G_d kron A_d)^-1 vec_row([gW gb]) built with np.kron (<= 1e-10)."""
    assert case["activation"] == "tanh", "the MC reference below pulls back through tanh"
    model, params, x, y, loss = case_problem(backend, case)
    lr, damping, seed = 0.3, 1e-2, 5
    opt = cc.KFAC(lr=lr, damping=damping, refresh_every=1, fisher=fisher, seed=seed)
    state = opt.init(params)._replace(count=opt.init(params).count + 4)  # an MC draw at count 4
    new, _, info = opt.step(model, loss, params, state, x, y)
    got = _deltas(new, params)
    ps, xn, yn = to_np(params), cc.backends.to_numpy(x), cc.backends.to_numpy(y)
    g = grads(*net(case), ps, xn, yn)
    a = layer_inputs(case["sizes"], case["activation"], ps, xn)
    B = xn.shape[0]
    if fisher == "mc":  # per-example dl/dz at the sampled targets: the output delta pulled back layer by layer
        from reference import forward_from

        f = forward_from(case["sizes"], case["activation"], ps, xn)
        dout = mc_delta(case["loss"], f, seed, 4)
    for k in range(len(a)):
        if fisher == "empirical":
            delta = B * per_example_dz(*net(case), ps, xn, yn, k)
        else:
            delta = dout
            for j in range(len(a) - 1, k, -1):  # delta_k = (delta_{k+1} W_{k+1}) * tanh'(z_k)
                z = a[j]  # a[j] = tanh(z_{j-1})
                delta = (delta @ ps[2 * j]) * (1 - z ** 2)
        dW, db = kfac_kron_step(a[k], delta, g[2 * k], g[2 * k + 1], damping, lr)
        assert_rel(got[2 * k], dW, 1e-10, f"dW{k}")
        assert_rel(got[2 * k + 1], db, 1e-10, f"db{k}")
    assert float(info["refreshed"]) == 1.0


@pytest.mark.parametrize("backend", REFERENCE)
def test_kfac_refresh_interval_keeps_factors(backend):
    """With refresh_every=3 the inverses change only at counts 0, 3, 6 and are reused in between."""
    model, params, x, y, loss = case_problem(backend, KFAC_CASES["refresh"])
    opt = cc.KFAC(lr=0.1, refresh_every=3)
    state = opt.init(params)
    flags = []
    for t in range(7):
        state_before = state
        params, state, info = opt.step(model, loss, params, state, x, y)
        flags.append(float(info["refreshed"]))
        if t % 3:
            for a, b in zip(state.A_inv + state.G_inv, state_before.A_inv + state_before.G_inv):
                assert np.array_equal(cc.backends.to_numpy(a), cc.backends.to_numpy(b))
    assert flags == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("case", KFAC_CASES["mc_expectation"], ids=case_id)
def test_kfac_mc_fisher_matches_its_expectation(case):
    """Last layer: E[G_mc] = 1/B sum_i H_i (MSE: I; CE: diag p_i - p_i p_i^T); the error shrinks with repeats."""
    model, params, x, y, loss = case_problem("numpy", case)
    f = model.forward(params, x)
    B, n_out = f.shape
    expected = (np.eye(n_out) if case["loss"] == "mse"
                else sum(np.diag(p) - np.outer(p, p) for p in softmax(f)) / B)
    Gs = []
    for seed in range(400):
        opt = cc.KFAC(fisher="mc", seed=seed, damping=1e-2)
        st = opt.step(model, loss, params, opt.init(params), x, y)[1]
        Gs.append(np.linalg.inv(st.G_inv[-1]) - np.sqrt(opt.damping) * np.eye(n_out))
    errs = [np.max(np.abs(np.mean(Gs[:n], axis=0) - expected)) / np.max(np.abs(expected)) for n in (25, 400)]
    assert errs[1] < errs[0] and errs[1] < 0.15, errs
    # the same seed and count give the same draw; another count another one
    opt = cc.KFAC(fisher="mc", seed=3)
    s0 = opt.init(params)
    g1 = opt.step(model, loss, params, s0, x, y)[1].G_inv[-1]
    g2 = opt.step(model, loss, params, s0, x, y)[1].G_inv[-1]
    g3 = opt.step(model, loss, params, s0._replace(count=s0.count + 1), x, y)[1].G_inv[-1]
    assert np.array_equal(g1, g2) and not np.allclose(g1, g3)


def test_kfac_singular_factor_and_bad_loss():
    case = KFAC_CASES["singular"]
    model, params, x, y, loss = case_problem("numpy", case)
    opt = cc.KFAC(damping=0.0)
    with pytest.raises(ValueError, match=r"KFAC: the damped .* factor .* of dense layer 'layer \d' is not positive definite"):
        opt.step(model, loss, params, opt.init(params), x, y)

    class Other(cc.losses.MSE):
        name = "huber"

    opt = cc.KFAC(fisher="mc")
    with pytest.raises(ValueError, match="KFAC: fisher='mc' supports"):
        y_mse = cc.backends.asarray("numpy", np.zeros((case["batch"], case["sizes"][-1])))
        opt.step(model, Other(), params, opt.init(params), x, y_mse)


@pytest.mark.slow
def test_kfac_mc_refuses_jit():
    require("jax")
    import jax

    model, params, x, y, loss = case_problem("jax", KFAC_CASES["refresh"])
    opt = cc.KFAC(fisher="mc")
    with pytest.raises(TypeError, match="KFAC: fisher='mc'.*cannot run inside jax.jit"):
        jax.jit(lambda p, s: opt.step(model, loss, p, s, x, y))(params, opt.init(params))
    emp = cc.KFAC(refresh_every=2)
    jstep = jax.jit(lambda p, s: emp.step(model, loss, p, s, x, y))
    p, s = params, emp.init(params)
    for _ in range(3):
        p, s, _ = jstep(p, s)
    ref_model, ref_params, x0, y0, _ = case_problem("numpy", KFAC_CASES["refresh"])
    rs = emp.init(ref_params)
    for _ in range(3):
        ref_params, rs, _ = emp.step(ref_model, loss, ref_params, rs, x0, y0)
    for a, b in zip(to_np(p), ref_params):
        assert_rel(a, b, 1e-10, "jit K-FAC vs numpy")


# --------------------------------------------------------------------------- C7 (centered GD)
@pytest.mark.parametrize("backend", REFERENCE)
def test_c7_centered_gd_equals_sgd_on_zero_mean_inputs(backend):
    """C7: one layer whose inputs have zero batch mean: centered GD == SGD (<= 1e-13)."""
    case = CENTERED_SGD_CASES["zero_mean_inputs"]
    (n_in, n_out), B = case["sizes"], case["batch"]
    rng = np.random.default_rng(4)
    X = rng.standard_normal((B, n_in))
    X = X - X.mean(0)
    model, params = case_model(backend, case)
    x = cc.backends.asarray(backend, X)
    y = cc.backends.asarray(backend, rng.integers(0, n_out, B))
    loss = cc.losses.get(case["loss"])
    for bc in (False, True):
        c = cc.CenteredSGD(lr=0.3, bias_correction=bc)
        s = cc.SGD(lr=0.3)
        pc = to_np(c.step(model, loss, params, c.init(params), x, y)[0])
        ps = to_np(s.step(model, loss, params, s.init(params), x, y)[0])
        for k, (a, b) in enumerate(zip(pc, ps)):
            assert_rel(a, b, 1e-13, f"params[{k}]")


@pytest.mark.parametrize("backend", REFERENCE)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_centered_gd_matches_reference(backend, bias_correction):
    """Alg 3: dW = -lr sum_i g_i (a_i - abar)^T, db = -lr sum_i g_i (- dW abar), on a shifted MLP."""
    case = CENTERED_SGD_CASES["reference"]
    model, params, x, y, loss = case_problem(backend, case)
    opt = cc.CenteredSGD(lr=0.4, bias_correction=bias_correction)
    got = _deltas(opt.step(model, loss, params, opt.init(params), x, y)[0], params)
    ps, xn, yn = to_np(params), cc.backends.to_numpy(x), cc.backends.to_numpy(y)
    for k, a in enumerate(layer_inputs(case["sizes"], case["activation"], ps, xn)):
        g = per_example_dz(*net(case), ps, xn, yn, k)
        dW = -0.4 * g.T @ (a - a.mean(0))
        db = -0.4 * g.sum(0) - (dW @ a.mean(0) if bias_correction else 0)
        assert_rel(got[2 * k], dW, 1e-12, f"dW{k}")
        assert_rel(got[2 * k + 1], db, 1e-12, f"db{k}")


def test_centered_gd_bias_corrected_is_acp_with_identity_covariance():
    """bias_correction=True is ACP with C := I, alpha = 1, eps = 0 (spec §5)."""
    model, params, x, y, loss = case_problem("numpy", CENTERED_SGD_CASES["acp_identity_covariance"])
    acp = cc.ACP(lr=0.2, eps=0.0, alpha=1.0, refresh_every=1000)
    state = acp.init(params)._replace(count=acp.init(params).count + 1)  # no refresh at count 1
    state = state._replace(s=[np.ones_like(s) for s in state.s])
    pa = acp.step(model, loss, params, state, x, y)[0]
    c = cc.CenteredSGD(lr=0.2, bias_correction=True)
    pc = c.step(model, loss, params, c.init(params), x, y)[0]
    for k, (a, b) in enumerate(zip(pa, pc)):
        assert_rel(a, b, 1e-13, f"params[{k}]")


# --------------------------------------------------------------------------- cross-backend (C8 style)
@pytest.mark.parametrize("backend", ALL_SLOW_BEYOND_ARRAY_API)
@pytest.mark.parametrize("name", ["kfac", "centered_sgd"])
@pytest.mark.parametrize("steps", [1, 10])
def test_cross_backend(backend, name, steps):
    def run(b):
        model, params, x, y, loss = case_problem(b, KFAC_CASES["cross_backend"])
        opt = cc.get_method(name).make_test()
        state = opt.init(params)
        for _ in range(steps):
            params, state, _ = opt.step(model, loss, params, state, x, y)
        return to_np(params)

    for k, (a, b) in enumerate(zip(run(backend), run("numpy"))):
        assert_rel(a, b, 1e-10, f"{name} params[{k}]")


@pytest.mark.parametrize("backend", ALL_SLOW_BEYOND_ARRAY_API)
def test_kfac_mc_cross_backend(backend):
    def run(b):
        model, params, x, y, loss = case_problem(b, KFAC_CASES["mc_cross_backend"])
        opt = cc.KFAC(lr=0.1, fisher="mc", seed=7, refresh_every=2)
        state = opt.init(params)
        for _ in range(5):
            params, state, _ = opt.step(model, loss, params, state, x, y)
        return to_np(params)

    for k, (a, b) in enumerate(zip(run(backend), run("numpy"))):
        assert_rel(a, b, 1e-10, f"params[{k}]")


# --------------------------------------------------------------------------- _linalg.solve_psd
def test_solve_psd_native_and_fallback(backend):
    """solve_psd (scipy / torch / jax Cholesky, xp.linalg.solve fallback) == numpy.linalg.solve; errors."""
    rng = np.random.default_rng(0)
    M = rng.standard_normal((6, 6))
    A = M @ M.T + 0.1 * np.eye(6)
    b = rng.standard_normal((6, 2))
    put = lambda a: cc.backends.asarray(backend, a)  # noqa: E731
    assert_rel(cc.backends.to_numpy(_linalg.solve_psd(put(A), put(b))), np.linalg.solve(A, b), 1e-12, "matrix rhs")
    assert_rel(cc.backends.to_numpy(_linalg.solve_psd(put(A), put(b[:, 0]))), np.linalg.solve(A, b[:, 0]), 1e-12,
               "vector rhs")
    assert_rel(cc.backends.to_numpy(_linalg.inv_psd(put(A))), np.linalg.inv(A), 1e-12, "inverse")
    with pytest.raises(ValueError, match="my factor is not positive definite"):
        _linalg.solve_psd(put(np.zeros((3, 3))), put(np.ones(3)), what="my factor")
