"""PseudoHessian: the partition pseudo-Hessian step (Wolinski 2023, arXiv 2312.03885).

Spec: shared/spec/pseudo_hessian.md. Parameters are split into S groups; with
a direction ``u`` (``u^(s)`` = ``u`` on group s, zero elsewhere) the step is
``theta <- theta - lr * t * sum_s eta_s u^(s)`` where ``eta`` minimises the
model of ``phi(a) = L(theta + sum_s a_s u^(s))`` (paper eqs. (3)-(4), App. B)::

    gbar_s = <g, u^(s)>,   Hbar_st = u^(s)T H u^(t),   T_s = phi'''_{u^(s)}

``Hbar`` and ``T`` come from Taylor-mode jets of the model output (spec Sec. 3):
for ``phi_w(a) = L(theta + a w)`` with output jet ``(f0, f1, f2, f3)``,
``phi'' = <f1, H_l f1> + <l', f2>`` and
``phi''' = l'''[f1] + 3 <f2, H_l f1> + <l', f3>``; the off-diagonal of
``Hbar`` by polarisation, ``Hbar_st = (phi''_{u_s+u_t} - Hbar_ss - Hbar_tt)/2``.
All jets of a step share one cached forward (:func:`curvcore.protocol.jets`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

from .._namespace import array_namespace
from array_api_compat import device as _device

from .._checks import (NonFiniteError, check_choice, check_int, check_interval, check_nonnegative,  # noqa: F401
                       check_positive, concrete_bool)
from .._control import while_loop
from .._reduce import batch_vdot
from ..protocol import Array, JET, Loss, Model, jets
from ..tree import tree_dot, tree_map, tree_norm, tree_size, tree_zeros_like
from . import _cubic
from ._base import Method, check_grads_finite, count_as_float, step_info, value_and_grad, zero_count
from ._ema import adam_direction
from ._registry import register

GROUPS = ("tensor", "layer", "wb", "one", "scalar")
MAX_SCALAR_GROUPS = 4096
ARMIJO_C = 1e-4


class PseudoHessianState(NamedTuple):
    """Direction buffers (empty lists unless ``direction`` needs them) and the step count ``t``."""

    m: list
    v: list
    t: Any


class PseudoHessian(Method):
    """Partition pseudo-Hessian step with the anisotropic cubic regulariser (spec Secs. 2-7).

    ``eta`` solves the reduced problem of spec Sec. 4 on ``Hr = Hbar + ridge
    Diag(|Hbar_ss|)``: ``reg="none"`` is the paper's eq. (4), ``Hr eta = gbar``
    (a singular ``Hr`` raises); ``reg="cubic"`` (default) minimises
    ``-gbar.eta + 1/2 eta.Hr.eta + lam/6 ||D eta||^3``, ``D = Diag(|T|^{1/3})``,
    the paper's Sec. 5 regulariser read as Nesterov-Polyak cubic regularisation
    (stationarity ``(Hr + lam/2 ||D eta|| D^2) eta = gbar``) with fallbacks
    (line step along ``u``, then skip). Then
    ``delta = lr sum_s eta_s u^(s)``, optional clipping to ``max_step_norm``,
    and Armijo backtracking ``t = 2^-k`` on the same batch. Invariant under
    per-group rescaling of the parameters (paper Property 5; clipping breaks it).

    Paper vs code: Sec. 5's ``Hbar_t eta = g_t`` reads ``gbar_t``; its
    ``r_s = ||d^3L/dT_s^3||^{2/3}`` is read as ``|T_s|^{2/3}`` with ``T`` the
    diagonal of the order-3 summary tensor (the only cheap, scale-invariant
    reading) and ``eps = lam/2 ||D eta||`` solved for, not tuned. The momentum
    and Adam directions are not in the paper.

    Passes per step: 1 forward + 1 backward (the gradient); 1 forward cached
    by :func:`curvcore.protocol.jets`; S Taylor pushes of order 3 (order 2 when
    ``reg="none"``) along ``u^(s)`` and S(S-1)/2 of order 2 along
    ``u^(s) + u^(t)`` over that cached pass; 1 forward for the Armijo test
    (one more per rejection). A push of order k along a direction whose first
    nonzero tensor is in layer m costs one matrix product at layer m and k per
    layer above it (tensors outside the group are ``None``, never
    propagated); S = 2L for ``groups="tensor"``. Models without ``jets`` fall
    back to one ``model.jet`` per push (a forward each; nested JVPs on torch).
    Measured: about 7 SGD steps of arithmetic on a 784-512-256-10 net (S = 6);
    S forward-over-reverse HVPs would cost more and give no ``T``.
    Memory: the activations of one batch with three derivatives, plus one push.

    Args:
        lr: factor on the step (the paper's damping factor, eq. (2)), > 0.
        groups: ``"tensor"`` (each W_k, b_k; the paper's canonical partition),
            ``"layer"`` ({W_k, b_k}), ``"wb"`` (all weights / all biases),
            ``"one"`` (Cauchy's steepest descent with the exact step),
            ``"scalar"`` (Newton; tests only, at most 4096 parameters), or one
            hashable label per tensor (equal labels grouped, ordered by first
            appearance).
        direction: ``"gradient"`` (the paper), ``"momentum"`` (``m <- momentum m + g``)
            or ``"adam"`` (bias-corrected ``mhat / (sqrt(vhat) + eps)``).
        reg: ``"cubic"`` (default) or ``"none"``.
        lam: cubic weight >= 0 (0: ``Hr`` must be positive definite, else the line fallback).
        ridge: Levenberg-Marquardt ``ridge * Diag(|Hbar_ss|)`` >= 0.
        momentum: coefficient in [0, 1) for ``direction="momentum"``.
        betas: Adam's ``(b1, b2)``, each in [0, 1).
        eps: Adam's denominator offset >= 0.
        max_step_norm: clip ``||delta||`` to this (None: off).
        backtrack: Armijo backtracking on the same batch (default True).
        max_backtracks: largest k in ``t = 2^-k``, int >= 0.

    Raises:
        ValueError: bad hyperparameters; ``reg="none"`` with a singular ``Hbar``
            (message mentions "singular"; only when values are concrete).
        FloatingPointError: non-finite inputs, ``gbar``, ``Hbar`` or ``T``.

    ``info``: ``loss`` (before the step), ``step_norm``, ``r`` (cubic radius),
    ``hbar_min_eig`` (of ``Hbar`` on the active groups), ``eta_min``, ``eta_max``,
    ``t`` (backtracking factor; 0 on a skip), ``n_groups`` (groups in the
    solve: those with a nonzero direction), ``status`` (0 ok, 1 line, 2 skip).
    """

    needs = (JET,)

    def __init__(self, lr: float = 1.0, groups: Any = "tensor", direction: str = "gradient", reg: str = "cubic",
                 lam: float = 1.0, ridge: float = 0.0, momentum: float = 0.9,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_step_norm: float | None = None,
                 backtrack: bool = True, max_backtracks: int = 30):
        check_positive("lr", lr)
        check_nonnegative("lam", lam)
        check_nonnegative("ridge", ridge)
        check_choice("reg", reg, ("none", "cubic"))
        check_choice("direction", direction, ("gradient", "momentum", "adam"))
        check_interval("momentum", momentum, 0.0, 1.0, "[)")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
        check_interval("betas[0]", betas[0], 0.0, 1.0, "[)")
        check_interval("betas[1]", betas[1], 0.0, 1.0, "[)")
        check_nonnegative("eps", eps)
        if max_step_norm is not None:
            check_positive("max_step_norm", max_step_norm)
        if not isinstance(backtrack, bool):
            raise ValueError(f"backtrack must be True or False, got {backtrack!r}")
        check_int("max_backtracks", max_backtracks, 0)
        self.lr, self.groups, self.direction, self.reg = lr, _check_groups(groups), direction, reg
        self.lam, self.ridge, self.momentum, self.betas, self.eps = lam, ridge, momentum, tuple(betas), eps
        self.max_step_norm, self.backtrack, self.max_backtracks = max_step_norm, backtrack, max_backtracks

    state_type = PseudoHessianState
    param_fields = ("m", "v")

    # -- state ---------------------------------------------------------------
    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> PseudoHessianState:
        """Zero buffers for momentum/Adam (empty lists otherwise), ``t = 0``."""
        group_index(self.groups, params)  # validate the partition early
        m = tree_zeros_like(params) if self.direction != "gradient" else []
        v = tree_zeros_like(params) if self.direction == "adam" else []
        return PseudoHessianState(m=m, v=v, t=zero_count(params))

    def _direction(self, g: list, state: PseudoHessianState) -> tuple[list, list, list, Array]:
        """``(u, m, v, t)``: the direction (spec Sec. 6) and the updated state entries."""
        t = state.t + 1
        if self.direction == "gradient":
            return g, state.m, state.v, t
        if self.direction == "momentum":
            m = tree_map(lambda mi, gi: self.momentum * mi + gi, state.m, g)
            return m, m, state.v, t
        u, m, v = adam_direction(g, state.m, state.v, self.betas, self.eps, count_as_float(t, g[0]))
        return u, m, v, t

    # -- the step --------------------------------------------------------------
    def flat_step(self, model: Model, loss: Loss, params: Sequence[Array], state: PseudoHessianState, x: Array,
                  y: Array):
        """One pseudo-Hessian step; returns ``(params, state, info)`` (keys in the class docstring)."""
        xp = array_namespace(params[0])
        value, g, out = value_and_grad(model, loss, params, x, y)  # the pullback (an autograd graph) dies here
        gl = loss.grad(out, y)
        check_grads_finite(g, self.validate)
        u, m, v, t = self._direction(g, state)
        index = group_index(self.groups, params)
        gbar, Hbar, T, active = _summary(model, loss, params, x, y, out, gl, g, u, index,
                                         3 if self.reg == "cubic" else 2)
        eta, r, status, min_eig, eta_line = self._solve(gbar, Hbar, T, active)
        delta, finite = _clip(combine(u, index, eta * self.lr), self.max_step_norm)
        eta = xp.where(finite, eta, xp.zeros_like(eta))
        status = xp.where(finite, status, xp.full_like(status, _cubic.SKIP))
        # the line step is the fallback when the step fails its Armijo ladder (unless it is the line step already)
        same = (status == _cubic.LINE) | (eta.shape[0] == 1)
        eta_line = xp.where(same, xp.zeros_like(eta_line), eta_line)
        line = _clip(combine(u, index, eta_line * self.lr), self.max_step_norm)[0]
        step_t, status, fallback = self._backtrack(model, loss, params, x, y, value, g, delta, line, status)
        eta = xp.where(fallback, eta_line, eta)
        delta = [step_t * xp.where(fallback, b, a) for a, b in zip(delta, line)]
        info = step_info(value, delta, r=r, hbar_min_eig=min_eig, eta_min=xp.min(eta), eta_max=xp.max(eta),
                         t=step_t, n_groups=xp.sum(xp.astype(active, eta.dtype)),
                         status=xp.astype(status, eta.dtype))
        new_params = [p - d for p, d in zip(params, delta)]
        return new_params, PseudoHessianState(m=m, v=v, t=t), info

    def _solve(self, gbar: Array, Hbar: Array, T: Array, active: Array) -> tuple[Array, ...]:
        """``(eta, r, status, hbar_min_eig, eta_line)`` in float64 (spec Sec. 4), cast back; ``eta_line``:
        the line step (the fallback). Non-finite ``gbar``, ``Hbar`` or ``T`` raise (``validate``), else
        give a skip (status 2, zero step): the eigensolvers never see them."""
        xp = array_namespace(Hbar)
        dtype = gbar.dtype
        if self.validate:
            for name, a in (("gbar", gbar), ("Hbar", Hbar), ("T", T)):
                if concrete_bool(xp.all(xp.isfinite(a))) is False:
                    raise NonFiniteError(f"PseudoHessian: {name} contains NaN or Inf (the loss or model overflowed)")
        finite = xp.all(xp.isfinite(gbar)) & xp.all(xp.isfinite(Hbar)) & xp.all(xp.isfinite(T))
        active = active & finite
        g64, H64, T64 = (xp.astype(xp.where(finite, a, xp.zeros_like(a)), xp.float64) for a in (gbar, Hbar, T))
        H64 = (H64 + xp.matrix_transpose(H64)) / 2
        diag = xp.linalg.diagonal(H64)
        Hr = H64 + self.ridge * xp.eye(H64.shape[0], dtype=H64.dtype, device=_device(H64)) * xp.abs(diag)[:, None]
        min_eig = _min_eig(H64, active)
        if self.reg == "none":
            eta, status = _cubic.newton_solve(g64, Hr, active)
            r = xp.zeros_like(g64[0])
        else:
            d = xp.abs(T64) ** (1 / 3)
            eta, r, status = _cubic.cubic_solve(g64, Hr, d, self.lam, active)
        eta_line = _cubic.line_step(g64, Hr, d if self.reg == "cubic" else xp.zeros_like(g64),
                                    self.lam if self.reg == "cubic" else 0.0, active)[0]
        return (xp.astype(eta, dtype), xp.astype(r, dtype), status, xp.astype(min_eig, dtype),
                xp.astype(eta_line, dtype))

    def _backtrack(self, model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, value: Array,
                   g: list, delta: list, line: list, status: Array) -> tuple[Array, Array, Array]:
        """Armijo: the first ``t = 2^-k``, ``k <= max_backtracks``, with ``L(theta - t delta)`` finite
        and ``<= L - 1e-4 t <g, delta>`` (same batch); if none, the same ladder on the line step ``line``.

        Returns ``(t, status, fallback)``: ``fallback`` (and status 1) when the line step was taken.
        One forward per tried candidate, stopping at the first success: a plain
        loop when values are concrete, one ``jax.lax.while_loop`` inside
        ``jax.jit`` (through :func:`curvcore._control.while_loop`). The
        candidate ``t`` is carried and halved (exact in binary floating point),
        so it equals ``2.0**-k``. A ladder is skipped when its ``<g, delta> <= 0``;
        no success: ``t = 0`` and status 2 (skip). The fallback keeps the method
        going where the cubic model is far off (a saddle of tiny groups: inputs
        scaled by 1e-8 gave steps of 1e23 that no ``2^-30`` rescues); it is
        tried only after the step failed, so successful steps keep their
        per-group scale invariance.
        """
        xp = array_namespace(value)
        one = xp.ones_like(value)
        if not self.backtrack:
            return one, status, xp.zeros_like(value) != 0
        slopes = (tree_dot(g, delta), tree_dot(g, line))
        two = xp.full_like(status, 2)
        first = xp.where(slopes[0] > 0, xp.zeros_like(status), xp.where(slopes[1] > 0, xp.ones_like(status), two))

        def more(carry: tuple[Array, ...]) -> Array:
            return (carry[3] < 2) & ~carry[2]

        def rung(carry: tuple[Array, ...]) -> tuple[Array, ...]:
            k, tk, _, phase = carry
            main = phase == 0
            slope = xp.where(main, slopes[0], slopes[1])
            trial = loss.value(model.forward([p - tk * xp.where(main, a, b) for p, a, b in zip(params, delta, line)],
                                             x), y)
            ok = xp.isfinite(trial) & (trial <= value - ARMIJO_C * tk * slope)
            done = ~ok & (k >= self.max_backtracks)  # this ladder is used up: on to the line step's, or stop
            after = xp.where(main & (slopes[1] > 0), xp.ones_like(phase), two)
            return (xp.where(done, xp.zeros_like(k), k + 1), xp.where(ok, tk, xp.where(done, one, tk / 2)), ok,
                    xp.where(done, after, phase))

        init = (xp.zeros_like(value, dtype=xp.int32), one, xp.zeros_like(value) != 0, first)
        _, tk, found, phase = while_loop(more, rung, init)
        step_t = xp.where(found, tk, xp.zeros_like(value))
        fallback = found & (phase == 1)
        codes = xp.where(fallback, xp.full_like(status, _cubic.LINE), status)
        return step_t, xp.where(found, codes, xp.full_like(status, _cubic.SKIP)), fallback


# ---------------------------------------------------------------------------
# partitions
# ---------------------------------------------------------------------------


def _check_groups(groups: Any) -> Any:
    """A partition name or a tuple of hashable labels (one per tensor)."""
    if isinstance(groups, str):
        check_choice("groups", groups, GROUPS)
        return groups
    if not isinstance(groups, Sequence) or len(groups) == 0:
        raise ValueError(f"groups must be one of {', '.join(map(repr, GROUPS))} or a sequence of labels, "
                         f"one per parameter tensor; got {groups!r}")
    for label in groups:
        if not isinstance(label, Hashable):
            raise ValueError(f"groups labels must be hashable, got {label!r}")
        try:
            hash(label)
        except TypeError:
            raise ValueError(f"groups labels must be hashable, got {label!r}") from None
    return tuple(groups)


def group_index(groups: Any, params: Sequence[Array]) -> list:
    """Per tensor, its group: an int (tensor-wise partitions) or an int array (``"scalar"``).

    Groups are numbered 0..S-1 by first appearance.

    Raises:
        ValueError: labels of the wrong length, or ``"scalar"`` with more than 4096 parameters.
    """
    n = len(params)
    if groups == "scalar":
        P = tree_size(params)
        if P > MAX_SCALAR_GROUPS:
            raise ValueError(f"groups='scalar' is for tests only: {P} parameters > {MAX_SCALAR_GROUPS}")
        xp = array_namespace(params[0])
        index, offset = [], 0
        for p in params:
            size = tree_size([p])
            index.append(xp.reshape(xp.arange(offset, offset + size, device=_device(p)), tuple(p.shape)))
            offset += size
        return index
    if groups == "tensor":
        labels: Sequence[Hashable] = list(range(n))
    elif groups == "layer":
        labels = [i // 2 for i in range(n)]
    elif groups == "wb":
        labels = [i % 2 for i in range(n)]
    elif groups == "one":
        labels = [0] * n
    else:
        labels = groups
        if len(labels) != n:
            raise ValueError(f"groups has {len(labels)} labels but params has {n} tensors")
    order = list(dict.fromkeys(labels))
    return [order.index(label) for label in labels]


def n_groups(index: list) -> int:
    """S for a :func:`group_index` result."""
    if isinstance(index[0], int):
        return max(index) + 1
    return sum(tree_size([i]) for i in index)


def group_directions(u: Sequence[Array], index: list) -> list[list[Array | None]]:
    """``[u^(0), ..., u^(S-1)]``: ``u`` restricted to each group, ``None`` for tensors outside the group."""
    if isinstance(index[0], int):
        return [[ui if k == s else None for ui, k in zip(u, index)] for s in range(n_groups(index))]
    xp = array_namespace(u[0])
    out = []
    for i, (ui, k) in enumerate(zip(u, index)):  # "scalar": group s is one entry of one tensor
        for s in range(tree_size(u[:i]), tree_size(u[: i + 1])):
            w: list[Array | None] = [None] * len(u)
            w[i] = xp.where(k == s, ui, xp.zeros_like(ui))
            out.append(w)
    return out


def combine(u: Sequence[Array], index: list, eta: Array) -> list[Array]:
    """``sum_s eta_s u^(s)`` without forming the ``u^(s)``."""
    xp = array_namespace(eta)
    if isinstance(index[0], int):
        return [eta[k] * ui for ui, k in zip(u, index)]
    return [xp.reshape(xp.take(eta, xp.reshape(k, (-1,)), axis=0), tuple(ui.shape)) * ui for ui, k in zip(u, index)]


# ---------------------------------------------------------------------------
# gbar, Hbar, T from jets (spec Sec. 3)
# ---------------------------------------------------------------------------


def directional_derivatives(loss: Loss, out: Array, y: Array, gl: Array, d: Sequence[Array]) -> list[Array]:
    """``[phi'', phi''']`` (up to ``len(d)``) of ``phi(a) = L(theta + a w)`` at 0 from the output jet along ``w``.

    ``d = [f1, f2(, f3)]`` are the output's derivatives along ``w``;
    ``phi'' = <f1, H_l f1> + <l', f2>``, ``phi''' = l'''[f1] + 3 <f2, H_l f1> + <l', f3>``
    with ``l' = gl = loss.grad``, ``H_l = loss.hvp``, ``l''' = loss.d3`` at the output ``out``.
    """
    hf1 = loss.hvp(out, y, d[0])
    res = [batch_vdot(d[0], hf1) + batch_vdot(gl, d[1])]
    if len(d) >= 3:
        res.append(loss.d3(out, y, d[0]) + 3 * batch_vdot(d[1], hf1) + batch_vdot(gl, d[2]))
    return res


def summary_tensors(model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, out: Array, gl: Array,
                    us: list[list[Array | None]], order: int = 3) -> tuple[Array, Array]:
    """``(Hbar, T)``: S jets along ``u^(s)`` (order ``order``), S(S-1)/2 order-2 jets along ``u^(s) + u^(t)``.

    ``Hbar_ss = phi''_{u_s}``, ``T_s = phi'''_{u_s}`` (zeros when ``order == 2``),
    ``Hbar_st = (phi''_{u_s+u_t} - Hbar_ss - Hbar_tt)/2`` (symmetric by construction).
    Every jet runs over one cached forward (:func:`curvcore.protocol.jets`);
    ``None`` entries of the ``u^(s)`` (tensors outside group s) are zero.
    """
    xp = array_namespace(out)
    _, jet_fn = jets(model, params, x)
    S = len(us)
    diag, third = [], []
    for w in us:
        dd = directional_derivatives(loss, out, y, gl, jet_fn(w, order))
        diag.append(dd[0])
        third.append(dd[1] if order >= 3 else xp.zeros_like(dd[0]))
    rows = [[diag[s] if s == t else None for t in range(S)] for s in range(S)]
    for s in range(S):
        for t in range(s + 1, S):
            w = [a if b is None else b if a is None else a + b for a, b in zip(us[s], us[t])]
            both = directional_derivatives(loss, out, y, gl, jet_fn(w, 2))[0]
            rows[s][t] = rows[t][s] = (both - diag[s] - diag[t]) / 2
    Hbar = xp.reshape(xp.stack([e for row in rows for e in row]), (S, S))
    return Hbar, xp.stack(third)


def summary(model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, groups: Any = "tensor",
            u: Sequence[Array] | None = None, order: int = 3) -> dict[str, Array]:
    """``gbar``, ``Hbar``, ``T`` (and ``active``) at ``params`` for the direction ``u`` (default: the gradient).

    The quantities of the step (paper eq. (4), Sec. 2 ``D^(2)(u)`` and the
    diagonal of ``D^(3)(u)``), for analysis and figures. ``order=2`` skips ``T``
    (zeros). Cost: 1 VJP + 1 forward + S Taylor pushes of order ``order`` + S(S-1)/2 of order 2.
    """
    groups = _check_groups(groups)
    _, g, out = value_and_grad(model, loss, params, x, y)
    gl = loss.grad(out, y)
    gbar, Hbar, T, active = _summary(model, loss, params, x, y, out, gl, g, g if u is None else list(u),
                                     group_index(groups, params), order)
    return {"gbar": gbar, "Hbar": Hbar, "T": T, "active": active}


def _summary(model: Model, loss: Loss, params: Sequence[Array], x: Array, y: Array, out: Array, gl: Array,
             g: list, u: list, index: list, order: int) -> tuple[Array, Array, Array, Array]:
    """``(gbar, Hbar, T, active)``; ``active_s``: ``u^(s)`` is not identically zero."""
    xp = array_namespace(out)
    us = group_directions(u, index)
    gbar = xp.stack([_sparse_dot(g, us_s) for us_s in us])
    active = xp.stack([_sparse_dot(us_s, us_s) > 0 for us_s in us])
    Hbar, T = summary_tensors(model, loss, params, x, y, out, gl, us, order)
    return gbar, Hbar, T, active


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _sparse_dot(a: Sequence[Array], w: Sequence[Array | None]) -> Array:
    """``<a, w>`` over the tensors where ``w`` is not ``None``."""
    return tree_dot(*zip(*[(ai, wi) for ai, wi in zip(a, w) if wi is not None]))


def _min_eig(H: Array, active: Array) -> Array:
    """Smallest eigenvalue of ``H`` on the active groups (inactive ones padded above the spectrum)."""
    xp = array_namespace(H)
    padded = _cubic.pad(H, active, 1 + xp.sqrt(xp.sum(H * H)))
    return xp.linalg.eigvalsh(padded)[0]


def _clip(delta: list[Array], max_norm: float | None) -> tuple[list[Array], Array]:
    """Rescale ``delta`` to ``max_norm`` if longer; zero it if not finite. Returns ``(delta, finite)``."""
    xp = array_namespace(delta[0])
    norm = tree_norm(delta)
    finite = xp.isfinite(norm)
    scale = xp.where(finite, xp.ones_like(norm), xp.zeros_like(norm))
    if max_norm is not None:
        scale = xp.where(finite & (norm > max_norm), max_norm / xp.where(finite, norm, xp.ones_like(norm)), scale)
    delta = [xp.where(finite, d, xp.zeros_like(d)) * scale for d in delta]
    return delta, finite


register(
    "pseudo_hessian", PseudoHessian,
    compare={"lr": 1.0, "groups": "tensor", "reg": "cubic", "lam": 1.0},
    test={},
    description="partition pseudo-Hessian, S x S Newton step over parameter groups, cubic-regularised (Wolinski 2023)",
    tune={"lr": [0.5, 1.0], "lam": [0.1, 1.0, 10.0]},
)
