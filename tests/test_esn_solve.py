"""ESN's eq 26 solve by Cholesky and through the B x B system, against the LU solve, in float64 on every backend.

``curvcore._linalg.cho_solve`` (the backends' registered Cholesky solves) is
checked against ``numpy.linalg.solve`` (LU), and for matrices that are not
positive definite or not finite it must give NaN (eagerly and inside
``jax.jit``), which the step's finite guard catches. ``esn.solve_identity``
(the moments' route) and ``esn.solve_identity_batch`` (from the samples: the
``B x B`` system where ``B < n_out``, either right-hand side) are both checked against ``(δI + C)⁻¹ R`` by LU, and so
is a whole randomized ESN direction on both sides of ``B = n_out``.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from cases import ESN_CASES, case_problem
from curvcore import _linalg
from curvcore.methods import esn
from reference import assert_rel

NATIVE = {"numpy", "torch", "jax"}  # backends that register a Cholesky solve (numpy: when SciPy is installed)


def _put(backend, a):
    return cc.backends.asarray(backend, np.asarray(a, dtype=np.float64))


def _np(a):
    return np.asarray(cc.backends.to_numpy(a), dtype=np.float64)


def _spd(n, seed, cond=1e3):
    """A random SPD matrix with eigenvalues log-spaced in [1, cond]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


def _lu_direction(C, R, damping):
    return np.linalg.solve(C + damping * np.eye(C.shape[0]), R)


@pytest.mark.parametrize("n,k", [(1, 1), (40, 60)])
def test_cho_solve_equals_lu(backend, n, k):
    """``cho_solve(A, B)`` == ``numpy.linalg.solve`` (LU) for SPD ``A``, matrix and vector right-hand sides."""
    A, b = _spd(n, seed=n), np.random.default_rng(k).standard_normal((n, k))
    want = np.linalg.solve(A, b)
    # forward error <= cond * eps (cond 1e3): 1e-11 relative leaves a margin of ~50
    assert_rel(_np(_linalg.cho_solve(_put(backend, A), _put(backend, b))), want, 1e-11, "matrix rhs")
    assert_rel(_np(_linalg.cho_solve(_put(backend, A), _put(backend, b[:, 0]))), want[:, 0], 1e-11, "vector rhs")


def test_backends_register_their_cholesky_solve(backend):
    """numpy (with SciPy), torch and jax use their own Cholesky solve; the others fall back to ``xp.linalg.solve``."""
    A = _put(backend, np.eye(2))
    native = backend in NATIVE and (backend != "numpy" or _scipy())
    assert (_linalg.cho_solver(A).__module__ != "curvcore._linalg") == native, _linalg.cho_solver(A)


def _scipy() -> bool:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


BAD = {"indefinite": np.diag([1.0, -1.0, 2.0]), "singular": np.zeros((3, 3)),
       "nan": np.where(np.eye(3) > 0, np.nan, 0.1), "inf": np.full((3, 3), np.inf)}


@pytest.mark.parametrize("what", list(BAD))
def test_cho_solve_gives_nan_for_a_bad_matrix(backend, what):
    """Not positive definite or not finite: all NaN, no exception; ``solve_psd`` raises ``ValueError`` naming it."""
    A, b = _put(backend, BAD[what]), _put(backend, np.ones((3, 2)))
    assert np.all(np.isnan(_np(_linalg.cho_solve(A, b))))
    with pytest.raises(ValueError, match="my factor is not positive definite"):
        _linalg.solve_psd(A, b, what="my factor")


@pytest.mark.parametrize("what", ["indefinite", "nan"])
def test_cho_solve_under_jit_gives_nan(what):
    """Inside ``jax.jit`` a bad matrix gives NaN too (the step's finite guard then keeps the old params)."""
    jax = pytest.importorskip("jax")
    A, b = _put("jax", BAD[what]), _put("jax", np.ones((3, 2)))
    assert np.all(np.isnan(_np(jax.jit(_linalg.cho_solve)(A, b))))
    good = _spd(3, seed=1)
    assert_rel(_np(jax.jit(_linalg.cho_solve)(_put("jax", good), b)), np.linalg.solve(good, np.ones((3, 2))), 1e-11,
               "jit")


def _layer(B, n_out, n_in, seed):
    """Per-sample gradients, inputs and positive ρ of one layer, scaled so that C = E[ĝĝᵀ] dominates δ = 0.5."""
    rng = np.random.default_rng(seed)
    return 3 * rng.standard_normal((B, n_out)), rng.standard_normal((B, n_in)), rng.uniform(0.5, 2.0, B)


@pytest.mark.parametrize("B,n_out,n_in", [(1, 5, 3), (4, 9, 12), (6, 6, 4), (12, 5, 7), (12, 5, 20)])
def test_eq26_solves_equal_lu(backend, B, n_out, n_in):
    """``solve_identity`` (moments) and ``solve_identity_batch`` (samples; every choice of system and
    right-hand side among the shapes) == LU on ``δI + C``."""
    g, a, rho = _layer(B, n_out, n_in, seed=B + n_out)
    C, R = g.T @ g / B, (g * rho[:, None]).T @ a / B
    want = _lu_direction(C, R, 0.5)
    got = esn.solve_identity(_put(backend, C), _put(backend, R), 0.5, 1e-12, 1)
    assert_rel(_np(got), want, 1e-11, "moments")
    assert esn.batch_system(_put(backend, g)) == (B < n_out)
    got = esn.solve_identity_batch(_put(backend, g), _put(backend, a), _put(backend, rho), 0.5, True)
    assert_rel(_np(got), want, 1e-11, "samples")


def test_randomized_direction_equals_lu(backend):
    """The whole randomized ESN direction == LU per layer; B = 7: B x B systems in layers 1-2, 5 x 5 in layer 3."""
    case = ESN_CASES["batch_systems"]
    sizes, batch = case["sizes"], case["batch"]
    opt = cc.ESN(damping=0.5)
    model, params, x, y, loss = case_problem(backend, case)
    d, _, _ = opt.direction(model, loss, params, opt.init(params, model), x, y)
    _, _, terms = opt.terms(model, loss, params, x, y)
    for k, n_out in enumerate(sizes[1:]):
        g, a, rho = (_np(t[k]) for t in (terms.ghat, terms.a, terms.rho))
        assert esn.batch_system(terms.ghat[k]) == (batch < n_out)
        N = _lu_direction(g.T @ g / batch, (g * rho[:, None]).T @ a / batch, 0.5)
        assert_rel(_np(d[2 * k]), N, 1e-11, f"N_{k + 1}")
        assert_rel(_np(d[2 * k + 1]), N @ a.mean(0), 1e-11, f"eta_{k + 1}")


def test_randomized_direction_under_jit_equals_eager():
    """The B x B path traces under ``jax.jit`` and gives the eager direction."""
    jax = pytest.importorskip("jax")
    opt = cc.ESN(damping=0.5)
    model, params, x, y, loss = case_problem("jax", ESN_CASES["batch_systems"])
    state = opt.init(params, model)
    eager = opt.step(model, loss, params, state, x, y)[0]
    jitted = jax.jit(lambda p, s, x, y: opt.step(model, loss, p, s, x, y)[0])(params, state, x, y)
    for k, (a, b) in enumerate(zip(jitted, eager)):
        assert_rel(_np(a), _np(b), 1e-12, f"params[{k}]")
