"""PyTorch adapter: any ``nn.Module`` taking one tensor and returning one tensor speaks the curvcore protocol.

>>> import torch, curvcore as cc
>>> from torch import nn
>>> from curvcore.backends import torch as ct
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).double()
>>> opt = ct.Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss())   # a torch.optim.Optimizer
>>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
>>> info = opt.step(torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.arange(8) % 10)

:class:`TorchModel` evaluates the module with :func:`torch.func.functional_call`
on a private, per-thread copy of the module's structure (its parameters and
buffers are meta tensors), with the params and buffers passed in: the
user's module is never changed by a method step, and two threads stepping
two models don't interfere. ``vjp`` is reverse mode (``torch.autograd``),
``jvp`` forward mode (:func:`torch.func.jvp`), ``jet`` nests ``torch.func.jvp``;
``records`` gives the inputs and output gradients of every ``nn.Linear`` and
``nn.Conv2d`` (the layer-wise methods' needs) from one forward and one
backward pass, through a thread-local ``TorchFunctionMode``. A plain MLP
(``nn.Sequential`` of ``nn.Linear`` and one elementwise activation) gets
hand-written tangent, backward and Taylor sweeps over one cached forward.

**BatchNorm** in train mode: every pass of a step uses that batch's
statistics; the step leaves the module's buffers alone and returns the
updated ones in ``info["buffers"]`` (from the step's first pass at the
current params), which :class:`Optimizer` writes back, so the running
statistics after a step equal those after one ``module(x)`` in train mode.
**Dropout** in train mode: masks come from a ``torch.Generator`` owned by the
model (seeded from ``seed``, by default ``torch.initial_seed()`` when the
model is built) and are replayed for every pass of a step (forward, JVPs,
VJPs, jets), so the curvature is that of the sampled loss; the masks advance
once per step. ``torch.compile``-d modules are not supported.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from torch import nn

from curvcore import tree as cc_tree
from curvcore._checks import (
    check_params_and_x, check_same_structure, in_step, register_all_finite, register_device_attribute, value_checks_on,
)
from curvcore._linalg import register_cho_solve
from curvcore.losses import register_cross_entropy
from curvcore.tree_algebra import FusedTreeOps, register_fused
from curvcore.layers import LayerSpec, Records, check_cotangent_shape, mlp_records, output_cotangent
from curvcore.protocol import Cotangent, LayerRecord, jets_by_jet, linearize_by_composition

from . import _torch_pass as tp
from ._activations import LEAKY_SLOPE, check_activation
from ._mlp import ArrayAPIMLP

Array = Any

__all__ = ["Optimizer", "TorchModel", "build_mlp", "from_numpy", "from_torch_loss", "namespace", "probe", "synchronize",
           "to_numpy"]

cc_tree.register_detach(lambda a: isinstance(a, torch.Tensor) and a.requires_grad, lambda a: a.detach())
register_cho_solve(lambda a: isinstance(a, torch.Tensor), lambda A, B: torch.cholesky_solve(B, torch.linalg.cholesky(A)),
                   lambda A: torch.cholesky_inverse(torch.linalg.cholesky(A)))


_ONE_READ_FROM = 1 << 16  # from this many elements, one min/max read per tensor beats abs (a copy) then max


def _all_finite(tensors: Sequence[Array]) -> Array | None:
    """One fused check for a list of tensors: their extreme values (NaN and Inf propagate, no overflow).

    ``None`` when no tensor is floating (or all are empty).
    """
    floats = [t for t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel()]
    if not floats:
        return None
    if sum(t.numel() for t in floats) < _ONE_READ_FROM:  # small lists: two launches for the whole list
        return torch.isfinite(torch.stack(torch._foreach_max(torch._foreach_abs(floats)))).all()
    real = [torch.view_as_real(t) if t.is_complex() else t for t in floats]
    return torch.isfinite(torch.stack([torch.stack(torch.aminmax(t)) for t in real])).all()


register_all_finite(torch.Tensor, _all_finite)


def _cross_entropy(f: torch.Tensor, y: torch.Tensor, ignore_index: int | None, mean: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """curvcore's ``CrossEntropy`` (classes last) from one ``log_softmax``; NaN when a label is out of range."""
    C = f.shape[-1]
    inside = y.clamp(0, C - 1)
    keep = None if ignore_index is None else y.ne(ignore_index)
    wrong = inside.ne(y) if keep is None else inside.ne(y) & keep
    weight = None if keep is None else keep.to(f.dtype)
    if not mean:
        scale = f.new_ones(())
    elif weight is None:
        scale = f.new_full((), 1.0 / y.numel())
    else:
        scale = weight.sum().reciprocal()
    scale = scale.masked_fill_(wrong.any(), math.nan)
    logp = torch.log_softmax(f, dim=-1)
    labels = inside.to(torch.int64).unsqueeze(-1)
    picked = logp.gather(-1, labels).squeeze(-1)
    grad = logp.exp().scatter_add_(-1, labels, f.new_full(labels.shape, -1.0))
    if weight is not None:
        picked, grad = picked * weight, grad.mul_(weight.unsqueeze(-1))
    return picked.sum().neg_() * scale, grad.mul_(scale)


