"""K-FAC with two Kronecker factors per dense or Conv2d layer (Martens & Grosse 2015; Grosse & Martens 2016).

Equations, conventions and checks: curvcore's K-FAC page (docs/methods) and
the tests in ``tests/test_kfac.py``, matched to curvlinops 3.0.1
``KFACLinearOperator`` (``kfac_approx="expand"``, ``separate_weight_and_bias=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import device

from .._namespace import array_namespace

from .._checks import check_choice, check_int, check_nonnegative, check_positive, check_shapes
from .._linalg import inv_psd
from .._reduce import batch_size, current
from .. import tree
from ..layers import records
from ..losses import get as get_loss
from ..protocol import Array, flat_model
from ..random import host_generator
from . import _kronecker as kr
from ._base import (LayerwiseMethod, check_flag, check_grads_finite, method_errors, n_preconditioned, step_info,
                    zero_count)
from ._registry import register

FISHERS = ("empirical", "type-2", "mc")


class KFACState(NamedTuple):
    """``count`` (0-d int) and per layer the damped inverse factors from the last refresh:
    ``A_inv`` ``(D+1, D+1)`` (``D = n_in``, or ``C_in kh kw`` for a convolution) and ``G_inv``
    ``(n_out, n_out)``."""

    count: Any
    A_inv: list
    G_inv: list


class KFAC(LayerwiseMethod):
    """Block-diagonal K-FAC with two Kronecker factors per dense and Conv2d layer.

    Per layer, on the joint parameter ``Θ = [W_mat b]`` (``n_out x (D+1)``; a
    convolution's weight flattened to ``(C_out, C_in kh kw)``), with ``ā = (a; 1)``
    the layer input (a convolution's unfolded patches) at each of the ``S``
    positions of each of the ``B`` examples::

        A = 1/(B S) Σ_i Σ_p ā_ip ā_ipᵀ          G = 1/B Σ_i Σ_p δ_ip δ_ipᵀ
        ΔΘ = -lr (G + √d I)⁻¹ ∇_Θ L (A + √d I)⁻¹

    i.e. ``-lr ((G + √d I) ⊗ (A + √d I))⁻¹ vec_row(∇_Θ L)`` (factored damping
    with π = 1). ``A`` is averaged over positions and ``G`` summed over them
    (the "expand" factors of KFC; curvlinops' split). The output vectors ``δ``:

    * ``fisher="empirical"``: ``δ_ip = B g_ip`` from the true labels (no extra pass);
    * ``fisher="type-2"``: the exact GGN ``1/B Σ_i Σ_p J_ipᵀ H_i J_ip``, from one
      extra backward pass per column of a square root of the loss Hessian
      (``C`` passes at a refresh; outputs must be ``(B, C)``);
    * ``fisher="mc"``: ``mc_samples`` targets per example sampled from the model
      (MSE ``ỹ = f + N(0, I)``, CE ``ỹ ~ softmax(f)``), ``G = (B/M) Σ_m g̃_mᵀ g̃_m``,
      an unbiased estimate of type-2. Draws come from NumPy's
      ``default_rng([seed, count])`` (through :mod:`curvcore.random`) so every
      backend sees the same ones; they need a concrete step count, so
      ``"mc"`` is not ``jax.jit``-able (a ``TypeError`` says so).

    Factors and their inverses (Cholesky) are recomputed when
    ``count % refresh_every == 0`` on the update minibatch and kept otherwise.
    Layers K-FAC preconditions: dense and Conv2d (groups = 1) with a bias;
    every other parameter (BatchNorm affine, a layer without bias) takes the
    plain gradient step ``-lr g`` (``info["n_preconditioned"]``; ``strict=True``
    raises instead).

    Cost per step: one forward + one backward (the records), plus per layer
    two ``(n_out x n_out)``/``((D+1) x (D+1))`` matrix products; a refresh adds
    the factors (``O(B S D²)``), two Cholesky inverses per layer and, for
    ``"type-2"``/``"mc"``, ``C``/``M`` more backward passes.

    Args:
        lr: learning rate > 0.
        damping: >= 0; ``sqrt(damping)`` is added to each factor's diagonal.
        refresh_every: recompute factors and inverses every this many steps (int >= 1).
        fisher: ``"empirical"``, ``"type-2"`` or ``"mc"``.
        seed: int >= 0 for the MC draws.
        mc_samples: draws per example for ``fisher="mc"`` (int >= 1; 1 otherwise).
        strict: raise instead of taking a gradient step on parameters outside
            dense/Conv2d layers.

    Raises:
        ValueError: invalid hyperparameters.
    """

    preconditions = ("dense", "conv2d")
    state_type = KFACState

    def __init__(self, lr: float = 0.1, damping: float = 1e-2, refresh_every: int = 1, fisher: str = "empirical",
                 seed: int = 0, mc_samples: int = 1, strict: bool = False):
        check_positive("lr", lr)
        check_nonnegative("damping", damping)
        check_int("refresh_every", refresh_every, 1)
        check_choice("fisher", fisher, FISHERS)
        check_int("seed", seed, 0)
        check_int("mc_samples", mc_samples, 1)
        if mc_samples != 1 and fisher != "mc":
            raise ValueError(f"mc_samples={mc_samples} applies to fisher='mc' only, not {fisher!r}")
        self.lr, self.damping, self.refresh_every, self.fisher, self.seed = lr, damping, refresh_every, fisher, seed
        self.mc_samples, self.strict = mc_samples, check_flag("strict", strict)

    def init_flat(self, params: Sequence[Array], model: Any = None) -> KFACState:
        """Count 0 (the first step computes the factors), identity inverses."""
        xp = array_namespace(*params)
        A_inv, G_inv = [], []
        dt, dev = params[0].dtype, device(params[0])
        for s in self.layer_candidates(params, model):
            n_out, D = kr.joint_dims(params, s)
            A_inv.append(xp.eye(D + 1, dtype=dt, device=dev))
            G_inv.append(xp.eye(n_out, dtype=dt, device=dev))
        return KFACState(count=zero_count(params), A_inv=A_inv, G_inv=G_inv)

    def flat_step(self, model: Any, loss: Any, params: Sequence[Array], state: KFACState, x: Array,
                  y: Array) -> tuple[list[Array], KFACState, dict[str, Array]]:
        """One K-FAC update; ``info``: ``loss`` (before), ``step_norm``, ``refreshed`` (1.0/0.0), ``n_preconditioned``.

        Raises:
            ValueError: a state for another model, a factor that is not
                positive definite (damping 0), type-2 with outputs of more than 2 dims.
            TypeError: ``fisher="mc"`` inside ``jax.jit``.
            FloatingPointError: the layer gradients overflowed.
        """
        xp = array_namespace(params[0])
        specs = self.layer_candidates(params, model)
        with method_errors("KFAC"):
            check_shapes("state.A_inv", state.A_inv, kr.layer_state_shapes(params, specs, lambda o, d: (d + 1,) * 2),
                         unit="layers")
            check_shapes("state.G_inv", state.G_inv, kr.layer_state_shapes(params, specs, lambda o, d: (o, o)),
                         unit="layers")
        value, rec = self.record(model, loss, params, x, y, specs)
        with method_errors("KFAC"):
            check_grads_finite([r.g for r in rec.layers], self.validate)
        slot = {s.weight: i for i, s in enumerate(specs)}

        def refresh(*_: Any) -> tuple[list, list, Array]:
            A_inv, G_inv = list(state.A_inv), list(state.G_inv)
            root = math.sqrt(self.damping)
            factors = self._factors(model, loss, params, x, y, rec, state.count)
            tasks = [(kr.damped(F, root), f"the damped {which} factor {name} + sqrt(damping) I of {spec.describe()}")
                     for spec, A, G in factors for F, which, name in ((A, "input", "A"), (G, "output", "G"))]
            with method_errors("KFAC"):
                inverses = kr.owned(lambda M, what: inv_psd(M, what), tasks)
            for k, (spec, _, _) in enumerate(factors):
                A_inv[slot[spec.weight]], G_inv[slot[spec.weight]] = inverses[2 * k], inverses[2 * k + 1]
            return A_inv, G_inv, kr.flag(xp, 1.0, params[0])

        def keep(A_inv: list, G_inv: list) -> tuple[list, list, Array]:
            return list(A_inv), list(G_inv), kr.flag(xp, 0.0, params[0])

        A_inv, G_inv, refreshed = kr.refresh_every(state.count, self.refresh_every, refresh, keep,
                                                   state.A_inv, state.G_inv)
        deltas: dict[int, Array] = {}
        for spec, r in zip(rec.specs, rec.layers):
            i = slot[spec.weight]
            deltas.update(kr.split_joint(-self.lr * kr.kron_solve(G_inv[i], kr.joint_gradient(r), A_inv[i]),
                                         spec, params))
        info = step_info(value, self.all_deltas(params, rec.grads, deltas, self.lr), refreshed=refreshed,
                         n_preconditioned=n_preconditioned(xp, rec, params[0]))
        return (self.assemble(params, rec.grads, deltas),
                KFACState(count=state.count + 1, A_inv=A_inv, G_inv=G_inv), info)

    def kronecker_factors(self, model: Any, loss: Any, params: Any, x: Array, y: Array,
                          count: int = 0) -> list[tuple[Any, Array, Array]]:
        """The undamped factors ``(layer spec, A, G)`` of every preconditioned layer at ``params`` on ``(x, y)``.

        What a refresh computes before damping and inverting (``count`` seeds
        the MC draws). For inspection and comparison with other libraries.
        """
        leaves, treedef = tree.flatten(params)
        fmodel = flat_model(model, treedef) if model is not None else None
        specs = self.layer_candidates(leaves, fmodel)
        lossf = get_loss(loss)
        rec = records(fmodel, leaves, x, lambda out: lossf.grad(out, y), specs)
        xp = array_namespace(leaves[0])
        return self._factors(fmodel, lossf, leaves, x, y, rec, xp.asarray(count))

    def _factors(self, model: Any, loss: Any, params: Sequence[Array], x: Array, y: Array, rec: Any,
                 count: Array) -> list[tuple[Any, Array, Array]]:
        """``(spec, A, G)`` per recorded layer (undamped)."""
        gs = self._output_vectors(model, loss, params, x, y, rec, count)
        return [(spec, kr.input_second_moment(r.a), kr.output_factor([g[k] for g in gs.vectors], gs.scale))
                for k, (spec, r) in enumerate(zip(rec.specs, rec.layers))]

    class _Vectors(NamedTuple):
        vectors: list  # per pass, the recorded g of each layer
        scale: float  # G = scale * sum over passes of g_rows^T g_rows

    def _output_vectors(self, model: Any, loss: Any, params: Sequence[Array], x: Array, y: Array,
                        rec: Any, count: Array) -> _Vectors:
        """The back-propagated output vectors whose outer products make ``G`` (one list per pass)."""
        B = kr.examples(rec.layers[0])
        if self.fisher == "empirical":
            return self._Vectors([[r.g for r in rec.layers]], float(B))

        def pass_g(cotangent: Array) -> list[Array]:
            return records(model, params, x, cotangent, rec.specs).layers

        out = rec.out
        if self.fisher == "type-2":
            if out.ndim != 2:
                raise ValueError(f"KFAC: fisher='type-2' needs outputs (B, C), got {tuple(out.shape)}; use "
                                 "'empirical' or 'mc' for outputs with positions")
            return self._Vectors([[r.g for r in pass_g(c)] for c in loss.hessian_sqrt(out, y)], 1.0)
        draws = self._mc_cotangents(loss, out, count)
        return self._Vectors([[r.g for r in pass_g(c)] for c in draws], float(B) / self.mc_samples)

    def _mc_cotangents(self, loss: Any, out: Array, count: Array) -> list[Array]:
        """``loss.grad(out, ỹ_m)`` at ``mc_samples`` targets sampled from the model (class docstring)."""
        c = kr.concrete_count("KFAC", count, "fisher='mc' (NumPy draws from default_rng([seed, count]))")
        rng = host_generator([self.seed, c])
        name = getattr(loss, "name", None)
        if name not in ("mse", "ce") or out.ndim != 2:
            raise ValueError(f"KFAC: fisher='mc' supports the losses 'mse' and 'ce' on outputs (B, C), got {loss!r} "
                             f"and outputs {tuple(out.shape)}")
        xp = array_namespace(out)
        B, C = out.shape
        shard = slice(current().rank * B, (current().rank + 1) * B)  # each rank's rows of the whole batch's draws
        cots = []
        for _ in range(self.mc_samples):
            if name == "mse":
                noise = xp.asarray(rng.standard_normal((batch_size(out), C))[shard], dtype=out.dtype,
                                   device=device(out))
                cots.append(loss.grad(out, out + noise))
                continue
            u = xp.asarray(rng.random((batch_size(out), 1))[shard], dtype=out.dtype, device=device(out))
            below = xp.astype(xp.cumulative_sum(loss.softmax(out), axis=1) < u, xp.int64)
            labels = xp.minimum(xp.sum(below, axis=1), xp.asarray(C - 1, dtype=xp.int64, device=device(out)))
            cots.append(loss.grad(out, labels))
        return cots


register(
    "kfac", KFAC,
    compare={"lr": 0.3, "damping": 1e-2, "refresh_every": 1},
    test={"lr": 0.1, "damping": 1e-2, "refresh_every": 2},
    description="K-FAC, block-diagonal, two Kronecker factors per dense/conv layer (Martens & Grosse 2015)",
    tune={"lr": [0.03, 0.1, 0.3, 1.0], "damping": [1e-3, 1e-2, 1e-1]},
)
