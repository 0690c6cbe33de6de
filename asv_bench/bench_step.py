"""Full optimisation steps of every registered method: time, memory, and the ratio to SGD.

The method axis is ``cc.method_names()`` at import: a method module that
registers itself is benchmarked without editing this file.
"""

from __future__ import annotations

from . import common as C


class Step:
    """One full ``step`` (synchronised; jit-compiled in ``setup`` on JAX).

    Timed from the state after one step (a plain step of any refresh schedule;
    the amortized cost is :class:`StepRatio`'s). CPU runs the limited grid of
    :mod:`asv_bench.common` (``CURVCORE_BENCH_GRID``).
    """

    params = (C.BACKENDS, C.method_names(), list(C.NETS), C.BATCHES)
    param_names = ("backend", "method", "net", "batch")
    timeout = 600
    warmup_time = 0.0  # setup already stepped twice

    def setup(self, backend: str, method: str, net: str, batch: int) -> None:
        C.in_grid(backend, net, batch, method)
        self.prob = C.make_problem(backend, C.NETS[net], batch)
        self.st = C.make_stepper(method, self.prob)
        self.fn = self.st.call(1)

    def time_step(self, *args: object) -> None:
        self.fn()

    time_step.timer = C.timer  # type: ignore[attr-defined]  # CPU time with CURVCORE_BENCH_CPU_TIME=1


class PeakMem:
    """Peak resident memory of the process around one step (CPU backends; asv ``peakmem_``).

    asv reports the process's maximum RSS, setup and the framework import
    included; compare methods at the same backend and size, not absolute
    numbers. GPU memory is :class:`GPUMemory`'s.
    """

    params = (C.CPU_BACKENDS, C.method_names(), ["medium", "large"], [512])
    param_names = ("backend", "method", "net", "batch")
    timeout = 600

    def setup(self, backend: str, method: str, net: str, batch: int) -> None:
        C.in_grid(backend, net, batch, method, memory=True)
        self.prob = C.make_problem(backend, C.NETS[net], batch)
        self.st = C.make_stepper(method, self.prob)
        self.fn = self.st.call(1)

    def peakmem_step(self, *args: object) -> None:
        self.fn()


class GPUMemory:
    """Peak GPU memory (bytes) of one step: torch ``max_memory_allocated``, JAX ``peak_bytes_in_use``, CuPy pool."""

    params = (["torch:cuda", "jax:cuda", "cupy"], C.method_names(), list(C.NETS), [512])
    param_names = ("backend", "method", "net", "batch")
    timeout = 600

    def setup(self, backend: str, method: str, net: str, batch: int) -> None:
        C.require(backend)
        self.prob = C.make_problem(backend, C.NETS[net], batch)
        self.st = C.make_stepper(method, self.prob)

    def track_gpu_peak_bytes(self, *args: object) -> float:
        return C.gpu_peak_bytes(self.prob, self.st.call(1))

    track_gpu_peak_bytes.unit = "bytes"  # type: ignore[attr-defined]


class StepRatio:
    """Amortized step time over one SGD step (momentum 0.9), measured in the same process.

    Both are timed interleaved, minimum of repeats; a method with a schedule
    (ACP's covariance refresh every N steps, CurveBall's damping adaptation
    every k) is averaged over one cycle (see ``common.amortized_call``).
    Targets (reported by ``asv_bench/report.py``, never asserted): CurveBall
    <= 1.7, ESN/MK <= 1.3, ACP <= 1.5.
    """

    params = (C.BACKENDS, C.method_names(), list(C.NETS))
    param_names = ("backend", "method", "net")
    timeout = 600

    def setup(self, backend: str, method: str, net: str) -> None:
        batch = C.DEFAULT_BATCH[net]
        C.in_grid(backend, net, batch, method)
        self.prob = C.make_problem(backend, C.NETS[net], batch)
        self.st = C.make_stepper(method, self.prob, whole_cycle=True)
        self.sgd = C.make_stepper("sgd", self.prob)

    def track_step_over_sgd(self, *args: object) -> float:
        fn, weight = C.amortized_call(self.st)
        t = C.interleaved_min({"method": fn, "sgd": self.sgd.call(1)})
        return t["method"] * weight / t["sgd"]

    track_step_over_sgd.unit = "ratio"  # type: ignore[attr-defined]


class PseudoHessianBudget:
    """Pseudo-Hessian step over ``1 gradient + S Hessian-vector products`` (hand-written native, same process).

    The issue's target is <= 1 (the step costs at most a gradient plus S HVPs,
    S = the number of parameter groups). torch / JAX only: NumPy has no
    autodiff HVP to compare with.
    """

    params = (C.NATIVE_BACKENDS, list(C.NETS))
    param_names = ("backend", "net")
    timeout = 600

    def setup(self, backend: str, net: str) -> None:
        batch = C.DEFAULT_BATCH[net]
        C.in_grid(backend, net, batch, "pseudo_hessian")
        if "pseudo_hessian" not in C.cc.REGISTRY:
            raise NotImplementedError("pseudo_hessian is not registered (yet)")
        self.prob = C.make_problem(backend, C.NETS[net], batch)
        self.st = C.make_stepper("pseudo_hessian", self.prob)
        self.groups = C.pseudo_hessian_groups(self.st)
        self.native = C.native_functions(self.prob)
        self.v = C.random_tangent(self.prob)
        self.prob.sync(self.native["hvp"](self.v))
        self.prob.sync(self.native["grad"]())

    def track_step_over_grad_plus_s_hvp(self, *args: object) -> float:
        p, nat, v = self.prob, self.native, self.v
        t = C.interleaved_min({"step": self.st.call(1), "grad": lambda: p.sync(nat["grad"]()),
                               "hvp": lambda: p.sync(nat["hvp"](v))})
        return t["step"] / (t["grad"] + self.groups * t["hvp"])

    track_step_over_grad_plus_s_hvp.unit = "ratio"  # type: ignore[attr-defined]
