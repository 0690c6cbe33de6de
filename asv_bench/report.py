"""Print the benchmark ratio tables as markdown.

Two sources, the same tables:

* from asv results (default): the newest results file of a machine under
  ``.asv/results`` (written by ``asv run --python=same --set-commit-hash ...``)::

      python asv_bench/report.py [--results .asv/results] [--machine NAME] [--commit HASH]

* from a same-process measurement (no asv needed; it runs the ``setup`` and
  ``track_*`` code of the benchmark classes directly, one process)::

      python asv_bench/report.py --measure [--backends numpy,torch:cpu,jax:cpu] [--nets small,medium]

The targets of issue #9 are printed beside the ratios; they are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import glob
import itertools
import json
import math
import os
import platform
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``asv_bench`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asv_bench  # noqa: E402,F401  (first: CURVCORE_BENCH_THREADS must act before any BLAS loads)

# table -> benchmark, "<module>.<Class>.<function>"; results are keyed by the grid key split at "|"
RATIO_BENCHMARKS = {
    "step_over_sgd": "bench_step.StepRatio.track_step_over_sgd",
    "ph_budget": "bench_step.PseudoHessianBudget.track_step_over_grad_plus_s_hvp",
    "ggn_over_native": "bench_products.GGNOverhead.track_ggn_over_native",
    "curvcore_over_peer": "bench_products.Peers.track_curvcore_over_peer",
    "core_time": "bench_products.CoreProduct.time_core",
    "step_time": "bench_step.Step.time_step",
    "memory_over_sgd": "bench_step.PeakMemoryRatio.track_peak_memory_over_sgd",
}
CORE_SHARE = "core_over_step"  # computed: same process with --measure, time_core / time_step from asv


def _target(method: str) -> str:
    from asv_bench.common import TARGETS

    if method == "pseudo_hessian":
        return "1 grad + S HVP (table below)"
    return f"<= {TARGETS[method]}" if method in TARGETS else ""


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "skip"
    if isinstance(v, str):
        return v
    if unit == "s":
        return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"
    return f"{v:.2f}"


# -- loading asv results --------------------------------------------------------
def load_asv(results_dir: str, machine: str | None = None, commit: str | None = None) -> tuple[dict, dict]:
    """``({key: {param_tuple: value}}, meta)`` from the newest asv results file.

    ``key`` as in :data:`RATIO_BENCHMARKS`; ``param_tuple`` the benchmark's
    grid key split at ``|`` (strings, quotes removed); ``value`` a float or
    ``nan`` (skipped) or ``None`` (failed).
    """
    machines = [m for m in sorted(os.listdir(results_dir)) if os.path.isdir(os.path.join(results_dir, m))]
    if machine is None:
        if not machines:
            raise SystemExit(f"no asv results under {results_dir}; run asv first (docs/benchmarks.md)")
        machine = max(machines, key=lambda m: max((os.path.getmtime(f) for f in glob.glob(
            os.path.join(results_dir, m, "*.json"))), default=0))
    files = [f for f in glob.glob(os.path.join(results_dir, machine, "*.json")) if not f.endswith("machine.json")]
    if commit:
        files = [f for f in files if os.path.basename(f).startswith(commit[:8])]
    if not files:
        raise SystemExit(f"no results for machine {machine!r}{' commit ' + commit if commit else ''}")
    path = max(files, key=os.path.getmtime)
    with open(path) as fh:
        data = json.load(fh)
    cols = data["result_columns"]
    out: dict[str, dict[tuple, Any]] = {}
    for name, row in data["results"].items():
        rec = dict(zip(cols, row))
        params = [[_unquote(p) for p in ps] for ps in rec.get("params") or []]
        values = rec["result"] if isinstance(rec["result"], list) else [rec["result"]]
        combos = list(itertools.product(*params)) if params else [()]
        out[name] = {tuple(p for c in combo for p in c.split("|")): (float(v) if v is not None else None)
                     for combo, v in zip(combos, values)}
    machine_info = {}
    mpath = os.path.join(results_dir, machine, "machine.json")
    if os.path.exists(mpath):
        with open(mpath) as fh:
            machine_info = json.load(fh)
    date = _dt.datetime.fromtimestamp(data["date"] / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"source": f"asv results {os.path.relpath(path)}", "machine": machine, "date": date,
            "commit": data.get("commit_hash", "")[:8], "cpu": machine_info.get("cpu", ""),
            "num_cpu": machine_info.get("num_cpu", "")}
    return out, meta


def _unquote(p: str) -> str:
    try:
        v = ast.literal_eval(p)
        return str(v)
    except (ValueError, SyntaxError):
        return p


# -- same-process measurement ---------------------------------------------------
def plan(backends: list[str], nets: list[str], methods: list[str], peers: bool = True) -> list[tuple]:
    """What :func:`measure` runs besides the step ratios: ``(result key, benchmark class, function, grid key)``.

    Every backend, net (at its default batch) and method asked for, whatever
    ``CURVCORE_BENCH_GRID`` says (the grid level limits what asv runs, not this).
    """
    from asv_bench import bench_products as P
    from asv_bench import bench_step as S
    from asv_bench import common as C

    runs = []
    for net in nets:
        batch = C.DEFAULT_BATCH[net]
        for backend in backends:
            for m in methods:
                runs.append((RATIO_BENCHMARKS["step_time"], S.Step, "time_step", C.key(backend, m, net, batch)))
            if backend in C.NATIVE_BACKENDS:
                runs.append((RATIO_BENCHMARKS["ggn_over_native"], P.GGNOverhead, "track_ggn_over_native",
                             C.key(backend, net, batch)))
                if "pseudo_hessian" in methods:
                    runs.append((RATIO_BENCHMARKS["ph_budget"], S.PseudoHessianBudget,
                                 "track_step_over_grad_plus_s_hvp", C.key(backend, "pseudo_hessian", net, batch)))
            runs += [(CORE_SHARE, P.CoreProduct, "time_core", C.key(backend, m, net, batch))
                     for m in P.core_products.CORE if m in methods]
        if peers:
            devices = sorted({C.parse_backend(b)[1] for b in backends})
            runs += [(RATIO_BENCHMARKS["curvcore_over_peer"], P.Peers, "track_curvcore_over_peer",
                      C.key(f"{lib}:{dev}", peer, net, batch)) for peer, lib in C.PEERS.items() for dev in devices]
    return runs


def measure(backends: list[str], nets: list[str], methods: list[str] | None, peers: bool = True,
            log: Any = None) -> tuple[dict, dict]:
    """Run the benchmark classes' ``setup`` and ``track_*`` code in this process; the layout of :func:`load_asv`."""
    from asv_bench import common as C

    methods, log = methods or C.method_names(), log or sys.stderr
    out: dict[str, dict[tuple, Any]] = {k: {} for k in [*RATIO_BENCHMARKS.values(), CORE_SHARE]}

    def record(result: str, fn: str, key: str, value: Any, seconds: float) -> None:
        if isinstance(value, str):  # an error message
            value, msg = (float("nan"), f"skip ({value})") if value.startswith("NotImplementedError") else (
                None, f"FAIL {value[:200]}")
        else:
            msg = _fmt(value, "s" if fn.startswith("time_") and result != CORE_SHARE else "")
        out[result][tuple(key.split("|"))] = value
        print(f"{fn} {key}: {msg} [{seconds:.1f}s]", file=log, flush=True)

    ratio_keys = [C.key(b, m, n, C.DEFAULT_BATCH[n]) for n in nets for b in backends for m in methods]
    C.step_ratios(ratio_keys, (1.5, 3),  # the full budget, whatever the grid level
                  lambda k, v, t: record(RATIO_BENCHMARKS["step_over_sgd"], "track_step_over_sgd", k, v, t))
    for result, cls, fn, key in plan(backends, nets, methods, peers):
        t0 = time.perf_counter()
        try:
            bench = cls()
            bench.setup(key)
            if result == CORE_SHARE:
                t = C.interleaved_min({"core": bench.fn, "step": bench.st.call(1)})
                value = t["core"] / t["step"]
            elif fn.startswith("time_"):
                value = C.interleaved_min({"f": bench.fn}, budget_s=1.0)["f"]
            else:
                value = getattr(bench, fn)(key)
        except Exception as err:  # report, keep going: the table shows "skip" or "fail"
            value = f"{type(err).__name__}: {err}"
        record(result, fn, key, value, time.perf_counter() - t0)
    meta = {"source": "same-process measurement (asv_bench/report.py --measure)", "machine": platform.node(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": platform.processor() or platform.machine(), "num_cpu": os.cpu_count()}
    return out, meta


# -- tables -----------------------------------------------------------------------
def _method_table(title: str, ratio: dict, times: dict | None = None, target: Any = lambda m: "") -> list[str]:
    """Markdown: ``ratio[(backend, method, net, batch)]``, a row per method, a column per backend, net and batch."""
    from asv_bench import common as C

    cols = [c for c in dict.fromkeys((b, n, bt) for (b, _, n, bt), v in ratio.items() if _ok(v))]
    if not cols:
        return []
    cols.sort(key=lambda c: (_index(list(C.NETS), c[1]), int(c[2]), _index(C.BACKENDS, c[0])))
    head = " | ".join(f"{b} {n} (B={bt})" for b, n, bt in cols)
    lines = ["", f"### {title}", "", f"| method | target | {head} |", "|---|---|" + "---|" * len(cols)]
    for m in dict.fromkeys(m for (_, m, _, _) in ratio):
        cells = [_fmt(ratio.get(k)) + (f" ({_fmt(times[k], 's')})" if _ok((times or {}).get(k)) else "")
                 for k in ((b, m, n, bt) for b, n, bt in cols)]
        lines.append(f"| {m} | {target(m)} | " + " | ".join(cells) + " |")
    return lines


def _rows(title: str, header: list[str], entries: dict, keep: Any = lambda v: v is None or not _isnan(v)) -> list[str]:
    """Markdown: one row per entry, ``header`` naming the key's parts and the value."""
    if not any(_ok(v) for v in entries.values()):
        return []
    return (["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + [f"| {' | '.join(k)} | {_fmt(v)} |" for k, v in entries.items() if keep(v)])


def _index(seq: list[str], item: str) -> int:
    return seq.index(item) if item in seq else len(seq)


def tables(results: dict, meta: dict) -> str:
    """The markdown report."""
    from asv_bench import common as C

    lines = [f"Source: {meta['source']}; machine `{meta['machine']}` ({meta.get('cpu', '')}, "
             f"{meta.get('num_cpu', '')} CPUs); {meta['date']}" + (f"; commit {meta['commit']}" if meta.get("commit") else "")]
    get = lambda name: results.get(RATIO_BENCHMARKS[name], {})  # noqa: E731
    times = get("step_time")
    step = _method_table("Step time / SGD step time (amortized over the method's schedule; same process)",
                         get("step_over_sgd"), times, _target)
    if any(k in times for k in get("step_over_sgd")):
        step += ["", "In parentheses: the absolute time of one (plain) step, `Step.time_step`."]
    lines += step
    lines += _method_table("Peak memory of one step / SGD's (torch CPU, float32, fresh process per method)",
                           get("memory_over_sgd"), target=lambda m: "<= 2" if m == "pseudo_hessian" else "")
    lines += _rows("Pseudo-Hessian step / (1 gradient + S Hessian-vector products), native torch.func / JAX "
                   "(target <= 1)", ["backend", "method", "net", "batch", "ratio"], get("ph_budget"))
    lines += _rows(f"curvcore GGN-vector product / hand-written native one (core overhead, target <= "
                   f"{C.CORE_OVERHEAD_TARGET})", ["backend", "net", "batch", "ratio"], get("ggn_over_native"))
    peer = get("curvcore_over_peer")
    lines += _rows("curvcore GGN-vector product / peer's (< 1: curvcore faster)",
                   ["backend", "peer", "net", "batch", "ratio"], peer)
    missing = sorted({k[1] for k in peer} - {k[1] for k, v in peer.items() if not _isnan(v)})
    if missing:
        lines += ["", f"Skipped (not installed or not running here): {', '.join(missing)}."]
    core = results.get(CORE_SHARE)
    if core is None:  # asv results: time_core / time_step at the same grid key
        core = {k: tc / times[k] if _ok(tc) and _ok(times.get(k)) else tc for k, tc in get("core_time").items()}
    lines += _rows("Core product / full step (share of the step)", ["backend", "method", "net", "batch", "ratio"], core)
    return "\n".join(lines)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _ok(v: Any) -> bool:
    return v is not None and not _isnan(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=".asv/results", help="asv results directory")
    ap.add_argument("--machine", help="asv machine name (default: the most recent)")
    ap.add_argument("--commit", help="commit hash prefix (default: the newest results file)")
    ap.add_argument("--measure", action="store_true", help="measure in this process instead of reading asv results")
    ap.add_argument("--backends", default="numpy,torch:cpu,jax:cpu")
    ap.add_argument("--nets", default="small,medium")
    ap.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json", help="also write the raw numbers to this JSON file")
    ap.add_argument("--merge", help="a --json file of an earlier --measure run: its entries are kept unless remeasured")
    args = ap.parse_args(argv)
    if args.measure:
        results, meta = measure(args.backends.split(","), args.nets.split(","),
                                [m for m in args.methods.split(",") if m] or None, peers=not args.no_peers)
    else:
        results, meta = load_asv(args.results, args.machine, args.commit)
    if args.merge:
        with open(args.merge) as fh:
            old = json.load(fh)
        for key, entries in old["results"].items():
            for params, value in entries.items():
                results.setdefault(key, {}).setdefault(tuple(params.split("|")), value)
        meta["source"] += f" merged with {old['meta']['source']} of {old['meta']['date']}"
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": {k: {"|".join(p): v for p, v in d.items()}
                                                 for k, d in results.items()}}, fh, indent=1)
    print(tables(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
