"""Test cases as data (after curvlinops' test/cases.py) and a problem builder.

A case is a dict with required entries ``sizes``, ``activation``, ``loss``,
``batch``, ``seed`` and optional ``dtype``, ``shift`` (added to x), ``init``,
``bias_scale``; any other entry is a hyperparameter the test reads (it shows in
the id). Tests parametrize over these lists (``ids=case_id``) and build the
problem on a backend with ``case_problem(backend, case)``; the references take
``*net(case)``. The per-method dicts map each check to its case (or the list of
cases it is parametrized over), so this file shows every net a method is checked on.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

import curvcore as cc

PROBLEM_KEYS = ("sizes", "activation", "loss", "batch", "seed", "dtype", "shift", "init", "bias_scale")
LOSSES = ["mse", "ce"]

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
CURVEBALL_CASES = grid({"sizes": [4, 5, 3], "activation": "tanh", "batch": 7, "seed": 0}, loss=LOSSES)
BASELINE_CASES = grid({"sizes": [4, 5, 3], "activation": "tanh", "batch": 7}, loss=LOSSES)
# the partition pseudo-Hessian (spec Sec. 9): 4-5-3 and 4-6-3, B = 7..12, tanh and sigmoid, MSE and CE
PSEUDO_HESSIAN_CASES = [
    {"sizes": [4, 5, 3], "activation": "tanh", "loss": "ce", "batch": 7, "seed": 0},
    {"sizes": [4, 5, 3], "activation": "sigmoid", "loss": "mse", "batch": 9, "seed": 1},
    {"sizes": [4, 6, 3], "activation": "sigmoid", "loss": "ce", "batch": 12, "seed": 2},
    {"sizes": [4, 6, 3], "activation": "tanh", "loss": "mse", "batch": 10, "seed": 3},
]

# K-FAC, ACP, CenteredSGD (acp spec §8): mostly three layers, inputs shifted off zero
KRONECKER_NET = {"sizes": [4, 6, 5, 3], "activation": "tanh", "loss": "ce"}
KRONECKER_CACHE_NET = {"sizes": [5, 7, 6, 3], "activation": "tanh", "loss": "ce"}  # the cached fast paths
SMALL_NET = {"sizes": [4, 5, 3], "activation": "tanh"}  # bad input, the output layer's factors
KRONECKER_CROSS_BACKEND = {**KRONECKER_NET, "batch": 10, "seed": 9}  # every backend against NumPy
ACP_CASES = {
    "explicit_block": grid({**KRONECKER_NET, "batch": 11, "seed": 3, "shift": 0.7},
                           activation=["tanh", "sigmoid", "relu"], loss=LOSSES),  # C1
    "kronecker_form": {**KRONECKER_NET, "batch": 11, "seed": 4, "shift": 0.7},  # C4
    # C2, C3: the tests draw the data (correlated least squares; a shifted training set)
    "least_squares": {"sizes": [5, 3], "activation": "identity", "loss": "mse", "batch": 50, "seed": 2},
    "shift_invariance": {"sizes": [6, 8, 7, 4], "activation": "tanh", "loss": "ce", "batch": 32, "seed": 1},
    "amortization": {**KRONECKER_NET, "batch": 9, "seed": 6},  # C5
    "minibatch_covariance": {**KRONECKER_NET, "batch": 11, "seed": 3},
    "stacked_batch": {**KRONECKER_NET, "activation": "sigmoid", "batch": 8, "seed": 7, "shift": 0.3},  # C6
    "cross_backend": KRONECKER_CROSS_BACKEND,  # C8, jax.jit
    "zero_residual": {**SMALL_NET, "loss": "mse", "batch": 6, "seed": 0},
    "bad_input": {**SMALL_NET, "loss": "mse", "batch": 6, "seed": 0},
    "gradient_overflow": {**SMALL_NET, "activation": "identity", "loss": "mse", "batch": 6, "seed": 0},
    "no_layers": {"sizes": [4, 3], "activation": "identity", "loss": "mse", "batch": 5, "seed": 0},
    "cached_preconditioner": {**KRONECKER_CACHE_NET, "batch": 9, "seed": 1, "shift": 0.5},
    "cached_steps": {**KRONECKER_CACHE_NET, "loss": "mse", "batch": 10, "seed": 4, "shift": 0.7},
    "adaptive_uncached": {**KRONECKER_CACHE_NET, "batch": 8, "seed": 2},
    "singular_uncached": {**KRONECKER_CACHE_NET, "batch": 4, "seed": 3},
    "refresh_owners": {**KRONECKER_NET, "sizes": [4, 6, 6, 5, 3], "batch": 12, "seed": 5},
}
KFAC_CASES = {
    "explicit_kronecker": grid({**KRONECKER_NET, "batch": 9, "seed": 12, "shift": 0.4}, loss=LOSSES),  # C7
    "refresh": {**KRONECKER_NET, "batch": 9, "seed": 1},  # refresh interval, jax.jit
    "mc_expectation": grid({**SMALL_NET, "batch": 6, "seed": 2}, loss=LOSSES),
    "singular": {**SMALL_NET, "loss": "ce", "batch": 2, "seed": 0},
    "cross_backend": KRONECKER_CROSS_BACKEND,  # K-FAC and CenteredSGD
    "mc_cross_backend": {**KRONECKER_CROSS_BACKEND, "loss": "mse"},
    "cached_inverses": {**KRONECKER_CACHE_NET, "batch": 9, "seed": 6, "shift": 0.3},
}
CENTERED_SGD_CASES = {
    # C7: the test draws inputs with zero batch mean
    "zero_mean_inputs": {"sizes": [5, 3], "activation": "identity", "loss": "ce", "batch": 12, "seed": 3},
    "reference": {**KRONECKER_NET, "activation": "sigmoid", "loss": "mse", "batch": 8, "seed": 5, "shift": 1.5},
    "acp_identity_covariance": {**KRONECKER_NET, "batch": 8, "seed": 6, "shift": 1.0},
}

# ESN and MK (esn_mk spec §9): three layers, the last hidden width 2 (MSE) or 3 (CE); B = 1 for exactness
ESN_NETS = {"mse": [4, 5, 3, 2], "ce": [4, 5, 3, 3]}
ESN_ACTIVATIONS = ["tanh", "sigmoid", "leaky_relu"]
ESN_RHOS = [(0.7, 0.4, 0.9), "auto", (0.0, 0.4, 0.9), (3.0, 0.4, 0.9)]  # the regularisation: per layer or "auto"


def esn_case(loss: str, **entries) -> dict:
    """A case on the ESN/MK net of ``loss`` (``ESN_NETS``), ``batch`` 1 unless given."""
    return {"sizes": ESN_NETS[loss], "loss": loss, "batch": 1, **entries}


def esn_grid(base: dict, **axes) -> list[dict]:
    """``grid`` of ``esn_case``s."""
    return [esn_case(**case) for case in grid(base, **axes)]


ESN_EXACT_CASES = {
    "newton": esn_grid({"seed": 3}, activation=ESN_ACTIVATIONS, loss=LOSSES, rho=ESN_RHOS),
    "newton_eager": [esn_case("mse", activation="tanh", seed=3, rho="auto"),
                     esn_case("ce", activation="leaky_relu", seed=3, rho=ESN_RHOS[0])],
    "null_space": esn_grid({"seed": 5}, activation=ESN_ACTIVATIONS, loss=LOSSES),
    "layer_identities": esn_grid({"seed": 7}, activation=ESN_ACTIVATIONS, loss=LOSSES),
    "descent_draws": [esn_case(LOSSES[d % 2], activation=ESN_ACTIVATIONS[d % 3], seed=100 + d) for d in range(50)],
    "mk_damping": esn_grid({"loss": "mse", "seed": 11}, activation=ESN_ACTIVATIONS),
    "rank_one": esn_grid({"activation": "tanh", "seed": 13}, loss=LOSSES),
    # auto-rho on an MSE and a CE net, then random per-layer rho (drawn from rho_seed)
    "inertia": [esn_case(loss, activation=act, seed=40 + i, **extra) for act in ESN_ACTIVATIONS
                for i, (loss, extra) in enumerate([("mse", {}), ("ce", {}), ("mse", {"rho_seed": 2})])],
}
ESN_CASES = {
    "batch_mean": esn_grid({"activation": "tanh", "batch": 2, "seed": 1}, loss=LOSSES),
    "solvers": esn_case("ce", activation="sigmoid", batch=8, seed=17),
    "granular": esn_case("ce", activation="tanh", batch=4, seed=19),
    "ema": esn_case("mse", activation="tanh", batch=4, seed=23),
    "ce_granular": {"sizes": [4, 5, 6], "activation": "tanh", "loss": "ce", "batch": 5, "seed": 2},
    "lam_out": esn_case("ce", activation="tanh", batch=3, seed=4),
    "reg_backward": esn_grid({"loss": "mse", "batch": 3, "seed": 6}, activation=ESN_ACTIVATIONS),
    "dead_relu": esn_case("mse", activation="relu", batch=3, seed=0),  # the test kills the second hidden layer
    "errors": {**SMALL_NET, "loss": "mse", "batch": 3, "seed": 0},
    "unsupported_loss": {**SMALL_NET, "loss": "mse", "batch": 2, "seed": 0},
    "purity": {**SMALL_NET, "loss": "ce", "batch": 4, "seed": 1},
    "cross_backend": {"sizes": [4, 6, 3], "activation": "tanh", "loss": "ce", "batch": 5, "seed": 8},
    "jit": esn_case("ce", activation="tanh", batch=4, seed=9),
    # test_esn_solve: B = 7 gives B x B systems in layers 1-2 and a 5 x 5 one in layer 3
    "batch_systems": {"sizes": [6, 12, 9, 5], "activation": "tanh", "loss": "mse", "batch": 7, "seed": 0},
    # the digits training smoke test, one sample per step
    "digits": {"sizes": [64, 64, 32, 10], "activation": "leaky_relu", "loss": "mse", "batch": 1, "seed": 0,
               "init": "he"},
}


def case_id(case: dict) -> str:
    """``activation-loss-sizes``, then ``key=value`` for each hyperparameter entry."""
    extra = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
             for k, v in case.items() if k not in PROBLEM_KEYS]
    return "-".join([case["activation"], case["loss"], "x".join(map(str, case["sizes"])), *extra])


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
    case = {**case, **overrides}
    return make_problem(backend, **{k: case[k] for k in PROBLEM_KEYS if k in case})


def case_model(backend: str, case: dict):
    """``(model, params)``: a case's net alone, for the tests that draw their own data."""
    options = {k: case[k] for k in ("dtype", "init") if k in case}
    return cc.backends.mlp(backend, case["sizes"], activation=case["activation"], seed=case["seed"], **options)
