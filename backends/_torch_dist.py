"""Data-parallel steps over ``torch.distributed`` (part of ``curvcore.backends.torch``).

:class:`TorchReducer` makes curvcore's batch reductions (:mod:`curvcore._reduce`)
all-reduces over a process group; :class:`Optimizer` runs each step inside it
when given ``process_group``. It counts the collectives and the bytes each
rank sends, so the traffic of a method can be measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from curvcore._reduce import Reducer

Array = Any


class TorchReducer(Reducer):
    """Batch reductions as collectives of a ``torch.distributed`` process group (gloo on CPU, nccl on GPU).

    Attributes:
        collectives: collectives issued so far.
        bytes: bytes this rank contributed to them so far.
    """

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group needs torch.distributed.init_process_group(...) to have been called")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.collectives = 0
        self.bytes = 0

    def _count(self, t: Array) -> None:
        self.collectives += 1
        self.bytes += t.numel() * t.element_size()

    def _all_reduce(self, a: Array, op: Any) -> Array:
        t = a.detach().clone().contiguous()
        self._count(t)
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def sum(self, a: Array) -> Array:
        return self._all_reduce(a, dist.ReduceOp.SUM)

    def max(self, a: Array) -> Array:
        return self._all_reduce(a, dist.ReduceOp.MAX)

    def sum_many(self, arrays: Sequence[Array]) -> list[Array]:
        """One all-reduce of every array, flattened into one buffer (like DDP's gradient buckets)."""
        flat = self.sum(torch.cat([a.reshape(-1) for a in arrays]))
        out, i = [], 0
        for a in arrays:
            out.append(flat[i:i + a.numel()].reshape(a.shape))
            i += a.numel()
        return out

    def broadcast(self, a: Array, src: int) -> Array:
        t = a.detach().clone().contiguous()
        self._count(t)
        dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                       group=self.group)
        return t

    def agree(self, local_error: str | None, what: str) -> None:
        """Raise the same ``ValueError`` on every rank if any rank found ``local_error`` (one collective)."""
        flag = self.max(torch.tensor([0 if local_error is None else 1 + self.rank], dtype=torch.int64))
        if int(flag):
            culprit = int(flag) - 1
            raise ValueError(local_error if local_error is not None else
                             f"{what} failed on rank {culprit} (see the error there); no rank took the step")

    def same_everywhere(self, value: float, what: str) -> None:
        """``ValueError`` on every rank unless ``value`` is the same on all of them (two small collectives)."""
        t = torch.tensor([value], dtype=torch.float64)
        lo, hi = -self.max(-t), self.max(t)
        if float(lo) != float(hi):
            raise ValueError(f"{what} differ across ranks ({float(lo)!r} vs {float(hi)!r}); start every rank from "
                             "the same module weights and a fresh method state")


def digest(tensors: Sequence[Array]) -> float:
    """A float64 fingerprint of a list of tensors (equal lists give equal digests)."""
    total = 0.0
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor) and t.numel():
            v = t.detach().double().reshape(-1)
            total += float((v * (1 + torch.arange(v.numel(), dtype=torch.float64) % 7)).sum()) * (i + 1)
    return total
