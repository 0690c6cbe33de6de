"""K-FAC / ACP / centered-GD references (spec acp.md §2, §5): dense per-layer matrices and factors."""

from __future__ import annotations

import math

import numpy as np

import curvcore as cc
from reference.derivatives import per_example_dz
from reference.mlp import softmax


def acp_block_step(a, gW, gb, alpha, eps, lr):
    """``-lr M^-1 grad`` with ``M = (alpha/B) sum_i J_i^T J_i + eps diag(1 on W, 0 on b)`` (spec §2 item 2)."""
    B, n_in = a.shape
    n_out = gW.shape[0]
    M = np.zeros((n_out * n_in + n_out,) * 2)
    for i in range(B):
        J = np.hstack([np.kron(np.eye(n_out), a[i][None, :]), np.eye(n_out)])
        M += alpha / B * J.T @ J
    M[: n_out * n_in, : n_out * n_in] += eps * np.eye(n_out * n_in)
    d = -lr * np.linalg.solve(M, np.concatenate([gW.ravel(), gb]))
    return d[: n_out * n_in].reshape(n_out, n_in), d[n_out * n_in:]


def kfac_kron_step(a, delta, gW, gb, damping, lr):
    """``-lr (G_d kron A_d)^-1 vec_row([gW gb])`` with explicit ``np.kron`` (spec §5, check C7)."""
    B, n_in = a.shape
    a1 = np.hstack([a, np.ones((B, 1))])
    A = a1.T @ a1 / B + np.sqrt(damping) * np.eye(n_in + 1)
    G = delta.T @ delta / B + np.sqrt(damping) * np.eye(delta.shape[1])
    d = -lr * np.linalg.solve(np.kron(G, A), np.hstack([gW, gb[:, None]]).ravel())
    D = d.reshape(gW.shape[0], n_in + 1)
    return D[:, :n_in], D[:, n_in]


def acp_alpha(alpha, sizes, act, loss, ps, x, y, k):
    if alpha != "adaptive":
        return alpha
    return float(np.max((x.shape[0] * per_example_dz(sizes, act, loss, ps, x, y, k)) ** 2))


def kfac_factors(rec, damping: float) -> dict[str, np.ndarray]:
    """acp.md §5 from a layer record: ``A = 1/B Σ_i a1_i a1_i^T``, ``G = 1/B Σ_i δ_i δ_i^T`` (+ √damping I),
    ``a1_i = (a_i; 1)``, ``δ_i = B g_i``, written as sums over the samples."""
    a, g = cc.backends.to_numpy(rec.a), cc.backends.to_numpy(rec.g)
    B = a.shape[0]
    a1 = np.hstack([a, np.ones((B, 1))])
    root = math.sqrt(damping)
    return {"A": sum(np.outer(v, v) for v in a1) / B + root * np.eye(a1.shape[1]),
            "G": sum(np.outer(B * v, B * v) for v in g) / B + root * np.eye(g.shape[1])}


def mc_delta(loss_name, f, seed, count):
    """The documented MC draw, replicated: default_rng([seed, count]); MSE noise, CE inverse-CDF sampling."""
    rng = np.random.default_rng([seed, count])
    B, C = f.shape
    if loss_name == "mse":
        return -rng.standard_normal((B, C))  # delta = f - y~ with y~ = f + noise
    u = rng.random((B, 1))
    labels = np.minimum((np.cumsum(softmax(f), axis=1) < u).sum(1), C - 1)
    return softmax(f) - np.eye(C)[labels]
