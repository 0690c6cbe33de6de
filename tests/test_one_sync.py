"""A validated step costs one host sync (issue "Speed, part 2", item 2), with the guarantees of "Fail loudly"
intact, and the torch fast paths (fused list algebra, the log-softmax cross-entropy) equal the generic code."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import curvcore as cc
from backend_list import params as backend_params

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from curvcore import tree_algebra as ta  # noqa: E402
from curvcore.backends import torch as ct  # noqa: E402

SIZES = [5, 7, 4]


def _problem(backend="torch", seed=0, batch=9):
    model, params = cc.backends.mlp(backend, SIZES, activation="tanh", seed=seed)
    rng = np.random.default_rng(seed)
    x = cc.backends.asarray(backend, rng.standard_normal((batch, SIZES[0])))
    y = cc.backends.asarray(backend, rng.integers(0, SIZES[-1], batch))
    return model, params, x, y


@pytest.mark.parametrize("method", [cc.SGD(lr=0.1, momentum=0.9), cc.Adam(lr=1e-2)], ids=lambda m: type(m).__name__)
def test_a_validated_step_is_one_host_sync(method, torch_syncs):
    model, params, x, y = _problem()
    counts, info = torch_syncs.per_step(method, model, params, x, y, steps=3)
    assert counts == [1, 1, 1]
    assert bool(info["finite"])


def test_the_torch_optimizer_step_with_nn_cross_entropy_is_one_host_sync(torch_syncs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    opt = ct.Optimizer(net, cc.SGD(lr=0.1, momentum=0.9), nn.CrossEntropyLoss())  # ignore_index=-100
    x, y = torch.randn(9, 5), torch.randint(0, 4, (9,))
    opt.step(x, y)
    torch_syncs.n = 0
    opt.step(x, y)
    assert torch_syncs.n == 1


@pytest.mark.parametrize("backend", backend_params(["numpy", "torch"]))
@pytest.mark.parametrize("where", ["x", "params[2]", "state.v[1]", "labels"])
def test_bad_inputs_are_named_after_the_one_check_and_nothing_changes(backend, where):
    model, params, x, y = _problem(backend)
    method = cc.SGD(lr=0.1, momentum=0.9)
    state = method.init(params)
    params, state, _ = method.step(model, "ce", params, state, x, y)
    before = [cc.backends.to_numpy(p) for p in [*params, *state.v]]
    xn, yn = cc.backends.to_numpy(x), cc.backends.to_numpy(y)
    if where == "x":
        xn = xn.copy()
        xn[3, 1] = np.inf
        x = cc.backends.asarray(backend, xn)
    elif where == "params[2]":
        bad = cc.backends.to_numpy(params[2])
        bad[0, 0] = np.nan
        params = [*params[:2], cc.backends.asarray(backend, bad), *params[3:]]
    elif where == "state.v[1]":
        bad = cc.backends.to_numpy(state.v[1])
        bad[0] = -np.inf
        state = state._replace(v=[state.v[0], cc.backends.asarray(backend, bad), *state.v[2:]])
    else:
        yn = yn.copy()
        yn[2] = SIZES[-1] + 3
        y = cc.backends.asarray(backend, yn)
    match = "^SGD: CrossEntropy: labels must lie in" if where == "labels" else f"^SGD: {re.escape(where)} contains"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy RuntimeWarning before the error
        with pytest.raises(ValueError, match=match):
            method.step(model, "ce", params, state, x, y)
    if where in ("x", "labels"):  # the caller's arrays are untouched
        after = [cc.backends.to_numpy(p) for p in [*params, *state.v]]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_a_failed_torch_step_leaves_the_module_and_its_dropout_masks_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(0.3), nn.Linear(7, 4))
    opt = ct.Optimizer(net, cc.SGD(lr=0.1), nn.CrossEntropyLoss())
    x, y = torch.randn(9, 5), torch.randint(0, 4, (9,))
    weights = [p.detach().clone() for p in net.parameters()]
    steps = opt.model._steps
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        opt.step(bad, y)
    assert opt.model._steps == steps
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))
    opt.step(x, y)
    assert opt.model._steps == steps + 1


def _lists(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (6,), (3, 6), (3,), ()]
    return ([torch.randn(s, generator=g, dtype=dtype) * 3 for s in shapes],
            [torch.randn(s, generator=g, dtype=dtype) for s in shapes])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_torch_list_algebra_equals_the_generic_code(dtype, monkeypatch):
    a, b = _lists(getattr(torch, dtype))
    eps = torch.finfo(getattr(torch, dtype)).eps
    s = torch.tensor(1.7, dtype=getattr(torch, dtype))
    positive = [u.abs() + 0.1 for u in b]

    def ops():
        return {
            "add": ta.tree_add(a, b), "sub": ta.tree_sub(a, b),
            "div": ta.tree_div(a, positive), "scale": ta.tree_scale(a, -0.7), "scale_0d": ta.tree_scale(a, s),
            "shift": ta.tree_shift(a, s), "sqrt": ta.tree_sqrt(positive), "axpy": ta.tree_axpy(0.3, a, b),
            "lerp": ta.tree_lerp(a, b, 0.1), "addcmul": ta.tree_addcmul(a, b, a, 0.3), "norm": [ta.tree_norm(a)],
        }

    fused = ops()
    monkeypatch.setattr(ta, "_FUSED", {})
    generic = ops()
    for name in fused:
        assert all(isinstance(t, torch.Tensor) for t in fused[name])
        assert isinstance(fused[name], list)
        for u, v in zip(fused[name], generic[name]):
            scale = float(v.abs().max()) if v.numel() else 1.0
            assert float((u - v).abs().max()) <= 4 * eps * scale, name


@pytest.mark.parametrize("ignore_index", [None, 2, -100])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(7, 5), (7, 3, 5)])
def test_torch_cross_entropy_kernel_equals_the_array_api_loss(ignore_index, reduction, shape):
    rng = np.random.default_rng(1)
    f, y = rng.standard_normal(shape) * 20, rng.integers(0, 5, shape[:-1])
    if ignore_index == -100:
        y.reshape(-1)[0] = -100
    loss = cc.losses.CrossEntropy(reduction=reduction, ignore_index=ignore_index)
    value, grad = loss.value_and_grad(f, y)  # the generic array-API code on NumPy
    tv, tg = loss.value_and_grad(torch.from_numpy(f), torch.from_numpy(y))
    assert abs(float(tv) - value) <= 1e-14 * abs(value)
    assert np.abs(tg.numpy() - grad).max() <= 1e-14 * np.abs(grad).max()
    assert float(loss.value(torch.from_numpy(f), torch.from_numpy(y))) == float(tv)
    assert torch.equal(loss.grad(torch.from_numpy(f), torch.from_numpy(y)), tg)


def test_torch_cross_entropy_kernel_poisons_bad_labels_inside_a_step():
    from curvcore._checks import step_scope

    f, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 5, 2])
    with step_scope(True, "X"):
        value, grad = cc.losses.CrossEntropy().value_and_grad(f, y)
    assert np.isnan(float(value)) and bool(torch.isnan(grad).all())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\); got 1 label"):
        cc.losses.CrossEntropy().value(f, y)
