"""Backends: the same MLP as a native model of each array library.

``names()`` lists the backends usable on this machine; ``mlp(name, sizes, ...)``
builds ``(model, params)`` with identical initial weights on every backend (drawn
with NumPy, then converted), and ``cnn(name)`` the same digits CNN on torch and
flax; ``asarray`` and ``to_numpy`` move arrays between NumPy and a backend.

Backends: ``numpy``, ``array_api_strict`` and ``cupy`` (the explicit array-API
MLP of :mod:`curvcore.backends._mlp`), ``torch`` (``nn.Sequential`` wrapped by
:mod:`curvcore.backends.torch`), ``jax`` (a pure function wrapped by
:mod:`curvcore.backends.jax`).
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from curvcore._linalg import register_cho_solve
from curvcore.random import register_host_generator

from ._activations import NAMES as ACTIVATIONS
from ._activations import check_activation
from ._mlp import ArrayAPIMLP
from .function import FunctionModel

Array = Any

ALL = ("numpy", "array_api_strict", "torch", "jax", "cupy")
_ARRAY_API = ("numpy", "array_api_strict", "cupy")

register_host_generator(np.random.default_rng)


def _scipy_cho_solve(A: Array, B: Array) -> Array:
    """``A^{-1} B`` by SciPy's Cholesky for NumPy arrays (:func:`curvcore._linalg.cho_solve`; imported on first use)."""
    sla = importlib.import_module("scipy.linalg")
    return sla.cho_solve(sla.cho_factor(A, lower=True, check_finite=False), B, check_finite=False)


if importlib.util.find_spec("scipy") is not None:  # else NumPy's SPD solves fall back to xp.linalg.solve
    register_cho_solve(lambda a: isinstance(a, np.ndarray), _scipy_cho_solve)

INITS = ("lecun", "he", "uniform")

__all__ = [
    "ALL", "ACTIVATIONS", "ArrayAPIMLP", "FunctionModel", "available", "asarray", "backend_of", "block_until_ready",
    "cnn", "init_params", "mlp", "names", "namespace", "to_numpy", "unavailable_reason",
]


def _probe(name: str) -> bool:
    """Whether backend ``name`` imports and can allocate an array here.

    ``False`` quietly when its framework is not installed (a
    ``ModuleNotFoundError`` for the framework itself) or, for CuPy, when
    there is no usable CUDA device. Any other exception (a bug in an adapter,
    a broken install) also gives ``False`` but is never silent: a
    ``RuntimeWarning`` names it, and so does the ``ImportError`` of any later
    use (:func:`unavailable_reason`).
    """
    try:
        if name == "numpy":
            return True
        if name == "array_api_strict":
            importlib.import_module("array_api_strict")
            return True
        if name == "cupy":
            cp = importlib.import_module("cupy")
            try:
                cp.empty(3)
            except Exception as err:  # no usable CUDA device: not available, not broken
                _ERRORS[name] = f"no usable CUDA device ({type(err).__name__}: {err})"
                return False
            return True
        importlib.import_module(f"{__name__}.{name}")  # the adapter imports its framework
        return True
    except Exception as err:  # reported below, never swallowed
        _ERRORS[name] = f"{type(err).__name__}: {err}"
        missing = isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in _FRAMEWORK[name]
        if not missing:
            warnings.warn(f"curvcore backend {name!r} is installed but failed to load ({_ERRORS[name]}); "
                          "it is reported as unavailable", RuntimeWarning, stacklevel=3)
        return False


_FRAMEWORK = {"array_api_strict": ("array_api_strict",), "torch": ("torch",), "jax": ("jax", "jaxlib"),
              "cupy": ("cupy", "cupy_backends")}
_AVAILABLE: dict[str, bool] = {}
_ERRORS: dict[str, str] = {}


def available(name: str) -> bool:
    """Whether backend ``name`` is usable here (cached probe)."""
    if name not in ALL:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(ALL)}")
    if name not in _AVAILABLE:
        _AVAILABLE[name] = _probe(name)
    return _AVAILABLE[name]


