"""Builders of the per-method core products and of the peer libraries' GGN-vector products.

``CORE[name](stepper) -> fn`` returns a synchronised zero-argument callable
that computes the method's characteristic product with the method's public
functions, on the stepper's problem and state; it raises
``NotImplementedError`` (asv: skipped) when the method does not have one. No benchmark names in here (asv imports this module).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from . import common as C


def _module(method: str) -> Any:
    try:
        return importlib.import_module(f"curvcore.methods.{method}")
    except ImportError:
        raise NotImplementedError(f"curvcore.methods.{method} is not there (yet)") from None


def _attr(module: Any, *names: str) -> Callable[..., Any]:
    for name in names:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise NotImplementedError(f"{getattr(module, '__name__', type(module).__name__)} exposes none of {', '.join(names)}")


def _jit(st: C.Stepper, fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """``fn(*args)`` as a synchronised callable (jitted over its array arguments on JAX).

    Every array, the batch included, is an argument: a closed-over batch would
    be a compile-time constant that XLA folds into the program.
    """
    if st.prob.lib == "jax":
        import jax

        jitted = jax.jit(fn)
        return lambda: st.prob.sync(jitted(*args))
    return lambda: st.prob.sync(fn(*args))


def curveball_dz(st: C.Stepper) -> Callable[[], Any]:
    """CurveBall's ``dz = J^T (H_L J z + g_f) + lam z`` at the stepper's ``z`` and ``lam``: one linearisation
    (1 forward), 1 JVP and 1 VJP, through ``curvcore.curvature`` as the step computes it."""
    from curvcore.curvature import ggn_vp_at, linearization

    model, loss, x, y = st.prob.model, st.loss, st.prob.x, st.prob.targets(st.loss)

    def product(params: Any, z: Any, lam: Any, x: Any, y: Any) -> Any:
        lin = linearization(model, params, x)
        gz, _, _ = ggn_vp_at(lin, loss, y, z, plus=loss.grad(lin.out, y))
        return [a + lam * b for a, b in zip(gz, z)]

    s = st.states[1]
    return _jit(st, product, st.params[1], list(s.z), s.lam, x, y)


def pseudo_hessian_system(st: C.Stepper) -> Callable[[], Any]:
    """The pseudo-Hessian's S x S system ``gbar, Hbar, T`` (``pseudo_hessian.summary``: 1 VJP + S(S+1)/2 jets)."""
    mod = _module("pseudo_hessian")
    summary = _attr(mod, "summary")
    model, loss, x, y, opt = st.prob.model, st.loss, st.prob.x, st.prob.targets(st.loss), st.opt
    order = 3 if getattr(opt, "reg", "cubic") == "cubic" else 2
    return _jit(st, lambda params, x, y: summary(model, loss, params, x, y, groups=opt.groups, order=order),
                st.params[1], x, y)


def esn_layer_solve(st: C.Stepper) -> Callable[[], Any]:
    """ESN's per-layer solves given one pass of layer terms (``ESN.terms`` then ``ESN.randomized``)."""
    opt, model, loss, x, y = st.opt, st.prob.model, st.loss, st.prob.x, st.prob.targets(st.loss)
    if getattr(opt, "variant", "") != "randomized":
        raise NotImplementedError("the core product is the randomized variant's per-layer solve")
    params, state = st.params[1], st.states[1]
    candidates = opt.layer_candidates(params, model)
    _, rec, terms = opt.terms(model, loss, params, x, y, candidates)
    return _jit(st, lambda t, s, p: opt.randomized(t, rec, s, p, candidates)[0], terms, state, params)


def acp_refresh(st: C.Stepper) -> Callable[[], Any]:
    """ACP's covariance refresh: one forward for the layer inputs, then per layer ``C = U diag(s) U^T`` (eigh)."""
    model, x, opt = st.prob.model, st.prob.x, st.opt
    return _jit(st, lambda params, x: opt.covariance_eigs(model, params, x), st.params[1], x)


CORE: dict[str, Callable[[C.Stepper], Callable[[], Any]]] = {
    "curveball": curveball_dz,
    "pseudo_hessian": pseudo_hessian_system,
    "esn": esn_layer_solve,
    "acp": acp_refresh,
}


# -- peers -------------------------------------------------------------------
def peer_ggn(peer: str, prob: C.Problem) -> Callable[[list[Any]], Any]:
    """``v -> G v`` with a peer library on the problem's network and batch (cross-entropy, mean)."""
    if peer in ("curvlinops", "backpack"):
        return _torch_peer(peer, prob)
    if peer == "kfac_jax":
        return _kfac_jax(prob)
    raise ValueError(f"unknown peer {peer!r}")


def _torch_module(prob: C.Problem) -> Any:
    """An ``nn.Sequential`` holding the problem's weights (the peers need modules)."""
    import torch

    sizes, layers = prob.sizes, []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = torch.nn.Linear(n_in, n_out, dtype=prob.params[0].dtype, device=prob.params[0].device)
        with torch.no_grad():
            lin.weight.copy_(prob.params[2 * k])
            lin.bias.copy_(prob.params[2 * k + 1])
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _torch_peer(peer: str, prob: C.Problem) -> Callable[[list[Any]], Any]:
    if prob.lib != "torch":
        raise NotImplementedError(f"{peer} is a torch library")
    import torch

    try:
        if peer == "curvlinops":
            from curvlinops import GGNLinearOperator
        else:
            from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    except ImportError as err:
        raise NotImplementedError(f"{peer} is not installed: {err}") from None
    module, lossf = _torch_module(prob), torch.nn.CrossEntropyLoss(reduction="mean")
    plist = list(module.parameters())
    x, y = prob.x, prob.labels
    if peer == "curvlinops":
        op = GGNLinearOperator(module, lossf, plist, [(x, y)], progressbar=False, check_deterministic=False)
        return lambda v: op @ list(v)

    def backpack_ggn(v: list[Any]) -> Any:
        out = module(x)
        return ggn_vector_product_from_plist(lossf(out, y), out, plist, list(v))

    return backpack_ggn


def _kfac_jax(prob: C.Problem) -> Callable[[list[Any]], Any]:
    if prob.lib != "jax":
        raise NotImplementedError("kfac_jax is a jax library")
    try:
        import kfac_jax
    except ImportError as err:
        raise NotImplementedError(f"kfac_jax is not installed: {err}") from None
    import jax
    import jax.numpy as jnp

    x, y = prob.x, prob.labels

    def loss_fn(params: Any, batch: Any) -> Any:
        xb, yb = batch
        out = C.jax_mlp(params, xb)
        kfac_jax.register_softmax_cross_entropy_loss(out, yb)
        return jnp.mean(jax.nn.logsumexp(out, axis=1) - jnp.take_along_axis(out, yb[:, None], axis=1)[:, 0])

    est = kfac_jax.ImplicitExactCurvature(loss_fn)
    f = jax.jit(lambda p, v, xb, yb: est.multiply_ggn((p, (xb, yb)), v))
    params = list(prob.params)
    try:
        jax.block_until_ready(f(params, [jnp.zeros_like(p) for p in params], x, y))
    except Exception as err:  # a peer that does not run with this jax is skipped, not our failure
        raise NotImplementedError(f"kfac_jax fails with jax {jax.__version__}: {type(err).__name__}: {err}") from None
    return lambda v: f(params, list(v), x, y)
