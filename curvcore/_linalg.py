"""Small dense linear algebra for the methods, over the array API.

The standard has ``eigh``, ``solve``, ``pinv``, ``cholesky`` and ``inv``; the
functions here wrap them with the checks the methods need (symmetrisation,
NaN in -> NaN out, clear errors). The standard has no triangular solve, so a
symmetric positive-definite solve uses the library's own Cholesky solve, which
the backends register (:func:`register_cho_solve`, as they register control
flow with :mod:`curvcore._control`), with ``xp.linalg.solve`` as the fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat
from ._namespace import array_namespace

from ._checks import concrete_bool

Array = Any


def sym(A: Array) -> Array:
    """``(A + A^T)/2``: symmetrise before an eigendecomposition."""
    xp = array_namespace(A)
    return (A + xp.matrix_transpose(A)) / 2


def _finite_or_zero(A: Array) -> tuple[Array, Array]:
    """``(A with non-finite entries zeroed, whether A was finite)``, device-side (no host sync).

    LAPACK-backed routines (NumPy, torch) raise on NaN input; factorising the
    zeroed matrix and poisoning the result with NaN propagates the NaN instead,
    so a method's non-finite guard sees it, inside ``jax.jit`` and out.
    """
    xp = array_namespace(A)
    finite = xp.isfinite(A)
    return xp.where(finite, A, xp.zeros_like(A)), xp.all(finite)


def _poison(x: Array, finite: Array) -> Array:
    """``x`` where ``finite``, else NaN."""
    xp = array_namespace(x)
    return xp.where(finite, x, xp.full_like(x, float("nan")))


def eigh(A: Array) -> tuple[Array, Array]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric part of ``A`` (NaN for non-finite ``A``)."""
    xp = array_namespace(A)
    clean, finite = _finite_or_zero(sym(A))
    res = xp.linalg.eigh(clean)
    return _poison(res.eigenvalues, finite), _poison(res.eigenvectors, finite)


def pinv(A: Array, rtol: float) -> Array:
    """Moore-Penrose pseudo-inverse with relative cutoff ``rtol`` (NaN for non-finite ``A``)."""
    clean, finite = _finite_or_zero(A)
    return _poison(array_namespace(A).linalg.pinv(clean, rtol=rtol), finite)


# ---------------------------------------------------------------------------
# symmetric positive-definite solves: the library's Cholesky solve where a backend registers one
# ---------------------------------------------------------------------------

_CHO_SOLVES: list[tuple[Callable[[Any], bool], Callable[[Array, Array], Array]]] = []
_CHO_INVERSES: list[tuple[Callable[[Any], bool], Callable[[Array], Array]]] = []


def register_cho_solve(applies: Callable[[Any], bool], cho_solve_fn: Callable[[Array, Array], Array],
                       cho_inverse_fn: Callable[[Array], Array] | None = None) -> None:
    """Register ``cho_solve_fn(A, B) -> A^{-1} B`` (Cholesky factor, two triangular solves) for ``A`` where ``applies(A)``.

    ``A`` is (n, n) symmetric positive definite and ``B`` (n, k). For an ``A``
    that is not positive definite the routine may raise a ``LinAlgError`` (NumPy,
    SciPy, torch) or return NaN (JAX); :func:`cho_solve` turns either into NaN.
    ``cho_inverse_fn(A) -> A^{-1}`` (optional, LAPACK's ``potri``: a third of
    the work of solving against the identity) serves :func:`inv_psd`; it may
    return one triangle only (the other is filled from it).
    """
    _CHO_SOLVES.append((applies, cho_solve_fn))
    if cho_inverse_fn is not None:
        _CHO_INVERSES.append((applies, cho_inverse_fn))


def _is_linalg_error(err: BaseException) -> bool:
    """Whether ``err`` is a library's ``LinAlgError`` (``numpy.linalg``/SciPy, ``torch.linalg``; named, not imported)."""
    return any(c.__name__.endswith("LinAlgError") for c in type(err).__mro__)


def _checked_solve(A: Array, B: Array) -> Array:
    """The fallback: ``xp.linalg.solve`` (LU), NaN unless ``xp.linalg.cholesky(A)`` succeeds (``A`` positive definite).

    Two factorisations (``n³/3 + 2n³/3`` flops) because the array API has no
    triangular solve (nor has array-api-extra): solving with the factor
    through ``xp.linalg.solve(L, ·)`` and ``xp.linalg.solve(Lᵀ, ·)`` is two LU
    factorisations (``n³/3 + 4n³/3``), and ``xp.linalg.inv(L)`` costs more
    still. A backend with a triangular solve registers the one-factorisation
    form (:func:`register_cho_solve`).
    """
    xp = array_namespace(A, B)
    L = xp.linalg.cholesky(A)  # raises a LinAlgError or gives NaN where A is not positive definite
    return _poison(xp.linalg.solve(A, B), xp.all(xp.isfinite(L)))


