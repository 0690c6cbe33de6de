"""PseudoHessian (spec pseudo_hessian.md): checks C1-C11 of Sec. 9, the cubic solver, API and bad input.

References are independent of curvcore's derivative code: dense Hessians by
``torch.func.hessian`` (tests/reference/), complex-step gradients and
central differences, closed forms, and scipy's BFGS for the cubic model.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import EAGER, param, params, require, skipped
from cases import PSEUDO_HESSIAN_CASES, case_id, case_problem, make_problem
from curvcore.methods import _cubic
from curvcore.methods import pseudo_hessian as ph
from reference import (assert_rel, cubic_model, cubic_model_grad, dense_hessian, flatten, grad_cs, group_dirs,
                       hessian_fd, loss_of_theta, shapes_of, torch_grad, torch_loss_of_theta, unflatten)

try:  # the dense autodiff references; the tests that use them are marked needs_torch
    import torch
except ImportError:  # the NumPy and JAX tests still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="the dense autodiff reference needs torch")

# Backends: JAX runs eagerly op by op here (tens of seconds of one-off compilations for the small
# S x S ops), so its instances are marked slow; they still run in CI with the slow tests.
EVERY = params(EAGER) + [param("jax", slow=True)]
NO_JAX = EVERY[:-1]  # checks whose JAX instance would only repeat one-off eager compilations
REG_GRID = [pytest.param(b.values[0], reg, marks=b.marks, id=f"{b.id}-{reg}") for b in NO_JAX for reg in ("none", "cubic")
            ] + [pytest.param(EVERY[-1].values[0], "cubic", marks=EVERY[-1].marks, id="jax-cubic")]
ARRAY_API = params(("numpy", "array_api_strict"))

GROUPS = ["tensor", "layer", "wb", "one", [0, 1, 1, 0]]
NETS = PSEUDO_HESSIAN_CASES


def _np(a):
    return cc.backends.to_numpy(a)


# ---------------------------------------------------------------------------
# loss.d3 (added by the lead for this method) against differences of loss.hvp
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("backend", NO_JAX)
def test_loss_d3_matches_richardson_differences_of_hvp(backend, loss_name):
    rng = np.random.default_rng(5)
    f = rng.standard_normal((6, 4)) * 2
    y = rng.integers(0, 4, 6) if loss_name == "ce" else rng.standard_normal((6, 4))
    v = rng.standard_normal((6, 4))
    loss = cc.losses.get(loss_name)
    put = lambda a: cc.backends.asarray(backend, a)  # noqa: E731

    def q(h):  # <v, H_l(f + h v) v>
        return float(np.sum(v * _np(loss.hvp(put(f + h * v), put(y), put(v)))))

    def central(h):
        return (q(h) - q(-h)) / (2 * h)

    h = 1e-3
    ref = (4 * central(h / 2) - central(h)) / 3  # Richardson, O(h^4)
    got = float(loss.d3(put(f), put(y), put(v)))
    assert abs(got - ref) <= 1e-9 * max(1.0, abs(ref)), (got, ref)


# ---------------------------------------------------------------------------
# C1, C2, C3, C11 (first part): gbar, Hbar, T against dense references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("groups", GROUPS, ids=str)
@pytest.mark.parametrize("net", NETS, ids=case_id)
@pytest.mark.parametrize("backend", ARRAY_API)
@needs_torch
def test_c1_c2_gbar_and_hbar_match_dense_hessian(backend, net, groups):
    _check_c1_c2(backend, net, groups)


@pytest.mark.parametrize("backend", EVERY)
@needs_torch
def test_c1_c2_on_every_backend(backend):
    _check_c1_c2(backend, NETS[0], "tensor")


def _check_c1_c2(backend, net, groups):
    model, params, x, y, loss = case_problem(backend, net)
    res = ph.summary(model, loss, params, x, y, groups=groups)
    g = torch_grad(net, params, x, y)
    H = dense_hessian(net["sizes"], net["activation"], net["loss"], params, x, y)
    U = group_dirs(unflatten(g, shapes_of(net["sizes"])), groups)
    assert_rel(_np(res["gbar"]), U.T @ g, 1e-13, "C1 gbar")
    assert_rel(_np(res["Hbar"]), U.T @ H @ U, 1e-10, "C2 Hbar")


@pytest.mark.parametrize("backend", NO_JAX)
@needs_torch
def test_c11_random_direction_gbar_hbar(backend):
    net = NETS[1]
    model, params, x, y, loss = case_problem(backend, net)
    rng = np.random.default_rng(11)
    u_np = [rng.standard_normal(tuple(p.shape)) for p in params]
    u = [cc.backends.asarray(backend, a) for a in u_np]
    res = ph.summary(model, loss, params, x, y, groups="tensor", u=u)
    g = torch_grad(net, params, x, y)
    H = dense_hessian(net["sizes"], net["activation"], net["loss"], params, x, y)
    U = group_dirs(None, "tensor", u=u_np)
    assert_rel(_np(res["gbar"]), U.T @ g, 1e-13, "C11 gbar")
    assert_rel(_np(res["Hbar"]), U.T @ H @ U, 1e-10, "C11 Hbar")


@pytest.mark.parametrize("backend", NO_JAX)
@needs_torch
def test_c2_scalar_groups_on_a_tiny_net(backend):
    net = {"sizes": [2, 3, 2], "activation": "tanh", "loss": "ce", "batch": 7, "seed": 4}
    model, params, x, y, loss = case_problem(backend, net)
    res = ph.summary(model, loss, params, x, y, groups="scalar", order=2)
    g = torch_grad(net, params, x, y)
    H = dense_hessian(net["sizes"], net["activation"], net["loss"], params, x, y)
    assert_rel(_np(res["Hbar"]), np.diag(g) @ H @ np.diag(g), 1e-10, "C2 scalar Hbar")
    assert_rel(_np(res["gbar"]), g * g, 1e-13, "C1 scalar gbar")


@pytest.mark.slow
@pytest.mark.parametrize("net", NETS[:2], ids=case_id)
@needs_torch
def test_c2_scalar_groups_on_the_spec_nets(net):
    model, params, x, y, loss = case_problem("numpy", net)
    res = ph.summary(model, loss, params, x, y, groups="scalar", order=2)
    g = torch_grad(net, params, x, y)
    H = dense_hessian(net["sizes"], net["activation"], net["loss"], params, x, y)
    assert_rel(res["Hbar"], np.diag(g) @ H @ np.diag(g), 1e-10, "C2 scalar Hbar")


@pytest.mark.parametrize("net", NETS, ids=case_id)
def test_c2_against_central_differences_of_the_gradient(net):
    """Independent of torch: complex-step gradients, central differences (rel <= 1e-6)."""
    model, params, x, y, loss = case_problem("numpy", net)
    res = ph.summary(model, loss, params, x, y, groups="tensor", order=2)
    fun = loss_of_theta(net["sizes"], net["activation"], net["loss"], x, y)
    theta = flatten(params)
    g = grad_cs(fun, theta)
    H = hessian_fd(lambda t: grad_cs(fun, t), theta, 1e-4)
    U = group_dirs(unflatten(g, shapes_of(net["sizes"])), "tensor")
    assert_rel(res["Hbar"], U.T @ H @ U, 1e-6, "C2 Hbar vs differences")


@needs_torch
def test_c2_detach_demonstration():
    """A non-detached direction u = g(theta) counts curvature twice: d/da <g(th + a u_s), u_s(th + a u_s)> = 2 Hbar_ss."""
    net = NETS[0]
    model, params, x, y, loss = case_problem("numpy", net)
    fun = torch_loss_of_theta(net["sizes"], net["activation"], net["loss"], x, y)
    theta = torch.tensor(flatten(params), dtype=torch.float64)
    mask = torch.zeros_like(theta)
    mask[:20] = 1.0  # group W1 of the 4-5-3 net
    grad = torch.func.grad(fun)
    u_s = (mask * grad(theta)).detach()

    def gbar_detached(th):
        return torch.dot(grad(th), u_s)

    def gbar_not_detached(th):
        return torch.dot(grad(th), mask * grad(th))

    good = torch.func.jvp(gbar_detached, (theta,), (u_s,))[1].item()
    bad = torch.func.jvp(gbar_not_detached, (theta,), (u_s,))[1].item()
    hbar = float(ph.summary(model, loss, params, x, y, groups="tensor", order=2)["Hbar"][0, 0])
    assert abs(hbar - good) <= 1e-10 * abs(good)
    assert abs(bad / hbar - 2) < 1e-8, "the non-detached direction doubles Hbar_ss"


@pytest.mark.parametrize("backend,net", [pytest.param(b.values[0], NETS[0], marks=b.marks, id=f"{b.id}-{case_id(NETS[0])}")
                                         for b in EVERY] + [pytest.param("numpy", n, id=f"numpy-{case_id(n)}")
                                                            for n in NETS[1:]])
@needs_torch
def test_c3_jet_diagonal_polarisation_and_third_derivative(backend, net):
    model, params, x, y, loss = case_problem(backend, net)
    res = ph.summary(model, loss, params, x, y, groups="tensor", order=3)
    g = torch_grad(net, params, x, y)
    H = dense_hessian(net["sizes"], net["activation"], net["loss"], params, x, y)
    U = group_dirs(unflatten(g, shapes_of(net["sizes"])), "tensor")
    ref = U.T @ H @ U
    Hbar = _np(res["Hbar"])
    S = ref.shape[0]
    off = ~np.eye(S, dtype=bool)
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(np.diag(Hbar) - np.diag(ref))) <= 1e-12 * scale, "C3 diagonal (jets)"
    assert np.max(np.abs(Hbar[off] - ref[off])) <= 1e-12 * scale, "C3 off-diagonal (polarisation)"
    # T_s against Richardson central differences of the exact phi''(a) = u_s^T H(theta + a u_s) u_s
    fun = torch_loss_of_theta(net["sizes"], net["activation"], net["loss"], x, y)
    theta = torch.tensor(flatten(params), dtype=torch.float64)

    def phi2(us, a):
        f1 = lambda b: torch.func.jvp(lambda c: fun(theta + c * us), (b,), (torch.ones((), dtype=b.dtype),))[1]  # noqa: E731
        return torch.func.jvp(f1, (torch.tensor(a, dtype=torch.float64),),
                              (torch.ones((), dtype=torch.float64),))[1].item()

    T_ref = []
    for s in range(S):
        us = torch.tensor(U[:, s])
        h = 1e-3
        c = lambda h: (phi2(us, h) - phi2(us, -h)) / (2 * h)  # noqa: E731
        T_ref.append((4 * c(h / 2) - c(h)) / 3)
    assert_rel(_np(res["T"]), np.array(T_ref), 1e-8, "C3 T")


# ---------------------------------------------------------------------------
# C4, C5: quadratic problems (one linear layer, MSE)
# ---------------------------------------------------------------------------


def _quadratic(backend, seed=0, dup_column=False):
    model, params, x, y, loss = make_problem(backend, [3, 2], "identity", "mse", batch=8, seed=seed)
    if dup_column:
        xn = _np(x).copy()
        xn[:, 2] = xn[:, 0]
        x = cc.backends.asarray(backend, xn)
    return model, params, x, y, loss


QUADRATIC_NET = {"sizes": [3, 2], "activation": "identity", "loss": "mse"}


def _quadratic_with_derivatives(backend):
    """The quadratic problem plus its reference gradient and dense Hessian (NumPy)."""
    model, params, x, y, loss = _quadratic(backend)
    g = torch_grad(QUADRATIC_NET, params, x, y)
    return model, params, x, y, loss, g, dense_hessian([3, 2], "identity", "mse", params, x, y)


@pytest.mark.parametrize("backend,reg", REG_GRID)
@needs_torch
def test_c4_one_group_is_the_exact_cauchy_step(backend, reg):
    model, params, x, y, loss, g, H = _quadratic_with_derivatives(backend)
    expected = flatten(params) - (g @ g) / (g @ H @ g) * g
    opt = cc.PseudoHessian(groups="one", reg=reg)
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert_rel(flatten(new), expected, 1e-12, "C4 Cauchy step")
    assert float(info["status"]) == 0 and float(info["t"]) == 1.0


@pytest.mark.parametrize("backend,reg", REG_GRID)
@needs_torch
def test_c5_scalar_groups_give_the_newton_step(backend, reg):
    model, params, x, y, loss, g0, H = _quadratic_with_derivatives(backend)
    expected = flatten(params) - np.linalg.solve(H, g0)
    opt = cc.PseudoHessian(groups="scalar", reg=reg)
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert_rel(flatten(new), expected, 1e-10, "C5 Newton step")
    g1 = torch_grad(QUADRATIC_NET, new, x, y)
    assert np.linalg.norm(g1) <= 1e-10 * np.linalg.norm(g0)
    assert float(info["status"]) == 0


# ---------------------------------------------------------------------------
# C6: the reduced cubic solver
# ---------------------------------------------------------------------------


def _random_cubic(rng):
    S = int(rng.integers(1, 6))
    A = rng.standard_normal((S, S)) * rng.uniform(0.1, 3)
    H = (A + A.T) / 2  # indefinite in general
    g = rng.standard_normal(S)
    d = rng.uniform(0.3, 2.0, S)
    d[rng.random(S) < 0.2] = 0.0
    Z = d == 0
    if Z.any():  # the model is bounded below only if H[Z, Z] > 0 (else the solver falls back, tested below)
        ev = np.linalg.eigvalsh(H[np.ix_(Z, Z)])[0]
        H[np.ix_(Z, Z)] += (max(0.0, -ev) + rng.uniform(0.1, 1.0)) * np.eye(int(Z.sum()))
    return g, H, d, float(rng.uniform(0.1, 3.0))


def test_c6_cubic_solver_on_200_random_problems():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    worst_kkt, worst_gap = 0.0, -np.inf
    for _ in range(200):
        g, H, d, lam = _random_cubic(rng)
        eta, r, status = _cubic.cubic_solve(g, H, d, lam, np.ones(g.size, dtype=bool))
        assert int(status) == 0
        m = cubic_model(eta, g, H, d, lam)
        assert m < 0
        M = H + lam / 2 * float(r) * np.diag(d * d)
        kkt = np.linalg.norm(M @ eta - g) / (np.linalg.norm(H, 2) * np.linalg.norm(eta) + np.linalg.norm(g)
                                             + lam * float(r) / 2 * np.linalg.norm(d * d * eta))
        worst_kkt = max(worst_kkt, kkt)
        best = min(minimize(cubic_model, rng.standard_normal(g.size) * s, jac=cubic_model_grad, args=(g, H, d, lam),
                            method="BFGS", options={"gtol": 1e-12}).fun for s in (0.1, 1.0, 3.0, 10.0))
        worst_gap = max(worst_gap, (m - best) / abs(best))  # relative: model values range 1e-4 .. 7e5
    assert worst_kkt <= 1e-7, worst_kkt
    assert worst_gap <= 1e-12, worst_gap  # measured <= 2.5e-15


def test_c6_one_group_closed_form_and_hard_case():
    rng = np.random.default_rng(1)
    for _ in range(50):
        g, H, d = rng.standard_normal(1), rng.standard_normal((1, 1)), rng.uniform(0.3, 2.0, 1)
        lam = float(rng.uniform(0.1, 3))
        eta, _, status = _cubic.cubic_solve(g, H, d, lam, np.ones(1, dtype=bool))
        G, Q = g[0], H[0, 0]
        c = 2 * G / (Q + np.sqrt(Q * Q + 2 * lam * d[0] ** 3 * abs(G)))
        assert int(status) == 0 and abs(eta[0] - c) <= 1e-10 * abs(c)
    # exact hard case: b orthogonal to the lmin eigenvector
    g, H, d = np.array([0.0, 1.0]), np.diag([-1.0, 2.0]), np.ones(2)
    eta, _, status = _cubic.cubic_solve(g, H, d, 1.0, np.ones(2, dtype=bool))
    assert int(status) == 0 and cubic_model(eta, g, H, d, 1.0) < 0


def test_c6_unbounded_model_falls_back_to_the_line_step():
    # d = 0 on a direction of negative curvature: m is unbounded below -> status 1 (line) or 2 (skip)
    g, H, d = np.array([1.0, 1.0]), np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([1.0, 0.0])
    eta, _, status = _cubic.cubic_solve(g, H, d, 1.0, np.ones(2, dtype=bool))
    c = 2 * 2.0 / (0.0 + np.sqrt(0.0 + 2 * 1.0 * 1.0 * 2.0))
    assert int(status) == 1 and np.allclose(eta, [c, c], rtol=1e-14)
    eta, _, status = _cubic.cubic_solve(g, -np.eye(2), np.zeros(2), 1.0, np.ones(2, dtype=bool))
    assert int(status) == 2 and np.all(eta == 0)


def test_cubic_solver_runs_on_array_api_strict():
    xps = pytest.importorskip("array_api_strict")
    g, H, d, lam = _random_cubic(np.random.default_rng(3))
    ref = _cubic.cubic_solve(g, H, d, lam, np.ones(g.size, dtype=bool))[0]
    got = _cubic.cubic_solve(xps.asarray(g), xps.asarray(H), xps.asarray(d), lam,
                             xps.ones(g.size, dtype=xps.bool))[0]
    assert_rel(np.asarray(got), ref, 1e-13, "strict vs numpy")


# ---------------------------------------------------------------------------
# C7: singular, zero groups, NaN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", NO_JAX)
def test_c7_singular_hbar(backend):
    model, params, x, y, loss = _quadratic(backend, dup_column=True)
    opt = cc.PseudoHessian(groups="scalar", reg="none")
    with pytest.raises(ValueError, match="singular"):
        opt.step(model, loss, params, opt.init(params), x, y)
    opt = cc.PseudoHessian(groups="scalar", reg="cubic")
    _, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert float(info["status"]) == 1
    # ridge (Levenberg-Marquardt on the diagonal) makes the literal solve regular
    opt = cc.PseudoHessian(groups="scalar", reg="none", ridge=1e-3)
    _, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert float(info["status"]) == 0


@pytest.mark.parametrize("loss_name", ["mse", "ce"])
@pytest.mark.parametrize("backend", NO_JAX)
def test_c7_zero_group_is_dropped(backend, loss_name):
    model, params, x, y, loss = make_problem(backend, [4, 5, 3], "tanh", loss_name, batch=7, seed=0)
    x = cc.backends.asarray(backend, np.zeros((7, 4)))
    params = [cc.backends.asarray(backend, np.zeros((5, 4)))] + list(params[1:])
    opt = cc.PseudoHessian()
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert float(info["n_groups"]) == 3
    # CE: status 0. MSE: W2 and b2 have T = 0 (f is linear in them, the loss quadratic), so they form the set
    # Z of spec Sec. 4; with x = 0 every sample is the same, the (W2, b2) block of Hbar has rank one, N is
    # singular and the solver correctly takes the line fallback (status 1) instead of status 0.
    assert float(info["status"]) == (0 if loss_name == "ce" else 1)
    np.testing.assert_array_equal(_np(new[0]), 0.0)  # eta_W1 u_W1 = 0
    assert float(info["loss"]) > float(loss.value(model.forward(new, x), y))


@pytest.mark.parametrize("backend", EVERY)
def test_c7_nan_raises_floating_point_error(backend):
    model, params, x, y, loss = case_problem(backend, NETS[0])
    xn = _np(x).copy()
    xn[0, 0] = np.nan
    opt = cc.PseudoHessian()
    with pytest.raises(FloatingPointError, match="x contains NaN"):
        opt.step(model, loss, params, opt.init(params), cc.backends.asarray(backend, xn), y)


def test_non_finite_hbar_raises_floating_point_error():
    model, params, x, y, loss = case_problem("numpy", NETS[0])

    class NaNJet:
        xp = model.xp
        forward, vjp, jvp = model.forward, model.vjp, model.jvp

        def jet(self, params, x, tangent, order):
            return [d * np.nan if k == 2 else d for k, d in enumerate(model.jet(params, x, tangent, order))]

    opt = cc.PseudoHessian()
    with pytest.raises(FloatingPointError, match="Hbar contains NaN"):
        opt.step(NaNJet(), loss, params, opt.init(params), x, y)


# ---------------------------------------------------------------------------
# C8 scale invariance, C9 cross-backend, C10 partitions
# ---------------------------------------------------------------------------


class ScaledFirstWeight:
    """The same network with ``W1' = alpha W1`` as its first parameter (the model uses ``W1'/alpha``)."""

    def __init__(self, model, alpha):
        self.model, self.alpha, self.xp = model, alpha, model.xp

    def _in(self, params):
        return [params[0] / self.alpha] + list(params[1:])

    def forward(self, params, x):
        return self.model.forward(self._in(params), x)

    def jvp(self, params, x, tangent):
        return self.model.jvp(self._in(params), x, self._in(tangent))

    def vjp(self, params, x):
        out, pull = self.model.vjp(self._in(params), x)
        return out, lambda v: self._in(pull(v))

    def jet(self, params, x, tangent, order):
        return self.model.jet(self._in(params), x, self._in(tangent), order)


@pytest.mark.parametrize("reg,ridge", [("none", 0.0), ("cubic", 0.0), ("cubic", 0.1)])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("backend", NO_JAX)
def test_c8_per_group_scale_invariance(backend, reg, ridge, loss_name):
    alpha = 7.0
    model, params, x, y, loss = make_problem(backend, [4, 5, 3], "tanh", loss_name, batch=7, seed=0)
    scaled = ScaledFirstWeight(model, alpha)
    opt = cc.PseudoHessian(groups="tensor", reg=reg, ridge=ridge)
    p1, s1 = list(params), opt.init(params)
    p2 = [alpha * params[0]] + list(params[1:])
    s2 = opt.init(p2)
    for _ in range(5):
        p1, s1, i1 = opt.step(model, loss, p1, s1, x, y)
        p2, s2, i2 = opt.step(scaled, loss, p2, s2, x, y)
        assert float(i1["status"]) == float(i2["status"]) == 0
    back = [p2[0] / alpha] + list(p2[1:])
    assert_rel(flatten(back), flatten(p1), 1e-8, "C8 mapped-back params")


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("backend", EVERY)
def test_c9_cross_backend(backend, steps, loss_name):
    if backend == "numpy":
        pytest.skip("numpy is the reference")
    spec = cc.get_method("pseudo_hessian")
    out = {}
    for be in ("numpy", backend):
        model, params, x, y, loss = make_problem(be, [4, 5, 3], "tanh", loss_name, batch=7, seed=1)
        opt = spec.make_test()
        state = opt.init(params)
        for _ in range(steps):
            params, state, info = opt.step(model, loss, params, state, x, y)
        out[be] = flatten(params)
    assert_rel(out[backend], out["numpy"], 1e-10, f"C9 {backend} vs numpy after {steps} steps")


@needs_torch
def test_c10_layer_equals_custom_labels_and_one_equals_closed_form():
    model, params, x, y, loss = case_problem("numpy", NETS[0])
    a = cc.PseudoHessian(groups="layer")
    b = cc.PseudoHessian(groups=[0, 0, 1, 1])
    c = cc.PseudoHessian(groups=["a", "a", "b", "b"])
    pa, pb, pc = params, params, params
    sa, sb, sc = a.init(params), b.init(params), c.init(params)
    for _ in range(3):
        pa, sa, _ = a.step(model, loss, pa, sa, x, y)
        pb, sb, _ = b.step(model, loss, pb, sb, x, y)
        pc, sc, _ = c.step(model, loss, pc, sc, x, y)
    for p, q, r in zip(pa, pb, pc):
        np.testing.assert_array_equal(p, q)
        np.testing.assert_array_equal(p, r)
    # "one" cubic == 2G / (Q + sqrt(Q^2 + 2 lam |T| |G|)) with G = g.g, Q = g.H.g, T = phi''' along g
    net = {"sizes": [4, 5, 3], "activation": "tanh", "loss": "ce"}
    g = torch_grad(net, params, x, y)
    H = dense_hessian([4, 5, 3], "tanh", "ce", params, x, y)
    fun = torch_loss_of_theta([4, 5, 3], "tanh", "ce", x, y)
    theta, gt = torch.tensor(flatten(params)), torch.tensor(g)
    one = (torch.ones((), dtype=torch.float64),)
    d1 = lambda a: torch.func.jvp(lambda b: fun(theta + b * gt), (a,), one)[1]  # noqa: E731
    d2 = lambda a: torch.func.jvp(d1, (a,), one)[1]  # noqa: E731
    T = torch.func.jvp(d2, (torch.zeros((), dtype=torch.float64),), one)[1].item()
    G, Q, lam = g @ g, g @ H @ g, 1.0
    cstep = 2 * G / (Q + np.sqrt(Q * Q + 2 * lam * abs(T) * abs(G)))
    opt = cc.PseudoHessian(groups="one", backtrack=False)
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert_rel(flatten(new), flatten(params) - cstep * g, 1e-12, "C10 one-group cubic step")
    assert float(info["status"]) == 0


# ---------------------------------------------------------------------------
# C11: momentum and Adam directions, backtracking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["momentum", "adam"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("backend", EVERY)
def test_c11_directions_decrease_the_loss(backend, direction, loss_name):
    model, params, x, y, loss = make_problem(backend, [4, 5, 3], "tanh", loss_name, batch=7,
                                             seed=0 if loss_name == "ce" else 1)
    opt = cc.PseudoHessian(direction=direction)
    state = opt.init(params)
    start = float(loss.value(model.forward(params, x), y))
    prev = start
    for _ in range(5):
        params, state, info = opt.step(model, loss, params, state, x, y)
        now = float(loss.value(model.forward(params, x), y))
        assert now <= prev  # Armijo on the same batch: monotone
        prev = now
    assert prev < start


@pytest.mark.parametrize("direction", [
    pytest.param("momentum", marks=pytest.mark.xfail(
        strict=True, reason="on this seed's data the unsafeguarded momentum step happens to converge "
                            "(the spec's held-out reference net diverged); Adam below does diverge")),
    "adam"])
def test_c11_without_backtracking_ce_diverges(direction):
    """Demonstration (the unsafeguarded step fails, spec Sec. 4): the cubic model uses the local third
    derivative, not a Lipschitz bound; with backtrack=False the 4-5-3 CE net (seed 0) blows up with the
    Adam direction (loss 1.12 -> ~1e7 in 5 steps), while backtrack=True decreases it (test above)."""
    model, params, x, y, loss = case_problem("numpy", NETS[0])
    opt = cc.PseudoHessian(direction=direction, backtrack=False)
    state = opt.init(params)
    start = float(loss.value(model.forward(params, x), y))
    worst = start
    with np.errstate(all="ignore"):
        for _ in range(5):
            params, state, info = opt.step(model, loss, params, state, x, y)
            now = float(loss.value(model.forward(params, x), y))
            worst = max(worst, now) if np.isfinite(now) else np.inf
    assert worst > 2 * start, f"expected the unsafeguarded step to diverge (worst loss {worst}, start {start})"


def test_backtracking_clipping_and_skip():
    model, params, x, y, loss = case_problem("numpy", NETS[0])
    # a huge lr: Armijo halves until the decrease condition holds
    opt = cc.PseudoHessian(lr=1e3)
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    t = float(info["t"])
    assert 0 < t < 1 and float(loss.value(model.forward(new, x), y)) < float(info["loss"])
    # clipping
    opt = cc.PseudoHessian(max_step_norm=1e-3, backtrack=False)
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert abs(float(info["step_norm"]) - 1e-3) <= 1e-15
    assert abs(np.linalg.norm(flatten(new) - flatten(params)) - 1e-3) <= 1e-15
    # zero gradient (MSE at an exact fit): every group dropped, zero step, status 2
    model, params, x, _, loss = make_problem("numpy", [3, 2], "identity", "mse", batch=8, seed=0)
    y = model.forward(params, x)
    opt = cc.PseudoHessian()
    new, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    assert float(info["status"]) == 2 and float(info["t"]) == 0 and float(info["n_groups"]) == 0
    for p, q in zip(new, params):
        np.testing.assert_array_equal(p, q)


def test_backtracking_stops_at_the_first_success():
    """One forward per tried rung: eager counts them; under ``jax.jit`` the ladder is one ``while`` loop."""
    model, params, x, y, loss = case_problem("numpy", NETS[0])
    opt = cc.PseudoHessian(lr=1e3)
    calls = []
    forward = model.forward
    model.forward = lambda p, xb: calls.append(1) or forward(p, xb)
    _, _, info = opt.step(model, loss, params, opt.init(params), x, y)
    k = int(round(-np.log2(float(info["t"]))))
    assert 0 < k < opt.max_backtracks and len(calls) == k + 1
    if skipped("jax"):
        return
    import jax

    jmodel, jparams, jx, jy, jloss = make_problem("jax", [4, 5, 3], "tanh", "ce", batch=7, seed=0)
    jaxpr = str(jax.make_jaxpr(lambda p: opt.step(jmodel, jloss, p, opt.init(p), jx, jy))(jparams))
    assert jaxpr.count("while[") == 1
    _, _, jinfo = jax.jit(lambda p: opt.step(jmodel, jloss, p, opt.init(p), jx, jy))(jparams)
    assert float(jinfo["t"]) == float(info["t"])


# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EVERY)
def test_info_state_and_needs(backend):
    model, params, x, y, loss = case_problem(backend, NETS[0])
    assert cc.PseudoHessian.needs == ("jet",)
    for direction, n_m, n_v in (("gradient", 0, 0), ("momentum", 4, 0), ("adam", 4, 4)):
        opt = cc.PseudoHessian(direction=direction)
        state = opt.init(params)
        assert len(state.m) == n_m and len(state.v) == n_v and int(state.t) == 0
        new, state, info = opt.step(model, loss, params, state, x, y)
        assert int(state.t) == 1
        assert set(info) == {"loss", "step_norm", "finite", "r", "hbar_min_eig", "eta_min", "eta_max", "t", "n_groups",
                             "status"}
        assert all(v.ndim == 0 for v in info.values())
        assert [tuple(p.shape) for p in new] == [tuple(p.shape) for p in params]
        assert all(p.dtype == q.dtype for p, q in zip(new, params))
        if direction == "gradient":
            Hb = _np(ph.summary(model, loss, params, x, y)["Hbar"])
            assert abs(float(info["hbar_min_eig"]) - np.linalg.eigvalsh(Hb)[0]) <= 1e-12 * np.max(np.abs(Hb))


def test_constructor_validation():
    bad = [dict(lr=0), dict(lam=-1), dict(ridge=-1e-3), dict(reg="ridge"), dict(direction="newton"),
           dict(momentum=1.0), dict(betas=(0.9, 1.0)), dict(betas=(0.9,)), dict(max_backtracks=-1),
           dict(max_backtracks=2.5), dict(max_step_norm=0.0), dict(groups="blocks"), dict(groups=[[0], [1]]),
           dict(groups=[]), dict(eps=-1.0)]
    for kw in bad:
        with pytest.raises(ValueError):
            cc.PseudoHessian(**kw)
    with pytest.raises(ValueError, match="groups"):
        cc.PseudoHessian(groups=[{0}, {1}])
    with pytest.raises(TypeError):
        cc.PseudoHessian(learning_rate=1.0)
    model, params, x, y, loss = case_problem("numpy", NETS[0])
    with pytest.raises(ValueError, match="groups has 3 labels"):
        cc.PseudoHessian(groups=[0, 1, 2]).init(params)
    big = [np.zeros((70, 60)), np.zeros(70)]
    with pytest.raises(ValueError, match="4096"):
        cc.PseudoHessian(groups="scalar").init(big)


# ---------------------------------------------------------------------------
# jax.jit: the whole step is traceable (masks, fixed loop counts, the backtracking ladder)
# ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["jax_adapter"])
def test_step_is_jittable_and_matches_numpy(which):
    """``jax.jit`` of the whole step (``which="array_api_mlp_over_jax_numpy"`` also works: the array-API MLP
    traced by JAX; left out to keep the slow tests under a minute)."""
    require("jax")
    import jax

    jnp = jax.numpy
    from curvcore.backends import ArrayAPIMLP

    model, params, x, y, loss = case_problem("numpy", NETS[0])
    jmodel = make_problem("jax", [4, 5, 3], "tanh", "ce", batch=7, seed=0)[0] if which == "jax_adapter" \
        else ArrayAPIMLP([4, 5, 3], "tanh", xp=jnp)
    opt = cc.PseudoHessian(direction="adam", max_backtracks=3)
    compiles = []

    def step(p, s, xb, yb):
        compiles.append(1)
        return opt.step(jmodel, loss, p, s, xb, yb)

    jstep = jax.jit(step)
    jp, jx, jy = [jnp.asarray(p) for p in params], jnp.asarray(x), jnp.asarray(y)
    js, ns = opt.init(jp), opt.init(params)
    for _ in range(3):
        jp, js, jinfo = jstep(jp, js, jx, jy)
        params, ns, ninfo = opt.step(model, loss, params, ns, x, y)
        assert float(jinfo["status"]) == float(ninfo["status"]) and float(jinfo["t"]) == float(ninfo["t"])
    assert len(compiles) == 1, "the step recompiled"
    assert_rel(flatten(jp), flatten(params), 1e-10, "jit vs numpy")
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(jp))
