"""A flax CNN on the 8x8 digits with K-FAC and CurveBall, the whole training loop one ``lax.scan``.

    python docs/examples/flax_cnn.py            # 300 steps per method
    python docs/examples/flax_cnn.py --smoke    # 30 steps (the test suite runs this)

The CNN is plain ``flax.linen``: K-FAC finds its ``nn.Conv`` and ``nn.Dense``
layers itself (no tagging) and preconditions both. Images are ``(B, 8, 8, 1)``
(flax's NHWC layout). Each method's loop is one jitted ``jax.lax.scan``.
"""

from __future__ import annotations

import _cli  # noqa: I001  (docs/examples/_cli.py, next to this script)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import curvcore as cc
from curvcore.backends import jax as cj
from curvcore.data import digits


class CNN(nn.Module):
    """Conv 3x3 (8 channels) -> ReLU -> 2x2 max pool -> Dense(10)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(8, (3, 3), padding=1)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def train(method: cc.Method, model: cj.JaxModel, params: dict, x: jax.Array, y: jax.Array, steps: int,
          batch: int, seed: int) -> tuple[dict, jax.Array]:
    """``steps`` minibatch steps in one compiled ``lax.scan``; returns the params and the losses."""
    loss = cc.losses.CrossEntropy()
    idx = np.random.default_rng(seed).integers(0, len(y), (steps, batch))

    def body(carry, xy):
        p, s = carry
        p, s, info = method.step(model, loss, p, s, *xy)
        return (p, s), info["loss"]

    run = jax.jit(lambda p, s, xs, ys: jax.lax.scan(body, (p, s), (xs, ys)))
    (params, _), losses = run(params, method.init(params, model), x[idx], y[idx])
    return params, losses


def main() -> None:
    steps = _cli.steps(__doc__)

    split = digits(seed=0)
    x = jnp.asarray(split.x_train.reshape(-1, 8, 8, 1), dtype=jnp.float32)
    y = jnp.asarray(split.y_train)
    x_test = jnp.asarray(split.x_test.reshape(-1, 8, 8, 1), dtype=jnp.float32)
    module = CNN()
    model, params = cj.from_flax(module, module.init(jax.random.key(0), x[:1]))
    print("layers:", ", ".join(f"{s.name} ({s.kind})" for s in model.layer_specs(params)))
    for name, method in (("K-FAC", cc.KFAC(lr=0.1, damping=0.01, refresh_every=10)),
                         ("CurveBall", cc.CurveBall()),
                         ("SGD", cc.SGD(lr=0.1, momentum=0.9))):
        trained, losses = train(method, model, params, x, y, steps, batch=64, seed=1)
        accuracy = float(jnp.mean(jnp.argmax(model.forward(trained, x_test), 1) == jnp.asarray(split.y_test)))
        _cli.report(name, float(losses[0]), float(losses[-5:].mean()), accuracy)


if __name__ == "__main__":
    main()