def names() -> list[str]:
    """The backends importable (and, for CuPy, with a GPU) on this machine."""
    return [n for n in ALL if available(n)]


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` is not available here (the probe's error), or ``None`` when it is."""
    return None if available(name) else _ERRORS.get(name, "unknown")


def _require(name: str) -> None:
    if not available(name):
        hint = {"cupy": "pip install 'curvcore[cupy]' on a machine with an NVIDIA GPU"}.get(
            name, f"pip install 'curvcore[{name}]'" if name in ("torch", "jax") else f"pip install {name}"
        )
        raise ImportError(f"backend {name!r} is not available here: {unavailable_reason(name)} ({hint})")


def namespace(name: str) -> Any:
    """The array-API namespace of a backend (``array_api_compat`` wrapped where needed)."""
    _require(name)
    if name == "numpy":
        import array_api_compat.numpy as xp
    elif name == "array_api_strict":
        xp = importlib.import_module("array_api_strict")
    elif name == "cupy":
        import array_api_compat.cupy as xp
    elif name == "torch":
        import array_api_compat.torch as xp
    else:
        xp = importlib.import_module("jax.numpy")
    return xp


def _library_of(array: Any) -> str:
    mod = type(array).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(mod, mod)


def backend_of(array: Any) -> str:
    """The backend name of an array: ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"`` or ``"array_api_strict"``.

    Raises:
        TypeError: an array of another library.
    """
    lib = _library_of(array)
    if lib not in ALL:
        raise TypeError(f"arrays of {lib!r} belong to no curvcore backend ({', '.join(ALL)})")
    return lib


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of an array of any backend (moved to host, detached)."""
    lib = _library_of(array)
    if lib == "torch":
        return array.detach().cpu().numpy().copy()
    if lib == "cupy":
        return array.get()
    if lib == "array_api_strict":
        return np.from_dlpack(array).copy()
    return np.array(array, copy=True)


def asarray(name: str, array: Any, dtype: str | None = None, device: Any = None) -> Any:
    """Convert a NumPy-compatible array to backend ``name`` (optionally casting).

    Integer arrays keep an integer dtype (``int64``; ``int32`` on JAX without x64).
    """
    _require(name)
    a = np.asarray(to_numpy(array) if not isinstance(array, np.ndarray) and _library_of(array) != "numpy" else array)
    if dtype is not None and np.issubdtype(a.dtype, np.floating):
        a = a.astype(dtype)
    if name == "numpy":
        return a.copy()
    if name == "array_api_strict":
        xp = namespace(name)
        return xp.asarray(a.copy())
    if name == "cupy":
        cp = importlib.import_module("cupy")
        if device is not None:
            with cp.cuda.Device(_cuda_index(device)):
                return cp.asarray(a)
        return cp.asarray(a)
    module = importlib.import_module(f"{__name__}.{name}")
    return module.from_numpy(a, device=device)


def _cuda_index(device: Any) -> int:
    text = str(device)
    return int(text.split(":")[1]) if ":" in text else 0


def init_params(sizes: Sequence[int], seed: int = 0, init: str = "lecun") -> list[np.ndarray]:
    """Initial ``[W1, b1, ...]`` in float64 NumPy, the same for every backend.

    ``init="lecun"``: ``W ~ N(0, 1/n_in)``; ``"he"``: ``N(0, 2/n_in)``;
    ``"uniform"``: ``U(-1/sqrt(n_in), 1/sqrt(n_in))`` (PyTorch's default).
    Biases start at zero for ``lecun``/``he`` and uniform for ``uniform``.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    params: list[np.ndarray] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        if init == "uniform":
            bound = 1.0 / np.sqrt(n_in)
            params += [rng.uniform(-bound, bound, (n_out, n_in)), rng.uniform(-bound, bound, n_out)]
        else:
            scale = np.sqrt((2.0 if init == "he" else 1.0) / n_in)
            params += [scale * rng.standard_normal((n_out, n_in)), np.zeros(n_out)]
    return params


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
    if name not in ALL:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(ALL)}")
    check_activation(activation)
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
    _require(name)
    params_np = [p.astype(dtype) for p in init_params(sizes, seed, init)]
    if name in _ARRAY_API:
        params = [asarray(name, p, device=device) for p in params_np]
        return ArrayAPIMLP(sizes, activation, xp=namespace(name)), params
    module = importlib.import_module(f"{__name__}.{name}")
    return module.build_mlp(sizes, activation, params_np, device=device)


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
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    _require(name)
    weights = _cnn.init_weights(channels, seed)
    return (_cnn.torch_cnn if name == "torch" else _cnn.flax_cnn)(weights, dtype, device)


def block_until_ready(tree: Any) -> Any:
    """Wait until the device work producing ``tree`` (an array or list of arrays) is done.

    CUDA (torch, CuPy) and JAX calls return before the work finishes; timings
    must synchronise. A no-op for NumPy and ``array_api_strict``.
    """
    leaves = list(tree) if isinstance(tree, (list, tuple)) else [tree]
    if not leaves:
        return tree
    lib = _library_of(leaves[0])
    if lib == "jax":
        importlib.import_module("jax").block_until_ready(leaves)
    elif lib == "torch" and leaves[0].is_cuda:
        importlib.import_module("torch").cuda.synchronize(leaves[0].device)
    elif lib == "cupy":
        importlib.import_module("cupy").cuda.get_current_stream().synchronize()
    return tree


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