register_cross_entropy(torch.Tensor, _cross_entropy)


def _listed(op: Callable) -> Callable:
    """A ``torch._foreach_*`` op returning a list (they return tuples)."""
    return lambda *args, **kwargs: list(op(*args, **kwargs))


register_fused(torch.Tensor, FusedTreeOps(
    add=_listed(torch._foreach_add), sub=_listed(torch._foreach_sub), div=_listed(torch._foreach_div),
    scale=_listed(torch._foreach_mul), shift=_listed(torch._foreach_add), sqrt=_listed(torch._foreach_sqrt),
    lerp=_listed(torch._foreach_lerp),
    axpy=lambda alpha, x, y: list(torch._foreach_add(y, x, alpha=alpha)),
    addcmul=lambda a, b, c, w: list(torch._foreach_addcmul(a, b, c, value=w)),
    norm=lambda a: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(a))),
))
register_device_attribute(torch.Tensor)

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def _activation_name(mod: nn.Module) -> str | None:
    """The curvcore activation name of an activation module, or None."""
    if isinstance(mod, nn.LeakyReLU):
        return "leaky_relu" if mod.negative_slope == LEAKY_SLOPE else None
    if isinstance(mod, nn.Softplus):
        return "softplus" if mod.beta == 1 else None
    for name, cls in (("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid), ("relu", nn.ReLU), ("identity", nn.Identity)):
        if type(mod) is cls:
            return name
    return None


class _Scope:
    """One method step: the dropout seed of its passes and the buffers of its first pass."""

    def __init__(self, seed: int):
        self.seed = seed
        self.buffers: dict[str, Array] | None = None


class TorchModel:
    """Wrap an ``nn.Module`` as a curvcore model.

    The params are the module's trainable parameters in ``named_parameters``
    order, as plain tensors (``[W1, b1, W2, b2]`` for an MLP, in the PyTorch
    layout ``W: (n_out, n_in)``). Frozen parameters and buffers are read from
    the module at each pass and never written.

    Args:
        module: the network; its ``forward`` takes one tensor (the batch,
            samples on axis 0) and returns one tensor.
        validate: check inputs (library, dtype, device, NaN/Inf) when a
            primitive is called directly (inside a method step the step
            checks its inputs once), and that the operations between the
            Linear layers of ESN/MK's output chain are elementwise.
        seed: seed of the dropout masks (default ``torch.initial_seed()``).
        class_axis: move this output axis last for outputs with 3 or more
            dims (``1`` for ``nn.CrossEntropyLoss``'s ``(B, C, ...)`` layout;
            :class:`Optimizer` sets it).

    Raises:
        TypeError: not an ``nn.Module``, or its forward needs more than one input.
        ValueError: no trainable parameters.
    """

    xp = xp_torch

    def __init__(self, module: nn.Module, validate: bool = True, seed: int | None = None,
                 class_axis: int | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"TorchModel wraps a torch.nn.Module, got {type(module).__name__}")
        if type(module).__name__ == "OptimizedModule":
            raise TypeError("torch.compile-d modules are not supported: wrap the original module "
                            "(module._orig_mod)")
        _check_single_input(module)
        self.module = module
        self.validate = validate
        self.class_axis = class_axis
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self._parameters = [p for p in module.parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the module has no trainable parameters")
        self.seed = int(torch.initial_seed() if seed is None else seed) % (2**63)
        self._steps = 0
        self._local = threading.local()
        self._mlp: ArrayAPIMLP | None | bool = False  # False: not probed yet

    def __repr__(self) -> str:
        return f"TorchModel({self.module!r})"

    # -- parameters and buffers ----------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The module's trainable parameters, in the order of the params list (as when the model was built)."""
        return list(self._parameters)

    def params(self) -> list[Array]:
        """A copy of the module's current parameters as plain tensors ``[W1, b1, ...]``."""
        return [p.detach().clone() for p in self.parameters()]

    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the params list."""
        return [tuple(p.shape) for p in self.parameters()]

    def buffers(self) -> dict[str, Array]:
        """The module's buffers (running statistics), as they are now."""
        return {n: b for n, b in self.module.named_buffers()}

    # -- one pass ------------------------------------------------------------
    def _skeleton(self) -> nn.Module:
        """This thread's copy of the module with meta tensors (functional_call swaps values into it)."""
        skel = getattr(self._local, "skeleton", None)
        if skel is None:
            memo = {id(t): nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                    for t in self.module.parameters()}
            memo.update({id(b): torch.empty_like(b, device="meta") for b in self.module.buffers()})
            skel = self._local.skeleton = copy.deepcopy(self.module, memo)
        return skel

    def _scope(self) -> _Scope | None:
        return getattr(self._local, "scope", None)

    def _generator(self, device: Any) -> torch.Generator:
        scope = self._scope()
        seed = scope.seed if scope is not None else (self.seed + self._steps * 0x9E3779B97F4A7C15) % (2**63)
        return torch.Generator(device=device).manual_seed(seed)

    def _run(self, params: Sequence[Array], x: Array, layers: dict | None = None, capture: bool = True
             ) -> tuple[Array, tp.Pass]:
        """The module on ``x`` with ``params``: ``(output, the pass)`` (buffers cloned, never written back).

        Raises:
            ValueError: params that are not the module's (count, shapes); an
                exception of the module (e.g. a wrong feature count) re-raised
                naming the shape of ``x``, the original as ``__cause__``.
        """
        self._check_shapes(params)
        values = {n: b.clone() for n, b in self.module.named_buffers()}
        frozen = {n: p.detach() for n, p in self.module.named_parameters() if not p.requires_grad}
        values.update(frozen)
        values.update(zip(self.names, params))
        mode = tp.Pass(self._generator(x.device), layers)
        with mode:
            try:
                out = torch.func.functional_call(self._skeleton(), values, (x,))
            except NotImplementedError:
                raise
            except Exception as err:
                if _MISSING_FORWARD_RULE.search(str(err)):  # _forward_ad names the missing rule
                    raise
                raise ValueError(f"{type(self.module).__name__} failed on x of shape {tuple(x.shape)} ({x.dtype}); "
                                 f"check that x has the shape the module expects. {type(err).__name__}: {err}"
                                 ) from err
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"TorchModel needs a module that returns one tensor; {type(self.module).__name__} "
                            f"returned a {type(out).__name__}")
        if self.class_axis is not None and out.ndim >= 3:
            out = out.movedim(self.class_axis, -1)
        scope = self._scope()
        if capture and scope is not None and scope.buffers is None and any(True for _ in self.module.buffers()):
            scope.buffers = {n: values[n].detach() for n, _ in self.module.named_buffers()}
        return out, mode

    def _pure(self, params: Sequence[Array], x: Array) -> Array:
        """The module as a pure function for ``torch.func`` transforms (buffers cloned inside)."""
        return self._run(params, x, capture=False)[0]

    @contextmanager
    def step_scope(self) -> Iterator[_Scope]:
        """One method step: every pass replays the same dropout masks; the first pass's buffers are kept.

        The masks advance when the step succeeds (a step that raises changes nothing). Yields the
        scope (``scope.buffers``).
        """
        scope = _Scope((self.seed + self._steps * 0x9E3779B97F4A7C15) % (2**63))
        self._local.scope = scope
        try:
            yield scope
            self._steps += 1
        finally:
            self._local.scope = None

    def _check(self, params: Sequence[Array], x: Array) -> None:
        if in_step():
            return
        self._check_shapes(params)
        check_params_and_x(params, x, value_checks_on(self.validate))

    def _check_shapes(self, params: Sequence[Array]) -> None:
        """``ValueError`` unless ``params`` has the module's count and shapes of trainable tensors (read once)."""
        expected = getattr(self, "_shapes", None)
        if expected is None:
            expected = self._shapes = self.param_shapes()
        if len(params) != len(expected):
            raise ValueError(
                f"params must hold the module's {len(expected)} trainable tensors ({', '.join(self.names)}), "
                f"got {len(params)}"
            )
        for i, (p, s) in enumerate(zip(params, expected)):
            if tuple(p.shape) != s:
                raise ValueError(f"Shape mismatch in params[{i}] ({self.names[i]}): expected {s}, got {tuple(p.shape)}.")

    # -- primitives ------------------------------------------------------------
    def forward(self, params: Sequence[Array], x: Array) -> Array:
        """The output ``f(params, x)`` (no autograd graph)."""
        self._check(params, x)
        mlp = self._plain_mlp(x)
        if mlp is not None:
            return mlp.forward(cc_tree.detached(params), x)
        with torch.no_grad():
            return self._run(cc_tree.detached(params), x)[0]

    def jvp(self, params: Sequence[Array], x: Array, tangent: Sequence[Array]) -> tuple[Array, Array]:
        """``(f, J tangent)`` by :func:`torch.func.jvp` (forward mode)."""
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        p, t = [q.detach() for q in params], [q.detach() for q in tangent]
        return _forward_ad(lambda: torch.func.jvp(lambda q: self._pure(q, x), (p,), (t,)))

    def vjp(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Array], list[Array]]]:
        """``(f, pullback)`` by ``torch.autograd`` (one forward; each pullback one backward); ``J^T u`` a list.

        A plain MLP uses the hand-written sweep instead (no autograd graph, no module dispatch).
        """
        self._check(params, x)
        mlp = self._plain_mlp(x)
        if mlp is not None:
            return mlp.vjp(cc_tree.detached(params), x)
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            out = self._run(leaves, x)[0]

        def pullback(u: Array) -> list[Array]:
            check_cotangent_shape(u, out)
            return _grads(out, leaves, u)

        return out.detach(), pullback

    def linearize(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable, Callable]:
        """``(f, jvp_fn, pullback)`` at one point (the optional protocol primitive).

        A plain MLP runs one forward and then hand-written tangent and
        backward sweeps over the cached activations (1 forward + k tangent +
        m backward for k JVPs and m VJPs); any other module composes ``vjp``
        (one forward) with one ``jvp`` per tangent.
        """
        self._check(params, x)
        mlp = self._plain_mlp(x)
        if mlp is not None:
            return mlp.linearize(cc_tree.detached(params), x)
        return linearize_by_composition(self, params, x)

    def jet(self, params: Sequence[Array], x: Array, tangent: Sequence[Array], order: int) -> list[Array]:
        """``[f, d1, ..., d_order]``, ``d_k = d^k/dt^k f(params + t tangent)`` at 0 (order <= 3).

        Taylor mode over the layers for a plain MLP (about ``order + 1``
        forwards); nested :func:`torch.func.jvp` for any other module (order
        ``k`` costs about ``2^k`` forwards).
        """
        if order not in (1, 2, 3):
            raise ValueError(f"jet order must be 1, 2 or 3, got {order!r}")
        self._check(params, x)
        check_same_structure("tangent", tangent, params)
        p, t = [q.detach() for q in params], [q.detach() for q in tangent]
        mlp = self._plain_mlp(x)
        if mlp is not None:
            return mlp.jet(p, x, t, order)
        return _forward_ad(lambda: tp.nested_jet(lambda q: self._pure(q, x), p, t, order))

    def jets(self, params: Sequence[Array], x: Array) -> tuple[Array, Callable[[Sequence[Any], int], list[Array]]]:
        """``(f, jet_fn)``, ``jet_fn(tangent, order) = [d1, ..., d_order]`` (the optional protocol primitive).

        A plain MLP runs one forward and then Taylor mode over the cached
        activations (``ArrayAPIMLP.jets``: ``None`` tangent entries skipped, a
        direction on layer k starts at layer k); any other module runs a
        forward and then one nested-JVP :meth:`jet` per call (``None`` entries
        filled with zeros).
        """
        self._check(params, x)
        mlp = self._plain_mlp(x)
        if mlp is None:
            return jets_by_jet(self, params, x)
        out, jet_fn = mlp.jets(cc_tree.detached(params), x)
        return out, lambda t, order: jet_fn([None if q is None else q.detach() for q in t], order)

    def layers(self, params: Sequence[Array], x: Array, out_cotangent: Cotangent) -> list[LayerRecord]:
        """Records of the output chain of ``nn.Linear`` layers (all of them for an MLP), input to output.

        Raises:
            TypeError: the module has no chain of Linear layers ending at the output.
        """
        rec = self.records(params, x, out_cotangent, None, chain=True)
        if not rec.layers:
            raise TypeError(f"layers() needs nn.Linear layers ending at the output, with elementwise operations "
                            f"between them; {type(self.module).__name__} has none (use records())")
        return rec.layers

    def layer_specs(self, params: Sequence[Array] | None = None) -> list[LayerSpec]:
        """Every ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) with a trainable weight, in module order."""
        index = {n: i for i, n in enumerate(self.names)}
        specs = []
        for name, mod in self.module.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)) or not mod.weight.requires_grad:
                continue
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                continue
            prefix = f"{name}." if name else ""
            bias = index.get(prefix + "bias") if mod.bias is not None else None
            kind = "dense" if isinstance(mod, nn.Linear) else "conv2d"
            axes = (0, 1) if kind == "dense" else (0, 1, 2, 3)
            specs.append(LayerSpec(kind, index[prefix + "weight"], bias, axes, name))
        return specs

    def records(self, params: Sequence[Array], x: Array, cotangent: Cotangent,
                specs: Sequence[LayerSpec] | None = None, chain: bool = False) -> Records:
        """One forward and one backward: the output, ``J^T cotangent`` and the records of ``specs``.

        Every layer asked for that the forward calls exactly once is recorded:
        its input (a convolution's unfolded patches, ``(B, S, C_in kh kw)``)
        and ``g = dL/dz`` (``(B, S, C_out)`` for a convolution), found by
        adding a zero tensor to its output. With ``chain=True`` only the output
        chain of dense layers is kept (in call order, with ``z``, ``dact``, ``h``).
        """
        self._check(params, x)
        specs = self.layer_specs(params) if specs is None else list(specs)
        mlp = self._plain_mlp(x)
        if mlp is not None:
            return _mlp_records(mlp, params, x, cotangent, self.layer_specs(), specs)
        leaves = [p.detach().requires_grad_(True) for p in params]
        wanted = {s.weight for s in specs}
        if chain:  # the chain is found over every dense layer, then cut at the first one not asked for
            specs = [s for s in self.layer_specs(params) if s.kind == "dense"]
        with torch.enable_grad():
            out, mode = self._run(leaves, x, {id(leaves[s.weight]): s for s in specs})
        u = output_cotangent(cotangent, out.detach())
        calls = _called_once(mode.calls)
        grads = _grads(out, leaves + [c.e for c in calls], u, retain=chain)
        param_grads, g_of = grads[: len(leaves)], grads[len(leaves):]
        if chain:
            kept, recs = self._chain(calls, g_of, out, leaves, wanted)
        else:
            kept, recs = [], []
            for c, g in zip(calls, g_of):
                rec = _record(c, g, leaves)
                if rec is not None:
                    kept.append(c.layer)
                    recs.append(rec)
        return Records(out.detach(), param_grads, kept, recs)

    def _chain(self, calls: list[tp.Call], g_of: list[Array], out: Array, leaves: list,
               wanted: set[int]) -> tuple[list, list]:
        """The output chain: the longest run of dense calls (all in ``wanted``) ending at the output,
        with elementwise operations between them."""
        dense = list(zip(calls, g_of))
        if not dense or dense[-1][0].z is not out or dense[-1][0].layer.weight not in wanted or out.ndim != 2:
            return [], []
        recs = [LayerRecord(a=dense[-1][0].a.detach(), z=out.detach(), dact=torch.ones_like(out),
                            g=dense[-1][1], h=out.detach())]
        kept = [dense[-1][0].layer]
        for k in range(len(dense) - 2, -1, -1):
            (c, g), (nxt, _) = dense[k], dense[k + 1]
            usable = c.layer.weight in wanted and c.a.ndim == 2
            dact = self._elementwise(c, nxt, g, recs[0], leaves) if usable else None
            if dact is None:
                break
            recs.insert(0, LayerRecord(a=c.a.detach(), z=c.z.detach(), dact=dact, g=g, h=nxt.a.detach()))
            kept.insert(0, c.layer)
        return kept, recs

    def _elementwise(self, c: tp.Call, nxt: tp.Call, g: Array, upper: LayerRecord, leaves: list) -> Array | None:
        """``act'(z)`` if the next dense layer's input is an elementwise function of this layer's output.

        Checks (``validate``): equal shapes, the derivative acts elementwise
        (a non-constant pattern), and the recorded ``g`` is the chain rule
        ``(g_next W_next) * act'(z)`` (no skip connection).
        """
        if tuple(nxt.a.shape) != tuple(c.z.shape) or not nxt.a.requires_grad:
            return None
        (dact,) = torch.autograd.grad(nxt.a, c.e, torch.ones_like(nxt.a), retain_graph=True, allow_unused=True)
        if dact is None:
            return None
        if value_checks_on(self.validate):
            r = tp.pattern_like(nxt.a)
            (dr,) = torch.autograd.grad(nxt.a, c.e, r, retain_graph=True)
            scale = float(dact.abs().max()) + 1e-300
            if not torch.allclose(dr, dact * r, rtol=1e-6, atol=1e-12 * scale):
                return None
            back = torch.matmul(upper.g, leaves[nxt.layer.weight].detach()) * dact
            if not torch.allclose(back, g, rtol=1e-6, atol=1e-9 * (float(g.abs().max()) + 1e-300)):
                return None
        return dact

    # -- the plain-MLP fast path ---------------------------------------------------
    def _plain_mlp(self, x: Array) -> ArrayAPIMLP | None:
        """An ``ArrayAPIMLP`` on torch tensors when the module is ``Sequential(Linear, act, ..., Linear)``
        and ``x`` is a 2-d batch."""
        if self._mlp is False:
            self._mlp = _as_plain_mlp(self.module, self.names)
        return self._mlp if x.ndim == 2 else None


