"""Cost model of a step: passes and multiply-adds per method, their floors, and measured ratios to SGD.

For the tanh MLPs of the benchmarks (``small`` = [64, 64, 10] with B=64,
``medium`` = [784, 512, 256, 10] with B=512; float64, cross-entropy, each
method's registered ``compare`` settings) this script

* computes each method's floor: the multiply-adds its equations need
  (passes over the net, plus the extra dense algebra) over SGD's, from the
  formulas of docs/benchmarks.md ("Cost model"), counted from the code of
  ``curvcore/methods/*.py`` and ``backends/_mlp.py``;
* measures the amortized step time over SGD's (asv_bench's steppers, one
  process per run, interleaved, process CPU time, one thread, median of 7
  rounds) on NumPy, torch and JAX (``jit_step``) at ``medium``;
* measures what input validation costs: each method's step with
  ``validate=True`` over the same step with ``validate=False``, NumPy and
  torch, ``small`` and ``medium`` (minimum over rounds);
* measures the torch adapter's overhead: curvcore SGD through
  ``backends.torch.Optimizer`` over a native ``torch.optim.SGD`` step
  (``asv_bench/torch_overhead.py``).

Writes ``results/cost_model.json`` and the tables ``results/cost_model.md``
(floors and ratios), ``results/cost_model_validation.md`` and
``results/cost_model_torch.md``. Run from the repository root:
``python docs/experiments/cost_model.py`` (about 10-20 minutes on a loaded
2-core machine); ``--parts floors`` skips the measurements,
``--backends numpy`` measures one backend.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from typing import Any

from _common import caption, interleaved_min, load_results, main, results_path

NAME = "cost_model"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NETS = {"small": ([64, 64, 10], 64), "medium": ([784, 512, 256, 10], 512)}
METHODS = ["sgd", "adam", "curveball", "esn", "mk", "acp", "centered_sgd", "kfac", "pseudo_hessian"]
BACKENDS = ["numpy", "torch:cpu", "jax:cpu"]
EIGH_MACS = 2.0  # symmetric eigendecomposition with vectors ≈ 2 n³ multiply-adds (tridiagonalisation + back-transform)


# -- the cost model ----------------------------------------------------------------------------------------------
def layers(sizes: list[int]) -> list[tuple[int, int]]:
    """``(n_in, n_out)`` of each dense layer."""
    return list(zip(sizes[:-1], sizes[1:]))


def forward(sizes: list[int], B: int) -> int:
    """``F = B Σ n_in n_out``: the multiply-adds of one forward pass."""
    return B * sum(d * o for d, o in layers(sizes))


def backward(sizes: list[int], B: int) -> int:
    """Parameter gradients ``gᵀa`` (F) and cotangents ``g W`` below every layer but the first (F - F_1)."""
    d1, o1 = layers(sizes)[0]
    return 2 * forward(sizes, B) - B * d1 * o1


def tangent(sizes: list[int], B: int) -> int:
    """A JVP over a cached forward: ``ȧ Wᵀ + a Uᵀ`` per layer, no ``ȧ`` at the input: same as a backward."""
    return backward(sizes, B)


def sgd(sizes: list[int], B: int) -> int:
    """SGD, Adam: one forward and one backward (elementwise updates are O(P), not counted)."""
    return forward(sizes, B) + backward(sizes, B)


def solve_psd(n: int, rhs: int, B: int) -> int:
    """``(δI + ĜᵀĜ/B)⁻¹ R`` with ``Ĝ (B, n)``, ``R (n, rhs)``: Gram + Cholesky + two triangular solves,
    or the Woodbury form through the ``B x B`` system when ``B < n``."""
    direct = B * n * n + n**3 // 6 + n * n * rhs
    woodbury = B * B * n + B**3 // 6 + 2 * B * n * rhs + B * B * rhs
    return min(direct, woodbury)


def push(sizes: list[int], B: int, tensors: set[int], order: int) -> int:
    """Multiply-adds of one Taylor push of ``order`` along a direction living in ``tensors`` (indices into
    ``[W1, b1, ...]``), as ``backends/_mlp.py::_push`` does it: zero coefficients are never multiplied."""
    dims = layers(sizes)
    start = min(i // 2 for i in tensors)
    a, macs = [False] * order, 0  # which Taylor coefficients of the layer input are nonzero
    for k in range(start, len(dims)):
        f_k = B * dims[k][0] * dims[k][1]
        z = list(a)
        macs += f_k * sum(a)
        if 2 * k in tensors:  # weight direction U: z_j += j a_{j-1} Uᵀ (a_{-1} = the layer input)
            for j, lower in enumerate([True] + a[:-1]):
                if lower:
                    macs, z[j] = macs + f_k, True
        if 2 * k + 1 in tensors:
            z[0] = True
        a = z if k == len(dims) - 1 else [any(z[: j + 1]) for j in range(order)]  # Faà di Bruno (tanh)
    return macs


def floors(sizes: list[int], B: int, settings: dict[str, dict]) -> dict[str, int]:
    """Each method's floor (multiply-adds per step, amortized over its schedule)."""
    F, S, dims = forward(sizes, B), sgd(sizes, B), layers(sizes)
    out = {"sgd": S, "adam": S, "mk": S, "centered_sgd": S + sum(d * o for d, o in dims)}
    out["curveball"] = F + 2 * tangent(sizes, B) + backward(sizes, B) + F // settings["curveball"]["lam_interval"]
    out["esn"] = S + sum(solve_psd(o, d, B) + o * d for d, o in dims)
    n = settings["acp"]["refresh_every"]
    refresh = sum(B * d * d + int(EIGH_MACS * d**3) + d**3 for d, _ in dims)  # covariance, eigh, U diag Uᵀ
    out["acp"] = S + sum(o * d * d + 2 * o * d for d, o in dims) + refresh // n
    n = settings["kfac"]["refresh_every"]
    refresh = sum(B * (d + 1) ** 2 + B * o * o + 7 * ((d + 1) ** 3 + o**3) // 6 for d, o in dims)
    out["kfac"] = S + sum(o * o * (d + 1) + o * (d + 1) ** 2 for d, o in dims) + refresh // n
    out["pseudo_hessian"] = S + pseudo_hessian_pushes(sizes, B, settings["pseudo_hessian"]["order"]) + F
    return out


def pseudo_hessian_pushes(sizes: list[int], B: int, order: int) -> int:
    """S pushes of ``order`` along each tensor, S(S-1)/2 of order 2 along each pair (``groups="tensor"``)."""
    n = 2 * len(layers(sizes))
    pairs = sum(push(sizes, B, {s, t}, 2) for s in range(n) for t in range(s + 1, n))
    return sum(push(sizes, B, {s}, order) for s in range(n)) + pairs


# -- measurements ----------------------------------------------------------------------------------------------
def add_arguments(parser: Any) -> None:
    parser.add_argument("--parts", default="floors,ratios,validation,torch",
                        help="comma-separated: floors, ratios, validation, torch")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="backends of the ratio measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per ratio (the median is reported)")


