"""Control flow that stays traceable.

A method branches on a step counter (CurveBall's lambda rule, ACP's refresh).
With concrete values this is a plain ``if``; inside ``jax.jit`` the counter is
abstract, and the JAX adapter registers ``jax.lax.cond`` here. The core never
imports a framework: backends register their primitive with
:func:`register_cond` (:func:`unregister_cond` removes one). Loops with a data-dependent exit (Armijo backtracking)
go through :func:`while_loop` the same way (:func:`register_while_loop`; the
JAX adapter registers ``jax.lax.while_loop``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._checks import concrete_bool

_CONDS: list[tuple[Callable[[Any], bool], Callable[..., Any]]] = []
_LOOPS: list[tuple[Callable[[Any], bool], Callable[..., Any]]] = []


def register_cond(applies: Callable[[Any], bool], cond_fn: Callable[..., Any]) -> None:
    """Register ``cond_fn(pred, true_fn, false_fn, *operands)`` for predicates where ``applies(pred)``."""
    _CONDS.append((applies, cond_fn))


def unregister_cond(cond_fn: Callable[..., Any]) -> None:
    """Remove every registration of ``cond_fn`` (made by :func:`register_cond`); unknown ones are ignored."""
    _CONDS[:] = [entry for entry in _CONDS if entry[1] is not cond_fn]


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


def register_while_loop(applies: Callable[[Any], bool], loop_fn: Callable[..., Any]) -> None:
    """Register ``loop_fn(cond_fn, body_fn, init)`` for loop predicates where ``applies(pred)``."""
    _LOOPS.append((applies, loop_fn))


def unregister_while_loop(loop_fn: Callable[..., Any]) -> None:
    """Remove every registration of ``loop_fn`` (made by :func:`register_while_loop`)."""
    _LOOPS[:] = [entry for entry in _LOOPS if entry[1] is not loop_fn]


def while_loop(cond_fn: Callable[[Any], Any], body_fn: Callable[[Any], Any], init: Any) -> Any:
    """``val = init; while cond_fn(val): val = body_fn(val)``, also for a traced predicate.

    With concrete values this is a plain Python loop (``body_fn`` runs only
    while ``cond_fn`` holds). When ``cond_fn(val)`` is abstract (inside
    ``jax.jit``), the rest of the loop is handed, from the current ``val``, to
    the registered primitive (``jax.lax.while_loop``): ``body_fn`` must then
    return the structure, shapes and dtypes of ``val``.
    """
    val = init
    while True:
        pred = cond_fn(val)
        value = concrete_bool(pred)
        if value is None:
            for applies, loop_fn in _LOOPS:
                if applies(pred):
                    return loop_fn(cond_fn, body_fn, val)
            raise TypeError(f"cannot loop on an abstract predicate of type {type(pred).__name__}")
        if not value:
            return val
        val = body_fn(val)
