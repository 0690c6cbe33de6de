"""Input validation shared by methods, losses and backends.

Checks that inspect array values (finiteness, label ranges) force a device
sync; they are skipped automatically while a JAX trace is running (values
are abstract there), and a method's ``validate`` attribute turns them off
for benchmarks. A method step checks the structure of its inputs (library,
dtype, device, shapes) at its boundary, before computing anything; inside
:func:`step_scope` the model primitives and losses it calls skip their own
input checks (:func:`in_step`) and follow the step's ``validate``
(:func:`value_checks_on`).

The value checks of a step cost one device sync in all, the finiteness of
its result: a NaN or Inf in the inputs reaches the result, and the value
checks of losses and methods (label ranges, gradients) are deferred
(:func:`check_later`; a bad label poisons the loss with NaN). Only when that
one check fails does the step check the inputs and run the deferred checks
to name the problem, and nothing is returned or written back.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from ._namespace import array_namespace, library_of
from array_api_compat import device as _device

Array = Any

SUPPORTED_DTYPES = ("float32", "float64")


class _Step:
    """The running method step: its name, its ``validate`` and the arrays whose values it already checked."""

    def __init__(self, validate: bool, method: str | None):
        self.validate, self.method, self.checked = bool(validate), method, set()
        self.deferred: list[Callable[[], None]] = []

    def run_deferred(self) -> None:
        """Run the checks deferred by :func:`check_later` (they raise on a problem)."""
        for check in self.deferred:
            check()


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("curvcore_step", default=None)


@contextmanager
def step_scope(validate: bool, method: str | None = None) -> Iterator[_Step]:
    """Mark the code inside as one step of ``method`` (``validate``: value checks on); yields the step."""
    step = _Step(validate, method)
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


def check_later(check: Callable[[], None]) -> None:
    """Run a value check now, or, inside a method step, only if the step's result is not finite.

    A deferred check must leave a trace in the result when it would fail (a
    bad label makes the loss NaN), so the step's one finiteness check sees it.
    """
    step = _STEP.get()
    if step is None:
        check()
    else:
        step.deferred.append(check)


_QUIET: dict[type, Callable[[], Any]] = {}


def register_quiet(array_type: type, context: Callable[[], Any]) -> None:
    """``context()``: a context manager that silences the library's own warnings on NaN/Inf/overflow
    (NumPy: ``np.errstate``); a validated step runs in it, because it reports those itself."""
    _QUIET[array_type] = context


def quiet(array: Array) -> Any:
    """The registered quiet context for ``array``'s type (a null context when there is none)."""
    context = _QUIET.get(type(array))
    return nullcontext() if context is None else context()


def step_method() -> str | None:
    """The name of the method whose step is running (for error messages), or ``None``."""
    step = _STEP.get()
    return None if step is None else step.method


def in_step() -> bool:
    """Whether a method step (which validated its inputs once) is running in this thread/context."""
    return _STEP.get() is not None


def value_checks_on(own: bool = True) -> bool:
    """Whether value checks run now: the running step's ``validate``, else ``own``."""
    step = _STEP.get()
    return own if step is None else step.validate


def first_check(array: Array) -> bool:
    """True unless the running step already checked this array's values (always True outside a step)."""
    step = _STEP.get()
    if step is None:
        return True
    if id(array) in step.checked:
        return False
    step.checked.add(id(array))
    return True


class NonFiniteError(FloatingPointError, ValueError):
    """NaN or Inf where finite values are needed: a ``ValueError`` (bad input) that is also a
    ``FloatingPointError`` (what the pseudo-Hessian's spec asks for)."""


def namespace(*arrays: Array, what: str = "arrays") -> Any:
    """``array_namespace`` of several arrays; a mix of libraries is a ``TypeError`` naming them."""
    try:
        return array_namespace(*arrays)
    except TypeError as err:
        libs = sorted({library_of(a) for a in arrays})
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
    check_named_finite([(name, a) for a in arrays])


_ALL_FINITE: list[tuple[type, Callable[[Sequence[Array]], Array | None]]] = []
_PLAIN_DEVICE: set[type] = set()


def register_all_finite(array_type: type, fn: Callable[[Sequence[Array]], Array | None]) -> None:
    """Register a fused ``all finite`` for lists of one array type (torch: one ``_foreach`` reduction).

    ``fn`` gets every array of the list (integer ones too) and returns a 0-d
    boolean array, or ``None`` when no array is floating.
    """
    _ALL_FINITE.append((array_type, fn))


def register_device_attribute(array_type: type) -> None:
    """Arrays of ``array_type`` report their device as ``a.device`` (skips ``array_api_compat.device``)."""
    _PLAIN_DEVICE.add(array_type)


def all_finite(arrays: Sequence[Array]) -> Array | None:
    """A 0-d boolean array: every floating array is free of NaN/Inf (one fused expression, no sync).

    ``None`` when no array is floating.
    """
    for array_type, fn in _ALL_FINITE:
        if all(isinstance(a, array_type) for a in arrays):
            return fn(arrays)
    ok = None
    for a in arrays:
        xp = array_namespace(a)
        if _floating(xp, a.dtype):
            here = xp.all(xp.isfinite(a))
            ok = here if ok is None else ok & here
    return ok


_FLOATING: dict[tuple[int, Any], bool] = {}


def _floating(xp: Any, dtype: Any) -> bool:
    """``xp.isdtype(dtype, real or complex floating)``, cached (it costs more than a small array's check)."""
    key = (id(xp), dtype)
    found = _FLOATING.get(key)
    if found is None:
        found = _FLOATING[key] = bool(xp.isdtype(dtype, ("real floating", "complex floating")))
    return found


