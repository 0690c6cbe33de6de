"""Conformance kit: certify a model adapter, compare results across backends.

* :func:`check_model` runs one model through the protocol checks every
  curvcore adapter must pass (JVP against central differences, the adjoint
  identity, ``linearize`` against both, layer records against the gradient,
  jets, dtype/device, purity).
  Run it on a new adapter (MLX, TensorFlow, ...) before trusting any method
  on it.
* :func:`assert_allclose_across` compares pytrees of results (params, method
  states, ``info`` dicts) computed on different backends, with a readable
  report of the leaves that differ.

Framework-free: arrays are created with the model's ``xp`` and read back with
:func:`curvcore.backends.to_numpy`. NumPy is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from array_api_compat import device as _device

Array = Any

__all__ = ["assert_allclose_across", "check_model", "tree_leaves_with_paths"]


# ---------------------------------------------------------------------------
# check_model
# ---------------------------------------------------------------------------


class _Checker:
    """Collects named comparisons; ``failures`` holds the diagnostics."""

    def __init__(self, rtol: float, atol: float, dtype: Any, dev: Any):
        self.rtol, self.atol, self.dtype, self.dev = rtol, atol, dtype, dev
        self.errors: dict[str, float] = {}
        self.failures: list[str] = []

    def close(self, name: str, got: Any, want: Any, floor: float = 0.0, rtol: float | None = None) -> None:
        """``||got - want|| <= atol + floor + rtol ||want||`` (2-norms over all entries)."""
        import numpy as np

        rtol = self.rtol if rtol is None else rtol
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            self.failures.append(f"{name}: shape {got.shape}, expected {want.shape}")
            return
        diff, scale = float(np.linalg.norm(got - want)), float(np.linalg.norm(want))
        self.errors[name] = diff / scale if scale > 0 else diff
        if not diff <= self.atol + floor + rtol * scale:  # also catches NaN
            worst = np.unravel_index(int(np.argmax(np.abs(got - want))), got.shape) if got.size else ()
            self.failures.append(
                f"{name}: ||diff|| = {diff:.3e}, ||expected|| = {scale:.3e}, relative {diff / max(scale, 1e-300):.3e} "
                f"> rtol {rtol:.1e} (atol {self.atol:.1e}, noise floor {floor:.1e}); worst entry {worst}: "
                f"got {got[worst] if got.size else None!r}, expected {want[worst] if want.size else None!r}"
            )

    def kind(self, name: str, arrays: Sequence[Array]) -> None:
        """Every array has the params' dtype and device."""
        for i, a in enumerate(arrays):
            if a.dtype != self.dtype:
                self.failures.append(f"{name}[{i}]: dtype {a.dtype}, expected the params' {self.dtype}")
            if _device(a) != self.dev:
                self.failures.append(f"{name}[{i}]: device {_device(a)}, expected the params' {self.dev}")


def _norm(a: Any) -> float:
    import numpy as np

    return float(np.linalg.norm(np.asarray(a, dtype=np.float64)))


