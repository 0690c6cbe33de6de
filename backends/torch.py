"""PyTorch adapter: any ``nn.Module`` of ``nn.Linear`` layers speaks the curvcore protocol.

>>> import torch, curvcore as cc
>>> from curvcore.backends import torch as ct
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
>>> model = ct.TorchModel(net)
>>> params = model.params()                       # [W1, b1, W2, b2], plain tensors
>>> opt = ct.Optimizer(net, cc.SGD(lr=0.1), loss="ce")  # or any registered method
>>> info = opt.step(torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1]))

``TorchModel`` evaluates the module with :func:`torch.func.functional_call`, so
the params are plain tensors passed in (the module's own parameters are never
read or changed by the primitives). ``jvp`` is true forward mode
(:func:`torch.func.jvp`), ``vjp`` is :func:`torch.func.vjp`, ``jet`` nests
``torch.func.jvp``, and ``layers`` records every ``nn.Linear`` with forward
hooks in one forward pass (see :meth:`TorchModel.layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from curvcore._checks import check_params_and_x, check_same_structure, namespace
from curvcore.losses import get as get_loss
from curvcore.protocol import Cotangent, LayerRecord, checked_pullback, linearize_by_composition, resolve_cotangent

from ._activations import LEAKY_SLOPE, check_activation

Array = Any

__all__ = ["Optimizer", "TorchModel", "build_mlp", "from_numpy", "synchronize", "to_numpy"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
# a non-constant cotangent pattern: the elementwise check of the layers between Linears
_PATTERN_PERIOD = 5


class TorchModel:
    """Wrap an ``nn.Module`` as a curvcore model.

    The params are the module's trainable parameters in ``named_parameters``
    order, as plain tensors: for ``nn.Sequential(nn.Linear, act, nn.Linear)``
    that is ``[W1, b1, W2, b2]`` in the PyTorch layout ``W: (n_out, n_in)``.
    ``forward``, ``jvp``, ``vjp`` and ``jet`` work for any module (buffers and
    frozen parameters are taken from the module); ``layers`` needs every
    trainable layer to be an ``nn.Linear`` with a bias, called once per
    forward pass in registration order, with elementwise operations
    (activations) between consecutive Linears.

    Put the module in ``eval()`` mode if it has dropout: the primitives call it
    several times and assume it is deterministic.

    Args:
        module: the network.
        validate: check batches (library, dtype, device, NaN/Inf) and, in
            ``layers``, that the operations between Linears are elementwise.
            Set it to False in benchmarks; the checks force a device sync.
    """

    xp = xp_torch

    def __init__(self, module: nn.Module, validate: bool = True):
        if not isinstance(module, nn.Module):
            raise TypeError(f"TorchModel wraps a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.validate = validate
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the module has no trainable parameters")

    def __repr__(self) -> str:
        return f"TorchModel({self.module!r})"

    # -- parameters ----------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The module's trainable parameters, in the order of the params list."""
        named = dict(self.module.named_parameters())
        return [named[n] for n in self.names]

    def params(self) -> list[Array]:
        """A copy of the module's current parameters as plain tensors ``[W1, b1, ...]``."""
        return [p.detach().clone() for p in self.parameters()]

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the params list."""
        return [tuple(p.shape) for p in self.parameters()]

    def _call(self, params: Sequence[Array], x: Array) -> Array:
        return functional_call(self.module, dict(zip(self.names, params)), (x,))

    def _check(self, params: Sequence[Array], x: Array) -> None:
        expected = self.param_shapes()
        if len(params) != len(expected):
            raise ValueError(
                f"params must hold the module's {len(expected)} trainable tensors ({', '.join(self.names)}), "
                f"got {len(params)}"
            )
        namespace(*params, x, what="params and data")
        for i, (p, s) in enumerate(zip(params, expected)):
            if tuple(p.shape) != s:
                raise ValueError(f"Shape mismatch in params[{i}] ({self.names[i]}): expected {s}, got {tuple(p.shape)}.")
            if p.dtype != params[0].dtype or p.device != params[0].device:
                raise TypeError(
                    f"params[{i}] is {p.dtype} on {p.device} but params[0] is {params[0].dtype} on {params[0].device}"
                )
        if x.device != params[0].device:
            raise ValueError(
                f"device mismatch: params are on {params[0].device} but x is on {x.device}; "
                f"move the data with x.to({str(params[0].device)!r})"
            )
        check_params_and_x(params, x, self.validate)

    # -- primitives ------------------------------------------------------------
    def forward(self, params: Sequence[Array], x: Array) -> Array:
        """The output ``f(params, x)``."""
        self._check(params, x)
        return self._call(params, x)

    def jvp(self, params: Sequence[Array], x: Array, tangent: Sequence[Array]) -> tuple[Array, Array]:
        """``(f, J tangent)`` by :func:`torch.func.jvp` (forward mode)."""
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        return torch.func.jvp(lambda p: self._call(p, x), (list(params),), (list(tangent),))

    def vjp(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Array], list[Array]]]:
        """``(f, pullback)`` by :func:`torch.func.vjp`; ``pullback(u) = J^T u`` as a list."""
        self._check(params, x)
        out, pull = torch.func.vjp(lambda p: self._call(p, x), list(params))
        return out, checked_pullback(out, pull)

    def jet(self, params: Sequence[Array], x: Array, tangent: Sequence[Array], order: int) -> list[Array]:
        """``[f, d1, ..., d_order]``, ``d_k = d^k/dt^k f(params + t tangent)`` at 0 (order <= 3).

        Nested :func:`torch.func.jvp` along the same tangent; order ``k`` costs
        about ``2^k`` forward passes.
        """
        if order not in (1, 2, 3):
            raise ValueError(f"jet order must be 1, 2 or 3, got {order!r}")
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        return _nested_jet(lambda p: self._call(p, x), list(params), list(tangent), order)

    def layers(self, params: Sequence[Array], x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """One :class:`LayerRecord` per ``nn.Linear``, in one forward pass.

        Forward hooks record each Linear's input ``a`` and output ``z`` and
        restart the autograd graph at ``z`` (a fresh leaf), so the graph falls
        into independent elementwise segments ``z_k -> a_{k+1}``. One
        backward sweep over those segments (elementwise ops only) gives
        ``dact = act'(z)``; ``g = dL/dz`` then follows layer by layer,
        ``g_k = (g_{k+1} W_{k+1}) * dact_k``: the cost of one backward pass.

        Raises:
            TypeError: the module has trainable layers other than ``nn.Linear``
                (e.g. ``Conv2d``), a Linear without bias, Linears called in
                another order than registered, or non-elementwise operations
                between Linears.
        """
        self._check(params, x)
        slots, a, z, dacts, out = self._records(params, x)
        u = resolve_cotangent(out_cotangent, out)
        if tuple(u.shape) != tuple(out.shape):
            raise ValueError(f"Shape mismatch in the output cotangent: expected {tuple(out.shape)}, got {tuple(u.shape)}.")
        n = len(slots)
        hs = a[1:] + [out]
        records: list[LayerRecord] = [None] * n  # type: ignore[list-item]
        for k in reversed(range(n)):
            g = u * dacts[k]
            records[k] = LayerRecord(a=a[k], z=z[k], dact=dacts[k], g=g, h=hs[k])
            if k:
                u = torch.matmul(g, params[slots[k][1]])
        return records

    def linearize(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable, Callable]:
        """``(f, jvp_fn, pullback)`` from one forward pass (the optional protocol primitive).

        For a chain of ``nn.Linear`` layers with elementwise operations between
        them (what :meth:`layers` accepts) one hooked forward records each
        layer's input ``a_k`` and ``act'(z_k)``; then ``jvp_fn(t)`` propagates
        the tangent only, ``zdot_k = adot_k W_k^T + a_k U_k^T + c_k``,
        ``adot_{k+1} = act'(z_k) zdot_k``, and ``pullback(u)`` is one backward
        sweep by hand (``g_k = u_k act'(z_k)``, ``[g_k^T a_k, sum g_k]``,
        ``u_{k-1} = g_k W_k``). This is measured 2-4x faster than separate
        ``torch.func`` calls (:func:`torch.func.linearize` re-traces the
        function every call and is far slower in eager mode). Any other
        module falls back to ``vjp`` plus one ``jvp`` per tangent. As in
        :meth:`layers`, ``validate=False`` skips the check that the operations
        between Linears are elementwise (shape-preserving mixing such as
        softmax would then give a wrong ``J``).
        """
        self._check(params, x)
        try:  # TypeError: not a chain of nn.Linear layers (see layers())
            slots, a, _, dacts, out = self._records(params, x)
        except TypeError:
            return linearize_by_composition(self, params, x)
        Ws = [params[w] for _, w, _ in slots]

        def jvp_fn(tangent: Sequence[Array]) -> Array:
            check_same_structure("tangent", tangent, params)
            adot = None
            for k, (_, w, b) in enumerate(slots):
                zdot = torch.matmul(a[k], tangent[w].mT) + tangent[b]
                if adot is not None:
                    zdot = zdot + torch.matmul(adot, Ws[k].mT)
                adot = dacts[k] * zdot
            return adot

        def pullback(u: Array) -> list[Array]:
            if tuple(u.shape) != tuple(out.shape):
                raise ValueError(f"Shape mismatch in the cotangent: expected {tuple(out.shape)}, got {tuple(u.shape)}.")
            grads: list[Array] = [None] * len(params)  # type: ignore[list-item]
            for k in reversed(range(len(slots))):
                _, w, b = slots[k]
                g = u * dacts[k]
                grads[w], grads[b] = torch.matmul(g.mT, a[k]), torch.sum(g, dim=0)
                if k:
                    u = torch.matmul(g, Ws[k])
            return grads

        return out, jvp_fn, pullback

    def _records(self, params: Sequence[Array], x: Array, slots: list | None = None) -> tuple:
        """One hooked forward: ``(slots, a_k, z_k, act'(z_k), out)``, all detached (see :meth:`layers`)."""
        slots = self._linear_slots() if slots is None else slots
        seen: list[tuple[nn.Module, Array, Array]] = []

        def pre_hook(mod: nn.Module, inputs: tuple) -> tuple:
            seen.append((mod, inputs[0], None))
            return (inputs[0].detach(),) + tuple(inputs[1:])

        def hook(mod: nn.Module, inputs: tuple, output: Array) -> Array:
            z = output.detach().requires_grad_(True)
            seen[-1] = (mod, seen[-1][1], z)
            return z

        handles = []
        try:
            for mod, _, _ in slots:
                handles.append(mod.register_forward_pre_hook(pre_hook))
                handles.append(mod.register_forward_hook(hook))
            with torch.enable_grad():
                out = self._call([p.detach() for p in params], x)
                dacts = self._elementwise_derivatives(slots, seen, out)
        finally:
            for h in handles:
                h.remove()
        n = len(slots)
        a = [seen[k][1].detach() for k in range(n)]
        z = [seen[k][2].detach() for k in range(n)]
        return slots, a, z, dacts, out.detach()

    # -- layers() helpers --------------------------------------------------------
    def _linear_slots(self) -> list[tuple[nn.Module, int, int]]:
        """``(linear, index of W, index of b)`` per Linear; TypeError for anything else."""
        index = {n: i for i, n in enumerate(self.names)}
        slots = []
        for name, mod in self.module.named_modules():
            own = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            label = f"layer {name!r}" if name else "the module itself"
            if not isinstance(mod, nn.Linear):
                raise TypeError(
                    f"layers() supports trainable nn.Linear layers only, but {label} is a {type(mod).__name__}; "
                    "use a method that needs only forward/jvp/vjp (not a layer-wise one), or rebuild the "
                    "network from nn.Linear layers and elementwise activations"
                )
            if sorted(own) != ["bias", "weight"]:
                raise TypeError(
                    f"layers() needs every nn.Linear to train both weight and bias; {label} trains {own} "
                    "(use nn.Linear(..., bias=True) and leave both trainable)"
                )
            prefix = f"{name}." if name else ""
            slots.append((mod, index[prefix + "weight"], index[prefix + "bias"]))
        expected = [i for _, w, b in slots for i in (w, b)]
        if expected != list(range(len(self.names))):
            raise TypeError(f"layers() needs the params in [W1, b1, W2, b2, ...] order; got {self.names}")
        return slots

    def _elementwise_derivatives(self, slots: list, seen: list, out: Array) -> list[Array]:
        """``act'(z_k)`` per layer from the independent segments ``z_k -> a_{k+1}`` (and ``z_L -> out``)."""
        n = len(slots)
        order = [s[0] for s in seen]
        if len(seen) != n or any(m is not s[0] for m, s in zip(order, slots)):
            names = {id(m): type(m).__name__ for m, _, _ in slots}
            raise TypeError(
                f"layers() needs each of the {n} Linear layers called once per forward pass in registration "
                f"order; the forward pass called {len(seen)} ({[names.get(id(m), '?') for m in order]})"
            )
        leaves = [z for _, _, z in seen]
        dacts = []
        for k in range(n):
            nxt = seen[k + 1][1] if k + 1 < n else out
            what = f"between Linear {k} and Linear {k + 1}" if k + 1 < n else "after the last Linear"
            if tuple(nxt.shape) != tuple(leaves[k].shape) or not nxt.requires_grad:
                raise TypeError(
                    f"layers() needs elementwise operations {what}, but they map shape "
                    f"{tuple(leaves[k].shape)} to {tuple(nxt.shape)}"
                )
            # retain_graph: a bad module (skip connection) may reach an earlier segment again
            grads = torch.autograd.grad(nxt, leaves[: k + 1], torch.ones_like(nxt), allow_unused=True,
                                        retain_graph=True)
            if grads[k] is None or any(gr is not None for gr in grads[:k]):
                raise TypeError(f"layers() needs a chain of Linear layers; {what} the input of a later layer "
                                "depends on more than the previous Linear's output (skip connection?)")
            if self.validate:
                r = _pattern_like(nxt)
                (gr,) = torch.autograd.grad(nxt, leaves[k], r, retain_graph=True)
                if not torch.allclose(gr, grads[k] * r, rtol=1e-6, atol=1e-12 * float(grads[k].abs().max()) + 1e-30):
                    raise TypeError(f"layers() needs elementwise operations {what}; they mix entries "
                                    "(softmax, normalisation?)")
            dacts.append(grads[k])
        return dacts


def _pattern_like(a: Array) -> Array:
    """A deterministic, non-constant array (1 .. 2) of the shape of ``a``."""
    i = torch.arange(a.numel(), device=a.device, dtype=a.dtype).reshape(a.shape)
    return 1 + torch.remainder(i * 7, _PATTERN_PERIOD) / (_PATTERN_PERIOD - 1)


def _nested_jet(fn: Callable[[list], Array], p: list, u: list, order: int) -> list[Array]:
    """``[f, d1, ..., d_order]`` along ``u`` by nested ``torch.func.jvp``."""
    if order == 0:
        return [fn(p)]
    primals, tangents = torch.func.jvp(lambda q: _nested_jet(fn, q, u, order - 1), (p,), (u,))
    return list(primals) + [tangents[-1]]


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[TorchModel, list[Array]]:
    """``nn.Sequential(Linear, act, ..., Linear)`` holding ``params_np``, wrapped.

    Args:
        sizes: widths, input first.
        activation: hidden activation (tanh, sigmoid, relu, leaky_relu with
            slope 0.01, softplus, identity); the output layer is linear.
        params_np: ``[W1, b1, ...]`` NumPy arrays; their dtype is the model's.
        device: e.g. ``"cuda"``; ``None`` = CPU.

    Returns:
        ``(TorchModel(module), params)`` with ``params`` plain tensors (copies).
    """
    check_activation(activation)
    dtype = torch.from_numpy(np.zeros(1, dtype=params_np[0].dtype)).dtype
    layers: list[nn.Module] = []
    n = len(sizes) - 1
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out, dtype=dtype, device=device))
        if k < n - 1:
            layers.append(_ACTIVATIONS[activation]())
    module = nn.Sequential(*layers)
    model = TorchModel(module)
    with torch.no_grad():
        for p, value in zip(model.parameters(), params_np):
            p.copy_(from_numpy(np.asarray(value), device=p.device))
    return model, model.params()


