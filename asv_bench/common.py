"""What the curvcore benchmarks share: the grid, problems, steps, synchronisation, timing.

Modelled on scipy ``benchmarks/benchmarks/common.py::XPBenchmark``: a backend
string names a library and a device (``"torch:cuda"``); every timed call ends
in a device synchronisation; jit compilation happens in ``setup``, never
inside a timing. asv spawns a process per parameter value, so each benchmark
has one parameter, a grid key such as ``"torch:cpu|curveball|medium|512"``,
and lists only the keys that run here (:func:`grid`, like scipy's
``LimitedParamBenchmark``): nothing is spawned only to be skipped. What
:func:`grid` cannot see without importing a framework (an adapter that fails
to import, a CUDA driver without a device) still raises
``NotImplementedError`` in ``setup`` (asv's skip).

This module is imported by asv's benchmark discovery (asv imports every module
under ``asv_bench/``), so it imports only NumPy and curvcore at the top; torch,
jax and cupy are imported inside the functions that need them. It defines no
``time_*``/``track_*``/``peakmem_*`` names, so asv finds no benchmark in it.

Environment variables:
    CURVCORE_BENCH_GRID: which points run on CPU (:data:`GRIDS`; CUDA devices
        run every point): ``quick`` (default) times steps on ``small``/B=64 for
        SGD and CurveBall, and step/SGD ratios on ``medium``/B=512 for
        every method, nothing else; ``cpu`` runs ``small``/B=64 and
        ``medium``/B=512 for every benchmark, and memory at ``medium``/B=512;
        ``full`` runs every net and batch (``large`` costs seconds per step on
        2 cores).
    CURVCORE_BENCH_DTYPE=float32: benchmark in float32 (default float64, the
        dtype of the test suite).
    CURVCORE_BENCH_JAX_CACHE: JAX's persistent compilation cache (default
        ``.asv/jax_cache`` in the checkout; empty: none). Compilations of a
        second or more (the pseudo-Hessian's, ACP's) are read back in later
        runs; compilation happens in ``setup`` and is never timed.
    CURVCORE_BENCH_CPU_TIME=1: time CPU benchmarks in process CPU time
        (``time.process_time``) instead of wall time; for a shared, loaded
        machine, together with ``CURVCORE_BENCH_THREADS=1`` (see
        ``asv_bench/__init__.py``). CUDA benchmarks always use wall time.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX takes 75 % of a GPU otherwise

import numpy as np  # noqa: E402

import curvcore as cc  # noqa: E402

_SOURCE = os.environ.get("CURVCORE_BENCH_SOURCE")  # set by regressions.sh: the checkout that must be benchmarked
if _SOURCE and not all(os.path.realpath(m.__file__).startswith(os.path.realpath(_SOURCE))
                       for m in (cc, cc.backends)):
    raise ImportError(f"curvcore was imported from {cc.__file__} and {cc.backends.__file__}, not from {_SOURCE}")

# -- the grid --------------------------------------------------------------
BACKENDS = ["numpy", "torch:cpu", "jax:cpu", "torch:cuda", "jax:cuda", "cupy"]
CPU_BACKENDS = ["numpy", "torch:cpu", "jax:cpu"]
NATIVE_BACKENDS = ["torch:cpu", "jax:cpu", "torch:cuda", "jax:cuda"]  # where a hand-written autodiff reference exists
NETS = {"small": [64, 64, 10], "medium": [784, 512, 256, 10], "large": [2048, 2048, 2048, 10]}
BATCHES = [64, 512]
DEFAULT_BATCH = {"small": 64, "medium": 512, "large": 512}
PEERS = {"curvlinops": "torch", "backpack": "torch", "kfac_jax": "jax"}  # peer library -> curvcore backend compared
SMALL, MEDIUM = ("small", 64), ("medium", 512)
# The (net, batch) points of each kind of benchmark: "step" times steps, "ratio" divides step times,
# "product" times curvature products, "memory" measures a step's memory.
POINTS = {
    "step": [(n, b) for n in NETS for b in BATCHES],
    "ratio": list(DEFAULT_BATCH.items()),
    "product": list(DEFAULT_BATCH.items()),
    "memory": [(n, 512) for n in NETS],
}
# The points each kind runs on CPU at each CURVCORE_BENCH_GRID level (None: all); CUDA devices run all of them.
GRIDS = {
    "quick": {"step": {SMALL}, "ratio": {MEDIUM}, "product": set(), "memory": set()},
    "cpu": {"step": {SMALL, MEDIUM}, "ratio": {SMALL, MEDIUM}, "product": {SMALL, MEDIUM}, "memory": {MEDIUM}},
    "full": dict.fromkeys(POINTS),
}
QUICK_METHODS = {"step": {"sgd", "curveball"}}  # the methods of a kind on CPU in the quick grid (default: all)

GRID = os.environ.get("CURVCORE_BENCH_GRID", "quick")
if GRID not in GRIDS:
    raise ValueError(f"CURVCORE_BENCH_GRID must be one of {', '.join(GRIDS)}, got {GRID!r}")
CPU_TIME = os.environ.get("CURVCORE_BENCH_CPU_TIME", "") not in ("", "0")
if CPU_TIME and os.environ.get("OMP_NUM_THREADS") != "1":
    raise ValueError("CURVCORE_BENCH_CPU_TIME=1 needs CURVCORE_BENCH_THREADS=1: process CPU time adds up every "
                     "thread, and idle BLAS/OpenMP threads spin")
DTYPE = os.environ.get("CURVCORE_BENCH_DTYPE", "float64")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
JAX_CACHE = os.environ.get("CURVCORE_BENCH_JAX_CACHE", os.path.join(_ROOT, ".asv", "jax_cache"))
SEED = 0

# Targets of issue #9, reported next to the measured ratios, never asserted.
TARGETS = {"curveball": 1.7, "esn": 1.3, "mk": 1.3, "acp": 1.5}
CORE_OVERHEAD_TARGET = 1.1
# interleaved_min's (budget_s, min_repeats) for a step ratio: brief in the quick grid (a pseudo-Hessian step
# on medium takes seconds), the defaults otherwise
RATIO_BUDGET = (0.3, 1) if GRID == "quick" else (1.5, 3)


def method_names() -> list[str]:
    """Every registered method (SGD and Adam included), in registration order."""
    return list(cc.method_names())


# -- backends and devices ----------------------------------------------------
def parse_backend(backend: str) -> tuple[str, str]:
    """``"torch:cuda" -> ("torch", "cuda")``; ``"numpy" -> ("numpy", "cpu")``; ``"cupy" -> ("cupy", "cuda")``."""
    lib, _, dev = backend.partition(":")
    return lib, dev or ("cuda" if lib == "cupy" else "cpu")


def _cuda_ok(lib: str) -> bool:
    if lib == "torch":
        import torch

        return torch.cuda.is_available()
    if lib == "jax":
        import jax

        try:
            return bool(jax.devices("gpu"))
        except RuntimeError:
            return False
    return lib == "cupy"  # cc.backends.available("cupy") already allocated on a GPU


def nvidia_present() -> bool:
    """Whether the machine shows an NVIDIA driver, checked without importing torch/jax/cupy.

    asv runs every parameter combination in a fresh process; importing a
    framework only to learn that there is no GPU costs 1-2 s per skipped combination.
    """
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def require(backend: str) -> tuple[str, str]:
    """Raise ``NotImplementedError`` (asv: skipped) unless ``backend`` runs here."""
    lib, dev = parse_backend(backend)
    if dev == "cuda" and not nvidia_present():
        raise NotImplementedError(f"{backend}: no NVIDIA GPU on this machine")
    if not cc.backends.available(lib):
        raise NotImplementedError(f"backend {lib} is not available here ({cc.backends.unavailable_reason(lib)})")
    if dev == "cuda" and not _cuda_ok(lib):
        raise NotImplementedError(f"{backend}: no CUDA device here")
    if lib == "jax":  # settings of the benchmark process only; the library never flips them
        import jax

        jax.config.update("jax_enable_x64", DTYPE == "float64")
        if JAX_CACHE:
            jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
    return lib, dev


def installed(lib_or_backend: str) -> bool:
    """Whether a backend (or peer library) can run here, judged without importing it.

    The library must be findable (``importlib.util.find_spec``), and a CUDA
    backend needs an NVIDIA driver (:func:`nvidia_present`). An adapter that
    fails to import is still found by :func:`require` in ``setup``.
    """
    lib, dev = parse_backend(lib_or_backend)
    return importlib.util.find_spec(lib) is not None and (dev == "cpu" or nvidia_present())


def key(*parts: object) -> str:
    """A grid key, a benchmark's one parameter: ``key("torch:cpu", "sgd", "small", 64) == "torch:cpu|sgd|small|64"``."""
    return "|".join(str(p) for p in parts)