def check_model(model: Any, params: Sequence[Array], x: Array, y: Array | None = None, loss: Any = None, *,
                rtol: float | None = None, atol: float = 0.0, seed: int = 0,
                fd_step: float | None = None, skip: Sequence[str] = ()) -> dict[str, float]:
    """Check a protocol model on one batch; raise ``AssertionError`` listing every failure.

    Checks (``u``, ``v`` random with ``seed``):

    * ``forward`` is deterministic, 2-d with one row per sample, in the
      params' dtype and device;
    * ``jvp``: the primal equals ``forward`` and ``J u`` matches central
      differences ``(f(p + h u) - f(p - h u)) / 2h``;
    * ``vjp``: ``J^T v`` has the params' shapes and the adjoint identity
      ``<v, J u> = <J^T v, u>`` holds;
    * ``linearize`` (if present): its primal equals ``forward``, its
      ``jvp_fn(u)`` equals ``jvp``'s ``J u`` and its ``pullback(v)`` equals
      ``vjp``'s ``J^T v`` (every tensor: a dropped bias tangent fails);
    * ``layers`` (if the model has it; params ``[W1, b1, ...]``): ``g^T a``
      and ``sum_batch g`` reproduce ``J^T`` of the cotangent,
      ``z = a W^T + b``, ``h`` is the next layer's input (the output for the
      last layer), back-propagation ``g_k = (g_{k+1} W_{k+1}) * dact_k``,
      and an array cotangent gives the same records as a callable one;
    * ``jet`` (if present): order 1 equals ``(f, J u)``; order 2 matches
      central differences of ``jvp``; order 3 (if supported) central
      differences of the order-2 jet;
    * the params and ``x`` are not mutated.

    Exact identities and finite differences use the same ``rtol``; finite
    differences also get a round-off floor ``10 eps ||f|| / h``.

    Args:
        model: the protocol model (``forward``, ``jvp``, ``vjp``; optional
            ``linearize``, ``layers`` and ``jet``; attribute ``xp``, else the
            namespace of ``params``).
        params: its params list.
        x: a batch, ``(B, n_in)``.
        y: targets; with ``loss`` the layer check uses the loss gradient as
            the cotangent (else a random one).
        loss: a :mod:`curvcore.losses` instance or name; default
            cross-entropy for integer ``y``, MSE otherwise.
        rtol: relative tolerance; default ``1e-6`` for float64, ``2e-3``
            for lower precision (finite differences lose digits there).
        atol: absolute slack added to every check.
        seed: seed of the random directions.
        fd_step: difference step ``h``; default ``eps**(1/3)`` of the dtype
            (about ``6e-6`` in float64).
        skip: optional primitives not to check, e.g. ``("layers",)`` for a
            model whose ``layers`` rejects its (non-dense) layers.

    Returns:
        ``{check name: relative error}`` for the comparisons made.

    Raises:
        AssertionError: one line per failed check.
    """
    import numpy as np

    from ._namespace import array_namespace
    from .backends import to_numpy
    from .losses import get as get_loss

    xp = getattr(model, "xp", None) or array_namespace(*params)  # ``xp`` is an optional attribute of a model
    snapshot, x_before = [to_numpy(p) for p in params], to_numpy(x)
    np_dtype = snapshot[0].dtype
    eps = float(np.finfo(np_dtype).eps)
    rtol = (1e-6 if eps < 1e-10 else 2e-3) if rtol is None else rtol
    h = eps ** (1 / 3) if fd_step is None else fd_step
    chk = _Checker(rtol, atol, params[0].dtype, _device(params[0]))
    rng = np.random.default_rng(seed)

    def put(a: Any) -> Array:
        return xp.asarray(np.asarray(a, dtype=np_dtype), dtype=params[0].dtype, device=_device(params[0]))

    def along(t: float, u: Sequence[Array]) -> list[Array]:
        return [put(p + t * to_numpy(ui)) for p, ui in zip(snapshot, u)]

    u = [put(rng.standard_normal(p.shape)) for p in snapshot]
    out = model.forward(params, x)
    chk.kind("forward", [out])
    o = to_numpy(out)
    if o.ndim != 2 or o.shape[0] != x_before.shape[0]:
        chk.failures.append(f"forward: output shape {o.shape}, expected (B={x_before.shape[0]}, C)")
    chk.close("forward twice (hidden state?)", to_numpy(model.forward(params, x)), o)
    floor = 10 * eps * _norm(o) / h

    # jvp against central differences
    f0, Ju = model.jvp(params, x, u)
    chk.kind("jvp", [f0, Ju])
    chk.close("jvp primal == forward", to_numpy(f0), o)
    fd = (to_numpy(model.forward(along(h, u), x)) - to_numpy(model.forward(along(-h, u), x))) / (2 * h)
    Ju_np = to_numpy(Ju)
    chk.close("jvp vs central differences", Ju_np, fd, floor=floor)

    # vjp: adjoint identity
    v_np = rng.standard_normal(o.shape)
    f1, pullback = model.vjp(params, x)
    chk.close("vjp primal == forward", to_numpy(f1), o)
    JTv = pullback(put(v_np))
    chk.kind("vjp pullback", JTv)
    JTv_np = [to_numpy(t) for t in JTv]
    if [t.shape for t in JTv_np] != [p.shape for p in snapshot]:
        chk.failures.append(f"vjp: pullback shapes {[t.shape for t in JTv_np]}, expected {[p.shape for p in snapshot]}")
    else:
        u_np = [to_numpy(t) for t in u]
        lhs = float(np.sum(v_np * Ju_np))
        rhs = float(sum(np.sum(a * b) for a, b in zip(JTv_np, u_np)))
        scale = _norm(v_np) * _norm(Ju_np) + math.sqrt(sum(_norm(a) ** 2 for a in JTv_np)) * math.sqrt(
            sum(_norm(b) ** 2 for b in u_np))
        chk.close("adjoint <v, Ju> = <J^T v, u>", [lhs / scale], [rhs / scale], floor=100 * eps)
        if callable(getattr(model, "linearize", None)) and "linearize" not in skip:
            _check_linearize(chk, model, params, x, u, put(v_np), o, Ju_np, JTv_np)

    if callable(getattr(model, "layers", None)) and "layers" not in skip:
        _check_layers(chk, model, params, x, y, loss, out, snapshot, eps, rng, put, get_loss)
    if callable(getattr(model, "jet", None)) and "jet" not in skip:
        _check_jet(chk, model, params, x, u, o, Ju_np, h, eps, along)

    for i, (before, p) in enumerate(zip(snapshot, params)):
        if not np.array_equal(before, to_numpy(p), equal_nan=True):
            chk.failures.append(f"params[{i}] was mutated")
    if not np.array_equal(x_before, to_numpy(x), equal_nan=True):
        chk.failures.append("x was mutated")
    if chk.failures:
        raise AssertionError(f"{type(model).__name__} fails the curvcore protocol ({len(chk.failures)} checks, "
                             f"rtol {rtol:.1e}):\n  " + "\n  ".join(chk.failures))
    return chk.errors


