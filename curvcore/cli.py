"""Command line: ``curvcore compare`` trains an MLP on digits with every registered method.

Example::

    curvcore compare                          # every method, NumPy backend
    curvcore compare --methods curveball,sgd --backend torch --epochs 10
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
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backends, losses
from .data import Split, digits, one_hot
from .methods import REGISTRY

BASELINES = ("sgd", "adam")


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
    """Checks that need the data and the file system; argparse-style errors (exit status 2)."""
    n = split.x_train.shape[0]
    if args.batch_size > n:
        args.error(f"argument --batch-size: expected at most {n} (the digits training samples), "
                   f"got {str(args.batch_size)!r}")
    problem = _out_folder_problem(args.out)
    if problem:
        args.error(f"argument --out: {problem}")


def _step_function(opt: Any, model: Any, loss: Any, backend: str):
    """``opt.step`` bound to model and loss; ``jax.jit``-ed on the JAX backend."""
    if backend == "jax":
        from .backends import jax as jax_backend

        return jax_backend.jit_step(opt, model, loss)
    return lambda params, state, x, y, **kw: opt.step(model, loss, params, state, x, y, **kw)


def _evaluate(model: Any, loss: Any, params: list, data: dict) -> tuple[float, float]:
    """Full training-set loss and test accuracy."""
    train_loss = float(loss.value(model.forward(params, data["x_train"]), data["y_train"]))
    logits = backends.to_numpy(model.forward(params, data["x_test"]))
    acc = float(np.mean(np.argmax(logits, axis=1) == data["labels_test"]))
    return train_loss, acc


def train_one(method: str, backend: str, args: argparse.Namespace, split: Split, progress: Any = None) -> dict:
    """Train one method on one backend on the digits ``split``; return its history and summary."""
    spec = REGISTRY[method]
    loss_name = args.loss
    if loss_name not in spec.losses:
        return {"method": method, "backend": backend, "error": f"{method} does not support loss {loss_name!r}"}
    sizes = [split.x_train.shape[1], *args.hidden, 10]
    model, params = backends.mlp(backend, sizes, activation=args.activation, dtype=args.dtype,
                                 seed=args.seed, device=args.device)
    loss = losses.get(loss_name)

    def put(a: np.ndarray) -> Any:
        return backends.asarray(backend, a.astype(args.dtype) if a.dtype.kind == "f" else a, device=args.device)

    y_train = one_hot(split.y_train) if loss_name == "mse" else split.y_train
    y_test = one_hot(split.y_test) if loss_name == "mse" else split.y_test
    data = {"x_train": put(split.x_train), "y_train": put(y_train), "x_test": put(split.x_test),
            "y_test": put(y_test), "labels_test": split.y_test}
    opt = spec.make()
    state = opt.init(params)
    step = _step_function(opt, model, loss, backend)
    rng = np.random.default_rng(args.seed)
    n, bs = split.x_train.shape[0], args.batch_size
    history = {"epoch": [0], "wall": [0.0], "train_loss": [], "test_acc": []}
    tl, acc = _evaluate(model, loss, params, data)
    history["train_loss"].append(tl)
    history["test_acc"].append(acc)
    step_times: list[float] = []
    wall = 0.0
    try:
        for epoch in range(1, args.epochs + 1):
            order = rng.permutation(n)
            for start in range(0, n - bs + 1, bs):  # drop the last partial batch (static shapes for jit)
                idx = order[start:start + bs]
                kwargs = {}
                if getattr(opt, "needs_refresh", None) is not None and opt.needs_refresh(state):
                    kwargs["cov_batch"] = put(split.x_train[rng.choice(n, size=min(200, n), replace=False)])
                xb, yb = put(split.x_train[idx]), put(y_train[idx])
                t0 = time.perf_counter()
                params, state, info = step(params, state, xb, yb, **kwargs)
                backends.block_until_ready(params)
                dt = time.perf_counter() - t0
                step_times.append(dt)
                wall += dt
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(info['loss']):.4f}", refresh=False)
            tl, acc = _evaluate(model, loss, params, data)
            for key, val in (("epoch", epoch), ("wall", wall), ("train_loss", tl), ("test_acc", acc)):
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
        "train_loss": history["train_loss"][-1], "test_acc": history["test_acc"][-1], "wall": wall,
        "steps": len(step_times), "step_ms": 1e3 * float(np.median(step_times)),
        "params": [backends.to_numpy(p) for p in params],
    }


def _table(runs: Sequence[dict]) -> str:
    """Markdown table of the runs, with time per step relative to SGD on the same backend."""
    sgd = {r["backend"]: r["step_ms"] for r in runs if r["method"] == "sgd" and "step_ms" in r}
    lines = ["| method | backend | train loss | test acc | wall (s) | ms/step | step / SGD step |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            status = "interrupted (Ctrl-C)" if r.get("interrupted") else f"failed: {r['error'][:60]}"
            lines.append(f"| {r['method']} | {r['backend']} | {status} | | | | |")
            continue
        ratio = f"{r['step_ms'] / sgd[r['backend']]:.2f}" if r["backend"] in sgd else "n/a"
        lines.append(f"| {r['method']} | {r['backend']} | {r['train_loss']:.4f} | {r['test_acc']:.3f} | "
                     f"{r['wall']:.2f} | {r['step_ms']:.2f} | {ratio} |")
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


def compare(args: argparse.Namespace, split: Split | None = None) -> list[dict]:
    """Run ``curvcore compare``: train, print the table, write JSON and PNG into ``args.out``.

    Ctrl-C stops the training; the table, JSON and plot then hold the runs
    finished so far and the interrupted one (``"interrupted": true``).
    """
    from tqdm.auto import tqdm

    methods = _parse_methods(args.methods)
    backend_names = _parse_backends(args.backend)
    split = digits(seed=0) if split is None else split
    os.makedirs(args.out, exist_ok=True)
    steps = args.epochs * (split.x_train.shape[0] // args.batch_size)
    runs = []
    with tqdm(total=steps * len(methods) * len(backend_names), disable=args.quiet, unit="step",
              file=sys.stderr, mininterval=0.5) as bar:
        for method, backend in itertools.product(methods, backend_names):
            bar.set_description(f"{method} on {backend}")
            try:
                runs.append(train_one(method, backend, args, split, bar))
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
    title = (f"digits, MLP {[64, *args.hidden, 10]} {args.activation}, {args.loss}, batch {args.batch_size}, "
             f"{args.dtype}")
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
    p = sub.add_parser("compare", help="train an MLP on digits with every registered method")
    p.add_argument("--backend", default="numpy", type=_validated(_parse_backends),
                   help=f"one of {', '.join(backends.ALL)}, or 'all'")
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
    if args.backend in ("jax", "all") and args.dtype == "float64":
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
