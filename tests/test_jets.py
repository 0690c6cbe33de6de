"""The optional ``jets`` primitive: Taylor mode over one cached forward, ``None`` (zero) tangent blocks, fallbacks.

References are independent of the code under test: nested ``torch.func.jvp``
of a float64 MLP written in torch (``_torch_pass.nested_jet`` over
``reference.torch_activation``), JAX's nested ``jax.jvp``
(``backends.jax._nested_jet``), and complex-step derivatives. The
pseudo-Hessian's ``summary`` with the new jets is compared with the same
summary computed through nested-JVP jets (a torch module outside the
plain-MLP fast path, a JAX ``apply_fn`` that is not the built-in MLP).
"""

from __future__ import annotations

import numpy as np
import pytest

import curvcore as cc
from backend_list import needs, param, params
from cases import CASES, case_id, make_problem
from curvcore.methods import pseudo_hessian as ph
from curvcore.protocol import flat_model, jets
from reference import assert_rel, dense_tangent, flatten, nested_jvp_jets, np_mlp


torch = pytest.importorskip("torch")

SMOOTH = [c for c in CASES if c["activation"] in ("tanh", "sigmoid", "softplus")]
JET_CASES = SMOOTH + [c for c in CASES if c["activation"] in ("relu", "identity")]
# which tensors the tangent is nonzero on (None elsewhere); -1 / -2: the last bias / weight
SUPPORTS = {"all": None, "first_W": [0], "last_W": [-2], "last_b": [-1], "first_b+last_W": [1, -2], "none": []}


def _np(a):
    return cc.backends.to_numpy(a)


def _tangent(backend, params, support, seed=3):
    """A random tangent on the tensors in ``support`` (indices into params), ``None`` elsewhere."""
    rng = np.random.default_rng(seed)
    n = len(params)
    keep = set(range(n)) if support is None else {i % n for i in support}
    return [cc.backends.asarray(backend, rng.standard_normal(tuple(p.shape))) if i in keep else None
            for i, p in enumerate(params)]


# ---------------------------------------------------------------------------
# the primitive against nested-JVP jets and dense derivatives
# ---------------------------------------------------------------------------


def _jets_all_orders(backend, model, params, x, tangent):
    """``(f, [jet_fn(tangent, k) for k = 1, 2, 3])``; on JAX inside ``jax.jit`` (the Taylor path of the built-in MLP)."""
    def run(p, xb, t):
        out, jet_fn = jets(model, p, xb)
        return out, [jet_fn(t, order) for order in (1, 2, 3)]

    if backend == "jax":
        import jax

        return jax.jit(run)(params, x, tangent)
    return run(params, x, tangent)


@pytest.mark.parametrize("support", list(SUPPORTS), ids=str)
@pytest.mark.parametrize("case", JET_CASES, ids=case_id)
def test_jets_match_nested_jvp_jets(backend, case, support):
    model, params, x, _, _ = make_problem(backend, case["sizes"], case["activation"], case["loss"],
                                          batch=case["batch"], seed=case["seed"])
    tangent = _tangent(backend, params, SUPPORTS[support])
    out, by_order = _jets_all_orders(backend, model, params, x, tangent)
    assert_rel(_np(out), _np(model.forward(params, x)), 1e-14, "jets primal")
    for order, got in enumerate(by_order, 1):
        ref = nested_jvp_jets(case, params, x, tangent, order)
        assert len(got) == order
        for k, (g, r) in enumerate(zip(got, ref), 1):
            assert tuple(g.shape) == tuple(out.shape), f"d{k} shape"
            if np.max(np.abs(r)) == 0:
                np.testing.assert_array_equal(_np(g), 0.0, err_msg=f"order {order}, d{k} must vanish")
            else:
                assert_rel(_np(g), r, 1e-12, f"order {order}, d{k}")