def from_numpy(a: np.ndarray, device: Any = None) -> Array:
    """A tensor copy of a NumPy array (dtype kept), on ``device``."""
    t = torch.from_numpy(np.array(a, copy=True))
    return t.to(device) if device is not None else t


def to_numpy(a: Array) -> np.ndarray:
    """A NumPy copy of a tensor (detached, on the host)."""
    return a.detach().cpu().numpy().copy()


def synchronize(tree: Any = None) -> Any:
    """Wait for the queued CUDA work (of the devices of ``tree``'s tensors, else the current one).

    A no-op without CUDA. Returns ``tree``, like ``jax.block_until_ready``.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        leaves = tree if isinstance(tree, (list, tuple)) else [tree]
        devices = {t.device for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda}
        for dev in devices or [None]:
            torch.cuda.synchronize(dev)
    return tree


# ---------------------------------------------------------------------------
# torch.optim-style wrapper
# ---------------------------------------------------------------------------


class Optimizer:
    """Drive a module with a curvcore method, like a ``torch.optim`` optimizer.

    ``step(x, y)`` runs one method step on the module's current parameters and
    writes the new values back in place (under ``torch.no_grad``); the method
    state lives in the wrapper. No ``backward()`` is needed: the method
    computes its own derivatives.

    >>> opt = Optimizer(net, cc.SGD(lr=0.1), loss="ce")
    >>> for x, y in loader:
    ...     info = opt.step(x, y)          # info["loss"]: the loss before the step

    Methods with ``needs_refresh(state)`` (ACP takes ``cov_batch=`` at refresh
    steps) get ``cov_batch`` when a refresh is due: pass it to ``step`` or give
    ``cov_source``, a callable returning a batch of inputs, called only then.

    Args:
        module: the network (its trainable parameters are updated in place).
        method: a curvcore method instance (``cc.SGD(...)``, ``cc.CurveBall(...)``).
        loss: ``"ce"``, ``"mse"`` or a :mod:`curvcore.losses` instance (or
            give it to each ``step``).
        cov_source: optional ``() -> inputs`` for methods with ``needs_refresh``.
    """

    def __init__(self, module: nn.Module, method: Any, loss: Any = None,
                 cov_source: Callable[[], Array] | None = None):
        self.module = module
        self.model = TorchModel(module)
        self.method = method
        self.loss = None if loss is None else get_loss(loss)
        self.cov_source = cov_source
        self.state = method.init(self.model.params())
        self.info: dict[str, Array] = {}

    def __repr__(self) -> str:
        return f"Optimizer({self.method!r}, loss={self.loss!r})"

    def step(self, x: Array, y: Array, loss: Any = None, cov_batch: Array | None = None, **kwargs: Any) -> dict:
        """One method step; updates the module in place and returns ``info`` (0-d tensors).

        Args:
            x: input batch.
            y: targets (integer labels for ``ce``).
            loss: overrides the loss given to the constructor.
            cov_batch: inputs for a method's refresh step (used only when
                ``method.needs_refresh(state)``); else ``cov_source()`` is used.
            **kwargs: passed on to ``method.step``.
        """
        loss = self.loss if loss is None else get_loss(loss)
        if loss is None:
            raise ValueError("no loss: pass loss='ce'/'mse' (or a curvcore loss) to Optimizer(...) or step(...)")
        needs_refresh = getattr(self.method, "needs_refresh", None)
        if needs_refresh is not None and needs_refresh(self.state):
            if cov_batch is None and self.cov_source is not None:
                cov_batch = self.cov_source()
            if cov_batch is not None:
                kwargs["cov_batch"] = cov_batch
        new, self.state, self.info = self.method.step(self.model, loss, self.model.params(), self.state, x, y,
                                                      **kwargs)
        with torch.no_grad():
            for p, value in zip(self.model.parameters(), new):
                p.copy_(value)
        return self.info

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the module's ``.grad`` fields (the methods do not use them)."""
        self.module.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The method state as nested dicts/lists of tensor copies (``torch.save``-able)."""
        return {"method": type(self.method).__name__, "state": _to_plain(self.state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (exactly; shapes and dtypes are checked)."""
        name = state_dict.get("method")
        if name != type(self.method).__name__:
            raise ValueError(f"state_dict is for {name!r}, but this optimizer runs {type(self.method).__name__!r}")
        self.state = _from_plain(state_dict["state"], self.state, "state")


