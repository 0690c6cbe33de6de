"""Test cases as data (after curvlinops' test/cases.py) and a problem builder.

A case is a dict with required entries ``sizes``, ``activation``, ``loss``,
``batch``, ``seed`` and optional ``dtype``, ``shift`` (added to x), ``init``.
Tests parametrize over these lists (``ids=case_id``) and build the problem on a
backend with ``case_problem(backend, case)``; the references take ``*net(case)``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

import curvcore as cc

CASES = [
    {"sizes": [4, 5, 3], "activation": "tanh", "loss": "ce", "batch": 7, "seed": 0},
    {"sizes": [4, 5, 3], "activation": "tanh", "loss": "mse", "batch": 7, "seed": 1},
    {"sizes": [3, 6, 4, 2], "activation": "sigmoid", "loss": "ce", "batch": 5, "seed": 2},
    {"sizes": [5, 4, 3], "activation": "softplus", "loss": "mse", "batch": 6, "seed": 3},
    {"sizes": [4, 6, 3], "activation": "leaky_relu", "loss": "ce", "batch": 8, "seed": 4},
    {"sizes": [4, 6, 3], "activation": "relu", "loss": "mse", "batch": 8, "seed": 5},
    {"sizes": [3, 4, 2], "activation": "identity", "loss": "mse", "batch": 4, "seed": 6},
]




def grid(base: dict, **axes) -> list[dict]:
    """``base`` updated with every combination of the ``axes`` values (the last axis varies fastest)."""
    keys = list(axes)
    return [{**base, **dict(zip(keys, values))} for values in itertools.product(*axes.values())]


# the protocol checks (test_protocol, test_jets): every activation, both losses
# (CASES above); the per-method checks:
CURVEBALL_CASES = grid({"sizes": [4, 5, 3], "activation": "tanh", "batch": 7, "seed": 0}, loss=["mse", "ce"])
BASELINE_CASES = grid({"sizes": [4, 5, 3], "activation": "tanh", "batch": 7}, loss=["mse", "ce"])
KRONECKER_SIZES = [4, 6, 5, 3]  # K-FAC, ACP, centered SGD: three layers
ESN_NETS = {"mse": [4, 5, 3, 2], "ce": [4, 5, 3, 3]}  # ESN / MK: three layers, B = 1 exactness checks
# the partition pseudo-Hessian (spec Sec. 9): 4-5-3 and 4-6-3, B = 7..12, tanh and sigmoid, MSE and CE
PSEUDO_HESSIAN_CASES = [
    {"sizes": [4, 5, 3], "activation": "tanh", "loss": "ce", "batch": 7, "seed": 0},
    {"sizes": [4, 5, 3], "activation": "sigmoid", "loss": "mse", "batch": 9, "seed": 1},
    {"sizes": [4, 6, 3], "activation": "sigmoid", "loss": "ce", "batch": 12, "seed": 2},
    {"sizes": [4, 6, 3], "activation": "tanh", "loss": "mse", "batch": 10, "seed": 3},
]


def case_id(case: dict) -> str:
    return f"{case['activation']}-{case['loss']}-{'x'.join(map(str, case['sizes']))}"


def net(case: dict) -> tuple:
    """``(sizes, activation, loss)``: the arguments the dense references take first."""
    return case["sizes"], case["activation"], case["loss"]


def make_data(sizes, loss: str, batch: int, seed: int, shift: float = 0.0):
    """NumPy float64 ``(x, y)``: x ~ N(0, 1) (+ shift), y labels (ce) or N(0, 1) targets (mse)."""
    rng = np.random.default_rng(1000 + seed)
    x = rng.standard_normal((batch, sizes[0])) + shift
    if loss == "ce":
        y = rng.integers(0, sizes[-1], batch)
    else:
        y = rng.standard_normal((batch, sizes[-1]))
    return x, y


def make_problem(backend: str, sizes=(4, 5, 3), activation: str = "tanh", loss: str = "ce", batch: int = 7,
                 seed: int = 0, dtype: str = "float64", shift: float = 0.0, init: str = "lecun",
                 bias_scale: float = 0.1, device: Any = None):
    """``(model, params, x, y, loss)`` on ``backend``; identical numbers on every backend.

    Biases get small random values (``bias_scale``) so bias bugs cannot hide
    behind the zero-bias init.
    """
    sizes = list(sizes)
    model, params = cc.backends.mlp(backend, sizes, activation=activation, dtype=dtype, seed=seed,
                                    init=init, device=device)
    rng = np.random.default_rng(seed + 77)
    params_np = [cc.backends.to_numpy(p) for p in params]
    for i in range(1, len(params_np), 2):
        params_np[i] = params_np[i] + bias_scale * rng.standard_normal(params_np[i].shape)
    params = [cc.backends.asarray(backend, p.astype(dtype), device=device) for p in params_np]
    x, y = make_data(sizes, loss, batch, seed, shift)
    x = cc.backends.asarray(backend, x.astype(dtype), device=device)
    y = cc.backends.asarray(backend, y.astype(dtype) if loss == "mse" else y, device=device)
    return model, params, x, y, cc.losses.get(loss)


def case_problem(backend: str, case: dict, **overrides):
    """``make_problem`` from a case dict (``overrides`` replace its entries, e.g. ``seed``)."""
    keys = ("sizes", "activation", "loss", "batch", "seed", "dtype", "shift", "init")
    case = {**case, **overrides}
    return make_problem(backend, **{k: case[k] for k in keys if k in case})
