"""The Kronecker-factored family: K-FAC, ACP and CenteredSGD as choices of two per-layer factors.

Per preconditioned layer, on the joint parameter ``Θ = [W_mat b]`` (``n_out x
(D + 1)``, :mod:`curvcore.layers`), every member takes the step

    ΔΘ = -lr · L⁻¹ · ∇_Θ L · R⁻¹

with an output factor ``L`` (``n_out x n_out``) and an input factor ``R``:

* **K-FAC**: ``L = G + √d I`` (the output-gradient covariance: empirical,
  type-2 or Monte-Carlo Fisher), ``R = A + √d I`` with ``A`` the second
  moment of ``ā = (a; 1)`` (Martens & Grosse 2015; Grosse & Martens 2016 for
  convolutions, "expand");
* **ACP**: ``L = α I`` and ``R`` the block matrix ``[[E aaᵀ + (ε/α) I, ā],
  [āᵀ, 1]]``, whose block inverse is the centred gradient with the bias
  correction ``-ΔW ā`` (thesis eq 6.2.3-6.2.5);
* **CenteredSGD**: ACP with the covariance replaced by ``I``, ``α = 1``, ``ε = 0``.

This module holds the pieces they share: the joint gradient, the factor
builders (``A`` from layer inputs, convolution patches included; ``G`` from
output vectors: empirical, type-2 or Monte-Carlo), the damped Kronecker solve,
the refresh schedule, the centring with its bias correction, and the step
template :class:`KroneckerMethod` the three methods fill in. It is public: a
new member subclasses :class:`KroneckerMethod` and chooses its factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from array_api_compat import device

from .._namespace import array_namespace

from .._control import cond
from .._linalg import eigh
from .._checks import check_shapes, concrete_bool
from .._reduce import batch_gram, batch_max, batch_mean, batch_size, current, global_count, param_sums
from ..layers import LayerSpec, Records, bias_vector, matrix_to_weight, positions, records, rows, weight_matrix
from ..protocol import Array, LayerRecord, Loss, Model
from ..random import host_generator
from ._base import LayerwiseMethod, check_grads_finite, method_errors, n_preconditioned, step_info, zero_count

# ---------------------------------------------------------------------------
# errors and small helpers
# ---------------------------------------------------------------------------


def flag(xp: Any, value: float, like: Array) -> Array:
    """A 0-d float array (dtype and device of ``like``) for ``info``."""
    return xp.asarray(value, dtype=like.dtype, device=device(like))


def concrete_count(method: str, count: Array, why: str) -> int:
    """``int(count)``; a ``TypeError`` explaining ``why`` when it is abstract (inside ``jax.jit``)."""
    try:
        return int(count)
    except Exception:
        raise TypeError(f"{method}: {why} needs a concrete step count and cannot run inside jax.jit") from None


def owned(fn: Callable[..., Array], tasks: Sequence[tuple[Array, str]],
          out_shape: Callable[[Array], tuple[int, ...]] = lambda M: tuple(M.shape)) -> list[Array]:
    """``fn(matrix, what)`` (same shape out) for each task; in data-parallel training each task runs on
    one owner process (greedy by cost, ``n^3``) and is broadcast, so no process inverts every factor.

    On an owner a failed task (not positive definite) gives NaN, so every process sees the same
    non-finite step instead of one process raising alone.
    """
    r = current()
    if not r.distributed:
        return [fn(M, what) for M, what in tasks]
    owners = r.owners([float(M.shape[0]) ** 3 for M, _ in tasks])
    out = []
    for (M, what), owner in zip(tasks, owners):
        xp = array_namespace(M)
        value = xp.zeros(out_shape(M), dtype=M.dtype, device=device(M))
        if owner == r.rank:
            try:
                value = fn(M, what)
            except ValueError:
                value = value * float("nan")
        out.append(r.broadcast(value, owner))
    return out


def refresh_every(count: Array, every: int, refresh: Callable[..., Any], keep: Callable[..., Any],
                  *state: Any) -> Any:
    """``refresh()`` when ``count % every == 0`` (before updates 0, N, 2N, ...), else ``keep(*state)``.

    Through :func:`curvcore._control.cond`, so the schedule traces under ``jax.jit``.
    """
    return cond(count % every == 0, refresh, keep, *state)


# ---------------------------------------------------------------------------
# gradients in the joint [W_mat b] layout
# ---------------------------------------------------------------------------


class LayerGradient(NamedTuple):
    """A recorded layer's gradient of the batch loss: ``W`` as its ``(n_out, D)`` matrix and ``b`` ``(n_out,)``."""

    W: Array
    b: Array

    def joint(self) -> Array:
        """``∇_Θ L = g_rowsᵀ [a_rows, 1]`` ``(n_out, D + 1)``: the weight gradient and, last, the bias gradient."""
        return array_namespace(self.W).concat([self.W, self.b[:, None]], axis=1)


