"""Command line: ``curvcore compare`` trains an MLP or a CNN on digits with every registered method.

Example::

    curvcore compare                          # every method, NumPy backend
    curvcore compare --methods curveball,sgd --backend torch --epochs 10
    curvcore compare --model cnn --backend jax   # the digits CNN (flax), every method
    curvcore compare --tune                   # each method's grid, picked on a validation split
    curvcore compare --backend all            # same method on every backend, max param difference
    curvcore compare --list                   # registered methods
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backends, losses, tree
from .data import Split, digits, one_hot
from .methods import REGISTRY

BASELINES = ("sgd", "adam")
MODELS = ("mlp", "cnn")
CNN_BACKENDS = ("torch", "jax")  # backends with a digits CNN (cc.backends.cnn)
DIGITS_FEATURES = 64
VALIDATION = 0.2  # fraction of the training set held out by --tune


def _ordered_methods() -> list[str]:
    """Baselines first, then the curvature methods in registry order."""
    return [m for m in BASELINES if m in REGISTRY] + [m for m in REGISTRY if m not in BASELINES]


DEVICE = re.compile(r"(cpu|cuda|gpu|tpu|mps)(:[0-9]+)?")
INTERRUPTED = 130  # exit status after Ctrl-C (128 + SIGINT), as shells report it


def _parse_methods(text: str | None) -> list[str]:
    """Method names from ``a,b`` or ``all``; ``argparse.ArgumentTypeError`` names unknown ones."""
    if not text or text == "all":
        return _ordered_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in REGISTRY]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated method names from {', '.join(_ordered_methods())} or 'all', got {text!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return names


def _parse_backends(text: str) -> list[str]:
    """``[text]``, or every available backend for ``all``; the backend must be usable here."""
    if text == "all":
        return backends.names()
    if text not in backends.ALL:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(backends.ALL)} or 'all', got {text!r}")
    if not backends.available(text):
        raise argparse.ArgumentTypeError(
            f"expected a backend available here ({', '.join(backends.names())}) or 'all', got {text!r}")
    return [text]


def _validated(parse: Any) -> Any:
    """An argparse ``type`` that checks the text with ``parse`` and keeps the text."""
    def check(text: str) -> str:
        parse(text)
        return text

    return check


def _int_at_least(low: int) -> Any:
    """An argparse ``type``: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value: int | None = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _widths(text: str) -> list[int]:
    """Hidden widths ``64,32`` (empty: no hidden layer), each an integer >= 1."""
    try:
        widths: list[int] | None = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        widths = None
    if widths is None or min(widths, default=1) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1 (e.g. 64,32), got {text!r}")
    return widths


def _device(text: str) -> str:
    """A device name such as ``cpu``, ``cuda`` or ``cuda:1``."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a device like cpu, cuda or cuda:0, got {text!r}")
    return text


def _out_folder_problem(path: str) -> str | None:
    """Create the folder ``path`` and try writing a file there; what is wrong, or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"expected a folder, got {path!r}, which is a file"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        return f"expected a folder that can be created, got {path!r} ({err.strerror or err})"
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return f"expected a writable folder, got {path!r}: not writable ({err.strerror or err})"
    return None


def _check_against_data(args: argparse.Namespace, split: Split) -> None:
    """Checks that need the data, the model or the file system; argparse-style errors (exit status 2).

    Also resolves the default ``--backend``: ``numpy`` for the MLP, ``torch`` for the CNN.
    """
    if args.backend is None:
        args.backend = "torch" if args.model == "cnn" else "numpy"
    if args.model == "cnn" and not _backend_names(args):
        args.error(f"argument --backend: expected {' or '.join(CNN_BACKENDS)} (or 'all' with one of them "
                   f"available) with --model cnn, got {args.backend!r}")
    n = split.x_train.shape[0]
    if args.tune:
        n = validation_split(split, args.seed).x_train.shape[0]
    if args.batch_size > n:
        what = "the samples --tune trains each grid point on" if args.tune else "the digits training samples"
        args.error(f"argument --batch-size: expected at most {n} ({what}), got {str(args.batch_size)!r}")
    problem = _out_folder_problem(args.out)
    if problem:
        args.error(f"argument --out: {problem}")


