"""``array_api_strict`` backend: the array-API MLP on the standard's reference library.

It checks that the core uses nothing outside the array API standard. Host
arrays only: ``device`` is ignored and :func:`synchronize` has nothing to wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_strict as xp
import numpy as np

from curvcore._checks import register_quiet

from ._mlp import ArrayAPIMLP

__all__ = ["build_mlp", "from_numpy", "namespace", "probe", "synchronize", "to_numpy"]


def probe() -> None:
    """``array_api_strict`` runs wherever it imports."""


def namespace() -> Any:
    """The ``array_api_strict`` module itself."""
    return xp


def from_numpy(a: np.ndarray, device: Any = None) -> Any:
    """An ``array_api_strict`` copy of ``a``."""
    return xp.asarray(np.array(a, copy=True))


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy (through DLPack)."""
    return np.from_dlpack(a).copy()


def synchronize(tree: Any = None) -> Any:
    """Nothing to wait for; returns ``tree``."""
    return tree


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[ArrayAPIMLP, list[Any]]:
    """The array-API MLP holding ``params_np`` as ``array_api_strict`` arrays."""
    return ArrayAPIMLP(sizes, activation, xp=xp), [from_numpy(p) for p in params_np]


register_quiet(type(xp.asarray(0.0)), lambda: np.errstate(all="ignore"))  # NumPy underneath
