"""Every script in docs/examples runs with --smoke (fast settings) and exits cleanly."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

TRAINED = {"flax_cnn.py", "equinox_mlp.py"}  # tests/test_examples_jax.py runs them and checks that they train
EXAMPLES = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples").glob("*.py")
                  if not p.name.startswith("_") and p.name not in TRAINED)
NEEDS = {"torch": "torch", "flax": "flax", "equinox": "equinox", "jax": "jax"}


def _missing(path: pathlib.Path) -> list[str]:
    """Optional libraries the example imports that are not installed."""
    text = path.read_text()
    return [lib for word, lib in NEEDS.items()
            if (f"import {word}" in text or f"from {word}" in text) and importlib.util.find_spec(lib) is None]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_with_smoke(path):
    missing = _missing(path)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    done = subprocess.run([sys.executable, str(path), "--smoke"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
