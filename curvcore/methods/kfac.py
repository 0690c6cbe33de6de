"""K-FAC with two Kronecker factors per dense or Conv2d layer (Martens & Grosse 2015; Grosse & Martens 2016).

Equations, conventions and checks: curvcore's K-FAC page (docs/methods) and
the tests in ``tests/test_kfac.py``, matched to curvlinops 3.0.1
``KFACLinearOperator`` (``kfac_approx="expand"``, ``separate_weight_and_bias=False``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._namespace import array_namespace

from .._checks import check_choice, check_int, check_nonnegative, check_positive
from .._linalg import inv_psd
from .. import tree
from ..layers import Records, records
from ..losses import get as get_loss
from ..protocol import Array, LayerRecord, Loss, Model, flat_model
from . import kronecker as kr
from ._base import check_flag, method_errors
from ._registry import register

FISHERS = ("empirical", "type-2", "mc")


class KFACState(NamedTuple):
    """``count`` (0-d int) and per layer the damped inverse factors from the last refresh:
    ``A_inv`` ``(D+1, D+1)`` (``D = n_in``, or ``C_in kh kw`` for a convolution) and ``G_inv``
    ``(n_out, n_out)``."""

    count: Any
    A_inv: list
    G_inv: list


class KFAC(kr.KroneckerMethod):
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

    Factors and their damped inverses (Cholesky) are recomputed when
    ``count % refresh_every == 0`` on the update minibatch and kept otherwise
    (default every 10 steps: a refresh costs about as much as a step; the
    array API has no triangular solve, so the inverses are what the state
    caches and a step applies them with two products).
    Layers K-FAC preconditions: dense and Conv2d (groups = 1) with a bias;
    every other parameter (BatchNorm affine, a layer without bias) takes the
    plain gradient step ``-lr g`` (``info["n_preconditioned"]``; ``strict=True``
    raises instead).

    Cost per step: one forward + one backward (the records), plus per layer
    ``n_out² (D+1) + n_out (D+1)²`` multiply-adds (the two products); a refresh adds
    the factors (``O(B S D²)``), two Cholesky inverses per layer and, for
    ``"type-2"``/``"mc"``, ``C``/``M`` more backward passes.

    Args:
        lr: learning rate > 0.
        damping: >= 0 (default 0.1, tuned: the best grid point on the digits MLP and CNN); ``sqrt(damping)`` is added to each factor's diagonal.
        refresh_every: recompute factors and inverses every this many steps (int >= 1;
            1 inverts two factors per layer at every step).
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

    def __init__(self, lr: float = 0.1, damping: float = 0.1, refresh_every: int = 10, fisher: str = "empirical",
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

    def factor_shapes(self, n_out: int, D: int) -> dict[str, tuple[int, ...]]:
        """Per layer: ``A_inv`` ``(D+1, D+1)`` and ``G_inv`` ``(n_out, n_out)``."""
        return {"A_inv": (D + 1, D + 1), "G_inv": (n_out, n_out)}

    def initial_factor(self, field: str, xp: Any, n_out: int, D: int, dtype: Any, dev: Any) -> Array:
        """Identity inverses (the first step computes the factors)."""
        return xp.eye(self.factor_shapes(n_out, D)[field][0], dtype=dtype, device=dev)

    def refresh_factors(self, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, rec: Records,
                        count: Array) -> list[dict[str, Array]]:
        """``(A + √d I)⁻¹`` and ``(G + √d I)⁻¹`` of every recorded layer (Cholesky; one owner per inverse
        in data-parallel training).

        Raises:
            ValueError: a damped factor that is not positive definite (damping 0).
        """
        root = math.sqrt(self.damping)
        factors = self._factors(model, loss, params, x, y, rec, count)
        tasks = [(kr.damped(F, root), f"the damped {which} factor {name} + sqrt(damping) I of {spec.describe()}")
                 for spec, A, G in factors for F, which, name in ((A, "input", "A"), (G, "output", "G"))]
        with method_errors("KFAC"):
            inverses = kr.owned(lambda M, what: inv_psd(M, what), tasks)
        return [{"A_inv": inverses[2 * k], "G_inv": inverses[2 * k + 1]} for k in range(len(factors))]

    def layer_step(self, xp: Any, k: int, rec: LayerRecord, grad: kr.LayerGradient,
                   factors: dict[str, Array]) -> tuple[Array, dict]:
        """``ΔΘ = -lr (G + √d I)⁻¹ ∇_Θ L (A + √d I)⁻¹`` with the cached inverses."""
        return -self.lr * kr.kron_solve(factors["G_inv"], grad.joint(), factors["A_inv"]), {}

    def kronecker_factors(self, model: Model, loss: Loss, params: Any, x: Array, y: Array,
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

    def _factors(self, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, rec: Records,
                 count: Array) -> list[tuple[Any, Array, Array]]:
        """``(spec, A, G)`` per recorded layer (undamped): ``A`` from the inputs, ``G`` from the output vectors."""
        vectors, scale = self._output_vectors(model, loss, params, x, y, rec, count)
        return [(spec, kr.input_second_moment(r.a), kr.output_factor([g[k] for g in vectors], scale))
                for k, (spec, r) in enumerate(zip(rec.specs, rec.layers))]

    def _output_vectors(self, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, rec: Records,
                        count: Array) -> tuple[list[list[Array]], float]:
        """The back-propagated output vectors of the chosen Fisher (one list per pass) and the scale of ``G``."""
        if self.fisher == "empirical":
            return kr.empirical_vectors(rec)
        if self.fisher == "type-2":
            return kr.type2_vectors(model, loss, params, x, y, rec)
        c = kr.concrete_count("KFAC", count, "fisher='mc' (NumPy draws from default_rng([seed, count]))")
        draws = kr.mc_cotangents(loss, rec.out, [self.seed, c], self.mc_samples)
        return kr.pulled_back_vectors(model, params, x, rec, draws), float(kr.examples(rec.layers[0])) / self.mc_samples


register(
    "kfac", KFAC,
    compare={"lr": 0.3, "damping": 1e-2, "refresh_every": 1},
    test={"lr": 0.1, "damping": 1e-2, "refresh_every": 2},
    description="K-FAC, block-diagonal, two Kronecker factors per dense/conv layer (Martens & Grosse 2015)",
    tune={"lr": [0.03, 0.1, 0.3, 1.0], "damping": [1e-3, 1e-2, 1e-1]},
)
