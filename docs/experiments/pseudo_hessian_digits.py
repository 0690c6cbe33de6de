"""PseudoHessian on sklearn digits: (a) optimisation table, (b) an analogue of the paper's Fig. 1.

Run:  python docs/experiments/pseudo_hessian_digits.py   (about 2 minutes on 2 CPU cores)

(a) 64-32-10 tanh MLP, cross-entropy, float64, full batch (1500 training images), 30 steps:
    PseudoHessian defaults with groups in {"tensor", "layer", "one"}, groups="tensor" with reg="none",
    and gradient descent (lr 0.5); five initialisations W ~ N(0, 1/n_in), b ~ N(0, 0.01).
(b) The paper's Fig. 1 (Hbar and Hbar^{-1}, W-W / B-B / W-B blocks) for a 5-layer tanh MLP
    64-32-32-32-32-10 (LeNet-5 has 5 layers) at initialisation and after 20 SGD epochs (lr 0.1, batch 64),
    Hbar on the whole training set with groups="tensor" and u = g.

Writes docs/img/pseudo_hessian_digits.png, docs/img/pseudo_hessian_fig1.png,
docs/experiments/results/pseudo_hessian_digits.json and the tables
results/pseudo_hessian_digits.md (optimisation) and results/pseudo_hessian_digits_cost.md
(time per step) included in docs/methods/pseudo_hessian.md; see docs/experiments/README.md.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _common import caption, interleaved_min, main, pyplot, savefig

import curvcore as cc
from curvcore.methods.pseudo_hessian import summary

NAME = "pseudo_hessian_digits"  # main() runs it with one BLAS thread (small matmuls: threads only contend)
STEPS = 30
SEEDS = (0, 1, 2, 3, 4)


def load() -> tuple[np.ndarray, ...]:
    """X = data/16, permutation by default_rng(0), first 1500 train, the rest test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    X, y = d.data[perm] / 16.0, d.target[perm].astype(np.int64)
    return X[:1500], y[:1500], X[1500:], y[1500:]


def init(sizes: list[int], seed: int) -> list[np.ndarray]:
    """W ~ N(0, 1/n_in), b ~ N(0, 0.01) (the held-out reference's initialisation)."""
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        params += [rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), 0.1 * rng.standard_normal(n_out)]
    return params


def accuracy(model, params, X, y) -> float:
    return float(np.mean(np.argmax(model.forward(params, X), axis=1) == y))


RUNS = {
    "PseudoHessian tensor (cubic)": lambda: cc.PseudoHessian(groups="tensor"),
    "PseudoHessian layer (cubic)": lambda: cc.PseudoHessian(groups="layer"),
    "PseudoHessian one (cubic)": lambda: cc.PseudoHessian(groups="one"),
    "PseudoHessian tensor, reg=none": lambda: cc.PseudoHessian(groups="tensor", reg="none"),
    "GD lr=0.5": lambda: cc.SGD(lr=0.5),
}


def optimisation(data) -> dict:
    """(a): 30 full-batch steps per method and seed."""
    Xtr, ytr, Xte, yte = data
    sizes = [64, 32, 10]
    model, _ = cc.backends.mlp("numpy", sizes, activation="tanh")
    loss = cc.losses.CrossEntropy()
    out: dict = {}
    for name, make in RUNS.items():
        out[name] = []
        for seed in SEEDS:
            params = init(sizes, seed)
            opt = make()
            state = opt.init(params)
            curve = [float(loss.value(model.forward(params, Xtr), ytr))]
            statuses, ts = [], []
            for _ in range(STEPS):
                params, state, info = opt.step(model, loss, params, state, Xtr, ytr)
                curve.append(float(loss.value(model.forward(params, Xtr), ytr)))
                statuses.append(float(info.get("status", 0.0)))
                ts.append(float(info.get("t", 1.0)))
            out[name].append({"seed": seed, "curve": curve, "train_loss": curve[-1],
                              "test_acc": accuracy(model, params, Xte, yte), "max_status": max(statuses),
                              "min_t": min(ts)})
            print(f"{name:32s} seed {seed}: train loss {curve[-1]:.4f}  test acc {out[name][-1]['test_acc']:.3f}  "
                  f"max status {max(statuses):.0f}  min t {min(ts):g}", flush=True)
    return out


