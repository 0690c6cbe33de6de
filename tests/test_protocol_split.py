"""The typed protocols: a base model needs only forward/jvp/vjp; layers, records and jets are separate
protocols that a method's ``needs`` refer to, and ``provides`` checks them."""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from curvcore import protocol as P


class _Base:
    def forward(self, params, x):
        return x @ params[0].T + params[1]

    def jvp(self, params, x, tangent):
        return self.forward(params, x), x @ tangent[0].T + tangent[1]

    def vjp(self, params, x):
        return self.forward(params, x), lambda u: [u.T @ x, u.sum(axis=0)]


class _WithRecords(_Base):
    def layer_specs(self, params):
        return []

    def records(self, params, x, cotangent, specs=None, chain=False):
        raise NotImplementedError


def test_the_base_model_needs_no_layers_and_no_jet():
    model = _Base()
    assert isinstance(model, cc.Model) and P.satisfies(model, P.Model)
    assert not P.satisfies(model, P.LayerModel) and not P.satisfies(model, P.JetModel)
    assert P.members(P.Model) == ("forward", "jvp", "vjp")
    assert P.members(P.LayerModel) == ("forward", "jvp", "layers", "vjp")
    assert P.members(P.RecordsModel) == ("forward", "jvp", "layer_specs", "records", "vjp")
    assert P.members(P.JetModel) == ("forward", "jet", "jvp", "vjp")


def test_needs_refer_to_the_protocols_and_compare_equal_to_their_names():
    assert cc.KFAC.needs == ("layers",) and cc.KFAC.needs[0].protocols == (P.LayerModel, P.RecordsModel)
    assert P.JET == "jet" and P.JET.protocols == (P.JetModel,)
    assert P.provides(_WithRecords(), P.LAYERS) and P.provides(_WithRecords(), "layers")
    assert not P.provides(_Base(), P.LAYERS) and not P.provides(_Base(), "jet")
    model, _ = cc.backends.mlp("numpy", [3, 4, 2])
    assert P.provides(model, P.LAYERS) and P.provides(model, P.JET)


def test_a_layerwise_method_refuses_a_base_model_naming_the_primitive():
    params = [np.ones((2, 3)), np.ones(2)]
    opt = cc.KFAC()
    with pytest.raises(TypeError, match=r"KFAC needs model.layers\(...\); _Base does not provide it"):
        opt.step(_Base(), "mse", params, opt.init(params), np.ones((4, 3)), np.ones((4, 2)))


def test_the_losses_are_loss_protocols():
    for loss in (cc.losses.MSE(), cc.losses.CrossEntropy()):
        assert isinstance(loss, P.Loss) and P.satisfies(loss, P.Loss)
