"""Digits reproduction for ESN and MK, with SGD beside (protocol in docs/methods/esn_mk.md).

Data: ``sklearn.datasets.load_digits``, X/16, ``train_test_split(test_size=0.2,
random_state=0, stratify=y)`` (1437/360). Nets: ESN {64, 64, 32, 10} and the MK-paper
analogue {64, 128, 64, 32, 10}; leaky ReLU (slope 0.01) hidden layers, linear output,
He init (``N(0, 2/n_in)``, seed 0); MSE on one-hot targets and cross-entropy. Online
(B = 1) runs for 3 epochs at constant lr, B = 32 runs for 10 epochs; the same sample
order (seed 0) for every method. NumPy backend, float64.

Writes ``docs/img/esn_mk_digits.png`` (full training loss vs epoch and vs training wall
time), ``docs/experiments/results/esn_mk_digits.json`` and the tables
``results/esn_mk_digits.md`` (test accuracy, final training loss, wall time) and
``results/esn_mk_digits_cost.md`` (ms per step); see docs/experiments/README.md.

Run from the repository root: ``python docs/experiments/esn_mk_digits.py`` (about 3-5
minutes on 2 CPU cores); ``--epochs 1`` for a quick look.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _common import caption, main, pyplot, savefig

import curvcore as cc

NAME = "esn_mk_digits"  # main() runs it with one BLAS thread: threads only added overhead (30x on 2 busy cores)
NETS = {"ESN net": [64, 64, 32, 10], "MK net": [64, 128, 64, 32, 10]}
# (label, factory, lr, batch, epochs); epochs None = the online setting's --epochs
ROWS = [
    ("SGD lr 0.01", lambda: cc.SGD(lr=0.01), 1, None),
    ("ESN defaults (randomized, δ=1, lam auto) lr 0.01", lambda: cc.ESN(lr=0.01), 1, None),
    ("MK mu=1, lam auto, lr 0.01", lambda: cc.MK(lr=0.01), 1, None),
    ("MK mu=0 (paper), lr 0.003", lambda: cc.MK(lr=0.003, mu=0.0), 1, None),
    ("MK mu=0, lr 0.01", lambda: cc.MK(lr=0.01, mu=0.0), 1, None),
    ("ESN newton, lr 0.01", lambda: cc.ESN(lr=0.01, variant="newton"), 1, None),
    ("ESN randomized lr 0.03", lambda: cc.ESN(lr=0.03), 1, None),
    ("ESN randomized lr 0.1", lambda: cc.ESN(lr=0.1), 1, None),
    ("ESN reg_grad=True, lr 0.01", lambda: cc.ESN(lr=0.01, reg_grad=True), 1, None),
    ("MK reg_grad=True, lr 0.01", lambda: cc.MK(lr=0.01, reg_grad=True), 1, None),
    ("B=32, 10 epochs: SGD lr 0.1", lambda: cc.SGD(lr=0.1), 32, 10),
    ("B=32, 10 epochs: ESN lr 0.1", lambda: cc.ESN(lr=0.1), 32, 10),
    ("B=32, 10 epochs: MK mu=1 lr 0.1", lambda: cc.MK(lr=0.1), 32, 10),
]
# reference table ({64,64,32,10}, 3 epochs online unless stated): (MSE, CE); None = not given
REFERENCE = {
    "SGD lr 0.01": (0.936, 0.969),
    "ESN defaults (randomized, δ=1, lam auto) lr 0.01": (0.878, 0.919),
    "MK mu=1, lam auto, lr 0.01": (0.919, 0.933),
    "MK mu=0 (paper), lr 0.003": (0.867, "diverges (inf) epoch 2"),
    "MK mu=0, lr 0.01": ("diverges", "inf"),
    "ESN newton, lr 0.01": ("≈0.14", "inf"),
    "ESN randomized lr 0.03": ("diverges", None),
    "ESN randomized lr 0.1": ("diverges", None),
    "ESN reg_grad=True, lr 0.01": ("≈0.2", "0.09–0.17"),
    "MK reg_grad=True, lr 0.01": ("≈0.2", "0.09–0.17"),
    "B=32, 10 epochs: SGD lr 0.1": (0.892, 0.964),
    "B=32, 10 epochs: ESN lr 0.1": (0.892, 0.969),
    "B=32, 10 epochs: MK mu=1 lr 0.1": (0.906, 0.947),
}


def load() -> tuple[np.ndarray, ...]:
    """The reference split: X/16, stratified 80/20, random_state 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    return train_test_split(data.data / 16.0, data.target, test_size=0.2, random_state=0, stratify=data.target)


