"""The methods, one module each, and their registry.

Every public module in this package registers its method(s) at import with
:func:`register`; importing the package imports them all, so a new method
module is picked up by ``curvcore compare``, the equivalence suite and the
benchmarks without further edits.
"""

import importlib
import pkgutil

from ._base import LayerwiseMethod, Method, init_state
from ._registry import REGISTRY, MethodSpec, get, names, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def __getattr__(name: str):
    """Method classes by class name (``curvcore.methods.CurveBall``)."""
    for spec in REGISTRY.values():
        if spec.cls.__name__ == name:
            return spec.cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["REGISTRY", "LayerwiseMethod", "Method", "MethodSpec", "get", "init_state", "names", "register"]
