"""The reduced S x S solves of the pseudo-Hessian step (spec pseudo_hessian.md, Sec. 4).

Pure array-API functions on small dense arrays, jit-friendly: index sets
(dropped groups, groups with zero third derivative) are boolean masks, never
shape changes; loops have fixed counts (they stop early only when the values
are concrete). Callers pass float64 arrays.

* :func:`jacobi_eigh`, :func:`eig_solve`: "positive definite" and solves after
  Jacobi scaling ``J A J``, ``J = Diag(|A_ss|^{-1/2})`` (1 where ``A_ss = 0``),
  which keeps the per-group scale invariance of the method;
* :func:`newton_solve`: ``reg="none"``, the literal eq. (4);
* :func:`cubic_solve`: ``reg="cubic"``, the global minimiser of the
  anisotropic cubic model ``m(eta) = -g.eta + 1/2 eta.H.eta + lam/6 ||D eta||^3``;
* :func:`line_step`: the fallback along ``eta = c * 1``.

Status codes: 0 ok, 1 line fallback, 2 skip (zero step).
"""

from __future__ import annotations

from typing import Any

from .._namespace import array_namespace
from array_api_compat import device as _device

from .._checks import concrete_bool

Array = Any

PD_RTOL = 1e-12  # "positive definite": min eig of J A J > PD_RTOL * max |eig|
SINGULAR_COND = 1e12  # reg="none": singular if cond(J A J) > SINGULAR_COND
SEARCH_ROUNDS, SEARCH_POINTS = 8, 1024  # the radius search (see _radius)
OK, LINE, SKIP = 0, 1, 2


def _eye(A: Array) -> Array:
    xp = array_namespace(A)
    return xp.eye(A.shape[0], dtype=A.dtype, device=_device(A))


def _outer_and(a: Array, b: Array) -> Array:
    return a[:, None] & b[None, :]


def _mv(A: Array, v: Array) -> Array:
    xp = array_namespace(A, v)
    return xp.matmul(A, v[:, None])[:, 0]


def pad(A: Array, keep: Array, value: Any = 1.0) -> Array:
    """``A`` on ``keep x keep``, ``value`` on the diagonal elsewhere, zero otherwise.

    Dropping rows/columns by masks: the padded matrix is block diagonal, so
    its solves and eigenvalues on ``keep`` are those of ``A[keep, keep]``.
    """
    xp = array_namespace(A)
    kept = xp.where(_outer_and(keep, keep), A, xp.zeros_like(A))
    return kept + _eye(A) * (value * xp.astype(~keep, A.dtype))[:, None]


def jacobi_eigh(A: Array) -> tuple[Array, Array, Array]:
    """``(j, E, V)`` with ``Diag(j) A Diag(j) = V Diag(E) V^T``, ``j_s = |A_ss|^{-1/2}`` (1 where 0)."""
    xp = array_namespace(A)
    diag = xp.linalg.diagonal(A)
    nz = diag != 0
    j = xp.where(nz, 1 / xp.sqrt(xp.abs(xp.where(nz, diag, xp.ones_like(diag)))), xp.ones_like(diag))
    res = xp.linalg.eigh(A * j[:, None] * j[None, :])
    return j, res.eigenvalues, res.eigenvectors


def is_pd(E: Array) -> Array:
    """Positive definite (0-d bool) from the ascending Jacobi-scaled eigenvalues."""
    xp = array_namespace(E)
    return E[0] > PD_RTOL * xp.max(xp.abs(E))


def is_singular(E: Array) -> Array:
    """Condition number of the Jacobi-scaled matrix above ``SINGULAR_COND`` (0-d bool)."""
    xp = array_namespace(E)
    a = xp.abs(E)
    return ~(xp.min(a) * SINGULAR_COND >= xp.max(a)) | ~xp.all(xp.isfinite(E))


