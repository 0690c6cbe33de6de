"""flax.linen and equinox models without hand tagging: layers, records, BatchNorm and dropout, every method,
and torch = flax on the same weights.

References are direct JAX computations on the modules (``jax.grad``, ``lax.conv_general_dilated``,
``module.apply``) or the torch adapter on the same weights, never the adapter's own code.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

import curvcore as cc
from curvcore.layers import weight_matrix
from reference import rel_norm

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax", reason="flax is not installed (the jax and test extras have it)")
eqx = pytest.importorskip("equinox", reason="equinox is not installed (the jax and test extras have it)")
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from curvcore.backends import _cnn  # noqa: E402
from curvcore.backends import jax as cj  # noqa: E402

F64 = jnp.float64
CE = cc.losses.CrossEntropy()


def tree_rel(a, b):
    """``||a - b|| / ||b||`` over all leaves together (a bias that BatchNorm cancels has a zero gradient)."""
    flat = [np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in leaves(t)]) for t in (a, b)]
    return rel_norm(*flat)


def leaves(tree):
    return jax.tree_util.tree_leaves(tree)


def batch(shape, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape)), jnp.asarray(rng.integers(0, classes, shape[0]))


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


class FlaxMLP(nn.Module):
    """64 -> 16 (tanh) -> 12 (relu) -> 10."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, param_dtype=F64)(x))
        h = nn.relu(nn.Dense(12, param_dtype=F64)(h))
        return nn.Dense(10, param_dtype=F64)(h)


