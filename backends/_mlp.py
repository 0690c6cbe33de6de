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
from curvcore.layers import MLPGrads
from curvcore.protocol import Cotangent, LayerRecord, check_jet_order, check_jet_tangent, resolve_cotangent

from ._activations import check_activation, derivatives

Array = Any

_PIECEWISE_LINEAR = ("relu", "leaky_relu", "identity")  # second and third derivatives vanish


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
        self._shapes = self.param_shapes()
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
        expected = self._shapes
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

    @staticmethod
    def affine(a: Array, W: Array, b: Array) -> Array:
        """``a Wᵀ + b`` for a batch ``a`` ``(B, n_in)``, ``W`` ``(n_out, n_in)``, ``b`` ``(n_out,)``; a backend may
        fuse it (torch: ``addmm``)."""
        return a @ W.T + b

    def _act(self, k: int, z: Array, order: int) -> list[Array]:
        """Activation of layer k and its derivatives (identity on the output layer)."""
        return derivatives(self.activation if k < self.n_layers - 1 else "identity", z, order)

    # -- primitives --------------------------------------------------------
    def _forward_records(self, params: Sequence[Array], x: Array) -> list[tuple[Array, Array, Array, Array]]:
        """Per layer ``(a, z, dact, h)``."""
        self._check(params, x)
        recs = []
        a = x
        for k in range(self.n_layers):
            W, b = params[2 * k], params[2 * k + 1]
            z = self.affine(a, W, b)
            h, dact = self._act(k, z, 1)
            recs.append((a, z, dact, h))
            a = h
        return recs

    def forward(self, params: Sequence[Array], x: Array) -> Array:
        """The logits ``f(params, x)``, shape ``(B, sizes[-1])``."""
        self._check(params, x)
        a = x
        for k in range(self.n_layers):
            z = self.affine(a, params[2 * k], params[2 * k + 1])
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
        cache = [(a, [h, dact]) for a, _, dact, h in recs]

        def jvp_fn(tangent: Sequence[Array]) -> Array:
            check_same_structure("tangent", tangent, params)
            return self._push(params, cache, tangent, 1)[0]

        def pullback(u: Array) -> list[Array]:
            return list(MLPGrads(self._backward(params, recs, u)))  # this process's batch: the core sums

        return recs[-1][3], jvp_fn, pullback

    def layers(self, params: Sequence[Array], x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Layer records for one forward and one backward sweep."""
        return self._backward(params, self._forward_records(params, x), out_cotangent)

    def _backward(self, params: Sequence[Array], recs: list, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Records from the output down; the cotangent of the input ``x`` is never formed."""
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
            if k:
                u = g @ params[2 * k]
        return out

    def jet(self, params: Sequence[Array], x: Array, tangent: Sequence[Array], order: int) -> list[Array]:
        """``[f, d1, ..., d_order]``: derivatives of ``t -> f(params + t*tangent, x)`` at 0.

        One forward pass, then the Taylor coefficients (:meth:`jets`).
        """
        check_jet_order(order)
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        out, cache = self._taylor_forward(params, x, order)
        return [out] + self._push(params, cache, tangent, order)

    def jets(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Sequence[Any], int], list[Array]]]:
        """``(f, jet_fn)`` from one forward pass (the optional protocol primitive).

        The forward caches every layer's input ``a_k`` and ``act^(j)(z_k)``,
        j <= 3. ``jet_fn(tangent, order)`` returns ``[d1, ..., d_order]``
        along ``tangent = [U_1, c_1, ...]`` by Taylor mode over the cache:
        ``z_j = a_j W^T + j a_{j-1} U^T`` (``+ c`` for j = 1; ``a_0`` the cached
        input, ``a_j`` the input's coefficients), then Faa di Bruno,
        ``h1 = s1 z1``, ``h2 = s2 z1^2 + s1 z2``,
        ``h3 = s3 z1^3 + 3 s2 z1 z2 + s1 z3``. Entries of ``tangent`` may be
        ``None`` (zero): coefficients that are zero are never formed, so a
        direction whose first nonzero tensor is in layer k starts at layer k
        (one matmul there) and costs ``order`` matmuls per layer above it.
        """
        self._check(params, x)
        out, cache = self._taylor_forward(params, x, 3)

        def jet_fn(tangent: Sequence[Any], order: int) -> list[Array]:
            check_jet_order(order)
            check_jet_tangent(tangent, params)
            return self._push(params, cache, tangent, order)

        return out, jet_fn

    def _taylor_forward(self, params: Sequence[Array], x: Array, order: int) -> tuple[Array, list]:
        """``(f, [(a_k, [act, act', ..., act^(order)] at z_k) per layer])``; derivatives that vanish are ``None``."""
        cache = []
        a = x
        for k in range(self.n_layers):
            s = self._act(k, self.affine(a, params[2 * k], params[2 * k + 1]), order)
            if self.activation in _PIECEWISE_LINEAR or k == self.n_layers - 1:
                s = s[:2] + [None] * (order - 1)
            cache.append((a, s))
            a = s[0]
        return a, cache

    def _push(self, params: Sequence[Array], cache: list, tangent: Sequence[Any], order: int) -> list[Array]:
        """``[d1, ..., d_order]`` of the output along ``tangent`` (``None`` entries zero) over a forward cache."""
        n = self.n_layers
        start = next((k for k in range(n) if tangent[2 * k] is not None or tangent[2 * k + 1] is not None), n)
        a: list[Array | None] = [None] * order  # the input's Taylor coefficients, zero below the first used layer
        for k in range(start, n):
            inp, s = cache[k]
            z = _layer_coefficients(params[2 * k], tangent[2 * k], tangent[2 * k + 1], inp, a)
            a = []  # free the lower layer's coefficients before the activation's (peak memory)
            a = z if k == n - 1 else _faa_di_bruno(s, z)
            del z
        out = cache[-1][1][0]
        xp = array_namespace(out)
        return [d if d is not None and d.shape == out.shape else _add(d, xp.zeros_like(out)) for d in a]