def run_one(label: str, factory, sizes: list[int], loss_name: str, batch: int, epochs: int, data) -> dict:
    """Train one configuration; returns the per-epoch history and the final numbers."""
    x_tr, x_te, y_tr, y_te = data
    t_tr = np.eye(10)[y_tr] if loss_name == "mse" else y_tr
    loss = cc.losses.get(loss_name)
    model, params = cc.backends.mlp("numpy", sizes, activation="leaky_relu", init="he", seed=0)
    opt = factory()
    opt.validate = False  # speed (no NaN checks per step); divergence is detected per epoch below
    state = opt.init(params)
    rng = np.random.default_rng(0)

    def evaluate(p):
        train = float(loss.value(model.forward(p, x_tr), t_tr))
        acc = float(np.mean(np.argmax(model.forward(p, x_te), 1) == y_te))
        return train, acc

    hist = {"epoch": [0], "wall": [0.0], "loss": [], "acc": []}
    tl, acc = evaluate(params)
    hist["loss"].append(tl)
    hist["acc"].append(acc)
    wall, steps, status = 0.0, 0, "ok"
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_tr))
        t0 = time.perf_counter()
        try:
            with np.errstate(all="ignore"):
                for s in range(0, len(order) - batch + 1, batch):
                    idx = order[s:s + batch]
                    params, state, _ = opt.step(model, loss, params, state, x_tr[idx], t_tr[idx])
                    steps += 1
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
            status = f"error epoch {epoch} (step {steps}): {type(err).__name__}: {str(err)[:60]}"
            break
        finally:
            wall += time.perf_counter() - t0
        with np.errstate(all="ignore"):
            tl, acc = evaluate(params)
        if not np.isfinite(tl):
            status = f"diverges (loss {tl}) epoch {epoch}"
            break
        for key, val in (("epoch", epoch), ("wall", wall), ("loss", tl), ("acc", acc)):
            hist[key].append(val)
    return {"label": label, "sizes": sizes, "loss": loss_name, "batch": batch, "epochs": epochs, "status": status,
            "history": hist, "acc": hist["acc"][-1] if status == "ok" else None,
            "train_loss": hist["loss"][-1] if status == "ok" else None, "wall": wall,
            "ms_per_step": 1e3 * wall / max(1, steps)}


def cell(r: dict) -> str:
    """One table cell; a run whose final loss exceeds 10x its initial loss is marked as diverged."""
    if r["status"] != "ok":
        return r["status"].replace("|", "/")
    text = f"{r['acc']:.3f} (loss {r['train_loss']:.3g}, {r['wall']:.0f} s)"
    return f"diverged: {text}" if r["train_loss"] > 10 * r["history"]["loss"][0] else text


def ref_cell(label: str, loss_name: str) -> str:
    v = REFERENCE.get(label, (None, None))[0 if loss_name == "mse" else 1]
    return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(data: dict) -> str:
    runs = data["runs"]
    online_epochs = next(r["epochs"] for r in runs if r["batch"] == 1)
    by = {(r["label"], tuple(r["sizes"]), r["loss"]): r for r in runs}
    head = ("| setting | ref. MSE | ESN net MSE | MK net MSE | ref. CE | ESN net CE | MK net CE |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for label, _, _, _ in ROWS:
        cells = [label.replace("|", "/"), ref_cell(label, "mse")]
        cells += [cell(by[(label, tuple(s), "mse")]) for s in NETS.values()]
        cells += [ref_cell(label, "ce")]
        cells += [cell(by[(label, tuple(s), "ce")]) for s in NETS.values()]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"{caption(data, NAME)} Test accuracy after {online_epochs} online epochs (B = 1) or 10 epochs "
            "(B = 32), with the final full training loss and the training wall time (NumPy, float64). "
            "Ref. columns: the reference runs on {64,64,32,10}.")
    return note + "\n\n" + "\n".join(lines)


