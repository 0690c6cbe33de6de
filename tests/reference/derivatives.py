"""Dense derivatives by complex step, central differences and torch autodiff (float64).

* ``jacobian_cs`` / ``jacobian_fd``: Jacobians by complex step (exact to round-off) / central
  differences; ``hessian_fd``: central differences of a gradient function;
* ``dense_ggn_and_grad``: ``G = J^T H_L J`` and ``g = J^T dL/df`` from an explicit Jacobian;
  ``dense_hessian``: the loss Hessian by ``torch.func.hessian`` (or differences where torch is missing);
* ``grads`` / ``per_example_dz``: parameter gradient and per-example ``dL/dz_k`` by complex step;
* ``module_ggn``: the GGN of any torch module by ``torch.func.jacrev``; ``nested_jvp_jets``: Taylor
  coefficients of a torch MLP by nested ``torch.func.jvp``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import curvcore as cc
from reference.mlp import (flatten, forward_from, loss_parts, loss_value, np_mlp, shapes_of, torch_activation,
                           torch_loss_of_theta, unflatten)

try:  # the torch autodiff references (dense_hessian falls back to differences without torch)
    import torch
except ImportError:  # pragma: no cover
    torch = None


def jacobian_cs(f: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float = 1e-30) -> np.ndarray:
    """Complex-step Jacobian ``(M, P)`` of ``f: R^P -> R^M`` (exact to round-off for analytic f)."""
    cols = []
    for i in range(theta.size):
        t = theta.astype(complex)
        t[i] += 1j * h
        cols.append(np.ravel(np.imag(f(t))) / h)
    return np.stack(cols, axis=1)


def jacobian_fd(f: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference Jacobian ``(M, P)``."""
    cols = []
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        cols.append((np.ravel(f(theta + e)) - np.ravel(f(theta - e))) / (2 * h))
    return np.stack(cols, axis=1)


def hessian_fd(grad: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Symmetrised central differences of a gradient function."""
    H = jacobian_fd(grad, theta, h)
    return (H + H.T) / 2


def dense_ggn_and_grad(sizes, activation, loss_name, params, x, y):
    """``(G, g, J)``: GGN ``J^T H_L J``, gradient ``J^T dL/df`` and the output Jacobian."""
    f = np_mlp(sizes, activation)
    theta = flatten(params)
    xn, yn = cc.backends.to_numpy(x), cc.backends.to_numpy(y)
    J = jacobian_cs(lambda t: f(t, xn), theta)
    _, gf, HL = loss_parts(loss_name, f(theta, xn), yn)
    return J.T @ HL @ J, J.T @ np.ravel(gf), J


def loss_of_theta(sizes, activation, loss_name, x, y) -> Callable[[np.ndarray], float]:
    """``theta -> L(theta)`` in NumPy (complex-safe)."""
    f = np_mlp(sizes, activation)
    xn, yn = cc.backends.to_numpy(x), cc.backends.to_numpy(y)
    return lambda t: loss_value(loss_name, f(t, xn), yn)


def grad_cs(fun: Callable[[np.ndarray], float], theta: np.ndarray) -> np.ndarray:
    """Complex-step gradient of a scalar function."""
    return jacobian_cs(lambda t: np.atleast_1d(fun(t)), theta)[0]


def dense_hessian(sizes, activation, loss_name, params, x, y) -> np.ndarray:
    """Hessian of the loss w.r.t. the flattened params (torch autodiff, float64)."""
    theta = flatten(params)
    if torch is None:  # pragma: no cover
        fun = loss_of_theta(sizes, activation, loss_name, x, y)
        return hessian_fd(lambda t: grad_cs(fun, t), theta)
    fun = torch_loss_of_theta(sizes, activation, loss_name, x, y)
    H = torch.func.hessian(fun)(torch.tensor(theta, dtype=torch.float64))
    return H.numpy()


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


def torch_grad(net, params, x, y):
    fun = torch_loss_of_theta(net["sizes"], net["activation"], net["loss"], x, y)
    th = torch.tensor(flatten(params), dtype=torch.float64, requires_grad=True)
    (gr,) = torch.autograd.grad(fun(th), th)
    return gr.numpy()


def module_ggn(net, params, x, lossf, y):
    """``J^T H_L J`` from ``torch.func.jacrev`` of the module and the closed-form output Hessian."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(theta):
        ps, i = [], 0
        for s, n in zip(shapes, sizes):
            ps.append(theta[i:i + n].reshape(s))
            i += n
        return torch.func.functional_call(net, dict(zip(names, ps)), (x,))

    theta = torch.cat([p.reshape(-1) for p in params])
    out = f(theta)
    J = torch.func.jacrev(f)(theta).reshape(out.numel(), -1)
    H = torch.stack([lossf.hvp(out, y, e.reshape(out.shape)).reshape(-1)
                     for e in torch.eye(out.numel(), dtype=torch.float64)])
    return J.T @ H @ J


def dense_tangent(tangent, params):
    """NumPy copies with zeros for the ``None`` entries."""
    return [np.zeros(tuple(p.shape)) if t is None else cc.backends.to_numpy(t) for t, p in zip(tangent, params)]


def nested_jvp_jets(case, params, x, tangent, order):
    """``[d1, ..., d_order]`` by nested ``torch.func.jvp`` of a float64 torch MLP (no curvcore model code)."""
    from curvcore.backends import _torch_pass as tp

    act = torch_activation(case["activation"])
    xt = torch.tensor(cc.backends.to_numpy(x))

    def fn(ps):
        a = xt
        n = len(ps) // 2
        for k in range(n):
            z = a @ ps[2 * k].T + ps[2 * k + 1]
            a = act(z) if k < n - 1 else z
        return a

    p = [torch.tensor(cc.backends.to_numpy(q)) for q in params]
    u = [torch.tensor(t) for t in dense_tangent(tangent, params)]
    with tp.FORWARD_AD:
        return [d.numpy() for d in tp.nested_jet(fn, p, u, order)[1:]]