def _check_linearize(chk: _Checker, model: Any, params: Sequence[Array], x: Array, u: list, v: Array, o: Any,
                     Ju: Any, JTv: list) -> None:
    """``linearize``: primal, ``jvp_fn(u)`` and ``pullback(v)`` against ``forward``, ``jvp`` and ``vjp``."""
    from .backends import to_numpy

    f, jvp_fn, pullback = model.linearize(params, x)
    chk.kind("linearize", [f])
    chk.close("linearize primal == forward", to_numpy(f), o)
    chk.close("linearize jvp_fn(u) == jvp", to_numpy(jvp_fn(u)), Ju)
    pulled = [to_numpy(t) for t in pullback(v)]
    if [t.shape for t in pulled] != [t.shape for t in JTv]:
        chk.failures.append(f"linearize: pullback shapes {[t.shape for t in pulled]}, "
                            f"expected {[t.shape for t in JTv]}")
        return
    total = math.sqrt(sum(_norm(b) ** 2 for b in JTv))  # each tensor to the scale of the whole J^T v
    for i, (a, b) in enumerate(zip(pulled, JTv)):
        chk.close(f"linearize pullback(v)[{i}] == vjp", a, b, floor=chk.rtol * total)


def _check_layers(chk: _Checker, model: Any, params: Sequence[Array], x: Array, y: Any, loss: Any, out: Array,
                  snapshot: list, eps: float, rng: Any, put: Callable, get_loss: Callable) -> None:
    """Layer records against the pullback, the layer equations and back-propagation."""
    import numpy as np

    from .backends import to_numpy

    if y is not None:
        if loss is None:
            loss = "ce" if np.issubdtype(to_numpy(y).dtype, np.integer) else "mse"
        loss = get_loss(loss)

        def cot(o: Array) -> Array:
            return loss.grad(o, y)
    else:
        c = put(rng.standard_normal(tuple(out.shape)))

        def cot(o: Array) -> Array:
            return c

    recs = model.layers(params, x, cot)
    if 2 * len(recs) != len(snapshot):
        chk.failures.append(f"layers: {len(recs)} records for {len(snapshot)} params (expected [W1, b1, ...] pairs)")
        return
    _, pullback = model.vjp(params, x)
    grads = [to_numpy(t) for t in pullback(cot(out))]
    R = [{k: to_numpy(getattr(r, k)) for k in ("a", "z", "dact", "g", "h")} for r in recs]
    n = len(recs)
    for k, r in enumerate(recs):
        chk.kind(f"layers[{k}]", list(r))
        W, b = snapshot[2 * k], snapshot[2 * k + 1]
        a, z, g = R[k]["a"], R[k]["z"], R[k]["g"]
        scale = _norm(a) * _norm(W) + _norm(b) * math.sqrt(a.shape[0])
        chk.close(f"layers[{k}].z == a W^T + b", z, a @ W.T + b, floor=100 * eps * scale)
        chk.close(f"layers[{k}]: g^T a == dW", g.T @ a, grads[2 * k], floor=100 * eps * _norm(g) * _norm(a))
        chk.close(f"layers[{k}]: sum g == db", g.sum(0), grads[2 * k + 1], floor=100 * eps * _norm(g))
        if k + 1 < n:
            chk.close(f"layers[{k}].h == layers[{k + 1}].a", R[k]["h"], R[k + 1]["a"])
            back = (R[k + 1]["g"] @ snapshot[2 * k + 2]) * R[k]["dact"]
            chk.close(f"layers[{k}].g == (g_next W_next) * dact", g, back,
                      floor=100 * eps * _norm(R[k + 1]["g"]) * _norm(snapshot[2 * k + 2]) * float(
                          np.max(np.abs(R[k]["dact"]), initial=0.0)))
    chk.close("layers[-1].h == forward", R[-1]["h"], to_numpy(out))
    again = model.layers(params, x, cot(out))
    for k, r in enumerate(again):
        chk.close(f"layers[{k}].g with an array cotangent", to_numpy(r.g), R[k]["g"])