def layer_gradients(rec: Records) -> list[LayerGradient]:
    """Per recorded layer, ``∇W = g_rowsᵀ a_rows`` and ``∇b = Σ g`` taken from the pass's own parameter
    gradients (no second product), summed over processes in data-parallel training."""
    flat = param_sums([rec.grads[i] for s in rec.specs for i in (s.weight, s.bias)])
    return [LayerGradient(weight_matrix(flat[2 * k], s), bias_vector(flat[2 * k + 1])) for k, s in enumerate(rec.specs)]


def split_joint(M: Array, spec: LayerSpec, params: Sequence[Array]) -> dict[int, Array]:
    """``{weight index: M[:, :D] in the weight's shape, bias index: M[:, D] in the bias's shape}``."""
    xp = array_namespace(M)
    D = M.shape[1] - 1
    W, b = params[spec.weight], params[spec.bias]
    return {spec.weight: matrix_to_weight(M[:, :D], spec, W.shape), spec.bias: xp.reshape(M[:, D], b.shape)}


def joint_dims(params: Sequence[Array], spec: LayerSpec) -> tuple[int, int]:
    """``(n_out, D)`` of a layer: output features and input features per position (``C_in kh kw``)."""
    W = params[spec.weight]
    n_out = int(bias_vector(params[spec.bias]).shape[0])
    return n_out, math.prod(int(d) for d in W.shape) // n_out


def centered_gradient(rec: LayerRecord, grad: LayerGradient) -> tuple[Array, Array, Array]:
    """``(a_bar, G_hat, g_hat)``: mean input over rows, ``g_rowsᵀ (a_rows - a_bar) = ∇W - ĝ a_barᵀ`` and ``ĝ = Σ g``."""
    a_bar = batch_mean(rows(rec.a))
    return a_bar, grad.W - grad.b[:, None] * a_bar[None, :], grad.b


def examples(rec: LayerRecord) -> int:
    """``B``, the number of examples of a record (``rows`` holds ``B * S``)."""
    return batch_size(rec.a)


# ---------------------------------------------------------------------------
# factors
# ---------------------------------------------------------------------------


def input_second_moment(a: Array) -> Array:
    """K-FAC's ``A = 1/(B S) Σ ā ā^T``, ``ā = (a; 1)`` over every example and position, ``(D + 1)^2``."""
    xp = array_namespace(a)
    a = rows(a)
    a1 = xp.concat([a, xp.ones((a.shape[0], 1), dtype=a.dtype, device=device(a))], axis=1)
    return batch_gram(a1, a1) / global_count(a1.shape[0])


def output_factor(gs: Sequence[Array], scale: float) -> Array:
    """``scale · Σ_c g_c,rowsᵀ g_c,rows``: summed over examples and positions (no 1/S, kfac_conv §3)."""
    total = None
    for g in gs:
        r = rows(g)
        term = batch_gram(r, r)
        total = term if total is None else total + term
    return total * scale


def empirical_vectors(rec: Records) -> tuple[list[list[Array]], float]:
    """Empirical Fisher: ``δ = B g`` from the step's own records, ``G = B Σ g_rowsᵀ g_rows`` (no extra pass)."""
    return [[r.g for r in rec.layers]], float(examples(rec.layers[0]))


