"""Data-parallel :func:`~curvcore.backends.jax.jit_step`: the batch split over a mesh axis, the rest replicated.

A step is one ``jax.jit`` program. ``x``, ``y`` (and array keyword arguments
such as ``cov_batch``) are placed with ``NamedSharding(mesh, P(batch_axis))``,
params, method state and model state with ``NamedSharding(mesh, P())``.
Inside, the step runs under :func:`jax.shard_map`: each device steps on its
own rows of the batch, and the core's batch reductions (:mod:`curvcore._reduce`)
are ``psum``/``pmax`` over the batch axis (:class:`MeshReducer`), so the only
collectives are the reductions the core makes, and every value computed from
them (every decision on them) is the same on all devices: the step equals the
one-device step up to summation order.

(Leaving the partitioning to XLA, ``jax.jit`` with sharded inputs, gives the
same numbers, but XLA all-gathers the batch for some operations, e.g. the
backward pass of a max pool.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from curvcore._reduce import Reducer, reducing

Array = Any
BatchAxis = Any  # a mesh axis name, or a tuple of names (the batch split over their product)


class DataParallel(NamedTuple):
    """A data-parallel layout: ``mesh`` and the mesh axis (or axes) the batch is split over."""

    mesh: Mesh
    axis: BatchAxis

    @property
    def n_shards(self) -> int:
        """How many parts the batch is split into (the product of the batch axes' sizes)."""
        names = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return math.prod(self.mesh.shape[a] for a in names)

    def batch(self) -> NamedSharding:
        """Axis 0 split over the batch axis, the other axes whole (replicated over other mesh axes)."""
        return NamedSharding(self.mesh, PartitionSpec(self.axis))

    def replicated(self) -> NamedSharding:
        """A full copy on every device of the mesh."""
        return NamedSharding(self.mesh, PartitionSpec())


def check_layout(mesh: Any, batch_axis: BatchAxis | None) -> DataParallel | None:
    """The layout ``jit_step(mesh=..., batch_axis=...)`` asks for (``None`` without a mesh).

    Raises:
        TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
        ValueError: ``batch_axis`` without ``mesh``, not an axis of ``mesh``, or
            missing while ``mesh`` has several axes.
    """
    if mesh is None:
        if batch_axis is not None:
            raise ValueError(f"batch_axis={batch_axis!r} needs mesh=: jit_step(..., mesh=mesh, batch_axis=...)")
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if batch_axis is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh has axes {mesh.axis_names}; name the one the batch is split over: "
                             f"jit_step(..., mesh=mesh, batch_axis={mesh.axis_names[0]!r})")
        batch_axis = mesh.axis_names[0]
    names = batch_axis if isinstance(batch_axis, tuple) else (batch_axis,)
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown or not names:
        raise ValueError(f"batch_axis must name axes of the mesh {mesh.axis_names}, got {batch_axis!r}")
    return DataParallel(mesh, batch_axis)


def layout_of(given: DataParallel | None, x: Any) -> DataParallel | None:
    """The layout of one call: the one given to ``jit_step``, else read from a sharded ``x`` (``None``: one device).

    Raises:
        ValueError: ``x`` is spread over several devices along an axis other than its batch axis 0.
    """
    if given is not None:
        return given
    leaves = jax.tree_util.tree_leaves(x)
    sharding = _sharding(leaves[0]) if leaves else None
    if sharding is None or len(sharding.device_set) < 2 or sharding.is_fully_replicated:
        return None
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, NamedSharding) or not spec or spec[0] is None:
        raise ValueError(f"x is sharded over {len(sharding.device_set)} devices as {sharding}, but not along its "
                         "batch axis 0; shard x with NamedSharding(mesh, PartitionSpec('data')), or pass "
                         "jit_step(..., mesh=mesh, batch_axis='data') and jit_step shards it")
    return DataParallel(sharding.mesh, spec[0])


def place(layout: DataParallel, params: Any, state: Any, model_state: Any, x: Any, y: Any, kwargs: dict) -> tuple:
    """The step's arguments on ``layout``: batches split over the batch axis, everything else replicated.

    Array keyword arguments (``cov_batch``) are batches too: axis 0 is split.

    Raises:
        ValueError: a batch whose size the batch axis cannot split evenly, or params
            or state that are sharded (data parallelism replicates them).
    """
    for name, tree in (("params", params), ("state", state), ("model state", model_state)):
        _check_unsharded(name, tree, layout)
    for name, tree in (("x", x), ("y", y), *kwargs.items()):
        _check_divisible(name, tree, layout)
    replicated, batch = layout.replicated(), layout.batch()
    return (*jax.device_put((params, state, model_state), replicated),
            *(_put_batch(t, batch, replicated) for t in (x, y)), _put_batch(kwargs, batch, replicated))


def _put_batch(tree: Any, batch: NamedSharding, replicated: NamedSharding) -> Any:
    """Every leaf with a batch axis split over it (0-d leaves replicated)."""
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, batch if _ndim(a) else replicated), tree)


