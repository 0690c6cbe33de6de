"""Losses against finite differences and independent NumPy formulas, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from reference import assert_rel, loss_parts, loss_value

B, C = 6, 4


def _data(backend, name, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    f = scale * rng.standard_normal((B, C))
    y = rng.integers(0, C, B) if name == "ce" else rng.standard_normal((B, C))
    v = rng.standard_normal((B, C))
    to = lambda a: cc.backends.asarray(backend, a)  # noqa: E731
    return f, y, v, to(f), to(y), to(v)


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_value_grad_hvp_match_references(backend, name):
    f, y, v, fb, yb, vb = _data(backend, name)
    loss = cc.losses.get(name)
    value, gf, HL = loss_parts(name, f, y)
    assert abs(float(loss.value(fb, yb)) - value) <= 1e-14 * max(1, abs(value))
    assert_rel(cc.backends.to_numpy(loss.grad(fb, yb)), gf, 1e-13, "grad")
    assert_rel(cc.backends.to_numpy(loss.hvp(fb, yb, vb)).ravel(), HL @ v.ravel(), 1e-13, "hvp")


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_derivatives_match_finite_differences(name):
    """grad, hvp and d3 against central differences of value, grad and hvp (h = 1e-5)."""
    f, y, v, *_ = _data("numpy", name, seed=1)
    loss, h = cc.losses.get(name), 1e-5
    fd_grad = np.zeros_like(f)
    for i in np.ndindex(f.shape):
        e = np.zeros_like(f)
        e[i] = h
        fd_grad[i] = (loss.value(f + e, y) - loss.value(f - e, y)) / (2 * h)
    assert_rel(loss.grad(f, y), fd_grad, 1e-8, "grad vs FD")
    fd_hvp = (loss.grad(f + h * v, y) - loss.grad(f - h * v, y)) / (2 * h)
    assert_rel(loss.hvp(f, y, v), fd_hvp, 1e-8, "hvp vs FD")
    fd_d3 = np.sum(v * (loss.hvp(f + h * v, y, v) - loss.hvp(f - h * v, y, v))) / (2 * h)
    assert abs(float(loss.d3(f, y, v)) - fd_d3) <= 1e-7 * max(1.0, abs(fd_d3)), (float(loss.d3(f, y, v)), fd_d3)


def test_cross_entropy_is_stable_for_huge_logits():
    f, y, *_ = _data("numpy", "ce", scale=1e4)
    loss = cc.losses.CrossEntropy()
    value = float(loss.value(f, y))
    assert np.isfinite(value)
    assert abs(value - loss_value("ce", f.astype(np.longdouble), y)) <= 1e-9 * abs(value)
    assert np.all(np.isfinite(loss.grad(f, y))) and np.all(np.isfinite(loss.hvp(f, y, f)))


def test_loss_errors_name_the_problem():
    f = np.zeros((3, 4))
    with pytest.raises(ValueError, match="labels must be 1-d"):
        cc.losses.CrossEntropy().value(f, np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="labels must be integers"):
        cc.losses.CrossEntropy().value(f, np.zeros(3))
    with pytest.raises(ValueError, match="targets must have the outputs' shape"):
        cc.losses.MSE().value(f, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 outputs but 2 targets"):
        cc.losses.MSE().grad(f, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        cc.losses.get("hinge")
