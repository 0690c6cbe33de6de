"""Input validation shared by methods, losses and backends.

Checks that inspect array values (finiteness) force a device sync; they are
skipped automatically while a JAX trace is running (values are abstract
there), and a method's ``validate`` attribute turns them off for benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from array_api_compat import array_namespace

Array = Any


def _library(a: Array) -> str:
    """A short library name for an array, for error messages."""
    mod = type(a).__module__.split(".")[0]
    return {"builtins": "python", "jaxlib": "jax"}.get(mod, mod)


def namespace(*arrays: Array, what: str = "arrays") -> Any:
    """``array_namespace`` of several arrays; a mix of libraries is a ``TypeError`` naming them."""
    try:
        return array_namespace(*arrays)
    except TypeError as err:
        libs = sorted({_library(a) for a in arrays})
        raise TypeError(
            f"{what} come from different array libraries ({', '.join(libs)}); "
            "convert them with curvcore.backends.asarray(name, array) first"
        ) from err


def concrete_bool(value: Any) -> bool | None:
    """``bool(value)``, or ``None`` when the value is abstract (inside ``jax.jit``)."""
    try:
        return bool(value)
    except Exception:  # jax tracers raise ConcretizationTypeError (a TypeError)
        return None


def check_finite(name: str, *arrays: Array) -> None:
    """Raise ``ValueError`` if any array holds NaN or Inf (like scipy's ``_check_finite``)."""
    for a in arrays:
        xp = array_namespace(a)
        if not xp.isdtype(a.dtype, ("real floating", "complex floating")):
            continue
        if concrete_bool(xp.all(xp.isfinite(a))) is False:
            raise ValueError(f"{name} contains NaN or Inf")


def check_tree_finite(name: str, tree: Sequence[Array]) -> None:
    """``check_finite`` for every array of a params-like list, naming the index."""
    for i, a in enumerate(tree):
        check_finite(f"{name}[{i}]", a)


def check_shapes(name: str, arrays: Sequence[Array], shapes: Sequence[tuple[int, ...]], unit: str = "arrays") -> None:
    """Raise ``ValueError`` unless ``arrays`` has one array of each expected shape, in order."""
    if len(arrays) != len(shapes):
        raise ValueError(f"{name} has {len(arrays)} {unit} but params have {len(shapes)}")
    for i, (a, s) in enumerate(zip(arrays, shapes)):
        if tuple(a.shape) != tuple(s):
            raise ValueError(f"Shape mismatch in {name}[{i}]: expected {tuple(s)}, got {tuple(a.shape)}.")


def check_same_structure(name: str, tree: Sequence[Array], params: Sequence[Array]) -> None:
    """Raise ``ValueError`` unless ``tree`` has the length and shapes of ``params``."""
    check_shapes(name, tree, [tuple(p.shape) for p in params])


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if not _is_real(value) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0."""
    if not _is_real(value) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_interval(name: str, value: float, low: float, high: float, closed: str = "[)") -> None:
    """Raise ``ValueError`` unless ``value`` lies in the interval (``closed`` as in ``"[)"``)."""
    ok = _is_real(value)
    if ok:
        ok = (value >= low if closed[0] == "[" else value > low) and (
            value <= high if closed[1] == "]" else value < high
        )
    if not ok:
        raise ValueError(f"{name} must lie in {closed[0]}{low}, {high}{closed[1]}, got {value!r}")


def check_int(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_params_and_x(params: Sequence[Array], x: Array, validate: bool = True) -> Any:
    """Checks every adapter shares: one library, one params dtype, a floating ``x`` in that
    dtype, and (when ``validate``) no NaN/Inf. Returns the namespace.

    Raises:
        TypeError: libraries or dtypes differ.
        ValueError: values are not finite.
    """
    xp = namespace(*params, x, what="params and data")
    for i, p in enumerate(params):
        if p.dtype != params[0].dtype:
            raise TypeError(f"params[{i}] is {p.dtype} but params[0] is {params[0].dtype}")
    if xp.isdtype(x.dtype, "real floating") and x.dtype != params[0].dtype:
        raise TypeError(
            f"dtype mismatch: params are {params[0].dtype} but x is {x.dtype}; cast the data to the params' dtype"
        )
    if validate:
        check_finite("x", x)
        check_tree_finite("params", params)
    return xp


def check_batch(params: Sequence[Array], x: Array, y: Array | None = None, validate: bool = True) -> Any:
    """Validate a batch against params; return their common namespace.

    Checks: same array library, ``x`` 2-d with a floating dtype equal to the
    params' dtype, ``y`` with as many rows as ``x``, and (when ``validate``)
    no NaN/Inf in ``x``, ``y`` or params.

    Raises:
        TypeError: libraries or dtypes differ.
        ValueError: shapes differ or values are not finite.
    """
    if y is not None:
        namespace(*params, x, y, what="params and data")
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-d batch (B, n_in), got shape {tuple(x.shape)}")
    xp = check_params_and_x(params, x, validate)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"dtype mismatch: params are {params[0].dtype} but x is {x.dtype}; cast the data")
    if y is not None and (y.ndim == 0 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must have one row per sample: x has {x.shape[0]}, y has shape {tuple(y.shape)}")
    if validate and y is not None:
        check_finite("y", y)
    return xp