def pulled_back_vectors(model: Model, params: Sequence[Array], x: Array, rec: Records,
                        cotangents: Sequence[Array]) -> list[list[Array]]:
    """For each output cotangent, one backward pass: the recorded ``g`` of every layer of ``rec``."""
    return [[r.g for r in records(model, params, x, u, rec.specs).layers] for u in cotangents]


def type2_vectors(model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array,
                  rec: Records) -> tuple[list[list[Array]], float]:
    """Type-2 (exact GGN): one pass per column ``U_c = R[:, c] / B`` of ``R Rᵀ = H``, ``G = Σ_c g_cᵀ g_c``."""
    if rec.out.ndim != 2:
        raise ValueError(f"KFAC: fisher='type-2' needs outputs (B, C), got {tuple(rec.out.shape)}; use "
                         "'empirical' or 'mc' for outputs with positions")
    return pulled_back_vectors(model, params, x, rec, loss.hessian_sqrt(rec.out, y)), 1.0


def mc_cotangents(loss: Loss, out: Array, seed: Sequence[int], samples: int) -> list[Array]:
    """``loss.grad(out, ỹ_m)`` at ``samples`` targets per example sampled from the model.

    MSE: ``ỹ = f + N(0, I)``; CE: ``ỹ ~ softmax(f)`` by inverse-CDF sampling
    (array-API code on uniform draws). The uniform and normal draws come from
    the host generator (:func:`curvcore.random.host_generator`, NumPy's
    ``default_rng(seed)``), for the whole batch, so every backend and every
    data-parallel rank (its rows of the batch) sees the same targets.

    Raises:
        ValueError: a loss other than MSE and CE, or outputs that are not ``(B, C)``.
    """
    name = getattr(loss, "name", None)
    if name not in ("mse", "ce") or out.ndim != 2:
        raise ValueError(f"KFAC: fisher='mc' supports the losses 'mse' and 'ce' on outputs (B, C), got {loss!r} "
                         f"and outputs {tuple(out.shape)}")
    xp, dev = array_namespace(out), device(out)
    rng = host_generator(seed)
    B, C = out.shape
    shard = slice(current().rank * B, (current().rank + 1) * B)  # each rank's rows of the whole batch's draws

    def draw(fn: Callable[[tuple[int, int]], Any], width: int) -> Array:
        return xp.asarray(fn((batch_size(out), width))[shard], dtype=out.dtype, device=dev)

    cots = []
    for _ in range(samples):
        if name == "mse":
            cots.append(loss.grad(out, out + draw(rng.standard_normal, C)))
            continue
        below = xp.astype(xp.cumulative_sum(loss.softmax(out), axis=1) < draw(rng.random, 1), xp.int64)
        cots.append(loss.grad(out, xp.minimum(xp.sum(below, axis=1), xp.asarray(C - 1, dtype=xp.int64, device=dev))))
    return cots


def damped(F: Array, damping: float) -> Array:
    """``F + damping I``."""
    xp = array_namespace(F)
    return F + damping * xp.eye(F.shape[0], dtype=F.dtype, device=device(F))


def kron_solve(L_inv: Array, grad: Array, R_inv: Array) -> Array:
    """``L⁻¹ grad R⁻¹``: ``(L ⊗ R)⁻¹ vec_row(grad)`` with the two inverses given."""
    xp = array_namespace(grad)
    return xp.matmul(xp.matmul(L_inv, grad), R_inv)


def input_covariance(a: Array) -> tuple[Array, Array]:
    """``(C, mu)``: the biased covariance ``(a - mu)^T (a - mu) / N`` over rows and the mean ``mu``."""
    a = rows(a)
    mu = batch_mean(a)
    ac = a - mu
    return batch_gram(ac, ac) / global_count(ac.shape[0]), mu


