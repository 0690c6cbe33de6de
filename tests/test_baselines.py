"""SGD and Adam against hand-written NumPy updates with complex-step gradients."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from cases import BASELINE_CASES, case_id, case_problem, net
from reference import assert_rel, flatten, grad_cs, loss_of_theta

CE_CASE = BASELINE_CASES[1]


def _reference_grad(params_flat, x, y, case):
    return grad_cs(loss_of_theta(*net(case), x, y), params_flat)


@pytest.mark.parametrize("case", BASELINE_CASES, ids=case_id)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_three_steps(backend, case, nesterov):
    model, params, x, y, loss = case_problem(backend, case, seed=3)
    opt = cc.SGD(lr=0.2, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    state = opt.init(params)
    theta, v = flatten(params), np.zeros(flatten(params).size)
    for _ in range(3):
        params, state, info = opt.step(model, loss, params, state, x, y)
        g = _reference_grad(theta, x, y, case) + 0.01 * theta
        v = 0.9 * v + g
        theta = theta - 0.2 * (g + 0.9 * v if nesterov else v)
    assert_rel(flatten(params), theta, 1e-12, "SGD params after 3 steps")
    assert int(cc.backends.to_numpy(state.count)) == 3


@pytest.mark.parametrize("case", BASELINE_CASES, ids=case_id)
def test_adam_three_steps(backend, case):
    model, params, x, y, loss = case_problem(backend, case, seed=4)
    opt = cc.Adam(lr=0.05, betas=(0.8, 0.99), eps=1e-8)
    state = opt.init(params)
    theta = flatten(params)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t in range(1, 4):
        params, state, info = opt.step(model, loss, params, state, x, y)
        g = _reference_grad(theta, x, y, case)
        m, v = 0.8 * m + 0.2 * g, 0.99 * v + 0.01 * g * g
        theta = theta - 0.05 * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
    assert_rel(flatten(params), theta, 1e-12, "Adam params after 3 steps")


def test_step_reports_loss_before_the_step(backend):
    model, params, x, y, loss = case_problem(backend, CE_CASE, seed=5)
    before = float(loss.value(model.forward(params, x), y))
    _, _, info = cc.SGD(lr=0.1).step(model, loss, params, cc.SGD(lr=0.1).init(params), x, y)
    assert abs(float(info["loss"]) - before) <= 1e-15 * before
