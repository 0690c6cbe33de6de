"""The methods, one module each, their registry, and the public surface for writing a method.

Every public module in this package registers its method(s) at import with
:func:`register`; importing the package imports them all, so a new method
module is picked up by ``curvcore compare``, the equivalence suite and the
benchmarks without further edits. A method subclasses :class:`Method` (or
:class:`LayerwiseMethod`) and needs nothing private: the helpers of a step
(:func:`value_and_grad`, :func:`step_info`, :func:`zero_count`,
:func:`check_grads_finite`, the hyperparameter checks ``check_*``) are
exported here, the vector algebra is :mod:`curvcore.tree_algebra`, the
curvature products :mod:`curvcore.curvature`, and the model and loss
protocols :mod:`curvcore.protocol`.
"""

import importlib
import pkgutil

from .._checks import check_choice, check_int, check_interval, check_nonnegative, check_positive
from ._base import (
    LayerwiseMethod, Method, check_flag, check_grads_finite, count_as_float, init_state, loss_and_records,
    n_preconditioned, step_info, value_and_grad, zero_count,
)
from ._registry import REGISTRY, MethodSpec, get, names, register, unregister

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def __getattr__(name: str):
    """Method classes by class name (``curvcore.methods.CurveBall``)."""
    for spec in REGISTRY.values():
        if spec.cls.__name__ == name:
            return spec.cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # the registry
    "REGISTRY", "MethodSpec", "get", "names", "register", "unregister",
    # writing a method (see docs/index.md): the base classes and the helpers a step uses
    "LayerwiseMethod", "Method", "check_choice", "check_flag", "check_grads_finite", "check_int", "check_interval",
    "check_nonnegative", "check_positive", "count_as_float", "init_state", "loss_and_records", "n_preconditioned",
    "step_info", "value_and_grad", "zero_count",
]
