"""Check that two (or more) backends agree: the same MLP, weights and batches, stepped on each, in float64.

    python docs/examples/backends_agree.py            # 20 steps per method
    python docs/examples/backends_agree.py --smoke    # 3 steps (the test suite runs this)

The methods are written once over the array API, so NumPy, PyTorch and JAX
must take the same steps up to round-off. ``cc.backends.mlp`` builds the same
initial weights on every backend (seeded); each backend trains with the same
batches, and the final params are compared with NumPy's, relative to their size.
Backends that are not installed are left out (NumPy alone compares nothing).
"""

from __future__ import annotations

import argparse

import numpy as np

import curvcore as cc
from curvcore.data import digits

METHODS = {"CurveBall": cc.CurveBall, "K-FAC": cc.KFAC}
TOLERANCE = 1e-10  # relative, float64


def train(backend: str, make, steps: int, batch: int = 32) -> list[np.ndarray]:
    """The params (as NumPy) after ``steps`` steps of a fresh ``make()`` on ``backend``."""
    split = digits(seed=0)
    model, params = cc.backends.mlp(backend, [64, 16, 10], activation="tanh", seed=0)
    method, loss = make(), cc.losses.CrossEntropy()
    state = method.init(params, model)
    for k in range(steps):
        rows = slice(k * batch, (k + 1) * batch)
        x, y = (cc.backends.asarray(backend, a[rows]) for a in (split.x_train, split.y_train))
        params, state, _ = method.step(model, loss, params, state, x, y)
    return [cc.backends.to_numpy(p) for p in params]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 steps per method (a quick check)")
    args = parser.parse_args(argv)
    steps = 3 if args.smoke else 20
    cc.backends.enable_jax_x64()  # float64 on JAX (a no-op without JAX)
    others = [b for b in cc.backends.names() if b != "numpy"]
    differences: dict[str, dict[str, float]] = {}
    for name, make in METHODS.items():
        reference = train("numpy", make, steps)
        scale = max(float(np.max(np.abs(p))) for p in reference)
        differences[name] = {b: max(float(np.max(np.abs(p - q))) for p, q in zip(train(b, make, steps), reference))
                             / scale for b in others}
        print(f"{name:10s} " + "  ".join(f"{b} vs numpy {d:.1e}" for b, d in differences[name].items()))
    worst = max((d for row in differences.values() for d in row.values()), default=0.0)
    if worst > TOLERANCE:
        raise SystemExit(f"backends disagree: relative difference {worst:.1e} > {TOLERANCE:.0e}")
    print(f"all backends agree to {TOLERANCE:.0e} (relative), {len(others)} compared with numpy")
    return differences


if __name__ == "__main__":
    main()
