"""Save a training run with ``cc.save``, resume it with ``cc.load``, and get the same result as without the stop.

    python docs/examples/checkpoint_resume.py            # 40 steps, saved after 20
    python docs/examples/checkpoint_resume.py --smoke    # 6 steps, saved after 3 (the test suite runs this)

K-FAC keeps state between steps (its Kronecker factors and their inverses,
refreshed every 2 steps here), so a resume that lost it would differ. The run
is stepped straight through once; a second run stops half way, writes a
checkpoint, and a fresh method, params and state are read back from the file
and continue. Both end bit-identical on NumPy. If PyTorch is installed, the
same checkpoint is also resumed on torch (``like="torch"``), equal to
round-off.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

import curvcore as cc
from curvcore.data import digits


def batches(steps: int, batch: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same minibatches for every run."""
    split, rng = digits(seed=0), np.random.default_rng(0)
    return [(split.x_train[i], split.y_train[i]) for i in (rng.choice(len(split.y_train), batch) for _ in range(steps))]


def run(method, params, state, data, backend: str = "numpy") -> tuple[list, object]:
    """Step ``method`` through ``data`` on ``backend``; the final params and state."""
    model, _ = cc.backends.mlp(backend, [64, 32, 10], activation="tanh")
    loss = cc.losses.CrossEntropy()
    for x, y in data:
        params, state, _ = method.step(model, loss, params, state, cc.backends.asarray(backend, x),
                                       cc.backends.asarray(backend, y))
    return params, state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="6 steps (a quick check)")
    steps = 6 if parser.parse_args(argv).smoke else 40
    data, half = batches(steps), steps // 2
    model, params = cc.backends.mlp("numpy", [64, 32, 10], activation="tanh", seed=0)
    method = cc.KFAC(lr=0.3, refresh_every=2)

    straight, _ = run(method, params, method.init(params, model), data)

    first, state = run(method, params, method.init(params, model), data[:half])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kfac.npz")
        cc.save(path, method, first, state, step=half)
        print(f"saved after {half} steps: {os.path.getsize(path)} bytes")
        restored, params_back, state_back = cc.load(path)  # method rebuilt from the file
        resumed, _ = run(restored, params_back, state_back, data[half:])
        if cc.backends.available("torch"):
            on_torch, p_torch, s_torch = cc.load(path, like="torch")
            resumed_torch, _ = run(on_torch, p_torch, s_torch, data[half:], backend="torch")
    print(f"restored {restored!r}")
    same = all(np.array_equal(a, b) for a, b in zip(resumed, straight))
    print(f"resumed run equals the straight run bit for bit: {same}")
    if not same:
        raise SystemExit("the resumed run differs from the straight run")
    if cc.backends.available("torch"):
        diff = max(float(np.max(np.abs(cc.backends.to_numpy(a) - b))) for a, b in zip(resumed_torch, straight))
        print(f"resumed on torch: largest difference from the NumPy run {diff:.1e}")
        if diff > 1e-10 * max(float(np.max(np.abs(b))) for b in straight):
            raise SystemExit("the run resumed on torch differs from the NumPy run")


if __name__ == "__main__":
    main()
