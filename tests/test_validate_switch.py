"""One ``validate`` switch: inside a step the method's ``validate`` governs every value check, whatever the
model's own; the model's ``validate`` governs only primitives called directly."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc

BACKENDS = [b for b in ("numpy", "torch", "jax") if cc.backends.available(b)]


def _problem(name: str, model_validate: bool):
    model, params = cc.backends.mlp(name, [3, 4, 2], seed=0)
    model.validate = model_validate
    x = np.ones((5, 3))
    x[1, 2] = np.nan
    return model, params, cc.backends.asarray(name, x), cc.backends.asarray(name, np.eye(2)[[0, 1, 0, 1, 0]])


@pytest.mark.parametrize("name", BACKENDS)
def test_the_methods_switch_governs_the_step(name):
    """NaN in x: a validate=False method flags the step (its params kept) although the model validates; a
    validate=True method raises although the model does not."""
    model, params, x, y = _problem(name, model_validate=True)
    opt = cc.SGD(lr=0.1)
    opt.validate = False
    new, _, info = opt.step(model, "mse", params, opt.init(params), x, y)
    assert not bool(info["finite"])
    assert all(np.array_equal(cc.backends.to_numpy(a), cc.backends.to_numpy(b)) for a, b in zip(new, params))
    model.validate = False
    with pytest.raises(ValueError, match="NaN"):
        cc.SGD(lr=0.1).step(model, "mse", params, opt.init(params), x, y)


@pytest.mark.parametrize("name", BACKENDS)
def test_the_models_switch_governs_direct_calls(name):
    model, params, x, y = _problem(name, model_validate=True)
    with pytest.raises(ValueError, match="NaN"):
        cc.ggn_vp(model, "mse", params, x, y, params)
    model.validate = False
    gv = cc.ggn_vp(model, "mse", params, x, y, params)
    assert not np.isfinite(cc.backends.to_numpy(gv[0])).all()