def grid(kind: str, methods: Sequence[str] | None = None, backends: Sequence[str] = BACKENDS) -> list[str]:
    """The keys ``"backend|method|net|batch"`` (``"backend|net|batch"`` without ``methods``) that run here.

    Like scipy's ``LimitedParamBenchmark``, but asv never sees what would be
    skipped (it spawns a process per parameter value): backends that are not
    :func:`installed`, CPU points outside the ``CURVCORE_BENCH_GRID`` level of
    this ``kind`` (see :data:`GRIDS`), methods outside :data:`QUICK_METHODS`.
    """
    keys = []
    for backend in filter(installed, backends):
        cpu = parse_backend(backend)[1] == "cpu"
        points = GRIDS[GRID][kind] if cpu else None
        chosen = QUICK_METHODS.get(kind) if cpu and GRID == "quick" else None
        for net, batch in POINTS[kind]:
            if points is not None and (net, batch) not in points:
                continue
            for m in [None] if methods is None else methods:
                if chosen is None or m in chosen:
                    keys.append(key(*[p for p in (backend, m, net, batch) if p is not None]))
    return keys


class Benchmark:
    """Base of the benchmark classes: ``params`` is one axis of :func:`grid` keys, ``param_names`` their format.

    A class with no key here (the CUDA ones on a machine without a GPU) has
    its benchmark functions marked ``skip_benchmark``, so asv does not list them.
    """

    params: list[str] = []
    param_names = ["backend|method|net|batch"]
    timeout = 600

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.params:
            for name, fn in vars(cls).items():
                if name.startswith(("time_", "track_", "peakmem_")):
                    fn.skip_benchmark = True