def _step_function(opt: Any, model: Any, loss: Any, backend: str):
    """``opt.step`` bound to model and loss; ``jax.jit``-ed on the JAX backend."""
    if backend == "jax":
        from .backends import jax as jax_backend

        return jax_backend.jit_step(opt, model, loss)
    return lambda params, state, x, y, **kw: opt.step(model, loss, params, state, x, y, **kw)


def _evaluate(model: Any, loss: Any, params: Any, data: dict) -> tuple[float, float, float]:
    """Full training-set loss, test loss and test accuracy."""
    train_loss = float(loss.value(model.forward(params, data["x_train"]), data["y_train"]))
    logits = model.forward(params, data["x_test"])
    test_loss = float(loss.value(logits, data["y_test"]))
    acc = float(np.mean(np.argmax(backends.to_numpy(logits), axis=1) == data["labels_test"]))
    return train_loss, test_loss, acc


def _build(backend: str, args: argparse.Namespace) -> tuple[Any, Any, tuple[int, ...]]:
    """``(model, params, input shape)`` of ``args.model`` on ``backend`` (input shape without the batch axis)."""
    if args.model == "cnn":
        model, params = backends.cnn(backend, dtype=args.dtype, seed=args.seed, device=args.device)
        return model, params, (1, 8, 8) if backend == "torch" else (8, 8, 1)
    model, params = backends.mlp(backend, [DIGITS_FEATURES, *args.hidden, 10], activation=args.activation,
                                 dtype=args.dtype, seed=args.seed, device=args.device)
    return model, params, (DIGITS_FEATURES,)


def _numpy_params(params: Any, backend: str, args: argparse.Namespace) -> list[np.ndarray]:
    """The trained params as NumPy arrays, the flax CNN's in the torch layout (so backends compare)."""
    if args.model == "cnn":
        return backends.cnn_torch_layout(params)
    return [backends.to_numpy(p) for p in tree.flatten(params)[0]]


def _preconditioned(info: dict, params: Any) -> str:
    """``"k/n"`` params tensors preconditioned by a layer-wise method; ``"all"`` for the others."""
    if "n_preconditioned" not in info:
        return "all"
    return f"{int(float(info['n_preconditioned']))}/{len(tree.flatten(params)[0])}"


def train_one(method: str, backend: str, args: argparse.Namespace, split: Split, progress: Any = None,
              overrides: dict | None = None) -> dict:
    """Train one method (its compare settings updated by ``overrides``) on one backend on ``split``.

    Returns:
        the run: history, final training loss, test loss and accuracy (on ``split``'s test part),
        timings, the preconditioned params (``"k/n"`` or ``"all"``), or ``"error"``.
    """
    spec = REGISTRY[method]
    loss_name = args.loss
    if loss_name not in spec.losses:
        return {"method": method, "backend": backend, "error": f"{method} does not support loss {loss_name!r}"}
    model, params, shape = _build(backend, args)
    loss = losses.get(loss_name)

    def put(a: np.ndarray, features: bool = False) -> Any:
        a = a.reshape(-1, *shape) if features else a
        return backends.asarray(backend, a.astype(args.dtype) if a.dtype.kind == "f" else a, device=args.device)

    y_train = one_hot(split.y_train) if loss_name == "mse" else split.y_train
    y_test = one_hot(split.y_test) if loss_name == "mse" else split.y_test
    data = {"x_train": put(split.x_train, True), "y_train": put(y_train), "x_test": put(split.x_test, True),
            "y_test": put(y_test), "labels_test": split.y_test}
    try:
        opt = spec.make(**(overrides or {}))
    except (TypeError, ValueError) as err:  # a grid point the constructor refuses
        return {"method": method, "backend": backend, "error": f"{type(err).__name__}: {err}"}
    state = opt.init(params, model)
    step = _step_function(opt, model, loss, backend)
    rng = np.random.default_rng(args.seed)
    n, bs = split.x_train.shape[0], args.batch_size
    history: dict[str, list] = {"epoch": [0], "wall": [0.0], "train_loss": [], "test_loss": [], "test_acc": []}
    for key, val in zip(("train_loss", "test_loss", "test_acc"), _evaluate(model, loss, params, data)):
        history[key].append(val)
    step_times: list[float] = []
    wall, info = 0.0, {}
    try:
        for epoch in range(1, args.epochs + 1):
            order = rng.permutation(n)
            for start in range(0, n - bs + 1, bs):  # drop the last partial batch (static shapes for jit)
                idx = order[start:start + bs]
                kwargs = {}
                if getattr(opt, "needs_refresh", None) is not None and opt.needs_refresh(state):
                    kwargs["cov_batch"] = put(split.x_train[rng.choice(n, size=min(200, n), replace=False)], True)
                xb, yb = put(split.x_train[idx], True), put(y_train[idx])
                t0 = time.perf_counter()
                params, state, info = step(params, state, xb, yb, **kwargs)
                backends.block_until_ready(params)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                wall += dt
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(info['loss']):.4f}", refresh=False)
            tl, vl, acc = _evaluate(model, loss, params, data)
            for key, val in (("epoch", epoch), ("wall", wall), ("train_loss", tl), ("test_loss", vl),
                             ("test_acc", acc)):
                history[key].append(val)
            if not np.isfinite(tl):
                raise FloatingPointError(f"training loss became {tl}")
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
        return {"method": method, "backend": backend, "error": f"{type(err).__name__}: {err}", "history": history}
    except KeyboardInterrupt as err:
        err.history = history  # type: ignore[attr-defined]  # the epochs finished before Ctrl-C, for the report
        raise
    # the first step may include compilation (jax.jit); the median is robust to it
    return {
        "method": method, "backend": backend, "settings": repr(opt), "history": history,
        "train_loss": history["train_loss"][-1], "test_loss": history["test_loss"][-1],
        "test_acc": history["test_acc"][-1], "wall": wall, "steps": len(step_times),
        "step_ms": 1e3 * float(np.median(step_times)), "preconditioned": _preconditioned(info, params),
        "params": _numpy_params(params, backend, args),
    }


