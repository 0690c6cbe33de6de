"""What the curvcore benchmarks share: the grid, problems, steps, synchronisation, timing.

Modelled on scipy ``benchmarks/benchmarks/common.py::XPBenchmark``: a backend
string names a library and a device (``"torch:cuda"``); a combination that
cannot run here raises ``NotImplementedError`` in ``setup`` (asv's skip);
every timed call ends in a device synchronisation; jit compilation happens in
``setup``, never inside a timing.

This module is imported by asv's benchmark discovery (asv imports every module
under ``asv_bench/``), so it imports only NumPy and curvcore at the top; torch,
jax and cupy are imported inside the functions that need them. It defines no
``time_*``/``track_*``/``peakmem_*`` names, so asv finds no benchmark in it.

Environment variables:
    CURVCORE_BENCH_GRID: how much of the size x batch grid runs on CPU
        (LimitedParamBenchmark-style; GPU devices always run all of it):
        ``quick`` (default) runs ``small``/B=64 (memory: ``medium``/B=512)
        and leaves out the JAX pseudo-Hessian, whose
        ``jax.jit`` compilation alone takes 30 s or more on 2 cores, and
        measures memory on NumPy only; ``cpu`` adds ``medium``/B=512, the JAX
        pseudo-Hessian and memory on torch and JAX; ``full`` runs every
        size and batch (the ``large`` net costs seconds per step on 2 cores).
    CURVCORE_BENCH_DTYPE=float32: benchmark in float32 (default float64, the
        dtype of the test suite).
    CURVCORE_BENCH_CPU_TIME=1: time CPU benchmarks in process CPU time
        (``time.process_time``) instead of wall time; for a shared, loaded
        machine, together with ``CURVCORE_BENCH_THREADS=1`` (see
        ``asv_bench/__init__.py``). CUDA benchmarks always use wall time.
"""

from __future__ import annotations

import gc
import importlib
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
GRIDS = {  # (net, batch) pairs timed on CPU at each CURVCORE_BENCH_GRID level; None = all
    "quick": {("small", 64)},
    "cpu": {("small", 64), ("medium", 512)},
    "full": None,
}
MEM_GRIDS = {"quick": {("medium", 512)}, "cpu": {("medium", 512)}, "full": None}
SLOW_COMPILE = {("jax", "pseudo_hessian")}  # left out of the quick grid on CPU
DEFAULT_BATCH = {"small": 64, "medium": 512, "large": 512}

GRID = os.environ.get("CURVCORE_BENCH_GRID", "quick")
if GRID not in GRIDS:
    raise ValueError(f"CURVCORE_BENCH_GRID must be one of {', '.join(GRIDS)}, got {GRID!r}")
CPU_TIME = os.environ.get("CURVCORE_BENCH_CPU_TIME", "") not in ("", "0")
if CPU_TIME and os.environ.get("OMP_NUM_THREADS") != "1":
    raise ValueError("CURVCORE_BENCH_CPU_TIME=1 needs CURVCORE_BENCH_THREADS=1: process CPU time adds up every "
                     "thread, and idle BLAS/OpenMP threads spin")
DTYPE = os.environ.get("CURVCORE_BENCH_DTYPE", "float64")
SEED = 0

# Targets of issue #9, reported next to the measured ratios, never asserted.
TARGETS = {"curveball": 1.7, "esn": 1.3, "mk": 1.3, "acp": 1.5}
CORE_OVERHEAD_TARGET = 1.1


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
        why = "not installed"
        if lib in ("torch", "jax"):
            try:
                importlib.import_module(f"curvcore.backends.{lib}")
            except Exception as err:  # the adapter's own import error says why
                why = f"{type(err).__name__}: {err}"
        raise NotImplementedError(f"backend {lib} is not available here ({why})")
    if dev == "cuda" and not _cuda_ok(lib):
        raise NotImplementedError(f"{backend}: no CUDA device here")
    if lib == "jax" and DTYPE == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # the benchmark process only; the library never flips it
    return lib, dev


def in_grid(backend: str, net: str, batch: int, method: str = "", memory: bool = False) -> None:
    """The limited grid on CPU: raise ``NotImplementedError`` outside it (see ``CURVCORE_BENCH_GRID``)."""
    lib, dev = parse_backend(backend)
    if dev != "cpu":
        return
    allowed = (MEM_GRIDS if memory else GRIDS)[GRID]
    if allowed is not None and (net, int(batch)) not in allowed:
        raise NotImplementedError(f"{net}/B={batch} on CPU is not in CURVCORE_BENCH_GRID={GRID}")
    if GRID == "quick" and ((lib, method) in SLOW_COMPILE or (memory and lib != "numpy")):
        raise NotImplementedError(f"{backend} {method or ''} is left out of CURVCORE_BENCH_GRID=quick")


_CURRENT_DEVICE = ["cpu"]  # the device of the problem this process benchmarks (set by make_problem)