_CURRENT_DEVICE = ["cpu"]  # the device of the problem this process benchmarks (set by make_problem)


def timer() -> float:
    """The benchmark clock (asv ``timer`` attribute and :func:`interleaved_min`).

    Wall time (``perf_counter``), or process CPU time for CPU problems when
    ``CURVCORE_BENCH_CPU_TIME=1``: on a machine whose cores are shared with
    other jobs, a step longer than a scheduler slice is preempted on every
    call, and the minimum of wall times no longer measures the step.
    """
    return time.process_time() if CPU_TIME and _CURRENT_DEVICE[0] == "cpu" else time.perf_counter()


def use_timer_for(dev: str) -> None:
    """Let :func:`timer` measure process CPU time for problems on the CPU (``dev == "cpu"``), wall time otherwise."""
    _CURRENT_DEVICE[0] = dev


def _device_arg(lib: str, dev: str) -> Any:
    if lib == "numpy":
        return None
    return dev


def sync(tree: Any, lib: str, dev: str = "cpu") -> Any:
    """Wait for the device work that produced ``tree`` (any nesting of lists/tuples/dicts) on backend ``lib``."""
    if not hasattr(cc.backends, "adapter"):  # a commit before the backend table (regressions.sh benchmarks both)
        return cc.backends.block_until_ready(tree)
    return cc.backends.adapter(lib).synchronize(tree)


# -- problems ----------------------------------------------------------------
@dataclass
class Problem:
    """A tanh MLP of backend ``lib`` on ``dev`` with one batch, as the benchmarks use it."""

    lib: str
    dev: str
    sizes: list[int]
    model: Any
    params: list[Any]
    x: Any
    labels: Any  # integer labels (cross-entropy)
    onehot: Any  # float one-hot targets (MSE)
    x_np: np.ndarray
    labels_np: np.ndarray

    def sync(self, tree: Any) -> Any:
        return sync(tree, self.lib, self.dev)

    def targets(self, loss: Any) -> Any:
        return self.labels if isinstance(loss, cc.losses.CrossEntropy) else self.onehot


