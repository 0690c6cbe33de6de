"""Write a new adapter, certify it with ``curvcore.testing.check_model``, then train with it.

    python docs/examples/certify_adapter.py            # 300 training steps per method
    python docs/examples/certify_adapter.py --smoke    # 30 steps (the test suite runs this)

The adapter is a hand-written NumPy model: a one-hidden-layer tanh net with
its forward, JVP (forward-mode) and VJP (reverse-mode) derived by hand: the
three primitives of the protocol. ``check_model`` compares them with finite
differences and with each other (the adjoint identity) in float64; a copy
with a wrong JVP is refused. The certified model then trains on the digits
with CurveBall (which needs all three primitives) and SGD.
"""

from __future__ import annotations

import _cli  # noqa: I001  (docs/examples/_cli.py, next to this script)
import array_api_compat.numpy as xp_numpy
import numpy as np

import curvcore as cc
from curvcore.data import digits
from curvcore.testing import check_model


class TanhNet:
    """``f(x) = tanh(x W1ᵀ + b1) W2ᵀ + b2``, params ``[W1, b1, W2, b2]``, NumPy."""

    xp = xp_numpy

    def _hidden(self, params, x):
        W1, b1, _, _ = params
        return np.tanh(x @ W1.T + b1)

    def forward(self, params, x):
        _, _, W2, b2 = params
        return self._hidden(params, x) @ W2.T + b2

    def jvp(self, params, x, tangent):
        _, _, W2, _ = params
        dW1, db1, dW2, db2 = tangent
        h = self._hidden(params, x)
        dh = (1 - h**2) * (x @ dW1.T + db1)
        return h @ W2.T + params[3], dh @ W2.T + h @ dW2.T + db2

    def vjp(self, params, x):
        _, _, W2, _ = params
        h = self._hidden(params, x)

        def pullback(u):
            gz = (u @ W2) * (1 - h**2)
            return [gz.T @ x, gz.sum(axis=0), u.T @ h, u.sum(axis=0)]

        return h @ W2.T + params[3], pullback


class WrongJVP(TanhNet):
    """The tanh derivative forgotten in the JVP: the kind of bug ``check_model`` exists for."""

    def jvp(self, params, x, tangent):
        dW1, db1, dW2, db2 = tangent
        h = self._hidden(params, x)
        return h @ params[2].T + params[3], (x @ dW1.T + db1) @ params[2].T + h @ dW2.T + db2


def init(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((32, 64)) / 8, np.zeros(32), rng.standard_normal((10, 32)) / np.sqrt(32), np.zeros(10)]


def main() -> None:
    steps = _cli.steps(__doc__)
    split, loss = digits(seed=0), cc.losses.CrossEntropy()
    x, y = split.x_train[:32], split.y_train[:32]
    errors = check_model(TanhNet(), init(), x, y, loss=loss)
    print("check_model passed; worst relative errors:", ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    try:
        check_model(WrongJVP(), init(), x, y, loss=loss)
    except AssertionError as err:
        print("the wrong JVP is refused:", str(err).splitlines()[0])
    else:
        raise SystemExit("check_model accepted a wrong JVP")
    rng = np.random.default_rng(0)
    for name, method in (("CurveBall", cc.CurveBall(lam=0.1)), ("SGD", cc.SGD(lr=0.1, momentum=0.9))):
        params, model = init(), TanhNet()
        state, losses = method.init(params, model), []
        for _ in range(steps):
            idx = rng.choice(len(split.y_train), 64, replace=False)
            params, state, info = method.step(model, loss, params, state, split.x_train[idx], split.y_train[idx])
            losses.append(float(info["loss"]))
        accuracy = float(np.mean(np.argmax(model.forward(params, split.x_test), axis=1) == split.y_test))
        _cli.report(name, losses[0], float(np.mean(losses[-5:])), accuracy)


if __name__ == "__main__":
    main()
