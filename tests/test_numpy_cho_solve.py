"""NumPy arrays get SciPy's Cholesky solve (registered by ``curvcore.backends.numpy``) after a bare ``import curvcore``."""

from __future__ import annotations

import subprocess
import sys


def test_numpy_arrays_get_scipys_cholesky_after_import_curvcore_alone():
    code = ("import numpy as np, curvcore\n"
            "from curvcore._linalg import cho_solver\n"
            "print(cho_solver(np.eye(3)).__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "curvcore.backends.numpy"