def _check_single_input(module: nn.Module) -> None:
    """``TypeError`` if the module's forward needs more than one positional input."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    required = [p for p in sig.parameters.values() if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        raise TypeError(f"TorchModel needs a module whose forward takes one tensor (the batch); "
                        f"{type(module).__name__}.forward{sig} needs {len(required)} inputs")


def _as_plain_mlp(module: nn.Module, names: list[str]) -> ArrayAPIMLP | None:
    """``ArrayAPIMLP`` for ``Sequential(Linear, act, Linear, act, ..., Linear)`` with one activation, else None."""
    if type(module) is not nn.Sequential or len(module) % 2 == 0:
        return None
    mods = list(module)
    linears, acts = mods[0::2], mods[1::2]
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return None
    acts_named = {_activation_name(a) for a in acts}
    if len(acts_named) > 1 or None in acts_named or any(list(a.parameters()) or list(a.buffers()) for a in acts):
        return None
    expected = [f"{2 * k}.{w}" for k in range(len(linears)) for w in ("weight", "bias")]
    if names != expected:
        return None
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    return _TorchMLP(sizes, acts_named.pop() if acts_named else "identity", xp=xp_torch, validate=False)


class _TorchMLP(ArrayAPIMLP):
    """The array-API MLP on torch tensors, with ``nn.Linear``'s fused ``addmm``."""

    @staticmethod
    def affine(a: Array, W: Array, b: Array) -> Array:
        return torch.addmm(b, a, W.T)


