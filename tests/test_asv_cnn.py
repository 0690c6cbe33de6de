"""Smoke test of asv_bench/cnn.py: the torch digits-CNN step benchmarks run, step, and give finite ratios."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytest.importorskip("torch", reason="the digits-CNN benchmarks are torch benchmarks")

from asv_bench import cnn  # noqa: E402


def test_grid_lists_sgd_curveball_and_kfac_on_torch_cpu():
    assert {"torch:cpu|sgd|cnn|64", "torch:cpu|curveball|cnn|64", "torch:cpu|kfac|cnn|64"} <= set(cnn.CNNStep.params)
    assert all("|sgd|" not in k for k in cnn.CNNStepRatio.params)


@pytest.mark.parametrize("method", list(cnn.METHODS))
def test_each_timed_call_takes_a_period_of_real_steps(method):
    """The timed call moves the params (a call that did nothing would time nothing)."""
    bench, key = cnn.CNNStep(), f"torch:cpu|{method}|cnn|64"
    bench.setup(key)
    before = [p.detach().clone() for p in bench.run.carry[0]]
    bench.time_steps(key)
    after = bench.run.carry[0]
    assert all(np.isfinite(p.detach().numpy()).all() for p in after)
    assert max(float((a - b).abs().max()) for a, b in zip(after, before)) > 0


def test_ratios_are_finite_and_unavailable_keys_are_reported():
    ratios = cnn.step_ratios(["torch:cpu|kfac|cnn|64", "torch:cuda|kfac|cnn|64"] if not cnn.C.nvidia_present()
                             else ["torch:cpu|kfac|cnn|64"], budget=(0.0, 1))
    assert math.isfinite(ratios["torch:cpu|kfac|cnn|64"]) and ratios["torch:cpu|kfac|cnn|64"] > 0
    if not cnn.C.nvidia_present():
        assert ratios["torch:cuda|kfac|cnn|64"].startswith("NotImplementedError")
        with pytest.raises(NotImplementedError):
            cnn.C.value(ratios["torch:cuda|kfac|cnn|64"])