def _layer_coefficients(W: Array, U: Array | None, c: Array | None, inp: Array,
                        a: list[Array | None]) -> list[Array | None]:
    """``z_j = a_j W^T + j a_{j-1} U^T`` (``+ c`` for j = 1; ``a_0 = inp``), j = 1..len(a); ``None`` = zero."""
    xp = array_namespace(W)
    Wt = xp.matrix_transpose(W)
    z = [None if aj is None else aj @ Wt for aj in a]
    if U is not None:
        Ut = xp.matrix_transpose(U)
        for j, lower in enumerate([inp] + a[:-1]):
            if lower is not None:
                z[j] = _add(z[j], (j + 1) * (lower @ Ut) if j else lower @ Ut)
    if c is not None:
        z[0] = _add(z[0], c)
    return z


def _add(a: Array | None, b: Array) -> Array:
    """``a + b`` with ``None`` as zero."""
    return b if a is None else a + b


def _sum(*terms: Array | None) -> Array | None:
    """The sum of the terms that are not ``None`` (``None`` if all are)."""
    out = None
    for t in terms:
        if t is not None:
            out = _add(out, t)
    return out


def _prod(*factors: Array | None) -> Array | None:
    """The product of the factors (``None``, i.e. zero, if any is)."""
    if any(f is None for f in factors):
        return None
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def _faa_di_bruno(s: list[Array], z: list[Array | None]) -> list[Array | None]:
    """Taylor coefficients (derivatives) 1..len(z) of ``act(z(t))``; ``s`` = ``act^(j)(z0)``, ``None`` = zero."""
    h = [_prod(s[1], z[0])]
    if len(z) > 1:
        h.append(_sum(_prod(s[2], z[0], z[0]), _prod(s[1], z[1])))
    if len(z) > 2:
        h.append(_sum(_prod(s[3], z[0], z[0], z[0]), _prod(3, s[2], z[0], z[1]), _prod(s[1], z[2])))
    return h

