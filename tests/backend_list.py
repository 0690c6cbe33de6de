"""Which backends the tests run on: the one place test files get their backend lists from.

A backend that is not available here is skipped with the reason, unless
``CURVCORE_EXPECT_BACKENDS`` (comma-separated, set by ``.ci/run``) names it: then its
tests are not skipped and fail, because a backend that silently turns into skips is a
defect (``test_fail_loudly.test_expected_backend_is_available`` says why it is missing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest

import curvcore as cc

ALL = tuple(cc.backends.ALL)
ARRAY_API = ("numpy", "array_api_strict", "cupy")  # the array-API MLPs: no autodiff
EAGER = ("numpy", "array_api_strict", "torch", "cupy")  # op by op; JAX's eager compilations make it slow
LOCAL = ("numpy", "array_api_strict", "torch")  # CPU backends fast on tiny problems


def expected() -> list[str]:
    """The backends ``CURVCORE_EXPECT_BACKENDS`` says must load (empty when it is not set)."""
    return [n.strip() for n in os.environ.get("CURVCORE_EXPECT_BACKENDS", "").split(",") if n.strip()]


def skipped(name: str) -> bool:
    """True when ``name`` is neither available nor expected (its tests may skip)."""
    return not cc.backends.available(name) and name not in expected()


def reason(name: str) -> str:
    """Why ``name``'s tests skip here."""
    if name == "cupy":
        return "cupy is not installed or no CUDA device is present"
    return f"backend {name!r} not available here"


def needs(name: str) -> pytest.MarkDecorator:
    """A mark that skips a test needing ``name`` where it is missing and not expected."""
    return pytest.mark.skipif(skipped(name), reason=reason(name))


def param(name: str, *values, id: str | None = None, slow: bool = False, skip: str | None = None):
    """A pytest param (values default to ``(name,)``) for backend ``name``.

    Args:
        name: the backend.
        *values: the param's values when they are more than the backend name.
        id: the param id (default ``name``).
        slow: mark it ``pytest.mark.slow``.
        skip: a reason to always skip it.

    Returns:
        ``pytest.param`` skipped where ``name`` is missing (see ``needs``).
    """
    marks = [needs(name)] + ([pytest.mark.slow] if slow else [])
    if skip:
        marks.append(pytest.mark.skip(reason=skip))
    return pytest.param(*(values or (name,)), id=id or name, marks=marks)


def params(names: Iterable[str] = ALL, slow: Iterable[str] = (), skip: dict | None = None) -> list:
    """``param`` for each of ``names``; those in ``slow`` are slow-marked, ``skip`` maps names to skip reasons."""
    slow, skip = set(slow), skip or {}
    return [param(n, slow=n in slow, skip=skip.get(n)) for n in names]


def present(names: Iterable[str]) -> list[str]:
    """The names that are available or expected (for loops inside one test)."""
    return [n for n in names if not skipped(n)]


def require(name: str) -> None:
    """Inside a test: skip it when ``name`` is missing and not expected."""
    if skipped(name):
        pytest.skip(reason(name))


# the K-FAC/ACP reference checks: full grids on numpy/array_api_strict; on torch/jax/cupy (eager op-by-op
# dispatch, ~10x slower on these tiny problems) slow-marked; eager JAX compiles every primitive for every
# new shape (~10 s per test), and C8 already proves JAX equal to NumPy to 1e-10
SLOW_BEYOND_ARRAY_API = tuple(n for n in ALL if n not in ("numpy", "array_api_strict"))
REFERENCE = params(slow=SLOW_BEYOND_ARRAY_API,
                   skip={"jax": "jax: covered by the cross-backend checks (C8) against NumPy"})
ALL_SLOW_BEYOND_ARRAY_API = params(slow=SLOW_BEYOND_ARRAY_API)