class FlaxSkip(nn.Module):
    """A residual MLP: the output chain stops at the skip connection."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(12, param_dtype=F64)(x))
        h = h + jnp.tanh(nn.Dense(12, param_dtype=F64)(h))
        return nn.Dense(10, param_dtype=F64)(h)


class FlaxResNet(nn.Module):
    """Conv + BatchNorm stem, a residual block, dropout and a Dense head on (B, 8, 8, 1)."""

    train: bool = True

    @nn.compact
    def __call__(self, x):
        def bn(h):
            return nn.BatchNorm(use_running_average=not self.train, momentum=0.9, param_dtype=F64, dtype=F64)(h)

        h = nn.relu(bn(nn.Conv(4, (3, 3), padding=1, param_dtype=F64)(x)))
        r = nn.relu(bn(nn.Conv(4, (3, 3), padding=1, param_dtype=F64)(h)))
        h = nn.relu(h + bn(nn.Conv(4, (3, 3), padding=1, param_dtype=F64)(r)))
        h = nn.avg_pool(h, (4, 4), strides=(4, 4)).reshape(h.shape[0], -1)
        h = nn.Dropout(0.25, deterministic=not self.train)(h)
        return nn.Dense(10, param_dtype=F64)(h)


class FlaxBNMLP(nn.Module):
    """Dense -> BatchNorm -> tanh -> dropout -> Dense: model state on a small net."""

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=False, momentum=0.9, param_dtype=F64, dtype=F64)(
            nn.Dense(12, param_dtype=F64)(x))
        h = nn.Dropout(0.25, deterministic=False)(jnp.tanh(h))
        return nn.Dense(10, param_dtype=F64)(h)


class FlaxDropout(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dropout(0.3, deterministic=False)(jnp.tanh(nn.Dense(16, param_dtype=F64)(x)))
        return nn.Dense(10, param_dtype=F64)(h)


class EqxCNN(eqx.Module):
    """Conv2d -> relu -> max pool -> Linear on one (1, 8, 8) image."""

    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 3, 3, padding=1, key=k1)
        self.head = eqx.nn.Linear(3 * 16, 10, key=k2)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x))
        h = eqx.nn.MaxPool2d(2, 2)(h)
        return self.head(h.reshape(-1))


@functools.cache
def init(module, shape):
    """``module.init`` on a batch of ``shape`` (compiled once: eager init compiles every op)."""
    x = jnp.zeros(shape, dtype=F64)
    return jax.jit(module.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)


def flax_model(module, x, **kw):
    return cj.from_flax(module, init(module, tuple(x.shape)), **kw)


@functools.cache
def _resnet():
    x, y = batch((16, 8, 8, 1))
    model, params = cj.from_flax(FlaxResNet(), init(FlaxResNet(train=False), x.shape), rngs=jax.random.key(5))
    return model, params, x, y, model.state


def flax_resnet():
    """The BatchNorm/dropout net (one model per session, so its programs compile once), at its first state."""
    model, params, x, y, start = _resnet()
    model.state = start
    return model, params, x, y


@functools.cache
def flax_cnn():
    return cc.backends.cnn("jax")


@functools.cache
def eqx_mlp():
    return cj.from_equinox(eqx.nn.MLP(64, 10, 16, 2, activation=jnp.tanh, key=jax.random.key(0)))


@functools.cache
def eqx_cnn():
    return cj.from_equinox(EqxCNN(jax.random.key(0)))


def images_nchw(n=16):
    x, y = batch((n, 8, 8, 1))
    return jnp.moveaxis(x, 3, 1), y


# ---------------------------------------------------------------------------
# layers: found without tagging, records against direct computations
# ---------------------------------------------------------------------------


GEOMETRIES = [
    {"strides": 1, "padding": "SAME", "dilation": 1},
    {"strides": 2, "padding": ((1, 0), (0, 2)), "dilation": 1},
    {"strides": 1, "padding": "VALID", "dilation": 2},
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["same", "stride2-asymmetric", "dilation2-valid"])
@pytest.mark.parametrize("framework", ["flax", "equinox"])
def test_conv_patches_times_the_weight_matrix_is_the_convolution(framework, geometry):
    """The recorded patches, in LayerSpec.weight_axes order, reproduce the layer's own convolution."""
    rng = np.random.default_rng(1)
    if framework == "flax":
        module = nn.Conv(5, (3, 2), strides=geometry["strides"], padding=geometry["padding"],
                         kernel_dilation=geometry["dilation"], param_dtype=F64,
                         bias_init=nn.initializers.normal(1.0))
        x = jnp.asarray(rng.standard_normal((3, 9, 8, 2)))
        model, params = cj.from_flax(module, jax.jit(module.init)(jax.random.key(0), x))
        kernel, bias = params["kernel"], params["bias"]
    else:
        layer = eqx.nn.Conv2d(2, 5, (3, 2), stride=geometry["strides"], padding=geometry["padding"],
                              dilation=geometry["dilation"], key=jax.random.key(0))
        x = jnp.asarray(rng.standard_normal((3, 2, 9, 8)))
        model, params = cj.from_equinox(layer)
        kernel, bias = params.weight, params.bias.reshape(-1)
    out = model.forward(params, x)  # the framework's convolution
    (spec,) = model.layer_specs(params)
    rec = model.records(params, x, jnp.ones_like(out))
    assert rec.specs == [spec] and spec.kind == "conv2d"
    a = rec.layers[0].a  # (B, S, C_in kh kw)
    z = jnp.einsum("bsd,od->bso", a, weight_matrix(kernel, spec)) + bias
    channels_last = out if framework == "flax" else jnp.moveaxis(out, 1, 3)
    assert rel_norm(z, channels_last.reshape(z.shape)) <= 1e-13


def _loss_of(model, x, y):
    return lambda p: CE.value(model.forward(p, x), y)


@pytest.mark.parametrize("name", ["flax_cnn", "eqx_cnn"])
def test_records_give_the_gradient_of_every_layer(name):
    """``sum g a^T`` of each record is that layer's weight gradient from jax.grad; grads equal jax.grad."""
    if name == "flax_cnn":
        (model, params), (x, y) = flax_cnn(), batch((12, 8, 8, 1))
    else:
        (model, params), (x, y) = eqx_cnn(), images_nchw(12)
    grad = leaves(jax.jit(jax.grad(_loss_of(model, x, y)))(params))
    rec = model.records(params, x, lambda out: CE.grad(out, y))
    assert [s.name for s in rec.specs] == [s.name for s in model.layer_specs(params)]
    for got, want in zip(leaves(rec.grads), grad):
        assert rel_norm(got, want) <= 1e-12
    for spec, r in zip(rec.specs, rec.layers):
        a, g = r.a.reshape(-1, r.a.shape[-1]), r.g.reshape(-1, r.g.shape[-1])
        assert rel_norm(g.T @ a, weight_matrix(grad[spec.weight], spec)) <= 1e-12, spec.name
        assert rel_norm(g.sum(0), grad[spec.bias].reshape(-1)) <= 1e-12, spec.name


