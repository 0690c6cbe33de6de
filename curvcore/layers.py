"""Layer structure: which parameter tensors form which dense or convolution layer, and what each layer saw.

Layer-wise methods (K-FAC, ACP, CenteredSGD, ESN, MK) precondition whole
layers. A model tells them its layers with the optional primitive
``layer_specs(params) -> [LayerSpec]`` and records them in a pass with
``records(params, x, cotangent, specs, chain) -> Records``. Models without
them (the array-API MLP, user models with only ``layers``) are read as a plain
MLP ``[W1, b1, W2, b2, ...]`` (:func:`mlp_specs`).

Every recorded layer is a linear map applied at ``S`` positions per example:
``z[i, p] = W_mat a[i, p] + b`` with ``W_mat`` the weight as a matrix
``(n_out, D)`` (:func:`weight_matrix`). A dense layer on ``(B, n_in)`` inputs
has ``S = 1`` and records ``a: (B, D)``, ``g: (B, n_out)``; a dense layer on
``(B, T, n_in)`` or a ``Conv2d`` (``a`` = the unfolded patches, ``D =
C_in kh kw``, ``S = H_out W_out``) records ``a: (B, S, D)``, ``g: (B, S, n_out)``
("weight-sharing format", as curvlinops and kfac-jax call it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from ._namespace import array_namespace

from .protocol import Array, Cotangent, LayerModel, LayerRecord, Model, RecordsModel, resolve_cotangent

__all__ = ["LayerSpec", "MLPGrads", "Records", "layer_specs", "mlp_records", "mlp_specs", "records", "rows", "weight_matrix",
           "matrix_to_weight", "bias_vector", "positions"]

KINDS = ("dense", "conv2d")


class LayerSpec(NamedTuple):
    """One dense or convolution layer of a model.

    Attributes:
        kind: ``"dense"`` or ``"conv2d"``.
        weight: index of the weight in the flat params list.
        bias: index of the bias, or ``None`` for a layer without one.
        weight_axes: the permutation of the weight's axes that puts it in
            ``(n_out, ...)`` order, the input axes in the order of the
            recorded ``a`` features (``(0, 1)`` for a torch ``Linear``,
            ``(1, 0)`` for a flax ``Dense`` kernel ``(in, out)``).
        name: a readable name for messages (``"features.0"``).
    """

    kind: str
    weight: int
    bias: int | None
    weight_axes: tuple[int, ...] = (0, 1)
    name: str = ""

    def describe(self) -> str:
        """``"dense layer 'fc1'"`` for messages."""
        return f"{self.kind} layer {self.name!r}" if self.name else f"{self.kind} layer (params[{self.weight}])"

    def tensors(self) -> list[int]:
        """The params indices this layer owns."""
        return [self.weight] + ([] if self.bias is None else [self.bias])


class Records(NamedTuple):
    """What one recorded forward and backward pass gives.

    Attributes:
        out: the model output.
        grads: ``J^T cotangent`` for every params entry (a flat list like params), summed over
            this process's batch only (in data-parallel training the method all-reduces the
            entries it uses).
        specs: the layers recorded (a subset of those asked for: a layer
            called more or less than once per pass is left out; with
            ``chain=True`` only the output chain, in call order).
        layers: one :class:`~curvcore.protocol.LayerRecord` per entry of ``specs``.
    """

    out: Array
    grads: list
    specs: list
    layers: list


def mlp_specs(params: Sequence[Array]) -> list[LayerSpec]:
    """The layers of params read as a plain MLP ``[W1, b1, W2, b2, ...]`` (``W_k: (n_out, n_in)``).

    Raises:
        ValueError: the params are not such a list (odd length, shapes that do
            not chain); the message says to pass the model to ``init``.
    """
    shapes = [tuple(p.shape) for p in params]
    hint = ("layer-wise methods read params without a model as a plain MLP [W1, b1, W2, b2, ...] with "
            "W_k of shape (n_out, n_in) and b_k of shape (n_out,); pass the model too: "
            "method.init(params, model) and method.step(model, ...)")
    if len(shapes) % 2:
        raise ValueError(f"{hint}; got {len(shapes)} arrays of shapes {shapes}")
    specs = []
    for k in range(len(shapes) // 2):
        W, b = shapes[2 * k], shapes[2 * k + 1]
        if len(W) != 2 or b != (W[0],) or (k and W[1] != shapes[2 * k - 2][0]):
            raise ValueError(f"{hint}; got shapes {shapes} (layer {k}: weight {W}, bias {b})")
        specs.append(LayerSpec("dense", 2 * k, 2 * k + 1, (0, 1), f"layer {k}"))
    return specs


def layer_specs(model: Model | None, params: Sequence[Array]) -> list[LayerSpec]:
    """``model.layer_specs(params)`` when the model has it, else :func:`mlp_specs` (``model`` may be None)."""
    own = getattr(model, "layer_specs", None)
    return list(own(params)) if own is not None else mlp_specs(params)


def records(model: LayerModel | RecordsModel, params: Sequence[Array], x: Array, cotangent: Cotangent,
            specs: Sequence[LayerSpec] | None = None, chain: bool = False) -> Records:
    """One recorded pass: ``model.records`` if the model has it, else its ``layers`` read as an MLP.

    Args:
        specs: the layers to record (default: all of :func:`layer_specs`).
        chain: also record ``z``, ``dact`` and ``h`` and keep only the
            output chain: the last dense layers, called one after the other
            with elementwise operations between them, the last one giving the
            model output (what ESN and MK need).
    """
    own = getattr(model, "records", None)
    if own is not None:
        return own(params, x, cotangent, specs, chain)
    return mlp_records(model.layers(params, x, cotangent), mlp_specs(params), specs)


def mlp_records(recs: Sequence[LayerRecord], all_specs: Sequence[LayerSpec],
                specs: Sequence[LayerSpec] | None = None) -> Records:
    """:class:`Records` from an MLP's layer records (one per layer, output last), keeping ``specs``
    (default all); the parameter gradient is :class:`MLPGrads` (formed where read)."""
    grads = MLPGrads(recs)
    if specs is None:
        return Records(recs[-1].h, grads, list(all_specs), list(recs))
    wanted = {s.weight for s in specs}
    kept = [(s, r) for s, r in zip(all_specs, recs) if s.weight in wanted]
    return Records(recs[-1].h, grads, [s for s, _ in kept], [r for _, r in kept])


class MLPGrads(Sequence):
    """``[g_1ᵀa_1, Σ_batch g_1, g_2ᵀa_2, ...]``, the parameter gradient of MLP layer records, each entry
    formed on first use: a layer-wise method never reads the plain gradient of a layer it preconditions
    from its own factors (ESN, MK), and skipping it saves one ``(B, n_out) x (B, n_in)`` product per layer.
    """

    def __init__(self, recs: Sequence[LayerRecord]):
        self._recs: list = list(recs)
        self._done: dict[int, Array] = {}

    def __len__(self) -> int:
        return 2 * len(self._recs)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"params index {i} out of range for {len(self)} tensors")
        if i not in self._done:
            r = self._recs[i // 2]
            xp = array_namespace(r.g)
            self._done[i] = xp.matmul(xp.matrix_transpose(r.g), r.a) if i % 2 == 0 else xp.sum(r.g, axis=0)
        return self._done[i]


def rows(a: Array) -> Array:
    """A record's ``a`` or ``g`` as rows ``(B*S, D)`` (a 2-d array is returned as it is)."""
    if a.ndim == 2:
        return a
    return array_namespace(a).reshape(a, (-1, a.shape[-1]))