def cho_solver(A: Array) -> Callable[[Array, Array], Array]:
    """The routine :func:`cho_solve` uses for ``A``: the one a backend registered, else a checked ``xp.linalg.solve``."""
    return next((fn for applies, fn in _CHO_SOLVES if applies(A)), _checked_solve)


def cho_solve(A: Array, b: Array) -> Array:
    """``A^{-1} b`` for a symmetric positive-definite ``A``; NaN where ``A`` is not finite or not positive definite.

    Uses the Cholesky solve a backend registered for ``A`` (SciPy for NumPy,
    ``torch.cholesky_solve``, ``jax.scipy.linalg.cho_solve``), else
    ``xp.linalg.solve`` after ``xp.linalg.cholesky`` as the positive-definiteness
    check. Never raises for a bad ``A``: the NaN reaches the
    step's non-finite guard, inside ``jax.jit`` and out.

    Args:
        A: (n, n) symmetric positive-definite matrix.
        b: (n,) vector or (n, k) matrix.
    """
    vector = b.ndim == 1
    B = b[:, None] if vector else b
    X = _nan_if_failed(lambda: cho_solver(A)(A, B), A, B)
    return X[:, 0] if vector else X


def _nan_if_failed(factorised: Callable[[], Array], A: Array, like: Array) -> Array:
    """``factorised()``, NaN (shaped like ``like``) where it raised a ``LinAlgError`` or ``A`` is not finite."""
    try:  # a non-finite A fails the factorisation (NaN pivot) or gives NaN; the scale below covers the rest
        X = factorised()
    except Exception as err:
        if not _is_linalg_error(err):
            raise
        X = array_namespace(like).full_like(like, float("nan"))
    return X * _one_if_finite(A, X)


def _one_if_finite(A: Array, like: Array) -> Array:
    """0-d: 1 where every entry of ``A`` is finite, else NaN, in ``like``'s dtype (device-side: no host sync).

    One reduction over ``A`` and a scalar multiply of the result: cheaper than a
    masked copy of either (``max |A|`` propagates NaN and Inf).
    """
    xp = array_namespace(A, like)
    one = xp.ones((), dtype=like.dtype, device=array_api_compat.device(like))
    return xp.where(xp.isfinite(xp.max(xp.abs(A))), one, one * float("nan"))


def solve_psd(A: Array, b: Array, what: str = "matrix") -> Array:
    """``A^{-1} b`` for a symmetric positive-definite ``A`` (:func:`cho_solve`) that raises instead of giving NaN.

    Outside ``jax.jit`` a non-finite result raises ``ValueError`` naming
    ``what``; inside ``jit`` the caller sees NaN.

    Args:
        A: (n, n) symmetric positive-definite matrix.
        b: (n,) vector or (n, k) matrix.
        what: a name for ``A`` in error messages.

    Raises:
        ValueError: ``A`` is not (numerically) positive definite or not finite.
    """
    return _raise_if_not_finite(cho_solve(A, b), what)


def _raise_if_not_finite(X: Array, what: str) -> Array:
    xp = array_namespace(X)
    if concrete_bool(xp.all(xp.isfinite(X))) is False:
        raise ValueError(f"{what} is not positive definite (the Cholesky solve gave NaN or Inf)")
    return X


def inv_psd(A: Array, what: str = "matrix") -> Array:
    """``A^{-1}`` for a symmetric positive-definite ``A``, symmetrised (see :func:`solve_psd`): the Cholesky
    inverse a backend registered (``potri``), else a solve against the identity."""
    xp = array_namespace(A)
    inverse = next((fn for applies, fn in _CHO_INVERSES if applies(A)), None)
    if inverse is None:
        return sym(solve_psd(A, xp.eye(A.shape[0], dtype=A.dtype, device=array_api_compat.device(A)), what))
    X = _raise_if_not_finite(_nan_if_failed(lambda: inverse(A), A, A), what)
    return xp.tril(X) + xp.matrix_transpose(xp.tril(X, k=-1))  # symmetric from the lower triangle
