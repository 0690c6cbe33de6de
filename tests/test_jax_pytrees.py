"""JAX params as any pytree: flax params dicts, equinox array leaves and lists in, the same structure out;
``lax.scan`` training loops; ``jit_step`` compiling once per shape; optax chains; bad pytrees; bounded caches.

References: the eager step of the same method (the step itself is checked against NumPy and torch in
``test_jit.py``/``test_equivalence.py``), and optax's own transformations.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

import curvcore as cc

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax", reason="flax is not installed (the jax and test extras have it)")
eqx = pytest.importorskip("equinox", reason="equinox is not installed (the jax and test extras have it)")
optax = pytest.importorskip("optax")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from curvcore.backends import jax as cj  # noqa: E402

F64 = jnp.float64
CE = cc.losses.CrossEntropy()
SIZES = (8, 6, 4)


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(SIZES[1], param_dtype=F64)(x))
        return nn.Dense(SIZES[2], param_dtype=F64)(h)


@functools.cache
def model_and_params(kind):
    """``(model, params)`` of the same small MLP with params as a flax dict, equinox leaves or a list."""
    if kind == "flax":
        variables = jax.jit(FlaxMLP().init)(jax.random.key(0), jnp.zeros((1, SIZES[0])))
        return cj.from_flax(FlaxMLP(), variables)
    if kind == "equinox":
        return cj.from_equinox(eqx.nn.MLP(SIZES[0], SIZES[2], SIZES[1], 1, activation=jnp.tanh,
                                          key=jax.random.key(0)))
    return cc.backends.mlp("jax", list(SIZES), seed=0)


def batches(n, size=16, seed=0):  # the shapes of test_equivalence: its eager JAX ops are compiled already
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.standard_normal((size, SIZES[0]))), jnp.asarray(rng.integers(0, SIZES[2], size)))
            for _ in range(n)]


def structure(tree):
    return jax.tree_util.tree_structure(tree)


def rel_tree(a, b):
    fa, fb = (np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in jax.tree_util.tree_leaves(t)])
              for t in (a, b))
    return float(np.linalg.norm(fa - fb) / np.linalg.norm(fb))


def quiet_step(method, model, params, state, x, y):
    with warnings.catch_warnings():  # layer-wise methods list the params they leave to plain SGD
        warnings.simplefilter("ignore")
        return method.step(model, CE, params, state, x, y)


# ---------------------------------------------------------------------------
# pytrees in, the same pytree out
# ---------------------------------------------------------------------------


def assert_same_structure(method, params, new, state, what):
    """New params in the structure given (a list stays a list); per-parameter state (z, moments) too."""
    assert structure(new) == structure(params) and type(new) is type(params), what
    for field in method.param_fields:
        value = getattr(state, field)
        if not (isinstance(value, list) and not value):
            assert structure(value) == structure(params) and type(value) is type(params), (what, field)


def test_every_method_keeps_the_structure_of_equinox_leaves():
    model, params = model_and_params("equinox")
    (x, y), = batches(1)
    for name in cc.method_names():
        method = cc.get_method(name).make_test()
        new, state, info = quiet_step(method, model, params, method.init(params, model), x, y)
        assert_same_structure(method, params, new, state, name)
        assert bool(info["finite"]) and float(info["step_norm"]) > 0, name


def test_a_list_stays_a_list():
    model, params = model_and_params("list")
    (x, y), = batches(1)
    for method in (cc.CurveBall(), cc.Adam()):
        new, state, _ = quiet_step(method, model, params, method.init(params, model), x, y)
        assert_same_structure(method, params, new, state, type(method).__name__)


# ---------------------------------------------------------------------------
# jit and loops
# ---------------------------------------------------------------------------


def _scan_schedule_allows(name):
    return not (name == "kfac" and cc.get_method(name).make_test().fisher == "mc")


@pytest.mark.parametrize("name", [n for n in cc.method_names() if _scan_schedule_allows(n)])
def test_a_lax_scan_training_loop_equals_stepping_eagerly_on_flax_params(name):
    model, params = model_and_params("flax")
    data = batches(3, seed=1)
    method = cc.get_method(name).make_test()
    eager_params, eager_state = params, method.init(params, model)
    for x, y in data:
        eager_params, eager_state, _ = quiet_step(method, model, eager_params, eager_state, x, y)
    assert_same_structure(method, params, eager_params, eager_state, name)  # a flax params dict

    def body(carry, xy):
        p, s = carry
        p, s, info = method.step(model, CE, p, s, *xy)
        return (p, s), info["loss"]

    xs, ys = (jnp.stack(v) for v in zip(*data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (scan_params, scan_state), losses = jax.jit(lambda c, d: jax.lax.scan(body, c, d))(
            (params, method.init(params, model)), (xs, ys))
    assert losses.shape == (3,)
    assert rel_tree(scan_params, eager_params) <= 1e-10, name
    assert rel_tree(scan_state, eager_state) <= 1e-10, name


def test_kfac_with_monte_carlo_fisher_says_it_cannot_be_traced():
    model, params = model_and_params("flax")
    (x, y), = batches(1)
    method = cc.KFAC(fisher="mc")
    with pytest.raises(TypeError, match="fisher='mc'.*cannot run inside jax.jit"):
        cj.jit_step(method, model, CE)(params, method.init(params, model), x, y)


def test_jit_step_compiles_once_per_input_shape_from_uncommitted_params():
    model, params = model_and_params("flax")
    fresh = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), params)  # uncommitted, as from init
    assert not any(a.committed for a in jax.tree_util.tree_leaves(fresh))
    method = cc.Adam(lr=0.01)
    step = cj.jit_step(method, model, CE)
    p, s = fresh, method.init(fresh)
    for x, y in batches(3):
        p, s, _ = step(p, s, x, y)  # the first call's inputs are uncommitted, the later ones committed
    assert step.traces == 1 and step.cache_size() == 1
    for x, y in batches(2, size=5):
        p, s, _ = step(p, s, x, y)
    assert step.traces == 2 and step.cache_size() == 2


@pytest.mark.slow  # 50 compilations of a step and 50 of a forward: about a minute here
def test_program_caches_stay_bounded_over_50_batch_sizes():
    """Compiled executables, counted (not memory): at most CACHE_SIZE per program after 50 batch sizes."""

    def linear(p, x):  # a function of this test only: JaxModels of one function share their programs
        return x @ p[0].T + p[1]

    params = [cj.from_numpy(np.ones((2, 3))), cj.from_numpy(np.zeros(2))]
    eager, traced = cj.JaxModel(linear), cj.JaxModel(lambda p, x: linear(p, x))
    method = cc.SGD(lr=0.1)
    step = cj.jit_step(method, traced, cc.losses.MSE())
    state = method.init(params)
    for b in range(1, 51):
        x, y = cj.from_numpy(np.ones((b, 3))), cj.from_numpy(np.ones((b, 2)))
        step(params, state, x, y)
        eager.forward(params, x)
        eager.jvp(params, x, params)
    assert step.traces == 50 and step.cache_size() == cj.CACHE_SIZE
    assert eager._forward.compiles == eager._jvp.compiles == 50
    assert eager.cache_size() == 2 * cj.CACHE_SIZE  # the forward's and the JVP's LRUs
    assert traced.cache_size() <= cj.CACHE_SIZE  # its programs are inlined into the step's


# ---------------------------------------------------------------------------
# optax
# ---------------------------------------------------------------------------


def test_optax_clip_after_curvcore_clips_the_curvature_step_and_a_transform_before_is_ignored():
    model, params = model_and_params("flax")
    (x, y), = batches(1)
    method = cc.CurveBall()
    new, _, _ = method.step(model, CE, params, method.init(params), x, y)
    step = jax.tree_util.tree_map(lambda n, p: n - p, new, params)
    step_norm = float(optax.tree.norm(step))
    clip = 0.25 * step_norm
    tx = optax.chain(cj.as_optax(method, model, CE), optax.clip_by_global_norm(clip))
    updates, _ = tx.update(None, tx.init(params), params, x=x, y=y)
    assert float(optax.tree.norm(updates)) == pytest.approx(clip, rel=1e-12)
    assert rel_tree(updates, jax.tree_util.tree_map(lambda d: d * (clip / step_norm), step)) <= 1e-12
    before = optax.chain(optax.scale(123.0), cj.as_optax(method, model, CE))
    gradients = jax.tree_util.tree_map(jnp.ones_like, params)
    ignored, _ = before.update(gradients, before.init(params), params, x=x, y=y)
    assert rel_tree(ignored, step) <= 1e-14


# ---------------------------------------------------------------------------
# bad pytrees: a named error before anything changes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adam", "curveball"])
def test_params_of_another_structure_than_the_state_are_refused(name):
    model, params = model_and_params("flax")
    (x, y), = batches(1)
    method = cc.get_method(name).make_test()
    state = method.init(params)
    renamed = {"Dense_0": params["Dense_0"], "Other": params["Dense_1"]}
    with pytest.raises(ValueError, match=r"state\.\w+ has the structure .* the state was made for other params"):
        method.step(model, CE, renamed, state, x, y)
    with pytest.raises(ValueError, match="the state was made for other params"):
        cj.jit_step(method, model, CE)(jax.tree_util.tree_leaves(params), state, x, y)


def test_leaves_that_are_not_arrays_are_named():
    model, params = model_and_params("flax")
    (x, y), = batches(1)
    method = cc.Adam()
    state = method.init(params)
    for bad, message in (({**params, "Dense_1": {**params["Dense_1"], "bias": "zeros"}}, "leaf 2 is a str"),
                         ({**params, "Dense_1": {**params["Dense_1"], "bias": None}}, "the state was made for")):
        with pytest.raises((TypeError, ValueError), match=message):
            method.step(model, CE, bad, state, x, y)
    with pytest.raises(TypeError, match="leaf 1 is a str"):
        method.init({"w": "not an array", "b": jnp.zeros(2)})
    with pytest.raises(TypeError, match="leaf 0 is a NoneType"):  # in a tree of JAX arrays, None is no leaf
        method.init({"w": None})