def _mlp_records(mlp: ArrayAPIMLP, params: Sequence[Array], x: Array, cotangent: Cotangent,
                 all_specs: Sequence[LayerSpec], specs: Sequence[LayerSpec]) -> Records:
    """Records of a plain MLP from its hand-written sweep (every layer is in the output chain)."""
    return mlp_records(mlp.layers(cc_tree.detached(params), x, cotangent), all_specs, specs)


def _called_once(calls: list[tp.Call]) -> list[tp.Call]:
    """The calls of layers called exactly once in the pass (a shared layer has no single record)."""
    count: dict[int, int] = {}
    for c in calls:
        count[c.layer.weight] = count.get(c.layer.weight, 0) + 1
    return [c for c in calls if count[c.layer.weight] == 1]


def _record(call: tp.Call, g: Array, leaves: list) -> LayerRecord | None:
    """A dense or conv record in weight-sharing format, or None if the call's geometry isn't supported."""
    if call.layer.kind == "dense":
        return LayerRecord(a=tp.as_positions(call.a.detach()), z=None, dact=None, g=tp.as_positions(g), h=None)
    kernel = tuple(int(k) for k in leaves[call.layer.weight].shape[2:])
    cols = tp.patches(call, kernel)
    if cols is None:
        return None
    return LayerRecord(a=cols, z=None, dact=None, g=tp.channels_last(g), h=None)


