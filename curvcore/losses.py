"""Losses with their output-space derivatives in closed form (array-API code).

For model outputs ``f`` with the batch on axis 0 (``(B, ...)``):

* ``value(f, y)``: the loss (0-d array);
* ``grad(f, y)``: ``dL/df`` (shape of ``f``), carrying the normalisation;
* ``hvp(f, y, v)``: the loss Hessian w.r.t. the outputs applied to ``v``,
  position by position, with the normalisation;
* ``d3(f, y, v)``: the third directional derivative ``d^3 L[v, v, v]`` (0-d).

:class:`MSE` takes any output shape with a same-shape target;
:class:`CrossEntropy` takes logits ``(B, C)`` or ``(B, ..., C)`` (classes on
the **last** axis) with integer labels ``(B, ...)``, and an ``ignore_index``.
The losses hold only their settings; ``get("mse")`` / ``get("ce")`` return
them by name.

Label checks (labels outside ``[0, C)``) raise ``ValueError`` when the values
are concrete; inside ``jax.jit`` the loss and its derivatives become NaN
instead, so a method's non-finite guard keeps the old params.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ._namespace import array_namespace
from array_api_compat import device as _device

from ._checks import check_choice, check_later, concrete_bool, first_check, namespace, value_checks_on
from ._reduce import batch_any, batch_size, batch_sum_all, current, global_count
from ._samplewise import norm, per_gamma, sq_norm
from .protocol import Loss as LossProtocol, satisfies

Array = Any

__all__ = ["MSE", "CrossEntropy", "Loss", "get", "register_cross_entropy"]


class Loss:
    """Base class of the closed-form losses: validation shared by both.

    Subclasses define ``value``, ``grad``, ``hvp`` and ``d3``; a loss is
    stateless apart from its settings (``reduction``, ``ignore_index``).
    """

    name = "loss"
    reduction = "mean"

    def _xp(self, f: Array, y: Array) -> Any:
        xp = namespace(f, y, what="outputs and targets")
        if f.ndim < 1 or y.ndim < 1 or y.shape[0] != f.shape[0]:
            raise ValueError(f"{type(self).__name__}: outputs {tuple(f.shape)} and targets {tuple(y.shape)} "
                             "must share the batch axis 0")
        return xp

    def value_and_grad(self, f: Array, y: Array) -> tuple[Array, Array]:
        """``(value(f, y), grad(f, y))``; a loss may share the work of the two (one check, one softmax)."""
        return self.value(f, y), self.grad(f, y)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))


class MSE(Loss):
    """Squared error ``c * sum (f - y)^2`` with ``y`` of the shape of ``f`` (any ``(B, ...)``).

    ``reduction`` sets ``c``:

    * ``"batch"`` (default): ``1/2 ||f_i - y_i||^2`` summed over the non-batch
      axes, then the mean over the batch: ``c = 1/(2B)``;
    * ``"mean"``: the mean over every element, ``c = 1/numel`` (``torch.nn.MSELoss()``);
    * ``"sum"``: ``c = 1`` (``torch.nn.MSELoss(reduction="sum")``).

    ``grad = 2c (f - y)``, ``hvp(v) = 2c v``, ``d3 = 0``.
    """

    name = "mse"

    def __init__(self, reduction: str = "batch"):
        check_choice("reduction", reduction, ("batch", "mean", "sum"))
        self.reduction = reduction

    def _check(self, f: Array, y: Array) -> Any:
        xp = self._xp(f, y)
        if tuple(y.shape) != tuple(f.shape):
            raise ValueError(f"MSE: targets must have the outputs' shape {tuple(f.shape)}, got {tuple(y.shape)}")
        return xp

    def scale(self, f: Array) -> float:
        """``c``: the factor on ``sum (f - y)^2``."""
        if self.reduction == "sum":
            return 1.0
        if self.reduction == "batch":
            return 0.5 / batch_size(f)
        return 1.0 / global_count(math.prod(int(d) for d in f.shape))

    def value(self, f: Array, y: Array) -> Array:
        """``c * sum (f - y)^2``."""
        self._check(f, y)
        r = f - y
        return batch_sum_all(r * r) * self.scale(f)

    def grad(self, f: Array, y: Array) -> Array:
        """``2c (f - y)``."""
        self._check(f, y)
        return (f - y) * (2 * self.scale(f))

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        """``2c v``."""
        self._check(f, y)
        return v * (2 * self.scale(f))

    def hessian_sqrt(self, f: Array, y: Array) -> list[Array]:
        """Columns ``S_c`` (shape of ``f`` = ``(B, C)``) with ``Σ_c S_c S_cᵀ = H_L``: ``√(2c) e_c`` in every row."""
        xp = self._check(f, y)
        root = math.sqrt(2 * self.scale(f))
        eye = xp.eye(f.shape[-1], dtype=f.dtype, device=_device(f))
        return [xp.zeros_like(f) + root * eye[c, :] for c in range(f.shape[-1])]

    def d3(self, f: Array, y: Array, v: Array) -> Array:
        """Zero: the loss is quadratic in ``f``."""
        xp = self._check(f, y)
        return xp.zeros((), dtype=f.dtype, device=_device(f))

    def granular_term(self, f: Array, y: Array, ghat_n: Array) -> tuple[Array, Array]:
        """ESN/MK's granular term (:class:`~curvcore.protocol.GranularLoss`): ``A = I``, so ``q = ĝ_n`` and
        ``ĝ_nᵀ q = ||ĝ_n||²``."""
        return ghat_n, sq_norm(ghat_n)

    def granular_share(self, gq: Array, ghat_n: Array) -> Array:
        """``ĝ_nᵀq / ||ĝ_n||²``: exactly 1 where ``ĝ_n ≠ 0`` (``q = ĝ_n``), 0 where ``ĝ_n = 0``."""
        n = norm(ghat_n)
        xp = array_namespace(n)
        return xp.where(n > 0, xp.ones_like(n), xp.zeros_like(n))


class CrossEntropy(Loss):
    """Softmax cross-entropy over the last axis, integer labels, averaged over labelled positions.

    Logits ``f`` are ``(B, C)`` or ``(B, ..., C)``; labels ``y`` are integers of
    shape ``f.shape[:-1]`` in ``[0, C)``, or ``ignore_index`` (those positions
    are left out). With ``p = softmax(f)`` per position and ``n`` the number of
    labelled positions (``reduction="mean"``, the default; ``"sum"``: ``n = 1``):
    ``value = sum (logsumexp(f) - f_y) / n``, ``grad = (p - onehot(y)) / n``,
    ``hvp(v) = (p*v - p <p, v>) / n`` and
    ``d3 = sum (E_p v^3 - 3 E_p v^2 E_p v + 2 (E_p v)^3) / n`` (cumulants of
    ``v`` under ``p``). Computed with log-sum-exp, stable for large logits.
    ``torch.nn.CrossEntropyLoss`` puts the classes on axis 1 instead; the torch
    adapter moves them last (see ``curvcore.backends.torch``).

    Args:
        reduction: ``"mean"`` over labelled positions or ``"sum"``.
        ignore_index: a label value whose positions are excluded (e.g. -100), or None.
    """

    name = "ce"

    def __init__(self, reduction: str = "mean", ignore_index: int | None = None):
        check_choice("reduction", reduction, ("mean", "sum"))
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self.reduction, self.ignore_index = reduction, ignore_index

    def _check(self, f: Array, y: Array) -> Any:
        xp = self._xp(f, y)
        if f.ndim < 2 or tuple(y.shape) != tuple(f.shape[:-1]):
            raise ValueError(f"CrossEntropy: logits (B, ..., C) need labels of shape (B, ...) = {tuple(f.shape[:-1])}"
                             f" (classes on the last axis); got logits {tuple(f.shape)} and labels {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise TypeError(f"CrossEntropy: labels must be integers, got dtype {y.dtype}")
        return xp

    def _weights(self, xp: Any, f: Array, y: Array) -> tuple[Array | None, Array]:
        """``(mask, n)``: 1.0 at labelled positions (None: all), and the normaliser ``n`` (poisoned by bad labels)."""
        C = f.shape[-1]
        labelled = None if self.ignore_index is None else y != self.ignore_index
        in_range = (y >= 0) & (y < C)
        bad = ~in_range if labelled is None else labelled & ~in_range
        any_bad = batch_any(bad)
        self._check_labels_later(xp, f, y)
        mask = None if labelled is None else xp.astype(labelled, f.dtype)
        if self.reduction == "sum":
            n = xp.ones((), dtype=f.dtype, device=_device(f))
        elif mask is None:
            n = xp.asarray(global_count(math.prod(int(d) for d in y.shape)), dtype=f.dtype, device=_device(f))
        else:
            n = batch_sum_all(mask)
        nan = xp.asarray(math.nan, dtype=f.dtype, device=_device(f))
        return mask, xp.where(any_bad, nan, n)

    def _check_labels_later(self, xp: Any, f: Array, y: Array) -> None:
        """Check the labels once per step, after it (:func:`~curvcore._checks.check_later`): bad labels
        already made the loss NaN, so the step's finiteness check sees them."""
        if value_checks_on() and first_check(y):
            check_later(lambda: self._check_labels(xp, f, y))

    def _check_labels(self, xp: Any, f: Array, y: Array) -> None:
        """``ValueError`` naming the labels outside ``[0, C)`` (and not ``ignore_index``)."""
        C = f.shape[-1]
        bad = (y < 0) | (y >= C)
        if self.ignore_index is not None:
            bad = bad & (y != self.ignore_index)
        if not concrete_bool(xp.any(bad)):
            return
        wrong = xp.where(bad, y, xp.zeros_like(y))
        raise ValueError(
            f"CrossEntropy: labels must lie in [0, {C})" + (f" or equal ignore_index={self.ignore_index}"
                                                            if self.ignore_index is not None else "")
            + f"; got {int(xp.sum(xp.astype(bad, xp.int64)))} label(s) outside, e.g. "
            f"{int(xp.max(wrong)) if concrete_bool(xp.any(wrong > 0)) else int(xp.min(wrong))}")

    def _start(self, f: Array, y: Array) -> tuple[Any, tuple[Array, Array] | None, Array | None, Array | None]:
        """``(xp, (value, grad) from the kernel or None, mask, n)``: the checks, then the kernel or the weights."""
        xp = self._check(f, y)
        fused = self._fused(xp, f, y)
        return (xp, fused, None, None) if fused is not None else (xp, None, *self._weights(xp, f, y))

    def _fused(self, xp: Any, f: Array, y: Array) -> tuple[Array, Array] | None:
        """``(value, grad)`` from a kernel registered for the array type (:func:`register_cross_entropy`),
        or None: no kernel, a distributed step, or no labels."""
        kernel = _KERNELS.get(type(f))
        if kernel is None or current().distributed or not math.prod(y.shape):
            return None
        self._check_labels_later(xp, f, y)
        return kernel(f, y, self.ignore_index, self.reduction == "mean")

    @staticmethod
    def _logsumexp(xp: Any, f: Array) -> Array:
        m = xp.max(f, axis=-1, keepdims=True)
        return m + xp.log(xp.sum(xp.exp(f - m), axis=-1, keepdims=True))

    def softmax(self, f: Array) -> Array:
        """Softmax over the last axis, stable."""
        xp = array_namespace(f)
        e = xp.exp(f - xp.max(f, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)

    def onehot(self, f: Array, y: Array) -> Array:
        """One-hot labels over the last axis of ``f``, in its dtype and device (zeros for ignored labels)."""
        xp = array_namespace(f, y)
        classes = xp.arange(f.shape[-1], device=_device(f))
        return xp.astype(y[..., None] == classes, f.dtype)

    def _masked(self, a: Array, mask: Array | None) -> Array:
        """Zero the unlabelled positions of ``a`` (shape of the labels, or with a trailing class axis)."""
        if mask is None:
            return a
        return a * (mask if a.ndim == mask.ndim else mask[..., None])

    def value(self, f: Array, y: Array) -> Array:
        """``sum (logsumexp(f) - f[y]) / n`` over labelled positions."""
        xp, fused, mask, n = self._start(f, y)
        if fused is not None:
            return fused[0]
        per = self._logsumexp(xp, f)[..., 0] - xp.sum(f * self.onehot(f, y), axis=-1)
        return batch_sum_all(self._masked(per, mask)) / n

    def grad(self, f: Array, y: Array) -> Array:
        """``(softmax(f) - onehot(y)) / n`` (zero at ignored positions)."""
        xp, fused, mask, n = self._start(f, y)
        if fused is not None:
            return fused[1]
        return self._masked(self.softmax(f) - self.onehot(f, y), mask) / n

    def value_and_grad(self, f: Array, y: Array) -> tuple[Array, Array]:
        """:meth:`value` and :meth:`grad` from one check and one ``exp`` (the same values, bit for bit)."""
        xp, fused, mask, n = self._start(f, y)
        if fused is not None:
            return fused
        m = xp.max(f, axis=-1, keepdims=True)
        e = xp.exp(f - m)
        total = xp.sum(e, axis=-1, keepdims=True)
        onehot = self.onehot(f, y)
        per = (m + xp.log(total))[..., 0] - xp.sum(f * onehot, axis=-1)
        return batch_sum_all(self._masked(per, mask)) / n, self._masked(e / total - onehot, mask) / n

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        """``(p*v - p*<p, v>) / n`` per position (zero at ignored positions)."""
        xp = self._check(f, y)
        mask, n = self._weights(xp, f, y)
        p = self.softmax(f)
        pv = p * v
        return self._masked(pv - p * xp.sum(pv, axis=-1, keepdims=True), mask) / n

    def hessian_sqrt(self, f: Array, y: Array) -> list[Array]:
        """Columns ``S_c`` (shape of ``f``) with ``Σ_c S_c S_cᵀ = H_L`` position by position.

        ``S_c = √p_c (e_c - p) / √n``: the columns of ``R = diag(√p) - p √pᵀ``
        (``R Rᵀ = diag(p) - ppᵀ``, curvlinops' ``loss_hessian_matrix_sqrt``), one per class.
        """
        xp = self._check(f, y)
        mask, n = self._weights(xp, f, y)
        p = self.softmax(f)
        eye = xp.eye(f.shape[-1], dtype=f.dtype, device=_device(f))
        root_n = xp.sqrt(n)
        return [self._masked(xp.sqrt(p[..., c:c + 1]) * (eye[c, :] - p), mask) / root_n for c in range(f.shape[-1])]

    def d3(self, f: Array, y: Array, v: Array) -> Array:
        """``sum (E v^3 - 3 E v^2 E v + 2 (E v)^3) / n`` with ``E`` under ``softmax(f)`` per position."""
        xp = self._check(f, y)
        mask, n = self._weights(xp, f, y)
        p = self.softmax(f)
        m1 = xp.sum(p * v, axis=-1)
        m2 = xp.sum(p * v * v, axis=-1)
        m3 = xp.sum(p * v * v * v, axis=-1)
        return batch_sum_all(self._masked(m3 - 3 * m2 * m1 + 2 * m1 * m1 * m1, mask)) / n

    def granular_term(self, f: Array, y: Array, ghat_n: Array) -> tuple[Array, Array]:
        """ESN/MK's granular term (:class:`~curvcore.protocol.GranularLoss`) for logits ``(B, C)``:
        ``A = diag(p) - ppᵀ``, ``q = (1/p_y)(1/C - e_y)``, ``ĝ_nᵀ q = (1 - p_y)/p_y`` (``p_y`` floored at the
        dtype's smallest normal number, which only matters once ``p_y`` underflows)."""
        xp = array_namespace(f)
        onehot = self.onehot(f, y)
        p_y = xp.sum(self.softmax(f) * onehot, axis=1)
        p_y = xp.maximum(p_y, xp.asarray(xp.finfo(f.dtype).smallest_normal, dtype=f.dtype, device=_device(f)))
        q = (1.0 / f.shape[1] - onehot) / p_y[:, None]
        return q, (1 - p_y) / p_y

    def granular_share(self, gq: Array, ghat_n: Array) -> Array:
        """``ĝ_nᵀq / ||ĝ_n||²`` as ``(gq/||ĝ_n||)/||ĝ_n||`` (no square formed), 0 where ``ĝ_n = 0``."""
        return per_gamma(gq, norm(ghat_n))


_KERNELS: dict[type, Callable[[Array, Array, int | None, bool], tuple[Array, Array]]] = {}


def register_cross_entropy(array_type: type,
                           kernel: Callable[[Array, Array, int | None, bool], tuple[Array, Array]]) -> None:
    """A fused softmax cross-entropy for arrays of exactly ``array_type`` (PyTorch: ``log_softmax``).

    ``kernel(f, y, ignore_index, mean)`` returns :class:`CrossEntropy`'s
    ``(value, grad)`` on one process: ``sum (logsumexp(f) - f_y) / n`` and
    ``(softmax(f) - onehot(y)) / n`` over the labelled positions (``n``: their
    number when ``mean``, else 1), both NaN when a label other than
    ``ignore_index`` lies outside ``[0, C)`` (the step's finiteness check then
    names the labels). Used for ``value``, ``grad`` and ``value_and_grad`` alike.
    """
    _KERNELS[array_type] = kernel


_BY_NAME = {"mse": MSE, "ce": CrossEntropy, "cross_entropy": CrossEntropy, "crossentropy": CrossEntropy}


def get(name: str | Loss) -> Loss:
    """Return a loss instance by name (``"mse"``, ``"ce"``), or pass a loss through: a curvcore loss or any
    object with the :class:`~curvcore.protocol.Loss` methods (``value``, ``grad``, ``hvp``).

    Raises:
        ValueError: unknown name.
        TypeError: neither a name, a curvcore loss nor an object with ``value``, ``grad`` and ``hvp``
            (the torch adapter maps ``torch.nn`` loss modules; see ``curvcore.backends.torch.Optimizer``).
    """
    if isinstance(name, Loss) or (not isinstance(name, str) and satisfies(name, LossProtocol)):
        return name
    if not isinstance(name, str):
        raise TypeError(f"loss must be 'mse', 'ce', a curvcore.losses instance or an object with value, grad and "
                        f"hvp (curvcore.protocol.Loss), got {type(name).__name__}")
    try:
        return _BY_NAME[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of 'mse', 'ce'") from None
