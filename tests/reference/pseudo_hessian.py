"""Partition pseudo-Hessian references (spec pseudo_hessian.md): group directions and the cubic model."""

from __future__ import annotations

import numpy as np

import curvcore as cc
from reference.mlp import flatten


def group_dirs(params, groups, u=None):
    """The u^(s) as NumPy vectors, built independently of the method (from tensor labels / scalars)."""
    u = [np.asarray(cc.backends.to_numpy(p)) for p in (u if u is not None else params)]
    n = len(u)
    if groups == "scalar":
        vec = flatten(u)
        return np.diag(vec)
    labels = {"tensor": list(range(n)), "layer": [i // 2 for i in range(n)], "wb": [i % 2 for i in range(n)],
              "one": [0] * n}.get(groups if isinstance(groups, str) else None, groups)
    order = list(dict.fromkeys(labels))
    cols = []
    for lab in order:
        cols.append(flatten([ui if l == lab else np.zeros_like(ui) for ui, l in zip(u, labels)]))
    return np.stack(cols, axis=1)


def cubic_model(e, g, H, d, lam):
    return -g @ e + 0.5 * e @ H @ e + lam / 6 * np.linalg.norm(d * e) ** 3


def cubic_model_grad(e, g, H, d, lam):
    n = np.linalg.norm(d * e)
    return -g + H @ e + lam / 2 * n * d * d * e