def _check_divisible(name: str, tree: Any, layout: DataParallel) -> None:
    n = layout.n_shards
    for a in jax.tree_util.tree_leaves(tree):
        if _ndim(a) and a.shape[0] % n:
            raise ValueError(f"{name} has batch size {a.shape[0]}, which the {n} devices of mesh axis "
                             f"{layout.axis!r} cannot split evenly; use a batch size divisible by {n}")


def _check_unsharded(name: str, tree: Any, layout: DataParallel) -> None:
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = _sharding(a)
        if sharding is not None and len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is sharded over {len(sharding.device_set)} devices "
                f"({getattr(sharding, 'spec', sharding)}); a data-parallel jit_step (batch axis {layout.axis!r}) "
                f"keeps {name} replicated: pass it on one device or replicated (jit_step copies it to every "
                "device), and shard only the batch")


def _sharding(a: Any) -> Any:
    """The sharding of a concrete JAX array, else ``None`` (NumPy arrays, tracers, Python numbers)."""
    if isinstance(a, jax.core.Tracer) or not isinstance(a, jax.Array):
        return None
    return a.sharding


def _ndim(a: Any) -> int:
    return len(getattr(a, "shape", ()))


class MeshReducer(Reducer):
    """The core's batch reductions as collectives over the batch axis of a mesh, inside :func:`jax.shard_map`.

    Each device's program is the same (SPMD), so the Python ``rank`` is 0 on
    every device and the factor inversions of K-FAC and ACP are owned by
    "rank 0": every device computes every one from the all-reduced factors,
    and nothing is broadcast.
    """

    rank = 0

    def __init__(self, layout: DataParallel):
        self.axis, self.size = layout.axis, layout.n_shards

    def sum(self, a: Array) -> Array:
        return jax.lax.psum(a, self.axis)

    def max(self, a: Array) -> Array:
        return jax.lax.pmax(a, self.axis)

    def sum_many(self, arrays: Sequence[Array]) -> list[Array]:
        """One ``psum`` of them all (XLA combines it into one all-reduce)."""
        return list(jax.lax.psum(list(arrays), self.axis))

    def owners(self, costs: Sequence[float]) -> list[int]:
        return [0] * len(costs)


def shard_step(step: Callable[..., tuple], model: Any, layout: DataParallel) -> Callable[..., tuple]:
    """``step(params, state, model_state, x, y, kwargs) -> (params, state, info, model_state)`` run on every
    device on its part of the batch, the batch reductions all-reduced; every output replicated.

    A model state (flax BatchNorm statistics, dropout keys): each device draws
    its dropout masks from the key folded with its index on the batch axis,
    BatchNorm normalizes with the statistics of the device's part of the batch
    (as ``DistributedDataParallel`` does by default), and the updated running
    statistics are averaged over the devices.
    """
    # check_vma=False: JAX's own tracking would all-reduce the gradients of the replicated params inside
    # every pullback (the transpose of an implicit pvary), before the core sums them; here the core's
    # reductions are the only ones, as in a torch process group
    reducer = MeshReducer(layout)
    replicated, batch = PartitionSpec(), PartitionSpec(layout.axis)

    def local(params: Any, state: Any, model_state: Any, x: Any, y: Any, kwargs: dict) -> tuple:
        with reducing(reducer):
            params, state, info, _ = step(params, state, _per_device(model_state, layout.axis), x, y, kwargs)
        if model_state is None:
            return params, state, info, None
        info = {**info, "buffers": jax.tree_util.tree_map(lambda a: _mean_floats(a, layout.axis), info.get("buffers"))}
        return params, state, info, model.bind(model_state).next_state(info)

    def run(params: Any, state: Any, model_state: Any, x: Any, y: Any, kwargs: dict) -> tuple:
        kw_specs = jax.tree_util.tree_map(lambda a: batch if _ndim(a) else replicated, kwargs)
        return jax.shard_map(local, mesh=layout.mesh, in_specs=(replicated, replicated, replicated, batch, batch,
                                                                kw_specs),
                             out_specs=replicated, check_vma=False)(params, state, model_state, x, y, kwargs)

    return run


def _per_device(model_state: Any, axis: BatchAxis) -> Any:
    """The model state a device steps with: its dropout keys folded with its index on the batch axis."""
    from ._jax_models import ModelState  # it imports the module that imports this one

    if not isinstance(model_state, ModelState) or not model_state.rngs:
        return model_state
    index = jax.lax.axis_index(axis)
    return ModelState(model_state.collections, {k: jax.random.fold_in(v, index) for k, v in model_state.rngs.items()})


def _mean_floats(a: Array, axis: BatchAxis) -> Array:
    return jax.lax.pmean(a, axis) if jax.numpy.issubdtype(a.dtype, jax.numpy.inexact) else a
