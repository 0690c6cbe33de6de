"""Public API contract, bad input, purity, and the no-framework-in-the-core rule."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import curvcore as cc
from cases import make_problem

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_imports_no_framework():
    """curvcore/ never imports torch/jax/cupy (and methods/losses/protocol not even numpy)."""
    framework = re.compile(r"^\s*(import|from)\s+(torch|jax|jaxlib|cupy|cupyx)\b", re.M)
    numpy_re = re.compile(r"^\s*(import|from)\s+numpy\b", re.M)
    bad = []
    for path in (ROOT / "curvcore").rglob("*.py"):
        text = path.read_text()
        if framework.search(text):
            bad.append(str(path))
        rel = path.relative_to(ROOT / "curvcore").as_posix()
        if (rel.startswith("methods/") or rel.startswith("_") or rel in ("losses.py", "protocol.py")) \
                and numpy_re.search(text):
            bad.append(f"{path} (numpy)")
    assert not bad, f"framework imports in the core: {bad}"


def test_registry_and_public_names():
    names = cc.method_names()
    assert {"sgd", "adam"} <= set(names)
    for name in names:
        spec = cc.get_method(name)
        assert getattr(cc, spec.cls.__name__) is spec.cls
        opt = spec.make()
        assert callable(opt.init) and callable(opt.step)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        cc.get_method("nope")


def test_backends_api():
    assert "numpy" in cc.backends.names()
    with pytest.raises(ValueError, match="unknown backend 'mlx'"):
        cc.backends.mlp("mlx", [2, 2])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        cc.backends.mlp("numpy", [2, 3, 2], activation="swish")
    with pytest.raises(ValueError, match="dtype must be"):
        cc.backends.mlp("numpy", [2, 3, 2], dtype="float16")
    with pytest.raises(ValueError, match="sizes must list"):
        cc.backends.mlp("numpy", [2])
    a = np.arange(6.0).reshape(2, 3)
    for name in cc.backends.names():
        back = cc.backends.to_numpy(cc.backends.asarray(name, a))
        np.testing.assert_array_equal(back, a)


def test_same_initial_weights_on_every_backend():
    ref = cc.backends.mlp("numpy", [5, 4, 3], seed=11)[1]
    for name in cc.backends.names():
        params = cc.backends.mlp(name, [5, 4, 3], seed=11)[1]
        for p, q in zip(params, ref):
            np.testing.assert_array_equal(cc.backends.to_numpy(p), q)


@pytest.mark.parametrize("method", cc.method_names())
def test_bad_input_is_rejected_with_a_clear_message(method):
    spec = cc.get_method(method)
    loss_name = spec.losses[0]
    model, params, x, y, loss = make_problem("numpy", [4, 5, 3], "tanh", loss_name, batch=6, seed=0)
    opt = spec.make_test()
    state = opt.init(params)
    x_nan = x.copy()
    x_nan[1, 2] = np.nan
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        opt.step(model, loss, params, state, x_nan, y)
    bad_params = [p.copy() for p in params]
    bad_params[0][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"params\[0\] contains NaN or Inf"):
        opt.step(model, loss, bad_params, state, x, y)
    with pytest.raises(ValueError, match="x has 3 features but the model expects 4"):
        opt.step(model, loss, params, state, x[:, :3], y)
    with pytest.raises(TypeError, match="dtype mismatch"):
        opt.step(model, loss, params, state, x.astype(np.float32), y)
    if "array_api_strict" in cc.backends.names():
        x_strict = cc.backends.asarray("array_api_strict", x)
        with pytest.raises(TypeError, match="different array libraries"):
            opt.step(model, loss, params, state, x_strict, y)


def _each_method(seed):
    """``(name, model, params, x, y, loss, opt, state)`` for every registered method, test settings."""
    for name in cc.method_names():
        spec = cc.get_method(name)
        model, params, x, y, loss = make_problem("numpy", [4, 5, 3], "tanh", spec.losses[0], batch=6, seed=seed)
        opt = spec.make_test()
        yield name, model, params, x, y, loss, opt, opt.init(params)


def test_methods_do_not_mutate_their_inputs():
    for name, model, params, x, y, loss, opt, state in _each_method(seed=1):
        copies = [p.copy() for p in params], x.copy(), y.copy()
        state_copy = [np.array(s, copy=True) for s in _leaves(state)]
        for _ in range(2):
            opt.step(model, loss, params, state, x, y)
        for p, c in zip(params, copies[0]):
            np.testing.assert_array_equal(p, c, err_msg=f"{name} mutated params")
        np.testing.assert_array_equal(x, copies[1])
        np.testing.assert_array_equal(y, copies[2])
        for s, c in zip(_leaves(state), state_copy):
            np.testing.assert_array_equal(s, c, err_msg=f"{name} mutated its state")


def test_two_identical_steps_agree_exactly():
    """No hidden state: the same call twice gives the same numbers (curvlinops' compare_consecutive)."""
    for name, model, params, x, y, loss, opt, state in _each_method(seed=2):
        a = opt.step(model, loss, params, state, x, y)[0]
        b = opt.step(model, loss, params, state, x, y)[0]
        for p, q in zip(a, b):
            np.testing.assert_array_equal(p, q, err_msg=name)


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]
