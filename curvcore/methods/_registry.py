"""The method registry: name -> class, with the settings the CLI and tests use.

Register a method once and it appears in ``curvcore compare``, the
cross-backend equivalence suite and the benchmarks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: the registry key (``"curveball"``).
        cls: the method class.
        compare: constructor kwargs for ``curvcore compare`` on digits.
        test: constructor kwargs for the equivalence suite (small nets, a few steps).
        losses: losses the method supports (``"mse"``, ``"ce"``).
        description: one line for ``curvcore compare --list``.
        tune: the grid ``curvcore compare --tune`` searches, ``{hyperparameter: [values]}``
            (at most 12 points in all); the compare settings fill the rest.
    """

    name: str
    cls: type
    compare: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    losses: tuple[str, ...] = ("mse", "ce")
    description: str = ""
    tune: dict[str, list] = field(default_factory=dict)

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the tuning grid, as constructor overrides (``[{}]`` without a grid)."""
        keys = list(self.tune)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.tune[k] for k in keys))]

    def make(self, **overrides: Any) -> Any:
        """An instance with the compare settings, updated by ``overrides``."""
        return self.cls(**{**self.compare, **overrides})

    def make_test(self, **overrides: Any) -> Any:
        """An instance with the test settings, updated by ``overrides``."""
        return self.cls(**{**self.test, **overrides})


REGISTRY: dict[str, MethodSpec] = {}


MAX_GRID = 12


def register(name: str, cls: type, *, compare: dict | None = None, test: dict | None = None,
             losses: tuple[str, ...] = ("mse", "ce"), description: str = "",
             tune: dict[str, list] | None = None) -> MethodSpec:
    """Add a method to the registry (idempotent for the same class).

    Raises:
        ValueError: the name is taken by another class, or the tuning grid has more than 12 points.
    """
    if name in REGISTRY and REGISTRY[name].cls is not cls:
        raise ValueError(f"method name {name!r} is already registered for {REGISTRY[name].cls.__name__}")
    spec = MethodSpec(name, cls, dict(compare or {}), dict(test or {}), tuple(losses), description,
                      {k: list(v) for k, v in (tune or {}).items()})
    if len(spec.grid()) > MAX_GRID:
        raise ValueError(f"the tuning grid of {name!r} has {len(spec.grid())} points; at most {MAX_GRID}")
    REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method from the registry (one registered for a session or a test); unknown names are ignored."""
    REGISTRY.pop(name, None)


def get(name: str) -> MethodSpec:
    """The spec of a registered method; ``ValueError`` lists the names on a miss."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(REGISTRY)}") from None


def names() -> list[str]:
    """Registered method names, in registration order."""
    return list(REGISTRY)
