"""The JAX examples in ``docs/examples`` run with ``--smoke`` and every method lowers the training loss."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax", reason="flax is not installed (the jax and test extras have it)")
pytest.importorskip("equinox", reason="equinox is not installed (the jax and test extras have it)")

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
ROW = re.compile(r"^(?P<name>[\w-]+)\s+loss (?P<first>[\d.]+) -> (?P<last>[\d.]+)\s+test accuracy (?P<acc>[\d.]+)$", re.M)


@pytest.mark.parametrize("script, methods", [("flax_cnn.py", {"K-FAC", "CurveBall", "SGD"}),
                                             ("equinox_mlp.py", {"K-FAC", "ESN", "CurveBall"})])
def test_example_runs_in_smoke_mode_and_trains(script, methods):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--smoke"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {m["name"]: m for m in ROW.finditer(done.stdout)}
    assert set(rows) == methods, done.stdout
    for name, row in rows.items():
        assert float(row["last"]) < 0.8 * float(row["first"]), (name, row.group(0))
        assert float(row["acc"]) > 0.5, (name, row.group(0))
