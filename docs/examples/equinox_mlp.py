"""An equinox MLP on the digits with K-FAC, ESN and CurveBall through ``jit_step``.

    python docs/examples/equinox_mlp.py            # 300 steps per method
    python docs/examples/equinox_mlp.py --smoke    # 30 steps (the test suite runs this)

``from_equinox`` maps the module (which acts on one sample) over the batch
and finds its ``eqx.nn.Linear`` layers; the params are the module's array
leaves, and ``model.module(params)`` puts the trained ones back into a module.
"""

from __future__ import annotations

import _cli  # noqa: I001  (docs/examples/_cli.py, next to this script)
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import curvcore as cc
from curvcore.backends import jax as cj
from curvcore.data import digits


def main() -> None:
    steps = _cli.steps(__doc__)

    split = digits(seed=0)
    x, y = jnp.asarray(split.x_train, dtype=jnp.float32), jnp.asarray(split.y_train)
    mlp = eqx.nn.MLP(64, 10, 32, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    model, params = cj.from_equinox(mlp)
    loss = cc.losses.CrossEntropy()
    for name, method in (("K-FAC", cc.KFAC(lr=0.1, damping=0.01, refresh_every=10)),
                         ("ESN", cc.ESN(lr=0.3)),
                         ("CurveBall", cc.CurveBall())):
        step = cj.jit_step(method, model, loss)  # one compiled program per method
        p, state = params, method.init(params, model)
        rng = np.random.default_rng(1)
        losses = []
        for _ in range(steps):
            idx = rng.integers(0, len(y), 64)
            p, state, info = step(p, state, x[idx], y[idx])
            losses.append(float(info["loss"]))
        trained = model.module(p)  # an eqx.nn.MLP again
        accuracy = float(jnp.mean(jnp.argmax(jax.vmap(trained)(jnp.asarray(split.x_test, dtype=jnp.float32)), 1)
                                  == jnp.asarray(split.y_test)))
        _cli.report(name, losses[0], float(np.mean(losses[-5:])), accuracy)


if __name__ == "__main__":
    main()
