"""The Kronecker-factored family: K-FAC, ACP and CenteredSGD as choices of two per-layer factors.

Per preconditioned layer, on the joint parameter ``Θ = [W_mat b]`` (``n_out x
(D + 1)``, :mod:`curvcore.layers`), every member takes the step

    ΔΘ = -lr · L⁻¹ · ∇_Θ L · R⁻¹

with an output factor ``L`` (``n_out x n_out``) and an input factor ``R``:

* **K-FAC**: ``L = G + √d I`` (the output-gradient covariance: empirical,
  type-2 or Monte-Carlo Fisher), ``R = A + √d I`` with ``A`` the second
  moment of ``ā = (a; 1)`` (Martens & Grosse 2015; Grosse & Martens 2016 for
  convolutions, "expand");
* **ACP**: ``L = α I`` and ``R`` the block matrix ``[[E aaᵀ + (ε/α) I, ā],
  [āᵀ, 1]]``, whose block inverse is the centred gradient with the bias
  correction ``-ΔW ā`` (thesis eq 6.2.3-6.2.5);
* **CenteredSGD**: ACP with the covariance replaced by ``I``, ``α = 1``, ``ε = 0``.

This module holds the pieces they share: the joint gradient, the factors,
the damped Kronecker solve, the refresh schedule, and the centring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from array_api_compat import device

from .._namespace import array_namespace

from .._control import cond
from .._linalg import eigh
from .._reduce import batch_gram, batch_max, batch_mean, batch_size, batch_sum, current, global_count
from ..layers import LayerSpec, bias_vector, matrix_to_weight, positions, rows
from ..protocol import Array, LayerRecord

# ---------------------------------------------------------------------------
# errors and small helpers
# ---------------------------------------------------------------------------


def flag(xp: Any, value: float, like: Array) -> Array:
    """A 0-d float array (dtype and device of ``like``) for ``info``."""
    return xp.asarray(value, dtype=like.dtype, device=device(like))


def concrete_count(method: str, count: Array, why: str) -> int:
    """``int(count)``; a ``TypeError`` explaining ``why`` when it is abstract (inside ``jax.jit``)."""
    try:
        return int(count)
    except Exception:
        raise TypeError(f"{method}: {why} needs a concrete step count and cannot run inside jax.jit") from None


def owned(fn: Callable[..., Array], tasks: Sequence[tuple[Array, str]],
          out_shape: Callable[[Array], tuple[int, ...]] = lambda M: tuple(M.shape)) -> list[Array]:
    """``fn(matrix, what)`` (same shape out) for each task; in data-parallel training each task runs on
    one owner process (greedy by cost, ``n^3``) and is broadcast, so no process inverts every factor.

    On an owner a failed task (not positive definite) gives NaN, so every process sees the same
    non-finite step instead of one process raising alone.
    """
    r = current()
    if not r.distributed:
        return [fn(M, what) for M, what in tasks]
    owners = r.owners([float(M.shape[0]) ** 3 for M, _ in tasks])
    out = []
    for (M, what), owner in zip(tasks, owners):
        xp = array_namespace(M)
        value = xp.zeros(out_shape(M), dtype=M.dtype, device=device(M))
        if owner == r.rank:
            try:
                value = fn(M, what)
            except ValueError:
                value = value * float("nan")
        out.append(r.broadcast(value, owner))
    return out


def refresh_every(count: Array, every: int, refresh: Callable[..., Any], keep: Callable[..., Any],
                  *state: Any) -> Any:
    """``refresh()`` when ``count % every == 0`` (before updates 0, N, 2N, ...), else ``keep(*state)``.

    Through :func:`curvcore._control.cond`, so the schedule traces under ``jax.jit``.
    """
    return cond(count % every == 0, refresh, keep, *state)


# ---------------------------------------------------------------------------
# gradients in the joint [W_mat b] layout
# ---------------------------------------------------------------------------


def joint_gradient(rec: LayerRecord) -> Array:
    """``∇_Θ L = g_rowsᵀ [a_rows, 1]`` ``(n_out, D + 1)``: the weight gradient and, last, the bias gradient."""
    xp = array_namespace(rec.g)
    g, a = rows(rec.g), rows(rec.a)
    return xp.concat([batch_gram(g, a), batch_sum(g)[:, None]], axis=1)


def split_joint(M: Array, spec: LayerSpec, params: Sequence[Array]) -> dict[int, Array]:
    """``{weight index: M[:, :D] in the weight's shape, bias index: M[:, D] in the bias's shape}``."""
    xp = array_namespace(M)
    D = M.shape[1] - 1
    W, b = params[spec.weight], params[spec.bias]
    return {spec.weight: matrix_to_weight(M[:, :D], spec, W.shape), spec.bias: xp.reshape(M[:, D], b.shape)}


def joint_dims(params: Sequence[Array], spec: LayerSpec) -> tuple[int, int]:
    """``(n_out, D)`` of a layer: output features and input features per position (``C_in kh kw``)."""
    W = params[spec.weight]
    n_out = int(bias_vector(params[spec.bias]).shape[0])
    return n_out, math.prod(int(d) for d in W.shape) // n_out


def centered_gradient(rec: LayerRecord) -> tuple[Array, Array, Array]:
    """``(a_bar, G_hat, g_hat)``: mean input over rows, ``g_rowsᵀ (a_rows - a_bar)`` and ``Σ g``."""
    a, g = rows(rec.a), rows(rec.g)
    a_bar = batch_mean(a)
    return a_bar, batch_gram(g, a - a_bar), batch_sum(g)


def examples(rec: LayerRecord) -> int:
    """``B``, the number of examples of a record (``rows`` holds ``B * S``)."""
    return batch_size(rec.a)


# ---------------------------------------------------------------------------
# factors
# ---------------------------------------------------------------------------


def input_second_moment(a: Array) -> Array:
    """K-FAC's ``A = 1/(B S) Σ ā ā^T``, ``ā = (a; 1)`` over every example and position, ``(D + 1)^2``."""
    xp = array_namespace(a)
    a = rows(a)
    a1 = xp.concat([a, xp.ones((a.shape[0], 1), dtype=a.dtype, device=device(a))], axis=1)
    return batch_gram(a1, a1) / global_count(a1.shape[0])


