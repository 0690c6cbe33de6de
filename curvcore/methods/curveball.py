"""CurveBall (Henriques, Ehrhardt, Albanie, Vedaldi 2019): a minimal Newton solver.

One gradient step on the damped quadratic model per iteration keeps ``z``, an
estimate of the Newton step ``-(G + lam I)^-1 g``, up to date; ``rho`` and
``beta`` solve a 2x2 system (the exact minimiser of the model over
``span{dz, z}``) and ``lam`` follows a Levenberg-Marquardt trust-ratio rule.
Spec: ``shared/spec/curveball.md`` (sections 2-4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from array_api_compat import device

from .._namespace import array_namespace

from .._checks import (
    check_finite,
    check_int,
    check_interval,
    check_nonnegative,
    check_positive,
    check_tree_finite,
    concrete_bool,
)
from ..curvature import ggn_vp_at, linearization
from .._control import cond
from .._linalg import pinv
from .._reduce import batch_vdot
from ..protocol import Array, Loss, Model
from ..tree_algebra import tree_add, tree_dot, tree_map, tree_scale
from ._base import Method, step_info, zero_count
from ._registry import register


class CurveBallState(NamedTuple):
    """CurveBall's state.

    Attributes:
        z: the running Newton-step estimate, a list like params (zeros at ``init``).
        lam: the damping ``lambda`` to use at the next step (0-d array, params' dtype).
        count: the number of steps taken (0-d integer array).
    """

    z: list
    lam: Any
    count: Any


class System(NamedTuple):
    """The 2x2 system of eq. 19 with ``lambda`` inside (0-d arrays).

    ``A = [[A11, A12], [A12, A22]]`` is the damped GGN ``G_lam = G + lam I``
    restricted to ``span{dz, z}`` and ``b = [<g, dz>, <g, z>]``.
    """

    A11: Array
    A12: Array
    A22: Array
    b1: Array
    b2: Array


def two_by_two(Jz: Array, HJz: Array, Jdz: Array, HJdz: Array, gf: Array,
               z: Sequence[Array], dz: Sequence[Array], lam: Array) -> System:
    """The entries of eq. 19 from vectors already computed (no extra JVP/VJP).

    ``A11 = <Jdz, H_L Jdz> + lam<dz, dz>``, ``A12 = <Jz, H_L Jdz> + lam<z, dz>``,
    ``A22 = <Jz, H_L Jz> + lam<z, z>``, ``b1 = <g_f, Jdz> = <g, dz>``,
    ``b2 = <g_f, Jz> = <g, z>``: five output-space dots and three parameter dots.
    """
    return System(
        A11=batch_vdot(Jdz, HJdz) + lam * tree_dot(dz, dz),
        A12=batch_vdot(Jz, HJdz) + lam * tree_dot(z, dz),
        A22=batch_vdot(Jz, HJz) + lam * tree_dot(z, z),
        b1=batch_vdot(gf, Jdz),
        b2=batch_vdot(gf, Jz),
    )


def solve_rho_beta(xp: Any, s: System, rcond: float, validate: bool = True) -> tuple[Array, Array]:
    """``[beta, -rho] = pinv(A, rtol=rcond) b`` (eq. 19 with its sign convention).

    At ``z = 0`` the matrix is singular and the pseudo-inverse gives
    ``beta = <g,g>/<g, G_lam g>``, ``rho = 0``: an exact line search along ``-g``.
    ``A = 0`` (zero gradient, ``z = 0``) gives ``rho = beta = 0``.

    Raises:
        FloatingPointError: ``A`` or ``b`` holds NaN or Inf (checked when
            ``validate`` and the values are concrete).
    """
    A = xp.stack([xp.stack([s.A11, s.A12]), xp.stack([s.A12, s.A22])])
    b = xp.stack([s.b1, s.b2])
    if validate and concrete_bool(xp.all(xp.isfinite(A)) & xp.all(xp.isfinite(b))) is False:
        raise FloatingPointError(
            "CurveBall: the 2x2 system for rho and beta is not finite: "
            f"A = [[{float(s.A11)!r}, {float(s.A12)!r}], [{float(s.A12)!r}, {float(s.A22)!r}]], "
            f"b = [{float(s.b1)!r}, {float(s.b2)!r}] (the model, the loss, lam or state.z overflowed)"
        )
    sol = xp.matmul(pinv(A, rcond), b)
    return -sol[1], sol[0]


def model_change(s: System, rho: Array, beta: Array, lr: float) -> Array:
    """``M = q(lr z_new)``, the damped model's change at the step (spec step 5).

    ``q(s) = <g, s> + 1/2 <s, G_lam s>`` with ``s = lr (rho z - beta dz)``:
    ``M = lr (rho b2 - beta b1) + lr^2/2 (beta^2 A11 - 2 rho beta A12 + rho^2 A22)``.
    """
    linear = rho * s.b2 - beta * s.b1
    quad = beta * beta * s.A11 - 2 * rho * beta * s.A12 + rho * rho * s.A22
    return lr * linear + (0.5 * lr * lr) * quad


class CurveBall(Method):
    r"""CurveBall: heavy-ball momentum with a curvature term (paper eq. 14-19).

    One step, with the GGN ``G = J^T H_L J`` and ``G_lam = G + lam I`` (Levenberg):

    * ``dz = J^T (H_L J z + g_f) + lam z = G_lam z + g`` (eq. 18),
    * ``[beta, -rho] = pinv(A) b``, the exact minimiser of the damped model
      ``q(s) = <g, s> + 1/2 <s, G_lam s>`` over ``span{dz, z}`` (eq. 19, with
      ``lam`` inside ``A``); or fixed ``rho``, ``beta`` with ``auto=False``,
    * ``z <- rho z - beta dz`` (eq. 15), ``theta <- theta + lr z`` (eq. 16),
    * every ``lam_interval`` steps (counts 0, k, 2k, ...): one forward at the new
      params on the same batch gives ``gamma = (L(theta_new) - L(theta)) / M``
      with ``M = q(lr z_new)``; ``lam <- lam / w`` if ``gamma < lam_low``,
      ``lam <- lam w`` if ``gamma > lam_high``, ``w = lam_factor**lam_interval``.
      The new ``lam`` is used from the next step; ``M >= 0`` skips the rule.

    Cost per step (``auto=True``): 1 forward + 2 tangent propagations + 1
    backward, all at the same point through :func:`curvcore.protocol.linearize`
    (one forward pass whose cached activations serve ``J z``, ``J^T u`` and
    ``J dz``; a model without the optional ``linearize`` primitive pays
    2 JVP + 1 VJP, i.e. two more forwards), plus 1 forward every
    ``lam_interval`` steps. Every entry of ``A`` and ``b`` comes from the
    output-space vectors ``J z``, ``J dz``, ``H_L J z``, ``H_L J dz``, ``g_f``
    (closed-form loss Hessian) and three parameter dots; ``G`` and ``J`` are
    never formed. ``auto=False``: 1 forward + 1 tangent propagation + 1
    backward, plus 1 tangent propagation and 1 forward on lambda-adaptation
    steps (``pred_change`` is NaN on the other steps).

    Paper vs code (the authors' code wins, spec section 4): ``lam`` inside the
    2x2 matrix; ``gamma``'s denominator is the damped model change ``M``;
    ``w = lam_factor**lam_interval`` (0.999**5) per adaptation, where the text
    reads 0.999 (pass ``lam_factor=0.999**(1/5)`` for that); the first step is
    a pseudo-inverse solve (exact line search), never a singular ``A\b``; a
    non-finite system raises instead of silently setting ``rho = beta = 0``;
    ``rho`` and ``beta`` are not clipped (``rho > 1`` or ``< 0`` is normal).

    Args:
        lr: ``alpha`` of eq. 16, > 0 (the paper: "simply set to 1").
        lam: initial damping ``lambda`` >= 0 (1 with batch-norm, 10 without in
            the paper; 0.1 suits Rosenbrock and small MLPs).
        auto: solve eq. 19 for ``rho`` and ``beta`` every step.
        rho: fixed momentum decay when ``auto=False``.
        beta: fixed step size on ``z`` when ``auto=False``.
        auto_lam: adapt ``lam`` by the trust ratio (also allowed with ``auto=False``).
        lam_factor: per-step factor in (0, 1]; one adaptation multiplies or
            divides by ``lam_factor**lam_interval``.
        lam_interval: adapt when ``count % lam_interval == 0`` (integer >= 1).
        lam_low: ``gamma`` below this increases ``lam`` (poor fit).
        lam_high: ``gamma`` above this decreases ``lam``; ``lam_low <= lam_high``.
        rcond: relative singular-value cutoff of the 2x2 pseudo-inverse, >= 0.

    Raises:
        ValueError: a hyperparameter is out of range (the message names it).
    """

    def __init__(self, lr: float = 1.0, lam: float = 1.0, auto: bool = True, rho: float = 0.9,
                 beta: float = 0.1, auto_lam: bool = True, lam_factor: float = 0.999,
                 lam_interval: int = 5, lam_low: float = 0.5, lam_high: float = 1.5,
                 rcond: float = 1e-12) -> None:
        check_positive("lr", lr)
        check_nonnegative("lam", lam)
        for name, flag in (("auto", auto), ("auto_lam", auto_lam)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        for name, value in (("rho", rho), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        check_interval("lam_factor", lam_factor, 0.0, 1.0, "(]")
        check_int("lam_interval", lam_interval, 1)
        for name, value in (("lam_low", lam_low), ("lam_high", lam_high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not lam_low <= lam_high:
            raise ValueError(f"lam_low must be <= lam_high, got lam_low={lam_low!r} > lam_high={lam_high!r}")
        check_nonnegative("rcond", rcond)
        self.lr, self.lam, self.auto, self.rho, self.beta = lr, lam, auto, rho, beta
        self.auto_lam, self.lam_factor, self.lam_interval = auto_lam, lam_factor, lam_interval
        self.lam_low, self.lam_high, self.rcond = lam_low, lam_high, rcond

    state_type = CurveBallState
    param_fields = ("z",)

    def init_flat(self, params: Sequence[Array], model: Model | None = None) -> CurveBallState:
        """``z = 0`` like params, ``lam`` = the constructor's, ``count = 0``."""
        p0 = params[0]
        xp = array_namespace(*params)
        lam = xp.asarray(self.lam, dtype=p0.dtype, device=device(p0))
        return CurveBallState(z=tree_map(xp.zeros_like, params), lam=lam, count=zero_count(params))

    def flat_step(self, model: Model, loss: Loss, params: Sequence[Array], state: CurveBallState, x: Array, y: Array):
        """One CurveBall step.

        Returns:
            ``(new_params, new_state, info)``; ``info`` holds 0-d arrays ``loss``
            (before the step), ``rho``, ``beta``, ``lam`` (used this step),
            ``lam_next``, ``gamma`` (NaN when not evaluated), ``pred_change``
            (``M``) and ``step_norm`` (``||lr z_new||``).

        Raises:
            FloatingPointError: ``dz`` or the 2x2 system is not finite.
        """
        xp = array_namespace(params[0])
        params, z = list(params), list(state.z)
        if self.validate:
            check_finite("state.lam", state.lam)
        lam = state.lam
        lin = linearization(model, params, x)                            # 1 forward
        f, gf = lin.out, loss.grad(lin.out, y)
        Gz_g, Jz, HJz = ggn_vp_at(lin, loss, y, z, plus=gf)              # JVP 1 + VJP: J^T(H J z + g_f)
        f0 = loss.value(f, y)
        dz = tree_map(lambda a, b: a + lam * b, Gz_g, z)                 # eq. 18: G_lam z + g
        self._check_dz(dz)

        def system() -> System:                                          # JVP 2
            Jdz = lin.jvp(dz)
            return two_by_two(Jz, HJz, Jdz, loss.hvp(f, y, Jdz), gf, z, dz, lam)

        nan = xp.asarray(math.nan, dtype=f0.dtype, device=device(f0))
        if self.auto:
            sys2 = system()
            rho, beta = solve_rho_beta(xp, sys2, self.rcond, self.validate)
            M = model_change(sys2, rho, beta, self.lr)
        else:
            rho = xp.asarray(self.rho, dtype=f0.dtype, device=device(f0))
            beta = xp.asarray(self.beta, dtype=f0.dtype, device=device(f0))
            M = nan
        z_new = tree_map(lambda a, b: rho * a - beta * b, z, dz)        # eq. 15
        delta = tree_scale(z_new, self.lr)
        new_params = tree_add(params, delta)                             # eq. 16
        lam_next, gamma = lam, nan
        if self.auto_lam:
            def adapt(M_in: Array) -> tuple[Array, Array, Array]:
                if not self.auto:  # fixed mode: M needs J dz, only on adaptation steps
                    s = system()
                    M_in = model_change(s, rho, beta, self.lr)
                f1 = loss.value(model.forward(new_params, x), y)         # 1 forward
                return (*self._lam_rule(xp, lam, M_in, f0, f1), M_in)

            def keep(M_in: Array) -> tuple[Array, Array, Array]:
                return lam, nan, M_in

            lam_next, gamma, M = cond(state.count % self.lam_interval == 0, adapt, keep, M)
        info = step_info(f0, delta, rho=rho, beta=beta, lam=lam, lam_next=lam_next, gamma=gamma,
                         pred_change=M)
        return new_params, CurveBallState(z=z_new, lam=lam_next, count=state.count + 1), info

    def _check_dz(self, dz: Sequence[Array]) -> None:
        """``FloatingPointError`` if ``dz = G_lam z + g`` overflowed."""
        if self.validate:
            try:
                check_tree_finite("dz", dz)
            except ValueError as err:
                raise FloatingPointError(
                    f"CurveBall: {err}; dz = G_lam z + g is not finite (the loss, the model or state.z overflowed)"
                ) from None

    def _lam_rule(self, xp: Any, lam: Array, M: Array, f0: Array, f1: Array) -> tuple[Array, Array]:
        """``(lam_next, gamma)``: the trust-ratio rule; ``M >= 0`` gives ``gamma = NaN``, ``lam`` kept."""
        neg = M < 0
        one = xp.ones_like(M)
        gamma = xp.where(neg, (f1 - f0) / xp.where(neg, M, -one), xp.full_like(M, math.nan))
        w = self.lam_factor ** self.lam_interval
        lam_next = xp.where(gamma < self.lam_low, lam / w, xp.where(gamma > self.lam_high, lam * w, lam))
        return lam_next, gamma


register(
    "curveball",
    CurveBall,
    compare={"lam": 0.1},
    test={"lam": 1.0, "lam_interval": 2},
    description="CurveBall: heavy-ball with curvature, auto rho/beta (1 forward + 2 JVP + 1 backward per step)",
    tune={"lr": [0.5, 1.0], "lam": [0.01, 0.1, 1.0, 10.0]},
)
