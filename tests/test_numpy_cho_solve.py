"""NumPy arrays get SciPy's Cholesky solve (registered by ``curvcore.backends.numpy``) after a bare ``import curvcore``;
the Cholesky inverses of ``inv_psd`` (K-FAC's damped factors)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import curvcore as cc
from backend_list import params as backend_params


def test_numpy_arrays_get_scipys_cholesky_after_import_curvcore_alone():
    code = ("import numpy as np, curvcore\n"
            "from curvcore._linalg import cho_solver\n"
            "print(cho_solver(np.eye(3)).__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "curvcore.backends.numpy"


@pytest.mark.parametrize("backend", backend_params(["numpy", "torch", "array_api_strict"]))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_inv_psd_is_the_inverse_exactly_symmetric_and_refuses_an_indefinite_matrix(backend, dtype):
    """The registered Cholesky inverses (SciPy's potri, torch.cholesky_inverse) and the fallback (a solve against
    the identity, array_api_strict) against NumPy's float64 inverse, relative to its scale."""
    from curvcore._linalg import inv_psd

    rng = np.random.default_rng(3)
    tol = {"float64": 1e-13, "float32": 1e-5}[dtype]
    for n in (1, 6, 33):
        M = rng.standard_normal((n, n))
        A = (M @ M.T + n * np.eye(n)).astype(dtype)
        X = cc.backends.to_numpy(inv_psd(cc.backends.asarray(backend, A)))
        ref = np.linalg.inv(A.astype(np.float64))
        assert X.dtype == np.dtype(dtype) and np.array_equal(X, X.T)
        assert np.abs(X - ref).max() <= tol * np.abs(ref).max()
    with pytest.raises(ValueError, match="K is not positive definite"):
        inv_psd(cc.backends.asarray(backend, -np.eye(3, dtype=dtype)), "K")
