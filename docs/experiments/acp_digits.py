"""Digits reproduction of the ACP thesis experiments (protocol in docs/methods/acp.md).

Two problems on scikit-learn's ``load_digits`` (X/16, permuted with
``default_rng(0)``, first 1500 = train, the rest = test):

* autoencoder 64-32-16-32-64, sigmoid hidden units, linear output, MSE
  (per sample 1/2 ||f - x||^2), 3000 updates (the thesis's benchmark type, §4.1.1);
* classifier 64-32-32-10, tanh, cross-entropy, 300 updates.

Methods with the spec's grid-chosen settings: SGD, centered GD (Alg 3), ACP with
constant alpha and with adaptive alpha (refresh_every 100, cov_batch of 200
fresh training samples), K-FAC (empirical Fisher, refresh 1). Init
``W ~ N(0, 1/n_in)``, ``b = 0``; batch 64 drawn with replacement; seeds 0, 1, 2
(the same minibatch sequence for every method of a seed). Reported: full
train-set loss after training (and test accuracy for the classifier), and the
median time per step. ``--grid`` reruns the spec's grids on seed 0 first.

Run (about 2-3 minutes on 2 CPU cores)::

    python docs/experiments/acp_digits.py   # docs/experiments/results/acp_digits.{json,md}, docs/img/acp_digits_*.png
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _common import caption, main, pyplot, savefig

import curvcore as cc

NAME = "acp_digits"  # main() runs it with one BLAS thread: a threaded 64x64 eigh was ~100x slower here

PROBLEMS = {
    "ae": {"sizes": [64, 32, 16, 32, 64], "activation": "sigmoid", "loss": "mse", "updates": 3000,
           "title": "autoencoder 64-32-16-32-64 sigmoid, MSE"},
    "clf": {"sizes": [64, 32, 32, 10], "activation": "tanh", "loss": "ce", "updates": 300,
            "title": "classifier 64-32-32-10 tanh, CE"},
}

# (label, class, kwargs) per problem: the spec's grid-chosen settings (§7 table)
SETTINGS = {
    "ae": [
        ("SGD", cc.SGD, {"lr": 0.3}),
        ("centered GD", cc.CenteredSGD, {"lr": 1.0}),
        ("ACP alpha=1", cc.ACP, {"lr": 0.1, "eps": 1e-2, "alpha": 1.0, "refresh_every": 100}),
        ("ACP adaptive", cc.ACP, {"lr": 0.03, "eps": 1e-3, "alpha": "adaptive", "refresh_every": 100}),
        ("K-FAC", cc.KFAC, {"lr": 0.03, "damping": 1e-3, "refresh_every": 1}),
    ],
    "clf": [
        ("SGD", cc.SGD, {"lr": 1.0}),
        ("centered GD", cc.CenteredSGD, {"lr": 3.0}),
        ("ACP alpha=1", cc.ACP, {"lr": 3.0, "eps": 1.0, "alpha": 1.0, "refresh_every": 100}),
        ("ACP defaults", cc.ACP, {}),
        ("ACP adaptive", cc.ACP, {"lr": 0.3, "eps": 0.1, "alpha": "adaptive", "refresh_every": 100}),
        ("K-FAC", cc.KFAC, {"lr": 1.0, "damping": 1e-2, "refresh_every": 1}),
    ],
}

GRIDS = {
    "SGD": (cc.SGD, [{"lr": v} for v in (0.1, 0.3, 1.0, 3.0)]),
    "centered GD": (cc.CenteredSGD, [{"lr": v} for v in (0.3, 1.0, 3.0, 10.0)]),
    "ACP alpha=1": (cc.ACP, [{"lr": lr, "eps": e, "refresh_every": 100}
                             for lr in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0) for e in (1e-3, 1e-2, 1e-1, 1.0)]),
    "ACP adaptive": (cc.ACP, [{"lr": lr, "eps": e, "alpha": "adaptive", "refresh_every": 100}
                              for lr in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0) for e in (1e-3, 1e-2, 1e-1, 1.0)]),
    "K-FAC": (cc.KFAC, [{"lr": lr, "damping": d} for lr in (0.01, 0.03, 0.1, 0.3, 1.0) for d in (1e-3, 1e-2, 1e-1)]),
}


def load(backend: str) -> dict:
    """Digits X/16, permuted with default_rng(0); 1500 train, 297 test; arrays on ``backend``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    X, y = d.data[perm] / 16.0, d.target[perm].astype(np.int64)
    put = lambda a: cc.backends.asarray(backend, a)  # noqa: E731
    return {"X": X[:1500], "y": y[:1500], "Xte": X[1500:], "yte": y[1500:],
            "dev": {"X": put(X[:1500]), "y": put(y[:1500]), "Xte": put(X[1500:])}}


