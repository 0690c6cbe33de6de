"""Peak memory of one optimisation step per method, each point measured in a fresh process.

    python asv_bench/memory.py OUTDIR [--backends torch:cpu] [--methods sgd,curveball] [--dtype float32]
        [--widths 128,256,512,1024] [--batches 128,256,512,1024]

writes ``OUTDIR/memory.csv`` and ``OUTDIR/memory.png`` (peak memory vs width
at B=512 and vs batch at width 512, net ``[784, w, w/2, 10]``: ``medium`` at
w = 512) and prints the ratio to SGD at ``medium``, B=512, the number of
``bench_step.PeakMemoryRatio.track_peak_memory_over_sgd``.

What one point is: a fresh Python process builds the problem, takes the first
step from ``init`` (compilation, lazy initialisation; for ACP and K-FAC a
refresh step), returns freed heap to the system (``malloc_trim``), resets the
kernel's peak-RSS mark (``/proc/self/clear_refs``) and takes the same step
again. On CPU the value is the peak resident set size during that step minus
the resident size before it (``VmHWM - VmRSS``, in bytes), so it counts what
torch, BLAS and XLA allocate, which ``tracemalloc`` does not see. glibc's
malloc maps every block of 128 KiB or more on its own
(``MALLOC_MMAP_THRESHOLD_=131072`` unless set): a freed array leaves the
resident set at once instead of staying in the heap for a later one, so the
peak is that of the live arrays (SGD on ``medium``: 8.1-8.7 MiB over runs,
against 10.7-14.8 with glibc's adaptive threshold). It is not ``ru_maxrss``
after minus before: Linux starts a child's ``ru_maxrss`` at its parent's peak
(inherited through fork and exec), so in a process started by asv or by this
script both readings would be the parent's, and the difference 0. On CUDA the
value is :func:`common.gpu_peak_bytes` of that step. Linux only on CPU
(``NotImplementedError`` elsewhere).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asv_bench  # noqa: E402,F401  (first: CURVCORE_BENCH_THREADS must act before any BLAS loads)


def _kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise NotImplementedError(f"/proc/self/status has no {field}")


def step_peak(backend: str, method: str, sizes: list[int], batch: int) -> float:
    """Bytes: the peak memory of one step (see the module docstring). Run it in a fresh process: :func:`fresh`."""
    from asv_bench import common as C

    if C.parse_backend(backend)[1] == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise NotImplementedError("CPU step memory needs Linux's /proc/self/clear_refs")
    prob = C.make_problem(backend, sizes, batch)
    opt, loss = C.make_optimizer(method), C.loss_for(method)
    step = C.step_function(opt, prob, loss)
    params, state = prob.params, opt.init(prob.params)
    call = lambda: prob.sync(step(params, state))  # noqa: E731
    call()
    if prob.dev == "cuda":
        return C.gpu_peak_bytes(prob, call)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed heap may hide part of the step's allocations
        pass
    before = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to VmRSS
    call()
    return 1024.0 * (_kib("VmHWM") - before)


@functools.lru_cache(maxsize=None)
def fresh(backend: str, method: str, sizes: tuple[int, ...], batch: int, dtype: str = "float32") -> float:
    """:func:`step_peak` in a new Python process with ``CURVCORE_BENCH_DTYPE=dtype`` (bytes; cached per point)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps([backend, method, list(sizes), batch])]
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "CURVCORE_BENCH_DTYPE": dtype}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if "skip" in out:
        raise NotImplementedError(out["skip"])
    return out["bytes"]


def at_key(key: str, dtype: str = "float32") -> float:
    """:func:`fresh` at a ``"backend|method|net|batch"`` grid key."""
    from asv_bench import common as C

    backend, method, net, batch = key.split("|")
    return fresh(backend, method, tuple(C.NETS[net]), int(batch), dtype)


def _point(spec: str) -> int:
    """``--point``: print ``{"bytes": ...}`` or ``{"skip": why}`` as the last line (this is the fresh process)."""
    backend, method, sizes, batch = json.loads(spec)
    try:
        out = {"bytes": step_peak(backend, method, sizes, batch)}
    except NotImplementedError as err:
        out = {"skip": str(err)}
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", help="folder for memory.csv and memory.png")
    ap.add_argument("--backends", default="torch:cpu")
    ap.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--widths", default="128,256,512,1024")
    ap.add_argument("--batches", default="128,256,512,1024")
    ap.add_argument("--point", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        return _point(args.point)
    if not args.outdir:
        ap.error("OUTDIR is required")

    from asv_bench import common as C
    from asv_bench.scaling import save, sweep

    methods = [m for m in args.methods.split(",") if m] or C.method_names()
    points = ([("width", int(w), 512) for w in args.widths.split(",")]
              + [("batch", 512, int(b)) for b in args.batches.split(",")])
    rows = sweep(args.backends.split(","), methods, points,
                 lambda backend, m, w, b: fresh(backend, m, (784, w, w // 2, 10), b, args.dtype),
                 "bytes", lambda v: f"{v / 2**20:.1f} MiB")
    save(rows, os.path.join(args.outdir, "memory.png"), "bytes", 2.0**-20, "peak memory of one step (MiB)",
         {"width": "hidden width w (batch 512)", "batch": "batch size (width 512)"}, "[784, w, w/2, 10]",
         f"curvcore: peak memory increase of one step, fresh process per point ({args.dtype})")

    backends = list(dict.fromkeys(r["backend"] for r in rows))
    ref = {(r["backend"], r["method"]): r["bytes"] for r in rows if (r["width"], r["batch"]) == (512, 512)}
    lines = ["| method | " + " | ".join(f"{b} MiB | {b} / SGD" for b in backends) + " |",
             "|---|" + "---|---|" * len(backends)]
    for m in methods:
        cells = []
        for b in backends:
            v, sgd = ref.get((b, m)), ref.get((b, "sgd"))
            cells += ["skip", "skip"] if v is None else [f"{v / 2**20:.1f}", f"{v / sgd:.2f}" if sgd else ""]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