def test_dense_input_of_the_cnn_head_is_the_pooled_feature_map():
    (model, params), (x, _) = flax_cnn(), batch((12, 8, 8, 1))
    conv = jax.lax.conv_general_dilated(x, params["Conv_0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["Conv_0"]["bias"]
    pooled = jax.lax.reduce_window(jnp.maximum(conv, 0), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    rec = model.records(params, x, jnp.ones((12, 10)))
    assert rel_norm(rec.layers[1].a, pooled.reshape(12, -1)) <= 1e-14


def test_layer_specs_come_from_the_params_without_a_batch():
    model, params = cc.backends.cnn("jax", channels=3)
    specs = model.layer_specs(params)
    assert [(s.kind, s.name, s.weight_axes) for s in specs] == [("conv2d", "Conv_0", (3, 2, 0, 1)),
                                                                ("dense", "Dense_0", (1, 0))]
    state = cc.KFAC().init(params, model)  # no batch needed
    assert [tuple(a.shape) for a in state.A_inv] == [(10, 10), (49, 49)]
    emodel, eparams = eqx_cnn()
    assert [(s.kind, s.name, s.weight_axes) for s in emodel.layer_specs(eparams)] == [
        ("conv2d", ".conv", (0, 1, 2, 3)), ("dense", ".head", (0, 1))]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_output_chain_records_z_dact_h_and_stops_at_a_skip_connection(jit):
    """z, act'(z) and h of each chain layer; a skip connection cuts the chain, eagerly and under jit alike."""
    x, _ = batch((5, 64))
    model, params = flax_model(FlaxMLP(), x)
    layers = jax.jit(model.layers, static_argnums=2) if jit else model.layers
    recs = layers(params, x, jnp.ones_like)
    assert len(recs) == 3
    assert rel_norm(recs[0].dact, 1 - jnp.tanh(recs[0].z) ** 2) <= 1e-14 and rel_norm(recs[0].h, jnp.tanh(recs[0].z)) <= 1e-15
    assert rel_norm(recs[1].dact, (recs[1].z > 0).astype(F64)) == 0 and rel_norm(recs[1].h, nn.relu(recs[1].z)) == 0
    assert rel_norm(recs[2].z, model.forward(params, x)) <= 1e-15 and rel_norm(recs[2].dact, jnp.ones((5, 10))) == 0
    if jit:
        skip, sparams = flax_model(FlaxSkip(), x)
        slayers = jax.jit(skip.layers, static_argnums=2)
        assert [r.a.shape for r in slayers(sparams, x, jnp.ones_like)] == [(5, 12), (5, 12)]  # cut below the skip
        emodel, eparams = eqx_mlp()
        erecs = jax.jit(emodel.layers, static_argnums=2)(eparams, x, jnp.ones_like)
        assert len(erecs) == 3 and rel_norm(erecs[0].dact, 1 - jnp.tanh(erecs[0].z) ** 2) <= 1e-14


def test_layers_called_twice_or_inside_a_transform_of_the_model_are_left_out():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            shared = nn.Dense(8, param_dtype=F64)
            h = jnp.tanh(shared(jnp.tanh(shared(x))))
            h = nn.remat(nn.Dense)(8, param_dtype=F64)(h)  # traced inside jax.checkpoint
            return nn.Dense(10, param_dtype=F64)(h)

    class Sequence(eqx.Module):
        cell: eqx.nn.Linear
        head: eqx.nn.Linear

        def __call__(self, x):  # (T, 8): the cell is vmapped over time inside the model
            return self.head(jnp.tanh(jax.vmap(self.cell)(x)).reshape(-1))

    x, _ = batch((6, 8))
    model, params = flax_model(Twice(), x)
    assert [s.name for s in model.layer_specs(params)] == ["CheckpointDense_0", "Dense_0", "Dense_1"]
    rec = model.records(params, x, jnp.ones((6, 10)))
    assert [s.name for s in rec.specs] == ["Dense_1"]
    grad = jax.grad(lambda p: model.forward(p, x).sum())(params)
    assert tree_rel(rec.grads, grad) <= 1e-13
    seq = Sequence(eqx.nn.Linear(8, 5, key=jax.random.key(0)), eqx.nn.Linear(15, 10, key=jax.random.key(1)))
    emodel, eparams = cj.from_equinox(seq)
    xs = x.reshape(2, 3, 8)
    erec = emodel.records(eparams, xs, jnp.ones((2, 10)))
    assert [s.name for s in erec.specs] == [".head"]
    assert tree_rel(erec.grads, jax.grad(lambda p: emodel.forward(p, xs).sum())(eparams)) <= 1e-13


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_layerwise_methods_name_a_model_without_dense_or_conv_layers():
    class Scale(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("w", nn.initializers.ones, (x.shape[-1],), F64)

    class EqxScale(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return x * self.w

    x, _ = batch((4, 3))
    for model, params in (flax_model(Scale(), x), cj.from_equinox(EqxScale(jnp.ones(3)))):
        for method in (cc.KFAC(), cc.ESN(), cc.ACP()):
            with pytest.raises(ValueError, match="no dense.* layer with a bias to precondition"):
                method.init(params, model)


def test_missing_mutable_collections_and_rngs_are_named():
    x, y = batch((16, 8, 8, 1))
    variables = init(FlaxResNet(train=False), x.shape)
    model, params = cj.from_flax(FlaxResNet(), variables, rngs=jax.random.key(0), mutable=[])
    with pytest.raises(TypeError, match=r"mutable: .*collection \"batch_stats\" is immutable"):
        cc.SGD().step(model, CE, params, cc.SGD().init(params), x, y)
    model, params = cj.from_flax(FlaxResNet(), {"params": variables["params"]}, rngs=jax.random.key(0))
    with pytest.raises(TypeError, match="mutable: .*batch_stats"):
        model.forward(params, x)
    model, params = cj.from_flax(FlaxResNet(), variables)
    with pytest.raises(TypeError, match=r"rngs: .*from_flax\(\.\.\., rngs=jax.random.key"):
        model.forward(params, x)


def test_unsupported_modules_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="BatchNorm .* needs equinox state"):
        cj.from_equinox(eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0)), eqx.nn.BatchNorm(2, "b")]))
    with pytest.raises(NotImplementedError, match="Dropout"):
        cj.from_equinox(eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0)), eqx.nn.Dropout(0.5)]))
    from flax import nnx

    with pytest.raises(TypeError, match="nnx modules are not supported yet"):
        cj.from_flax(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), {"params": {}})
    with pytest.raises(TypeError, match="'params' collection"):
        cj.from_flax(FlaxMLP(), {"batch_stats": {}})


