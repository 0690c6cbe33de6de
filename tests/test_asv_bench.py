"""Smoke tests of the asv benchmark suite (asv_bench/): the grid, the skips, the references, the report.

The benchmarks themselves run under asv (docs/benchmarks.md); these tests only
check that the machinery works and that each comparison times the same
computation on both sides (curvcore's GGN-vector product == the hand-written
native one == the peers').
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvcore as cc  # noqa: E402
from asv_bench import bench_products, bench_step, common, core_products, report  # noqa: E402


def test_every_registered_method_is_benchmarked():
    names = cc.method_names()
    assert {"sgd", "adam"} <= set(names)
    for cls in (bench_step.Step, bench_step.StepRatio, bench_step.PeakMem, bench_step.GPUMemory):
        assert list(cls.params[1]) == names
    assert "array_api_strict" not in common.BACKENDS


@pytest.mark.parametrize("args, why", [
    (("cupy", "sgd", "small", 64), "cupy"),
    (("numpy", "sgd", "large", 64), "CURVCORE_BENCH_GRID"),
    (("numpy", "no_such_method", "small", 64), "not registered"),
])
def test_unavailable_combinations_skip(args, why):
    if args[0] == "cupy" and cc.backends.available("cupy"):
        pytest.skip("CuPy is usable here")
    with pytest.raises(NotImplementedError, match=why):
        bench_step.Step().setup(*args)


def test_cuda_backends_skip_without_gpu():
    for backend in ("torch:cuda", "jax:cuda"):
        lib = backend.split(":")[0]
        if cc.backends.available(lib) and common._cuda_ok(lib):
            continue
        with pytest.raises(NotImplementedError):
            common.require(backend)


def test_step_and_ratio_on_numpy():
    b = bench_step.Step()
    b.setup("numpy", "sgd", "small", 64)
    b.time_step()
    r = bench_step.StepRatio()
    r.setup("numpy", "adam", "small")
    ratio = r.track_step_over_sgd()
    assert math.isfinite(ratio) and ratio > 0


def test_interleaved_min_and_amortization():
    calls = []
    t = common.interleaved_min({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               budget_s=0.0, min_repeats=4, max_repeats=4)
    assert calls.count("a") == calls.count("b") == 4 and set(t) == {"a", "b"}
    prob = common.make_problem("numpy", [6, 5, 3], 8)
    st = common.make_stepper("sgd", prob)
    assert st.cycle == 1 and len(st.states) == 3
    _, weight = common.amortized_call(st)
    assert weight == 1.0


def _require_torch():
    if not cc.backends.available("torch"):
        pytest.skip("torch adapter not available")


@pytest.mark.parametrize("backend", ["torch:cpu", "jax:cpu"])
def test_native_ggn_equals_curvcore(backend):
    lib = backend.split(":")[0]
    if not cc.backends.available(lib):
        pytest.skip(f"{lib} adapter not available")
    prob = common.make_problem(backend, [6, 5, 4], 7)
    v = common.random_tangent(prob)
    ours = [cc.backends.to_numpy(a) for a in common.curvcore_ggn_function(prob)(v)]
    nat = [cc.backends.to_numpy(a) for a in common.native_functions(prob)["ggn"](v)]
    for a, b in zip(ours, nat):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("peer", ["curvlinops", "backpack"])
def test_peer_ggn_equals_curvcore(peer):
    _require_torch()
    pytest.importorskip(peer)
    prob = common.make_problem("torch:cpu", [6, 5, 4], 7)
    v = common.random_tangent(prob)
    ours = [cc.backends.to_numpy(a) for a in common.curvcore_ggn_function(prob)(v)]
    theirs = [cc.backends.to_numpy(a) for a in core_products.peer_ggn(peer, prob)(v)]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_curveball_dz_matches_its_step():
    """The dz the benchmark times is the one CurveBall's step uses: z_new = rho z - beta dz."""
    if "curveball" not in cc.REGISTRY:
        pytest.skip("curveball not registered")
    prob = common.make_problem("numpy", [6, 5, 4], 7)
    st = common.make_stepper("curveball", prob)
    dz = core_products.curveball_dz(st)()
    _, new_state, info = st.step(st.params[1], st.states[1])
    rho, beta = float(info["rho"]), float(info["beta"])
    for z, d, zn in zip(st.states[1].z, dz, new_state.z):
        np.testing.assert_allclose(rho * z - beta * d, zn, rtol=1e-10, atol=1e-13)


def test_core_products_run_or_skip_on_numpy():
    for method in core_products.CORE:
        b = bench_products.CoreProduct()
        try:
            b.setup("numpy", method, "small")
        except NotImplementedError:
            continue
        b.time_core()


def test_report_reads_asv_results(tmp_path):
    machine = tmp_path / "box"
    machine.mkdir()
    (machine / "machine.json").write_text(json.dumps({"cpu": "test cpu", "num_cpu": "2", "machine": "box"}))
    cols = ["result", "params", "version", "started_at", "duration"]
    data = {
        "commit_hash": "abcdef1234", "env_name": "existing", "date": 1795765757000, "result_columns": cols,
        "results": {
            report.RATIO_BENCHMARKS["step_over_sgd"]: [
                [1.0, 2.5, float("nan"), None],
                [["'numpy'", "'torch:cpu'"], ["'sgd'", "'curveball'"], ["'small'"]],
                "v", 0, 1.0],
        },
    }
    (machine / "abcdef12-existing.json").write_text(json.dumps(data))
    results, meta = report.load_asv(str(tmp_path))
    table = report.tables(results, meta)
    assert meta["machine"] == "box" and meta["commit"] == "abcdef12"
    assert "| curveball | <= 1.7 | 2.50 |" in table
    assert "numpy small" in table
