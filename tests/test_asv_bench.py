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
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import curvcore as cc  # noqa: E402
from backend_list import require  # noqa: E402
from asv_bench import bench_products, bench_step, common, core_products, memory, report  # noqa: E402


BENCHMARKS = [bench_step.Step, bench_step.PeakMem, bench_step.GPUMemory, bench_step.StepRatio,
              bench_step.PseudoHessianBudget, bench_step.PeakMemoryRatio, bench_products.GGNOverhead,
              bench_products.Peers, bench_products.CoreProduct]


def _params_at(level: str) -> dict[str, list[str]]:
    """Each benchmark class's ``params`` when asv imports the suite with ``CURVCORE_BENCH_GRID=level``."""
    code = ("import json; from asv_bench import bench_step as S, bench_products as P; print(json.dumps({c.__name__: "
            "c.params for m in (S, P) for c in vars(m).values() if isinstance(getattr(c, 'params', 0), list)}))")
    env = {**os.environ, "CURVCORE_BENCH_GRID": level}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_quick_grid_lists_nothing_that_skips():
    """asv spawns a process per key: the quick grid lists only what runs here, and every ratio at medium."""
    params = _params_at("quick")
    assert set(params) == {c.__name__ for c in BENCHMARKS}
    names = cc.method_names()
    cpu = [b for b in common.CPU_BACKENDS if common.installed(b)]
    assert {common.key(b, m, "medium", 512) for b in cpu for m in names} <= set(params["StepRatio"])
    checked = set()
    for cls, keys in params.items():
        for key in keys:
            backend, *middle, net, batch = key.split("|")
            common.require(backend)  # NotImplementedError here = a skipped process
            assert common.parse_backend(backend)[1] == "cpu" or common.nvidia_present()
            assert net in common.NETS and int(batch) in common.BATCHES
            for m in middle:
                if m in common.PEERS:
                    assert common.installed(m)
                elif (backend, m) not in checked:  # the method runs on this backend's model
                    prob = common.make_problem(backend, [4, 3, 2], 5)
                    common.step_function(common.make_optimizer(m), prob, common.loss_for(m))
                    checked.add((backend, m))
    for cls in BENCHMARKS:  # one cheap entry of each benchmark gets through its setup
        keys = params[cls.__name__]
        key = min(keys, key=lambda k: (not k.startswith("numpy"), "|sgd|" not in k), default=None)
        if cls is bench_step.StepRatio:  # setup_cache measures every key: measure one
            assert isinstance(common.step_ratios([key], (0.0, 1))[key], float)
        elif cls is bench_step.PeakMemoryRatio:  # a fresh process per key: see test_memory_in_a_fresh_process
            assert not keys
        elif key:
            cls().setup(key)


def test_grid_levels_and_devices(monkeypatch):
    monkeypatch.setattr(common, "nvidia_present", lambda: False)
    monkeypatch.setattr(common, "GRID", "quick")
    step = common.grid("step", cc.method_names())
    assert step and all(k.split("|")[2:] == ["small", "64"] for k in step)
    assert {k.split("|")[1] for k in step} <= common.QUICK_METHODS["step"]
    assert not any("cuda" in k or "cupy" in k for k in common.grid("step", ["sgd"]))
    assert common.grid("memory", ["sgd"], common.CPU_BACKENDS) == []
    monkeypatch.setattr(common, "nvidia_present", lambda: True)
    cuda = common.grid("step", ["sgd"], ["torch:cuda"]) if common.installed("torch") else []
    assert len(cuda) == (len(common.POINTS["step"]) if common.installed("torch") else 0)  # GPUs run every point
    monkeypatch.setattr(common, "GRID", "full")
    assert common.grid("product", backends=["numpy"]) == ["numpy|small|64", "numpy|medium|512", "numpy|large|512"]


def test_benchmark_without_keys_is_not_discovered():
    """asv lists every benchmark with its keys, and none without (the GPU ones on a machine without a GPU)."""
    discovery = pytest.importorskip("asv_runner.discovery")
    found = {b.name: b for b in discovery.disc_benchmarks(os.path.join(ROOT, "asv_bench"))}
    assert "bench_step.StepRatio.track_step_over_sgd" in found
    assert all(b.params and b.params[0] for b in found.values())
    if not common.nvidia_present():
        assert "bench_step.GPUMemory.track_gpu_peak_bytes" not in found


