"""Losses with their output-space derivatives in closed form (array-API code).

Both losses are **batch means** over the B samples of a batch. For model
outputs ``f`` of shape ``(B, C)``:

* ``value(f, y)``: the loss (0-d array);
* ``grad(f, y)``: ``dL/df`` (B, C), carrying the 1/B of the mean;
* ``hvp(f, y, v)``: the loss Hessian w.r.t. the outputs applied to ``v``
  (B, C), sample by sample, with the 1/B;
* ``d3(f, y, v)``: the third directional derivative ``d^3 L[v, v, v]`` (0-d).

The losses are stateless; use the module-level instances or construct new
ones. ``get("mse")`` / ``get("ce")`` return them by name.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace
from array_api_compat import device as _device

from ._checks import namespace

Array = Any

__all__ = ["MSE", "CrossEntropy", "Loss", "get"]


class Loss:
    """Base class: validation shared by the losses."""

    name = "loss"

    def _xp(self, f: Array, y: Array) -> Any:
        xp = namespace(f, y, what="outputs and targets")
        if f.ndim != 2:
            raise ValueError(f"{type(self).__name__}: outputs must be (B, C), got shape {tuple(f.shape)}")
        if y.shape[0] != f.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: {f.shape[0]} outputs but {y.shape[0]} targets"
            )
        return xp

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MSE(Loss):
    """Mean squared error, per sample ``1/2 ||f - y||^2``, batch mean.

    ``grad = (f - y)/B``, ``hvp(v) = v/B``, ``d3 = 0``. ``y`` has the shape of ``f``.
    """

    name = "mse"

    def _check(self, f: Array, y: Array) -> Any:
        xp = self._xp(f, y)
        if tuple(y.shape) != tuple(f.shape):
            raise ValueError(f"MSE: targets must have the outputs' shape {tuple(f.shape)}, got {tuple(y.shape)}")
        return xp

    def value(self, f: Array, y: Array) -> Array:
        """``mean_p 1/2 ||f_p - y_p||^2``."""
        xp = self._check(f, y)
        r = f - y
        return xp.sum(r * r) / (2 * f.shape[0])

    def grad(self, f: Array, y: Array) -> Array:
        """``(f - y)/B``."""
        self._check(f, y)
        return (f - y) / f.shape[0]

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        """``v/B``."""
        self._check(f, y)
        return v / f.shape[0]

    def d3(self, f: Array, y: Array, v: Array) -> Array:
        """Zero: the loss is quadratic in ``f``."""
        xp = self._check(f, y)
        return xp.zeros((), dtype=f.dtype, device=_device(f))


class CrossEntropy(Loss):
    """Softmax cross-entropy with integer labels ``y`` in ``[0, C)``, batch mean.

    With ``p = softmax(f)`` row by row: ``value = mean(logsumexp(f) - f_y)``,
    ``grad = (p - onehot(y))/B``, ``hvp(v) = (p*v - p <p, v>)/B`` and
    ``d3 = mean(E_p v^3 - 3 E_p v^2 E_p v + 2 (E_p v)^3)`` (cumulants of
    ``v`` under ``p``). Computed with log-sum-exp, stable for large logits.
    """

    name = "ce"

    def _check(self, f: Array, y: Array) -> Any:
        xp = self._xp(f, y)
        if y.ndim != 1:
            raise ValueError(f"CrossEntropy: labels must be 1-d integers (B,), got shape {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise TypeError(f"CrossEntropy: labels must be integers, got dtype {y.dtype}")
        return xp

    @staticmethod
    def _logsumexp(xp: Any, f: Array) -> Array:
        m = xp.max(f, axis=1, keepdims=True)
        return m + xp.log(xp.sum(xp.exp(f - m), axis=1, keepdims=True))

    def softmax(self, f: Array) -> Array:
        """Row-wise softmax, stable."""
        xp = array_namespace(f)
        e = xp.exp(f - xp.max(f, axis=1, keepdims=True))
        return e / xp.sum(e, axis=1, keepdims=True)

    def onehot(self, f: Array, y: Array) -> Array:
        """One-hot labels in the dtype and device of ``f``."""
        xp = array_namespace(f, y)
        classes = xp.arange(f.shape[1], device=_device(f))
        return xp.astype(xp.reshape(y, (-1, 1)) == xp.reshape(classes, (1, -1)), f.dtype)

    def value(self, f: Array, y: Array) -> Array:
        """``mean_p (logsumexp(f_p) - f_p[y_p])``."""
        xp = self._check(f, y)
        lse = self._logsumexp(xp, f)[:, 0]
        return xp.mean(lse - xp.sum(f * self.onehot(f, y), axis=1))

    def grad(self, f: Array, y: Array) -> Array:
        """``(softmax(f) - onehot(y))/B``."""
        self._check(f, y)
        return (self.softmax(f) - self.onehot(f, y)) / f.shape[0]

    def hvp(self, f: Array, y: Array, v: Array) -> Array:
        """``(p*v - p*<p, v>_row)/B``."""
        xp = self._check(f, y)
        p = self.softmax(f)
        pv = p * v
        return (pv - p * xp.sum(pv, axis=1, keepdims=True)) / f.shape[0]

    def d3(self, f: Array, y: Array, v: Array) -> Array:
        """``mean_p (E v^3 - 3 E v^2 E v + 2 (E v)^3)`` with ``E`` under ``softmax(f_p)``."""
        xp = self._check(f, y)
        p = self.softmax(f)
        m1 = xp.sum(p * v, axis=1)
        m2 = xp.sum(p * v * v, axis=1)
        m3 = xp.sum(p * v * v * v, axis=1)
        return xp.mean(m3 - 3 * m2 * m1 + 2 * m1 * m1 * m1)


_BY_NAME = {"mse": MSE, "ce": CrossEntropy, "cross_entropy": CrossEntropy, "crossentropy": CrossEntropy}


def get(name: str | Loss) -> Loss:
    """Return a loss instance by name (``"mse"``, ``"ce"``) or pass an instance through.

    Raises:
        ValueError: unknown name.
    """
    if isinstance(name, Loss):
        return name
    try:
        return _BY_NAME[str(name).lower()]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of 'mse', 'ce'") from None