def output_factor(gs: Sequence[Array], scale: float) -> Array:
    """``scale · Σ_c g_c,rowsᵀ g_c,rows``: summed over examples and positions (no 1/S, kfac_conv §3)."""
    total = None
    for g in gs:
        r = rows(g)
        term = batch_gram(r, r)
        total = term if total is None else total + term
    return total * scale


def damped(F: Array, damping: float) -> Array:
    """``F + damping I``."""
    xp = array_namespace(F)
    return F + damping * xp.eye(F.shape[0], dtype=F.dtype, device=device(F))


def kron_solve(L_inv: Array, grad: Array, R_inv: Array) -> Array:
    """``L⁻¹ grad R⁻¹``: ``(L ⊗ R)⁻¹ vec_row(grad)`` with the two inverses given."""
    xp = array_namespace(grad)
    return xp.matmul(xp.matmul(L_inv, grad), R_inv)


def input_covariance(a: Array) -> tuple[Array, Array]:
    """``(C, mu)``: the biased covariance ``(a - mu)^T (a - mu) / N`` over rows and the mean ``mu``."""
    a = rows(a)
    mu = batch_mean(a)
    ac = a - mu
    return batch_gram(ac, ac) / global_count(ac.shape[0]), mu


def covariance_eig(C: Array) -> Array:
    """``[U; s]`` stacked ``(n + 1, n)``: ``C = U diag(s) U^T``, ``s`` clipped at 0, canonical signs."""
    xp = array_namespace(C)
    s, U = eigh(C)
    return xp.concat([canonical_signs(U), xp.maximum(s, xp.zeros_like(s))[None, :]], axis=0)


def input_covariance_eig(a: Array) -> tuple[Array, Array, Array]:
    """``(s, U, mu)``: ``C = (a - mu)^T (a - mu) / N = U diag(s) U^T`` over rows (biased), ``s`` clipped at 0."""
    C, mu = input_covariance(a)
    Us = covariance_eig(C)
    return Us[-1, :], Us[:-1, :], mu


def canonical_signs(U: Array) -> Array:
    """Flip eigenvector columns so each one's largest-magnitude entry is positive (sklearn's ``svd_flip``).

    The step does not depend on the signs; fixing them makes the stored state the
    same on every backend (LAPACK, torch and JAX pick different signs).
    """
    xp = array_namespace(U)
    n = U.shape[0]
    idx = xp.reshape(xp.arange(n, device=device(U)), (n, 1))
    first_max = idx == xp.reshape(xp.argmax(xp.abs(U), axis=0), (1, n))  # argmax: first occurrence
    pick = xp.sum(xp.where(first_max, U, xp.zeros_like(U)), axis=0)
    return U * xp.where(pick < 0, -xp.ones_like(pick), xp.ones_like(pick))


def per_example_alpha(rec: LayerRecord) -> Array:
    """ACP's adaptive ``α = max_{i,j} (B g_ij)^2`` (0-d): the largest squared per-example ``dℓ_i/dz``.

    A max over the batch: a data-parallel version must all-reduce it with ``max``.
    """
    return batch_max((examples(rec) * rec.g) ** 2)


def centered_step(lr: float, G_hat: Array, g_hat: Array, a_bar: Array, inv_alpha: Any,
                  precondition: Callable[[Array], Array] | None, bias_correction: bool) -> tuple[Array, Array]:
    """``(ΔW, Δb)`` of the centred family: ``ΔW = -lr P(Ĝ)``, ``Δb = -lr ĝ / α - [ΔW ā]``.

    ``P`` is ACP's input whitening (``None``: identity, CenteredSGD); the bias
    correction ``-ΔW ā`` is the block inverse of ACP's input factor (eq 6.2.5).
    """
    xp = array_namespace(G_hat)
    dW = -lr * (G_hat if precondition is None else precondition(G_hat))
    db = -lr * inv_alpha * g_hat
    if bias_correction:
        db = db - xp.matmul(dW, a_bar)
    return dW, db


def layer_state_shapes(params: Sequence[Array], specs: Sequence[LayerSpec],
                       shape: Callable[[int, int], tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``shape(n_out, D)`` for each layer, for the checks of per-layer state."""
    return [shape(*joint_dims(params, s)) for s in specs]


def positions_of(rec: LayerRecord) -> int:
    """``S`` of a record (positions per example)."""
    return positions(rec.a)
