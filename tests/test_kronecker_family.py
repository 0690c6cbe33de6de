"""The Kronecker family (K-FAC, ACP, CenteredSGD on ``curvcore.methods.kronecker``): the cached fast paths
against the slow formulas in float64, the owner map of data-parallel refreshes, and the module layout.

The slow references are dense NumPy: ``inv(alpha C + eps I)`` from the layer inputs of a NumPy MLP,
``np.linalg.solve`` with the undamped K-FAC factors. Tolerances are relative to what is compared.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

import curvcore as cc
from cases import ACP_CASES, KFAC_CASES, case_problem
from curvcore._reduce import Reducer, reducing
from curvcore.methods import kronecker as kr
from reference import assert_rel, layer_inputs, to_np

BACKENDS = [b for b in ("numpy", "torch") if cc.backends.available(b)]


def _cov(a):
    ac = a - a.mean(0)
    return ac.T @ ac / a.shape[0]


def _dense_whitening(a, alpha, eps):
    """``(alpha C + eps I)^-1 alpha`` = ``U diag(1/(alpha s + eps)) U^T`` alpha: the slow formula's matrix / alpha."""
    C = _cov(a)
    return np.linalg.inv(alpha * C + eps * np.eye(C.shape[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_acp_cached_preconditioner_is_the_inverse_damped_covariance(backend, alpha):
    """P stored at a refresh = inv(alpha C + eps I), C the biased covariance of the cov_batch layer inputs."""
    case = ACP_CASES["cached_preconditioner"]
    model, params, x, y, loss = case_problem(backend, case)
    xc = cc.backends.asarray(backend, np.random.default_rng(2).standard_normal((13, case["sizes"][0])) + 0.5)
    opt = cc.ACP(lr=0.3, eps=0.05, alpha=alpha, refresh_every=4)
    _, state, _ = opt.step(model, loss, params, opt.init(params), x, y, cov_batch=xc)
    inputs = layer_inputs(case["sizes"], case["activation"], to_np(params), cc.backends.to_numpy(xc))
    for k, P in enumerate(state.P):
        assert_rel(cc.backends.to_numpy(P), _dense_whitening(inputs[k], alpha, 0.05), 1e-10, f"P{k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_acp_steps_with_the_cached_preconditioner_equal_the_eigen_formula(backend, bias_correction):
    """Between refreshes, -lr G_hat P (cached) = -lr (G_hat U) diag(1/(alpha s + eps)) U^T (P = 0: recomputed)."""
    model, params, x, y, loss = case_problem(backend, ACP_CASES["cached_steps"])
    opt = cc.ACP(lr=0.2, eps=0.03, alpha=0.5, refresh_every=3, bias_correction=bias_correction)
    state = opt.init(params)
    for step in range(5):  # counts 0..4: refreshes at 0 and 3
        slow_state = state._replace(P=[P * 0 for P in state.P])
        fast, state_next, info = opt.step(model, loss, params, state, x, y)
        slow, _, _ = opt.step(model, loss, params, slow_state, x, y)
        for k, (a, b) in enumerate(zip(to_np(fast), to_np(slow))):
            assert_rel(a, b, 1e-12, f"step {step} params[{k}]")
        assert float(info["refreshed"]) == float(step % 3 == 0)
        params, state = fast, state_next


def test_acp_adaptive_alpha_keeps_no_cached_preconditioner():
    model, params, x, y, loss = case_problem("numpy", ACP_CASES["adaptive_uncached"])
    opt = cc.ACP(alpha="adaptive", lr=0.05, refresh_every=2)
    _, state, _ = opt.step(model, loss, params, opt.init(params), x, y)
    assert [tuple(P.shape) for P in state.P] == [(0, 0)] * (len(params) // 2)


def test_acp_singular_cached_preconditioner_still_raises_the_named_error():
    """eps = 0 with a rank-deficient covariance: no P is cached and the step names the problem."""
    model, params, x, y, loss = case_problem("numpy", ACP_CASES["singular_uncached"])
    opt = cc.ACP(eps=0.0, refresh_every=5)
    with pytest.raises(ValueError, match="ACP: alpha\\*C \\+ eps\\*I is singular"):
        opt.step(model, loss, params, opt.init(params), x, y)


class _Rank(Reducer):
    """One rank of a 2-process group without processes: every collective returns this rank's value."""

    size = 2

    def __init__(self, rank):
        self.rank = rank


def test_acp_refresh_owner_map_gives_each_layer_from_its_owner():
    """Data-parallel refresh: each layer's [U; s; P] is made on one owner (the others hold zeros of the same
    shape until the broadcast); the owner's P equals U diag(1/(alpha s + eps)) U^T and inv(alpha C + eps I)."""
    case = ACP_CASES["refresh_owners"]
    model, params, x, y, loss = case_problem("numpy", case)
    opt = cc.ACP(lr=0.1, eps=0.02, alpha=0.7)
    specs = opt.layer_candidates(params, None)
    from curvcore.layers import records

    rec = records(model, params, x, lambda out: loss.grad(out, y), specs)
    per_rank = []
    for rank in (0, 1):
        with reducing(_Rank(rank)) as r:
            owners = r.owners([float(n) ** 3 for n in case["sizes"][:-1]])
            per_rank.append(opt.refresh_factors(model, loss, params, x, y, rec, 0))
    assert set(owners) == {0, 1}
    inputs = layer_inputs(case["sizes"], case["activation"], params, x)
    for k, owner in enumerate(owners):
        mine, other = per_rank[owner][k], per_rank[1 - owner][k]
        assert not np.any(other["P"]) and other["P"].shape == mine["P"].shape
        U, s = mine["U"], mine["s"]
        assert_rel(mine["P"], (U / (0.7 * s + 0.02)) @ U.T, 1e-12, f"P{k} vs its eigendecomposition")
        a = inputs[k]  # the fake reducer counts 2 x the local rows in every mean
        ac = a - a.sum(0) / (2 * a.shape[0])
        C = ac.T @ ac / (2 * a.shape[0])
        assert_rel(mine["P"], np.linalg.inv(0.7 * C + 0.02 * np.eye(U.shape[0])), 1e-10, f"P{k}")


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_kfac_steps_between_refreshes_apply_the_cached_inverses(fisher):
    """At counts 1, 2 (no refresh) ΔΘ = -lr solve(G + √d I, ∇Θ) solve(A + √d I) with the factors of count 0."""
    model, params, x, y, loss = case_problem("numpy", KFAC_CASES["cached_inverses"])
    opt = cc.KFAC(lr=0.2, damping=0.04, refresh_every=3, fisher=fisher)
    factors = opt.kronecker_factors(model, loss, params, x, y)
    state = opt.init(params)
    p = params
    for count in range(3):
        new, state, info = opt.step(model, loss, p, state, x, y)
        rec = cc.layers.records(model, p, x, lambda out: loss.grad(out, y), opt.layer_candidates(p, None))
        for k, ((_, A, G), r) in enumerate(zip(factors, rec.layers)):
            a1 = np.concatenate([r.a, np.ones((r.a.shape[0], 1))], axis=1)
            grad = r.g.T @ a1
            root = 0.2 * np.eye(G.shape[0]), 0.2 * np.eye(A.shape[0])  # sqrt(0.04) I
            want = -0.2 * np.linalg.solve(G + root[0], np.linalg.solve(A + root[1], grad.T).T)
            got = np.concatenate([new[2 * k] - p[2 * k], (new[2 * k + 1] - p[2 * k + 1])[:, None]], axis=1)
            assert_rel(got, want, 1e-10, f"count {count} layer {k}")
        assert float(info["refreshed"]) == float(count == 0)
        p = new


def test_kfac_default_refresh_is_every_ten_steps():
    assert cc.KFAC().refresh_every == 10


def test_family_methods_import_only_the_family_module():
    """kfac, acp and centered_sgd are choices of factors: none imports another method module."""
    folder = pathlib.Path(kr.__file__).parent
    methods = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")} - {"kronecker"}
    for name in ("kfac", "acp", "centered_sgd"):
        imported = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported |= {node.module} if node.module else {a.name for a in node.names}
        assert "kronecker" in imported and not imported & methods, (name, imported)
        assert issubclass(getattr(cc, {"kfac": "KFAC", "acp": "ACP", "centered_sgd": "CenteredSGD"}[name]),
                          kr.KroneckerMethod)
