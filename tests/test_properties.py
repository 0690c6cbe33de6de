"""Property tests (hypothesis) over random small MLPs: depth 1-4, widths 1-16, every activation, batch 1-32, MSE and CE.

Each property is a method's defining identity from its spec (shared/spec/*.md) against an
independent dense float64 reference, the conformance kit, or agreement between backends:

* ESN "newton", one sample: ``H d = ∇J_R`` with the dense Hessian of the regularised objective;
* CurveBall: ``dz = J^T H_L J z + lam z + g`` with dense Jacobians;
* pseudo-Hessian: ``Hbar = U^T H U`` with the dense loss Hessian;
* K-FAC: the inverses it keeps invert its factors as defined from the layer records;
* ``curvcore.testing.check_model`` passes on every drawn net;
* one step of any registered method agrees between backends.

References are the helpers of the tests/reference/ package.
Tolerances: :func:`assert_close` (relative to the compared values, plus a round-off floor).
Profiles (tests/conftest.py): ``default`` (12 derandomized examples per property) and
``pytest --hypothesis-profile=thorough`` (200).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import curvcore as cc  # noqa: E402
import curvcore.testing  # noqa: E402,F401
from cases import case_problem  # noqa: E402
from backend_list import LOCAL, needs, params, present  # noqa: E402
from curvcore.methods import pseudo_hessian as ph  # noqa: E402
from reference import (dense_ggn_and_grad, dense_hessian, direction, flatten, grad_hess, group_dirs,  # noqa: E402
                       kfac_factors, layer_inputs, loss_parts, np_mlp, random_tree, shapes_of, state_with, torch_grad,
                       unflatten)

EPS = float(np.finfo(np.float64).eps)
RTOL = 1e-10
KINKED = ("relu", "leaky_relu")
to_np = cc.backends.to_numpy


@st.composite
def nets(draw, batch=st.integers(1, 32)):
    """A case dict of tests/cases.py: ``sizes`` (2-5 widths in 1..16), activation, loss, batch, seed."""
    depth = draw(st.integers(1, 4))
    return {"sizes": draw(st.lists(st.integers(1, 16), min_size=depth + 1, max_size=depth + 1)),
            "activation": draw(st.sampled_from(cc.backends.ACTIVATIONS)),
            "loss": draw(st.sampled_from(("mse", "ce"))),
            "batch": draw(batch),
            "seed": draw(st.integers(0, 2**16))}


def assert_close(got, want, terms, n: int, name: str) -> None:
    """``||got - want|| <= RTOL max(||got||, ||want||) + 10 n eps ||terms||``.

    ``terms`` holds, entry by entry, the sum of the absolute values of the ``n`` products that
    ``want`` adds up (``|A| |x|`` for ``A x``): float64 round-off of such a sum is at most
    ``n eps`` times it (Higham, Accuracy and Stability, eq. 3.11), on each side. The floor only
    matters where the compared values cancel far below their terms.
    """
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    err = float(np.linalg.norm(got - want))
    bound = RTOL * max(np.linalg.norm(got), np.linalg.norm(want)) + 10 * n * EPS * np.linalg.norm(terms)
    assert err <= bound, f"{name}: ||got - want|| = {err:.3e} > {bound:.3e}; ||want|| = {np.linalg.norm(want):.3e}"


# ---------------------------------------------------------------------------
# defining identities (float64, NumPy backend)
# ---------------------------------------------------------------------------


@given(net=nets(batch=st.just(1)), lam=st.floats(0.05, 3.0))
def test_esn_newton_solves_the_regularised_newton_system(net, lam):
    """esn_mk.md §2: for one sample, ESN "newton" gives ``H d = ∇J_R``, H the dense Hessian of J_R (ρ fixed)."""
    model, params, x, y, loss = case_problem("numpy", net)
    sizes = net["sizes"]
    g, H = grad_hess(sizes, net["activation"], net["loss"], params, x, y, np.full((1, len(sizes) - 1), lam))
    # §2: the direction exists only if the back-propagated gradient ĝ_k (= ∇_{b_k} J_R for B = 1) of every
    # layer k >= 2 is non-zero (not so for a dead ReLU layer or one-class cross-entropy): N_k divides by ||ĝ_k||²
    assume(all(np.sum(gb * gb) > 0 for gb in unflatten(g, shapes_of(sizes))[3::2]))
    d, _, _ = direction(cc.ESN(variant="newton", lam=lam, reg_grad=True, eps=0.0), model, loss, params, x, y)
    d = flatten(d)
    assert_close(H @ d, g, np.abs(H) @ np.abs(d), d.size, "H d vs ∇J_R")


@given(net=nets(), lam=st.floats(0.0, 2.0), z_seed=st.integers(0, 2**16))
def test_curveball_dz_is_the_damped_ggn_product_plus_gradient(net, lam, z_seed):
    """curveball.md §2 (eq. 18): ``dz = J^T H_L J z + lam z + g`` with the dense (complex-step) Jacobian J."""
    model, params, x, y, loss = case_problem("numpy", net)
    z = random_tree("numpy", params, z_seed)
    opt = cc.CurveBall(auto=False, rho=0.0, beta=1.0, auto_lam=False)  # z_new = rho z - beta dz = -dz
    _, state, _ = opt.step(model, loss, params, state_with("numpy", params, z, lam), x, y)
    G, g, J = dense_ggn_and_grad(net["sizes"], net["activation"], net["loss"], params, x, y)
    _, gf, HL = loss_parts(net["loss"], np_mlp(net["sizes"], net["activation"])(flatten(params), to_np(x)), to_np(y))
    zf = flatten(z)
    terms = np.abs(J).T @ (np.abs(HL) @ (np.abs(J) @ np.abs(zf)) + np.abs(gf).ravel()) + lam * np.abs(zf)
    assert_close(-flatten(state.z), G @ zf + lam * zf + g, terms, max(J.shape), "dz")


# "scalar" groups are left out: S = P groups need P(P-1)/2 jets (the spec tests them on tiny nets)
@given(net=nets(), groups=st.sampled_from(["tensor", "layer", "wb", "one"]))
def test_pseudo_hessian_hbar_is_the_projected_hessian(net, groups):
    """pseudo_hessian.md §9 C2: ``Hbar = U^T H U``, U the group directions of the gradient, H the dense Hessian."""
    model, params, x, y, loss = case_problem("numpy", net)
    Hbar = to_np(ph.summary(model, loss, params, x, y, groups=groups, order=2)["Hbar"])
    U = group_dirs(unflatten(torch_grad(net, params, x, y), shapes_of(net["sizes"])), groups)
    H = dense_hessian(net["sizes"], net["activation"], net["loss"], params, x, y)
    assert_close(Hbar, U.T @ H @ U, np.abs(U).T @ np.abs(H) @ np.abs(U), U.shape[0], "Hbar")


@given(net=nets(), damping=st.floats(1e-4, 1e-1))
def test_kfac_keeps_the_inverses_of_its_defined_factors(net, damping):
    """The ``A_inv``, ``G_inv`` K-FAC stores after a refresh invert the factors defined from the layer records."""
    model, params, x, y, loss = case_problem("numpy", net)
    opt = cc.KFAC(damping=damping, refresh_every=1)
    _, state, _ = opt.step(model, loss, params, opt.init(params), x, y)
    recs = model.layers(params, x, loss.grad(model.forward(params, x), y))
    for k, rec in enumerate(recs):
        factors = kfac_factors(rec, damping)
        for name, inv in (("A", state.A_inv[k]), ("G", state.G_inv[k])):
            X, M = to_np(inv), factors[name]
            assert_close(X @ M, np.eye(len(M)), np.abs(X) @ np.abs(M), len(M), f"{name}_inv {name} of layer {k}")


# ---------------------------------------------------------------------------
# the conformance kit
# ---------------------------------------------------------------------------


def min_abs_preactivation(net, params, x) -> float:
    """Smallest ``|z|`` over the hidden pre-activations (independent NumPy forward pass)."""
    ps = [to_np(p) for p in params]
    inputs = layer_inputs(net["sizes"], net["activation"], ps, to_np(x))
    return min((float(np.min(np.abs(a @ W.T + b))) for a, W, b in zip(inputs[:-1], ps[0:-2:2], ps[1:-2:2])),
               default=math.inf)


@pytest.mark.parametrize("backend", params(("numpy", "torch")))
@given(net=nets(), seed=st.integers(0, 2**16))
def test_check_model_passes_on_every_net(backend, net, seed):
    """``check_model``: JVP/jets against central differences, adjoint identity, layer records, purity."""
    model, params, x, y, loss = case_problem(backend, net)
    fd_step = None
    if net["activation"] in KINKED:
        # Central differences of a piecewise-linear net are exact unless the step crosses a kink, where the
        # derivative they stand for is undefined. With a step of 1e-8 along a N(0, 1) direction a pre-activation
        # moves by h ||dz/dtheta|| ||u|| < 1e-5 on these nets; closer to a kink the check compares nothing defined.
        fd_step = 1e-8
        assume(min_abs_preactivation(net, params, x) > 1e-5)
    cc.testing.check_model(model, params, x, y, loss, seed=seed, fd_step=fd_step)


# ---------------------------------------------------------------------------
# cross-backend agreement
# ---------------------------------------------------------------------------


def one_step(backend: str, net: dict, method: str) -> tuple[dict, float]:
    """``({"delta": new - old params, "info": info}, max |params| before and after)`` of one step."""
    model, params, x, y, loss = case_problem(backend, net)
    opt = cc.REGISTRY[method].make_test()
    state = opt.init(params)
    refresh = getattr(opt, "needs_refresh", None)
    kwargs = {"cov_batch": x} if refresh is not None and refresh(state) else {}
    new, _, info = opt.step(model, loss, params, state, x, y, **kwargs)
    old, new = [to_np(p) for p in params], [to_np(p) for p in new]
    scale = max(float(np.max(np.abs(p), initial=0.0)) for p in old + new)
    return {"delta": [b - a for a, b in zip(old, new)], "info": info}, scale


def assert_one_step_agrees(net: dict, method: str, backends: list[str]) -> None:
    """Step deltas and ``info`` agree with NumPy to RTOL relative to each leaf's largest entry.

    The floor ``4 eps max|params|``: the delta is read back as ``new - old`` and both the update and
    this subtraction round at ``eps |params|``, on each backend.
    """
    runs = {b: one_step(b, net, method) for b in backends}
    floor = 4 * EPS * max(scale for _, scale in runs.values())
    cc.testing.assert_allclose_across({b: run for b, (run, _) in runs.items()}, rtol=RTOL, atol=floor,
                                      reference="numpy", what=f"one {method} step on {net}")




@given(net=nets(), method=st.sampled_from(cc.method_names()))
def test_one_step_agrees_across_backends(net, method):
    """NumPy, array_api_strict and torch (where installed): the same step to 1e-10."""
    assert_one_step_agrees(net, method, present(LOCAL))


# Eager JAX compiles every operation for every new shape (seconds per drawn net): a sixth of the profile's examples.
@needs("jax")
@settings(max_examples=max(2, settings.default.max_examples // 6))
@given(net=nets(), method=st.sampled_from(cc.method_names()))
def test_one_step_agrees_on_jax(net, method):
    """NumPy and JAX (float64): the same step to 1e-10."""
    assert_one_step_agrees(net, method, ["numpy", "jax"])
