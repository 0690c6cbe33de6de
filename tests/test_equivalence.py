"""Cross-backend equivalence: every registered method gives the same numbers on every backend.

For each method of ``cc.REGISTRY`` (built with ``spec.make_test()``), each
loss it supports and each available backend, the same network (tanh
``[8, 6, 4]``, the same initial weights) takes the same 10 steps on the same
batches (drawn with NumPy and converted); after 1 and after 10 steps the
params, every state leaf and every ``info`` entry are compared with the NumPy
run. Methods with ``needs_refresh(state)`` get the same ``cov_batch`` at their
refresh steps. Nothing here names a method: a newly registered one is covered
automatically.

Tolerances:

* float64: ``rtol = 1e-10`` relative to each leaf's largest entry (the
  backends differ only in summation order and library kernels, ~1e-16 per
  operation; the spec asks for 1e-10 after ten steps).
* float32: ``rtol`` relative to each leaf's largest entry, set from the
  measured worst difference with at least a 3x margin. One float32
  operation rounds at 6e-8; a step chains a few hundred of them through
  solves and eigen-decompositions of damped curvature blocks, so backends
  drift apart by ``~cond * n_ops * 6e-8`` per step, compounded over ten steps.

  - every method but the pseudo-Hessian: ``1e-4`` (was 1e-3). Measured worst
    3.6e-6 (ACP's eigenvectors ``state.U`` on torch after 10 steps; K-FAC and
    CurveBall <= 1.3e-6, the rest <= 4.5e-7): a 28x margin, and an error of
    a wrong term (>= 1e-3) no longer passes.
  - the pseudo-Hessian: ``3e-3`` (was 1e-3, which sat 14% above a measured
    8.6e-4 and 9% above 9.1e-4 reported on another machine: a correction).
    Its ``Hbar`` comes from float32 jets by polarisation, and the S x S solve
    amplifies their rounding by the condition number of ``Hbar``: measured
    8.6e-4 on ``info["hbar_min_eig"]`` (torch, MSE), 7.3e-4 on ``eta_min``,
    4.8e-4 on ``params[0]``; 3e-3 is a 3.3x margin over the worst.

  The measured values are recorded in ``docs/adapters.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import ALL, param
from curvcore.testing import assert_allclose_across, tree_leaves_with_paths

SIZES = [8, 6, 4]
BATCH = 16
COV_BATCH = 12
STEPS = 10
CHECKED = (1, STEPS)
RTOL = {"float64": 1e-10, "float32": 1e-4}
RTOL_FLOAT32 = {"pseudo_hessian": 3e-3}  # per method, where the measured float32 error needs more (see above)

OTHERS = [b for b in ALL if b != "numpy"]
METHODS = list(cc.REGISTRY)
_RUNS: dict[tuple, dict] = {}


def _batches(loss: str, dtype: str) -> list[dict]:
    """Per step: x, y and a covariance batch, NumPy, the same for every backend."""
    rng = np.random.default_rng(2024)
    out = []
    for _ in range(STEPS):
        x = rng.standard_normal((BATCH, SIZES[0])).astype(dtype)
        y = rng.integers(0, SIZES[-1], BATCH) if loss == "ce" else rng.standard_normal((BATCH, SIZES[-1])).astype(dtype)
        out.append({"x": x, "y": y, "cov": rng.standard_normal((COV_BATCH, SIZES[0])).astype(dtype)})
    return out


def _snapshot(tree):
    """A NumPy copy of a (params, state, info) pytree."""
    return [(path, None if leaf is None else np.asarray(cc.backends.to_numpy(leaf)))
            for path, leaf in tree_leaves_with_paths(tree)]


def _run(backend: str, method: str, loss: str, dtype: str) -> dict:
    """``{steps: snapshot}`` after 1 and 10 steps (cached per module)."""
    key = (backend, method, loss, dtype)
    if key in _RUNS:
        return _RUNS[key]
    model, params = cc.backends.mlp(backend, SIZES, activation="tanh", dtype=dtype, seed=0, init="uniform")
    opt = cc.REGISTRY[method].make_test()
    missing = [need for need in getattr(opt, "needs", ()) if not cc.protocol.provides(model, need)]
    if missing:
        _RUNS[key] = {"skip": f"{backend} model lacks {', '.join(missing)} needed by {method}"}
        return _RUNS[key]
    lossf = cc.losses.get(loss)
    state = opt.init(params)
    refresh = getattr(opt, "needs_refresh", None)
    snaps: dict = {}
    for t, b in enumerate(_batches(loss, dtype), start=1):
        kw = {}
        if refresh is not None and refresh(state):
            kw["cov_batch"] = cc.backends.asarray(backend, b["cov"])
        x, y = cc.backends.asarray(backend, b["x"]), cc.backends.asarray(backend, b["y"])
        params, state, info = opt.step(model, lossf, params, state, x, y, **kw)
        if t in CHECKED:
            snaps[t] = _snapshot({"params": params, "state": state, "info": info})
    _RUNS[key] = snaps
    return snaps


def _cases():
    for method in METHODS:
        for loss in cc.REGISTRY[method].losses:
            for dtype in ("float64", "float32"):
                for backend in OTHERS:
                    # eager JAX compiles every op once per dtype: its float32 runs are slow-marked
                    yield param(backend, method, loss, dtype, backend, id=f"{method}-{loss}-{dtype}-{backend}",
                                slow=backend == "jax" and dtype == "float32")


@pytest.mark.parametrize("method,loss,dtype,backend", list(_cases()))
def test_backend_matches_numpy(method, loss, dtype, backend):
    ref = _run("numpy", method, loss, dtype)
    got = _run(backend, method, loss, dtype)
    for run in (ref, got):
        if "skip" in run:
            pytest.skip(run["skip"])
    for steps in CHECKED:
        rtol = RTOL_FLOAT32.get(method, RTOL[dtype]) if dtype == "float32" else RTOL[dtype]
        assert_allclose_across({backend: dict(got[steps]), "numpy": dict(ref[steps])}, rtol=rtol,
                               reference="numpy", what=f"{method} ({loss}, {dtype}) after {steps} step(s)")
    # the comparison is not vacuous: the params moved
    moved = [np.max(np.abs(a - b)) for (p, a), (_, b) in zip(ref[STEPS], ref[1]) if p.startswith("['params']")]
    assert max(moved) > 0, f"{method} did not change the params in {STEPS} steps"
