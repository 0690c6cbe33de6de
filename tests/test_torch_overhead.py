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

