"""Data-parallel training of a flax CNN on the digits over every JAX device: ``jit_step(..., mesh=mesh)``.

    python docs/examples/jax_sharded.py            # 300 steps per method
    python docs/examples/jax_sharded.py --smoke    # 30 steps (the test suite runs this)

Each batch is split over the mesh axis ``"data"``, one part per device; params
and method state are replicated. XLA turns the methods' sums over the batch
into all-reduces, so every device takes the step one device would take on the
whole batch. On a machine without accelerators the script asks XLA for 2 CPU
devices (the ``XLA_FLAGS`` line must run before JAX is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import _cli  # noqa: E402,I001  (docs/examples/_cli.py, next to this script)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import curvcore as cc  # noqa: E402
from curvcore.backends import jax as cj  # noqa: E402
from curvcore.data import digits  # noqa: E402

BATCH = 64  # split evenly over 1, 2, 4 or 8 devices


def main() -> None:
    steps = _cli.steps(__doc__)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    print(f"{mesh.size} devices: {', '.join(str(d) for d in mesh.devices)}")

    split = digits(seed=0)
    x, y = split.x_train.reshape(-1, 8, 8, 1).astype(np.float32), split.y_train.astype(np.int32)
    x_test = jax.device_put(split.x_test.reshape(-1, 8, 8, 1).astype(np.float32), NamedSharding(mesh, PartitionSpec()))
    loss = cc.losses.CrossEntropy()
    for name, method in (("K-FAC", cc.KFAC(lr=0.1, damping=0.01, refresh_every=10)), ("CurveBall", cc.CurveBall())):
        model, params = cc.backends.cnn("jax", channels=8, dtype="float32")
        step = cj.jit_step(method, model, loss, mesh=mesh, batch_axis="data")  # one compiled program
        state = method.init(params, model)
        losses = []
        for idx in np.random.default_rng(1).integers(0, len(y), (steps, BATCH)):
            params, state, info = step(params, state, x[idx], y[idx])  # NumPy batches: jit_step splits them
            losses.append(float(info["loss"]))
        accuracy = float(jnp.mean(jnp.argmax(model.forward(params, x_test), 1) == split.y_test))
        _cli.report(name, losses[0], float(np.mean(losses[-5:])), accuracy)


if __name__ == "__main__":
    main()
