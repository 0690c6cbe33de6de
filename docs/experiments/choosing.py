"""Choosing a method: cost per step, steps to a target loss and memory of every registered method on digits.

Setup (what ``curvcore compare`` trains): scikit-learn digits through
``curvcore.data.digits()`` (standardised, stratified 80/20 split, 1437 training
images), tanh MLP 64-32-10 (``cc.backends.mlp("numpy", ...)``), cross-entropy,
batch 64 (the last partial batch dropped), NumPy, float64, one thread. Each
method is built from the registry, ``cc.get_method(name).make(**setting)``, and
stepped with ``opt.step``; ``validate = False`` as in the benchmarks. Methods
with ``needs_refresh`` (ACP) get 200 random training images as ``cov_batch``
at refresh steps, as ``curvcore compare`` does.

Tuning, the same for every method: one knob (``lr``; CurveBall's initial
``lam``; the pseudo-Hessian's cubic ``lam``), three values a factor 3 apart
around the registered ``compare`` setting, each trained for EPOCHS epochs on
tuning seed 0. The value that reaches the lower target loss in the fewest
steps (then: the lowest final loss) is kept; while it is at an end of the
values tried, one more value a factor 3 further is tried (at most MAX_EXTRA).
Evaluation: the kept settings on seeds 1, 2, 3 (initial weights and batch
order).

Reported per method: CPU time per step (amortised over 20 consecutive steps, so
ACP's refresh every 20 steps and CurveBall's lam step every 5 are included;
minimum over 10 rounds interleaved across the methods) and its ratio to SGD's;
steps and CPU time to reach each target full-training-set loss (median and
range over the seeds); final training loss and test accuracy; the method
state's size; the peak memory allocated during the first 20 steps (Python's
``tracemalloc``, which sees NumPy's allocations).

Writes results/choosing.{json,md}, results/choosing_tuning.md and
docs/img/choosing.png (see docs/experiments/README.md). Run:
``python docs/experiments/choosing.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import sys
import time
import tracemalloc

import numpy as np
from _common import caption, interleaved_min, main, pyplot, savefig

import curvcore as cc
from curvcore.data import digits

NAME = "choosing"
SIZES = [64, 32, 10]
BATCH, EPOCHS = 64, 10
TUNE_SEED, SEEDS = 0, (1, 2, 3)
TARGETS = (0.1, 0.03)  # full training-set cross-entropy
CYCLE = 20  # steps per timed call and per memory window: one ACP refresh period (compare: refresh_every=20)
STEP, MAX_EXTRA = 3.0, 3  # tuning: values a factor STEP apart; at most MAX_EXTRA beyond the first three
KNOBS = {"curveball": "lam", "pseudo_hessian": "lam"}  # the tuned keyword; "lr" for the others


def knob(name: str) -> tuple[str, float]:
    """The tuned keyword of method ``name`` and its value in the registered compare setting."""
    key = KNOBS.get(name, "lr")
    return key, float(getattr(cc.get_method(name).make(), key))


def scaled(value: float, power: int) -> float:
    return float(f"{value * STEP ** power:.3g}")


def batch_order(n: int, seed: int) -> list[np.ndarray]:
    """Index batches of EPOCHS epochs: a fresh permutation per epoch, the last partial batch dropped."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(EPOCHS):
        order = rng.permutation(n)
        out += [order[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    return out


class Run:
    """One method on one seed: the model, its params and state, and the step with ``cov_batch`` handling."""

    def __init__(self, name: str, setting: dict, seed: int, split):
        self.split, self.loss = split, cc.losses.CrossEntropy()
        self.model, self.params = cc.backends.mlp("numpy", SIZES, activation="tanh", seed=seed)
        self.opt = cc.get_method(name).make(**setting)
        self.opt.validate = False
        self.state = self.opt.init(self.params)
        self.cov_rng = np.random.default_rng([seed, 1])

    def step(self, idx: np.ndarray) -> None:
        x, y = self.split.x_train, self.split.y_train
        kw = {}
        if getattr(self.opt, "needs_refresh", None) is not None and self.opt.needs_refresh(self.state):
            kw["cov_batch"] = x[self.cov_rng.choice(len(x), 200, replace=False)]
        self.params, self.state, _ = self.opt.step(self.model, self.loss, self.params, self.state, x[idx], y[idx],
                                                   **kw)

    def train_loss(self) -> float:
        with np.errstate(all="ignore"):
            value = float(self.loss.value(self.model.forward(self.params, self.split.x_train), self.split.y_train))
        return value if np.isfinite(value) else float("inf")

    def test_acc(self) -> float:
        logits = self.model.forward(self.params, self.split.x_test)
        return float(np.mean(np.argmax(logits, axis=1) == self.split.y_test))


def nbytes(tree) -> int:
    """Bytes held by the arrays of a state (NamedTuples, lists, arrays)."""
    if isinstance(tree, (np.ndarray, np.generic)):
        return tree.nbytes
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(t) for t in tree)
    return 0


def train(name: str, setting: dict, seed: int, split) -> tuple[dict, Run]:
    """EPOCHS epochs; the full training loss after every step."""
    run = Run(name, setting, seed, split)
    curve = [run.train_loss()]
    for idx in batch_order(len(split.x_train), seed):
        try:
            with np.errstate(all="ignore"):
                run.step(idx)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            curve.append(float("inf"))
            break
        curve.append(run.train_loss())
        if curve[-1] == float("inf"):
            break
    return {"seed": seed, "curve": [float(f"{v:.5g}") for v in curve], "test_acc": run.test_acc()}, run


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step after which the training loss is <= target (None: never)."""
    return next((k for k, v in enumerate(curve) if v <= target), None)


def tune_key(result: dict) -> tuple:
    hit = steps_to(result["curve"], TARGETS[-1])
    return (hit if hit is not None else np.inf, result["curve"][-1])


def peak_memory(name: str, setting: dict, split) -> int:
    """Peak bytes allocated (tracemalloc) over the first CYCLE steps from ``init``, beyond what was held before."""
    order = batch_order(len(split.x_train), TUNE_SEED)[:CYCLE]
    run = Run(name, setting, TUNE_SEED, split)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for idx in order:
            run.step(idx)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def run(args) -> dict:
    split = digits(seed=0)
    names = ["sgd", *[n for n in cc.method_names() if n != "sgd"]]
    out: dict = {"methods": {}}
    t0 = time.perf_counter()
    final_runs = {}
    for name in names:
        base = cc.get_method(name).compare
        key, value = knob(name)
        powers = [-1, 0, 1]
        tried = {p: train(name, {**base, key: scaled(value, p)}, TUNE_SEED, split)[0] for p in powers}
        for _ in range(MAX_EXTRA):
            best = min(tried, key=lambda p: tune_key(tried[p]))
            if min(tried) < best < max(tried):
                break
            p = best + (1 if best == max(tried) else -1)
            tried[p] = train(name, {**base, key: scaled(value, p)}, TUNE_SEED, split)[0]
        tuning = [{"value": scaled(value, p), **tried[p]} for p in sorted(tried)]
        best = min(tuning, key=tune_key)
        setting = {**base, key: best["value"]}
        seeds = []
        for seed in SEEDS:
            result, final_runs[name] = train(name, setting, seed, split)
            seeds.append(result)
        out["methods"][name] = {
            "class": cc.get_method(name).cls.__name__, "knob": key, "setting": setting,
            "tuning": [{"value": t["value"], "steps_to_target": steps_to(t["curve"], TARGETS[-1]),
                        "final_loss": t["curve"][-1]} for t in tuning],
            "seeds": seeds, "state_bytes": nbytes(final_runs[name].state),
            "peak_bytes_first_cycle": peak_memory(name, setting, split),
        }
        print(f"{name:15s} {key}={best['value']:<8g} final losses {[s['curve'][-1] for s in seeds]} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # CPU time per step: CYCLE consecutive steps from each method's final state (last seed), interleaved
    cycle = batch_order(len(split.x_train), SEEDS[-1])[:CYCLE]

    def cycle_call(r: Run):
        params, state = r.params, r.state

        def call():
            r.params, r.state = params, state
            for idx in cycle:
                r.step(idx)
        return call

    times = interleaved_min({name: cycle_call(r) for name, r in final_runs.items()}, repeats=10)
    for name, t in times.items():
        out["methods"][name]["cpu_s_per_step"] = t / CYCLE
    out["params_bytes"] = nbytes(final_runs["sgd"].params)
    out["setup"] = {"sizes": SIZES, "batch": BATCH, "epochs": EPOCHS, "steps": len(batch_order(len(split.x_train), 0)),
                    "tune_seed": TUNE_SEED, "seeds": list(SEEDS), "targets": list(TARGETS), "cycle": CYCLE}
    plot(out)
    return out


def _range(values: list, fmt: str) -> str:
    """``median (min-max)`` of the non-None values, with ``(k/n)`` when some are None."""
    ok = [v for v in values if v is not None]
    if not ok:
        return "not reached"
    text = format(float(np.median(ok)), fmt)
    if min(ok) != max(ok):
        text += f" ({format(min(ok), fmt)}–{format(max(ok), fmt)})"
    return text + (f" ({len(ok)}/{len(values)} seeds)" if len(ok) < len(values) else "")


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}" if n >= 103 else f"{n} bytes"


def _setting(m: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in m["setting"].items())


def render(data: dict) -> dict[str, str]:
    setup, methods = data["setup"], data["methods"]
    sgd = methods["sgd"]["cpu_s_per_step"]
    lo, hi = setup["targets"]
    head = (f"| method | setting (tuned: first keyword) | step / SGD step | CPU ms / step | steps to loss ≤ {lo:g} | "
            f"steps to ≤ {hi:g} | CPU ms to ≤ {hi:g} | train loss after {setup['steps']} steps | test acc | "
            "state (KiB) | peak memory, first 20 steps (KiB) |")
    lines = [f"{caption(data, NAME)} Median (range) over seeds {', '.join(map(str, setup['seeds']))}.", "", head,
             "|---" * 11 + "|"]
    for name, m in methods.items():
        ms = 1e3 * m["cpu_s_per_step"]
        first = [steps_to(s["curve"], lo) for s in m["seeds"]]
        second = [steps_to(s["curve"], hi) for s in m["seeds"]]
        to_ms = [None if k is None else k * ms for k in second]
        setting = f"{m['knob']}={m['setting'][m['knob']]:g}" + "".join(
            f", {k}={v}" for k, v in m["setting"].items() if k != m["knob"])
        lines.append(
            f"| `{name}` | {setting} | {m['cpu_s_per_step'] / sgd:.2f} | {ms:.2f} | {_range(first, '.0f')} | "
            f"{_range(second, '.0f')} | {_range(to_ms, '.0f')} | {_range([s['curve'][-1] for s in m['seeds']], '.3f')} | "
            f"{_range([s['test_acc'] for s in m['seeds']], '.3f')} | {_kib(m['state_bytes'])} | "
            f"{m['peak_bytes_first_cycle'] / 1024:.0f} |")
    lines += ["", f"The params take {data['params_bytes'] / 1024:.1f} KiB."]
    tune = [f"{caption(data, NAME)} Tuning seed {setup['tune_seed']}, {setup['steps']} steps: steps to training "
            f"loss ≤ {hi:g}, or the final loss when the target was not reached (inf: diverged).", "",
            "| method | knob | tried: steps to target (or final loss) | kept |", "|---|---|---|---|"]
    for name, m in methods.items():
        tried = "; ".join(f"{t['value']:g}: " + (f"{t['steps_to_target']} steps" if t["steps_to_target"] is not None
                                                 else f"loss {t['final_loss']:.3g}") for t in m["tuning"])
        kept = m["setting"][m["knob"]]
        edge = " (end of the range tried)" if kept in (m["tuning"][0]["value"], m["tuning"][-1]["value"]) else ""
        tune.append(f"| `{name}` | `{m['knob']}` | {tried} | {kept:g}{edge} |")
    return {"": "\n".join(lines), "_tuning": "\n".join(tune)}


def plot(data: dict) -> None:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, (name, m) in enumerate(data["methods"].items()):
        n = min(len(s["curve"]) for s in m["seeds"])
        curves = np.array([s["curve"][:n] for s in m["seeds"]])
        style = {"ls": "--" if name in ("sgd", "adam") else "-", "color": f"C{i % 10}", "lw": 1.3}
        steps = np.arange(n)
        a1.plot(steps, np.median(curves, 0), label=f"{name} ({_setting(m)})", **style)
        a1.fill_between(steps, curves.min(0), curves.max(0), color=style["color"], alpha=0.12)
        a2.plot(steps * 1e3 * m["cpu_s_per_step"], np.median(curves, 0), **style)
    for target in data["setup"]["targets"]:
        for ax in (a1, a2):
            ax.axhline(target, color="k", ls=":", lw=0.8)
    a1.set_xlabel(f"step (batch {data['setup']['batch']})")
    a2.set_xlabel("steps x CPU ms per step")
    a2.set_xscale("log")
    for ax in (a1, a2):
        ax.set_yscale("log")
        ax.set_ylabel("full training-set cross-entropy")
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle("digits, MLP 64-32-10 tanh, batch 64, tuned settings: median and range over 3 seeds", fontsize=10)
    fig.tight_layout()
    savefig(fig, "choosing.png", dpi=100)


if __name__ == "__main__":
    main(sys.modules[__name__])