@pytest.mark.parametrize("case", SMOOTH, ids=case_id)
def test_jets_match_complex_step_derivatives(backend, case):
    """Dense float64 references: d1 by complex step, d2 and d3 by central differences of it."""
    model, params, x, _, _ = make_problem(backend, case["sizes"], case["activation"], case["loss"],
                                          batch=case["batch"], seed=case["seed"])
    tangent = _tangent(backend, params, [1, -2])
    f = np_mlp(case["sizes"], case["activation"])
    theta, du, xn = flatten(params), flatten(dense_tangent(tangent, params)), _np(x)
    h = 1e-4

    def d1(t):
        return np.imag(f(theta + (t + 1e-30j) * du, xn)) / 1e-30

    got = [_np(d) for d in _jets_all_orders(backend, model, params, x, tangent)[1][2]]
    assert_rel(got[0], d1(0.0), 1e-11, "d1")
    assert_rel(got[1], (d1(h) - d1(-h)) / (2 * h), 1e-6, "d2")
    assert_rel(got[2], (d1(h) - 2 * d1(0) + d1(-h)) / h**2, 1e-5, "d3")


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=case_id)
def test_jets_equal_jet_with_zero_blocks(backend, case):
    """``jet_fn`` with ``None`` blocks equals the model's own ``jet`` along the zero-filled tangent."""
    model, params, x, _, _ = make_problem(backend, case["sizes"], case["activation"], case["loss"],
                                          batch=case["batch"], seed=case["seed"])
    _, jet_fn = jets(model, params, x)
    for support in SUPPORTS.values():
        tangent = _tangent(backend, params, support, seed=5)
        dense = [cc.backends.asarray(backend, t) for t in dense_tangent(tangent, params)]
        ref = model.jet(params, x, dense, 3)
        for g, r in zip(jet_fn(tangent, 3), ref[1:]):
            assert_rel(_np(g), _np(r), 1e-13, f"support {support}")


@needs("jax")
def test_jax_mlp_takes_the_taylor_path_only_inside_jit(monkeypatch):
    """Traced: the built-in MLP's own Taylor pushes (the fallback would raise here); eager: the fallback."""
    import jax

    from curvcore.backends import jax as cj

    model, params, x, _, _ = make_problem("jax", [4, 5, 3], "tanh", "ce", batch=7, seed=0)
    tangent = _tangent("jax", params, [-2])
    calls = []
    fallback = cj.jets_by_jet
    monkeypatch.setattr(cj, "jets_by_jet", lambda *a: calls.append(1) or fallback(*a))
    traced = jax.jit(lambda p, xb, t: jets(model, p, xb)[1](t, 2))(params, x, tangent)
    assert calls == []
    eager = jets(model, params, x)[1](tangent, 2)
    assert calls == [1]
    for g, r in zip(traced, eager):
        assert_rel(_np(g), _np(r), 1e-13, "jit vs eager")


# ---------------------------------------------------------------------------
# block structure: a direction on layer k does no work below it
# ---------------------------------------------------------------------------


class CountMatmuls(torch.overrides.TorchFunctionMode):
    """Counts matrix products (``matmul``/``mm``/``addmm``/``linear``) called while active."""

    NAMES = ("matmul", "mm", "addmm", "linear", "__matmul__")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("support,order,expected", [
    ([4], 3, 1),        # W3: one product at the top layer (the lower coefficients are zero)
    ([5], 3, 0),        # b3: no product at all
    ([2], 2, 1 + 2),    # W2, order 2: x2 U^T at layer 2, then a1 W3^T, a2 W3^T
    ([1], 3, 3 + 3),    # b1, order 3: three coefficients through layers 2 and 3
    ([0], 3, 1 + 3 + 3),
    ([], 3, 0),         # the zero direction
])
def test_direction_on_layer_k_starts_at_layer_k(support, order, expected):
    """Counted on the torch plain-MLP path (the array-API MLP on torch tensors): matmuls per ``jet_fn`` call."""
    model, params, x, _, _ = make_problem("torch", [3, 6, 4, 2], "tanh", "ce", batch=5, seed=2)
    tangent = _tangent("torch", params, support)
    _, jet_fn = model.jets(params, x)
    with CountMatmuls() as mode:
        got = jet_fn(tangent, order)
    assert mode.count == expected
    assert all(tuple(d.shape) == (5, 2) for d in got)
    with CountMatmuls() as mode:
        model.jets(params, x)
    assert mode.count == 3, "jets runs one forward: one product per layer"


