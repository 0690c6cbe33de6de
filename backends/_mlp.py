"""An explicit MLP over the array API: forward, forward-mode JVP, VJP, layer records, jets.

The same code runs on NumPy, CuPy and ``array_api_strict`` arrays (and any
other array-API library): every derivative is written by hand, no autodiff.

Layer k (0-based): ``z_k = a_k W_k^T + b_k``, ``a_{k+1} = act(z_k)`` for hidden
layers; the output layer is linear (logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from curvcore._namespace import array_namespace

from curvcore._checks import check_batch, check_same_structure, in_step
from curvcore.protocol import Cotangent, LayerRecord, resolve_cotangent

from ._activations import check_activation, derivatives

Array = Any


class ArrayAPIMLP:
    """A dense MLP ``sizes[0] -> ... -> sizes[-1]`` written over the array API.

    Args:
        sizes: layer widths, input first, e.g. ``[64, 32, 10]``.
        activation: hidden activation (tanh, sigmoid, relu, leaky_relu,
            softplus, identity); the output layer is linear.
        xp: the array namespace of the params (``model.xp``).
        validate: check batches for shape, dtype, library and NaN/Inf.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "tanh", xp: Any = None, validate: bool = True):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
        self.sizes = sizes
        self.activation = check_activation(activation)
        self.xp = xp
        self.validate = validate

    def __repr__(self) -> str:
        return f"ArrayAPIMLP(sizes={self.sizes}, activation={self.activation!r})"

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of ``[W1, b1, W2, b2, ...]``."""
        shapes: list[tuple[int, ...]] = []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            shapes += [(n_out, n_in), (n_out,)]
        return shapes

    # -- checks ------------------------------------------------------------
    def _check(self, params: Sequence[Array], x: Array) -> Any:
        expected = self.param_shapes()
        if len(params) != len(expected):
            raise ValueError(f"params must hold {len(expected)} arrays [W1, b1, ...], got {len(params)}")
        for i, (p, s) in enumerate(zip(params, expected)):
            if tuple(p.shape) != s:
                raise ValueError(f"Shape mismatch in params[{i}]: expected {s}, got {tuple(p.shape)}.")
        xp = array_namespace(x) if in_step() else check_batch(params, x, validate=self.validate)
        if x.ndim != 2:
            raise ValueError(f"x must be a batch (B, {self.sizes[0]}) for this MLP, got shape {tuple(x.shape)}")
        if x.shape[1] != self.sizes[0]:
            raise ValueError(f"x has {x.shape[1]} features but the model expects {self.sizes[0]}")
        return xp

    def _act(self, k: int, z: Array, order: int) -> list[Array]:
        """Activation of layer k and its derivatives (identity on the output layer)."""
        return derivatives(self.activation if k < self.n_layers - 1 else "identity", z, order)

    # -- primitives --------------------------------------------------------
    def _forward_records(self, params: Sequence[Array], x: Array) -> list[tuple[Array, Array, Array, Array]]:
        """Per layer ``(a, z, dact, h)``."""
        xp = self._check(params, x)
        recs = []
        a = x
        for k in range(self.n_layers):
            W, b = params[2 * k], params[2 * k + 1]
            z = xp.matmul(a, xp.matrix_transpose(W)) + b
            h, dact = self._act(k, z, 1)
            recs.append((a, z, dact, h))
            a = h
        return recs

    def forward(self, params: Sequence[Array], x: Array) -> Array:
        """The logits ``f(params, x)``, shape ``(B, sizes[-1])``."""
        xp = self._check(params, x)
        a = x
        for k in range(self.n_layers):
            z = xp.matmul(a, xp.matrix_transpose(params[2 * k])) + params[2 * k + 1]
            a = self._act(k, z, 0)[0]
        return a

    def jvp(self, params: Sequence[Array], x: Array, tangent: Sequence[Array]) -> tuple[Array, Array]:
        """``(f, J tangent)`` in one forward-mode sweep (no VJP)."""
        out, d1 = self.jet(params, x, tangent, 1)
        return out, d1

    def vjp(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Array], list[Array]]]:
        """``(f, pullback)`` with ``pullback(u) = J^T u`` as ``[dW1, db1, ...]``."""
        out, _, pullback = self.linearize(params, x)
        return out, pullback

    def linearize(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable, Callable]:
        """``(f, jvp_fn, pullback)`` from one forward pass (the optional protocol primitive).

        ``jvp_fn(t)``: tangent-only forward mode over the cached records,
        ``zdot_k = adot_k W_k^T + a_k U_k^T + c_k``, ``adot_{k+1} = act'(z_k) zdot_k``
        (``adot_0 = 0``; ``t = [U_1, c_1, ...]``): two matmuls per layer, one
        for the first layer. ``pullback(u) = J^T u``: one backward sweep.
        """
        recs = self._forward_records(params, x)
        xp = array_namespace(x)

        def jvp_fn(tangent: Sequence[Array]) -> Array:
            check_same_structure("tangent", tangent, params)
            adot = None
            for k, (a, _, dact, _) in enumerate(recs):
                zdot = xp.matmul(a, xp.matrix_transpose(tangent[2 * k])) + tangent[2 * k + 1]
                if adot is not None:
                    zdot = zdot + xp.matmul(adot, xp.matrix_transpose(params[2 * k]))
                adot = dact * zdot
            return adot

        def pullback(u: Array) -> list[Array]:
            return _grads_from_records(self._backward(params, recs, u))

        return recs[-1][3], jvp_fn, pullback

    def layers(self, params: Sequence[Array], x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Layer records for one forward and one backward sweep."""
        return self._backward(params, self._forward_records(params, x), out_cotangent)

    def _backward(self, params: Sequence[Array], recs: list, out_cotangent: Cotangent) -> list[LayerRecord]:
        xp = array_namespace(recs[0][0])
        u = resolve_cotangent(out_cotangent, recs[-1][3])
        if tuple(u.shape) != tuple(recs[-1][3].shape):
            raise ValueError(
                f"Shape mismatch in the output cotangent: expected {tuple(recs[-1][3].shape)}, got {tuple(u.shape)}."
            )
        out: list[LayerRecord] = [None] * self.n_layers  # type: ignore[list-item]
        for k in reversed(range(self.n_layers)):
            a, z, dact, h = recs[k]
            g = u * dact
            out[k] = LayerRecord(a=a, z=z, dact=dact, g=g, h=h)
            u = xp.matmul(g, params[2 * k])
        return out

    def jet(self, params: Sequence[Array], x: Array, tangent: Sequence[Array], order: int) -> list[Array]:
        """``[f, d1, ..., d_order]``: derivatives of ``t -> f(params + t*tangent, x)`` at 0.

        Taylor mode per layer with ``W + tU``, ``b + tc`` and input series
        ``a_j``: ``z_j = a_j W^T + j a_{j-1} U^T`` (``+ c`` for j = 1); the
        activation by Faa di Bruno, ``h1 = s1 z1``, ``h2 = s2 z1^2 + s1 z2``,
        ``h3 = s3 z1^3 + 3 s2 z1 z2 + s1 z3`` (``s_j`` = j-th derivative at ``z0``).
        Costs about ``order + 1`` forward passes.
        """
        if order not in (1, 2, 3):
            raise ValueError(f"jet order must be 1, 2 or 3, got {order!r}")
        xp = self._check(params, x)
        check_same_structure("tangent", tangent, params)
        a = [x] + [xp.zeros_like(x)] * order
        for k in range(self.n_layers):
            Wt, Ut = xp.matrix_transpose(params[2 * k]), xp.matrix_transpose(tangent[2 * k])
            z = [xp.matmul(a[0], Wt) + params[2 * k + 1]]
            for j in range(1, order + 1):
                z.append(xp.matmul(a[j], Wt) + j * xp.matmul(a[j - 1], Ut))
            z[1] = z[1] + tangent[2 * k + 1]
            a = _faa_di_bruno(self._act(k, z[0], order), z)
        return a


def _faa_di_bruno(s: list[Array], z: list[Array]) -> list[Array]:
    """Taylor coefficients (derivatives) of ``act(z(t))`` up to ``len(z) - 1``."""
    h = [s[0], s[1] * z[1]]
    if len(z) > 2:
        h.append(s[2] * z[1] * z[1] + s[1] * z[2])
    if len(z) > 3:
        h.append(s[3] * z[1] * z[1] * z[1] + 3 * s[2] * z[1] * z[2] + s[1] * z[3])
    return h


def _grads_from_records(recs: list[LayerRecord]) -> list[Array]:
    """``[g^T a, sum_batch g]`` per layer: the parameter gradient from the records."""
    grads: list[Array] = []
    for r in recs:
        xp = array_namespace(r.g)  # over this process's batch: data-parallel sums happen in the core
        grads += [xp.matmul(xp.matrix_transpose(r.g), r.a), xp.sum(r.g, axis=0)]
    return grads