def eig_solve(j: Array, E: Array, V: Array, b: Array) -> Array:
    """``A^{-1} b`` (b a vector or a matrix) from :func:`jacobi_eigh`.

    Zero eigenvalues give a zero component, never a raise (callers decide
    singularity with :func:`is_pd` / :func:`is_singular`).
    """
    xp = array_namespace(E, b)
    vec = b.ndim == 1
    B = b[:, None] if vec else b
    Y = xp.matmul(xp.matrix_transpose(V), j[:, None] * B)
    nz = (E != 0)[:, None]
    Y = xp.where(nz, Y / xp.where(nz, E[:, None], xp.ones_like(Y)), xp.zeros_like(Y))
    X = j[:, None] * xp.matmul(V, Y)
    return X[:, 0] if vec else X


def line_step(g: Array, H: Array, d: Array, lam: float, active: Array) -> tuple[Array, Array]:
    """The model restricted to ``eta = c * 1`` on the active groups.

    ``c = 2G / (Q + sqrt(Q^2 + 2 lam ||d||^3 |G|))`` with ``G = sum(g)``,
    ``Q = sum(H)``: the exact minimiser of the 1-d cubic (the ``groups="one"``
    step). Returns ``(eta, ok)``; ``ok`` is False (and ``eta = 0``) when the
    denominator is not positive.
    """
    xp = array_namespace(g, H)
    G = xp.sum(xp.where(active, g, xp.zeros_like(g)))
    Q = xp.sum(xp.where(_outer_and(active, active), H, xp.zeros_like(H)))
    dn = xp.sqrt(xp.sum(d * d))
    den = Q + xp.sqrt(Q * Q + 2 * lam * dn * dn * dn * xp.abs(G))
    ok = (den > 0) & xp.isfinite(den)
    c = 2 * G / xp.where(ok, den, xp.ones_like(den))
    eta = xp.where(active & ok, c * xp.ones_like(g), xp.zeros_like(g))
    return eta, ok


def _select(ok: Array, eta: Array, g: Array, H: Array, d: Array, lam: float, active: Array) -> tuple[Array, Array]:
    """``eta`` where ``ok``, else the line fallback (status 1), else a skip (status 2)."""
    xp = array_namespace(eta)
    ok = ok & xp.all(xp.isfinite(eta))
    eta_line, line_ok = line_step(g, H, d, lam, active)
    codes = xp.asarray([OK, LINE, SKIP], dtype=xp.int32, device=_device(eta))
    status = xp.where(ok, codes[0], xp.where(line_ok, codes[1], codes[2]))
    return xp.where(ok, eta, eta_line), status


def newton_solve(g: Array, H: Array, active: Array, concrete_raise: bool = True) -> tuple[Array, Array]:
    """``reg="none"``: ``eta = H^{-1} g`` on the active groups (indefinite allowed).

    Returns ``(eta, status)``. A singular ``H`` (Jacobi-scaled condition number
    > 1e12) raises when values are concrete; inside a trace it falls back to
    the line step (status 1) or a skip (status 2).

    Raises:
        ValueError: ``H`` is singular (message mentions "singular").
    """
    xp = array_namespace(g, H)
    Hp, gp = pad(H, active), xp.where(active, g, xp.zeros_like(g))
    j, E, V = jacobi_eigh(Hp)
    singular = is_singular(E)
    if concrete_raise and concrete_bool(singular):
        cond = float(xp.max(xp.abs(E)) / xp.min(xp.abs(E))) if float(xp.min(xp.abs(E))) > 0 else float("inf")
        raise ValueError(
            f"PseudoHessian: Hbar is singular (condition number {cond:.3g} after Jacobi scaling > "
            f"{SINGULAR_COND:.0e}); use reg='cubic' (default) or ridge > 0"
        )
    return _select(~singular, eig_solve(j, E, V, gp), g, H, xp.zeros_like(g), 0.0, active)


