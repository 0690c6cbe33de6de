"""Data-parallel ``jit_step`` on a JAX device mesh: 2 devices x half batch == 1 device x full batch.

JAX fixes its device count when it is first imported, and this test process
has imported it already, so ONE subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (two CPU devices) runs
every case (``python tests/test_distributed_jax.py OUT.json``) and writes what
it found; the tests here read it:

* every registered method, on a digits MLP and the digits flax CNN: the params
  after 1 and ``STEPS`` sharded steps equal the one-device steps to 1e-10
  (relative, float64), ACP's ``cov_batch`` sharded too. (The params, not the
  state: ACP's state holds eigenvectors of covariances with repeated
  eigenvalues, blank pixels, which are not unique; the params they give are.)
* the compiled HLO of every sharded step holds no collective but all-reduces,
  and none of them carries a per-sample array (no dimension of a batch size);
* an ``x`` the user sharded (no ``mesh=``) gives the same steps;
* bad setups raise named errors before anything is traced;
* ``docs/examples/jax_sharded.py --smoke`` trains.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax", reason="flax is not installed (the jax and test extras have it)")

import curvcore as cc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NETS = ("mlp", "cnn")
STEPS = 4  # K-FAC (refresh_every=2) and ACP (3) refresh twice, CurveBall (lam_interval=2) adapts lambda twice
BATCH, COV_BATCH = 22, 26  # per device 11 and 13: no parameter has such a dimension
RTOL = 1e-10
TIMEOUT_S = 900
COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|"
                        r"collective-broadcast|ragged-all-to-all)(?:-start)?\(")
SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[list[int]]]]:
    """``(op, [shape of each operand])`` for every collective of a compiled HLO module (combined ones: several)."""
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            found.append((m.group(2), [[int(d) for d in dims.split(",") if d] for _, dims in SHAPE.findall(m.group(1))]))
    return found


# ---------------------------------------------------------------------------
# the two-device process
# ---------------------------------------------------------------------------


def _problem(net: str, seed: int = 0):
    """``(model, params, batches)`` on digits: STEPS batches ``{"x", "y", "cov"}`` as NumPy arrays."""
    from curvcore.data import digits

    split = digits(seed=0)
    shape = (-1, 8, 8, 1) if net == "cnn" else (-1, 64)
    model, params = cc.backends.cnn("jax") if net == "cnn" else cc.backends.mlp("jax", [64, 7, 10], seed=seed)
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS):
        idx = rng.choice(len(split.y_train), BATCH + COV_BATCH, replace=False)
        x = split.x_train[idx].reshape(shape)
        batches.append({"x": x[:BATCH], "y": split.y_train[idx[:BATCH]], "cov": x[BATCH:]})
    return model, params, batches


def _train(step, method, model, params, batches, put) -> tuple[dict, list]:
    """``{t: params}`` after steps 1 and STEPS, and the executables of the first call per signature."""
    import jax

    state = method.init(params, model)
    out, programs, seen = {}, [], set()
    for t, b in enumerate(batches, start=1):
        kw = {"cov_batch": put(b["cov"])} if getattr(method, "needs_refresh", lambda s: False)(state) else {}
        args = (params, state, put(b["x"]), put(b["y"]))
        if tuple(kw) not in seen:
            seen.add(tuple(kw))
            programs.append(step.executable(*args, **kw))
        params, state, _ = step(*args, **kw)
        if t in (1, STEPS):
            out[t] = jax.tree_util.tree_map(np.asarray, params)
    return out, programs


def _mismatch(got, want, what: str) -> str | None:
    """``None`` if ``got`` equals ``want`` to RTOL (relative, leaf by leaf), else the assertion message."""
    from curvcore.testing import assert_allclose_across

    try:
        assert_allclose_across({"2 devices": got, "1 device": want}, rtol=RTOL, reference="1 device", what=what)
    except AssertionError as err:
        return str(err)
    return None


def _equality_cases(mesh) -> tuple[dict, dict]:
    """Every method on both nets: ``{case: mismatch or None}`` and ``{case: collectives of its programs}``."""
    from curvcore.backends import jax as cj

    mismatches, found = {}, {}
    for net in NETS:
        for name in cc.method_names():
            case = f"{net}/{name}"
            runs, programs = {}, []
            for sharded in (False, True):
                model, params, batches = _problem(net)
                method = cc.get_method(name).make_test()
                step = cj.jit_step(method, model, cc.losses.CrossEntropy(), mesh=mesh if sharded else None)
                runs[sharded], programs = _train(step, method, model, params, batches, cj.from_numpy)
            mismatches[case] = next((m for t in (1, STEPS) if (m := _mismatch(runs[True][t], runs[False][t],
                                                                               f"{case} after {t} steps"))), None)
            found[case] = [c for p in programs for c in collectives(p.as_text())]
    return mismatches, found


def _presharded_case(mesh) -> str | None:
    """CurveBall (data-dependent lambda rule) on inputs the user sharded, no ``mesh=``: equal to one device."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from curvcore.backends import jax as cj

    batch = NamedSharding(mesh, PartitionSpec("data"))
    runs = {}
    for sharded in (False, True):
        model, params, batches = _problem("mlp")
        method = cc.CurveBall(lam_interval=1)
        step = cj.jit_step(method, model, cc.losses.CrossEntropy())
        put = (lambda a: jax.device_put(cj.from_numpy(a), batch)) if sharded else cj.from_numpy
        runs[sharded], programs = _train(step, method, model, params, batches, put)
        if sharded and not any(op == "all-reduce" for p in programs for op, _ in collectives(p.as_text())):
            return "the step on pre-sharded inputs ran on one device (no all-reduce in its program)"
    return _mismatch(runs[True][STEPS], runs[False][STEPS], "CurveBall on pre-sharded inputs")


