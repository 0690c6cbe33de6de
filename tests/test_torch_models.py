"""Any PyTorch model: CNNs, residual blocks, BatchNorm, Dropout, sequence outputs, threads, and the Optimizer.

Dense references are float64 ``torch.func`` computations on the module itself
(``jacrev`` Jacobians), never curvcore's own code.
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pytest

import curvcore as cc
from curvcore.data import digits
from curvcore.testing import check_model
from reference import module_ggn, rel_norm

torch = pytest.importorskip("torch")  # this file is torch-only; numpy tests live elsewhere
nn = torch.nn
ct = pytest.importorskip("curvcore.backends.torch")

DT = torch.float64


def cnn(seed=0):
    """Conv2d -> ReLU -> MaxPool -> Linear on (B, 1, 8, 8) digits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10)).to(DT)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def resnet_bn(seed=0):
    """A stem conv with BatchNorm, one residual block, pooling and a Linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), ResBlock(4),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)).to(DT)


def dropout_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 10)).to(DT)


class SeqNet(nn.Module):
    """(B, T, n) -> (B, T, C) logits."""

    def __init__(self, n=5, h=7, c=4):
        super().__init__()
        self.a, self.b = nn.Linear(n, h), nn.Linear(h, c)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class TorchLayout(nn.Module):
    """SeqNet with torch's (B, C, T) layout for nn.CrossEntropyLoss."""

    def __init__(self):
        super().__init__()
        self.net = SeqNet()

    def forward(self, x):
        return self.net(x).permute(0, 2, 1)


def images(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.standard_normal((n, 1, 8, 8)), dtype=DT), torch.tensor(rng.integers(0, 10, n))


def seq_batch(n=6, t=3, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.standard_normal((n, t, 5)), dtype=DT), torch.tensor(rng.integers(0, 4, (n, t)))


NETS = {"cnn": cnn, "resnet_bn": resnet_bn, "dropout": dropout_net}


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]).detach().numpy()


# ---------------------------------------------------------------------------
# the model primitives on real nets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet_bn"])
def test_check_model_on_real_nets(name):
    net = NETS[name]().eval()  # the kit's finite differences need a deterministic module
    model = ct.TorchModel(net)
    x, y = images(6)
    errors = check_model(model, model.params(), x, y, "ce", skip=("layers",))
    assert "jvp vs central differences" in errors and "jet(2)[2] vs central differences of jvp" in errors


def test_forward_equals_the_module_and_never_changes_it():
    net = resnet_bn()
    before = copy.deepcopy(net.state_dict())
    model = ct.TorchModel(net)
    x, y = images(8)
    with torch.no_grad():
        ref = copy.deepcopy(net)(x)  # a copy: the module's own buffers must stay put
    assert rel_norm(model.forward(model.params(), x), ref) <= 1e-14
    opt = cc.CurveBall()
    params, state, info = opt.step(model, "ce", model.params(), opt.init(model.params()), x, y)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(info["buffers"]) == {n for n, _ in net.named_buffers()}


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_ggn_vp_matches_dense_jacrev_ggn_on_a_cnn(loss):
    net = cnn().eval()
    model = ct.TorchModel(net)
    params = model.params()
    x, labels = images(5, seed=1)
    y = labels if loss == "ce" else torch.tensor(np.random.default_rng(2).standard_normal((5, 10)), dtype=DT)
    lossf = cc.losses.get(loss)
    G = module_ggn(net, params, x, lossf, y)
    v = [torch.tensor(np.random.default_rng(3).standard_normal(tuple(p.shape)), dtype=DT) for p in params]
    Gv = cc.ggn_vp(model, lossf, params, x, y, v)
    assert rel_norm(flat(Gv), (G @ torch.tensor(flat(v))).numpy()) <= 1e-10
    lin = cc.linearization(model, params, x)  # the form that reuses a linearisation
    assert rel_norm(flat(cc.ggn_vp(model, lossf, params, x, y, v, linearization=lin)), flat(Gv)) <= 1e-14


def test_sequence_outputs_b_t_c():
    """(B, T, C) outputs: every jvp-based method and SGD/Adam run; K-FAC treats T as positions."""
    x, y = seq_batch()
    for name in ("curveball", "pseudo_hessian", "sgd", "adam", "kfac"):
        model = ct.TorchModel(SeqNet().to(DT))
        opt = cc.get_method(name).make_test()
        params, state = model.params(), opt.init(model.params(), model)
        losses = []
        for _ in range(5):
            params, state, info = opt.step(model, "ce", params, state, x, y)
            losses.append(float(info["loss"]))
        assert losses[-1] < losses[0], (name, losses)


def test_missing_forward_mode_rule_is_named():
    class Dist(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            return torch.cdist(h, h)

    model = ct.TorchModel(Dist().to(DT))
    x = torch.randn(5, 4, dtype=DT)
    with pytest.raises(NotImplementedError, match=r"_cdist_forward.*CurveBall, PseudoHessian"):
        model.jvp(model.params(), x, model.params())


def test_a_module_with_two_inputs_is_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x, mask):
            return self.lin(x) * mask

    with pytest.raises(TypeError, match="forward takes one tensor"):
        ct.Optimizer(Two(), cc.SGD(), "ce")


