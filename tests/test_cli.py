"""``curvcore compare`` end to end (tiny runs)."""

from __future__ import annotations

import json

import pytest

import curvcore as cc
from curvcore import cli


def test_compare_runs_every_method_and_writes_outputs(tmp_path, capsys):
    code = cli.main(["compare", "--epochs", "1", "--batch-size", "128", "--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
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


def test_compare_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        cli.main(["compare", "--methods", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown backend"):
        cli.main(["compare", "--backend", "mlx", "--out", str(tmp_path)])


def test_list(capsys):
    cli.main(["compare", "--list"])
    assert "sgd" in capsys.readouterr().out
