"""Relative errors and the assertion the reference checks use (scale-relative, with a diagnostic)."""

from __future__ import annotations

import numpy as np


def rel(a, b) -> float:
    """``max|a - b| / max|b|`` (max-abs relative error)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


def report(a, b, rtol: float, name: str = "value") -> str:
    """A diagnostic for a failed comparison (after curvlinops' allclose_report)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = np.abs(a - b)
    i = np.unravel_index(np.argmax(diff), diff.shape) if diff.ndim else ()
    return (f"{name}: rel={rel(a, b):.3e} > rtol={rtol:.1e}; worst entry {i}: got {a[i]!r}, "
            f"expected {b[i]!r}; max|expected|={np.max(np.abs(b)):.3e}")


def assert_rel(a, b, rtol: float, name: str = "value") -> None:
    """Assert ``rel(a, b) <= rtol`` with a diagnostic."""
    assert rel(a, b) <= rtol, report(a, b, rtol, name)


def rel_norm(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def rel_err(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def residual(H, d, g):
    return np.linalg.norm(H @ d - g) / np.linalg.norm(g)
