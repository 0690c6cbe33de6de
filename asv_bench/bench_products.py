"""Curvature products on their own: curvcore vs hand-written native code, peers, each method's core product."""

from __future__ import annotations

from . import common as C
from . import core_products


class GGNOverhead(C.Benchmark):
    """curvcore's GGN-vector product vs a hand-written torch.func / JAX one on the same MLP (cross-entropy).

    curvcore: the adapter's ``jvp`` and ``vjp`` with the array-API loss Hessian
    in between (``common.curvcore_ggn``); native: the same three steps written
    directly in the framework (``common.native_functions``). Both jitted on JAX.
    ``track_ggn_over_native`` is the core's overhead (target <= 1.1);
    ``time_ggn_curvcore`` is there for regression tracking.
    """

    params = C.grid("product", backends=C.NATIVE_BACKENDS)
    param_names = ["backend|net|batch"]
    timeout = 300

    def setup(self, key: str) -> None:
        self.prob = C.problem(*key.split("|"))
        self.v = C.random_tangent(self.prob)
        curv, nat = C.curvcore_ggn_function(self.prob), C.native_functions(self.prob)["ggn"]
        p, v = self.prob, self.v
        self.curvcore = lambda: p.sync(curv(v))
        self.native = lambda: p.sync(nat(v))
        self.curvcore()  # compile / warm up
        self.native()

    def time_ggn_curvcore(self, key: str) -> None:
        self.curvcore()

    time_ggn_curvcore.timer = C.timer  # type: ignore[attr-defined]  # CPU time with CURVCORE_BENCH_CPU_TIME=1

    def track_ggn_over_native(self, key: str) -> float:
        t = C.interleaved_min({"curvcore": self.curvcore, "native": self.native})
        return t["curvcore"] / t["native"]

    track_ggn_over_native.unit = "ratio"  # type: ignore[attr-defined]


class Peers(C.Benchmark):
    """The same GGN-vector product with a peer library vs curvcore on the same network and batch.

    ``curvlinops`` (``GGNLinearOperator @ v``) and ``backpack``
    (``ggn_vector_product_from_plist``, forward included) against curvcore's
    torch backend; ``kfac_jax`` (``ImplicitExactCurvature.multiply_ggn``,
    jitted) against curvcore's jax backend. ``track_curvcore_over_peer`` < 1
    means curvcore is faster. Peers that are not installed are left out of the grid.
    """

    params = [k for peer, lib in C.PEERS.items() if C.installed(peer)
              for k in C.grid("product", [peer], [f"{lib}:cpu", f"{lib}:cuda"])]
    param_names = ["backend|peer|net|batch"]
    timeout = 300

    def setup(self, key: str) -> None:
        backend, peer, net, batch = key.split("|")
        self.prob = C.problem(backend, net, batch)
        self.v = C.random_tangent(self.prob)
        curv, peer_fn = C.curvcore_ggn_function(self.prob), core_products.peer_ggn(peer, self.prob)
        p, v = self.prob, self.v
        self.curvcore = lambda: p.sync(curv(v))
        self.peer = lambda: p.sync(peer_fn(v))
        self.curvcore()
        self.peer()

    def track_curvcore_over_peer(self, key: str) -> float:
        t = C.interleaved_min({"curvcore": self.curvcore, "peer": self.peer})
        return t["curvcore"] / t["peer"]

    track_curvcore_over_peer.unit = "ratio"  # type: ignore[attr-defined]


class CoreProduct(C.Benchmark):
    """Each method's characteristic product on its own (see ``core_products.CORE``).

    CurveBall's ``dz``, the pseudo-Hessian's S x S system, ESN's layer solve,
    ACP's covariance refresh: timed by calling the method's own internal
    functions; skipped where the method (or such a function) is not there.
    ``asv_bench/report.py`` divides it by ``Step.time_step`` (same backend,
    net and batch) for the share of the step.
    """

    params = C.grid("product", [m for m in core_products.CORE if m in C.method_names()])
    timeout = 300

    def setup(self, key: str) -> None:
        self.st = C.stepper(key)
        self.fn = core_products.CORE[self.st.method](self.st)
        self.fn()

    def time_core(self, key: str) -> None:
        self.fn()

    time_core.timer = C.timer  # type: ignore[attr-defined]  # CPU time with CURVCORE_BENCH_CPU_TIME=1