def _check_jet(chk: _Checker, model: Any, params: Sequence[Array], x: Array, u: list, o: Any, Ju: Any,
               h: float, eps: float, along: Callable) -> None:
    """Jets: order 1 against jvp, order 2 and 3 against central differences of the lower order."""
    from .backends import to_numpy

    j1 = model.jet(params, x, u, 1)
    chk.kind("jet(1)", j1)
    chk.close("jet(1)[0] == forward", to_numpy(j1[0]), o)
    chk.close("jet(1)[1] == jvp", to_numpy(j1[1]), Ju)
    d2 = to_numpy(model.jet(params, x, u, 2)[2])
    jp, jm = (to_numpy(model.jvp(along(t, u), x, u)[1]) for t in (h, -h))
    chk.close("jet(2)[2] vs central differences of jvp", d2, (jp - jm) / (2 * h), floor=10 * eps * _norm(Ju) / h)
    try:
        j3 = model.jet(params, x, u, 3)
    except ValueError:  # order 3 not supported by this model
        return
    chk.kind("jet(3)", j3)
    jp, jm = (to_numpy(model.jet(along(t, u), x, u, 2)[2]) for t in (h, -h))
    chk.close("jet(3)[3] vs central differences of jet(2)", to_numpy(j3[3]), (jp - jm) / (2 * h),
              floor=10 * eps * _norm(d2) / h)


# ---------------------------------------------------------------------------
# assert_allclose_across
# ---------------------------------------------------------------------------