def run_one(problem: str, cls: type, kw: dict, seed: int, data: dict, backend: str, every: int) -> dict:
    """Train once; return the loss curve (every ``every`` updates), final loss/accuracy, median step time."""
    p = PROBLEMS[problem]
    model, params = cc.backends.mlp(backend, p["sizes"], activation=p["activation"], seed=seed)
    loss = cc.losses.get(p["loss"])
    opt = cls(**kw)
    opt.validate = False  # checks force syncs; the inputs are known-good here
    state = opt.init(params)
    batch_rng, cov_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    X, dev = data["X"], data["dev"]
    targets = X if p["loss"] == "mse" else data["y"]
    full_t = dev["X"] if p["loss"] == "mse" else dev["y"]

    def full_loss(ps: list) -> float:
        try:
            with np.errstate(all="ignore"):
                return float(loss.value(model.forward(ps, dev["X"]), full_t))
        except (ValueError, FloatingPointError):  # NaN params after a diverged step
            return float("inf")

    curve, times = [(0, full_loss(params))], []
    put = lambda a: cc.backends.asarray(backend, a)  # noqa: E731
    for t in range(1, p["updates"] + 1):
        idx = batch_rng.integers(0, len(X), 64)
        extra = {}
        if getattr(opt, "needs_refresh", None) is not None and opt.needs_refresh(state):
            extra["cov_batch"] = put(X[cov_rng.choice(len(X), 200, replace=False)])
        xb, yb = put(X[idx]), put(targets[idx])
        t0 = time.perf_counter()
        try:
            params, state, _ = opt.step(model, loss, params, state, xb, yb, **extra)
        except (ValueError, FloatingPointError):  # a diverged run (grid): the model refuses NaN params
            curve.append((t, float("inf")))
            break
        cc.backends.block_until_ready(params)
        times.append(time.perf_counter() - t0)
        if t % every == 0 or t == p["updates"]:
            curve.append((t, full_loss(params)))
            if not np.isfinite(curve[-1][1]):
                break
    if not times:
        times = [float("nan")]
    out = {"curve": curve, "train_loss": curve[-1][1], "step_ms": 1e3 * float(np.median(times))}
    if p["loss"] == "ce":
        logits = cc.backends.to_numpy(model.forward(params, dev["Xte"]))
        out["test_acc"] = float(np.mean(np.argmax(logits, 1) == data["yte"]))
    return out


def grid(problem: str, data: dict, backend: str) -> dict:
    """Best setting per method on seed 0 (the spec's grids)."""
    best = {}
    for label, (cls, grid_kw) in GRIDS.items():
        scores = []
        for kw in grid_kw:
            r = run_one(problem, cls, kw, 0, data, backend, PROBLEMS[problem]["updates"])
            scores.append((r["train_loss"] if np.isfinite(r["train_loss"]) else np.inf, kw))
            print(f"  grid {problem} {label} {kw}: {r['train_loss']:.4g}", flush=True)
        best[label] = min(scores, key=lambda s: s[0])
    return best


