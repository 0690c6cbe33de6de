"""The model protocol and parameter-list ("tree") helpers.

Every curvature method in curvcore talks to a model only through the
primitives below, so one method implementation serves every backend.

Params are a plain ``list`` of arrays ``[W1, b1, W2, b2, ...]`` with ``W_k`` of
shape ``(n_out, n_in)`` (the PyTorch layout) and ``b_k`` of shape ``(n_out,)``.
Vectors over params (gradients, directions, CurveBall's ``z``) are lists of
the same structure. Methods never mutate them: every helper returns new lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from array_api_compat import array_namespace

from ._reduce import vdot

Array = Any  # an array of any array-API library (numpy, torch, jax, cupy, ...)
Params = list  # list[Array]


class LayerRecord(NamedTuple):
    """What one dense layer ``z = a W^T + b``, ``h = act(z)`` saw in a pass.

    Attributes:
        a: the layer input, shape ``(B, n_in)``.
        z: the pre-activation, shape ``(B, n_out)``.
        dact: the activation derivative ``act'(z)``, shape ``(B, n_out)``
            (all ones for a linear layer).
        g: the back-propagated gradient ``dL/dz`` for the cotangent given to
            :meth:`Model.layers`, shape ``(B, n_out)``. With the cotangent
            ``loss.grad(out, y)`` (which carries the 1/B of the batch mean),
            ``g.T @ a`` is the weight gradient and ``sum(g, axis=0)`` the bias
            gradient.
        h: the layer output ``act(z)``, shape ``(B, n_out)``; for the last
            layer this is the model output.
    """

    a: Array
    z: Array
    dact: Array
    g: Array
    h: Array


Cotangent = Array | Callable[[Array], Array]


@runtime_checkable
class Model(Protocol):
    """The primitives a backend adapter provides.

    Optional primitive (not checked by ``isinstance(model, Model)``; call it
    through :func:`linearize`, which falls back to ``jvp``/``vjp``):
    ``linearize(params, x) -> (f, jvp_fn, pullback)`` runs ONE forward pass;
    ``jvp_fn(tangent) = J tangent`` then propagates only the tangent through
    the cached activations and derivatives, and ``pullback(u) = J^T u`` (a
    params-like list) is a backward sweep over the same cached forward. A
    method needing ``J z``, ``J^T u`` and ``J dz`` at one point pays
    1 forward + 2 tangent propagations + 1 backward, where separate
    ``jvp``/``vjp``/``jvp`` calls redo the forward three times.

    Attributes:
        xp: the array namespace of the model's arrays
            (``array_api_compat.array_namespace`` of its params).
    """

    xp: Any

    def forward(self, params: Params, x: Array) -> Array:
        """Return the output ``f(params, x)`` of shape ``(B, C)``."""
        ...

    def jvp(self, params: Params, x: Array, tangent: Params) -> tuple[Array, Array]:
        """Return ``(f, J tangent)``, true forward mode where the framework has it."""
        ...

    def vjp(self, params: Params, x: Array) -> tuple[Array, Callable[[Array], Params]]:
        """Return ``(f, pullback)`` with ``pullback(u) = J^T u`` (a params-like list)."""
        ...

    def layers(self, params: Params, x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Return one :class:`LayerRecord` per dense layer, input to output.

        ``out_cotangent`` is the cotangent of the output, or a function
        ``out -> cotangent`` (so that a method needs only one forward pass to
        get the loss gradient and the records).
        """
        ...


def linearize(model: Any, params: Params, x: Array) -> tuple[Array, Callable[[Params], Array],
                                                             Callable[[Array], Params]]:
    """``(f, jvp_fn, pullback)``: ``jvp_fn(t) = J t``, ``pullback(u) = J^T u`` at ``params``.

    Calls ``model.linearize(params, x)`` (the optional primitive: one forward
    pass, then tangent-only propagations and backward sweeps over the cached
    forward) when the model has it; otherwise composes ``model.vjp`` (one
    forward) with a ``model.jvp`` per tangent (a forward each), so models that
    provide only the required primitives keep working.
    """
    own = getattr(model, "linearize", None)
    if own is not None:
        return own(params, x)
    return linearize_by_composition(model, params, x)


def linearize_by_composition(model: Any, params: Params, x: Array) -> tuple[Array, Callable[[Params], Array],
                                                                            Callable[[Array], Params]]:
    """``(f, jvp_fn, pullback)`` from ``model.vjp`` and one ``model.jvp`` per tangent (no shared forward)."""
    out, pullback = model.vjp(params, x)

    def jvp_fn(tangent: Params) -> Array:
        return model.jvp(params, x, tangent)[1]

    return out, jvp_fn, pullback


def resolve_cotangent(out_cotangent: Cotangent, out: Array) -> Array:
    """Return the output cotangent, calling it on ``out`` if it is a function."""
    return out_cotangent(out) if callable(out_cotangent) else out_cotangent


def checked_pullback(out: Array, pull: Callable[[Array], tuple]) -> Callable[[Array], list[Array]]:
    """Wrap a framework pullback (``torch.func.vjp``/``jax.vjp`` style, returning a
    1-tuple) so that it checks the cotangent's shape and returns a params list."""

    def pullback(u: Array) -> list[Array]:
        if tuple(u.shape) != tuple(out.shape):
            raise ValueError(f"Shape mismatch in the cotangent: expected {tuple(out.shape)}, got {tuple(u.shape)}.")
        return list(pull(u)[0])

    return pullback


# ---------------------------------------------------------------------------
# tree helpers: elementwise algebra over params-like lists, array API only
# ---------------------------------------------------------------------------


def tree_map(fn: Callable[..., Array], *trees: Sequence[Array]) -> list[Array]:
    """Apply ``fn`` leaf by leaf to lists of the same structure."""
    first = trees[0]
    for t in trees[1:]:
        if len(t) != len(first):
            raise ValueError(f"Structure mismatch: lists of length {len(first)} and {len(t)}.")
    return [fn(*leaves) for leaves in zip(*trees)]


def tree_add(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a + b``."""
    return tree_map(lambda u, v: u + v, a, b)


def tree_sub(a: Sequence[Array], b: Sequence[Array]) -> list[Array]:
    """``a - b``."""
    return tree_map(lambda u, v: u - v, a, b)


def tree_scale(a: Sequence[Array], s: Any) -> list[Array]:
    """``s * a`` for a scalar (Python or 0-d array) ``s``."""
    return [s * u for u in a]


def tree_axpy(alpha: Any, x: Sequence[Array], y: Sequence[Array]) -> list[Array]:
    """``alpha * x + y``."""
    return tree_map(lambda u, v: alpha * u + v, x, y)


def tree_zeros_like(a: Sequence[Array]) -> list[Array]:
    """Zeros of the same shapes, dtypes and devices."""
    return [array_namespace(u).zeros_like(u) for u in a]


def tree_dot(a: Sequence[Array], b: Sequence[Array]) -> Array:
    """``<a, b>``: the sum over the list of elementwise products (a 0-d array)."""
    terms = tree_map(vdot, a, b)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def tree_norm(a: Sequence[Array]) -> Array:
    """Euclidean norm over the whole list (a 0-d array)."""
    return array_namespace(a[0]).sqrt(tree_dot(a, a))


def tree_size(a: Sequence[Array]) -> int:
    """Total number of scalars in the list."""
    total = 0
    for u in a:
        n = 1
        for d in u.shape:
            n *= int(d)
        total += n
    return total