def make_problem(backend: str, sizes: Sequence[int], batch: int, seed: int = SEED) -> Problem:
    """The same network and batch on every backend (weights drawn with NumPy, then converted)."""
    lib, dev = require(backend)
    use_timer_for(dev)
    sizes = [int(s) for s in sizes]
    model, params = cc.backends.mlp(lib, sizes, activation="tanh", dtype=DTYPE, seed=seed,
                                    device=_device_arg(lib, dev))
    if hasattr(model, "validate"):  # a step follows the method's validate (make_optimizer); the products
        model.validate = False  # called directly follow the model's: benchmark the math, not the checks
    rng = np.random.default_rng(seed + 1)
    x_np = rng.standard_normal((int(batch), sizes[0])).astype(DTYPE)
    labels_np = rng.integers(0, sizes[-1], int(batch))
    onehot_np = np.eye(sizes[-1], dtype=DTYPE)[labels_np]
    conv = lambda a: cc.backends.asarray(lib, a, device=_device_arg(lib, dev))  # noqa: E731
    prob = Problem(lib, dev, sizes, model, params, conv(x_np), conv(labels_np), conv(onehot_np), x_np, labels_np)
    prob.sync(prob.params)
    return prob


def problem(backend: str, net: str, batch: str | int) -> Problem:
    """:func:`make_problem` at a grid point: ``net`` a name of :data:`NETS`, ``batch`` as in a key."""
    return make_problem(backend, NETS[net], int(batch))


def loss_for(method: str) -> Any:
    """Cross-entropy where the method supports it, else MSE."""
    return cc.losses.CrossEntropy() if "ce" in cc.REGISTRY[method].losses else cc.losses.MSE()


# -- steps -------------------------------------------------------------------
def make_optimizer(method: str, **overrides: Any) -> Any:
    """The registered method with its ``compare`` settings, checks off."""
    if method not in cc.REGISTRY:
        raise NotImplementedError(f"method {method!r} is not registered (yet)")
    opt = cc.REGISTRY[method].make(**overrides)
    opt.validate = False
    return opt


def provides(model: Any, need: str) -> bool:
    """``cc.protocol.provides``; a callable attribute on commits before it existed (regressions.sh runs both)."""
    check = getattr(getattr(cc, "protocol", None), "provides", None)
    return check(model, need) if check else callable(getattr(model, need, None))


def step_function(opt: Any, prob: Problem, loss: Any) -> Callable[[Any, Any], tuple[Any, Any, Any]]:
    """``step(params, state) -> (params, state, info)`` on the problem's batch; ``jax.jit`` on JAX."""
    missing = [n for n in getattr(opt, "needs", ()) if not provides(prob.model, n)]
    if missing:
        raise NotImplementedError(f"{type(opt).__name__} needs model.{missing[0]} which the {prob.lib} model lacks")
    x, y, model = prob.x, prob.targets(loss), prob.model
    if prob.lib == "jax":
        from curvcore.backends.jax import jit_step

        jitted = jit_step(opt, model, loss)
        return lambda params, state: jitted(params, state, x, y)
    return lambda params, state: opt.step(model, loss, params, state, x, y)