def timer() -> float:
    """The benchmark clock (asv ``timer`` attribute and :func:`interleaved_min`).

    Wall time (``perf_counter``), or process CPU time for CPU problems when
    ``CURVCORE_BENCH_CPU_TIME=1``: on a machine whose cores are shared with
    other jobs, a step longer than a scheduler slice is preempted on every
    call, and the minimum of wall times no longer measures the step.
    """
    return time.process_time() if CPU_TIME and _CURRENT_DEVICE[0] == "cpu" else time.perf_counter()


def _device_arg(lib: str, dev: str) -> Any:
    if lib == "numpy":
        return None
    return dev


def sync(tree: Any, lib: str, dev: str) -> Any:
    """Wait for the device work that produced ``tree`` (any nesting of lists/tuples/dicts)."""
    if lib == "jax":
        import jax

        jax.block_until_ready(tree)
    elif dev == "cuda" and lib == "torch":
        import torch

        torch.cuda.synchronize()
    elif lib == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    return tree


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
    _CURRENT_DEVICE[0] = dev
    sizes = [int(s) for s in sizes]
    model, params = cc.backends.mlp(lib, sizes, activation="tanh", dtype=DTYPE, seed=seed,
                                    device=_device_arg(lib, dev))
    if hasattr(model, "validate"):
        model.validate = False  # benchmark the math, not the input checks (they sync the device)
    rng = np.random.default_rng(seed + 1)
    x_np = rng.standard_normal((int(batch), sizes[0])).astype(DTYPE)
    labels_np = rng.integers(0, sizes[-1], int(batch))
    onehot_np = np.eye(sizes[-1], dtype=DTYPE)[labels_np]
    conv = lambda a: cc.backends.asarray(lib, a, device=_device_arg(lib, dev))  # noqa: E731
    prob = Problem(lib, dev, sizes, model, params, conv(x_np), conv(labels_np), conv(onehot_np), x_np, labels_np)
    prob.sync(prob.params)
    return prob


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


def step_function(opt: Any, prob: Problem, loss: Any) -> Callable[[Any, Any], tuple[Any, Any, Any]]:
    """``step(params, state) -> (params, state, info)`` on the problem's batch; ``jax.jit`` on JAX."""
    missing = [n for n in getattr(opt, "needs", ()) if not callable(getattr(prob.model, n, None))]
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

    ``states[0]`` is ``init``'s, ``states[i]`` the one after ``i`` steps; two
    steps are taken, or a whole cycle (up to ``max_positions``) with
    ``whole_cycle``. The first step runs the compilation and the schedule's
    first branch (e.g. ACP's covariance refresh); timings happen later.
    """
    opt = make_optimizer(method, **overrides)
    loss = loss_for(method)
    step = step_function(opt, prob, loss)
    params, states = [prob.params], [opt.init(prob.params)]
    cycle = cycle_length(opt)
    n = max(2, cycle) if whole_cycle and cycle <= max_positions else 2
    for _ in range(n):
        p, s, info = prob.sync(step(params[-1], states[-1]))
        params.append(p)
        states.append(s)
    prob.sync(step(params[1], states[1]))  # a second call: any lazy initialisation is done
    return Stepper(method, opt, loss, step, prob, params, states, cycle)


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

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
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
    cupy.cuda.get_current_stream().synchronize()
    pool.free_all_blocks()
    fn()
    cupy.cuda.get_current_stream().synchronize()
    return float(pool.total_bytes())


# -- hand-written native references (torch.func / jax) ------------------------
def random_tangent(prob: Problem, seed: int = 7) -> list[Any]:
    """A random params-like direction on the problem's backend."""
    rng = np.random.default_rng(seed)
    return [cc.backends.asarray(prob.lib, rng.standard_normal(tuple(p.shape)).astype(DTYPE),
                                device=_device_arg(prob.lib, prob.dev)) for p in prob.params]


def curvcore_ggn(model: Any, loss: Any, params: list[Any], x: Any, y: Any, v: list[Any]) -> list[Any]:
    """curvcore's GGN-vector product ``J^T H_L J v`` through the protocol (adapter jvp/vjp + closed-form loss)."""
    out, jv = model.jvp(params, x, v)
    _, pullback = model.vjp(params, x)
    return pullback(loss.hvp(out, y, jv))


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


def _torch_mlp(params: Sequence[Any], x: Any) -> Any:
    import torch

    h = x
    for i in range(0, len(params), 2):
        h = torch.addmm(params[i + 1], h, params[i].T)
        if i < len(params) - 2:
            h = torch.tanh(h)
    return h


def _jax_mlp(params: Sequence[Any], x: Any) -> Any:
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
        f = lambda p: _torch_mlp(p, x)  # noqa: E731
        lossf = lambda p: F.cross_entropy(_torch_mlp(p, x), y)  # noqa: E731

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
            out = _jax_mlp(p, xb)
            return jnp.mean(jax.nn.logsumexp(out, axis=1) - jnp.take_along_axis(out, yb[:, None], axis=1)[:, 0])

        def ggn(p: Any, v: Any, xb: Any) -> Any:
            f = lambda q: _jax_mlp(q, xb)  # noqa: E731
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
