"""The MLP's initial weights, drawn once with NumPy so that every backend starts from the same function."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._activations import check_activation

INITS = ("lecun", "he", "uniform")
DTYPES = ("float64", "float32")


def init_params(sizes: Sequence[int], seed: int = 0, init: str = "lecun") -> list[np.ndarray]:
    """Initial ``[W1, b1, ...]`` in float64 NumPy, the same for every backend.

    ``init="lecun"``: ``W ~ N(0, 1/n_in)``; ``"he"``: ``N(0, 2/n_in)``;
    ``"uniform"``: ``U(-1/sqrt(n_in), 1/sqrt(n_in))`` (PyTorch's default).
    Biases start at zero for ``lecun``/``he`` and uniform for ``uniform``.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    params: list[np.ndarray] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        if init == "uniform":
            bound = 1.0 / np.sqrt(n_in)
            params += [rng.uniform(-bound, bound, (n_out, n_in)), rng.uniform(-bound, bound, n_out)]
        else:
            scale = np.sqrt((2.0 if init == "he" else 1.0) / n_in)
            params += [scale * rng.standard_normal((n_out, n_in)), np.zeros(n_out)]
    return params


def check_dtype(dtype: str) -> None:
    """``ValueError`` unless ``dtype`` is ``"float64"`` or ``"float32"``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")


def mlp_params(sizes: Sequence[int], activation: str, dtype: str, seed: int, init: str) -> list[np.ndarray]:
    """The checked arguments of an MLP as its initial ``[W1, b1, ...]`` in ``dtype``.

    Raises:
        ValueError: an unknown activation, dtype or init; fewer than two widths or a width below one.
    """
    check_activation(activation)
    check_dtype(dtype)
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
    return [p.astype(dtype) for p in init_params(sizes, seed, init)]