def check_tree_finite(name: str, tree: Sequence[Array], indexed: bool = True) -> None:
    """``ValueError`` naming the first array of ``tree`` with NaN or Inf (one device sync for the whole tree)."""
    check_named_finite([(f"{name}[{i}]" if indexed else name, a) for i, a in enumerate(tree)])


def first_not_finite(named: Sequence[tuple[str, Array]]) -> str | None:
    """The name of the first ``(name, array)`` with NaN or Inf, or None: one fused reduction, one device sync
    when all is well (and one per array to find the culprit when not)."""
    ok = all_finite([a for _, a in named])
    if ok is None or concrete_bool(ok) is not False:
        return None
    for name, a in named:
        here = all_finite([a])  # None for an integer array (labels)
        if here is not None and concrete_bool(here) is False:
            return name
    return None


def check_named_finite(named: Sequence[tuple[str, Array]]) -> None:
    """``ValueError`` naming the first ``(name, array)`` with NaN or Inf (:func:`first_not_finite`)."""
    bad = first_not_finite(named)
    if bad is not None:
        raise NonFiniteError(f"{bad} contains NaN or Inf")


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


def _device_of(a: Array) -> Any:
    """The device of an array (a plain attribute read for registered types)."""
    return a.device if type(a) in _PLAIN_DEVICE else _device(a)


def _differ(a: Array, b: Array) -> bool:
    """Whether two arrays sit on different devices (unknown devices, e.g. of traced values, never differ)."""
    da, db = _device_of(a), _device_of(b)
    return da is not None and db is not None and da != db


def check_params(params: Sequence[Array], what: str = "params") -> Any:
    """One library, one floating dtype (float32 or float64) and one device for every array; returns the namespace.

    Raises:
        TypeError: libraries, dtypes or devices differ, or an unsupported dtype (float16, bfloat16, ints).
        ValueError: no arrays.
    """
    if len(params) == 0:
        raise ValueError(f"{what} is empty; pass the model's parameter arrays")
    xp = namespace(*params, what=what)
    first = params[0]
    if not any(first.dtype == getattr(xp, d) for d in SUPPORTED_DTYPES):
        raise TypeError(f"{what}[0] has dtype {first.dtype}; curvcore supports {' and '.join(SUPPORTED_DTYPES)} "
                        "(cast the model, e.g. module.float() or params in float32)")
    for i, p in enumerate(params):
        if p.dtype != first.dtype:
            raise TypeError(f"{what}[{i}] is {p.dtype} but {what}[0] is {first.dtype}")
        if _differ(p, first):
            raise ValueError(f"{what}[{i}] is on {_device(p)} but {what}[0] is on {_device(first)}")
    return xp


def check_params_and_x(params: Sequence[Array], x: Array, validate: bool = True) -> Any:
    """Checks every adapter shares: one library, dtype and device for params (float32/float64), a
    floating ``x`` in that dtype on that device, and (when ``validate``) no NaN/Inf. Returns the namespace.

    ``x`` must be a batch ``(B, ...)`` with ``B >= 1``.

    Raises:
        TypeError: libraries or dtypes differ, or an unsupported dtype.
        ValueError: not a batch or an empty one, devices differ or values are not finite.
    """
    check_params(params)
    xp = namespace(*params, x, what="params and data")
    if x.ndim < 1:
        raise ValueError(f"x must be a batch (B, ...) with the samples on axis 0, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)} (B = 0); a batch needs at least one sample")
    if xp.isdtype(x.dtype, "real floating") and x.dtype != params[0].dtype:
        raise TypeError(
            f"dtype mismatch: params are {params[0].dtype} but x is {x.dtype}; cast the data to the params' dtype"
        )
    if _differ(x, params[0]):
        raise ValueError(f"device mismatch: params are on {_device(params[0])} but x is on {_device(x)}; "
                         "move the data to the params' device")
    if validate:
        check_named_finite([("x", x), *((f"params[{i}]", p) for i, p in enumerate(params))])
    return xp


def check_batch(params: Sequence[Array], x: Array, y: Array | None = None, validate: bool = True) -> Any:
    """Validate a batch against params; return their common namespace.

    Checks: same array library and device, ``x`` of shape ``(B, ...)`` with
    ``B >= 1`` (a floating ``x`` must have the params' dtype), ``y`` with ``B``
    rows, and (when ``validate``) no NaN/Inf in ``x``, ``y`` or params, in one fused reduction. Inside a
    method step the step's ``validate`` decides (:func:`value_checks_on`), so
    a model called by a ``validate=False`` step does not raise on values.

    Raises:
        TypeError: libraries or dtypes differ.
        ValueError: shapes or devices differ, an empty batch, or values are not finite.
    """
    validate = value_checks_on(validate)
    if y is not None:
        namespace(*params, x, y, what="params and data")
    xp = check_params_and_x(params, x, validate=False)
    if y is not None and (y.ndim == 0 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must have one row per sample: x has {x.shape[0]}, y has shape {tuple(y.shape)}")
    if y is not None and _differ(y, x):
        raise ValueError(f"device mismatch: x is on {_device(x)} but y is on {_device(y)}")
    if validate:  # one fused reduction over the batch and the params
        check_named_finite([("x", x), *([("y", y)] if y is not None else []),
                            *((f"params[{i}]", p) for i, p in enumerate(params))])
    return xp