def tree_leaves_with_paths(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` of a pytree of NamedTuples, dicts, lists and tuples.

    Paths read like ``state.v[0]`` or ``info['loss']``; dict keys are sorted,
    so dicts built in a different order compare equal.
    """
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return [leaf for k, v in zip(tree._fields, tree) for leaf in tree_leaves_with_paths(v, f"{prefix}.{k}")]
    if isinstance(tree, Mapping):
        return [leaf for k in sorted(tree, key=str) for leaf in tree_leaves_with_paths(tree[k], f"{prefix}[{k!r}]")]
    if isinstance(tree, (list, tuple)):
        return [leaf for i, v in enumerate(tree) for leaf in tree_leaves_with_paths(v, f"{prefix}[{i}]")]
    return [(prefix or "<root>", tree)]


def _as_numpy(leaf: Any) -> Any:
    import numpy as np

    from .backends import to_numpy

    if leaf is None or isinstance(leaf, str):
        return leaf
    if isinstance(leaf, (bool, int, float, complex)):
        return np.asarray(leaf)
    return to_numpy(leaf)


def _compare_leaf(path: str, names: tuple[str, str], a: Any, b: Any, rtol: float, atol: float,
                  elementwise: bool, check_dtype: bool, typed: bool, equal_nan: bool) -> str | None:
    """A diagnostic line if leaf ``a`` (of names[0]) differs from ``b`` (of names[1]), else None."""
    import numpy as np

    who = f"{path}: {names[0]} vs {names[1]}"
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return None if (a is None and b is None) or a == b else f"{who}: {a!r} != {b!r}"
    if a.shape != b.shape:
        return f"{who}: shapes {a.shape} and {b.shape}"
    if check_dtype and typed and a.dtype != b.dtype:
        return f"{who}: dtypes {a.dtype} and {b.dtype}"
    if a.dtype == bool or b.dtype == bool:
        return None if np.array_equal(a, b) else f"{who}: boolean entries differ"
    a64, b64 = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64), b.astype(
        np.complex128 if np.iscomplexobj(b) else np.float64)
    if a64.size == 0:
        return None
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64)) if equal_nan else a64 == b64  # also equal infinities
    finite_b = np.abs(b64[np.isfinite(b64)])
    diff = np.where(same, 0.0, np.abs(a64 - b64))
    bound = atol + rtol * (np.abs(b64) if elementwise else (np.max(finite_b) if finite_b.size else 0.0))
    bad = ~(diff <= bound)  # NaN (where not allowed) counts as a difference
    if not np.any(bad):
        return None
    worst = np.where(np.isnan(diff), np.inf, diff)  # NaN (in either) counts as the largest difference
    i = np.unravel_index(int(np.argmax(worst)), diff.shape)
    scale, dmax = float(np.max(finite_b)) if finite_b.size else 0.0, float(worst[i])
    return (f"{who}: {int(np.sum(bad))}/{diff.size} entries differ; max |diff| {dmax:.3e} at "
            f"{tuple(int(j) for j in i)}: {a64[i]!r} vs {b64[i]!r}; max |{names[1]}| {scale:.3e}, "
            f"max |diff| / max |{names[1]}| {dmax / max(scale, 1e-300):.3e}")


def assert_allclose_across(results_by_backend: Mapping[str, Any], rtol: float = 1e-10, atol: float = 0.0, *,
                           reference: str | None = None, elementwise: bool = False, check_dtype: bool = True,
                           equal_nan: bool = True, what: str = "results") -> None:
    """Assert that pytrees computed on different backends agree.

    A pytree is any nesting of lists, tuples, NamedTuples and dicts with
    arrays (any library), Python scalars, strings or ``None`` as leaves.
    Leaf by leaf the structure, shapes and (``check_dtype``) dtypes must
    match, and the values must satisfy
    ``max|a - b| <= atol + rtol * max|b|`` (the max over the leaf's finite
    entries; with
    ``elementwise=True``: ``|a - b| <= atol + rtol |b|`` entry by entry).

    Args:
        results_by_backend: ``{backend name: pytree}``.
        rtol: relative tolerance.
        atol: absolute tolerance.
        reference: compare every backend with this one (e.g. ``"numpy"``);
            ``None``: every pair.
        elementwise: relative to each entry instead of the leaf's max.
        check_dtype: also require equal dtypes (Python scalars excepted).
        equal_nan: NaN at the same entries counts as agreement (methods
            report NaN for quantities not evaluated in a step); equal
            infinities always agree.
        what: a name for the compared objects in the message.

    Raises:
        AssertionError: listing every differing leaf with the largest
            difference, where it is, both values and the leaf's scale.
    """
    names = list(results_by_backend)
    if reference is not None and reference not in results_by_backend:
        raise ValueError(f"reference {reference!r} is not among the backends {names}")
    flat = {n: tree_leaves_with_paths(results_by_backend[n]) for n in names}
    if reference is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    else:
        pairs = [(n, reference) for n in names if n != reference]
    problems: list[str] = []
    for a, b in pairs:
        pa, pb = [p for p, _ in flat[a]], [p for p, _ in flat[b]]
        if pa != pb:
            only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
            problems.append(f"structure: {a} vs {b}: only in {a}: {only_a[:8]}, only in {b}: {only_b[:8]}"
                            + ("" if only_a or only_b else " (order differs)"))
            continue
        for (path, la), (_, lb) in zip(flat[a], flat[b]):
            typed = not isinstance(la, (bool, int, float, complex)) and not isinstance(lb, (bool, int, float, complex))
            line = _compare_leaf(path, (a, b), _as_numpy(la), _as_numpy(lb), rtol, atol, elementwise, check_dtype,
                                 typed, equal_nan)
            if line:
                problems.append(line)
    if problems:
        raise AssertionError(
            f"{what} differ between backends (rtol {rtol:.1e}, atol {atol:.1e}, "
            f"{'elementwise' if elementwise else 'relative to each leaf max'}):\n  " + "\n  ".join(problems)
        )