# ---------------------------------------------------------------------------
# BatchNorm and dropout: the model's state
# ---------------------------------------------------------------------------


def test_batchnorm_statistics_are_those_of_one_train_forward():
    """K-FAC (its records pass comes first; CurveBall's linearization: see the jit_step test)."""
    model, params, x, y = flax_resnet()
    before = model.state
    opt = cc.KFAC()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, info = opt.step(model, CE, params, opt.init(params, model), x, y)
    _, rngs = model.pass_context()
    _, updates = FlaxResNet().apply(model.variables(params), x, rngs=rngs, mutable=["batch_stats"])
    for got, want in zip(leaves(info["buffers"]), leaves(updates)):
        assert rel_norm(got, want) <= 1e-14
    assert model.state is before  # an eager step leaves the model alone ...
    model.advance(info)  # ... until told, keeping the dtypes (flax keeps its statistics in float32)
    for got, old, want in zip(leaves(model.state.collections), leaves(before.collections), leaves(updates)):
        assert got.dtype == old.dtype == jnp.float32 and rel_norm(got, want) <= 1e-7


def test_dropout_masks_are_shared_by_every_pass_of_a_step():
    x, _ = batch((6, 64))
    model, params = flax_model(FlaxDropout(), x, rngs=jax.random.key(3))
    t = jax.tree_util.tree_map(lambda a: jnp.asarray(np.random.default_rng(4).standard_normal(a.shape)), params)
    with model.step_scope():
        f1 = model.forward(params, x)
        f2, jt = model.jvp(params, x, t)
        h = 1e-6
        fd = (model.forward(jax.tree_util.tree_map(lambda p, u: p + h * u, params, t), x)
              - model.forward(jax.tree_util.tree_map(lambda p, u: p - h * u, params, t), x)) / (2 * h)
    assert bool(jnp.all(f1 == f2)) and rel_norm(jt, fd) <= 1e-7  # one mask; the JVP of the sampled network
    nxt = model.bind(model.next_state())
    assert not bool(jnp.all(nxt.forward(params, x) == f1))  # the masks move on with the state
    eval_out = FlaxDropout().apply({"params": params}, x, rngs={"dropout": jax.random.key(0)})
    assert not bool(jnp.all(eval_out == f1))