def covariance_eig(C: Array) -> Array:
    """``[U; s]`` stacked ``(n + 1, n)``: ``C = U diag(s) U^T``, ``s`` clipped at 0, canonical signs."""
    xp = array_namespace(C)
    s, U = eigh(C)
    return xp.concat([canonical_signs(U), xp.maximum(s, xp.zeros_like(s))[None, :]], axis=0)


def input_covariance_eig(a: Array) -> tuple[Array, Array, Array]:
    """``(s, U, mu)``: ``C = (a - mu)^T (a - mu) / N = U diag(s) U^T`` over rows (biased), ``s`` clipped at 0."""
    C, mu = input_covariance(a)
    Us = covariance_eig(C)
    return Us[-1, :], Us[:-1, :], mu


def canonical_signs(U: Array) -> Array:
    """Flip eigenvector columns so each one's largest-magnitude entry is positive (sklearn's ``svd_flip``).

    The step does not depend on the signs; fixing them makes the stored state the
    same on every backend (LAPACK, torch and JAX pick different signs).
    """
    xp = array_namespace(U)
    n = U.shape[0]
    idx = xp.reshape(xp.arange(n, device=device(U)), (n, 1))
    first_max = idx == xp.reshape(xp.argmax(xp.abs(U), axis=0), (1, n))  # argmax: first occurrence
    pick = xp.sum(xp.where(first_max, U, xp.zeros_like(U)), axis=0)
    return U * xp.where(pick < 0, -xp.ones_like(pick), xp.ones_like(pick))


def per_example_alpha(rec: LayerRecord) -> Array:
    """ACP's adaptive ``α = max_{i,j} (B g_ij)^2`` (0-d): the largest squared per-example ``dℓ_i/dz``.

    A max over the batch: a data-parallel version must all-reduce it with ``max``.
    """
    return batch_max((examples(rec) * rec.g) ** 2)


def centered_step(lr: float, G_hat: Array, g_hat: Array, a_bar: Array, inv_alpha: Any,
                  precondition: Callable[[Array], Array] | None, bias_correction: bool) -> tuple[Array, Array]:
    """``(ΔW, Δb)`` of the centred family: ``ΔW = -lr P(Ĝ)``, ``Δb = -lr ĝ / α - [ΔW ā]``.

    ``P`` is ACP's input whitening (``None``: identity, CenteredSGD); the bias
    correction ``-ΔW ā`` is the block inverse of ACP's input factor (eq 6.2.5).
    """
    xp = array_namespace(G_hat)
    dW = -lr * (G_hat if precondition is None else precondition(G_hat))
    db = -lr * inv_alpha * g_hat
    if bias_correction:
        db = db - xp.matmul(dW, a_bar)
    return dW, db


