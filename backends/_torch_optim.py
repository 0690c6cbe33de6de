"""The torch ``Optimizer`` wrapper and the mapping of ``torch.nn`` losses (part of ``curvcore.backends.torch``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvcore._checks import check_batch
from curvcore._reduce import reducing
from curvcore.losses import CrossEntropy, Loss, MSE
from curvcore.losses import get as get_loss
from curvcore.methods import init_state
from curvcore.tree import leaves_of

from ._torch_dist import TorchReducer, digest

Array = Any

_SUPPORTED = ("'ce', 'mse', a curvcore loss, nn.CrossEntropyLoss (reduction 'mean'/'sum', ignore_index; "
              "no weight, no label_smoothing) or nn.MSELoss (reduction 'mean'/'sum')")


def from_torch_loss(loss: Any) -> tuple[Loss | None, int | None]:
    """``(curvcore loss, class axis)`` for a loss given to :class:`Optimizer`.

    ``nn.CrossEntropyLoss`` maps to :class:`curvcore.losses.CrossEntropy` with
    the same ``reduction`` and ``ignore_index``, and class axis 1 (torch's
    layout for outputs with 3 or more dims; the adapter moves it last).
    ``nn.MSELoss`` maps to ``MSE(reduction="mean")`` or ``"sum"``, which equal
    torch's values. ``info["loss"]`` then equals the torch module's value.

    Raises:
        TypeError: a loss module or setting that can't be mapped (``weight=``,
            ``label_smoothing != 0``, ``reduction="none"``, another loss class).
    """
    if loss is None:
        return None, None
    if isinstance(loss, (str, Loss)):
        return get_loss(loss), None
    if isinstance(loss, nn.CrossEntropyLoss):
        problems = [what for what, bad in (("weight=", loss.weight is not None),
                                           (f"label_smoothing={loss.label_smoothing}", loss.label_smoothing != 0),
                                           (f"reduction={loss.reduction!r}", loss.reduction not in ("mean", "sum")))
                    if bad]
        if problems:
            raise TypeError(f"nn.CrossEntropyLoss with {', '.join(problems)} is not supported; supported: {_SUPPORTED}")
        return CrossEntropy(reduction=loss.reduction, ignore_index=loss.ignore_index), 1
    if isinstance(loss, nn.MSELoss):
        if loss.reduction not in ("mean", "sum"):
            raise TypeError(f"nn.MSELoss(reduction={loss.reduction!r}) is not supported; supported: {_SUPPORTED}")
        return MSE(reduction=loss.reduction), None
    raise TypeError(f"loss {type(loss).__name__} is not supported; supported: {_SUPPORTED}")


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that takes a curvcore method's steps on a module.

    ``step(x, y)`` runs one method step on the module's current parameters
    and writes the new values (and BatchNorm running statistics) back in
    place; the method state lives in the wrapper (``opt.state``). No
    ``backward()`` is needed: the method computes its own derivatives from the
    model and the batch, so ``step(closure)`` is not supported.

    One param group holds every trainable parameter; ``param_groups[0]["lr"]``
    is the method's learning rate, so every ``torch.optim.lr_scheduler``
    works (halving it halves the next update). ``state_dict()`` /
    ``load_state_dict()`` round-trip bit-exactly; ``zero_grad()`` works.

    >>> opt = Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss())
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    >>> for x, y in loader:
    ...     info = opt.step(x, y)          # info["loss"]: the loss before the step
    ...     sched.step()

    Methods with ``needs_refresh(state)`` (ACP takes ``cov_batch=`` at refresh
    steps) get ``cov_batch`` when a refresh is due: pass it to ``step`` or give
    ``cov_source``, a callable returning a batch of inputs, called only then.

    Args:
        module: the network (its trainable parameters are updated in place).
        method: a curvcore method instance (``cc.SGD(...)``, ``cc.CurveBall(...)``).
        loss: ``"ce"``, ``"mse"``, a curvcore loss, ``nn.CrossEntropyLoss`` or
            ``nn.MSELoss`` (see :func:`from_torch_loss`), or give it to each ``step``.
        cov_source: optional ``() -> inputs`` for methods with ``needs_refresh``.
        seed: seed of the model's dropout masks (default ``torch.initial_seed()``).
        process_group: a ``torch.distributed`` process group (``dist.group.WORLD``
            for the default one) for data-parallel training: every rank passes
            its own shard of the batch (equal sizes), every batch reduction of
            the method becomes an all-reduce, and all ranks take the same step
            (BatchNorm statistics stay per rank, as in DDP). See the
            distributed training page of the docs.

    Raises:
        TypeError: not a module, a module whose forward needs two inputs, a
            loss that can't be mapped, a ``DistributedDataParallel`` module.
        ValueError: with ``process_group``, module weights or method states
            that differ across ranks (checked once here).
    """

    def __init__(self, module: nn.Module, method: Any, loss: Any = None,
                 cov_source: Callable[[], Array] | None = None, seed: int | None = None,
                 process_group: Any = None):
        from .torch import TorchModel

        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise TypeError("Optimizer got a DistributedDataParallel module: pass the plain module "
                            "(ddp.module) and process_group=... instead; curvcore all-reduces what each method "
                            "needs itself")
        self.loss, class_axis = from_torch_loss(loss)
        self.module, self.method, self.cov_source = module, method, cov_source
        self.model = TorchModel(module, seed=seed, class_axis=class_axis)
        if not hasattr(method, "lr"):
            raise TypeError(f"{type(method).__name__} has no lr; the Optimizer maps param_groups[0]['lr'] to it")
        super().__init__(self.model.parameters(), {"lr": method.lr})
        self.state = init_state(method, self.model.params(), self.model)  # the method state (not per-parameter dicts)
        self.info: dict[str, Any] = {}
        self.reducer = None if process_group is None else TorchReducer(process_group)
        if self.reducer is not None:
            leaves = [*self.model.params(), *[t for t in leaves_of(self.state) if isinstance(t, torch.Tensor)]]
            self.reducer.same_everywhere(digest(leaves), "the module weights or method states")

    def __repr__(self) -> str:
        return f"Optimizer({self.method!r}, loss={self.loss!r}, lr={self.param_groups[0]['lr']!r})"

    def _method(self) -> Any:
        """The method with the param group's learning rate."""
        lr = self.param_groups[0]["lr"]
        if lr == self.method.lr:
            return self.method
        method = copy.copy(self.method)
        method.lr = lr
        return method

    def step(self, x: Any = None, y: Array = None, loss: Any = None, cov_batch: Array | None = None,
             **kwargs: Any) -> dict:  # type: ignore[override]
        """One method step; updates the module in place and returns ``info`` (0-d tensors).

        Args:
            x: input batch.
            y: targets (integer labels for cross-entropy).
            loss: overrides the loss given to the constructor ("ce", "mse" or a curvcore loss).
            cov_batch: inputs for a method's refresh step (used only when
                ``method.needs_refresh(state)``); else ``cov_source()`` is used.
            **kwargs: passed on to ``method.step``.

        Raises:
            TypeError: called with a closure (``step(closure)``) or without a batch.
        """
        if callable(x) or "closure" in kwargs:
            raise TypeError("curvcore's Optimizer needs step(x, y): the method computes its own derivatives from "
                            "the model and the batch, so closures are not supported")
        if x is None or y is None:
            raise TypeError("Optimizer.step needs the batch: step(x, y)")
        lossf = self.loss if loss is None else from_torch_loss(loss)[0]
        if lossf is None:
            raise ValueError("no loss: pass loss='ce'/'mse', a curvcore loss or nn.CrossEntropyLoss()/nn.MSELoss() "
                             "to Optimizer(...) or step(...)")
        method = self._method()
        needs_refresh = getattr(method, "needs_refresh", None)
        if needs_refresh is not None and needs_refresh(self.state):
            if cov_batch is None and self.cov_source is not None:
                cov_batch = self.cov_source()
            if cov_batch is not None:
                kwargs["cov_batch"] = cov_batch
        params = [p.detach() for p in self.model.parameters()]  # views: a step never writes into its inputs
        if self.reducer is None:
            new, self.state, self.info = method.step(self.model, lossf, params, self.state, x, y, **kwargs)
        else:
            new, self.state, self.info = self._distributed_step(method, lossf, params, x, y, kwargs)
        with torch.no_grad():
            torch._foreach_copy_(self.model.parameters(), new)  # one launch for every parameter
            if "buffers" in self.info:
                buffers = dict(self.module.named_buffers())
                for name, value in self.info["buffers"].items():
                    buffers[name].copy_(value)
        return self.info

    def _distributed_step(self, method: Any, lossf: Any, params: list, x: Array, y: Array, kwargs: dict) -> tuple:
        """One step with every batch reduction all-reduced; errors are raised on every rank, never on one."""
        r = self.reducer
        r.same_everywhere(float(x.shape[0]), "batch sizes")
        problem = None
        if method.validate:
            try:
                check_batch(params, x, y, validate=True)
            except (TypeError, ValueError) as err:
                problem = f"{type(method).__name__}: {err}"
        r.agree(problem, "input validation")
        quiet = copy.copy(method)
        quiet.validate = False  # every check inside runs on reduced values or not at all: no rank raises alone
        with reducing(r):
            new, state, info = quiet.step(self.model, lossf, params, self.state, x, y, **kwargs)
        if method.validate and not bool(info["finite"]):  # the same on every rank
            raise FloatingPointError(f"{type(method).__name__}: the step is not finite on the whole batch "
                                     f"(loss before the step = {float(info['loss'])!r}); the parameters are unchanged")
        return new, state, info

    def state_dict(self) -> dict[str, Any]:
        """The method state (tensor copies) and the param group's hyperparameters (``torch.save``-able)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"method": type(self.method).__name__, "state": _to_plain(self.state), "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly; shapes, dtypes and the method are checked.

        Raises:
            ValueError: a state of another method or of another model.
        """
        name = state_dict.get("method")
        if name != type(self.method).__name__:
            raise ValueError(f"state_dict is for {name!r}, but this optimizer runs {type(self.method).__name__!r}")
        self.state = _from_plain(state_dict["state"], self.state, "state")
        for group, saved in zip(self.param_groups, state_dict.get("param_groups", [])):
            group.update(saved)


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