def positions(a: Array) -> int:
    """``S``, the positions per example of a record array (1 for ``(B, D)``)."""
    return 1 if a.ndim == 2 else math.prod(int(d) for d in a.shape[1:-1])


def weight_matrix(W: Array, spec: LayerSpec) -> Array:
    """The weight as the ``(n_out, D)`` matrix of ``z = W_mat a + b``."""
    xp = array_namespace(W)
    if tuple(spec.weight_axes) != tuple(range(W.ndim)):
        W = xp.permute_dims(W, tuple(spec.weight_axes))
    return W if W.ndim == 2 else xp.reshape(W, (W.shape[0], -1))


def matrix_to_weight(M: Array, spec: LayerSpec, shape: Sequence[int]) -> Array:
    """The inverse of :func:`weight_matrix`: an ``(n_out, D)`` matrix in the weight's own shape and layout."""
    xp = array_namespace(M)
    axes = tuple(spec.weight_axes)
    permuted = tuple(int(shape[a]) for a in axes)
    M = xp.reshape(M, permuted)
    if axes != tuple(range(len(axes))):
        M = xp.permute_dims(M, tuple(axes.index(i) for i in range(len(axes))))
    return M


def bias_vector(b: Array) -> Array:
    """A bias of any shape with ``n_out`` entries (``(n_out,)``, equinox's ``(n_out, 1, 1)``) as ``(n_out,)``."""
    return b if b.ndim == 1 else array_namespace(b).reshape(b, (-1,))


def check_cotangent_shape(u: Array, out: Array) -> None:
    """``ValueError`` unless the output cotangent has the output's shape."""
    if tuple(u.shape) != tuple(out.shape):
        raise ValueError(f"Shape mismatch in the output cotangent: expected {tuple(out.shape)}, got {tuple(u.shape)}.")


def output_cotangent(cotangent: Cotangent, out: Array) -> Array:
    """The cotangent for ``out`` (calling it if it is a function), shape-checked."""
    u = resolve_cotangent(cotangent, out)
    check_cotangent_shape(u, out)
    return u
