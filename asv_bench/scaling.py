"""Time per step of every registered method vs network width and vs batch size, on CPU, as a PNG.

    CURVCORE_BENCH_THREADS=1 python asv_bench/scaling.py [--backends numpy,torch:cpu] [--out docs/img/scaling_cpu.png]

Net ``[64, w, w, 10]`` (tanh, cross-entropy where supported) with widths
``--widths`` at batch ``--fixed-batch``, and batches ``--batches`` at width
``--fixed-width``. Each point is the minimum over repeats of one synchronised
step (a plain step from the state after one step), the same measurement as
``bench_step.Step.time_step``. Writes the PNG and a CSV beside it.

:func:`sweep` and :func:`save` also serve ``asv_bench/memory.py``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import sys
import time
from collections.abc import Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asv_bench  # noqa: E402,F401  (first: CURVCORE_BENCH_THREADS must act before NumPy/matplotlib load BLAS)

FIELDS = ["backend", "method", "axis", "width", "batch"]


def point(backend: str, method: str, width: int, batch: int, budget_s: float) -> float:
    """Seconds per step (min of repeats) for ``[64, width, width, 10]`` and ``batch``."""
    from asv_bench import common as C

    prob = C.make_problem(backend, [64, width, width, 10], batch)
    st = C.make_stepper(method, prob)
    return C.interleaved_min({"s": st.call(1)}, budget_s=budget_s, min_repeats=3, max_repeats=20)["s"]


def sweep(backends: Sequence[str], methods: Sequence[str], points: Sequence[tuple[str, int, int]],
          measure: Callable[[str, str, int, int], float], value: str, fmt: Callable[[float], str]) -> list[dict]:
    """Rows of ``FIELDS + [value]``: ``measure(backend, method, width, batch)`` at each ``(axis, width, batch)``.

    A backend that does not run here is skipped, and so is the rest of a
    method's points once one raises ``NotImplementedError``.
    """
    from asv_bench import common as C

    rows = []
    for backend in backends:
        try:
            C.require(backend)
        except NotImplementedError as err:
            print(f"skip {backend}: {err}", file=sys.stderr)
            continue
        for m in methods:
            for axis, w, b in points:
                t0 = time.perf_counter()
                try:
                    v = measure(backend, m, w, b)
                except NotImplementedError as err:
                    print(f"skip {backend} {m}: {err}", file=sys.stderr)
                    break
                rows.append({"backend": backend, "method": m, "axis": axis, "width": w, "batch": b, value: v})
                print(f"{backend} {m} width={w} batch={b}: {fmt(v)} [{time.perf_counter() - t0:.1f}s]",
                      file=sys.stderr, flush=True)
    return rows


def save(rows: list[dict], out: str, value: str, scale: float, ylabel: str, xlabels: dict[str, str],
         net: str, title: str) -> None:
    """Write ``rows`` to a CSV beside ``out``; plot ``value * scale`` vs width and vs batch per backend to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(os.path.splitext(out)[0] + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS + [value])
        writer.writeheader()
        writer.writerows(rows)

    used = list(dict.fromkeys(r["backend"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(max(len(used), 1), 2, figsize=(11, 4.2 * max(len(used), 1)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, backend in enumerate(used):
        for j, axis in enumerate(("width", "batch")):
            ax = axes[i][j]
            for k, m in enumerate(methods):
                pts = sorted((r[axis], r[value]) for r in rows
                             if r["backend"] == backend and r["method"] == m and r["axis"] == axis)
                if pts:
                    style = dict(color="black", ls="--") if m == "sgd" else dict(color=colors(k % 10))
                    ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], marker="o", ms=3, label=m, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabels[axis])
            ax.set_ylabel(ylabel)
            ax.set_title(f"{backend}: net {net}" if axis == "width" else f"{backend}: vs batch size")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][1].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{title}, {_dt.date.today().isoformat()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="numpy,torch:cpu")
    ap.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    ap.add_argument("--widths", default="32,64,128,256,512")
    ap.add_argument("--batches", default="16,64,256,1024")
    ap.add_argument("--fixed-width", type=int, default=128)
    ap.add_argument("--fixed-batch", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of repeats per point (min 3 repeats)")
    ap.add_argument("--out", default="docs/img/scaling_cpu.png")
    args = ap.parse_args(argv)

    from asv_bench import common as C

    points = ([("width", int(w), args.fixed_batch) for w in args.widths.split(",")]
              + [("batch", args.fixed_width, int(b)) for b in args.batches.split(",")])
    methods = [m for m in args.methods.split(",") if m] or C.method_names()
    rows = sweep(args.backends.split(","), methods, points, lambda backend, m, w, b: point(backend, m, w, b, args.budget),
                 "seconds", lambda t: f"{t * 1e3:.3f} ms")
    threads = os.environ.get("CURVCORE_BENCH_THREADS", "default")
    save(rows, args.out, "seconds", 1e3, "ms per step",
         {"width": f"hidden width w (batch {args.fixed_batch})", "batch": f"batch size (width {args.fixed_width})"},
         "[64, w, w, 10]", f"curvcore: time per step on CPU ({os.cpu_count()} cores, threads={threads}, {C.DTYPE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
