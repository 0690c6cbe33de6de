"""NumPy backend: the array-API MLP (:class:`curvcore.backends.ArrayAPIMLP`) over ``array_api_compat.numpy``.

Host arrays only: ``device`` is ignored and :func:`synchronize` has nothing to wait for. SPD solves on
NumPy arrays use SciPy's Cholesky (registered with :func:`curvcore._linalg.register_cho_solve`); unlike
the other adapters this module is imported with ``curvcore``, so NumPy arrays get it without a backend call.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from curvcore._checks import register_quiet
from curvcore._linalg import register_cho_solve

from ._mlp import ArrayAPIMLP

__all__ = ["build_mlp", "from_numpy", "namespace", "probe", "synchronize", "to_numpy"]


def probe() -> None:
    """NumPy always runs."""


def namespace() -> Any:
    """``array_api_compat.numpy``."""
    return xp


def from_numpy(a: np.ndarray, device: Any = None) -> np.ndarray:
    """A copy of ``a``."""
    return np.array(a, copy=True)


def to_numpy(a: Any) -> np.ndarray:
    """A copy of ``a``."""
    return np.array(a, copy=True)


def synchronize(tree: Any = None) -> Any:
    """Nothing to wait for; returns ``tree``."""
    return tree


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[ArrayAPIMLP, list[np.ndarray]]:
    """The array-API MLP holding copies of ``params_np``."""
    return ArrayAPIMLP(sizes, activation, xp=xp), [from_numpy(p) for p in params_np]


def _scipy_cho_solve(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``A^{-1} B`` by SciPy's Cholesky (:func:`curvcore._linalg.cho_solve`; SciPy imported on first use)."""
    sla = importlib.import_module("scipy.linalg")
    return sla.cho_solve(sla.cho_factor(A, lower=True, check_finite=False), B, check_finite=False)


def _scipy_cho_inverse(A: np.ndarray) -> np.ndarray:
    """``A^{-1}``'s lower triangle by LAPACK's ``potrf`` and ``potri`` (:func:`curvcore._linalg.inv_psd`)."""
    sla = importlib.import_module("scipy.linalg")
    potrf, potri = sla.get_lapack_funcs(("potrf", "potri"), (A,))
    factor, info = potrf(A, lower=1)
    if info == 0:
        inverse, info = potri(factor, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the Cholesky inverse failed (LAPACK info {info}): not positive definite")
    return inverse


if importlib.util.find_spec("scipy") is not None:  # else NumPy's SPD solves fall back to xp.linalg.solve
    register_cho_solve(lambda a: isinstance(a, np.ndarray), _scipy_cho_solve, _scipy_cho_inverse)

register_quiet(np.ndarray, lambda: np.errstate(all="ignore"))  # a validated step names NaN/Inf itself
