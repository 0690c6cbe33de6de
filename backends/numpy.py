"""NumPy backend: the array-API MLP (:class:`curvcore.backends.ArrayAPIMLP`) over ``array_api_compat.numpy``.

Host arrays only: ``device`` is ignored and :func:`synchronize` has nothing to wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat.numpy as xp
import numpy as np

from ._mlp import ArrayAPIMLP

__all__ = ["build_mlp", "from_numpy", "namespace", "probe", "synchronize", "to_numpy"]


def probe() -> None:
    """NumPy always runs."""


def namespace() -> Any:
    """``array_api_compat.numpy``."""
    return xp


def from_numpy(a: np.ndarray, device: Any = None) -> np.ndarray:
    """A copy of ``a``."""
    return np.array(a, copy=True)


def to_numpy(a: Any) -> np.ndarray:
    """A copy of ``a``."""
    return np.array(a, copy=True)


def synchronize(tree: Any = None) -> Any:
    """Nothing to wait for; returns ``tree``."""
    return tree


def build_mlp(sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
              device: Any = None) -> tuple[ArrayAPIMLP, list[np.ndarray]]:
    """The array-API MLP holding copies of ``params_np``."""
    return ArrayAPIMLP(sizes, activation, xp=xp), [from_numpy(p) for p in params_np]
