"""Tuned comparison: every registered method on the digits MLP and the digits CNN, each at its best grid point.

Setup: what ``curvcore compare --tune`` does, over more seeds. For each model
(``--model mlp``: tanh MLP 64-32-10, NumPy; ``--model cnn``: the digits CNN of
``cc.backends.cnn``, Conv2d(1, 4, 3) -> ReLU -> MaxPool -> Linear, torch, as
(B, 1, 8, 8) images), cross-entropy, batch 64, float64, one thread:

1. tuning on seed 0: every point of the method's registered grid
   (``MethodSpec.grid()``, at most 12 points) trains on 80% of the training
   set; the point with the lowest loss on the other 20% (the validation split,
   stratified) is kept. The test set is never used for the choice.
2. evaluation: the kept point trains on the whole training set from seeds
   0..4 (initial weights and batch order); reported: test accuracy and test
   loss, mean ± standard deviation over the seeds (and the training loss).

Writes results/tuned.json, results/tuned_mlp.md, results/tuned_cnn.md and
results/tuned_grid.md. Run: ``python docs/experiments/tuned.py`` (30 min
wall on the loaded 2-core machine; the pseudo-Hessian's CNN steps, on torch's
nested-JVP jets, take most of it).
"""

from __future__ import annotations

import sys

import numpy as np
from _common import caption, main

from curvcore import backends, cli
from curvcore.data import digits

NAME = "tuned"
SEEDS = (0, 1, 2, 3, 4)
MODELS = {"mlp": {"backend": "numpy", "epochs": 5}, "cnn": {"backend": "torch", "epochs": 5}}
BATCH = 64


def add_arguments(parser) -> None:
    parser.add_argument("--methods", default="all", help="comma-separated method names (default: all)")
    parser.add_argument("--models", default="mlp,cnn", help="mlp, cnn or both")


def compare_args(model: str, seed: int) -> object:
    """The ``curvcore compare`` arguments of one run of ``model`` on ``seed``."""
    setup = MODELS[model]
    return cli.build_parser().parse_args(
        ["compare", "--model", model, "--backend", setup["backend"], "--epochs", str(setup["epochs"]),
         "--batch-size", str(BATCH), "--seed", str(seed), "--quiet"])


def summary(run: dict) -> dict:
    """The numbers of one finished run that the tables need."""
    if "error" in run:
        return {"error": run["error"]}
    return {k: run[k] for k in ("train_loss", "test_loss", "test_acc", "step_ms", "preconditioned")}


def run_method(method: str, model: str, split) -> dict:
    """Tune ``method`` on seed 0, then train the chosen point on every seed."""
    tuned = cli.tune_one(method, MODELS[model]["backend"], compare_args(model, SEEDS[0]), split)
    out = {"tuning": tuned.get("tuning"), "seeds": {SEEDS[0]: summary(tuned)}}
    if "error" in tuned:
        return out
    chosen = tuned["tuning"]["chosen"]
    for seed in SEEDS[1:]:
        run = cli.train_one(method, MODELS[model]["backend"], compare_args(model, seed), split, overrides=chosen)
        out["seeds"][seed] = summary(run)
    print(f"{model} {method}: {cli.format_setting(chosen)}, test acc "
          f"{[round(s.get('test_acc', float('nan')), 3) for s in out['seeds'].values()]}", file=sys.stderr)
    return out


def run(args) -> dict:
    backends.set_torch_threads(1)
    split = digits(seed=0)
    methods = cli._parse_methods(args.methods)
    results = {}
    for model in args.models.split(","):
        results[model] = {m: run_method(m, model, split) for m in methods}
    return {"setup": {"seeds": list(SEEDS), "batch": BATCH, "models": MODELS,
                      "validation": cli.VALIDATION}, "results": results}


def _mean_std(values: list, fmt: str) -> str:
    return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}" if values else "n/a"


NETS = {"mlp": "tanh MLP 64-32-10 (NumPy)", "cnn": "digits CNN conv3x3(4)-ReLU-maxpool-linear (torch)"}


def model_table(data: dict, model: str) -> str:
    setup, runs = data["setup"], data["results"][model]
    lines = [f"{caption(data, NAME)} {NETS[model]}, {setup['models'][model]['epochs']} epochs, batch "
             f"{setup['batch']}, float64. Grid point chosen by validation loss on seed 0; mean ± std over seeds "
             f"{', '.join(map(str, setup['seeds']))}. †: a chosen value is at an end of a grid axis of 3 or more values.", "",
             "| method | chosen setting | test accuracy | test loss | training loss | preconditioned |",
             "|---|---|---|---|---|---|"]
    for name, m in sorted(runs.items(), key=lambda kv: -_mean(kv[1], "test_acc")):
        ok = [s for s in m["seeds"].values() if "error" not in s]
        chosen = "none (all failed)"
        if m["tuning"] and "chosen" in m["tuning"]:
            chosen = cli.format_setting(m["tuning"]["chosen"]) + " †" * at_edge(m["tuning"])
        failed = len(m["seeds"]) - len(ok)
        note = f" ({failed} of {len(m['seeds'])} seeds failed)" if failed else ""
        lines.append(f"| `{name}` | {chosen} | {_mean_std([s['test_acc'] for s in ok], '.3f')}{note} | "
                     f"{_mean_std([s['test_loss'] for s in ok], '.3f')} | "
                     f"{_mean_std([s['train_loss'] for s in ok], '.3f')} | "
                     f"{ok[0]['preconditioned'] if ok else ''} |")
    return "\n".join(lines)


def at_edge(tuning: dict) -> bool:
    """Whether a chosen value of a knob with 3 or more grid values is its smallest or largest (the best may lie outside)."""
    for key, value in tuning["chosen"].items():
        tried = sorted({t["point"][key] for t in tuning["trials"]})
        if len(tried) > 2 and value in (tried[0], tried[-1]):
            return True
    return False


def _mean(m: dict, key: str) -> float:
    values = [s[key] for s in m["seeds"].values() if "error" not in s]
    return float(np.mean(values)) if values else -np.inf


def grid_table(data: dict) -> str:
    lines = [f"{caption(data, NAME)} Validation loss of every grid point (seed 0; inf: diverged or failed); "
             "the chosen point in bold.", "", "| model | method | grid point: validation loss |", "|---|---|---|"]
    for model, runs in data["results"].items():
        for name, m in runs.items():
            chosen = (m["tuning"] or {}).get("chosen")
            cells = []
            for t in (m["tuning"] or {}).get("trials", []):
                loss = t["val_loss"] if t.get("val_loss") is not None and "error" not in t else float("inf")
                cell = f"{cli.format_setting(t['point'])}: {loss:.3g}"
                cells.append(f"**{cell}**" if t["point"] == chosen else cell)
            lines.append(f"| {model} | `{name}` | {'; '.join(cells)} |")
    return "\n".join(lines)


def render(data: dict) -> dict[str, str]:
    tables = {f"_{model}": model_table(data, model) for model in data["results"]}
    return {**tables, "_grid": grid_table(data)}


if __name__ == "__main__":
    main(sys.modules[__name__])
