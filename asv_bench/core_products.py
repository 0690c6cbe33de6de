"""Builders of the per-method core products and of the peer libraries' GGN-vector products.

``CORE[name](stepper) -> fn`` returns a synchronised zero-argument callable
that computes the method's characteristic product with the method's own
internal functions, on the stepper's problem and state; it raises
``NotImplementedError`` (asv: skipped) when the method module does not expose
such a function. No benchmark names in here (asv imports this module).
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
    """CurveBall's ``dz = J^T (H_L J z + g_f) + lam z`` (1 JVP + 1 VJP) at the stepper's ``z`` and ``lam``.

    ``curveball.py`` computes ``dz`` inline in ``step``; until it exposes a
    function (one of the names below), this is the same three protocol calls as
    its lines "JVP 1", "VJP 1" and "eq. 18" (``model.jvp``, ``loss.hvp``,
    ``model.vjp``).
    """
    mod = _module("curveball")
    model, loss, x, y = st.prob.model, st.loss, st.prob.x, st.prob.targets(st.loss)
    try:
        dz = _attr(mod, "curveball_dz", "compute_dz", "dz")

        def product(params: Any, z: Any, lam: Any, x: Any, y: Any) -> Any:
            return dz(model, loss, params, x, y, z, lam)
    except NotImplementedError:
        def product(params: Any, z: Any, lam: Any, x: Any, y: Any) -> Any:
            f, jz = model.jvp(params, x, z)
            _, pullback = model.vjp(params, x)
            return [a + lam * b for a, b in zip(pullback(loss.hvp(f, y, jz) + loss.grad(f, y)), z)]
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
    """ESN's per-layer solves given one pass of layer terms (``ESN._randomized`` or ``_layerwise.closed_form``)."""
    _module("esn")
    lw = _module("_layerwise")
    opt, model, loss, x, y = st.opt, st.prob.model, st.loss, st.prob.x, st.prob.targets(st.loss)
    params, state = st.params[1], st.states[1]
    _, terms = lw.compute_terms(model, loss, params, x, y, opt.lam, opt.reg_grad, validate=False)
    if getattr(opt, "variant", "") == "randomized":
        solve = _attr(opt, "_randomized")
        return _jit(st, lambda t, s, p: solve(t, s, p)[0], terms, state, params)
    closed = _attr(lw, "closed_form")
    return _jit(st, lambda t: closed(t, opt.variant, 0.0, opt.eps)[0], terms)


def acp_refresh(st: C.Stepper) -> Callable[[], Any]:
    """ACP's covariance refresh: one forward for the layer inputs, then per layer ``C = U diag(s) U^T`` (eigh)."""
    mod = _module("acp")
    records, eig = _attr(mod, "input_records"), _attr(mod, "input_covariance_eig")
    model, x = st.prob.model, st.prob.x
    return _jit(st, lambda params, x: [eig(r.a) for r in records(model, params, x)], st.params[1], x)


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
        out = C._jax_mlp(params, xb)
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