def _psi(b: Array, Lam: Array, lam: float, r: Array) -> Array:
    """``||b / (Lam + lam r/2)||`` for each entry of ``r`` (G,) -> (G,).

    ``inf`` where a denominator is not positive and the matching ``b != 0``.
    """
    xp = array_namespace(b, Lam, r)
    den = Lam[None, :] + lam * r[:, None] / 2
    pos = den > 0
    w = xp.where(pos, b[None, :] / xp.where(pos, den, xp.ones_like(den)), xp.zeros_like(den))
    blocked = xp.any((~pos) & (b[None, :] != 0), axis=1)
    val = xp.sqrt(xp.sum(w * w, axis=1))
    return xp.where(blocked, xp.full_like(val, float("inf")), val)


def _root(level: Array, nb: Array, lam: float) -> Array:
    """The root ``r >= 0`` of ``r (level + lam r/2) = nb`` (``nb >= 0``), without cancellation."""
    xp = array_namespace(level, nb)
    root = xp.sqrt(level * level + 2 * lam * nb)
    den = level + root
    pos = xp.where(den > 0, 2 * nb / xp.where(den > 0, den, xp.ones_like(den)), xp.zeros_like(den))
    return xp.where(level >= 0, pos, (-level + root) / lam)


def _radius(b: Array, Lam: Array, lam: float) -> Array:
    """The radius ``r``: the upper end of the bracket of ``psi(r) = r`` (spec Sec. 4, steps 3-4).

    ``psi(r) = ||b / (Lam + lam r/2)||`` decreases on ``(r0, inf)``,
    ``r0 = max(0, -2 lmin/lam)``. Bracket: ``lo = max(r0, root of
    r (lmax + lam r/2) = ||b||)`` (``psi(lo) >= lo``) and ``hi = max(r0, root of
    r (lmin + lam r/2) = ||b||)`` (``psi(hi) <= hi``). Instead of 200 halvings
    (200 unrolled iterations under ``jax.jit``) each of ``SEARCH_ROUNDS``
    rounds evaluates ``psi`` at ``SEARCH_POINTS`` points of the bracket at
    once (geometric spacing when ``lo > 0``, so the relative width shrinks
    by 1025x per round) and keeps the sub-bracket with the sign change, the
    upper end always satisfying ``psi(hi) <= hi``. Eight rounds reach adjacent
    floats for any bracket ratio below 1e300; the loop stops early when the
    values are concrete and the bracket no longer shrinks.
    """
    xp = array_namespace(b, Lam)
    nb = xp.sqrt(xp.sum(b * b))
    r0 = xp.maximum(xp.zeros_like(nb), -2 * Lam[0] / lam)
    lo = xp.maximum(r0, _root(Lam[-1], nb, lam))
    hi = xp.maximum(lo, xp.maximum(r0, _root(Lam[0], nb, lam)))
    frac = xp.arange(1, SEARCH_POINTS + 1, dtype=b.dtype, device=_device(b)) / (SEARCH_POINTS + 1)
    for _ in range(SEARCH_ROUNDS):
        geometric = lo > 0
        log_lo = xp.log(xp.where(geometric, lo, xp.ones_like(lo)))
        log_hi = xp.log(xp.where(geometric, hi, xp.ones_like(hi)))
        r = xp.where(geometric, xp.exp(log_lo + frac * (log_hi - log_lo)), lo + frac * (hi - lo))
        r = xp.minimum(xp.maximum(r, lo), hi)
        above = _psi(b, Lam, lam, r) <= r
        new_hi = xp.min(xp.where(above, r, xp.full_like(r, 1.0) * hi))
        new_lo = xp.max(xp.where((~above) & (r < new_hi), r, xp.full_like(r, 1.0) * lo))
        if concrete_bool((new_hi == hi) & (new_lo == lo)):
            break
        lo, hi = new_lo, new_hi
    return hi


