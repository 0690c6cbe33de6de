"""Full optimisation steps of every registered method: time, memory, and the ratio to SGD.

The method axis is ``cc.method_names()`` at import: a method module that
registers itself is benchmarked without editing this file.
"""

from __future__ import annotations

from . import common as C
from . import memory


class Step(C.Benchmark):
    """One full ``step`` (synchronised; jit-compiled in ``setup`` on JAX).

    Timed from the state after one step (a plain step of any refresh schedule;
    the amortized cost is :class:`StepRatio`'s). CPU runs the limited grid of
    :mod:`asv_bench.common` (``CURVCORE_BENCH_GRID``).
    """

    params = C.grid("step", C.method_names())
    warmup_time = 0.0  # setup already stepped twice

    def setup(self, key: str) -> None:
        self.fn = C.stepper(key).call(1)

    def time_step(self, key: str) -> None:
        self.fn()

    time_step.timer = C.timer  # type: ignore[attr-defined]  # CPU time with CURVCORE_BENCH_CPU_TIME=1


class PeakMem(C.Benchmark):
    """Peak resident memory of the process around one step (CPU backends; asv ``peakmem_``).

    asv reports the process's maximum RSS, setup and the framework import
    included; compare methods at the same backend and size, not absolute
    numbers. GPU memory is :class:`GPUMemory`'s.
    """

    params = C.grid("memory", C.method_names(), C.CPU_BACKENDS)

    def setup(self, key: str) -> None:
        self.fn = C.stepper(key).call(1)

    def peakmem_step(self, key: str) -> None:
        self.fn()


class GPUMemory(C.Benchmark):
    """Peak GPU memory (bytes) of one step: torch ``max_memory_allocated``, JAX ``peak_bytes_in_use``, CuPy pool."""

    params = C.grid("memory", C.method_names(), ["torch:cuda", "jax:cuda", "cupy"])

    def setup(self, key: str) -> None:
        self.st = C.stepper(key)

    def track_gpu_peak_bytes(self, key: str) -> float:
        return C.gpu_peak_bytes(self.st.prob, self.st.call(1))

    track_gpu_peak_bytes.unit = "bytes"  # type: ignore[attr-defined]


class StepRatio(C.Benchmark):
    """Amortized step time over one SGD step (momentum 0.9), measured in the same process.

    Both are timed interleaved, minimum of repeats; a method with a schedule
    (ACP's covariance refresh every N steps, CurveBall's damping adaptation
    every k) is averaged over one cycle (see ``common.amortized_call``).
    Targets (reported by ``asv_bench/report.py``, never asserted): CurveBall
    <= 1.7, ESN/MK <= 1.3, ACP <= 1.5.

    Every ratio of the grid is measured in ``setup_cache``, one process
    (``common.step_ratios``: each framework imported once, one SGD stepper
    per backend and net), and each key's process only reads its number: a
    process per key would import torch or JAX 27 times in the quick grid.
    So ``-b`` on one key still measures the whole grid of this class;
    ``asv_bench/report.py --measure`` measures a selection.
    """

    params = C.grid("ratio", C.method_names())
    timeout = 1800

    def setup_cache(self) -> dict[str, object]:
        return C.step_ratios(self.params)

    def track_step_over_sgd(self, ratios: dict[str, object], key: str) -> float:
        return C.value(ratios[key])

    track_step_over_sgd.unit = "ratio"  # type: ignore[attr-defined]


class PseudoHessianBudget(C.Benchmark):
    """Pseudo-Hessian step over ``1 gradient + S Hessian-vector products`` (hand-written native, same process).

    The issue's target is <= 1 (the step costs at most a gradient plus S HVPs,
    S = the number of parameter groups). torch / JAX only: NumPy has no
    autodiff HVP to compare with.
    """

    params = C.grid("product", ["pseudo_hessian"] if "pseudo_hessian" in C.method_names() else [], C.NATIVE_BACKENDS)

    def setup(self, key: str) -> None:
        self.st = C.stepper(key)
        self.prob = self.st.prob
        self.groups = C.pseudo_hessian_groups(self.st)
        self.native = C.native_functions(self.prob)
        self.v = C.random_tangent(self.prob)
        self.prob.sync(self.native["hvp"](self.v))
        self.prob.sync(self.native["grad"]())

    def track_step_over_grad_plus_s_hvp(self, key: str) -> float:
        p, nat, v = self.prob, self.native, self.v
        t = C.interleaved_min({"step": self.st.call(1), "grad": lambda: p.sync(nat["grad"]()),
                               "hvp": lambda: p.sync(nat["hvp"](v))})
        return t["step"] / (t["grad"] + self.groups * t["hvp"])

    track_step_over_grad_plus_s_hvp.unit = "ratio"  # type: ignore[attr-defined]


class PeakMemoryRatio(C.Benchmark):
    """Peak memory of one step over SGD's: torch CPU, float32, a fresh process per method and point.

    The peak resident-set rise of the first step, as ``asv_bench/memory.py``
    measures it (``VmHWM - VmRSS`` around a repeated step, in a new Python
    process). At ``torch:cpu|<method>|medium|512`` this is the definition of
    the pseudo-Hessian's memory goal (<= 2x SGD). float32 whatever
    ``CURVCORE_BENCH_DTYPE`` says. SGD is measured once per point, in ``setup_cache``.
    """

    params = C.grid("memory", C.method_names(), ["torch:cpu"])

    def setup_cache(self) -> dict[str, float]:
        sgd = {}
        for k in self.params:  # memory.fresh caches: SGD runs once per point
            backend, _, net, batch = k.split("|")
            sgd[k] = memory.at_key(C.key(backend, "sgd", net, batch))
        return sgd

    def track_peak_memory_over_sgd(self, sgd: dict[str, float], key: str) -> float:
        return memory.at_key(key) / sgd[key]

    track_peak_memory_over_sgd.unit = "ratio"  # type: ignore[attr-defined]