def test_jit_step_threads_the_model_state_and_matches_eager_and_scan():
    x, y = batch((16, 8))
    model, params = flax_model(FlaxBNMLP(), x, rngs=jax.random.key(5))
    opt, start = cc.CurveBall(), model.state
    step = cj.jit_step(opt, model, CE)
    p_jit, s_jit = params, opt.init(params)
    for _ in range(3):
        p_jit, s_jit, _ = step(p_jit, s_jit, x, y)
    assert step.traces == 1
    jitted_state = model.state
    model.state = start
    p_eager, s_eager = params, opt.init(params)
    for t in range(3):
        if t == 0:
            _, updates = FlaxBNMLP().apply(model.variables(params), x, rngs=model.pass_context()[1],
                                           mutable=["batch_stats"])
        p_eager, s_eager, info = opt.step(model, CE, p_eager, s_eager, x, y)
        if t == 0:  # a linearization's first pass gives the statistics of one train forward
            assert tree_rel(info["buffers"], updates) <= 1e-14
        model.advance(info)

    def body(carry, _):
        p, s, ms = carry
        bound = model.bind(ms)
        p, s, info = opt.step(bound, CE, p, s, x, y)
        return (p, s, bound.next_state(info)), info["loss"]

    (p_scan, _, scan_state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=3))(
        (params, opt.init(params), start))
    assert tree_rel(p_jit, p_eager) <= 1e-10 and tree_rel(p_scan, p_eager) <= 1e-10
    for got in (jitted_state, scan_state):  # float32 statistics (flax's dtype), the same keys
        assert tree_rel(got.collections, model.state.collections) <= 1e-6
        assert bool(jnp.all(jax.random.key_data(got.rngs["dropout"])
                            == jax.random.key_data(model.state.rngs["dropout"])))


def test_optax_keeps_the_model_state():
    import optax

    model, params, x, y = flax_resnet()
    tx = cj.as_optax(cc.SGD(lr=0.1), model, CE)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(None, opt_state, params, x=x, y=y)
    assert opt_state.model_state is not None and model.state is not opt_state.model_state
    assert not bool(jnp.all(opt_state.model_state.rngs["dropout"] == model.state.rngs["dropout"]))
    optax.apply_updates(params, updates)


# ---------------------------------------------------------------------------
# every method on every kind of model
# ---------------------------------------------------------------------------