def cubic_solve(g: Array, H: Array, d: Array, lam: float, active: Array) -> tuple[Array, Array, Array]:
    """Global minimiser of ``m(eta) = -g.eta + 1/2 eta.H.eta + lam/6 ||D eta||^3``, ``D = Diag(d)``.

    Spec Sec. 4, steps 1-6: eliminate the groups with ``d_s = 0`` (set Z)
    exactly through the Schur complement (needs ``H[Z,Z]`` positive definite),
    then with ``K = Hp / (d d^T) = Q Lam Q^T`` and ``b = Q^T (gp/d)`` find the
    radius ``r = ||D eta||`` with ``||b / (Lam + lam r/2)|| = r`` by bracketing
    (:func:`_radius`; ``(H + lam/2 r D^2) eta = g``, ``H + lam/2 r D^2 >= 0``). Hard case: the
    component along the ``lmin`` eigenvector is omitted (decrease still holds).
    Inactive groups are dropped (``eta_s = 0``) by padding.

    Args:
        g: ``gbar`` (S,), float64.
        H: ``Hr`` (S, S), symmetric.
        d: ``|T|^{1/3}`` (S,), >= 0.
        lam: cubic weight >= 0 (a Python float).
        active: (S,) bool, False for groups whose direction is identically zero.

    Returns:
        ``(eta, r, status)``: step sizes (S,), the radius ``r`` (0 on the
        ``Hr``-solve and fallback paths), status 0/1/2 (0-d int32).
    """
    xp = array_namespace(g, H, d)
    zero_vec = xp.zeros_like(g)
    gp, d = xp.where(active, g, zero_vec), xp.where(active, d, zero_vec)
    Hp = pad(H, active)
    # step 1: no cubic term -> Hr must be positive definite
    j, E, V = jacobi_eigh(Hp)
    eta_newton = eig_solve(j, E, V, gp)
    if lam == 0:
        eta, status = _select(is_pd(E), eta_newton, g, H, d, lam, active)
        return eta, xp.zeros_like(g[0]), status
    zmask = d == 0
    pmask = ~zmask
    any_p = xp.any(pmask)
    # step 2: eliminate eta_Z exactly (N = Hr[Z,Z] padded with I on P; C = Hr[P,Z])
    jn, En, Vn = jacobi_eigh(pad(Hp, zmask))
    n_pd = is_pd(En)
    C = xp.where(_outer_and(pmask, zmask), Hp, xp.zeros_like(Hp))
    Ct = xp.matrix_transpose(C)
    NinvCt = eig_solve(jn, En, Vn, Ct)
    Hs = xp.where(_outer_and(pmask, pmask), Hp - xp.matmul(C, NinvCt), xp.zeros_like(Hp))
    gs = xp.where(pmask, gp - _mv(C, eig_solve(jn, En, Vn, xp.where(zmask, gp, zero_vec))), zero_vec)
    # step 3: K = Hp / (d d^T) on P (Z padded above the spectrum of the P block)
    ds = xp.where(pmask, d, xp.ones_like(d))
    K = Hs / (ds[:, None] * ds[None, :])
    K = pad(K, pmask, 1 + xp.sqrt(xp.sum(K * K)))
    res = xp.linalg.eigh((K + xp.matrix_transpose(K)) / 2)
    Lam, Q = res.eigenvalues, res.eigenvectors
    b = _mv(xp.matrix_transpose(Q), gs / ds)
    # steps 4-5
    r = _radius(b, Lam, lam)
    den = Lam + lam * r / 2
    w = xp.where(den > 0, b / xp.where(den > 0, den, xp.ones_like(den)), zero_vec)
    eta_p = xp.where(pmask, _mv(Q, w) / ds, zero_vec)
    eta_z = eig_solve(jn, En, Vn, xp.where(zmask, gp - _mv(Ct, eta_p), zero_vec))
    eta_cubic = eta_p + xp.where(zmask, eta_z, zero_vec)
    eta = xp.where(any_p, eta_cubic, eta_newton)
    ok = xp.where(any_p, n_pd, is_pd(E))
    eta, status = _select(ok, eta, g, H, d, lam, active)
    return eta, xp.where(any_p & (status == OK), r, xp.zeros_like(r)), status
