"""Dense float64 references, independent of curvcore's own derivative code.

* ``np_mlp`` re-implements the MLP forward pass in plain NumPy (complex-safe,
  so complex-step derivatives are exact to round-off);
* ``jacobian_cs`` / ``jacobian_fd``: Jacobians by complex step / central
  differences; ``hessian_fd``: central differences of a gradient function;
* ``loss_parts``: loss value, output gradient and the dense output Hessian;
* ``dense_ggn_and_grad``: ``G = J^T H_L J`` and ``g = J^T dL/df`` from an explicit
  Jacobian; ``dense_hessian``: the loss Hessian w.r.t. the flattened params by
  ``torch.func.hessian`` (float64), or by differences of the complex-step
  gradient where torch is missing;
* ``adjoint_gap``: ``<v, J u> - <J^T v, u>`` for a protocol model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

import curvcore as cc

LEAKY = 0.01


def flatten(params: Sequence) -> np.ndarray:
    """One float64 (or complex) vector from a params-like list of any backend."""
    return np.concatenate([np.ravel(cc.backends.to_numpy(p)) for p in params])


def unflatten(vec: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Split a vector into arrays of the given shapes."""
    out, i = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(np.reshape(vec[i:i + n], s))
        i += n
    assert i == vec.size, "vector length does not match the shapes"
    return out


def shapes_of(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """``[(n1, n0), (n1,), ...]`` for an MLP."""
    shapes = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        shapes += [(n_out, n_in), (n_out,)]
    return shapes


def np_activation(name: str, z: np.ndarray) -> np.ndarray:
    """Activation in plain NumPy; analytic ones accept complex input."""
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if name == "softplus":
        return np.log1p(np.exp(z))
    if name == "relu":
        return np.where(np.real(z) > 0, z, 0 * z)
    if name == "leaky_relu":
        return np.where(np.real(z) > 0, z, LEAKY * z)
    if name == "identity":
        return z
    raise ValueError(name)


def np_mlp(sizes: Sequence[int], activation: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``f(theta_flat, x) -> logits``, an independent plain-NumPy MLP."""
    shapes = shapes_of(sizes)

    def f(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        ps = unflatten(theta, shapes)
        a = x
        n_layers = len(ps) // 2
        for k in range(n_layers):
            z = a @ ps[2 * k].T + ps[2 * k + 1]
            a = np_activation(activation, z) if k < n_layers - 1 else z
        return a

    return f


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


def softmax(f: np.ndarray) -> np.ndarray:
    e = np.exp(f - np.max(np.real(f), axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def loss_value(name: str, f: np.ndarray, y: np.ndarray):
    """Batch-mean loss in plain NumPy (complex-safe)."""
    B = f.shape[0]
    if name == "mse":
        return 0.5 * np.sum((f - y) ** 2) / B
    m = np.max(np.real(f), axis=1, keepdims=True)
    lse = (m + np.log(np.sum(np.exp(f - m), axis=1, keepdims=True)))[:, 0]
    return np.mean(lse - f[np.arange(B), y.astype(int)])


def loss_parts(name: str, f: np.ndarray, y: np.ndarray):
    """``(value, dL/df (B, C), dense d2L/df2 (B*C, B*C))`` for the batch-mean loss."""
    B, C = f.shape
    if name == "mse":
        return loss_value(name, f, y), (f - y) / B, np.eye(B * C) / B
    p = softmax(f)
    onehot = np.eye(C)[y.astype(int)]
    blocks = [np.diag(p[i]) - np.outer(p[i], p[i]) for i in range(B)]
    H = np.zeros((B * C, B * C))
    for i, blk in enumerate(blocks):
        H[i * C:(i + 1) * C, i * C:(i + 1) * C] = blk
    return loss_value(name, f, y), (p - onehot) / B, H / B


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
    try:
        import torch
    except ImportError:  # pragma: no cover
        fun = loss_of_theta(sizes, activation, loss_name, x, y)
        return hessian_fd(lambda t: grad_cs(fun, t), theta)
    fun = torch_loss_of_theta(sizes, activation, loss_name, x, y)
    H = torch.func.hessian(fun)(torch.tensor(theta, dtype=torch.float64))
    return H.numpy()


def torch_activation(name: str):
    """The activation written with torch ops (independent of curvcore.backends.torch)."""
    import torch

    return {
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softplus": torch.nn.functional.softplus,
        "relu": torch.relu, "identity": lambda z: z,
        "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, LEAKY),
    }[name]


def torch_unflatten(theta, shapes: Sequence[tuple[int, ...]]) -> list:
    """Split a flat torch vector into views of the given shapes."""
    out, i = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(theta[i:i + n].reshape(s))
        i += n
    return out


def torch_loss_of_theta(sizes, activation, loss_name, x, y):
    """``theta (torch) -> L`` written directly in torch (independent of curvcore.backends.torch)."""
    import torch

    shapes = shapes_of(sizes)
    xt = torch.tensor(cc.backends.to_numpy(x), dtype=torch.float64)
    yt = torch.tensor(cc.backends.to_numpy(y))
    act = torch_activation(activation)

    def fun(theta):
        ps = torch_unflatten(theta, shapes)
        a = xt
        n_layers = len(ps) // 2
        for k in range(n_layers):
            z = a @ ps[2 * k].T + ps[2 * k + 1]
            a = act(z) if k < n_layers - 1 else z
        if loss_name == "mse":
            return 0.5 * ((a - yt) ** 2).sum() / a.shape[0]
        return torch.nn.functional.cross_entropy(a, yt.long())

    return fun


def rel(a, b) -> float:
    """``max|a - b| / max|b|`` (max-abs relative error)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


def report(a, b, rtol: float, name: str = "value") -> str:
    """A diagnostic for a failed comparison (after curvlinops' allclose_report)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = np.abs(a - b)
    i = np.unravel_index(np.argmax(diff), diff.shape) if diff.ndim else ()
    return (f"{name}: rel={rel(a, b):.3e} > rtol={rtol:.1e}; worst entry {i}: got {a[i]!r}, "
            f"expected {b[i]!r}; max|expected|={np.max(np.abs(b)):.3e}")


def assert_rel(a, b, rtol: float, name: str = "value") -> None:
    """Assert ``rel(a, b) <= rtol`` with a diagnostic."""
    assert rel(a, b) <= rtol, report(a, b, rtol, name)