def test_unregistered_method_skips():
    with pytest.raises(NotImplementedError, match="not registered"):
        bench_step.Step().setup("numpy|no_such_method|small|64")
    if not cc.backends.available("cupy"):
        with pytest.raises(NotImplementedError, match="cupy"):
            bench_step.Step().setup("cupy|sgd|small|64")


def test_cuda_backends_skip_without_gpu():
    for backend in ("torch:cuda", "jax:cuda"):
        lib = backend.split(":")[0]
        if cc.backends.available(lib) and common._cuda_ok(lib):
            continue
        with pytest.raises(NotImplementedError):
            common.require(backend)


def test_step_and_ratio_on_numpy():
    b = bench_step.Step()
    b.setup("numpy|sgd|small|64")
    b.time_step("numpy|sgd|small|64")
    keys = ["numpy|adam|small|64", "numpy|no_such_method|small|64"]
    ratios = common.step_ratios(keys, (0.0, 1))
    ratio = bench_step.StepRatio().track_step_over_sgd(ratios, keys[0])
    assert math.isfinite(ratio) and ratio > 0
    with pytest.raises(NotImplementedError, match="not registered"):  # asv: skipped, the other keys kept
        bench_step.StepRatio().track_step_over_sgd(ratios, keys[1])


def test_interleaved_min_and_amortization():
    calls = []
    t = common.interleaved_min({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               budget_s=0.0, min_repeats=4, max_repeats=4)
    assert calls.count("a") == calls.count("b") == 4 and set(t) == {"a", "b"}
    prob = common.make_problem("numpy", [6, 5, 3], 8)
    st = common.make_stepper("sgd", prob)
    assert st.cycle == 1 and len(st.states) == 2
    _, weight = common.amortized_call(st)
    assert weight == 1.0


def _require_torch():
    require("torch")


@pytest.mark.parametrize("backend", ["torch:cpu", "jax:cpu"])
def test_native_ggn_equals_curvcore(backend):
    lib = backend.split(":")[0]
    require(lib)
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


def test_core_products_run_on_numpy():
    for method in core_products.CORE:
        b = bench_products.CoreProduct()
        b.setup(f"numpy|{method}|small|64")
        b.time_core(f"numpy|{method}|small|64")


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
                [["'numpy|sgd|small|64'", "'numpy|curveball|small|64'", "'torch:cpu|sgd|small|64'",
                  "'torch:cpu|curveball|small|64'"]],
                "v", 0, 1.0],
        },
    }
    (machine / "abcdef12-existing.json").write_text(json.dumps(data))
    results, meta = report.load_asv(str(tmp_path))
    table = report.tables(results, meta)
    assert meta["machine"] == "box" and meta["commit"] == "abcdef12"
    assert "| curveball | <= 1.7 | 2.50 |" in table
    assert "numpy small (B=64)" in table


def test_report_measures_the_nets_asked_for(monkeypatch, capsys):
    """``--measure --nets small,medium`` measures medium whatever CURVCORE_BENCH_GRID says (tiny nets, no timing)."""
    monkeypatch.setattr(common, "GRID", "quick")
    monkeypatch.setitem(common.NETS, "small", [5, 4, 3])
    monkeypatch.setitem(common.NETS, "medium", [6, 5, 3])
    fast = common.interleaved_min
    monkeypatch.setattr(common, "interleaved_min", lambda fns, *a, **kw: fast(fns, 0.0, 1, 1))
    assert report.main(["--measure", "--backends", "numpy", "--nets", "small,medium", "--methods", "sgd,adam",
                        "--no-peers"]) == 0
    out = capsys.readouterr()
    assert "numpy small (B=64)" in out.out and "numpy medium (B=512)" in out.out
    assert "skip" not in out.err and "FAIL" not in out.err


def test_memory_in_a_fresh_process():
    sgd = memory.fresh("numpy", "sgd", (784, 512, 256, 10), 512)
    assert sgd > 2**20  # a float32 medium step allocates megabytes (gradients, activations, new params)
    if not cc.backends.available("cupy"):
        with pytest.raises(NotImplementedError, match="cupy"):
            memory.fresh("cupy", "sgd", (4, 3, 2), 5)