def test_params_that_require_grad_do_not_chain_graphs():
    net = cnn()
    model = ct.TorchModel(net)
    params = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    x, y = images(8)
    opt = cc.CurveBall()
    state = opt.init(params)
    for _ in range(2):
        params, state, info = opt.step(model, "ce", params, state, x, y)
    leaves = [*params, *state.z, state.lam, *info.values()]
    assert all(t.grad_fn is None and not t.requires_grad for t in leaves if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------
# BatchNorm and Dropout in train mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sgd", "curveball", "kfac", "pseudo_hessian"])
def test_batchnorm_running_statistics_equal_one_train_forward(method):
    net = resnet_bn()
    twin = copy.deepcopy(net)
    x, y = images(16)
    opt = ct.Optimizer(net, cc.get_method(method).make_test(), nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(x, y)
    twin(x)  # one ordinary forward in train mode
    for (name, a), (_, b) in zip(net.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b) if a.dtype == torch.long else rel_norm(a, b) <= 1e-13, name


def test_dropout_masks_are_shared_by_every_pass_of_a_step():
    net = dropout_net()
    model = ct.TorchModel(net, seed=7)
    params, x = model.params(), images(6)[0]
    t = [torch.randn_like(p) for p in params]
    with model.step_scope():
        f1 = model.forward(params, x)
        f2, jt = model.jvp(params, x, t)
        h = 1e-6
        fd = (model.forward([p + h * u for p, u in zip(params, t)], x)
              - model.forward([p - h * u for p, u in zip(params, t)], x)) / (2 * h)
    assert torch.equal(f1, f2)  # one mask for forward and JVP
    assert rel_norm(jt, fd) <= 1e-7  # the JVP is the derivative of the sampled network
    with model.step_scope():
        f3 = model.forward(params, x)
    assert not torch.equal(f1, f3)  # the masks advance once per step
    with torch.no_grad():
        assert not torch.equal(f1, net.eval()(x))  # dropout is really on


def test_dropout_runs_are_reproducible_and_train():
    x, y = images(64)
    runs = []
    for _ in range(2):
        net = dropout_net()
        opt = ct.Optimizer(net, cc.PseudoHessian(), "ce", seed=3)
        runs.append([float(opt.step(x, y)["loss"]) for _ in range(8)])
    assert runs[0] == runs[1]
    assert runs[0][-1] < 0.8 * runs[0][0]  # the curvature of the sampled loss makes progress


# ---------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------


def _train(net, steps=4):
    x, y = images(16, seed=5)
    opt = ct.Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss(), seed=1)
    for _ in range(steps):
        opt.step(x, y)
    return [p.detach().clone() for p in net.parameters()]


def test_two_threads_on_two_models_are_bit_identical_to_sequential():
    nets = [resnet_bn(1), nn.Sequential(dropout_net(2))]
    ref = [_train(copy.deepcopy(n)) for n in nets]
    out = [None, None]

    def work(i):
        out[i] = _train(copy.deepcopy(nets[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(out, ref):
        assert got is not None and all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------
# the torch.optim.Optimizer
# ---------------------------------------------------------------------------


def test_optimizer_is_a_torch_optimizer_with_schedulers():
    net = cnn()
    opt = ct.Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss())
    assert isinstance(opt, torch.optim.Optimizer) and len(opt.param_groups) == 1
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = images(16)
    lrs = []
    for _ in range(4):
        opt.step(x, y)
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 0.5, 0.5, 0.25]
    opt.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(TypeError, match="closures are not supported"):
        opt.step(lambda: 0.0)


@pytest.mark.parametrize("method", ["sgd", "curveball", "kfac"])
def test_halving_the_learning_rate_halves_the_update(method):
    x, y = images(16)
    deltas = []
    for lr_scale in (1.0, 0.5):
        net = cnn()
        before = [p.detach().clone() for p in net.parameters()]
        opt = ct.Optimizer(net, cc.get_method(method).make_test(), "ce")
        opt.param_groups[0]["lr"] *= lr_scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(x, y)
        deltas.append(flat([p - b for p, b in zip(net.parameters(), before)]))
    assert rel_norm(deltas[1], deltas[0] / 2) <= 1e-12


def test_state_dict_round_trips_bit_exactly():
    x, y = images(16)
    net = resnet_bn()
    opt = ct.Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss())
    for _ in range(2):
        opt.step(x, y)
    saved_net, saved = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.3
    saved = copy.deepcopy(opt.state_dict())
    cont = [opt.step(x, y) and [p.clone() for p in net.parameters()] for _ in range(2)][-1]
    net2 = resnet_bn()
    net2.load_state_dict(saved_net)
    opt2 = ct.Optimizer(net2, cc.CurveBall(), nn.CrossEntropyLoss())
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.3
    resumed = [opt2.step(x, y) and [p.clone() for p in net2.parameters()] for _ in range(2)][-1]
    assert all(torch.equal(a, b) for a, b in zip(cont, resumed))
    with pytest.raises(ValueError, match="state_dict is for 'CurveBall'"):
        ct.Optimizer(cnn(), cc.SGD(), "ce").load_state_dict(saved)


def test_torch_losses_map_exactly():
    x, labels = images(12)
    net = cnn()
    targets = torch.tensor(np.random.default_rng(0).standard_normal((12, 10)), dtype=DT)
    for loss, y in ((nn.CrossEntropyLoss(), labels), (nn.CrossEntropyLoss(reduction="sum"), labels),
                    (nn.CrossEntropyLoss(ignore_index=3), labels), (nn.MSELoss(), targets),
                    (nn.MSELoss(reduction="sum"), targets)):
        before = copy.deepcopy(net)
        info = ct.Optimizer(net, cc.SGD(lr=1e-3), loss).step(x, y)
        with torch.no_grad():
            assert rel_norm(float(info["loss"]), float(loss(before(x), y))) <= 1e-13, loss
    for bad, what in ((nn.CrossEntropyLoss(weight=torch.ones(10, dtype=DT)), "weight="),
                      (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
                      (nn.CrossEntropyLoss(reduction="none"), "reduction='none'"),
                      (nn.NLLLoss(), "NLLLoss is not supported")):
        with pytest.raises(TypeError, match=what):
            ct.Optimizer(net, cc.SGD(), bad)


def test_cross_entropy_in_torch_layout_for_sequences():
    """nn.CrossEntropyLoss on (B, C, T) outputs: the adapter moves the classes last; the loss matches torch."""
    torch.manual_seed(0)
    net = TorchLayout().to(DT)
    x, y = seq_batch()
    with torch.no_grad():
        expected = float(nn.CrossEntropyLoss()(copy.deepcopy(net)(x), y))
    info = ct.Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss()).step(x, y)
    assert rel_norm(float(info["loss"]), expected) <= 1e-13


# ---------------------------------------------------------------------------
# training a digits CNN, and every method on every net
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_images():
    split = digits(seed=0)
    x = torch.tensor(split.x_train.reshape(-1, 1, 8, 8), dtype=DT)
    return x, torch.tensor(split.y_train)


def _lowers_loss_in_15_steps(method, net, digits_images):
    x, y = digits_images
    lossf = nn.CrossEntropyLoss()
    opt = ct.Optimizer(net, cc.get_method(method).cls(), lossf)  # constructor defaults
    with torch.no_grad():
        before = float(lossf(net(x), y))
    rng = np.random.default_rng(0)
    for _ in range(15):
        idx = torch.tensor(rng.choice(len(y), 64, replace=False))
        opt.step(x[idx], y[idx])
    with torch.no_grad():
        after = float(lossf(net(x), y))
    assert after < before, (before, after)


@pytest.mark.parametrize("method", ["curveball", "pseudo_hessian", "sgd", "adam"])
def test_defaults_lower_the_digits_cnn_training_loss_in_15_steps(method, digits_images):
    _lowers_loss_in_15_steps(method, cnn(), digits_images)


@pytest.mark.parametrize("net_name", ["cnn", "resnet_bn"])
@pytest.mark.parametrize("method", ["kfac", "acp", "centered_sgd", "esn", "mk"])
def test_layerwise_defaults_lower_the_training_loss_in_15_steps(method, net_name, digits_images):
    net = NETS[net_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parameters outside preconditioned layers are listed once
        _lowers_loss_in_15_steps(method, net, digits_images)


def test_layerwise_methods_report_and_warn_about_what_they_precondition():
    x, y = images(16)
    net = resnet_bn()
    model = ct.TorchModel(net)
    n_bn = sum(1 for n, _ in net.named_parameters() if ".b" in n or n.split(".")[0] == "1")
    for name, expected in (("kfac", 2 * 4), ("acp", 2), ("esn", 2)):  # 3 convs + head | head | head
        opt = cc.get_method(name).make_test()
        with pytest.warns(UserWarning, match="take a plain gradient step"):
            _, _, info = opt.step(model, "ce", model.params(), opt.init(model.params(), model), x, y)
        assert int(info["n_preconditioned"]) == expected, name
    assert n_bn > 0
    with pytest.raises(ValueError, match=r"KFAC\(strict=True\): .*1.weight"):
        cc.KFAC(strict=True).init(model.params(), model)


@pytest.mark.parametrize("net_name", ["cnn", "resnet_bn", "dropout"])
def test_every_method_steps_every_net(net_name):
    x, y = images(16)
    for name in cc.method_names():
        net = NETS[net_name]()
        opt = ct.Optimizer(net, cc.get_method(name).make_test(), "ce")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            infos = [opt.step(x, y) for _ in range(3)]
        assert all(bool(i["finite"]) for i in infos), name
