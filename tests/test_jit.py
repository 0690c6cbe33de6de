"""Every registered method under ``jax.jit`` (``curvcore.backends.jax.jit_step``).

Per method (its test settings, float64, cross-entropy where supported):

* the jitted step matches the un-jitted NumPy step to 1e-10 at every step;
* it compiles once per keyword signature (methods with ``needs_refresh`` see
  two: with and without ``cov_batch``), counted both as Python traces and
  as jax's compiled executables (a second compile without a retrace, e.g.
  from argument shardings, is caught too);
* the state keeps its shapes, dtypes and weak types across steps (else the
  next call would recompile).

Nothing here names a method: new registrations are covered automatically.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import needs
from curvcore.testing import assert_allclose_across, tree_leaves_with_paths

pytestmark = needs("jax")

SIZES = [8, 6, 4]
BATCH = 16
COV_BATCH = 12
STEPS = 4  # refresh_every = 3 in a test setting refreshes twice, at counts 0 and 3
RTOL = 1e-10


def _loss(method: str) -> str:
    losses = cc.REGISTRY[method].losses
    return "ce" if "ce" in losses else losses[0]


def _batches(loss: str) -> list[dict]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(STEPS):
        x = rng.standard_normal((BATCH, SIZES[0]))
        y = rng.integers(0, SIZES[-1], BATCH) if loss == "ce" else rng.standard_normal((BATCH, SIZES[-1]))
        out.append({"x": x, "y": y, "cov": rng.standard_normal((COV_BATCH, SIZES[0]))})
    return out


def _avals(tree):
    """``(path, shape, dtype, weak_type)`` per leaf: what decides a recompile."""
    return [(p, tuple(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False)))
            for p, a in tree_leaves_with_paths(tree) if a is not None]


@pytest.mark.parametrize("method", list(cc.REGISTRY))
def test_jit_step_matches_numpy_and_compiles_once(method):
    from curvcore.backends import jax as cj

    loss = cc.losses.get(_loss(method))
    batches = _batches(loss.name)
    runs = {}
    for backend in ("numpy", "jax"):
        model, params = cc.backends.mlp(backend, SIZES, activation="tanh", seed=0, init="uniform")
        opt = cc.REGISTRY[method].make_test()
        state = opt.init(params)
        step = cj.jit_step(opt, model, loss) if backend == "jax" else (
            lambda p, s, x, y, **kw: opt.step(model, loss, p, s, x, y, **kw))
        refresh = getattr(opt, "needs_refresh", None)
        start, history, signatures = _avals(state), [], set()
        for b in batches:
            kw = {}
            if refresh is not None and refresh(state):
                kw["cov_batch"] = cc.backends.asarray(backend, b["cov"])
            signatures.add(tuple(sorted(kw)))
            x, y = cc.backends.asarray(backend, b["x"]), cc.backends.asarray(backend, b["y"])
            params, state, info = step(params, state, x, y, **kw)
            history.append({"params": params, "state": state, "info": info})
            if backend == "jax":
                assert _avals(state) == start, f"{method}: the state changed shape/dtype/weak type in a step"
        runs[backend] = history
    for t, (got, ref) in enumerate(zip(runs["jax"], runs["numpy"]), start=1):
        assert_allclose_across({"jax-jit": got, "numpy": ref}, rtol=RTOL, reference="numpy",
                               what=f"{method} ({loss.name}) after {t} jitted step(s)")
    assert step.traces == len(signatures), f"{method}: traced {step.traces} times for {len(signatures)} signatures"
    assert step.cache_size() == len(signatures), (
        f"{method}: {step.cache_size()} compiled executables for {len(signatures)} call signatures (recompiles)")
