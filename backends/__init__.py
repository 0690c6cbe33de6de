"""Backends: the same MLP as a native model of each array library.

``names()`` lists the backends usable on this machine; ``mlp(name, sizes, ...)``
builds ``(model, params)`` with identical initial weights on every backend (drawn
with NumPy, then converted), and ``cnn(name)`` the same digits CNN on torch and
flax; ``asarray`` and ``to_numpy`` move arrays between NumPy and a backend.

Every backend is one module of this package with the same small interface
(:class:`~curvcore.backends._adapter.Adapter`: ``probe``, ``namespace``,
``from_numpy``, ``to_numpy``, ``synchronize``, ``build_mlp``); this module only
dispatches over them (:func:`adapter`). ``numpy``, ``array_api_strict`` and
``cupy`` run the explicit array-API MLP of :mod:`curvcore.backends._mlp`,
``torch`` an ``nn.Sequential`` wrapped by :mod:`curvcore.backends.torch`,
``jax`` a pure function wrapped by :mod:`curvcore.backends.jax`. A new array
library is one new module here plus its name in :data:`ALL`.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from curvcore._namespace import library_of
from curvcore.random import register_host_generator
from curvcore.tree import leaves_of

from ._activations import NAMES as ACTIVATIONS
from ._adapter import Unavailable
from ._mlp import ArrayAPIMLP
from ._weights import INITS, check_dtype, init_params, mlp_params
from .function import FunctionModel

Array = Any

ALL = ("numpy", "array_api_strict", "torch", "jax", "cupy")

register_host_generator(np.random.default_rng)

from . import numpy as _numpy_adapter  # noqa: E402,F401  (imported with curvcore: registers SciPy's Cholesky solve)


__all__ = [
    "ALL", "ACTIVATIONS", "INITS", "ArrayAPIMLP", "FunctionModel", "adapter", "available", "asarray", "backend_of",
    "block_until_ready", "cnn", "cnn_torch_layout", "init_params", "mlp", "names", "namespace", "synchronize", "to_numpy",
    "unavailable_reason",
]

_AVAILABLE: dict[str, bool] = {}
_ERRORS: dict[str, str] = {}
_MODULES: dict[str, ModuleType] = {}  # the modules of the available backends, once imported


def _check_name(name: str) -> None:
    if name not in ALL:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(ALL)}")


def _probe(name: str) -> bool:
    """Whether backend ``name``'s module imports and its ``probe()`` passes.

    ``False`` quietly when its framework is not installed (a
    ``ModuleNotFoundError`` for a module named like the backend, e.g.
    ``jaxlib``) or cannot run here (:class:`Unavailable`: no usable CUDA
    device). Any other exception (a bug in an adapter, a broken install) also
    gives ``False`` but is never silent: a ``RuntimeWarning`` names it, and so
    does the ``ImportError`` of any later use (:func:`unavailable_reason`).
    """
    try:
        importlib.import_module(f"{__name__}.{name}").probe()
        return True
    except Exception as err:  # reported below, never swallowed
        _ERRORS[name] = f"{type(err).__name__}: {err}"
        if not _not_installed(err, name):
            warnings.warn(f"curvcore backend {name!r} is installed but failed to load ({_ERRORS[name]}); "
                          "it is reported as unavailable", RuntimeWarning, stacklevel=3)
        return False


def _not_installed(err: BaseException | None, name: str) -> bool:
    """Whether ``err`` (or what caused it) says the framework of ``name`` is missing or cannot run here."""
    while err is not None:
        if isinstance(err, Unavailable):
            return True
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0].startswith(name):
            return True
        err = err.__cause__
    return False


def available(name: str) -> bool:
    """Whether backend ``name`` is usable here (cached probe)."""
    _check_name(name)
    if name not in _AVAILABLE:
        _AVAILABLE[name] = _probe(name)
    return _AVAILABLE[name]


def names() -> list[str]:
    """The backends importable (and, for CuPy, with a GPU) on this machine."""
    return [n for n in ALL if available(n)]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` is not available here (the probe's error), or ``None`` when it is."""
    return None if available(name) else _ERRORS.get(name, "unknown")


def adapter(name: str) -> ModuleType:
    """The module of backend ``name`` (``curvcore.backends.<name>``; see :class:`~curvcore.backends._adapter.Adapter`).

    Raises:
        ValueError: an unknown backend name.
        ImportError: the backend is not available here; the message says why and how to install it.
    """
    module = _MODULES.get(name)
    if module is not None:
        return module
    if not available(name):
        hint = {"cupy": "pip install 'curvcore[cupy]' on a machine with an NVIDIA GPU"}.get(
            name, f"pip install 'curvcore[{name}]'" if name in ("torch", "jax") else f"pip install {name}"
        )
        raise ImportError(f"backend {name!r} is not available here: {unavailable_reason(name)} ({hint})")
    module = _MODULES[name] = importlib.import_module(f"{__name__}.{name}")
    return module


def namespace(name: str) -> Any:
    """The array-API namespace of a backend (``array_api_compat`` wrapped where needed)."""
    return adapter(name).namespace()