# ---------------------------------------------------------------------------
# fallbacks and the flat view
# ---------------------------------------------------------------------------


class JetOnly:
    """A model with ``forward`` and ``jet`` only; records the tangents ``jet`` receives."""

    def __init__(self, model):
        self.model, self.xp, self.seen = model, model.xp, []
        self.forward, self.jvp, self.vjp = model.forward, model.jvp, model.vjp

    def jet(self, params, x, tangent, order):
        self.seen.append(tangent)
        return self.model.jet(params, x, tangent, order)


def test_fallback_fills_none_with_zeros_and_calls_jet():
    model, params, x, _, _ = make_problem("numpy", [4, 5, 3], "tanh", "ce", batch=7, seed=0)
    wrapped = JetOnly(model)
    tangent = _tangent("numpy", params, [-2])
    out, jet_fn = jets(wrapped, params, x)
    got = jet_fn(tangent, 2)
    assert len(wrapped.seen) == 1 and all(t is not None for t in wrapped.seen[0])
    np.testing.assert_array_equal(wrapped.seen[0][0], 0.0)
    ref = model.jet(params, x, wrapped.seen[0], 2)
    np.testing.assert_array_equal(out, ref[0])
    for g, r in zip(got, ref[1:]):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("backend", params(("torch", "jax")))
def test_adapters_fall_back_for_other_models(backend):
    """A torch module outside the plain-MLP path and a user JAX ``apply_fn`` get nested-JVP jets with zero blocks."""
    case = CASES[0]
    model, params, x, _, _ = make_problem(backend, case["sizes"], case["activation"], case["loss"],
                                          batch=case["batch"], seed=case["seed"])
    other = _nested_model(backend, model)
    tangent = _tangent(backend, params, [0, -1])
    _, jet_fn = other.jets(params, x)
    for g, r in zip(jet_fn(tangent, 3), nested_jvp_jets(case, params, x, tangent, 3)):
        assert_rel(_np(g), r, 1e-12, "fallback jets")


class DictMLP:
    """The numpy MLP with params ``{"w": [W1, W2], "b": [b1, b2]}`` (a pytree), with ``jets``."""

    def __init__(self, model):
        self.model, self.xp = model, model.xp

    @staticmethod
    def _list(p):
        return [p["w"][0], p["b"][0], p["w"][1], p["b"][1]]

    def jets(self, params, x):
        out, jet_fn = self.model.jets(self._list(params), x)
        return out, lambda t, order: jet_fn(self._list(t), order)


def test_flat_view_of_a_pytree_model_fills_zero_blocks():
    model, params, x, _, _ = make_problem("numpy", [4, 5, 3], "tanh", "ce", batch=7, seed=0)
    tree = {"w": [params[0], params[2]], "b": [params[1], params[3]]}
    leaves, treedef = cc.tree.flatten(tree)
    flat = flat_model(DictMLP(model), treedef)
    tangent = _tangent("numpy", leaves, [0])  # flat order: b1, b2, W1, W2
    got = jets(flat, leaves, x)[1](tangent, 3)
    dense = dense_tangent(tangent, leaves)
    ref = model.jet(params, x, [dense[2], dense[0], dense[3], dense[1]], 3)[1:]
    for g, r in zip(got, ref):
        assert_rel(g, r, 1e-14, "flat view")