def _model_state_case(mesh) -> str | None:
    """A flax net with BatchNorm and Dropout: the state comes back replicated, and the running mean (the
    mean of the devices' batch means) equals the one-device running mean; ``None`` if so."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from curvcore.backends import jax as cj

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            z = nn.BatchNorm(use_running_average=False, momentum=0.5)(nn.Dense(7)(x))
            return nn.Dense(10)(nn.Dropout(0.2, deterministic=False)(jnp.tanh(z)))

    b = _problem("mlp")[2][0]
    x, y = cj.from_numpy(b["x"]), cj.from_numpy(b["y"])
    means = {}
    for step_mesh in (None, mesh):
        variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), Net().init(jax.random.key(0), x[:2]))
        model, params = cj.from_flax(Net(), variables, rngs=jax.random.key(1))
        step = cj.jit_step(cc.SGD(), model, cc.losses.CrossEntropy(), mesh=step_mesh)
        step(params, cc.SGD().init(params), x, y)
        leaves = jax.tree_util.tree_leaves(model.state)
        if step_mesh is not None and not all(a.sharding.is_fully_replicated for a in leaves):
            return f"the model state is not replicated: {[a.sharding for a in leaves]}"
        means[step_mesh is None] = np.asarray(model.state.collections["batch_stats"]["BatchNorm_0"]["mean"])
    return _mismatch(means[False], means[True], "the BatchNorm running mean")


def _error_cases(mesh) -> dict[str, str]:
    """Bad setups that need two devices: ``{case: 'ErrorType: message' (or what happened instead)}``."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from curvcore.backends import jax as cj

    model, params, batches = _problem("mlp")
    b = batches[0]
    x, y = cj.from_numpy(b["x"]), cj.from_numpy(b["y"])
    split_cols = NamedSharding(mesh, PartitionSpec(None, "data"))
    cases = {
        "odd batch": (mesh, params, x[:21], y[:21]),
        "sharded params": (mesh, [jax.device_put(params[0], split_cols), *params[1:]], x, y),
        "x sharded over features": (None, params, jax.device_put(x, split_cols), y),
    }
    out = {}
    for case, (step_mesh, p, xx, yy) in cases.items():
        step = cj.jit_step(cc.SGD(), model, cc.losses.CrossEntropy(), mesh=step_mesh)
        try:
            step(p, cc.SGD().init(params), xx, yy)
            out[case] = "no error"
        except (TypeError, ValueError) as err:
            out[case] = f"{type(err).__name__}: {err}" + ("" if step.traces == 0 else " (after tracing the step)")
    return out


