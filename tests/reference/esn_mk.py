"""ESN / MK references (spec esn_mk.md): the regularised objective ``J_R`` written directly in torch
(float64) with ``torch.func.hessian``/``grad``; per-sample quantities (inputs ``a_k``, ``act'``, gradients)
recomputed in NumPy/torch, never taken from curvcore's own code.
"""

from __future__ import annotations

import numpy as np

import curvcore as cc
from reference.mlp import LEAKY, flatten, shapes_of, torch_activation, torch_unflatten, unflatten

try:  # the dense autodiff references (the tests that use them are marked needs_torch)
    import torch
except ImportError:
    torch = None


def np_act(name, z):
    """(act(z), act'(z)) in NumPy."""
    if name == "tanh":
        t = np.tanh(z)
        return t, 1 - t * t
    if name == "sigmoid":
        s = 1 / (1 + np.exp(-z))
        return s, s * (1 - s)
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(float)
    if name == "leaky_relu":
        return np.where(z > 0, z, LEAKY * z), np.where(z > 0, 1.0, LEAKY)
    raise ValueError(name)


def np_forward(sizes, act, params, x):
    """Per layer ``(a_k, D_k)`` (input, activation derivative; D = 1 on the linear output)."""
    ps = [cc.backends.to_numpy(p) for p in params]
    a, out = cc.backends.to_numpy(x), []
    n = len(sizes) - 1
    for k in range(n):
        z = a @ ps[2 * k].T + ps[2 * k + 1]
        h, d = np_act(act, z) if k < n - 1 else (z, np.ones_like(z))
        out.append((a, d))
        a = h
    return out, a


def torch_jr(sizes, act, loss_name, x, y, rho):
    """``theta -> J_R = mean_p [ℓ_p + Σ_{k>=2} ρ_k^p/2 ||a_k^p||²]`` in torch; ``rho`` (B, n) held fixed."""
    shapes = shapes_of(sizes)
    xt = torch.tensor(cc.backends.to_numpy(x), dtype=torch.float64)
    yt = torch.tensor(cc.backends.to_numpy(y))
    rt = torch.tensor(np.broadcast_to(np.asarray(rho, float), (xt.shape[0], len(sizes) - 1)).copy())
    activation = torch_activation(act)

    def fun(theta):
        ps = torch_unflatten(theta, shapes)
        a, pen, n = xt, 0.0, len(ps) // 2
        for k in range(n):
            if k >= 1:
                pen = pen + 0.5 * (rt[:, k] * (a * a).sum(1)).sum()
            z = a @ ps[2 * k].T + ps[2 * k + 1]
            a = activation(z) if k < n - 1 else z
        if loss_name == "mse":
            ell = 0.5 * ((a - yt) ** 2).sum()
        else:
            ell = torch.nn.functional.cross_entropy(a, yt.long(), reduction="sum")
        return (ell + pen) / xt.shape[0]

    return fun


def grad_hess(sizes, act, loss_name, params, x, y, rho, hessian=True):
    """``(∇J_R, H)`` w.r.t. the flattened params (torch autodiff, float64)."""
    fun = torch_jr(sizes, act, loss_name, x, y, rho)
    theta = torch.tensor(flatten(params), dtype=torch.float64)
    g = torch.func.grad(fun)(theta).numpy()
    return g, (torch.func.hessian(fun)(theta).numpy() if hessian else None)


def per_sample_grads(sizes, act, loss_name, params, x, y, rho=0.0):
    """Per sample p: the list ``[∇_{W_1}, ∇_{b_1}, ...]`` of ``J_R`` of that sample alone (rho=0: ℓ_p)."""
    xn, yn = cc.backends.to_numpy(x), cc.backends.to_numpy(y)
    rho = np.broadcast_to(np.asarray(rho, float), (xn.shape[0], len(sizes) - 1))
    out = []
    for p in range(xn.shape[0]):
        g, _ = grad_hess(sizes, act, loss_name, params, xn[p:p + 1], yn[p:p + 1], rho[p:p + 1], hessian=False)
        out.append(unflatten(g, shapes_of(sizes)))
    return out


def auto_rho(sizes, act, loss_name, params, x, y):
    """Spec §4 "auto" from autodiff bias gradients of ℓ_p: (B, n)."""
    recs, _ = np_forward(sizes, act, params, x)
    grads = per_sample_grads(sizes, act, loss_name, params, x, y)
    n = len(sizes) - 1
    rho = np.zeros((len(grads), n))
    for p, g in enumerate(grads):
        rho[p, 0] = np.linalg.norm(g[1])
        for k in range(1, n):
            rho[p, k] = np.linalg.norm(g[2 * k + 1]) / np.max(np.abs(recs[k - 1][1][p]))
    return rho


def granular_ref(loss_name, out, y):
    """``q = pinv(A) ĝ_n`` per sample with the dense output Hessian A."""
    qs = []
    for f, t in zip(out, cc.backends.to_numpy(y)):
        if loss_name == "mse":
            A, g = np.eye(f.size), f - t
        else:
            p = np.exp(f - f.max())
            p /= p.sum()
            A, g = np.diag(p) - np.outer(p, p), p - np.eye(f.size)[int(t)]
        qs.append(np.linalg.pinv(A, rcond=1e-13) @ g)
    return np.array(qs)


def lam_value(spec, sizes, act, loss_name, params, x, y):
    """``(lam argument, rho array (B, n))`` for a spec: "auto" or a list."""
    if spec == "auto":
        return "auto", auto_rho(sizes, act, loss_name, params, x, y)
    return list(spec), np.array(spec, float)[None, :]


def batch_stats(sizes, act, loss_name, params, x, y, rho):
    """Per layer (C, R, m, V) from autodiff per-sample gradients (independent of curvcore)."""
    recs, _ = np_forward(sizes, act, params, x)
    grads = per_sample_grads(sizes, act, loss_name, params, x, y)
    out = []
    for k, (a, _) in enumerate(recs):
        gh = np.array([g[2 * k + 1] for g in grads])
        m = a.mean(0)
        out.append((gh.T @ gh / len(gh), (gh * rho[:, k:k + 1]).T @ a / len(gh), m, a.T @ a / len(a) - np.outer(m, m)))
    return out


def direction(opt, model, loss, params, x, y, state=None):
    state = opt.init(params) if state is None else state
    d, new_state, extras = opt.direction(model, loss, params, state, x, y)
    return [cc.backends.to_numpy(v) for v in d], new_state, extras
