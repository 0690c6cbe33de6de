"""asv_bench/torch_overhead.py: both sides of the torch adapter's overhead ratio take the same step."""

from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from asv_bench import torch_overhead as T  # noqa: E402


@pytest.mark.parametrize("validate", [True, False])
def test_curvcore_sgd_step_equals_native_torch_sgd(validate):
    """Three steps of each side from the same weights give the same weights (float64, relative 1e-12)."""
    fns = T.steps("small", "float64", batch=16, validate=validate)
    native_net, opt = fns["native"].module, fns["curvcore"].optimizer
    for _ in range(3):
        native_value = fns["native"]()
        info = fns["curvcore"]()
        assert abs(float(info["loss"]) - float(native_value.detach())) <= 1e-12 * abs(float(native_value.detach()))
    for a, b in zip(native_net.parameters(), opt.module.parameters()):
        scale = float(a.detach().abs().max())
        assert float((a.detach() - b.detach()).abs().max()) <= 1e-12 * scale


def test_benchmark_runs_and_lists_only_torch_keys():
    assert T.TorchOverhead.params and all(k.split("|")[1] in T.DTYPES for k in T.TorchOverhead.params)
    bench = T.TorchOverhead()
    bench.setup("small|float32")
    assert bench.track_curvcore_over_native("small|float32") > 0



@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("ignore_index", [None, 2])
def test_cross_entropy_value_and_grad_equals_value_and_grad_bit_for_bit(lib, ignore_index):
    """The fused ``value_and_grad`` (used by SGD, Adam, the pseudo-Hessian) changes no bit of either result."""
    import numpy as np

    import curvcore as cc

    rng = np.random.default_rng(0)
    f, y = rng.standard_normal((7, 3, 5)) * 30, rng.integers(0, 5, (7, 3))
    if lib == "torch":
        f, y = torch.from_numpy(f), torch.from_numpy(y)
    loss = cc.losses.CrossEntropy(ignore_index=ignore_index)
    value, grad = loss.value_and_grad(f, y)
    assert bool(value == loss.value(f, y)) and bool((grad == loss.grad(f, y)).all())
    mse = cc.losses.MSE()
    value, grad = mse.value_and_grad(f, f * 0.5)
    assert bool(value == mse.value(f, f * 0.5)) and bool((grad == mse.grad(f, f * 0.5)).all())


@pytest.mark.parametrize("n", [10, 100_000])  # the small-list and the one-read (aminmax) paths
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_torch_all_finite_finds_every_nonfinite_value(n, bad):
    from curvcore._checks import all_finite

    tensors = [torch.randn(n, dtype=torch.float64), torch.arange(3), torch.randn(4, dtype=torch.complex128),
               torch.tensor(1e308, dtype=torch.float64)]
    assert bool(all_finite(tensors))
    if bad is not None:
        for i in (0, 2, 3):
            broken = [t.clone() for t in tensors]
            broken[i].view(-1)[-1] = bad
            assert not bool(all_finite(broken)), (i, bad)
    assert all_finite([torch.arange(3)]) is None and all_finite([torch.empty(0)]) is None