@pytest.mark.slow  # about a minute per net here; the BatchNorm, dropout and torch-twin tests cover the paths
@pytest.mark.parametrize("name", ["flax_resnet_bn_dropout", "eqx_cnn"])
def test_every_method_steps_and_preconditions_the_layers_torch_would(name):
    if name == "eqx_cnn":
        (model, params), (x, y) = eqx_cnn(), images_nchw(16)
        dense, conv = 2, 2
    else:
        model, params, x, y = flax_resnet()
        dense, conv = 2, 6
    expected = {"kfac": dense + conv, "acp": dense, "centered_sgd": dense, "esn": dense, "mk": dense}
    for method in cc.method_names():
        opt = cc.get_method(method).make_test()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = opt.init(params, model)
            p, state, info = opt.step(model, CE, params, state, x, y)
            p, state, info2 = opt.step(model.bind(model.next_state(info)), CE, p, state, x, y)
        assert bool(info2["finite"]) and jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(params)
        if method in expected:
            assert float(info["n_preconditioned"]) == expected[method], method


# ---------------------------------------------------------------------------
# torch = flax on the same weights
# ---------------------------------------------------------------------------


def _torch_mlp_twin():
    tmodel, tparams = cc.backends.mlp("torch", [64, 16, 10], activation="tanh", seed=3, init="uniform")

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(16, param_dtype=F64)(x))
            return nn.Dense(10, param_dtype=F64)(h)

    w = [t.numpy() for t in tparams]
    params = {"Dense_0": {"kernel": jnp.asarray(w[0].T), "bias": jnp.asarray(w[1])},
              "Dense_1": {"kernel": jnp.asarray(w[2].T), "bias": jnp.asarray(w[3])}}
    fmodel, fparams = cj.from_flax(Twin(), {"params": params})

    def to_torch(p):
        return [np.asarray(p["Dense_0"]["kernel"]).T, p["Dense_0"]["bias"], np.asarray(p["Dense_1"]["kernel"]).T,
                p["Dense_1"]["bias"]]

    return tmodel, tparams, fmodel, fparams, to_torch


def _torch_cnn_twin():
    tmodel, tparams = cc.backends.cnn("torch")
    fmodel, fparams = cc.backends.cnn("jax")

    def to_torch(p):
        return list(_cnn.flax_to_torch(p).values())

    return tmodel, tparams, fmodel, fparams, to_torch


@pytest.mark.parametrize("method", ["kfac", "curveball", "pseudo_hessian"])
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_torch_and_flax_take_the_same_steps_from_the_same_weights(net, method):
    import torch

    from curvcore.data import digits

    tmodel, tparams, fmodel, fparams, to_torch = (_torch_mlp_twin if net == "mlp" else _torch_cnn_twin)()
    split = digits(seed=0)
    x, y = split.x_train[:32], split.y_train[:32]
    tx = torch.tensor(x if net == "mlp" else x.reshape(-1, 1, 8, 8))
    fx = jnp.asarray(x if net == "mlp" else x.reshape(-1, 8, 8, 1))
    runs = {}
    for which, model, params, xb, yb in (("torch", tmodel, tparams, tx, torch.tensor(y)),
                                         ("flax", fmodel, fparams, fx, jnp.asarray(y))):
        opt = cc.get_method(method).make_test()
        state = opt.init(params, model)
        step = cj.jit_step(opt, model, CE) if which == "flax" else functools.partial(opt.step, model, CE)
        for _ in range(2):
            params, state, info = step(params, state, xb, yb)
        runs[which] = params
    torch_params = [t.numpy() for t in runs["torch"]]
    for got, want in zip(to_torch(runs["flax"]), torch_params):
        assert rel_norm(got, want) <= 1e-10, (net, method, rel_norm(got, want))


def test_cnn_factory_builds_the_same_function_on_torch_and_flax():
    import torch

    tmodel, tparams = cc.backends.cnn("torch", channels=2, seed=4)
    fmodel, fparams = cc.backends.cnn("jax", channels=2, seed=4)
    x = np.random.default_rng(0).standard_normal((5, 8, 8))
    out_t = tmodel.forward(tparams, torch.tensor(x[:, None]))
    out_f = fmodel.forward(fparams, jnp.asarray(x[..., None]))
    assert rel_norm(out_f, out_t.numpy()) <= 1e-14
    with pytest.raises(ValueError, match="backend must be 'torch' or 'jax'"):
        cc.backends.cnn("numpy")
