"""Checkpoints: save, resume bit-identically, move to another backend, and refuse what doesn't fit."""

from __future__ import annotations

import os

import numpy as np
import pytest

import curvcore as cc
from backend_list import require
from cases import make_problem
from curvcore.testing import assert_allclose_across, tree_leaves_with_paths


def _steps(opt, model, loss, params, state, x, y, n):
    for _ in range(n):
        params, state, _ = opt.step(model, loss, params, state, x, y)
    return params, state


def _np(tree):
    return [(p, cc.backends.to_numpy(a)) for p, a in tree_leaves_with_paths(tree)]


@pytest.mark.parametrize("method", cc.method_names())
def test_resume_is_bit_identical(tmp_path, method):
    """Save after 2 steps, load (method rebuilt from the file), 2 more steps == 4 steps without stopping."""
    spec = cc.get_method(method)
    model, params, x, y, loss = make_problem("numpy", [4, 5, 3], "tanh", spec.losses[0], batch=8, seed=1)
    opt = spec.make_test()
    p2, s2 = _steps(opt, model, loss, params, opt.init(params), x, y, 2)
    path = tmp_path / "run.npz"
    cc.save(path, opt, p2, s2, epoch=2)
    p4, s4 = _steps(opt, model, loss, p2, s2, x, y, 2)
    opt_r, p_r, s_r = cc.load(path)
    assert type(opt_r) is type(opt) and repr(opt_r) == repr(opt)
    assert type(s_r) is type(s2)
    p4r, s4r = _steps(opt_r, model, loss, p_r, s_r, x, y, 2)
    for (path_a, a), (_, b) in zip(_np((p4, s4)), _np((p4r, s4r))):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), path_a
    assert cc.checkpoint.read_metadata(path)["extra"] == {"epoch": 2}
    assert [f for f in os.listdir(tmp_path) if f != "run.npz"] == []  # no temporary file left


@pytest.mark.parametrize("target", ["torch", "jax"])
def test_move_a_run_to_another_backend(tmp_path, target):
    require(target)
    model, params, x, y, loss = make_problem("numpy", [4, 5, 3], "tanh", "ce", batch=8, seed=2)
    opt = cc.CurveBall()
    p2, s2 = _steps(opt, model, loss, params, opt.init(params), x, y, 2)
    cc.save(tmp_path / "run.npz", opt, p2, s2)
    ref = _steps(opt, model, loss, p2, s2, x, y, 3)
    t_model, t_params = cc.backends.mlp(target, [4, 5, 3])
    opt_t, p_t, s_t = cc.load(tmp_path / "run.npz", like=t_params)  # poured into the target's params
    assert cc.backends.backend_of(p_t[0]) == target and cc.backends.backend_of(s_t.z[0]) == target
    put = lambda a: cc.backends.asarray(target, a)  # noqa: E731
    got = _steps(opt_t, t_model, loss, p_t, s_t, put(x), put(y), 3)
    assert_allclose_across({target: got, "numpy": ref}, rtol=1e-10)


def test_pytree_params_round_trip(tmp_path):
    jax = pytest.importorskip("jax")
    require("jax")
    from curvcore.backends import jax as cj

    def apply(p, x):
        return jax.numpy.tanh(x @ p["dense"]["w"] + p["dense"]["b"]) @ p["head"]

    rng = np.random.default_rng(0)
    params = {"dense": {"w": cj.from_numpy(rng.standard_normal((4, 5))), "b": cj.from_numpy(np.zeros(5))},
              "head": cj.from_numpy(rng.standard_normal((5, 3)))}
    model = cj.JaxModel(apply)
    x, y = cj.from_numpy(rng.standard_normal((6, 4))), cj.from_numpy(rng.integers(0, 3, 6))
    opt = cc.Adam(lr=0.1)
    p1, s1 = _steps(opt, model, "ce", params, opt.init(params), x, y, 1)
    cc.save(tmp_path / "tree.npz", opt, p1, s1)
    _, p_r, s_r = cc.load(tmp_path / "tree.npz", like=params)
    assert jax.tree_util.tree_structure(p_r) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(s_r.m) == jax.tree_util.tree_structure(params)
    for (_, a), (_, b) in zip(_np((p1, s1)), _np((p_r, s_r))):
        assert np.array_equal(a, b)
    _, p_n, _ = cc.load(tmp_path / "tree.npz", like="numpy")  # dicts rebuild without a template
    assert sorted(p_n) == ["dense", "head"] and sorted(p_n["dense"]) == ["b", "w"]


def test_refusals(tmp_path):
    model, params, x, y, loss = make_problem("numpy", [4, 5, 3], "tanh", "ce", batch=8)
    opt = cc.SGD(lr=0.1, momentum=0.9)
    path = tmp_path / "sgd.npz"
    cc.save(path, opt, params, opt.init(params))
    with pytest.raises(ValueError, match="holds a SGD checkpoint; it can't continue a CurveBall"):
        cc.load(path, method=cc.CurveBall())
    _, other = cc.backends.mlp("numpy", [4, 7, 3])
    with pytest.raises(ValueError, match="another network"):
        cc.load(path, like=other)
    meta = cc.checkpoint.read_metadata(path)
    data = dict(np.load(path))
    data["__meta__"] = np.asarray(__import__("json").dumps({**meta, "format": cc.checkpoint.FORMAT + 1}))
    np.savez(tmp_path / "newer.npz", **data)
    with pytest.raises(ValueError, match="newer than this curvcore"):
        cc.load(tmp_path / "newer.npz")


def test_writing_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous checkpoint intact and no temporary file."""
    model, params, x, y, loss = make_problem("numpy", [4, 5, 3], "tanh", "ce", batch=8)
    opt = cc.SGD()
    path = tmp_path / "run.npz"
    cc.save(path, opt, params, opt.init(params))
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        cc.save(path, opt, [2 * p for p in params], opt.init(params))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["run.npz"]
