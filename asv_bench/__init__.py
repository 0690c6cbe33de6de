"""asv benchmarks of curvcore (see docs/benchmarks.md).

``CURVCORE_BENCH_THREADS=n`` caps the CPU threads of every library in the
benchmark processes (OpenMP/torch, OpenBLAS, MKL, and XLA for n=1). It is set
here, before any of them is imported, because asv imports this package first.
Under asv (which sets ``ASV=true``) it defaults to 1; ``0`` or an empty
value leaves the libraries their own defaults. On a shared machine use 1:
with 2 OpenMP threads on 2 busy cores, a torch matmul of a 64-wide layer
sometimes takes a whole scheduler quantum (25 ms instead of 20 us;
docs/benchmarks.md, "Noise"), and the quick grid took 184 s with the default
threads against 113 s with one (2026-11-29; docs/benchmarks.md, "The quick
grid since 2026-11-29").
"""

import os

_THREADS = os.environ.get("CURVCORE_BENCH_THREADS", "1" if os.environ.get("ASV") == "true" else "0")
if _THREADS not in ("", "0"):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _THREADS)
    if _THREADS == "1":
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
