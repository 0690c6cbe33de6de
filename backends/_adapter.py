"""What every backend module provides, and the small helpers they share.

A backend is one module of this package named after its array library
(``numpy``, ``array_api_strict``, ``torch``, ``jax``, ``cupy``) with the
functions of :class:`Adapter`; :mod:`curvcore.backends` only dispatches over
them. Importing the module imports its framework: an ``ImportError`` (a
missing framework) or :class:`Unavailable` (installed but unusable, e.g. no
CUDA device) means the backend is not available here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Adapter", "Unavailable", "parse_device"]


class Unavailable(ImportError):
    """The backend's framework is installed but cannot run here (no usable device); not a bug."""


class Adapter(Protocol):
    """The interface of a backend module (a module, so these are its functions)."""

    def probe(self) -> None:
        """Raise :class:`Unavailable` when the imported framework cannot run here (e.g. no GPU)."""

    def namespace(self) -> Any:
        """The array-API namespace of the backend's arrays."""

    def from_numpy(self, a: np.ndarray, device: Any = None) -> Any:
        """A copy of a NumPy array (dtype kept) as a backend array on ``device`` (``None``: the default)."""

    def to_numpy(self, a: Any) -> np.ndarray:
        """A host NumPy copy of a backend array."""

    def synchronize(self, tree: Any = None) -> Any:
        """Wait for the device work producing ``tree`` (any nesting of lists/tuples/dicts); return ``tree``."""

    def build_mlp(self, sizes: Sequence[int], activation: str, params_np: Sequence[np.ndarray],
                  device: Any = None) -> tuple[Any, list[Any]]:
        """``(model, params)``: the MLP of ``sizes`` as a native model holding ``params_np``."""


def parse_device(device: Any) -> tuple[str, int]:
    """``(kind, index)`` of a device written as ``"cuda"``, ``"cuda:1"``, ``"gpu:0"``, ``"cpu"`` or a CUDA index."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda", device
    kind, _, index = str(device).partition(":")
    try:
        return kind, int(index or 0)
    except ValueError:
        raise ValueError(f"a device is written like 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