def cycle_length(opt: Any) -> int:
    """Steps after which a method repeats its schedule (refresh / damping-adaptation intervals)."""
    k = 1
    for attr in ("refresh_every", "lam_interval", "inverse_every", "update_every"):
        v = getattr(opt, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            k = math.lcm(k, v) if k * v <= 10_000 else max(k, v)
    return k


@dataclass
class Stepper:
    """A method ready to time on a problem: ``states[i]`` is the state after ``i`` steps."""

    method: str
    opt: Any
    loss: Any
    step: Callable[[Any, Any], tuple[Any, Any, Any]]
    prob: Problem
    params: list[Any]
    states: list[Any]
    cycle: int

    def call(self, i: int = 1) -> Callable[[], Any]:
        """A synchronised step from ``(params[i], states[i])`` (position ``i`` of the cycle)."""
        p, s = self.params[i], self.states[i]
        return lambda: self.prob.sync(self.step(p, s))


def make_stepper(method: str, prob: Problem, whole_cycle: bool = False, max_positions: int = 10,
                 **overrides: Any) -> Stepper:
    """Build the method, compile it (JAX) and precompute the states it passes through.

    ``states[0]`` is ``init``'s, ``states[i]`` the one after ``i`` steps; one
    step is taken (two on JAX), or a whole cycle (up to ``max_positions``)
    with ``whole_cycle``. The first step runs the compilation and the
    schedule's first branch (e.g. ACP's covariance refresh); on JAX the second
    one compiles again if the step's own output differs in types from
    ``init``'s state. Timings happen later.
    """
    opt = make_optimizer(method, **overrides)
    loss = loss_for(method)
    step = step_function(opt, prob, loss)
    params, states = [prob.params], [opt.init(prob.params)]
    cycle = cycle_length(opt)
    n = max(cycle if whole_cycle and cycle <= max_positions else 1, 2 if prob.lib == "jax" else 1)
    for _ in range(n):
        p, s, info = prob.sync(step(params[-1], states[-1]))
        params.append(p)
        states.append(s)
    return Stepper(method, opt, loss, step, prob, params, states, cycle)


def stepper(key: str, **kwargs: Any) -> Stepper:
    """:func:`make_stepper` for a ``"backend|method|net|batch"`` grid key."""
    backend, method, net, batch = key.split("|")
    return make_stepper(method, problem(backend, net, batch), **kwargs)


def step_ratios(keys: Sequence[str], budget: tuple[float, int] | None = None,
                log: Callable[[str, Any, float], None] = lambda *a: None) -> dict[str, Any]:
    """``{key: amortized step time / SGD step time}`` for ``"backend|method|net|batch"`` keys, in this process.

    One problem and one SGD stepper per backend, net and batch; each method
    is timed interleaved with that SGD step (:func:`interleaved_min` with
    ``budget = (budget_s, min_repeats)``, default :data:`RATIO_BUDGET`) and
    amortized over its schedule (:func:`amortized_call`). A key that cannot
    run maps to ``"NotImplementedError: why"``, one that fails to
    ``"<Error>: message"`` (see :func:`value`). ``log(key, value, seconds)``
    after each key.
    """
    groups: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for k in keys:
        backend, method, net, batch = k.split("|")
        groups.setdefault((backend, net, batch), []).append((method, k))
    out: dict[str, Any] = {}
    for (backend, net, batch), items in groups.items():
        sgd = None
        for method, k in items:
            t0 = time.perf_counter()
            try:
                sgd = sgd or make_stepper("sgd", problem(backend, net, batch))
                st = make_stepper(method, sgd.prob, whole_cycle=True)
                fn, weight = amortized_call(st)
                t = interleaved_min({"method": fn, "sgd": sgd.call(1)}, *(budget or RATIO_BUDGET))
                out[k] = t["method"] * weight / t["sgd"]
            except Exception as err:  # one key's failure must not lose the others'
                out[k] = f"{type(err).__name__}: {err}"
            log(k, out[k], time.perf_counter() - t0)
    return out


def value(v: Any) -> float:
    """A :func:`step_ratios` entry as an asv result: the float, or the error raised again (asv: skipped / failed)."""
    if isinstance(v, str):
        raise (NotImplementedError if v.startswith("NotImplementedError") else RuntimeError)(v)
    return v


def amortized_call(st: Stepper, max_positions: int = 10) -> tuple[Callable[[], None], float]:
    """``(fn, weight)``: ``fn`` times one cycle's distinct positions, ``weight`` turns its min into a per-step time.

    For a cycle of length K <= ``max_positions`` every position is stepped once
    (weight 1/K). For longer cycles (ACP's N=100) position 0 and position 1 are
    stepped and the rest assumed equal to position 1: per-step
    ``(t0 + (K-1) t1)/K``.
    """
    k = st.cycle
    if k == 1:
        return st.call(1), 1.0
    if k <= max_positions and len(st.states) > k:
        calls = [st.call(i) for i in range(k)]
        return (lambda: [c() for c in calls]), 1.0 / k
    c0, c1 = st.call(0), st.call(1)

    def run() -> None:  # measures t0 + t1; ``extra`` adds the other K-2 plain steps
        c0()
        t = timer()
        c1()
        run.extra = (timer() - t) * (k - 2)  # type: ignore[attr-defined]

    return run, 1.0 / k


# -- timing ------------------------------------------------------------------
def interleaved_min(fns: dict[str, Callable[[], Any]], budget_s: float = 1.5, min_repeats: int = 3,
                    max_repeats: int = 30) -> dict[str, float]:
    """Minimum wall time of each function over interleaved repeats (same process, same conditions).

    Functions are called in rounds, each function once per round in a shuffled
    order, so that background load affects every one alike (a fixed order
    lets a periodic preemption land on the same function every round); each
    call ends in a device synchronisation. Stops after
    ``min_repeats`` rounds once ``budget_s`` is spent, or after ``max_repeats``.
    A function with an ``extra`` attribute (see :func:`amortized_call`) adds it.
    The garbage collector is off while timing, as in ``timeit`` and asv: with
    round-robin calls its periodic collections (~20 ms with torch and jax
    imported) otherwise land on the same function every round.
    """
    best = {k: math.inf for k in fns}
    rng = random.Random(0)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        order = list(fns)
        for r in range(max_repeats):
            rng.shuffle(order)
            for k in order:
                fn = fns[k]
                t = timer()
                fn()
                dt = timer() - t + getattr(fn, "extra", 0.0)
                best[k] = min(best[k], dt)
            if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
                break
    finally:
        if enabled:
            gc.enable()
    return best


def gpu_peak_bytes(prob: Problem, fn: Callable[[], Any]) -> float:
    """Peak device memory (bytes) of one call of ``fn``; ``NotImplementedError`` on CPU.

    torch: ``max_memory_allocated`` after ``reset_peak_memory_stats``; JAX:
    ``peak_bytes_in_use`` of the device (since process start: asv runs each
    benchmark in a fresh process, so it includes setup's arrays); CuPy: the
    default memory pool's ``total_bytes`` after emptying it (the pool keeps
    every block the call needed, so this is its peak up to fragmentation).
    """
    if prob.dev != "cuda":
        raise NotImplementedError("GPU memory is tracked on CUDA devices only")
    if prob.lib == "torch":
        import torch

        prob.sync(None)
        torch.cuda.reset_peak_memory_stats()
        fn()
        prob.sync(None)
        return float(torch.cuda.max_memory_allocated())
    if prob.lib == "jax":
        import jax

        fn()
        stats = jax.devices("gpu")[0].memory_stats() or {}
        if "peak_bytes_in_use" not in stats:
            raise NotImplementedError("this JAX device reports no peak_bytes_in_use")
        return float(stats["peak_bytes_in_use"])
    import cupy

    pool = cupy.get_default_memory_pool()
    prob.sync(None)
    pool.free_all_blocks()
    fn()
    prob.sync(None)
    return float(pool.total_bytes())


# -- hand-written native references (torch.func / jax) ------------------------
def random_tangent(prob: Problem, seed: int = 7) -> list[Any]:
    """A random params-like direction on the problem's backend."""
    rng = np.random.default_rng(seed)
    return [cc.backends.asarray(prob.lib, rng.standard_normal(tuple(p.shape)).astype(DTYPE),
                                device=_device_arg(prob.lib, prob.dev)) for p in prob.params]


def curvcore_ggn(model: Any, loss: Any, params: list[Any], x: Any, y: Any, v: list[Any]) -> list[Any]:
    """curvcore's GGN-vector product ``J^T H_L J v``: ``cc.ggn_vp`` (one linearisation, 1 JVP, 1 VJP)."""
    return cc.ggn_vp(model, loss, params, x, y, v)


def curvcore_ggn_function(prob: Problem) -> Callable[[list[Any]], Any]:
    """``v -> G v`` with curvcore on the problem's backend (``jax.jit`` on JAX), cross-entropy."""
    loss, model, x, y = cc.losses.CrossEntropy(), prob.model, prob.x, prob.labels
    if prob.lib == "jax":  # the batch is an argument: a closed-over one is a constant XLA folds
        import jax

        f = jax.jit(lambda p, v, xb, yb: curvcore_ggn(model, loss, p, xb, yb, v))
    else:
        f = lambda p, v, xb, yb: curvcore_ggn(model, loss, p, xb, yb, v)  # noqa: E731
    params = prob.params
    return lambda v: f(params, v, x, y)


def torch_mlp(params: Sequence[Any], x: Any) -> Any:
    """The benchmarks' tanh MLP ``[W1, b1, ...]`` on ``x``, hand-written in torch (the native reference)."""
    import torch

    h = x
    for i in range(0, len(params), 2):
        h = torch.addmm(params[i + 1], h, params[i].T)
        if i < len(params) - 2:
            h = torch.tanh(h)
    return h


def jax_mlp(params: Sequence[Any], x: Any) -> Any:
    """The benchmarks' tanh MLP ``[W1, b1, ...]`` on ``x``, hand-written in JAX (the native reference)."""
    import jax.numpy as jnp

    h = x
    for i in range(0, len(params), 2):
        h = h @ params[i].T + params[i + 1]
        if i < len(params) - 2:
            h = jnp.tanh(h)
    return h


def native_functions(prob: Problem) -> dict[str, Callable[..., Any]]:
    """Hand-written torch.func / JAX reference products on the same MLP and batch (cross-entropy, mean).

    Returns ``grad()``, ``ggn(v)`` (jvp, closed-form softmax Hessian, vjp: two
    forwards, as curvcore's) and ``hvp(v)`` (forward-over-reverse); jitted on
    JAX. ``NotImplementedError`` for NumPy/CuPy (no autodiff to compare with).
    """
    params, x, y, batch = prob.params, prob.x, prob.labels, prob.x.shape[0]
    if prob.lib == "torch":
        import torch
        import torch.nn.functional as F
        from torch.func import grad, jvp, vjp

        params = tuple(params)
        f = lambda p: torch_mlp(p, x)  # noqa: E731
        lossf = lambda p: F.cross_entropy(torch_mlp(p, x), y)  # noqa: E731

        def ggn(v: Sequence[Any]) -> Any:
            out, jv = jvp(f, (params,), (tuple(v),))
            s = torch.softmax(out, dim=1)
            hjv = (s * jv - s * (s * jv).sum(dim=1, keepdim=True)) / batch
            _, pull = vjp(f, params)
            return pull(hjv)[0]

        return {
            "grad": lambda: grad(lossf)(params),
            "ggn": ggn,
            "hvp": lambda v: jvp(grad(lossf), (params,), (tuple(v),))[1],
        }
    if prob.lib == "jax":
        import jax
        import jax.numpy as jnp

        params = list(params)

        def lossf(p: Any, xb: Any, yb: Any) -> Any:
            out = jax_mlp(p, xb)
            return jnp.mean(jax.nn.logsumexp(out, axis=1) - jnp.take_along_axis(out, yb[:, None], axis=1)[:, 0])

        def ggn(p: Any, v: Any, xb: Any) -> Any:
            f = lambda q: jax_mlp(q, xb)  # noqa: E731
            out, jv = jax.jvp(f, (p,), (v,))
            s = jax.nn.softmax(out, axis=1)
            hjv = (s * jv - s * jnp.sum(s * jv, axis=1, keepdims=True)) / batch
            return jax.vjp(f, p)[1](hjv)[0]

        # the batch is an argument: a closed-over one is a constant XLA folds
        g, gg = jax.jit(jax.grad(lossf)), jax.jit(ggn)
        h = jax.jit(lambda p, v, xb, yb: jax.jvp(lambda q: jax.grad(lossf)(q, xb, yb), (p,), (v,))[1])
        return {"grad": lambda: g(params, x, y), "ggn": lambda v: gg(params, list(v), x),
                "hvp": lambda v: h(params, list(v), x, y)}
    raise NotImplementedError(f"no hand-written autodiff reference on {prob.lib}")


def pseudo_hessian_groups(st: Stepper) -> int:
    """S, the pseudo-Hessian's number of parameter groups (``info["n_groups"]``, else from ``groups``)."""
    _, _, info = st.prob.sync(st.step(st.params[1], st.states[1]))
    if isinstance(info, dict) and "n_groups" in info:
        return int(cc.backends.to_numpy(info["n_groups"]))
    groups = getattr(st.opt, "groups", "tensor")
    n_tensors = len(st.params[0])
    if isinstance(groups, str):
        return {"tensor": n_tensors, "layer": n_tensors // 2, "wb": 2, "one": 1}.get(groups, n_tensors)
    return len(set(groups))
