"""Host random numbers for the methods that sample (K-FAC's Monte-Carlo Fisher).

Draws must be the same on every backend, so they are made on the host and
converted. The core imports no array library of its own for this:
:mod:`curvcore.backends` registers NumPy's ``default_rng`` here at import, and
:func:`host_generator` returns one (a ``numpy.random.Generator``: ``random``,
``standard_normal``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_FACTORY: list[Callable[[Sequence[int]], Any]] = []


def register_host_generator(factory: Callable[[Sequence[int]], Any]) -> None:
    """Set the factory ``seed_sequence -> generator`` (NumPy's ``default_rng``)."""
    _FACTORY[:] = [factory]


def host_generator(seed: Sequence[int]) -> Any:
    """A host generator seeded with the integer sequence ``seed`` (e.g. ``[seed, step]``).

    Raises:
        RuntimeError: no factory is registered (``curvcore.backends`` was not imported).
    """
    if not _FACTORY:  # pragma: no cover - curvcore/__init__ imports the backends
        raise RuntimeError("no host random generator is registered; import curvcore.backends")
    return _FACTORY[0](list(seed))
