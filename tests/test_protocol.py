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


def _linearize_vs_jvp_vjp(model, params, x, backend, seed=4):
    """``linearize``'s out, J t, J^T u against ``jvp``/``vjp`` of the same model (float64, 1e-13)."""
    from curvcore.protocol import linearize

    t, t2 = _random_tangent(backend, params, seed), _random_tangent(backend, params, seed + 1)
    out, jvp_fn, pullback = linearize(model, params, x)
    ref_out, Jt = model.jvp(params, x, t)
    u = cc.backends.asarray(backend, np.random.default_rng(seed).standard_normal(tuple(ref_out.shape)))
    _, ref_pull = model.vjp(params, x)
    assert_rel(cc.backends.to_numpy(out), cc.backends.to_numpy(ref_out), 1e-13, "linearize out")
    assert_rel(cc.backends.to_numpy(jvp_fn(t)), cc.backends.to_numpy(Jt), 1e-13, "linearize J t")
    assert_rel(cc.backends.to_numpy(jvp_fn(t2)), cc.backends.to_numpy(model.jvp(params, x, t2)[1]), 1e-13,
               "linearize J t (second tangent, same forward)")
    assert_rel(flatten(pullback(u)), flatten(ref_pull(u)), 1e-13, "linearize J^T u")
    with pytest.raises(ValueError, match="Shape mismatch"):
        pullback(u[:1, ...])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_linearize_matches_jvp_and_vjp(backend, case):
    model, params, x, _, _ = case_problem(backend, case)
    assert hasattr(model, "linearize"), f"{backend} model should provide the optional linearize"
    _linearize_vs_jvp_vjp(model, params, x, backend)


def test_linearize_falls_back_to_jvp_and_vjp(backend):
    """A model with only forward/jvp/vjp (FunctionModel) gets linearize by composition."""
    from curvcore.backends.function import FunctionModel

    inner, params, x, _, _ = case_problem(backend, CASES[0])
    model = FunctionModel(inner.forward, inner.jvp, inner.vjp)
    assert not hasattr(model, "linearize")
    _linearize_vs_jvp_vjp(model, params, x, backend)


def test_linearize_under_jax_jit():
    """JaxModel.linearize inside jax.jit (jax.linearize + linear_transpose) against eager jvp/vjp."""
    jax = pytest.importorskip("jax")
    from curvcore.protocol import linearize

    model, params, x, _, _ = case_problem("jax", CASES[0])
    t = _random_tangent("jax", params, 6)
    u = cc.backends.asarray("jax", np.random.default_rng(6).standard_normal(tuple(model.forward(params, x).shape)))

    @jax.jit
    def lin(params, x, t, u):
        out, jvp_fn, pullback = linearize(model, params, x)
        return out, jvp_fn(t), pullback(u)

    out, Jt, JTu = lin(params, x, t, u)
    ref_out, ref_Jt = model.jvp(params, x, t)
    assert_rel(np.asarray(out), np.asarray(ref_out), 1e-13, "jit linearize out")
    assert_rel(np.asarray(Jt), np.asarray(ref_Jt), 1e-13, "jit linearize J t")
    assert_rel(flatten(JTu), flatten(model.vjp(params, x)[1](u)), 1e-13, "jit linearize J^T u")