def validation_split(split: Split, seed: int = 0) -> Split:
    """The training part of ``split`` cut in two (stratified): training (80%) and validation as "test" (20%).

    The test set of ``split`` is not used.
    """
    from sklearn.model_selection import train_test_split

    x_tr, x_val, y_tr, y_val = train_test_split(split.x_train, split.y_train, test_size=VALIDATION,
                                                random_state=seed, stratify=split.y_train)
    return Split(x_tr, y_tr, x_val, y_val)


def tune_one(method: str, backend: str, args: argparse.Namespace, split: Split, progress: Any = None) -> dict:
    """Pick ``method``'s grid point by validation loss, then train on all of ``split``'s training set.

    Each point of ``MethodSpec.grid()`` trains on the training part of :func:`validation_split`;
    the point with the lowest validation loss (ties: higher validation accuracy) is kept; failed or
    diverged points are never kept. The returned run (test metrics of the retrained method) holds
    ``"tuning"``: the criterion, the chosen point and every trial.
    """
    held_out = validation_split(split, args.seed)
    trials = []
    for point in REGISTRY[method].grid():
        run = train_one(method, backend, args, held_out, progress, point)
        trials.append({"point": point, "val_loss": run.get("test_loss"), "val_acc": run.get("test_acc"),
                       **({"error": run["error"]} if "error" in run else {})})
    usable = [t for t in trials if "error" not in t and math.isfinite(t["val_loss"])]
    tuning = {"criterion": "lowest validation loss (ties: higher validation accuracy)",
              "validation": f"{VALIDATION:.0%} of the training set (stratified, seed {args.seed}); test set unused",
              "trials": trials}
    if not usable:
        return {"method": method, "backend": backend, "error": "every grid point failed or diverged",
                "tuning": tuning}
    best = min(usable, key=lambda t: (t["val_loss"], -t["val_acc"]))
    run = train_one(method, backend, args, split, progress, best["point"])
    return {**run, "tuning": {**tuning, "chosen": best["point"]}}


