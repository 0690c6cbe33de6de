"""Every reduction over the batch, in one place, and how it combines across processes.

Methods call these functions instead of ``xp.sum``/``xp.mean`` over the batch
axis. By default the batch is all in this process (:class:`Reducer`, local).
Data-parallel training runs a step inside :func:`reducing` with a reducer
whose ``sum``/``max`` are all-reduces (``torch.distributed``): every rank holds
a shard of the batch, and every batch reduction (and every decision that
depends on data) then sees the whole batch, so all ranks take the same step.
The reducer is context-local (a ``ContextVar``), so two threads can still step
two models. Under ``jax.jit`` with a sharded batch nothing is needed here:
XLA inserts the all-reduces itself.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._namespace import array_namespace

Array = Any


class Reducer:
    """How the per-process parts of a batch reduction combine: here, the identity (one process).

    A data-parallel reducer overrides the collectives and sets ``size``/``rank``.
    Batch sizes are equal on every rank (the torch wrapper checks it), so a
    count over the local batch times ``size`` is the global count.

    Attributes:
        size: the number of processes sharing the batch.
        rank: this process's index (its shard is rows ``rank * B_local ...``).
    """

    size = 1
    rank = 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process shares the batch."""
        return self.size > 1

    def sum(self, a: Array) -> Array:
        """The sum over processes of a per-process partial sum."""
        return a

    def max(self, a: Array) -> Array:
        """The maximum over processes."""
        return a

    def sum_many(self, arrays: Sequence[Array]) -> list[Array]:
        """:meth:`sum` of several arrays (one fused collective where the reducer can)."""
        return [self.sum(a) for a in arrays]

    def broadcast(self, a: Array, src: int) -> Array:
        """The value of ``a`` on process ``src``."""
        return a

    def owners(self, costs: Sequence[float]) -> list[int]:
        """A deterministic owner per task, greedy by cost (largest first to the least-loaded rank).

        Every rank computes the same map; each task (a factor inversion) runs on
        its owner and is broadcast (KAISA's assignment of K-FAC inversions).
        """
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.size), key=lambda r: (load[r], r))
            owner[i], load[r] = r, load[r] + costs[i]
        return owner


LOCAL = Reducer()
_CURRENT: contextvars.ContextVar[Reducer] = contextvars.ContextVar("curvcore_reducer", default=LOCAL)


@contextmanager
def reducing(reducer: Reducer) -> Iterator[Reducer]:
    """Run the code inside with ``reducer`` combining the batch reductions (context-local)."""
    token = _CURRENT.set(reducer)
    try:
        yield reducer
    finally:
        _CURRENT.reset(token)


def current() -> Reducer:
    """The reducer of this context (:data:`LOCAL` outside :func:`reducing`)."""
    return _CURRENT.get()


def global_count(n: Any) -> Any:
    """A count over the local batch as a count over the whole batch (an int, or a 0-d array summed)."""
    r = current()
    if isinstance(n, int):
        return n * r.size
    return r.sum(n)


def batch_size(a: Array) -> int:
    """The global batch size of a batch-major array."""
    return global_count(int(a.shape[0]))


def batch_sum(a: Array) -> Array:
    """Sum over the batch axis 0: ``(B, ...) -> (...)``."""
    return current().sum(array_namespace(a).sum(a, axis=0))


def batch_mean(a: Array) -> Array:
    """Mean over the batch axis 0: ``(B, ...) -> (...)``."""
    return batch_sum(a) / batch_size(a)


def batch_sum_all(a: Array) -> Array:
    """Sum of every entry of a batch-major array (0-d): a loss summed over samples and positions."""
    return current().sum(array_namespace(a).sum(a))


def batch_max(a: Array) -> Array:
    """Maximum of every entry of a batch-major array (0-d)."""
    return current().max(array_namespace(a).max(a))


def batch_any(mask: Array) -> Array:
    """Whether any entry of a batch-major boolean array is True (0-d), over every process."""
    xp = array_namespace(mask)
    return batch_max(xp.astype(mask, xp.int32)) > 0


def batch_gram(u: Array, v: Array) -> Array:
    """``u^T v`` summed over the batch: ``(B, m), (B, n) -> (m, n)``."""
    xp = array_namespace(u, v)
    return current().sum(xp.matmul(xp.matrix_transpose(u), v))


def vdot(a: Array, b: Array) -> Array:
    """Sum of the elementwise product of two arrays of equal shape (0-d); parameter space, no batch.

    ``vecdot`` of the flattened arrays: one read of each, no ``a * b`` temporary."""
    xp = array_namespace(a, b)
    return xp.vecdot(xp.reshape(a, (-1,)), xp.reshape(b, (-1,)))


def batch_vdot(a: Array, b: Array) -> Array:
    """Output-space dot product summed over the batch (0-d), e.g. ``<Jz, H Jz>``."""
    return current().sum(vdot(a, b))


def param_sums(grads: Sequence[Array]) -> list[Array]:
    """Parameter-space partial sums over the local batch (a pullback ``J^T u``), summed over processes."""
    r = current()
    return list(grads) if not r.distributed else r.sum_many(grads)