def test_bad_order_and_tangent_raise_value_error(backend):
    model, params, x, _, _ = make_problem(backend, [4, 5, 3], "tanh", "ce", batch=7, seed=0)
    _, jet_fn = jets(model, params, x)
    tangent = _tangent(backend, params, None)
    for order in (0, 4):
        with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
            jet_fn(tangent, order)
    with pytest.raises(ValueError, match="tangent must be a list of 4"):
        jet_fn(tangent[:3], 2)
    with pytest.raises(ValueError, match=r"tangent\[2\]: expected \(3, 5\)"):
        jet_fn([tangent[0], None, tangent[0], None], 2)


# ---------------------------------------------------------------------------
# the pseudo-Hessian summary: the same numbers as through nested-JVP jets
# ---------------------------------------------------------------------------


def _nested_model(backend, model):
    """The same network on a path whose ``jet`` is nested JVPs: a non-Sequential torch module, a user JAX function."""
    if backend == "torch":
        from torch import nn

        from curvcore.backends.torch import TorchModel

        class Wrapped(nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)

        wrapped = TorchModel(Wrapped(model.module))
        assert wrapped._plain_mlp(torch.zeros(1, 1)) is None
        return wrapped
    from curvcore.backends.jax import JaxModel

    return JaxModel(lambda p, x: model.apply_fn(p, x))


# JAX: two partitions only; its nested-JVP reference runs eagerly, one dispatch per op (145 s for "scalar")
SUMMARY_GRID = [param("torch", "torch", g, id=f"torch-{g}") for g in ("tensor", "layer", "wb", (0, 1, 1, 0), "scalar")
                ] + [param("jax", "jax", g, id=f"jax-{g}") for g in ("tensor", "wb")]


@pytest.mark.parametrize("backend,groups", SUMMARY_GRID)
def test_summary_equals_the_nested_jvp_summary(backend, groups):
    """``gbar``, ``Hbar``, ``T`` with Taylor-mode jets over one forward vs nested-JVP jets, float64, 1e-12."""
    model, params, x, y, loss = make_problem(backend, [3, 4, 2], "tanh", "ce", batch=6, seed=1)
    nested = _nested_model(backend, model)
    if backend == "jax":  # traced: the Taylor path runs inside jax.jit; the nested one is eager
        import jax

        new = jax.jit(lambda p, xb, yb: ph.summary(model, loss, p, xb, yb, groups))(params, x, y)
    else:
        new = ph.summary(model, loss, params, x, y, groups)
    old = ph.summary(nested, loss, params, x, y, groups)
    for key in ("gbar", "Hbar", "T"):
        assert_rel(_np(new[key]), _np(old[key]), 1e-12, key)
    np.testing.assert_array_equal(_np(new["active"]), _np(old["active"]))


@pytest.mark.parametrize("groups", ["tensor", "scalar"], ids=str)
@pytest.mark.parametrize("backend", params(("numpy", "array_api_strict")))
def test_summary_equals_the_summary_through_jet(backend, groups):
    """The array-API MLP: ``jets`` (one forward, ``None`` blocks) vs the protocol fallback through ``jet``."""
    model, params, x, y, loss = make_problem(backend, [4, 5, 3], "sigmoid", "mse", batch=9, seed=1)
    new = ph.summary(model, loss, params, x, y, groups)
    old = ph.summary(JetOnly(model), loss, params, x, y, groups)
    for key in ("gbar", "Hbar", "T"):
        assert_rel(_np(new[key]), _np(old[key]), 1e-12, key)


def test_group_directions_hold_none_outside_the_group():
    params = [np.ones((2, 3)), np.ones(2)]
    assert [[w is None for w in u] for u in ph.group_directions(params, [0, 1])] == [[False, True], [True, False]]
    scalar = ph.group_directions(params, ph.group_index("scalar", params))
    assert len(scalar) == 8 and [u[1] is None for u in scalar] == [True] * 6 + [False] * 2
    np.testing.assert_array_equal(sum(u[0] for u in scalar[:6]), params[0])