def table(data: dict) -> str:
    res = data["optimisation"]
    lines = [caption(data, NAME), "",
             "| method | train loss after 30 steps (seeds 0 / 1 / 2 / 3 / 4) | test acc | max status | min t |",
             "|---|---|---|---|---|"]
    for name, runs in res.items():
        tl = " / ".join(f"{r['train_loss']:.3f}" for r in runs)
        acc = " / ".join(f"{r['test_acc']:.3f}" for r in runs)
        st = max(r["max_status"] for r in runs)
        mt = min(r["min_t"] for r in runs)
        lines.append(f"| {name} | {tl} | {acc} | {st:.0f} | {mt:g} |")
    return "\n".join(lines)


COST_ROWS = {"GD": ("GD lr=0.5", None), '`"one"`': ("PseudoHessian one (cubic)", 1),
             '`"layer"`': ("PseudoHessian layer (cubic)", 2), '`"tensor"`': ("PseudoHessian tensor (cubic)", 4)}


def step_times(data) -> dict[str, float]:
    """CPU seconds of one full-batch step from the seed-0 initialisation, min over 10 interleaved rounds."""
    Xtr, ytr, _, _ = data
    model, _ = cc.backends.mlp("numpy", [64, 32, 10], activation="tanh")
    loss, params = cc.losses.CrossEntropy(), init([64, 32, 10], 0)

    def call(make):
        opt = make()
        state = opt.init(params)
        return lambda: opt.step(model, loss, params, state, Xtr, ytr)

    return interleaved_min({key: call(RUNS[key]) for key, _ in COST_ROWS.values()}, repeats=10)


def cost_table(data: dict) -> str:
    """CPU time per full-batch step, against GD's."""
    ms = {key: 1e3 * t for key, t in data["step_cpu_s"].items()}
    gd = ms["GD lr=0.5"]
    lines = [f"{caption(data, NAME)} Full batch of 1500; one step from the seed-0 initialisation, "
             "CPU time, minimum over 10 rounds interleaved across the runs.", "",
             "| run | S | CPU ms per step | ratio to GD |", "|---|---|---|---|"]
    for label, (key, S) in COST_ROWS.items():
        lines.append(f"| {label} | {'–' if S is None else S} | {ms[key]:.1f} | {ms[key] / gd:.1f} |")
    return "\n".join(lines)


def render(data: dict) -> dict[str, str]:
    return {"": table(data), "_cost": cost_table(data)}


def acceptance(res: dict) -> dict:
    """The acceptance criteria of docs/methods/pseudo_hessian.md, per seed."""
    checks = {}
    for i, seed in enumerate(SEEDS):
        t = res["PseudoHessian tensor (cubic)"][i]
        one = res["PseudoHessian one (cubic)"][i]["train_loss"]
        gd = res["GD lr=0.5"][i]["train_loss"]
        checks[f"seed {seed}"] = {
            "tensor loss <= 0.2": t["train_loss"] <= 0.2, "tensor < one": t["train_loss"] < one,
            "tensor <= 0.5 GD": t["train_loss"] <= 0.5 * gd, "test acc >= 0.95": t["test_acc"] >= 0.95,
            "status 0 throughout": t["max_status"] == 0,
        }
    return checks


def fig1(data) -> dict:
    """(b): Hbar and Hbar^{-1} blocks at initialisation and after 20 SGD epochs."""
    Xtr, ytr, _, _ = data
    sizes = [64, 32, 32, 32, 32, 10]
    L = len(sizes) - 1
    model, _ = cc.backends.mlp("numpy", sizes, activation="tanh")
    loss = cc.losses.CrossEntropy()
    params = init(sizes, 0)
    sgd = cc.SGD(lr=0.1)
    state = sgd.init(params)
    rng = np.random.default_rng(1)
    mats = {"epoch 0": summary(model, loss, params, Xtr, ytr, groups="tensor", order=2)["Hbar"]}
    for _ in range(20):
        order = rng.permutation(len(ytr))
        for s in range(0, len(ytr) - 63, 64):
            idx = order[s:s + 64]
            params, state, _ = sgd.step(model, loss, params, state, Xtr[idx], ytr[idx])
    mats["epoch 20"] = summary(model, loss, params, Xtr, ytr, groups="tensor", order=2)["Hbar"]
    final_loss = float(loss.value(model.forward(params, Xtr), ytr))
    _plot_fig1(mats, L)
    out = {"sizes": sizes, "train_loss_after_20_epochs": final_loss}
    for k, H in mats.items():
        J = 1 / np.sqrt(np.abs(np.diag(H)))
        C = H * J[:, None] * J[None, :]
        Ci = np.linalg.inv(H) / (J[:, None] * J[None, :])
        W = np.arange(0, 2 * L, 2)  # the weight groups
        out[k] = {"Hbar": H.tolist(), "eig_min": float(np.linalg.eigvalsh(H)[0]),
                  "eig_max": float(np.linalg.eigvalsh(H)[-1]),
                  "offdiag_share_scaled_Hbar": _offdiag_share(C), "offdiag_share_scaled_inverse": _offdiag_share(Ci),
                  "WW_scaled_inverse_offdiag_max": float(np.max(np.abs(Ci[np.ix_(W, W)] - np.diag(np.diag(Ci[np.ix_(W, W)])))))}
    return out