COST_ROWS = {"SGD": "SGD lr 0.01", "MK": "MK mu=1, lam auto, lr 0.01",
             "ESN randomized": "ESN defaults (randomized, δ=1, lam auto) lr 0.01"}


def cost_table(data: dict) -> str:
    """Mean wall time per step of the online (B = 1) MSE runs."""
    by = {(r["label"], tuple(r["sizes"]), r["loss"]): r for r in data["runs"]}
    lines = ["| net | " + " | ".join(COST_ROWS) + " |", "|---" * (len(COST_ROWS) + 1) + "|"]
    for sizes in NETS.values():
        cells = [f"{by[(label, tuple(sizes), 'mse')]['ms_per_step']:.1f} ms/step" for label in COST_ROWS.values()]
        lines.append(f"| {{{','.join(map(str, sizes))}}} | " + " | ".join(cells) + " |")
    return f"{caption(data, NAME)} Online B = 1, MSE, mean wall time per step.\n\n" + "\n".join(lines)


def render(data: dict) -> dict[str, str]:
    return {"": table(data), "_cost": cost_table(data)}


def plot(runs: list[dict]) -> None:
    plt = pyplot()
    combos = [(n, s, loss) for loss in ("mse", "ce") for n, s in NETS.items()]
    fig, axes = plt.subplots(len(combos), 2, figsize=(13, 4.0 * len(combos)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (net, sizes, loss_name) in enumerate(combos):
        sel = [r for r in runs if r["sizes"] == sizes and r["loss"] == loss_name]
        for i, r in enumerate(sel):
            h = r["history"]
            style = "--" if r["batch"] > 1 else "-"
            kw = {"ls": style, "marker": "o", "ms": 3, "color": colors[i % len(colors)], "label": r["label"]}
            axes[row, 0].plot(h["epoch"], h["loss"], **kw)
            axes[row, 1].plot(h["wall"], h["loss"], **kw)
        start = max(r["history"]["loss"][0] for r in sel)
        low = min(v for r in sel for v in r["history"]["loss"] if 0 < v < np.inf)
        for ax, xlabel in zip(axes[row], ("epoch", "training wall time (s)")):
            ax.set_yscale("log")
            ax.set_ylim(low / 2, 10 * start)  # diverging runs leave the plot at the top
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"full training {loss_name.upper()} loss")
            ax.set_title(f"{net} {sizes}, {loss_name.upper()}")
            ax.grid(True, alpha=0.3)
        axes[row, 1].legend(fontsize=7, loc="upper right")
    fig.suptitle("digits, leaky ReLU, He init; solid: online B=1; dashed: B=32 (10 epochs); "
                 "diverging runs leave the top of the plot or stop (non-finite loss / error)")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    savefig(fig, "esn_mk_digits.png", dpi=90)


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=3, help="online epochs (reference: 3)")


def run(args) -> dict:
    data = load()
    runs = []
    for loss_name in ("mse", "ce"):
        for net, sizes in NETS.items():
            for label, factory, batch, epochs in ROWS:
                r = run_one(label, factory, sizes, loss_name, batch, epochs or args.epochs, data)
                runs.append(r)
                print(f"{net:8s} {loss_name:3s} {label:52s} {cell(r)}  [{r['ms_per_step']:.2f} ms/step]", flush=True)
    plot(runs)
    return {"runs": runs}


if __name__ == "__main__":
    main(sys.modules[__name__])
