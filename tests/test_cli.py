"""``curvcore compare`` end to end (tiny runs)."""

from __future__ import annotations

import dataclasses
import json
import tempfile

import numpy as np
import pytest

import curvcore as cc
from curvcore import cli
from curvcore.data import digits


def test_compare_runs_every_method_and_writes_outputs(tmp_path, capsys):
    code = cli.main(["compare", "--epochs", "1", "--batch-size", "128", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    results = strict_json(tmp_path / "results.json")
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    methods = [r["method"] for r in results["runs"]]
    assert set(methods) == set(cc.method_names())
    failed = [r for r in results["runs"] if "error" in r]
    assert not failed and code == 0, failed
    for r in results["runs"]:
        assert r["train_loss"] < r["history"]["train_loss"][0], f"{r['method']} did not reduce the loss"
        assert f"| {r['method']} | numpy |" in out
    assert "step / SGD step" in out


@pytest.mark.skipif(len(cc.backends.names()) < 2, reason="needs two backends")
def test_compare_all_backends_reports_differences(tmp_path, capsys):
    cli.main(["compare", "--methods", "sgd", "--backend", "all", "--epochs", "1", "--batch-size", "256",
              "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert "Largest parameter difference between backends" in out
    diffs = json.loads((tmp_path / "results.json").read_text())["max_param_difference_between_backends"]
    assert diffs["sgd"] < 1e-10


def test_list(capsys):
    cli.main(["compare", "--list"])
    assert "sgd" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# fail loudly: every argument checked before training, output folder first
# ---------------------------------------------------------------------------

TINY = ["compare", "--epochs", "1", "--methods", "sgd", "--quiet"]


@pytest.fixture
def no_training(monkeypatch):
    """Make any training an error: checks must fire before ``train_one`` is reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(cli, "train_one", refuse)


def wrap(monkeypatch, name, wrapper):
    """Replace ``cli.<name>`` by ``wrapper(original, *args, **kwargs)``."""
    original = getattr(cli, name)
    monkeypatch.setattr(cli, name, lambda *args, **kwargs: wrapper(original, *args, **kwargs))


def usage_error(capsys, argv):
    """Run the command, expect an argparse-style error (exit 2); return the last stderr line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2, f"exit status {exc.value.code!r}, expected 2"
    return capsys.readouterr().err.strip().splitlines()[-1]


BAD_ARGUMENTS = [
    ("--epochs", "0", ">= 1"),
    ("--batch-size", "0", ">= 1"),
    ("--batch-size", "-3", ">= 1"),
    ("--threads", "0", ">= 1"),
    ("--seed", "-1", ">= 0"),
    ("--hidden", "0", ">= 1"),
    ("--hidden", "32,0", ">= 1"),
    ("--hidden", "32,x", ">= 1"),
    ("--activation", "foo", "tanh"),
    ("--dtype", "float16", "float64"),
    ("--device", "cuda:x", "cuda:0"),
    ("--backend", "mlx", "numpy"),
    ("--methods", "nope", "sgd"),
    ("--methods", "sgd,,nope", "sgd"),
]


@pytest.mark.parametrize("flag,value,expected", BAD_ARGUMENTS, ids=lambda v: str(v))
def test_bad_argument_is_a_usage_error_before_training(tmp_path, capsys, no_training, flag, value, expected):
    """One line, exit status 2, naming the argument, what was expected and what was given."""
    out = tmp_path / "out"
    line = usage_error(capsys, [*TINY, "--out", str(out), f"{flag}={value}"])
    assert line.startswith("curvcore compare: error: argument " + flag), line
    assert expected in line and repr(value) in line, line
    assert not out.exists(), "the output folder was created for a command that cannot run"


def test_out_is_a_file(tmp_path, capsys, no_training):
    path = tmp_path / "results"
    path.write_text("not a folder")
    line = usage_error(capsys, [*TINY, "--out", str(path)])
    assert "argument --out" in line and str(path) in line, line


def test_out_cannot_be_created(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("")
    line = usage_error(capsys, [*TINY, "--out", str(tmp_path / "file" / "sub")])
    assert "argument --out" in line, line


def test_out_not_writable(tmp_path, capsys, no_training, monkeypatch):
    """A folder that refuses new files (simulated: chmod does not stop root) is an error before training."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    line = usage_error(capsys, [*TINY, "--out", str(tmp_path)])
    assert "argument --out" in line and "not writable" in line, line


def test_out_folder_is_created_before_training(tmp_path, monkeypatch):
    out = tmp_path / "new" / "folder"
    seen = []

    def check_then_train(train_one, *args, **kwargs):
        seen.append(out.is_dir())
        return train_one(*args, **kwargs)

    wrap(monkeypatch, "train_one", check_then_train)
    assert cli.main([*TINY, "--out", str(out)]) == 0
    assert seen == [True]


def test_batch_larger_than_the_training_data(tmp_path, capsys, no_training):
    n = digits(seed=0).x_train.shape[0]
    line = usage_error(capsys, [*TINY, "--out", str(tmp_path), "--batch-size", str(n + 1)])
    assert "argument --batch-size" in line and str(n) in line and repr(str(n + 1)) in line, line


def test_batch_of_the_whole_training_set_runs_one_step_per_epoch(tmp_path):
    n = digits(seed=0).x_train.shape[0]
    assert cli.main([*TINY, "--out", str(tmp_path), "--batch-size", str(n)]) == 0
    (run,) = strict_json(tmp_path / "results.json")["runs"]
    assert run["steps"] == 1


def strict_json(path):
    """Parse as standard JSON: NaN / Infinity are not JSON and raise."""
    def refuse(name):
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_results_json_turns_non_finite_numbers_into_null(tmp_path, monkeypatch):
    """NaN / Inf anywhere in a run (a diverged loss, an empty timing) are written as null."""
    def diverging(train_one, *args, **kwargs):
        run = train_one(*args, **kwargs)
        run["history"]["train_loss"][-1] = float("nan")
        return {**run, "train_loss": float("inf"), "step_ms": float("-inf")}

    wrap(monkeypatch, "train_one", diverging)
    cli.main([*TINY, "--out", str(tmp_path)])
    (run,) = strict_json(tmp_path / "results.json")["runs"]
    assert run["train_loss"] is None and run["step_ms"] is None and run["history"]["train_loss"][-1] is None
    assert run["test_acc"] is not None


def test_ctrl_c_keeps_the_finished_methods(tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt in the second method: table, JSON and plot of the first; exit status 130."""
    calls = []

    def interrupted_after_first(train_one, method, *args, **kwargs):
        calls.append(method)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return train_one(method, *args, **kwargs)

    wrap(monkeypatch, "train_one", interrupted_after_first)
    code = cli.main([*TINY, "--methods", "sgd,adam,curveball", "--out", str(tmp_path)])
    assert code == 130
    assert calls == ["sgd", "adam"], "training went on after Ctrl-C"
    out = capsys.readouterr().out
    assert "| sgd | numpy | 0." in out and "| adam | numpy | interrupted" in out
    runs = strict_json(tmp_path / "results.json")["runs"]
    assert [(r["method"], r.get("interrupted", False)) for r in runs] == [("sgd", False), ("adam", True)]
    assert "train_loss" in runs[0] and (tmp_path / "compare.png").stat().st_size > 10_000


def test_ctrl_c_inside_a_method_keeps_its_partial_history(tmp_path, monkeypatch):
    """Interrupted after its first epoch, the run keeps the epochs it finished (for the plot and JSON)."""
    calls = []

    def evaluate(_evaluate, *args):
        calls.append(1)
        if len(calls) == 3:  # epoch 0 and 1 evaluated; Ctrl-C in epoch 2
            raise KeyboardInterrupt
        return _evaluate(*args)

    wrap(monkeypatch, "_evaluate", evaluate)
    code = cli.main([*TINY, "--epochs", "3", "--batch-size", "512", "--out", str(tmp_path)])
    assert code == 130
    (run,) = strict_json(tmp_path / "results.json")["runs"]
    assert run["interrupted"] and run["history"]["epoch"] == [0, 1] and len(run["history"]["train_loss"]) == 2


# ---------------------------------------------------------------------------
# --model cnn (torch and flax) and --tune
# ---------------------------------------------------------------------------

def run_compare(tmp_path, *argv):
    """Run ``curvcore compare`` (quiet); return the exit status, the table and the strict results JSON."""
    code = cli.main(["compare", *argv, "--out", str(tmp_path), "--quiet"])
    return code, strict_json(tmp_path / "results.json")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_compare_cnn_on_each_backend(tmp_path, capsys, backend):
    """The digits CNN: every run lowers the loss; the table says which params a layer-wise method preconditions."""
    if not cc.backends.available(backend):
        pytest.skip(f"{backend} is not installed")
    if backend == "jax":
        pytest.importorskip("flax", reason="the jax digits CNN is a flax module")
    code, results = run_compare(tmp_path, "--model", "cnn", "--backend", backend, "--methods", "sgd,kfac,esn",
                                "--epochs", "1", "--batch-size", "512")
    out = capsys.readouterr().out
    assert code == 0, results["runs"]
    runs = {r["method"]: r for r in results["runs"]}
    for r in runs.values():
        assert r["backend"] == backend and r["steps"] == 2
        assert r["train_loss"] < r["history"]["train_loss"][0], f"{r['method']} did not reduce the loss"
    # K-FAC preconditions the conv and the linear layer; ESN only the linear layer (the conv takes -lr g)
    assert [runs[m]["preconditioned"] for m in ("sgd", "kfac", "esn")] == ["all", "4/4", "2/4"]
    assert "| preconditioned |" in out and f"| esn | {backend} |" in out and out.rstrip().count("| 2/4 |") == 1


def test_compare_cnn_torch_and_flax_agree(tmp_path):
    """The same CNN weights on torch and flax train to the same params (flax's compared in the torch layout)."""
    if not {"torch", "jax"} <= set(cc.backends.names()):
        pytest.skip("needs torch and jax")
    pytest.importorskip("flax", reason="the jax digits CNN is a flax module")
    code, results = run_compare(tmp_path, "--model", "cnn", "--backend", "all", "--methods", "kfac",
                                "--epochs", "1", "--batch-size", "512")
    assert code == 0 and [r["backend"] for r in results["runs"]] == ["torch", "jax"]
    assert results["max_param_difference_between_backends"]["kfac"] < 1e-10


def test_compare_cnn_needs_torch_or_jax(tmp_path, capsys, no_training):
    line = usage_error(capsys, [*TINY, "--model", "cnn", "--backend", "numpy", "--out", str(tmp_path / "o")])
    assert "argument --backend" in line and "torch or jax" in line and "'numpy'" in line, line


def test_tune_picks_by_validation_and_never_sees_the_test_set(tmp_path, capsys, monkeypatch):
    """A two-point grid where one point cannot learn: the other is chosen, on a split of the training set."""
    spec = cc.get_method("sgd")
    monkeypatch.setitem(cli.REGISTRY, "sgd", dataclasses.replace(spec, tune={"lr": [1e-9, 0.1], "momentum": [0.9]}))
    split = digits(seed=0)
    seen = []

    def record(train_one, method, backend, args, data, *rest, **kwargs):
        seen.append(data)
        return train_one(method, backend, args, data, *rest, **kwargs)

    wrap(monkeypatch, "train_one", record)
    code, results = run_compare(tmp_path, "--tune", "--methods", "sgd", "--epochs", "1", "--batch-size", "256")
    assert code == 0
    (run,) = results["runs"]
    tuning = run["tuning"]
    assert tuning["chosen"] == {"lr": 0.1, "momentum": 0.9} and "validation loss" in tuning["criterion"]
    losses_ = [t["val_loss"] for t in tuning["trials"]]
    assert [t["point"]["lr"] for t in tuning["trials"]] == [1e-9, 0.1] and losses_[1] < losses_[0]
    assert "| tuned setting |" in capsys.readouterr().out.splitlines()[0]
    # two grid points on the held-out split, then the chosen point on the whole training set
    *trials, final = seen
    assert len(trials) == 2 and final.x_train.shape == split.x_train.shape
    train_rows = {row.tobytes() for row in split.x_train}
    for held_out in trials:
        assert held_out.x_train.shape[0] + held_out.x_test.shape[0] == split.x_train.shape[0]
        assert all(row.tobytes() in train_rows for row in np.concatenate([held_out.x_train, held_out.x_test]))
    assert run["test_acc"] > 0.5


def test_tune_where_every_point_fails_is_a_failed_run(tmp_path, monkeypatch):
    """A grid point the constructor refuses (lr < 0) is a failed trial, never the chosen one."""
    spec = cc.get_method("sgd")
    monkeypatch.setitem(cli.REGISTRY, "sgd", dataclasses.replace(spec, tune={"lr": [-1.0]}))
    code, results = run_compare(tmp_path, "--tune", "--methods", "sgd", "--epochs", "1", "--batch-size", "256")
    (run,) = results["runs"]
    (trial,) = run["tuning"]["trials"]
    assert code == 1 and "every grid point failed" in run["error"] and "lr" in trial["error"], run
