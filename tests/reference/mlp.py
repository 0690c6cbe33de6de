"""The MLP and the losses re-implemented in plain NumPy (complex-safe) and torch, independent of curvcore.

``np_mlp`` gives ``f(theta_flat, x)``; ``layer_inputs``/``forward_from`` the per-layer inputs and a
shifted pre-activation; ``loss_parts`` the loss value, output gradient and dense output Hessian;
``torch_loss_of_theta`` the loss written directly in torch.
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


def loss_value_nd(name, f, y, ignore=None):
    """Independent NumPy: CE = mean over labelled positions of -log softmax; MSE = 1/2 sum / B."""
    if name == "mse":
        return 0.5 * np.sum((f - y) ** 2) / f.shape[0]
    logp = f - np.log(np.sum(np.exp(f - f.max(-1, keepdims=True)), -1, keepdims=True)) - f.max(-1, keepdims=True)
    keep = np.ones(y.shape, bool) if ignore is None else y != ignore
    picked = np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0]
    return -np.sum(picked[keep]) / keep.sum()


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