def _grads(out: Array, inputs: list, u: Array, retain: bool = True) -> list[Array]:
    """``J^T u`` w.r.t. every input (zeros for inputs the output does not depend on)."""
    gs = torch.autograd.grad(out, inputs, u, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


_MISSING_FORWARD_RULE = re.compile(r"forward AD with (\S+)")


def _forward_ad(fn: Callable[[], Any]) -> Any:
    """Run a ``torch.func.jvp`` computation holding the process-wide forward-AD lock; name missing rules."""
    with tp.FORWARD_AD:
        try:
            out = fn()
        except (RuntimeError, NotImplementedError) as err:
            found = _MISSING_FORWARD_RULE.search(str(err))
            if found is None:
                raise
            raise NotImplementedError(
                f"the operation {found.group(1)} of this module has no forward-mode derivative in torch; the "
                "methods that need JVPs (CurveBall, PseudoHessian) can't run on it, the others (SGD, Adam, "
                "K-FAC, ACP, CenteredSGD, ESN, MK) can") from err
    return tuple(out) if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------
# MLP factory and arrays
# ---------------------------------------------------------------------------


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


def probe() -> None:
    """torch runs wherever it imports (on CPU at least)."""


def namespace() -> Any:
    """``array_api_compat.torch``."""
    return xp_torch


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


from ._torch_optim import Optimizer, from_torch_loss  # noqa: E402  (the wrapper builds on TorchModel)
