"""The array-API MLP against independent references: forward, JVP, VJP, layer records, jets."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from cases import CASES, case_id, case_problem
from reference import assert_rel, flatten, jacobian_cs, jacobian_fd, np_mlp

RTOL = 1e-10  # float64, against complex-step (exact to round-off) references


def _random_tangent(backend, params, seed=0):
    rng = np.random.default_rng(seed)
    return [cc.backends.asarray(backend, rng.standard_normal(tuple(p.shape))) for p in params]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_plain_numpy(backend, case):
    model, params, x, _, _ = case_problem(backend, case)
    ref = np_mlp(case["sizes"], case["activation"])(flatten(params), cc.backends.to_numpy(x))
    assert_rel(cc.backends.to_numpy(model.forward(params, x)), ref, 1e-13, "forward")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_jvp_matches_complex_step_jacobian(backend, case):
    model, params, x, _, _ = case_problem(backend, case)
    u = _random_tangent(backend, params)
    f = np_mlp(case["sizes"], case["activation"])
    xn = cc.backends.to_numpy(x)
    J = jacobian_cs(lambda t: f(t, xn), flatten(params)) if case["activation"] not in ("relu", "leaky_relu") \
        else jacobian_fd(lambda t: f(t, xn), flatten(params), 1e-7)
    out, Ju = model.jvp(params, x, u)
    tol = RTOL if case["activation"] not in ("relu", "leaky_relu") else 1e-7
    assert_rel(np.ravel(cc.backends.to_numpy(Ju)), J @ flatten(u), tol, "J u")
    assert_rel(cc.backends.to_numpy(out), f(flatten(params), xn), 1e-13, "jvp primal")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_vjp_is_adjoint_of_jvp(backend, case):
    model, params, x, _, _ = case_problem(backend, case)
    u = _random_tangent(backend, params, 1)
    out, Ju = model.jvp(params, x, u)
    v = cc.backends.asarray(backend, np.random.default_rng(2).standard_normal(tuple(out.shape)))
    _, pullback = model.vjp(params, x)
    JTv = pullback(v)
    lhs = float(np.sum(cc.backends.to_numpy(v) * cc.backends.to_numpy(Ju)))
    rhs = float(flatten(JTv) @ flatten(u))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)
    assert [tuple(t.shape) for t in JTv] == [tuple(p.shape) for p in params]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_records_reproduce_gradient(backend, case):
    model, params, x, y, loss = case_problem(backend, case)
    out, pullback = model.vjp(params, x)
    grads = pullback(loss.grad(out, y))
    recs = model.layers(params, x, lambda o: loss.grad(o, y))
    assert len(recs) == len(case["sizes"]) - 1
    for k, r in enumerate(recs):
        a, g = cc.backends.to_numpy(r.a), cc.backends.to_numpy(r.g)
        assert_rel(g.T @ a, cc.backends.to_numpy(grads[2 * k]), 1e-13, f"dW{k}")
        assert_rel(g.sum(0), cc.backends.to_numpy(grads[2 * k + 1]), 1e-13, f"db{k}")
        W, b = (cc.backends.to_numpy(p) for p in params[2 * k:2 * k + 2])
        assert_rel(cc.backends.to_numpy(r.z), a @ W.T + b, 1e-13, f"z{k}")
    assert_rel(cc.backends.to_numpy(recs[-1].h), cc.backends.to_numpy(out), 1e-14, "output")
    assert np.all(cc.backends.to_numpy(recs[-1].dact) == 1.0), "the output layer is linear"


@pytest.mark.parametrize("case", [c for c in CASES if c["activation"] in ("tanh", "sigmoid", "softplus")],
                         ids=case_id)
def test_jet_matches_complex_step_of_lower_orders(backend, case):
    """d_{k+1} = d/dt d_k: complex step of the order-k jet along the same tangent."""
    model, params, x, _, _ = case_problem(backend, case)
    if not hasattr(model, "jet"):
        pytest.skip(f"{backend} model has no jet")
    u = _random_tangent(backend, params, 3)
    jets = [cc.backends.to_numpy(d) for d in model.jet(params, x, u, 3)]
    f = np_mlp(case["sizes"], case["activation"])
    theta, du, xn = flatten(params), flatten(u), cc.backends.to_numpy(x)
    h = 1e-4  # Richardson-free central differences of the exact first derivative (complex step)

    def d1(t):
        return np.imag(f(theta + (t + 1e-30j) * du, xn)) / 1e-30

    d2 = (d1(h) - d1(-h)) / (2 * h)
    d3 = (d1(h) - 2 * d1(0) + d1(-h)) / h**2
    assert_rel(jets[0], f(theta, xn), 1e-13, "jet order 0")
    assert_rel(jets[1], d1(0.0), 1e-11, "jet order 1")
    assert_rel(jets[2], d2, 1e-6, "jet order 2")
    assert_rel(jets[3], d3, 1e-5, "jet order 3")


def test_params_are_not_mutated(backend):
    model, params, x, y, loss = case_problem(backend, CASES[0])
    before = [cc.backends.to_numpy(p) for p in params]
    model.forward(params, x)
    model.jvp(params, x, params)
    model.vjp(params, x)[1](loss.grad(model.forward(params, x), y))
    model.layers(params, x, lambda o: loss.grad(o, y))
    for b, p in zip(before, params):
        np.testing.assert_array_equal(b, cc.backends.to_numpy(p))
