"""The torch adapter's overhead: curvcore SGD through ``Optimizer`` over a native ``torch.optim.SGD`` step.

Both sides take the same step on the same ``nn.Sequential`` tanh MLP
(cross-entropy, momentum 0.9): native is ``zero_grad``, forward, loss,
``backward``, ``torch.optim.SGD.step``; curvcore is
``curvcore.backends.torch.Optimizer(module, cc.SGD(...), nn.CrossEntropyLoss()).step(x, y)``
with its default ``validate=True``. Targets (issue "Speed, part 2"): <= 1.5
on ``small``, <= 1.1 on ``medium``. Keys: ``net|dtype``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import common as C

DTYPES = ("float32", "float64")
TARGETS = {"small": 1.5, "medium": 1.1}
LR, MOMENTUM = 0.1, 0.9


def _keys() -> list[str]:
    if not C.installed("torch"):
        return []
    nets = ["small"] if C.GRID == "quick" else ["small", "medium"]
    return [f"{net}|{dtype}" for net in nets for dtype in DTYPES]


def _module(sizes: list[int], dtype: Any, seed: int = C.SEED) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[Any] = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(n_in, n_out, dtype=dtype)] + ([nn.Tanh()] if k < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def steps(net: str, dtype_name: str, batch: int | None = None, validate: bool = True
          ) -> dict[str, Callable[[], Any]]:
    """``{"native": step, "curvcore": step}`` on two copies of the same module and one batch.

    ``native.module`` is the native side's module, ``curvcore.optimizer`` the curvcore ``Optimizer``.
    """
    import numpy as np
    import torch
    from torch import nn

    import curvcore as cc
    from curvcore.backends import torch as ct

    sizes, dtype = C.NETS[net], getattr(torch, dtype_name)
    batch = batch or C.DEFAULT_BATCH[net]
    rng = np.random.default_rng(C.SEED + 1)
    x = torch.from_numpy(rng.standard_normal((batch, sizes[0]))).to(dtype)
    y = torch.from_numpy(rng.integers(0, sizes[-1], batch))
    native_net, loss = _module(sizes, dtype), nn.CrossEntropyLoss()
    native_opt = torch.optim.SGD(native_net.parameters(), lr=LR, momentum=MOMENTUM)
    method = cc.SGD(lr=LR, momentum=MOMENTUM)
    method.validate = validate
    opt = ct.Optimizer(_module(sizes, dtype), method, nn.CrossEntropyLoss())

    def native() -> Any:
        native_opt.zero_grad(set_to_none=True)
        value = loss(native_net(x), y)
        value.backward()
        native_opt.step()
        return value

    def curvcore() -> Any:
        return opt.step(x, y)

    native.module, curvcore.optimizer = native_net, opt  # type: ignore[attr-defined]
    return {"native": native, "curvcore": curvcore}


class TorchOverhead(C.Benchmark):
    """curvcore SGD step through the torch ``Optimizer`` / native torch SGD step, same process, interleaved."""

    params = _keys()
    param_names = ["net|dtype"]

    def setup(self, key: str) -> None:
        C.require("torch:cpu")
        net, dtype = key.split("|")
        self.fns = steps(net, dtype)
        for fn in self.fns.values():
            fn()

    def track_curvcore_over_native(self, key: str) -> float:
        t = C.interleaved_min(self.fns, *C.RATIO_BUDGET)
        return t["curvcore"] / t["native"]

    track_curvcore_over_native.unit = "ratio"  # type: ignore[attr-defined]
