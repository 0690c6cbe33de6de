"""Small dense linear algebra for the methods, over the array API.

The standard has ``eigh``, ``solve``, ``pinv``, ``cholesky`` and ``inv``; the
functions here wrap them with the checks the methods need (symmetrisation,
clear errors). Where the standard lacks a routine (triangular solves,
``cho_solve``), a native one is used per library, with ``xp.linalg.solve`` as
the fallback (as array-api-extra delegates).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import array_api_compat
from array_api_compat import array_namespace

from ._checks import concrete_bool

Array = Any


def sym(A: Array) -> Array:
    """``(A + A^T)/2``: symmetrise before an eigendecomposition."""
    xp = array_namespace(A)
    return (A + xp.matrix_transpose(A)) / 2


def eigh(A: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric part of ``A``."""
    xp = array_namespace(A)
    res = xp.linalg.eigh(sym(A))
    return res.eigenvalues, res.eigenvectors


def solve(A: Array, b: Array) -> Array:
    """``A^{-1} b`` for a square ``A`` and a vector or matrix ``b``."""
    xp = array_namespace(A, b)
    if b.ndim == 1:
        return xp.linalg.solve(A, b[:, None])[:, 0]
    return xp.linalg.solve(A, b)


def pinv(A: Array, rtol: float) -> Array:
    """Moore-Penrose pseudo-inverse with relative cutoff ``rtol``."""
    return array_namespace(A).linalg.pinv(A, rtol=rtol)


# ---------------------------------------------------------------------------
# symmetric positive-definite solves: native routines where the standard lacks them
# ---------------------------------------------------------------------------


def _native_cho_solve(xp: Any, A: Array, B: Array) -> Array | None:
    """``A^{-1} B`` by a Cholesky factorisation with the library's own routine, or ``None``.

    Delegation as in array-api-extra (``_linalg.py::kron``) and STYLE §3:
    numpy -> ``scipy.linalg.cho_factor/cho_solve``; torch -> ``torch.linalg.cholesky`` +
    ``torch.cholesky_solve``; jax -> ``jax.scipy.linalg``; cupy -> ``cupyx.scipy.linalg``
    triangular solves. The framework modules are taken from ``sys.modules`` (they are
    loaded already, since ``A`` is one of their arrays), never imported by the core.
    """
    if array_api_compat.is_numpy_namespace(xp):
        sla = importlib.import_module("scipy.linalg")
        return sla.cho_solve(sla.cho_factor(A, lower=True, check_finite=False), B, check_finite=False)
    if array_api_compat.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        return torch.cholesky_solve(B, torch.linalg.cholesky(A))
    if array_api_compat.is_jax_namespace(xp):
        jsl = importlib.import_module("jax.scipy.linalg")
        return jsl.cho_solve(jsl.cho_factor(A, lower=True), B)
    if array_api_compat.is_cupy_namespace(xp):
        csl = importlib.import_module("cupyx.scipy.linalg")
        L = xp.linalg.cholesky(A)
        y = csl.solve_triangular(L, B, lower=True)
        return csl.solve_triangular(L, y, lower=True, trans="T")
    return None


def solve_psd(A: Array, b: Array, what: str = "matrix") -> Array:
    """``A^{-1} b`` for a symmetric positive-definite ``A`` (Cholesky where the library has it).

    The fallback for other array-API libraries (``array_api_strict``) is
    ``xp.linalg.solve``. Outside ``jax.jit`` a failed factorisation or a
    non-finite result raises ``ValueError`` naming ``what``; inside ``jit``
    (JAX gives NaN instead of raising) the caller sees NaN.

    Args:
        A: (n, n) symmetric positive-definite matrix.
        b: (n,) vector or (n, k) matrix.
        what: a name for ``A`` in error messages.

    Raises:
        ValueError: ``A`` is not (numerically) positive definite.
    """
    xp = array_namespace(A, b)
    vector = b.ndim == 1
    B = b[:, None] if vector else b
    try:
        X = _native_cho_solve(xp, A, B)
        if X is None:
            X = xp.linalg.solve(A, B)
    except Exception as err:  # LinAlgError (numpy/scipy, torch) or a backend's singular-matrix error
        raise ValueError(f"{what} is not positive definite ({type(err).__name__}: {err})") from None
    if concrete_bool(xp.all(xp.isfinite(X))) is False:
        raise ValueError(f"{what} is not positive definite (the solve gave NaN or Inf)")
    return X[:, 0] if vector else X


def inv_psd(A: Array, what: str = "matrix") -> Array:
    """``A^{-1}`` for a symmetric positive-definite ``A``, symmetrised (see :func:`solve_psd`)."""
    xp = array_namespace(A)
    eye = xp.eye(A.shape[0], dtype=A.dtype, device=array_api_compat.device(A))
    return sym(solve_psd(A, eye, what))
