"""Curvature products: the generalised Gauss-Newton (GGN) vector product, on any model.

``G = J^T H_L J`` with ``J`` the Jacobian of the model output w.r.t. the
params and ``H_L`` the loss Hessian w.r.t. the output (closed form,
:mod:`curvcore.losses`). One product costs one forward, one tangent
propagation and one backward (through :func:`curvcore.protocol.linearize`);
with an existing :class:`Linearization` it costs only the tangent and the
backward, which is how CurveBall gets ``J z``, ``J^T(.)`` and ``J dz`` from
one forward.

>>> import numpy as np, curvcore as cc
>>> model, params = cc.backends.mlp("numpy", [4, 5, 3], seed=0)
>>> x, y = np.ones((2, 4)), np.array([0, 2])
>>> Gv = cc.ggn_vp(model, cc.losses.CrossEntropy(), params, x, y, params)   # G applied to params
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from . import tree
from .losses import get as get_loss
from .protocol import Array, Loss, Model, flat_model, linearize

__all__ = ["Linearization", "ggn_vp", "ggn_vp_at", "linearization"]


class Linearization(NamedTuple):
    """A model linearised at one point: one forward pass, then tangents and cotangents.

    Attributes:
        out: the output ``f(params, x)``.
        jvp: ``t -> J t`` (a tangent like params to an output-shaped array).
        vjp: ``u -> J^T u`` (an output-shaped array to a params-like list).
    """

    out: Array
    jvp: Callable[[Any], Array]
    vjp: Callable[[Array], Any]


def linearization(model: Model, params: Any, x: Array) -> Linearization:
    """``Linearization`` of ``model`` at ``params`` on the batch ``x`` (one forward pass)."""
    return Linearization(*linearize(model, params, x))


def ggn_vp_at(lin: Linearization, loss: Loss, y: Array, v: Any, plus: Array | None = None) -> tuple[Any, Array, Array]:
    """``(J^T (H_L J v + plus), J v, H_L J v)`` at an existing linearisation.

    ``plus`` is an output-space cotangent added before the backward pass
    (CurveBall adds the loss gradient ``g_f`` to get ``G v + g`` in one
    backward). Cost: one tangent propagation and one backward.
    """
    Jv = lin.jvp(v)
    HJv = loss.hvp(lin.out, y, Jv)
    return lin.vjp(HJv if plus is None else HJv + plus), Jv, HJv


def ggn_vp(model: Model, loss: Loss | str, params: Any, x: Array, y: Array, v: Any,
           linearization: Linearization | None = None) -> Any:
    """The GGN-vector product ``J^T H_L J v``, in the structure of ``params``.

    Args:
        model: a protocol model (any backend).
        loss: a curvcore loss or its name (``"ce"``, ``"mse"``).
        params: the point (any pytree of arrays).
        x: the batch's inputs.
        y: the batch's targets.
        v: the vector, like ``params``.
        linearization: an existing :class:`Linearization` at ``params`` on
            ``x`` (from :func:`linearization`) to reuse its forward pass; its
            ``jvp``/``vjp`` take and return ``params``-structured trees.

    Returns:
        ``G v`` with the structure of ``params``.

    Raises:
        ValueError: ``v`` does not have the structure and shapes of ``params``.
    """
    loss = get_loss(loss)
    leaves, treedef = tree.flatten(params)
    v_leaves, v_def = tree.flatten(v, what="v")
    if v_def != treedef or [tuple(a.shape) for a in v_leaves] != [tuple(a.shape) for a in leaves]:
        raise ValueError(f"v must have the structure and shapes of params ({treedef.describe()})")
    if linearization is None:
        lin = Linearization(*linearize(flat_model(model, treedef), leaves, x))
        return tree.unflatten(treedef, ggn_vp_at(lin, loss, y, v_leaves)[0])
    return ggn_vp_at(linearization, loss, y, v)[0]