def _to_plain(tree: Any) -> Any:
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {k: _to_plain(v) for k, v in zip(tree._fields, tree)}
    if isinstance(tree, dict):
        return {k: _to_plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_to_plain(v) for v in tree]
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


def _from_plain(plain: Any, template: Any, path: str) -> Any:
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        if not isinstance(plain, dict) or set(plain) != set(template._fields):
            raise ValueError(f"{path}: expected fields {list(template._fields)}, got {plain!r:.80}")
        return type(template)(**{k: _from_plain(plain[k], v, f"{path}.{k}") for k, v in zip(template._fields, template)})
    if isinstance(template, dict):
        if not isinstance(plain, dict) or set(plain) != set(template):
            raise ValueError(f"{path}: expected keys {sorted(template)}")
        return {k: _from_plain(plain[k], v, f"{path}[{k!r}]") for k, v in template.items()}
    if isinstance(template, (list, tuple)):
        if not isinstance(plain, (list, tuple)) or len(plain) != len(template):
            raise ValueError(f"{path}: expected {len(template)} entries")
        return type(template)(_from_plain(p, t, f"{path}[{i}]") for i, (p, t) in enumerate(zip(plain, template)))
    if isinstance(template, torch.Tensor):
        if not isinstance(plain, torch.Tensor) or plain.shape != template.shape or plain.dtype != template.dtype:
            got = f"{tuple(plain.shape)} {plain.dtype}" if isinstance(plain, torch.Tensor) else type(plain).__name__
            raise ValueError(f"{path}: expected a {tuple(template.shape)} {template.dtype} tensor, got {got}")
        return plain.detach().clone().to(template.device)
    return plain