def _bench() -> Any:
    """asv_bench.common with one thread and process CPU time (set before torch/jax/numpy's BLAS load)."""
    os.environ.setdefault("CURVCORE_BENCH_THREADS", "1")
    os.environ.setdefault("CURVCORE_BENCH_CPU_TIME", "1")
    os.environ.setdefault("CURVCORE_BENCH_GRID", "cpu")
    sys.path.insert(0, ROOT)
    import asv_bench  # noqa: F401  (caps the threads)
    from asv_bench import common

    return common


def _rounds(fns: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Process CPU times of each function over ``rounds`` interleaved rounds (``fn.extra`` added, see
    ``asv_bench.common.amortized_call``)."""
    times: dict[str, list[float]] = {k: [] for k in fns}

    def timed(name: str, fn: Any) -> Any:
        def call() -> None:
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t + getattr(fn, "extra", 0.0))

        return call

    interleaved_min({k: timed(k, fn) for k, fn in fns.items()}, repeats=rounds)
    return times


def paired_ratio(fns: dict[str, Any], top: str, bottom: str, rounds: int) -> float:
    """Median over interleaved rounds of ``time(top) / time(bottom)`` in the same round: a change of the
    machine's load between rounds cancels (a ratio of minima over rounds moved by ±10 % here)."""
    t = _rounds({top: fns[top], bottom: fns[bottom]}, rounds)
    return statistics.median(a / b for a, b in zip(t[top], t[bottom]))


def settings_of(C: Any) -> dict[str, dict]:
    """The schedule settings the floors need, read from the registered ``compare`` instances."""
    opt = {m: C.make_optimizer(m) for m in ("curveball", "acp", "kfac", "pseudo_hessian")}
    return {"curveball": {"lam_interval": opt["curveball"].lam_interval},
            "acp": {"refresh_every": opt["acp"].refresh_every},
            "kfac": {"refresh_every": opt["kfac"].refresh_every},
            "pseudo_hessian": {"order": 3 if opt["pseudo_hessian"].reg == "cubic" else 2}}


def measure_ratios(C: Any, backend: str, rounds: int = 7) -> dict[str, float | str]:
    """``{method: median over ``rounds`` interleaved rounds of (amortized step / SGD step)}`` at ``medium``."""
    prob = C.problem(backend, "medium", 512)
    sgd_step, out = C.make_stepper("sgd", prob).call(1), {}
    for method in METHODS[1:]:
        try:
            fn, weight = C.amortized_call(C.make_stepper(method, prob, whole_cycle=True))
            t = _rounds({"m": fn, "sgd": sgd_step}, rounds)
            out[method] = statistics.median(a * weight / b for a, b in zip(t["m"], t["sgd"]))
        except Exception as err:  # one method's failure must not lose the others'
            out[method] = f"{type(err).__name__}: {err}"
        print(f"  {backend} {method}: {out[method]}", flush=True)
    return out


def measure_validation(C: Any, backend: str, net: str) -> dict[str, float]:
    """``{method: validate=True step / validate=False step - 1}`` (median of paired rounds, amortized)."""
    import copy

    prob = C.problem(backend, net, NETS[net][1])
    out = {}
    for method in METHODS:
        st = C.make_stepper(method, prob, whole_cycle=True)
        checked = copy.copy(st.opt)
        checked.validate = True
        st_checked = C.Stepper(method, checked, st.loss, C.step_function(checked, prob, st.loss), prob,
                               st.params, st.states, st.cycle)
        fns = {"off": C.amortized_call(st)[0], "on": C.amortized_call(st_checked)[0]}
        out[method] = paired_ratio(fns, "on", "off", 100 if net == "small" else 7) - 1
        print(f"  validation {backend} {net} {method}: {out[method]:+.1%}", flush=True)
    return out


def measure_torch() -> dict[str, dict[str, float]]:
    """curvcore SGD through the torch Optimizer / native torch SGD (validate on and off), median of paired rounds."""
    from asv_bench import torch_overhead as T

    out = {}
    for net in NETS:
        for dtype in T.DTYPES:
            fns = T.steps(net, dtype)
            fns["curvcore, validate=False"] = T.steps(net, dtype, validate=False)["curvcore"]
            for fn in fns.values():
                fn()
            rounds = 100 if net == "small" else 25
            out[f"{net}|{dtype}"] = {
                "native_ms": 1e3 * min(_rounds({"native": fns["native"]}, rounds)["native"]),
                "ratio": paired_ratio(fns, "curvcore", "native", rounds),
                "ratio_no_validation": paired_ratio(fns, "curvcore, validate=False", "native", rounds)}
            print(f"  torch overhead {net} {dtype}: {out[f'{net}|{dtype}']}", flush=True)
    return out


def run(args: Any) -> dict:
    C = _bench()
    parts = args.parts.split(",")
    data: dict[str, Any] = {"ratios": {}, "validation": {}, "torch": {}, "seconds_of": {}, "date_of": {}}
    if os.path.exists(results_path(NAME)):  # a partial run keeps the other parts' results
        data.update({k: v for k, v in load_results(NAME).items() if k in data})
    data["settings"] = settings_of(C)
    seconds = data.setdefault("seconds_of", {})
    measure = {"ratios": lambda: {b: measure_ratios(C, b, args.rounds) for b in args.backends.split(",")},
               "validation": lambda: {b: {net: measure_validation(C, b, net) for net in NETS}
                                      for b in ("numpy", "torch:cpu")},
               "torch": measure_torch}
    for part, fn in measure.items():
        if part in parts:
            t0 = time.perf_counter()
            data[part], data.setdefault("date_of", {})[part] = fn(), datetime.date.today().isoformat()
            seconds[part] = round(time.perf_counter() - t0, 1)
    return data


# -- tables ------------------------------------------------------------------------------------------------------
def _caption(data: dict, part: str) -> str:
    """The run's caption with the date and seconds of the run that measured ``part``."""
    return caption({**data, "date": data.get("date_of", {}).get(part, data["date"]),
                    "seconds": data.get("seconds_of", {}).get(part)}, NAME)


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else "n/a"


def floor_table(data: dict) -> str:
    s = data["settings"]
    rows = {net: floors(sizes, B, s) for net, (sizes, B) in NETS.items()}
    backends = [b for b in BACKENDS if b in data["ratios"]]
    head = ["method", "floor small", "floor medium", "medium: extra multiply-adds (M)",
            *(f"measured {b.split(':')[0]}{'-jit' if b.startswith('jax') else ''}" for b in backends)]
    lines = [_caption(data, "ratios") + f" Settings: CurveBall λ every {s['curveball']['lam_interval']} steps, "
             f"ACP refresh every {s['acp']['refresh_every']}, K-FAC refresh every {s['kfac']['refresh_every']}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        small, medium = rows["small"][m] / rows["small"]["sgd"], rows["medium"][m] / rows["medium"]["sgd"]
        extra = (rows["medium"][m] - rows["medium"]["sgd"]) / 1e6
        measured = [_fmt(1.0 if m == "sgd" else data["ratios"][b].get(m)) for b in backends]
        lines.append("| " + " | ".join([m, f"{small:.2f}", f"{medium:.2f}", f"{extra:.0f}", *measured]) + " |")
    kfac10 = {net: floors(sizes, B, {**s, "kfac": {"refresh_every": 10}}) for net, (sizes, B) in NETS.items()}
    lines += ["", "K-FAC with `refresh_every=10`: floor " + ", ".join(
        f"{kfac10[net]['kfac'] / kfac10[net]['sgd']:.2f} ({net})" for net in NETS) + "."]
    return "\n".join(lines)


def validation_table(data: dict) -> str:
    cols = [(b, net) for b in data["validation"] for net in NETS]
    lines = [_caption(data, "validation") + " Cost of `validate=True` over `validate=False`, per step (amortized).", "",
             "| method | " + " | ".join(f"{b.split(':')[0]} {net}" for b, net in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{data['validation'][b][net][m]:+.1%}" for b, net in cols) + " |")
    return "\n".join(lines)


def torch_table(data: dict) -> str:
    lines = [_caption(data, "torch") + " curvcore SGD through `backends.torch.Optimizer` / native "
             "`nn.Module` + `torch.optim.SGD` step (momentum 0.9, cross-entropy).", "",
             "| net | dtype | native step (ms) | ratio (validate=True) | ratio (validate=False) | target |",
             "|---|---|---|---|---|---|"]
    for key, r in data["torch"].items():
        net, dtype = key.split("|")
        target = {"small": "≤ 1.5", "medium": "≤ 1.1"}[net]
        lines.append(f"| {net} | {dtype} | {r['native_ms']:.2f} | {r['ratio']:.2f} | "
                     f"{r['ratio_no_validation']:.2f} | {target} |")
    return "\n".join(lines)


def render(data: dict) -> dict[str, str]:
    tables = {"": floor_table(data)}
    if data["validation"]:
        tables["_validation"] = validation_table(data)
    if data["torch"]:
        tables["_torch"] = torch_table(data)
    return tables


if __name__ == "__main__":
    main(sys.modules[__name__])
