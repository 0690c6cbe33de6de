"""Train an MLP on the digits with NumPy only: no autodiff framework, every method of the library.

    python docs/examples/numpy_mlp.py            # 300 steps per method
    python docs/examples/numpy_mlp.py --smoke    # 30 steps (the test suite runs this)

``cc.backends.mlp("numpy", ...)`` is a plain tanh MLP whose forward, JVP and
VJP are written over the array API, so NumPy alone runs CurveBall, K-FAC, ESN
and the other methods. Each method takes ``steps`` minibatch steps of 64 from
the registry's compare settings (``cc.get_method(name).make()``).
"""

from __future__ import annotations

import _cli  # noqa: I001  (docs/examples/_cli.py, next to this script)
import numpy as np

import curvcore as cc
from curvcore.data import digits

METHODS = ("sgd", "adam", "curveball", "kfac", "esn", "mk")


def train(name: str, steps: int, batch: int = 64, seed: int = 0) -> tuple[float, float, float]:
    """``steps`` minibatch steps of method ``name``; returns the first loss, the mean of the last five, the accuracy."""
    split = digits(seed=0)
    model, params = cc.backends.mlp("numpy", [64, 32, 10], activation="tanh", seed=seed)
    loss, method = cc.losses.CrossEntropy(), cc.get_method(name).make()
    state = method.init(params, model)
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(steps):
        idx = rng.choice(len(split.y_train), batch, replace=False)
        params, state, info = method.step(model, loss, params, state, split.x_train[idx], split.y_train[idx])
        history.append(float(info["loss"]))
    accuracy = float(np.mean(np.argmax(model.forward(params, split.x_test), axis=1) == split.y_test))
    return history[0], float(np.mean(history[-5:])), accuracy


def main() -> None:
    steps = _cli.steps(__doc__)
    for name in METHODS:
        first, last, accuracy = train(name, steps)
        _cli.report(name, first, last, accuracy)
        if not last < first:
            raise SystemExit(f"{name} did not lower the training loss ({first:.3f} -> {last:.3f})")


if __name__ == "__main__":
    main()
