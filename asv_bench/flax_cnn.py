"""Step time of K-FAC and CurveBall relative to SGD on the flax digits CNN under ``jax.jit``.

    python asv_bench/flax_cnn.py [--batch 64] [--channels 4] [--number 50] [--repeats 7]

The net is ``cc.backends.cnn("jax")`` (Conv 3x3 -> ReLU -> max pool -> Dense on
(B, 8, 8, 1) float64 digits), each method stepped by ``jit_step``. XLA and the
BLAS/LAPACK that jaxlib calls for the Cholesky solves run on one thread, and
the clock is the process CPU time, like the asv suite
(``CURVCORE_BENCH_THREADS=1 CURVCORE_BENCH_CPU_TIME=1``); with OpenBLAS's
default threads a 65 x 65 triangular solve took 10-40 times longer here, and
varied as much. The methods run in
turn within each repeat (so load on a shared machine hits them alike), a
repeat times ``--number`` steps after a warm-up, and the minimum over repeats
is kept. ``--number`` is a multiple of 10, so K-FAC with ``refresh_every=10``
is amortized over whole refresh periods. Only the public API is used.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # one thread, like the asv suite (not when asv imports this file)
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import curvcore as cc  # noqa: E402
from curvcore.backends import jax as cj  # noqa: E402
from curvcore.data import digits  # noqa: E402

METHODS = {
    "sgd": lambda: cc.SGD(lr=0.1),
    "kfac (refresh_every=10)": lambda: cc.KFAC(refresh_every=10),
    "kfac (refresh_every=1)": lambda: cc.KFAC(refresh_every=1),
    "kfac (no refresh in the timed steps)": lambda: cc.KFAC(refresh_every=10_000),
    "curveball": lambda: cc.CurveBall(),
}
TARGETS = {"kfac (refresh_every=10)": "<= 3"}


def runner(make, batch: int, channels: int):
    """A closure running ``n`` jitted steps of one method from a fixed start."""
    model, params = cc.backends.cnn("jax", channels=channels)
    split = digits(seed=0)
    x = cj.from_numpy(split.x_train[:batch].reshape(-1, 8, 8, 1))
    y = cj.from_numpy(split.y_train[:batch])
    method = make()
    method.validate = False  # value checks sync the device; none run inside jit anyway
    step = cj.jit_step(method, model, cc.losses.CrossEntropy())
    carry = [params, method.init(params, model)]

    def run(n: int) -> None:
        for _ in range(n):
            carry[0], carry[1], _ = step(carry[0], carry[1], x, y)
        jax.block_until_ready(carry)

    return run


def measure(batch: int, channels: int, number: int, repeats: int) -> dict[str, tuple[float, float]]:
    """``{method: (CPU seconds per step, wall seconds per step)}``, minima over repeats."""
    runs = {name: runner(make, batch, channels) for name, make in METHODS.items()}
    for run in runs.values():
        run(number)  # compile and warm up (every branch of the schedule)
    best = {name: (np.inf, np.inf) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run(number)
            cpu, wall = (time.process_time() - cpu) / number, (time.perf_counter() - wall) / number
            best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--number", type=int, default=50, help="steps per repeat (a multiple of 10)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.number % 10:
        parser.error("--number must be a multiple of 10 (whole K-FAC refresh periods)")
    jax.config.update("jax_enable_x64", True)
    with threadpool_limits(1):
        best = measure(args.batch, args.channels, args.number, args.repeats)
    sgd_cpu, sgd_wall = best["sgd"]
    print(f"flax CNN ({args.channels} channels, B={args.batch}, float64), jit_step, jax {jax.__version__}\n")
    print("| method | target | step / SGD step (CPU time) | CPU time per step | wall / SGD wall |")
    print("|---|---|---|---|---|")
    for name, (cpu, wall) in best.items():
        print(f"| {name} | {TARGETS.get(name, '')} | {cpu / sgd_cpu:.2f} | {cpu * 1e3:.3g} ms | "
              f"{wall / sgd_wall:.2f} |")


if __name__ == "__main__":
    main()