def layer_state_shapes(params: Sequence[Array], specs: Sequence[LayerSpec],
                       shape: Callable[[int, int], tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``shape(n_out, D)`` for each layer, for the checks of per-layer state."""
    return [shape(*joint_dims(params, s)) for s in specs]


def positions_of(rec: LayerRecord) -> int:
    """``S`` of a record (positions per example)."""
    return positions(rec.a)


def whiten(G: Array, U: Array, d: Array) -> Array:
    """``G U diag(1/d) Uᵀ``, two products (the form for an ``α`` that changes every step)."""
    xp = array_namespace(G)
    return xp.matmul(xp.matmul(G, U) / d, xp.matrix_transpose(U))


def whitening_matrix(U: Array, d: Array) -> Array:
    """``P = U diag(1/d) Uᵀ`` ``(n, n)``, cached at a refresh so a step costs one product ``G P``.

    A ``d`` with an entry ``<= 0`` (singular) gives zeros ("not computed",
    :func:`whiten_cached`) without a division by zero; the step's own check
    names the problem.
    """
    xp = array_namespace(U)
    positive = d > 0
    P = xp.matmul(U / xp.where(positive, d, xp.ones_like(d)), xp.matrix_transpose(U))
    return xp.where(xp.all(positive), P, xp.zeros_like(P))


def whiten_cached(G: Array, P: Array, U: Array, d: Array, cached: Any = None) -> Array:
    """``G P`` with the cached ``P = U diag(1/d) Uᵀ``, or :func:`whiten` when ``P`` was not computed at a
    refresh (zeros: a state from ``init`` or edited by hand).

    ``cached`` says which: an entry of :func:`cached_flags` (decided once per step), or ``None`` to test
    ``P`` here (``P[0, 0] > 0``: a host sync on an eager backend). Through :func:`cond`, so it traces
    under jit."""
    xp = array_namespace(G)
    pred = P[0, 0] > 0 if cached is None else cached
    return cond(pred, lambda G: xp.matmul(G, P), lambda G: whiten(G, U, d), G)


def cached_flags(Ps: Sequence[Array]) -> list[Any]:
    """Per layer whether its cached ``P`` was computed at a refresh (a computed ``P`` is positive
    definite, so ``P[0, 0] > 0``; zeros: not computed), for :func:`whiten_cached`.

    With concrete values ONE host sync per step decides for every layer: ``True`` for all when all
    were computed (every step but one after a hand edit), else a Python bool per layer. Inside
    ``jax.jit`` the per-layer 0-d predicates (each layer's ``cond`` then costs no host sync).
    """
    flags = [P[0, 0] > 0 for P in Ps]
    if not flags:
        return flags
    xp = array_namespace(*Ps)
    everywhere = concrete_bool(xp.all(xp.stack(flags)))
    if everywhere is None:
        return flags
    return [True] * len(flags) if everywhere else [bool(f) for f in flags]


# ---------------------------------------------------------------------------
# the step template
# ---------------------------------------------------------------------------


class KroneckerMethod(LayerwiseMethod):
    """One step of the family; a member chooses its factors by filling in five hooks (and an optional sixth).

    Per step: check the per-layer state against the params, one recorded pass
    (``g = ∂L/∂z`` and the layer inputs), refresh the per-layer factors when
    ``count % refresh_every == 0`` (``refresh_every = None``: no factors),
    then per layer ``ΔΘ = layer_step(...)`` in the joint ``[W_mat b]`` layout;
    parameters outside preconditioned layers take ``-lr g``.

    Hooks:
        ``factor_shapes(n_out, D)``: ``{state field: shape}`` of one layer's factors.
        ``initial_factor(field, xp, n_out, D, dtype, device)``: what ``init`` stores.
        ``refresh_factors(model, loss, params, x, y, rec, count, **kw)``: the new
        factors of each recorded layer (``[{field: array}]`` in ``rec`` order).
        ``layer_step(xp, k, record, grad, factors)``: ``(ΔΘ, extras)`` of layer ``k`` (``grad``:
        its :class:`LayerGradient`).
        ``step_extras(xp, state, refreshed, extras, **kw)``: more ``info`` entries.
        ``step_factors(xp, factors)`` (optional): what ``layer_step`` sees of this step's factors (default
        the factors; ACP adds its ``cached`` flags, decided once per step).
    """

    refresh_every: int | None = None

    def factor_shapes(self, n_out: int, D: int) -> dict[str, tuple[int, ...]]:
        return {}

    def initial_factor(self, field: str, xp: Any, n_out: int, D: int, dtype: Any, dev: Any) -> Array:
        raise NotImplementedError  # pragma: no cover - a member with factors defines it

    def refresh_factors(self, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, rec: Records,
                        count: Array, **kw: Any) -> list[dict[str, Array]]:
        raise NotImplementedError  # pragma: no cover - a member with factors defines it

    def layer_step(self, xp: Any, k: int, rec: LayerRecord, grad: LayerGradient,
                   factors: dict[str, Array]) -> tuple[Array, dict]:
        raise NotImplementedError  # pragma: no cover - abstract

    def step_extras(self, xp: Any, state: Any, refreshed: Array, extras: list[dict], **kw: Any) -> dict[str, Array]:
        return {}

    def step_factors(self, xp: Any, factors: dict[str, list]) -> dict[str, list]:
        """The per-layer lists ``layer_step`` reads (``factors``, the state's fields, plus anything decided
        once per step); only ``factors`` go into the new state."""
        return factors

    def check_step_inputs(self, params: Sequence[Array], x: Array, **kw: Any) -> None:
        """Check the step's extra inputs (ACP's ``cov_batch``) before anything runs; here: none allowed.

        Raises:
            TypeError: a keyword the method does not take.
        """
        if kw:
            raise TypeError(f"{self._name}.step() got unexpected keyword arguments: {', '.join(sorted(kw))}")

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _fields(self) -> tuple[str, ...]:
        return tuple(self.factor_shapes(1, 1))

    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> Any:
        """Count 0 (the first step refreshes) and each layer's initial factors."""
        xp = array_namespace(*params)
        dt, dev = params[0].dtype, device(params[0])
        dims = [joint_dims(params, s) for s in self.layer_candidates(params, model)]
        return self.state_type(count=zero_count(params), **{
            f: [self.initial_factor(f, xp, n_out, D, dt, dev) for n_out, D in dims] for f in self._fields()})

    def flat_step(self, model: Model, loss: Loss, params: Sequence[Array], state: Any, x: Array, y: Array,
                  **kw: Any) -> tuple[list[Array], Any, dict[str, Array]]:
        """The step of the class docstring; ``info``: ``loss`` (before), ``step_norm``,
        ``refreshed`` (members with factors), ``n_preconditioned`` and the member's extras."""
        xp = array_namespace(params[0])
        specs = self.layer_candidates(params, model)
        with method_errors(self._name):
            for f in self._fields():
                shapes = layer_state_shapes(params, specs, lambda o, d: self.factor_shapes(o, d)[f])
                check_shapes(f"state.{f}", getattr(state, f), shapes, unit="layers")
            self.check_step_inputs(params, x, **kw)
        value, rec = self.record(model, loss, params, x, y, specs)
        with method_errors(self._name):
            check_grads_finite([r.g for r in rec.layers], self.validate)
        slot = {s.weight: i for i, s in enumerate(specs)}
        factors, refreshed = self._scheduled_factors(xp, model, loss, params, x, y, rec, state, slot, **kw)
        seen = self.step_factors(xp, factors)
        deltas: dict[int, Array] = {}
        extras = []
        for sp, r, grad in zip(rec.specs, rec.layers, layer_gradients(rec)):
            i = slot[sp.weight]
            step, more = self.layer_step(xp, i, r, grad, {f: seen[f][i] for f in seen})
            deltas.update(split_joint(step, sp, params))
            extras.append(more)
        info = step_info(value, self.all_deltas(params, rec.grads, deltas, self.lr),
                         **({} if refreshed is None else {"refreshed": refreshed}),
                         **self.step_extras(xp, state, refreshed, extras, **kw),
                         n_preconditioned=n_preconditioned(xp, rec, params[0]))
        new_state = state._replace(count=state.count + 1, **factors)
        return self.assemble(params, rec.grads, deltas), new_state, info

    def _scheduled_factors(self, xp: Any, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array,
                           rec: Records, state: Any, slot: dict[int, int],
                           **kw: Any) -> tuple[dict[str, list], Array | None]:
        """The factors this step uses (refreshed or kept, :func:`refresh_every`) and the ``refreshed`` flag."""
        fields = self._fields()
        if self.refresh_every is None:
            return {}, None

        def refresh(*_: Any) -> tuple[dict[str, list], Array]:
            new = {f: list(getattr(state, f)) for f in fields}
            fresh = self.refresh_factors(model, loss, params, x, y, rec, state.count, **kw)
            for sp, layer in zip(rec.specs, fresh):
                for f in fields:
                    new[f][slot[sp.weight]] = layer[f]
            return new, flag(xp, 1.0, params[0])

        def keep(*kept: list) -> tuple[dict[str, list], Array]:
            return {f: list(v) for f, v in zip(fields, kept)}, flag(xp, 0.0, params[0])

        return refresh_every(state.count, self.refresh_every, refresh, keep, *[getattr(state, f) for f in fields])