def _example() -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "jax_sharded.py"), "--smoke"],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=os.environ.copy())
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:]}


def main(out_path: str) -> None:
    """The two-device run (its process has ``XLA_FLAGS`` set before JAX is imported)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh

    if jax.device_count() != 2:
        raise SystemExit(f"expected 2 devices (XLA_FLAGS), got {jax.devices()}")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layer-wise methods' "preconditions 2 of 4 tensors" on the CNN
        mismatches, found = _equality_cases(mesh)
        result = {"mismatches": mismatches, "collectives": found, "presharded": _presharded_case(mesh),
                  "model state": _model_state_case(mesh),
                  "errors": _error_cases(mesh), "example": _example()}
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# the tests (this process: one device)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory) -> dict:
    """Run the two-device process once; what it found."""
    out = tmp_path_factory.mktemp("jax_mesh") / "result.json"
    # 2 host devices; LLVM optimizations off: they speed up the (tiny) generated code, not the HLO checked here
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("method", cc.method_names())
def test_two_devices_equal_one_device(two_devices, method, net):
    assert f"{net}/{method}" in two_devices["mismatches"], "the case did not run"
    assert two_devices["mismatches"][f"{net}/{method}"] is None, two_devices["mismatches"][f"{net}/{method}"]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("method", cc.method_names())
def test_only_all_reduces_and_never_a_per_sample_array(two_devices, method, net):
    found = two_devices["collectives"][f"{net}/{method}"]
    assert any(op == "all-reduce" for op, _ in found), "no all-reduce: the step did not run sharded"
    assert {op for op, _ in found} == {"all-reduce"}, found
    per_device = {BATCH, BATCH // 2, COV_BATCH, COV_BATCH // 2}
    batched = [shape for _, shapes in found for shape in shapes if per_device & set(shape)]
    assert not batched, f"all-reduces of per-sample arrays (a gather in disguise): {batched}"


def test_inputs_sharded_by_the_user_give_the_same_steps(two_devices):
    assert two_devices["presharded"] is None, two_devices["presharded"]


def test_a_flax_model_state_comes_back_replicated_with_the_global_running_mean(two_devices):
    assert two_devices["model state"] is None, two_devices["model state"]


@pytest.mark.parametrize("case, message", [
    ("odd batch", r"ValueError: x has batch size 21, which the 2 devices of mesh axis 'data' cannot split evenly"),
    ("sharded params", r"ValueError: params\[0\] is sharded over 2 devices .* keeps params replicated"),
    ("x sharded over features", r"ValueError: x is sharded over 2 devices .* not along its batch axis 0"),
])
def test_bad_two_device_setups_raise_before_tracing(two_devices, case, message):
    got = two_devices["errors"][case]
    assert re.match(message, got) and "after tracing" not in got, got


def test_bad_mesh_arguments_are_named():
    import jax
    from jax.sharding import Mesh

    from curvcore.backends import jax as cj

    model, _ = cc.backends.mlp("jax", [3, 2])
    args = (cc.SGD(), model, cc.losses.MSE())
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh, got str"):
        cj.jit_step(*args, mesh="data")
    with pytest.raises(ValueError, match=r"batch_axis must name axes of the mesh \('data', 'model'\), got 'batch'"):
        cj.jit_step(*args, mesh=mesh, batch_axis="batch")
    with pytest.raises(ValueError, match="mesh has axes .* name the one the batch is split over"):
        cj.jit_step(*args, mesh=mesh)
    with pytest.raises(ValueError, match="batch_axis='data' needs mesh="):
        cj.jit_step(*args, batch_axis="data")


def test_sharded_example_trains(two_devices):
    ex = two_devices["example"]
    assert ex["returncode"] == 0, ex["stderr"]
    assert "2 devices" in ex["stdout"], ex["stdout"]
    rows = re.findall(r"^([\w-]+)\s+loss ([\d.]+) -> ([\d.]+)\s+test accuracy ([\d.]+)$", ex["stdout"], re.M)
    assert len(rows) >= 2, ex["stdout"]
    for name, first, last, accuracy in rows:
        assert float(last) < 0.8 * float(first) and float(accuracy) > 0.5, (name, first, last, accuracy)


if __name__ == "__main__":
    main(sys.argv[1])