def backend_of(array: Any) -> str:
    """The backend name of an array: ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"`` or ``"array_api_strict"``.

    Raises:
        TypeError: an array of another library.
    """
    lib = library_of(array)
    if lib not in ALL:
        raise TypeError(f"arrays of {lib!r} belong to no curvcore backend ({', '.join(ALL)})")
    return lib


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of an array of any backend (moved to host, detached); other values through ``np.array``."""
    lib = library_of(array)
    return adapter(lib).to_numpy(array) if lib in ALL else np.array(array, copy=True)


def asarray(name: str, array: Any, dtype: str | None = None, device: Any = None) -> Any:
    """Convert a NumPy-compatible array to backend ``name`` (optionally casting).

    Integer arrays keep an integer dtype (``int64``; ``int32`` on JAX without x64).
    """
    module = adapter(name)
    a = np.asarray(array if library_of(array) == "numpy" else to_numpy(array))
    if dtype is not None and np.issubdtype(a.dtype, np.floating):
        a = a.astype(dtype)
    return module.from_numpy(a, device=device)


def mlp(
    name: str,
    sizes: Sequence[int],
    activation: str = "tanh",
    dtype: str = "float64",
    seed: int = 0,
    device: Any = None,
    init: str = "lecun",
) -> tuple[Any, list[Any]]:
    """Build the same MLP as a native model of backend ``name``.

    Args:
        name: one of :data:`ALL` (see :func:`names` for what is usable here).
        sizes: widths, input first, e.g. ``[64, 32, 10]``.
        activation: hidden activation: tanh, sigmoid, relu, leaky_relu
            (slope 0.01), softplus or identity; the output layer is linear.
        dtype: ``"float64"`` or ``"float32"``.
        seed: seed of the NumPy draw of the initial weights.
        device: e.g. ``"cuda"`` for torch/jax/cupy; ``None`` = the default.
        init: ``"lecun"`` (default), ``"he"`` or ``"uniform"``; see :func:`init_params`.

    Returns:
        ``(model, params)``: a protocol model and ``[W1, b1, ...]`` on the backend.
    """
    _check_name(name)
    params_np = mlp_params(sizes, activation, dtype, seed, init)
    return adapter(name).build_mlp([int(s) for s in sizes], activation, params_np, device=device)


def cnn(name: str, channels: int = 4, dtype: str = "float64", seed: int = 0, device: Any = None) -> tuple[Any, Any]:
    """Build the same digits CNN as a native model of backend ``name`` (``"torch"`` or ``"jax"``).

    ``Conv2d(1, channels, 3, padding=1) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(16 channels, 10)``
    on 8 x 8 images: an ``nn.Sequential`` in a ``TorchModel`` on ``(B, 1, 8, 8)``, or the same net in
    ``flax.linen`` (``from_flax``) on ``(B, 8, 8, 1)``. The initial weights are drawn once with NumPy
    (seeded), so both start from the same function.

    Returns:
        ``(model, params)``: torch ``[conv.weight, conv.bias, fc.weight, fc.bias]``; jax flax's params dict.

    Raises:
        ValueError: another backend name, a bad ``channels`` or ``dtype``.
        ImportError: the backend (or flax) is not installed.
    """
    from . import _cnn

    if name not in ("torch", "jax"):
        raise ValueError(f"cnn: backend must be 'torch' or 'jax', got {name!r}")
    check_dtype(dtype)
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    adapter(name)
    weights = _cnn.init_weights(channels, seed)
    return (_cnn.torch_cnn if name == "torch" else _cnn.flax_cnn)(weights, dtype, device)


def cnn_torch_layout(params: Any) -> list[np.ndarray]:
    """The digits CNN's params as NumPy arrays in torch's order and layout, from either backend.

    ``[conv.weight, conv.bias, fc.weight, fc.bias]``: the torch params converted, or the flax
    params dict transposed (so the two backends' CNNs compare element by element).
    """
    from . import _cnn

    if isinstance(params, dict):
        return list(_cnn.flax_to_torch(params).values())
    return [to_numpy(p) for p in params]


def synchronize(tree: Any) -> Any:
    """Wait until the device work producing ``tree`` (an array or any nesting of lists/tuples/dicts) is done.

    CUDA (torch, CuPy) and JAX calls return before the work finishes; timings
    must synchronise. A no-op for NumPy and ``array_api_strict``. Returns ``tree``.
    """
    lib = next((lib for lib in map(library_of, leaves_of(tree)) if lib in ALL), None)
    return tree if lib is None else adapter(lib).synchronize(tree)


block_until_ready = synchronize  # the older name


def enable_jax_x64() -> None:
    """Switch JAX to float64 (``jax_enable_x64``) if JAX is available.

    The library never does this on import; call it (or set ``JAX_ENABLE_X64=1``)
    before creating JAX arrays when float64 is wanted.
    """
    if available("jax"):
        importlib.import_module("jax").config.update("jax_enable_x64", True)


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` if torch is available (small models run fastest on one thread)."""
    if available("torch"):
        importlib.import_module("torch").set_num_threads(n)