def plot(problem: str, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, runs) in enumerate(results.items()):
        for j, r in enumerate(runs):
            t, v = zip(*r["curve"])
            ax.plot(t, v, color=f"C{i}", alpha=0.85, lw=1.2, label=label if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("updates")
    ax.set_ylabel("full training-set loss")
    ax.set_title(f"digits {PROBLEMS[problem]['title']} (3 seeds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, f"acp_digits_{problem}.png", dpi=110)


def table(data: dict) -> str:
    results, settings = data["results"], data["settings"]
    lines = [f"{caption(data, NAME)} NumPy, float64; the times are noisy.", "",
             "| problem | method | settings | train loss, seeds 0, 1, 2 | test acc | ms/step | step / SGD step |",
             "|---|---|---|---|---|---|---|"]
    for problem, res in results.items():
        sgd = np.median([r["step_ms"] for r in res["SGD"]])
        for label, runs in res.items():
            losses = ", ".join(f"{r['train_loss']:.4g}" for r in runs)
            acc = ", ".join(f"{r['test_acc']:.3f}" for r in runs) if "test_acc" in runs[0] else ""
            ms = np.median([r["step_ms"] for r in runs])
            lines.append(f"| {problem} | {label} | {settings[problem][label]} | {losses} | {acc} | {ms:.2f} | "
                         f"{ms / sgd:.2f} |")
    return "\n".join(lines)


def acceptance(results: dict) -> list[str]:
    """The spec §7 acceptance criteria, evaluated."""
    ae, clf = results["ae"], results["clf"]
    mean = lambda runs: float(np.mean([r["train_loss"] for r in runs]))  # noqa: E731
    sgd_ae, cgd_ae = mean(ae["SGD"]), mean(ae["centered GD"])
    best_sgd_clf = min(r["train_loss"] for r in clf["SGD"])
    ms = lambda runs: float(np.median([r["step_ms"] for r in runs]))  # noqa: E731
    checks = [
        ("AE: ACP alpha=1 <= 0.5 x SGD", mean(ae["ACP alpha=1"]) <= 0.5 * sgd_ae),
        ("AE: ACP adaptive <= 0.5 x SGD", mean(ae["ACP adaptive"]) <= 0.5 * sgd_ae),
        ("AE: ACP (both) < centered GD", max(mean(ae["ACP alpha=1"]), mean(ae["ACP adaptive"])) < cgd_ae),
        ("AE: centered GD < SGD", cgd_ae < sgd_ae),
        ("no run diverges", all(np.isfinite(r["train_loss"]) for res in results.values() for runs in res.values()
                                for r in runs)),
        ("clf: ACP defaults < 0.5 x best SGD train loss",
         max(r["train_loss"] for r in clf["ACP defaults"]) < 0.5 * best_sgd_clf),
        ("clf: ACP defaults >= 97 % test accuracy", min(r["test_acc"] for r in clf["ACP defaults"]) >= 0.97),
        ("AE: ACP (N=100) step <= 3 x SGD step", ms(ae["ACP alpha=1"]) <= 3 * ms(ae["SGD"])),
    ]
    return [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks]


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--grid", action="store_true", help="rerun the spec's grids on seed 0 first (slow)")


def run(args) -> dict:
    data = load(args.backend)
    settings = {pb: {label: dict(kw) for label, _, kw in s} for pb, s in SETTINGS.items()}
    classes = {pb: {label: cls for label, cls, _ in s} for pb, s in SETTINGS.items()}
    if args.grid:
        for pb in PROBLEMS:
            for label, (score, kw) in grid(pb, data, args.backend).items():
                print(f"best {pb} {label}: {kw} -> {score:.4g}")
                settings[pb][label] = kw
    results: dict = {}
    t0 = time.time()
    for pb in PROBLEMS:
        results[pb] = {}
        for label, kw in settings[pb].items():
            results[pb][label] = [run_one(pb, classes[pb][label], kw, seed, data, args.backend,
                                          50 if pb == "ae" else 10) for seed in (0, 1, 2)]
            r = results[pb][label]
            print(f"{pb} {label}: {[round(q['train_loss'], 4) for q in r]} ({time.time() - t0:.0f} s)", flush=True)
        plot(pb, results[pb])
    return {"backend": args.backend, "settings": settings, "results": results}


def render(data: dict) -> dict[str, str]:
    return {"": table(data) + "\n\nAcceptance criteria:\n\n" + "\n".join(acceptance(data["results"]))}


if __name__ == "__main__":
    main(sys.modules[__name__])