def format_setting(point: dict) -> str:
    """``lr=0.3, damping=0.01`` (``registered`` for an empty grid)."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) or "registered"


def _fraction(preconditioned: str) -> float:
    """``"k/n"`` as ``k / n``; ``"all"`` as 1."""
    k, _, n = preconditioned.partition("/")
    return int(k) / int(n) if n else 1.0


def _table(runs: Sequence[dict]) -> str:
    """Markdown table of the runs, with time per step relative to SGD on the same backend.

    A ``preconditioned`` column appears when some layer-wise method left params to the plain
    gradient step (``k/n`` tensors preconditioned), a ``tuned setting`` column after ``--tune``.
    """
    sgd = {r["backend"]: r["step_ms"] for r in runs if r["method"] == "sgd" and "step_ms" in r}
    partial = any(_fraction(r.get("preconditioned", "all")) < 1 for r in runs)
    tuned = any("tuning" in r for r in runs)
    extra = ["preconditioned"] * partial + ["tuned setting"] * tuned
    head = ["method", "backend", "train loss", "test loss", "test acc", "wall (s)", "ms/step", "step / SGD step",
            *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        if "error" in r:
            status = "interrupted (Ctrl-C)" if r.get("interrupted") else f"failed: {r['error'][:60]}"
            lines.append(f"| {r['method']} | {r['backend']} | {status} |" + " |" * (len(head) - 3))
            continue
        ratio = f"{r['step_ms'] / sgd[r['backend']]:.2f}" if r["backend"] in sgd else "n/a"
        cells = [r["method"], r["backend"], f"{r['train_loss']:.4f}", f"{r['test_loss']:.4f}", f"{r['test_acc']:.3f}",
                 f"{r['wall']:.2f}", f"{r['step_ms']:.2f}", ratio]
        cells += [r.get("preconditioned", "all")] * partial + [format_setting(r.get("tuning", {}).get("chosen", {}))] * tuned
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _backend_differences(runs: Sequence[dict]) -> dict[str, float]:
    """Largest absolute parameter difference between backends, per method (vs the first backend)."""
    out: dict[str, float] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        ok = [r for r in runs if r["method"] == method and "params" in r]
        if len(ok) < 2:
            continue
        ref = ok[0]["params"]
        out[method] = max(float(np.max(np.abs(a - b))) for r in ok[1:] for a, b in zip(r["params"], ref))
    return out


def _plot(runs: Sequence[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        h = r.get("history")
        if not h or not h["train_loss"]:
            continue
        label = r["method"] if len({q["backend"] for q in runs}) == 1 else f"{r['method']} ({r['backend']})"
        k = len(h["train_loss"])
        ax1.plot(h["epoch"][:k], h["train_loss"], marker="o", ms=3, label=label)
        ax2.plot(h["wall"][:k], h["train_loss"], marker="o", ms=3, label=label)
    for ax, xlabel in ((ax1, "epoch"), (ax2, "training wall time (s)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("full training-set loss")
        ax.grid(True, alpha=0.3)
    if ax1.lines:  # a run that failed before its first evaluation plots nothing
        ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interrupted(method: str, backend: str, err: KeyboardInterrupt) -> dict:
    """The run of ``method`` cut short by Ctrl-C, with the epochs it finished (if any)."""
    run = {"method": method, "backend": backend, "interrupted": True, "error": "interrupted (Ctrl-C)"}
    history = getattr(err, "history", None)
    return run if history is None else {**run, "history": history}


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Inf) replaced by None: standard JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _backend_names(args: argparse.Namespace) -> list[str]:
    """The backends of this run: ``--backend`` (``all``: every available one that has ``--model``)."""
    names = _parse_backends(args.backend)
    return [b for b in names if b in CNN_BACKENDS] if args.model == "cnn" else names


def _steps(method: str, args: argparse.Namespace, split: Split) -> int:
    """Optimizer steps of ``method`` on one backend (every grid point, then the retraining, with ``--tune``)."""
    per_epoch = lambda n: n // args.batch_size  # noqa: E731
    steps = args.epochs * per_epoch(split.x_train.shape[0])
    if args.tune:
        held_out = split.x_train.shape[0] - math.ceil(VALIDATION * split.x_train.shape[0])
        steps += args.epochs * per_epoch(held_out) * len(REGISTRY[method].grid())
    return steps


def compare(args: argparse.Namespace, split: Split | None = None) -> list[dict]:
    """Run ``curvcore compare``: train, print the table, write JSON and PNG into ``args.out``.

    Ctrl-C stops the training; the table, JSON and plot then hold the runs
    finished so far and the interrupted one (``"interrupted": true``).
    """
    from tqdm.auto import tqdm

    methods = _parse_methods(args.methods)
    backend_names = _backend_names(args)
    split = digits(seed=0) if split is None else split
    os.makedirs(args.out, exist_ok=True)
    steps = sum(_steps(m, args, split) for m in methods)
    runs = []
    train = tune_one if args.tune else train_one
    # the table's "preconditioned" column says which params a layer-wise method leaves to the gradient step
    warnings.filterwarnings("ignore", r".* preconditions \d+ of \d+ parameter tensors", UserWarning)
    with tqdm(total=steps * len(backend_names), disable=args.quiet, unit="step",
              file=sys.stderr, mininterval=0.5) as bar:
        for method, backend in itertools.product(methods, backend_names):
            bar.set_description(f"{method} on {backend}")
            try:
                runs.append(train(method, backend, args, split, bar))
            except KeyboardInterrupt as err:
                runs.append(_interrupted(method, backend, err))
                print(f"\ninterrupted during {method} on {backend}; reporting the runs finished so far",
                      file=sys.stderr)
                break
    print(_table(runs))
    diffs = _backend_differences(runs) if len(backend_names) > 1 else {}
    if diffs:
        print("\nLargest parameter difference between backends after training:")
        for m, d in diffs.items():
            print(f"  {m}: {d:.3e}")
    net = "CNN conv3x3(4)-ReLU-maxpool-linear" if args.model == "cnn" else \
        f"MLP {[DIGITS_FEATURES, *args.hidden, 10]} {args.activation}"
    title = f"digits, {net}, {args.loss}, batch {args.batch_size}, {args.dtype}" + (", tuned" * args.tune)
    _plot(runs, os.path.join(args.out, "compare.png"), title)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(_json_safe({"args": {k: v for k, v in vars(args).items() if not callable(v)},
                              "runs": [{k: v for k, v in r.items() if k != "params"} for r in runs],
                              "max_param_difference_between_backends": diffs}), fh, indent=1, allow_nan=False)
    print(f"\nwrote {os.path.join(args.out, 'compare.png')} and {os.path.join(args.out, 'results.json')}")
    return runs


def _list(_: argparse.Namespace) -> None:
    for name in _ordered_methods():
        spec = REGISTRY[name]
        print(f"{name:16s} {spec.cls.__name__:14s} {spec.description}  (compare settings: {spec.compare})")
    print(f"\nbackends available here: {', '.join(backends.names())}")


def build_parser() -> argparse.ArgumentParser:
    """The ``curvcore`` argument parser."""
    parser = argparse.ArgumentParser(prog="curvcore", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="train an MLP or a CNN on digits with every registered method")
    p.add_argument("--backend", default=None, type=_validated(_parse_backends),
                   help=f"one of {', '.join(backends.ALL)}, or 'all' (default: numpy for the MLP, torch for the CNN)")
    p.add_argument("--model", default="mlp", choices=MODELS,
                   help="mlp (--hidden, --activation) or cnn: the digits CNN of cc.backends.cnn as (B,1,8,8) "
                        "images on torch, (B,8,8,1) on jax (flax)")
    p.add_argument("--tune", action="store_true",
                   help="pick each method's registered grid point by validation loss (20%% of the training "
                        "set), then train on the whole training set with it")
    p.add_argument("--methods", default="all", type=_validated(_parse_methods),
                   help="comma-separated method names (default: all registered)")
    p.add_argument("--epochs", type=_int_at_least(1), default=5)
    p.add_argument("--batch-size", type=_int_at_least(1), default=64,
                   help="at most the number of training samples")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--hidden", type=_widths, default=[32], help="hidden widths, comma-separated (default 32)")
    p.add_argument("--activation", default="tanh", choices=backends.ACTIVATIONS)
    p.add_argument("--loss", default="ce", choices=["ce", "mse"])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--device", default=None, type=_device, help="e.g. cuda for torch/jax/cupy")
    p.add_argument("--out", default="compare_out",
                   help="folder for compare.png and results.json (created and checked before training)")
    p.add_argument("--threads", type=_int_at_least(1), default=1,
                   help="BLAS/torch threads (default 1: the digits nets are too small to gain from more)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.set_defaults(error=p.error)  # usage errors found after parsing (data size, output folder)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvcore`` command."""
    args = build_parser().parse_args(argv)
    if args.list:
        _list(args)
        return 0
    split = digits(seed=0)
    _check_against_data(args, split)
    if args.backend in ("jax", "all") and args.dtype == "float64":  # (after _check_against_data: resolved)
        backends.enable_jax_x64()  # float64 on JAX for this command-line run only
    import scipy.linalg  # noqa: F401  (load its BLAS now: threadpoolctl limits only loaded libraries)
    from threadpoolctl import threadpool_limits

    backends.set_torch_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        runs = compare(args, split)
    if any(r.get("interrupted") for r in runs):
        return INTERRUPTED
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
