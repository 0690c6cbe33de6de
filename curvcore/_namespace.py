"""A cached ``array_namespace`` (the namespace depends only on the types of the arrays), and
:func:`library_of`, the library an array belongs to.

``array_api_compat.array_namespace`` inspects its arguments on every call
(tens of microseconds); a step calls it dozens of times, which dominated the
overhead of small steps. The cache key is the tuple of argument types.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace as _lookup

_CACHE: dict[tuple[type, ...], Any] = {}


def array_namespace(*arrays: Any) -> Any:
    """``array_api_compat.array_namespace(*arrays)``, cached by the arrays' types."""
    key = tuple(type(a) for a in arrays)
    xp = _CACHE.get(key)
    if xp is None:
        xp = _CACHE[key] = _lookup(*arrays)
    return xp


_LIBRARY_ALIASES = {"builtins": "python", "jaxlib": "jax"}


def library_of(array: Any) -> str:
    """The library of an array's type, by its top-level module: ``"numpy"``, ``"torch"``, ``"jax"``
    (also for ``jaxlib`` arrays), ``"cupy"``, ``"array_api_strict"``; ``"python"`` for builtins."""
    mod = type(array).__module__.split(".")[0]
    return _LIBRARY_ALIASES.get(mod, mod)
