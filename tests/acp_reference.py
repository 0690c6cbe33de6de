"""Independent NumPy references for the ACP / K-FAC / centered-GD checks (spec acp.md §8).

Everything here is plain NumPy on a re-implemented MLP: layer inputs by a forward
pass, the parameter gradient and the per-example ``dL/dz_k`` by complex step
(exact to round-off), and the dense per-layer matrices of spec §2 and §5.
"""

from __future__ import annotations

import numpy as np
import curvcore as cc
from reference import grad_cs, loss_value, np_activation, np_mlp, shapes_of, unflatten, flatten


def to_np(params):
    return [cc.backends.to_numpy(p) for p in params]


def forward_from(sizes, activation, ps, x, k=None, E=None):
    """Logits; with ``k``/``E`` the pre-activation of layer ``k`` is shifted by ``E`` (complex-safe)."""
    a = x
    n = len(ps) // 2
    for j in range(n):
        z = a @ ps[2 * j].T + ps[2 * j + 1]
        if j == k:
            z = z + E
        a = np_activation(activation, z) if j < n - 1 else z
    return a


def layer_inputs(sizes, activation, ps, x):
    """``[a_0 = x, a_1, ...]``: the input of every layer."""
    out, a = [], x
    n = len(ps) // 2
    for j in range(n):
        out.append(a)
        z = a @ ps[2 * j].T + ps[2 * j + 1]
        a = np_activation(activation, z) if j < n - 1 else z
    return out


def grads(sizes, activation, loss_name, ps, x, y):
    """``[dW1, db1, ...]`` of the batch-mean loss by complex step."""
    theta = flatten(ps)
    f = np_mlp(sizes, activation)
    g = grad_cs(lambda t: loss_value(loss_name, f(t, x), y), theta)
    return unflatten(g, shapes_of(sizes))


def per_example_dz(sizes, activation, loss_name, ps, x, y, k):
    """``g = dL/dz_k`` (B, n_out) of the batch-mean loss by complex step on a shift of ``z_k``."""
    B, n_out = x.shape[0], ps[2 * k].shape[0]
    g = np.zeros((B, n_out))
    for i in range(B):
        for j in range(n_out):
            E = np.zeros((B, n_out), dtype=complex)
            E[i, j] = 1e-30j
            g[i, j] = np.imag(loss_value(loss_name, forward_from(sizes, activation, ps, x, k, E), y)) / 1e-30
    return g


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
