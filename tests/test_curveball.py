"""CurveBall against dense references: checks C1-C12 of shared/spec/curveball.md section 7.

Dense references come from tests/reference/ (complex-step Jacobians, the
explicit loss Hessian) or closed forms (Rosenbrock's Jacobian, least squares),
never from curvcore's own derivative code.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from array_api_compat import array_namespace

import curvcore as cc
from cases import CURVEBALL_CASES, case_id, case_problem, make_problem, net
from curvcore.backends.function import FunctionModel
from curvcore.methods.curveball import CurveBall
from reference import (DenseCurveBallStep, assert_rel, flatten, random_tree, rel, rosen_jac_np,
                       rosen_residual_np, state_with)

INFO_KEYS = {"loss", "rho", "beta", "lam", "lam_next", "gamma", "pred_change", "step_norm", "finite"}
W5 = 0.999**5
MSE_CASE, CE_CASE = CURVEBALL_CASES


def to_np(a):
    return cc.backends.to_numpy(a)


# ---------------------------------------------------------------------------
# Rosenbrock as a function model: params [w], w = (u, v), x = [[eps]], y = 0
# ---------------------------------------------------------------------------


def _rosen_jac(w, x):
    xp = array_namespace(w)
    s = 10 * xp.sqrt(x[0, 0])
    zero = xp.zeros_like(w[0])
    return xp.stack([xp.stack([zero - 1, zero]), xp.stack([-2 * s * w[0], zero + s])])


def _rosen_forward(p, x):
    xp = array_namespace(p[0])
    w = p[0]
    r = xp.stack([1 - w[0], 10 * xp.sqrt(x[0, 0]) * (w[1] - w[0] ** 2)])
    return xp.reshape(r, (1, 2))


def _rosen_jvp(p, x, t):
    xp = array_namespace(p[0])
    return _rosen_forward(p, x), xp.reshape(xp.matmul(_rosen_jac(p[0], x), t[0]), (1, 2))


def _rosen_vjp(p, x):
    xp = array_namespace(p[0])
    return _rosen_forward(p, x), lambda u: [xp.matmul(u[0, :], _rosen_jac(p[0], x))]


ROSEN = FunctionModel(_rosen_forward, _rosen_jvp, _rosen_vjp)


def rosenbrock_steps(lam, start, eps_rng=None, lims=(1.0, 1.0), max_iter=1000):
    """Steps until ||w - (1, 1)|| < 1e-4 (spec section 6), or ``None``."""
    opt = CurveBall(lam=lam)
    opt.validate = False
    params = [np.array(start, dtype=float)]
    state = opt.init(params)
    y = np.zeros((1, 2))
    loss = cc.losses.MSE()
    for k in range(1, max_iter + 1):
        eps = 1.0 if eps_rng is None else eps_rng.uniform(*lims)
        params, state, _ = opt.step(ROSEN, loss, params, state, np.full((1, 1), eps), y)
        if np.linalg.norm(params[0] - 1.0) < 1e-4:
            return k
    return None


# ---------------------------------------------------------------------------
# C1 - C3: one step against the dense GGN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CURVEBALL_CASES, ids=case_id)
def test_c1_dz_matches_dense_ggn(backend, case):
    """dz = (G + lam I) z + g to 1e-10, read off a fixed-mode step with rho = 0, beta = 1 (z_new = -dz)."""
    model, params, x, y, lossf = case_problem(backend, case)
    z = random_tree(backend, params, 5)
    opt = CurveBall(auto=False, rho=0.0, beta=1.0, auto_lam=False)
    _, state, _ = opt.step(model, lossf, params, state_with(backend, params, z, 0.7), x, y)
    ref = DenseCurveBallStep(*net(case), params, x, y, z, 0.7)
    assert_rel(-flatten(state.z), ref.dz, 1e-10, "dz")


@pytest.mark.parametrize("lr", [1.0, 0.6])
@pytest.mark.parametrize("case", CURVEBALL_CASES, ids=case_id)
def test_c2_two_by_two_matches_dense_minimiser(backend, case, lr):
    model, params, x, y, lossf = case_problem(backend, case)
    z = random_tree(backend, params, 6, 0.3)
    opt = CurveBall(lr=lr, auto_lam=False)
    new, state, info = opt.step(model, lossf, params, state_with(backend, params, z, 0.7), x, y)
    ref = DenseCurveBallStep(*net(case), params, x, y, z, 0.7, lr)
    assert_rel([float(info["beta"]), float(info["rho"])], [ref.beta, ref.rho], 1e-8, "(beta, rho)")
    assert_rel(flatten(state.z), ref.z_new(), 1e-8, "z_new")
    assert_rel(flatten(new), flatten(params) + lr * ref.z_new(), 1e-10, "params")
    assert_rel(float(info["pred_change"]), ref.q(lr * ref.z_new()), 1e-10, "pred_change = q(lr z_new)")
    if lr == 1.0:  # closed form at the minimiser: M = -1/2 (beta b1 - rho b2)
        beta, rho = float(info["beta"]), float(info["rho"])
        closed = -0.5 * (beta * ref.b1 - rho * ref.b2)
        assert rel(float(info["pred_change"]), closed) <= 1e-12
    assert set(info) == INFO_KEYS


@pytest.mark.parametrize("case", CURVEBALL_CASES, ids=case_id)
def test_c3_first_step_is_exact_line_search(backend, case):
    model, params, x, y, lossf = case_problem(backend, case)
    opt = CurveBall(lam=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, state, info = opt.step(model, lossf, params, opt.init(params), x, y)
    ref = DenseCurveBallStep(*net(case), params, x, y, [0 * p for p in params], 0.7)
    g = ref.g
    beta = (g @ g) / (g @ ref.Gl @ g)
    assert abs(float(info["rho"])) <= 1e-10 * beta
    assert_rel(float(info["beta"]), beta, 1e-10, "beta")
    assert_rel(flatten(new), flatten(params) - beta * g, 1e-10, "theta_1")
    assert all(np.isfinite(float(v)) for v in info.values()), info


def test_zero_gradient_gives_no_step():
    """A = 0 at z = 0 (zero gradient): rho = beta = 0, no error, params unchanged."""
    model, params = cc.backends.mlp("numpy", [3, 2], activation="identity")
    x = np.random.default_rng(0).standard_normal((4, 3))
    y = model.forward(params, x)  # already at the minimum
    opt = CurveBall(lam=0.0)
    new, _, info = opt.step(model, cc.losses.MSE(), params, opt.init(params), x, y)
    assert float(info["rho"]) == 0.0 and float(info["beta"]) == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(new, params))


# ---------------------------------------------------------------------------
# C4 - C6
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps_lims", [(1.0, 1.0), (0.0, 3.0)])
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_c4_two_parameters_is_levenberg_marquardt(lam, eps_lims):
    """On Rosenbrock span{dz, z} = R^2: from step 2 on z_new = -(G + lam I)^-1 g."""
    opt = CurveBall(lam=lam)
    params, y = [np.array([-1.2, 1.0])], np.zeros((1, 2))
    state = opt.init(params)
    rng = np.random.default_rng(3)
    for k in range(1, 9):
        eps = rng.uniform(*eps_lims)
        w = params[0].copy()
        params, state, info = opt.step(ROSEN, cc.losses.MSE(), params, state, np.full((1, 1), eps), y)
        if k >= 2:
            J, r = rosen_jac_np(w, eps), rosen_residual_np(w, eps)
            lm = -np.linalg.solve(J.T @ J + float(info["lam"]) * np.eye(2), J.T @ r)
            assert_rel(state.z[0], lm, 1e-8, f"z_new at step {k}")


@pytest.mark.parametrize("lam, ref_steps", [(0.0, 31), (0.01, 30), (1.0, 43)])
def test_c5_convex_quadratic(lam, ref_steps):
    rng = np.random.default_rng(0)
    A, Y = rng.standard_normal((50, 5)), rng.standard_normal((50, 2))
    model, params = cc.backends.mlp("numpy", [5, 2], activation="identity")
    params = [np.zeros_like(p) for p in params]
    coef = np.linalg.lstsq(np.hstack([A, np.ones((50, 1))]), Y, rcond=None)[0]
    star = np.concatenate([coef[:5].T.ravel(), coef[5]])
    loss = cc.losses.MSE()
    opt = CurveBall(lam=lam, auto_lam=False)
    state = opt.init(params)
    prev, hit = float(loss.value(model.forward(params, A), Y)), None
    for k in range(1, 61):
        params, state, _ = opt.step(model, loss, params, state, A, Y)
        cur = float(loss.value(model.forward(params, A), Y))
        assert cur <= prev * (1 + 1e-14), f"loss increased at step {k}: {prev!r} -> {cur!r}"
        prev = cur
        if hit is None and np.max(np.abs(flatten(params) - star)) < 1e-8:
            hit = k
    assert hit is not None, "not within 1e-8 of the least-squares solution after 60 steps"
    assert abs(hit - ref_steps) <= 10, (hit, ref_steps)


def test_c6_fixed_mode(backend):
    model, params, x, y, lossf = case_problem(backend, CE_CASE)
    z = random_tree(backend, params, 7, 0.5)
    opt = CurveBall(auto=False, rho=0.9, beta=0.05, lr=0.5, auto_lam=False)
    new, state, info = opt.step(model, lossf, params, state_with(backend, params, z, 0.7), x, y)
    ref = DenseCurveBallStep(*net(CE_CASE), params, x, y, z, 0.7)
    expected = flatten(params) + 0.5 * (0.9 * ref.z - 0.05 * ref.dz)
    assert_rel(flatten(new), expected, 1e-12, "theta + lr (rho z - beta dz)")
    assert float(info["rho"]) == 0.9 and float(info["beta"]) == 0.05
    assert math.isnan(float(info["pred_change"])) and math.isnan(float(info["gamma"]))


def test_fixed_mode_with_lambda_rule_uses_exact_model_change():
    """auto=False with auto_lam: M = q(lr z_new) is computed on adaptation steps only."""
    model, params, x, y, lossf = case_problem("numpy", MSE_CASE)
    z = random_tree("numpy", params, 8, 0.2)
    opt = CurveBall(auto=False, rho=0.5, beta=0.2, lr=0.8)
    _, _, info = opt.step(model, lossf, params, state_with("numpy", params, z, 0.7), x, y)
    ref = DenseCurveBallStep(*net(MSE_CASE), params, x, y, z, 0.7)
    assert_rel(float(info["pred_change"]), ref.q(0.8 * ref.z_new(0.5, 0.2)), 1e-10, "M (fixed mode)")
    _, _, info = opt.step(model, lossf, params, state_with("numpy", params, z, 0.7, count=1), x, y)
    assert math.isnan(float(info["pred_change"]))


# ---------------------------------------------------------------------------
# C7: the lambda rule with a stub loss
# ---------------------------------------------------------------------------


def stub_loss(base, f1):
    """``base`` whose value is genuine at the first call and ``f1`` afterwards."""

    class Stub(type(base)):
        calls = 0

        def value(self, f, y):
            Stub.calls += 1
            v = super().value(f, y)
            return v if Stub.calls == 1 else 0 * v + float(f1)

    return Stub()


@pytest.mark.parametrize("gamma, factor", [(0.3, 1 / W5), (1.0, 1.0), (2.0, W5)])
def test_c7_lambda_rule(backend, gamma, factor):
    model, params, x, y, lossf = case_problem(backend, CE_CASE)
    z = random_tree(backend, params, 9, 0.3)
    ref = DenseCurveBallStep(*net(CE_CASE), params, x, y, z, 0.7)
    f0 = float(lossf.value(model.forward(params, x), y))
    M = ref.q(ref.z_new())
    opt = CurveBall()
    # count 0: an adaptation step
    stub = stub_loss(lossf, f0 + gamma * M)
    _, state, info = opt.step(model, stub, params, state_with(backend, params, z, 0.7), x, y)
    assert type(stub).calls == 2, "one extra loss evaluation (one forward) on an adaptation step"
    assert abs(float(info["gamma"]) - gamma) <= 1e-6 * gamma
    assert_rel(float(state.lam), 0.7 * factor, 1e-15, "lam_next")
    assert float(info["lam"]) == 0.7 and float(info["lam_next"]) == float(state.lam)
    # counts 1-4: no adaptation, no extra forward
    for count in range(1, 5):
        stub = stub_loss(lossf, f0 + 0.3 * M)
        _, state, info = opt.step(model, stub, params, state_with(backend, params, z, 0.7, count), x, y)
        assert type(stub).calls == 1
        assert float(state.lam) == 0.7 and math.isnan(float(info["gamma"]))


def test_c7_every_step_with_interval_one():
    model, params, x, y, lossf = case_problem("numpy", CE_CASE)
    z = random_tree("numpy", params, 9, 0.3)
    ref = DenseCurveBallStep(*net(CE_CASE), params, x, y, z, 0.7)
    f0 = float(lossf.value(model.forward(params, x), y))
    opt = CurveBall(lam_interval=1)
    for count in range(4):
        _, state, info = opt.step(model, stub_loss(lossf, f0 + 0.3 * ref.q(ref.z_new())), params,
                                  state_with("numpy", params, z, 0.7, count), x, y)
        assert_rel(float(state.lam), 0.7 / 0.999, 1e-15, f"lam at count {count}")


def test_nonnegative_model_change_skips_rule():
    """M >= 0 (fixed mode, an uphill beta): gamma = NaN and lam unchanged."""
    model, params, x, y, lossf = case_problem("numpy", MSE_CASE)
    opt = CurveBall(auto=False, rho=0.0, beta=-0.1)
    _, state, info = opt.step(model, lossf, params, opt.init(params), x, y)
    assert float(info["pred_change"]) > 0 and math.isnan(float(info["gamma"]))
    assert float(state.lam) == 1.0


# ---------------------------------------------------------------------------
# C8 - C10: reproductions (spec section 6)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("lam, start, expected", [
    (0.1, (-1.2, 1.0), 11), (0.1, (-1.5, 2.0), 13), (1.0, (-1.2, 1.0), 52), (1.0, (-1.5, 2.0), 54),
])
def test_c8_rosenbrock_deterministic(lam, start, expected):
    steps = rosenbrock_steps(lam, start)
    assert steps is not None and abs(steps - expected) <= 1, steps


@pytest.mark.slow
@pytest.mark.parametrize("lims, ref_mean", [((1.0, 1.0), 10.7), ((0.0, 1.0), 10.5), ((0.0, 3.0), 10.8)])
def test_c8_rosenbrock_table_protocol(lims, ref_mean):
    rng = np.random.default_rng(0)
    starts = [(rng.uniform(-2, 2), rng.uniform(-1, 3)) for _ in range(100)]
    steps = [rosenbrock_steps(0.1, s, np.random.default_rng(1000 + r), lims) for r, s in enumerate(starts)]
    assert all(s is not None for s in steps), "some runs did not converge within 1000 steps"
    assert abs(np.mean(steps) - ref_mean) <= 0.5 and max(steps) <= 20, (np.mean(steps), max(steps))


@pytest.mark.slow
def test_c9_rahimi_recht():
    rng = np.random.default_rng(0)
    U, V = np.linalg.qr(rng.standard_normal((6, 6)))[0], np.linalg.qr(rng.standard_normal((6, 6)))[0]
    A = U @ np.diag(np.logspace(0, -5, 6)) @ V.T
    X = rng.standard_normal((1000, 6))
    Y = X @ A.T
    loss, counts = cc.losses.MSE(), []
    for seed in range(10):
        model, params = cc.backends.mlp("numpy", [6, 6, 6], activation="identity", seed=seed)
        opt = CurveBall(lam=0.1)
        state = opt.init(params)
        for k in range(1, 151):
            params, state, _ = opt.step(model, loss, params, state, X, Y)
            if float(loss.value(model.forward(params, X), Y)) < 1e-4:
                counts.append(k)
                break
        else:
            pytest.fail(f"seed {seed} did not reach 1e-4 in 150 steps")
    assert 15 <= np.mean(counts) <= 60, counts


def digits_run(lam, steps=150):
    from sklearn.datasets import load_digits

    d = load_digits()
    X, labels = d.data / 16.0, d.target.astype(np.int64)
    model, params = cc.backends.mlp("numpy", [64, 32, 10], activation="tanh", seed=0)
    loss, opt = cc.losses.CrossEntropy(), CurveBall(lam=lam)
    state, rng, k = opt.init(params), np.random.default_rng(0), 0
    while k < steps:
        order = rng.permutation(len(X))
        for i in range(0, len(X) - 99, 100):
            idx = order[i:i + 100]
            params, state, _ = opt.step(model, loss, params, state, X[idx], labels[idx])
            k += 1
            if k == steps:
                break
    f = model.forward(params, X)
    return float(loss.value(f, labels)), float(np.mean(np.argmax(f, axis=1) == labels))


def test_c10_digits():
    value, acc = digits_run(1.0)
    assert value <= 0.2 and acc >= 0.95, (value, acc)
    value, _ = digits_run(0.1)
    assert value <= 0.08, value


# ---------------------------------------------------------------------------
# C11: cross-backend
# ---------------------------------------------------------------------------


def run_steps(backend, n_steps):
    model, params, x, y, lossf = make_problem(backend, sizes=(8, 6, 4), activation="tanh", loss="ce",
                                              batch=16, seed=3)
    opt = cc.get_method("curveball").make_test()
    state, infos = opt.init(params), []
    for _ in range(n_steps):
        params, state, info = opt.step(model, lossf, params, state, x, y)
        infos.append({k: float(v) for k, v in info.items()})
    return params, state, infos


@pytest.mark.parametrize("n_steps", [1, 10])
def test_c11_cross_backend(backend, n_steps):
    p_ref, s_ref, i_ref = run_steps("numpy", n_steps)
    p, s, infos = run_steps(backend, n_steps)
    assert_rel(flatten(p), flatten(p_ref), 1e-10, "params")
    assert_rel(flatten(s.z), flatten(s_ref.z), 1e-10, "state.z")
    assert_rel(float(s.lam), float(s_ref.lam), 1e-10, "state.lam")
    assert int(s.count) == n_steps
    for k, (a, b) in enumerate(zip(infos, i_ref)):
        for key in INFO_KEYS:
            if math.isnan(b[key]):
                assert math.isnan(a[key]), (k, key)
            else:
                assert rel(a[key], b[key]) <= 1e-10, (k, key, a[key], b[key])


# ---------------------------------------------------------------------------
# C12: bad input, and the constructor
# ---------------------------------------------------------------------------


def test_c12_bad_input(backend):
    model, params, x, y, lossf = case_problem(backend, CE_CASE)
    opt = CurveBall()
    state = opt.init(params)
    snapshot = flatten(params)
    xn = to_np(x).copy()
    xn[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"\bx\b"):
        opt.step(model, lossf, params, state, cc.backends.asarray(backend, xn), y)
    bad = [to_np(p).copy() for p in params]
    bad[2][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"params\[2\]"):
        opt.step(model, lossf, [cc.backends.asarray(backend, p) for p in bad], state, x, y)
    with pytest.raises(ValueError, match="state.z"):
        opt.step(model, lossf, params, state._replace(z=state.z[:-1]), x, y)
    with pytest.raises(ValueError, match=r"state.z\[0\]"):
        opt.step(model, lossf, params, state._replace(z=[state.z[1], state.z[0], *state.z[2:]]), x, y)
    huge = random_tree(backend, params, 4, 1e200)  # finite z whose <z, z> overflows
    with pytest.raises(FloatingPointError, match="2x2 system"), np.errstate(all="ignore"):
        opt.step(model, lossf, params, state_with(backend, params, huge, 1.0), x, y)
    np.testing.assert_array_equal(flatten(params), snapshot)


def test_overflowing_dz_raises():
    model, params, x, y, lossf = case_problem("numpy", MSE_CASE)
    z = random_tree("numpy", params, 4, 1e306)
    opt = CurveBall(lam=1e10)
    with pytest.raises(FloatingPointError, match="dz"), np.errstate(all="ignore"):
        opt.step(model, lossf, params, state_with("numpy", params, z, 1e10), x, y)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"lam": -0.1}, "lam"), ({"lam": math.nan}, "lam"),
    ({"lam_interval": 0}, "lam_interval"), ({"lam_interval": 2.5}, "lam_interval"),
    ({"lam_factor": 0.0}, "lam_factor"), ({"lam_factor": 1.5}, "lam_factor"),
    ({"lam_low": 2.0, "lam_high": 1.0}, "lam_low"), ({"rcond": -1.0}, "rcond"),
    ({"rho": math.inf}, "rho"), ({"beta": "a"}, "beta"), ({"auto": 1}, "auto"),
])
def test_constructor_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CurveBall(**kwargs)


def test_auto_lam_with_fixed_mode_is_allowed():
    opt = CurveBall(auto=False, auto_lam=True)
    assert opt.auto is False and opt.auto_lam is True


# ---------------------------------------------------------------------------
# purity, dtype stability, any params list, jax.jit
# ---------------------------------------------------------------------------


def test_pure_and_dtype_stable():
    model, params, x, y, lossf = case_problem("numpy", CE_CASE)
    opt = CurveBall()
    state0 = opt.init(params)
    p_copy = [p.copy() for p in params]
    a = opt.step(model, lossf, params, state0, x, y)
    b = opt.step(model, lossf, params, state0, x, y)
    assert all(np.array_equal(u, v) for u, v in zip(params, p_copy)), "params mutated"
    assert all(np.array_equal(u, v) for u, v in zip(flatten(a[0]), flatten(b[0]))), "hidden state"
    state = a[1]
    for old, new in zip([*state0.z, state0.lam, state0.count], [*state.z, state.lam, state.count]):
        assert new.shape == old.shape and new.dtype == old.dtype


def test_float32():
    model, params, x, y, lossf = make_problem("numpy", sizes=(4, 5, 3), loss="ce", batch=7, dtype="float32")
    opt = CurveBall()
    new, state, info = opt.step(model, lossf, params, opt.init(params), x, y)
    assert all(p.dtype == np.float32 for p in new) and state.lam.dtype == np.float32
    assert all(v.dtype == np.float32 for k, v in info.items() if k != "finite")
    assert info["finite"].dtype == np.bool_


def test_function_model_any_params_list(array_api_backend):
    """A params list that is not W/b pairs: Rosenbrock as [w], on numpy and array_api_strict."""
    xp = cc.backends.namespace(array_api_backend)
    opt = CurveBall(lam=0.1)
    params = [cc.backends.asarray(array_api_backend, np.array([-1.2, 1.0]))]
    state = opt.init(params)
    x, y = xp.ones((1, 1), dtype=xp.float64), xp.zeros((1, 2), dtype=xp.float64)
    for _ in range(11):
        params, state, _ = opt.step(ROSEN, cc.losses.MSE(), params, state, x, y)
    assert np.linalg.norm(to_np(params[0]) - 1.0) < 1e-4


def test_function_model_checks():
    with pytest.raises(TypeError, match="jvp"):
        FunctionModel(_rosen_forward, None, _rosen_vjp)
    bad = FunctionModel(_rosen_forward, lambda p, x, t: (_rosen_forward(p, x), t[0]), _rosen_vjp)
    w, x = [np.array([0.5, 0.5])], np.ones((1, 1))
    with pytest.raises(ValueError, match="jvp returned"):
        bad.jvp(w, x, w)
    with pytest.raises(ValueError, match="tangent"):
        ROSEN.jvp(w, x, [np.ones(3)])
    _, pull = ROSEN.vjp(w, x)
    with pytest.raises(ValueError, match="cotangent"):
        pull(np.ones((2, 1)))
    with pytest.raises(TypeError, match="needs model.layers"):
        opt = cc.KFAC()
        opt.step(ROSEN, "mse", w, opt.init([np.ones((2, 3)), np.ones(2)]), x, np.zeros((1, 2)))


@pytest.fixture
def jax_cond():
    """JAX with ``jax.lax.cond`` registered in curvcore._control (by the adapter when it exists)."""
    jax = pytest.importorskip("jax")
    from curvcore import _control

    try:
        import curvcore.backends.jax  # noqa: F401  (registers lax.cond)
        cond_fn = None
    except Exception:
        cond_fn = lambda pred, t, f, *ops: jax.lax.cond(pred, t, f, *ops)  # noqa: E731
        _control.register_cond(lambda p: isinstance(p, jax.core.Tracer), cond_fn)
    yield jax
    if cond_fn is not None:
        _control.unregister_cond(cond_fn)


@pytest.mark.parametrize("auto", [True, False])
def test_jax_jit(jax_cond, auto):
    """A JAX function model: the step compiles once (no recompiles) and the jitted steps equal
    the NumPy array-API MLP's to 1e-10 (as C11) over 7 steps, including every info entry."""
    jax = jax_cond
    jnp = jax.numpy

    def forward(p, x):
        return jnp.matmul(jnp.tanh(jnp.matmul(x, p[0].T) + p[1]), p[2].T) + p[3]

    def vjp(p, x):
        out, pull = jax.vjp(lambda q: forward(q, x), p)
        return out, lambda u: pull(u)[0]

    model = FunctionModel(forward, lambda p, x, t: jax.jvp(lambda q: forward(q, x), (p,), (t,)), vjp)
    np_model, np_params, xn, yn, loss = case_problem("numpy", CE_CASE, sizes=(5, 4, 3), batch=9)
    opt = CurveBall(lam=0.5, auto=auto, rho=0.5, beta=0.01, lam_interval=3)
    traces = []

    def step(p, s, x, y):
        traces.append(1)
        return opt.step(model, loss, p, s, x, y)

    jitted = jax.jit(step)
    p_jit = [jnp.asarray(p) for p in np_params]
    s_jit, s_np = opt.init(p_jit), opt.init(np_params)
    x, y = jnp.asarray(xn), jnp.asarray(yn)
    for k in range(7):
        np_params, s_np, i_np = opt.step(np_model, loss, np_params, s_np, xn, yn)
        p_jit, s_jit, i_jit = jitted(p_jit, s_jit, x, y)
        assert_rel(flatten(p_jit), flatten(np_params), 1e-10, f"params at step {k}")
        for key in INFO_KEYS:
            a, b = float(i_jit[key]), float(i_np[key])
            assert (math.isnan(a) and math.isnan(b)) or rel(a, b) <= 1e-10, (k, key, a, b)
    assert len(traces) == 1, "CurveBall.step recompiled under jax.jit"
