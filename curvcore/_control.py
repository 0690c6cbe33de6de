"""Control flow that stays traceable.

A method branches on a step counter (CurveBall's lambda rule, ACP's refresh).
With concrete values this is a plain ``if``; inside ``jax.jit`` the counter is
abstract, and the JAX adapter registers ``jax.lax.cond`` here. The core never
imports a framework: backends register their primitive with
:func:`register_cond`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._checks import concrete_bool

_CONDS: list[tuple[Callable[[Any], bool], Callable[..., Any]]] = []


def register_cond(applies: Callable[[Any], bool], cond_fn: Callable[..., Any]) -> None:
    """Register ``cond_fn(pred, true_fn, false_fn, *operands)`` for predicates where ``applies(pred)``."""
    _CONDS.append((applies, cond_fn))


def cond(pred: Any, true_fn: Callable[..., Any], false_fn: Callable[..., Any], *operands: Any) -> Any:
    """``true_fn(*operands) if pred else false_fn(*operands)``, also for a traced ``pred``.

    Both branches must return the same structure of arrays (shapes and dtypes),
    as ``jax.lax.cond`` requires.
    """
    value = concrete_bool(pred)
    if value is not None:
        return true_fn(*operands) if value else false_fn(*operands)
    for applies, cond_fn in _CONDS:
        if applies(pred):
            return cond_fn(pred, true_fn, false_fn, *operands)
    raise TypeError(f"cannot branch on an abstract predicate of type {type(pred).__name__}")