def _offdiag_share(M: np.ndarray) -> float:
    """Frobenius share of the off-diagonal entries of a (Jacobi-scaled) matrix."""
    off = M - np.diag(np.diag(M))
    return float(np.linalg.norm(off) / np.linalg.norm(M))


def _plot_fig1(mats: dict, L: int) -> None:
    plt = pyplot()
    W, B = np.arange(0, 2 * L, 2), np.arange(1, 2 * L, 2)
    blocks = [("W-W", W, W), ("B-B", B, B), ("W-B", W, B)]
    fig, axes = plt.subplots(2, 6, figsize=(17, 6.2))
    for c, (epoch, H) in enumerate(mats.items()):
        J = 1 / np.sqrt(np.abs(np.diag(H)))
        rows = {"Hbar": H * J[:, None] * J[None, :], "Hbar^-1": np.linalg.inv(H) / (J[:, None] * J[None, :])}
        for r, (what, M) in enumerate(rows.items()):
            for b, (bname, I, K) in enumerate(blocks):
                ax = axes[r, 3 * c + b]
                sub = M[np.ix_(I, K)]
                lim = np.max(np.abs(M))
                im = ax.imshow(sub, cmap="RdBu_r", vmin=-lim, vmax=lim)
                ax.set_title(f"{epoch}, {bname}\n{what} (Jacobi-scaled)", fontsize=9)
                ax.set_xticks(range(L), [str(i + 1) for i in range(L)], fontsize=7)
                ax.set_yticks(range(L), [str(i + 1) for i in range(L)], fontsize=7)
                ax.set_xlabel("layer", fontsize=7)
            fig.colorbar(im, ax=axes[r, 3 * c:3 * c + 3], shrink=0.8)
    fig.suptitle("Fig. 1 analogue: pseudo-Hessian Hbar (top) and its inverse (bottom), 64-32-32-32-32-10 tanh MLP "
                 "on digits,\ncanonical partition (W_k, b_k), u = g; scaled by J = Diag(|Hbar_ss|^-1/2) "
                 "(J Hbar J and J^-1 Hbar^-1 J^-1; red > 0, blue < 0)", fontsize=10)
    savefig(fig, "pseudo_hessian_fig1.png")


def plot_curves(res: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.3))
    for name, runs in res.items():
        curves = np.array([r["curve"] for r in runs])
        line, = ax.plot(np.median(curves, axis=0), label=name)
        ax.fill_between(range(STEPS + 1), curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("step (full batch, 1500 images)")
    ax.set_ylabel("training loss (CE)")
    ax.set_title("digits, 64-32-10 tanh MLP: median and range over 5 initialisations", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, "pseudo_hessian_digits.png", dpi=110)


def run(args) -> dict:
    data = load()
    res = optimisation(data)
    cpu = step_times(data)
    plot_curves(res)
    checks = acceptance(res)
    f1 = fig1(data)
    print("\nacceptance:", json.dumps(checks, indent=1))
    for k in ("epoch 0", "epoch 20"):
        print(f"{k}: Hbar eig [{f1[k]['eig_min']:.3g}, {f1[k]['eig_max']:.3g}], off-diagonal share (scaled) "
              f"Hbar {f1[k]['offdiag_share_scaled_Hbar']:.2f}, inverse {f1[k]['offdiag_share_scaled_inverse']:.2f}")
    return {"optimisation": res, "acceptance": checks, "fig1": f1, "step_cpu_s": cpu}


if __name__ == "__main__":
    main(sys.modules[__name__])
