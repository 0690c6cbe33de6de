"""The digits stand-in for the CurveBall paper's sections 4.2/4.4 (spec section 6 protocol).

sklearn ``load_digits`` (all 1797 samples, X = pixels/16), MLP 64-32-10 tanh,
cross-entropy, batches of 100 from a seeded reshuffle each epoch (the same
batches for every method), library init (``cc.backends.mlp``, seed 0), NumPy
backend, float64. The table reports the spec's 150 steps and a longer 600-step
run; the figure shows the full-data loss against steps and against time, taken
as steps x the minimum over 50 repeats of one step's process CPU time, the
methods interleaved (robust to other load on a shared machine; the raw
cumulative wall times are in the JSON).

Writes docs/experiments/results/curveball_digits.{json,md} and
docs/img/curveball_digits.png (see docs/experiments/README.md). Run with one thread:
``OMP_NUM_THREADS=1 python docs/experiments/curveball_digits.py`` (about a minute).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _common import caption, interleaved_min, main, pyplot, savefig

import curvcore as cc

NAME = "curveball_digits"
STEPS, REPORT = 600, (150, 600)

METHODS = {
    "CurveBall lam0=0.1": lambda: cc.CurveBall(lam=0.1),
    "CurveBall lam0=1": lambda: cc.CurveBall(lam=1.0),
    "CurveBall lam0=10": lambda: cc.CurveBall(lam=10.0),
    "SGD+momentum 0.9, lr 0.1": lambda: cc.SGD(lr=0.1, momentum=0.9),
    "SGD+momentum 0.9, lr 0.3": lambda: cc.SGD(lr=0.3, momentum=0.9),
    "Adam lr 1e-3": lambda: cc.Adam(lr=1e-3),
    "Adam lr 1e-2": lambda: cc.Adam(lr=1e-2),
}


def batches(n, steps, batch=100, seed=0):
    """Index batches: a fresh seeded permutation each epoch, the last partial batch dropped."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < steps:
        order = rng.permutation(n)
        out += [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def run_method(make, X, y, idx):
    model, params = cc.backends.mlp("numpy", [64, 32, 10], activation="tanh", seed=0)
    loss, opt = cc.losses.CrossEntropy(), make()
    state = opt.init(params)
    f = model.forward(params, X)
    hist = {"loss": [float(loss.value(f, y))], "acc": [float(np.mean(np.argmax(f, 1) == y))], "wall": [0.0]}
    wall = 0.0
    for b in idx:
        t0 = time.perf_counter()
        params, state, _ = opt.step(model, loss, params, state, X[b], y[b])
        wall += time.perf_counter() - t0
        f = model.forward(params, X)
        hist["loss"].append(float(loss.value(f, y)))
        hist["acc"].append(float(np.mean(np.argmax(f, 1) == y)))
        hist["wall"].append(wall)
    return hist, lambda: opt.step(model, loss, params, state, X[idx[0]], y[idx[0]])


def run(args) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = d.data / 16.0, d.target.astype(np.int64)
    idx = batches(len(X), STEPS)
    trained = {name: run_method(make, X, y, idx) for name, make in METHODS.items()}
    runs = {name: hist for name, (hist, _) in trained.items()}
    # one more step from the final state, timed: CPU time, min over 50 rounds interleaved across the methods
    for name, t in interleaved_min({name: step for name, (_, step) in trained.items()}).items():
        runs[name]["step_min_s"] = t
    plot(runs)
    return {"runs": {name: {**{key: [float(f"{v:.6g}") for v in h[key]] for key in ("loss", "acc", "wall")},
                            "step_min_s": h["step_min_s"]} for name, h in runs.items()}}


def render(data: dict) -> dict[str, str]:
    runs = data["runs"]
    lines = [caption(data, NAME), "",
             "| method | loss @150 | train acc @150 | loss @600 | train acc @600 | CPU ms / step (min of 50) |"
             " step / SGD step |", "|---|---|---|---|---|---|---|"]
    sgd = runs["SGD+momentum 0.9, lr 0.1"]["step_min_s"]
    for name, h in runs.items():
        ms = 1e3 * h["step_min_s"]
        lines.append(f"| {name} | {h['loss'][150]:.4f} | {h['acc'][150]:.3f} | {h['loss'][600]:.4f} | "
                     f"{h['acc'][600]:.3f} | {ms:.2f} | {h['step_min_s'] / sgd:.2f} |")
    return {"": "\n".join(lines)}


def plot(runs: dict) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name, h in runs.items():
        style = "-" if name.startswith("CurveBall") else "--"
        a1.semilogy(h["loss"], style, lw=1.3, label=name)
        a2.semilogy(np.arange(len(h["loss"])) * h["step_min_s"], h["loss"], style, lw=1.3, label=name)
    a1.axvline(150, color="k", ls=":", lw=1)
    a1.set_xlabel("step (batch 100)")
    a2.set_xlabel("steps x min CPU time per step (s), NumPy, one thread")
    for ax in (a1, a2):
        ax.set_ylabel("full-data cross-entropy")
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    fig.suptitle("digits, MLP 64-32-10 tanh, CE, batch 100 (same batches for all methods)")
    fig.tight_layout()
    savefig(fig, "curveball_digits.png")


if __name__ == "__main__":
    main(sys.modules[__name__])
