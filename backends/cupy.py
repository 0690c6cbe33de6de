"""CuPy adapter: the array-API MLP (:class:`curvcore.backends.ArrayAPIMLP`) on GPU arrays.

``cc.backends.mlp("cupy", sizes)`` builds it; this module adds the conversion
and synchronisation helpers the benchmarks use. Importing it without CuPy, or
without a usable CUDA device, raises ``ImportError`` with the reason (the test
suite and ``cc.backends.names()`` then skip CuPy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import cupy
except ImportError as err:  # pragma: no cover - depends on the machine
    raise ImportError(
        "curvcore.backends.cupy needs CuPy: pip install 'curvcore[cupy]' (cupy-cuda12x) on a machine "
        f"with an NVIDIA GPU ({err})"
    ) from err

from ._adapter import Unavailable, parse_device  # noqa: E402

try:
    _N_DEVICES = int(cupy.cuda.runtime.getDeviceCount())
except Exception as err:  # pragma: no cover - CUDARuntimeError without a driver
    raise Unavailable(f"CuPy is installed but no CUDA device is usable here ({err})") from err
if _N_DEVICES < 1:  # pragma: no cover
    raise Unavailable("CuPy is installed but no CUDA device is present")

import array_api_compat.cupy as xp  # noqa: E402

from ._mlp import ArrayAPIMLP  # noqa: E402

Array = Any

__all__ = ["build_mlp", "from_numpy", "namespace", "probe", "synchronize", "to_numpy", "xp"]


def probe() -> None:
    """Raise :class:`~curvcore.backends._adapter.Unavailable` unless an array can be allocated on the GPU."""
    try:
        cupy.empty(3)
    except Exception as err:  # no usable CUDA device: not available, not broken
        raise Unavailable(f"no usable CUDA device ({type(err).__name__}: {err})") from err


def namespace() -> Any:
    """``array_api_compat.cupy``."""
    return xp


def _index(device: Any) -> int | None:
    """CUDA device index from ``None``, an int, ``"cuda"``, ``"cuda:1"`` or a cupy Device."""
    if device is None:
        return None
    if isinstance(device, cupy.cuda.Device):
        return int(device.id)
    kind, index = parse_device(device)
    if kind not in ("cuda", "gpu"):
        raise ValueError(f"CuPy arrays live on CUDA devices; got device {device!r}")
    return index


def from_numpy(a: np.ndarray, device: Any = None) -> Array:
    """A CuPy copy of a NumPy array (dtype kept), on ``device`` (default: the current device)."""
    index = _index(device)
    if index is None:
        return cupy.asarray(np.asarray(a))
    with cupy.cuda.Device(index):
        return cupy.asarray(np.asarray(a))


def to_numpy(a: Array) -> np.ndarray:
    """A host NumPy copy of a CuPy array."""
    return cupy.asnumpy(a)


def synchronize(tree: Any = None) -> Any:
    """Wait for the current stream (of the device of ``tree``'s first array, else the current device).

    Returns ``tree``, like ``jax.block_until_ready``.
    """
    leaves = tree if isinstance(tree, (list, tuple)) else [tree]
    dev = next((a.device for a in leaves if isinstance(a, cupy.ndarray)), None)
    if dev is None:
        cupy.cuda.get_current_stream().synchronize()
    else:
        with dev:
            cupy.cuda.get_current_stream().synchronize()
    return tree


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[ArrayAPIMLP, list[Array]]:
    """The array-API MLP over ``array_api_compat.cupy`` with ``params_np`` copied to the GPU."""
    return ArrayAPIMLP(sizes, activation, xp=xp), [from_numpy(p, device=device) for p in params_np]
