"""Losses against finite differences and independent NumPy formulas, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import require
from reference import assert_rel, loss_parts, loss_value, loss_value_nd

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
    _fd_checks(cc.losses.get(name), f, y, v)


def test_cross_entropy_is_stable_for_huge_logits():
    f, y, *_ = _data("numpy", "ce", scale=1e4)
    loss = cc.losses.CrossEntropy()
    value = float(loss.value(f, y))
    assert np.isfinite(value)
    assert abs(value - loss_value("ce", f.astype(np.longdouble), y)) <= 1e-9 * abs(value)
    assert np.all(np.isfinite(loss.grad(f, y))) and np.all(np.isfinite(loss.hvp(f, y, f)))


def test_loss_errors_name_the_problem():
    f = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels of shape \(B, ...\) = \(3,\)"):
        cc.losses.CrossEntropy().value(f, np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="labels must be integers"):
        cc.losses.CrossEntropy().value(f, np.zeros(3))
    with pytest.raises(ValueError, match="targets must have the outputs' shape"):
        cc.losses.MSE().value(f, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"outputs \(3, 4\) and targets \(2, 4\) must share the batch axis"):
        cc.losses.MSE().grad(f, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        cc.losses.get("hinge")


# ---------------------------------------------------------------------------
# outputs of any shape: (B, T, C), (B, H, W, C); ignore_index; reductions
# ---------------------------------------------------------------------------

SHAPES = [(5, 3, 4), (3, 2, 3, 4)]


def _nd_data(shape, name, seed=0, ignore=None):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal(shape)
    if name == "ce":
        y = rng.integers(0, shape[-1], shape[:-1])
        if ignore is not None:
            y.flat[::3] = ignore
    else:
        y = rng.standard_normal(shape)
    return f, y, rng.standard_normal(shape)


def _fd_checks(loss, f, y, v, h=1e-5):
    fd_grad = np.zeros_like(f)
    for i in np.ndindex(f.shape):
        e = np.zeros_like(f)
        e[i] = h
        fd_grad[i] = (loss.value(f + e, y) - loss.value(f - e, y)) / (2 * h)
    assert_rel(loss.grad(f, y), fd_grad, 1e-8, "grad vs FD")
    assert_rel(loss.hvp(f, y, v), (loss.grad(f + h * v, y) - loss.grad(f - h * v, y)) / (2 * h), 1e-8, "hvp vs FD")
    fd_d3 = np.sum(v * (loss.hvp(f + h * v, y, v) - loss.hvp(f - h * v, y, v))) / (2 * h)
    assert abs(float(loss.d3(f, y, v)) - fd_d3) <= 1e-7 * max(1.0, abs(fd_d3))


@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "4d"])
@pytest.mark.parametrize("name", ["mse", "ce"])
def test_outputs_of_any_shape(shape, name):
    """value against an independent formula, grad/hvp/d3 against central differences, 3-d and 4-d outputs."""
    f, y, v = _nd_data(shape, name)
    loss = cc.losses.get(name)
    assert abs(float(loss.value(f, y)) - loss_value_nd(name, f, y)) <= 1e-13 * abs(loss_value_nd(name, f, y))
    _fd_checks(loss, f, y, v)


@pytest.mark.parametrize("backend_name", ["torch", "jax"])
def test_outputs_of_any_shape_agree_across_backends(backend_name):
    require(backend_name)
    for shape in SHAPES:
        for name in ("mse", "ce"):
            f, y, v = _nd_data(shape, name, seed=3)
            loss = cc.losses.get(name)
            put = lambda a: cc.backends.asarray(backend_name, a)  # noqa: E731
            for part, ref, got in (("value", loss.value(f, y), loss.value(put(f), put(y))),
                                   ("grad", loss.grad(f, y), loss.grad(put(f), put(y))),
                                   ("hvp", loss.hvp(f, y, v), loss.hvp(put(f), put(y), put(v))),
                                   ("d3", loss.d3(f, y, v), loss.d3(put(f), put(y), put(v)))):
                assert_rel(cc.backends.to_numpy(got), np.asarray(ref), 1e-12, f"{name} {shape} {part}")


def test_ignore_index():
    f, y, v = _nd_data((6, 4, 5), "ce", seed=2, ignore=-100)
    loss = cc.losses.CrossEntropy(ignore_index=-100)
    assert abs(float(loss.value(f, y)) - loss_value_nd("ce", f, y, -100)) <= 1e-13
    ignored = y == -100
    assert ignored.any() and np.all(loss.grad(f, y)[ignored] == 0) and np.all(loss.hvp(f, y, v)[ignored] == 0)
    _fd_checks(loss, f, y, v)
    # "sum" is the mean times the number of labelled positions
    total = cc.losses.CrossEntropy(reduction="sum", ignore_index=-100).value(f, y)
    assert abs(float(total) - float(loss.value(f, y)) * (~ignored).sum()) <= 1e-12 * abs(float(total))


def test_mse_reductions_match_their_definitions():
    f, y, v = _nd_data((4, 3, 2), "mse", seed=4)
    r2 = (f - y) ** 2
    for reduction, expected in (("batch", r2.sum() / (2 * 4)), ("mean", r2.mean()), ("sum", r2.sum())):
        loss = cc.losses.MSE(reduction=reduction)
        assert abs(float(loss.value(f, y)) - expected) <= 1e-13 * expected
        _fd_checks(loss, f, y, v)


@pytest.mark.parametrize("name", ["mse", "ce"])
def test_hessian_sqrt_reproduces_the_output_hessian(name):
    """sum_c S_c S_c^T equals the dense loss Hessian w.r.t. the outputs (block diagonal per example)."""
    f, y, v, *_ = _data("numpy", name, seed=5)
    loss = cc.losses.get(name)
    _, _, HL = loss_parts(name, f, y)
    cols = [np.ravel(c) for c in loss.hessian_sqrt(f, y)]
    # columns S_c hold one column of R_i per example; the blocks of different examples are separate
    dense = np.zeros_like(HL)
    for c in cols:
        for i in range(B):
            block = np.zeros(B * C)
            block[i * C:(i + 1) * C] = c[i * C:(i + 1) * C]
            dense += np.outer(block, block)
    assert_rel(dense, HL, 1e-13, "sum_c S_c S_c^T")


def test_labels_out_of_range_are_refused():
    f = np.zeros((3, 4))
    for bad in (4, -1, 10**6):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            cc.losses.CrossEntropy().value(f, np.array([0, bad, 1]))
    with pytest.raises(ValueError, match="or equal ignore_index=-100"):
        cc.losses.CrossEntropy(ignore_index=-100).grad(f, np.array([0, 7, -100]))
    assert np.isfinite(cc.losses.CrossEntropy(ignore_index=-100).value(f, np.array([0, 3, -100])))


def test_labels_out_of_range_give_nan_under_jit():
    jax = pytest.importorskip("jax")
    loss = cc.losses.CrossEntropy()
    value = jax.jit(lambda f, y: loss.value(f, y))(jax.numpy.zeros((3, 4)), jax.numpy.array([0, 5, 1]))
    assert np.isnan(float(value))
