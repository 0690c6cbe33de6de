"""CurveBall (spec curveball.md): the dense quantities of one step, Rosenbrock in closed form, state helpers."""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

import curvcore as cc
from curvcore.methods.curveball import CurveBallState
from reference.derivatives import dense_ggn_and_grad
from reference.mlp import flatten


class DenseCurveBallStep:
    """Dense float64 quantities of one step: ``G``, ``g``, ``dz`` and the 2x2 minimiser."""

    def __init__(self, sizes, activation, loss, params, x, y, z, lam, lr=1.0):
        G, g, _ = dense_ggn_and_grad(sizes, activation, loss, params, x, y)
        self.G, self.g, self.lam, self.lr = G, g, lam, lr
        self.Gl = G + lam * np.eye(G.shape[0])
        self.z = flatten(z)
        self.dz = self.Gl @ self.z + g
        S = np.stack([self.dz, self.z], axis=1)
        A, b = S.T @ self.Gl @ S, S.T @ g
        c = -np.linalg.pinv(A, rcond=1e-12) @ b  # minimiser of <b, c> + c^T A c / 2
        self.beta, self.rho = -c[0], c[1]
        self.b1, self.b2 = b

    def q(self, s):
        """The damped model change ``<g, s> + 1/2 <s, G_lam s>``."""
        return self.g @ s + 0.5 * s @ self.Gl @ s

    def z_new(self, rho=None, beta=None):
        rho = self.rho if rho is None else rho
        beta = self.beta if beta is None else beta
        return rho * self.z - beta * self.dz


def rosen_jac_np(w, eps=1.0):
    """Closed-form Jacobian of r = (1 - u, 10 sqrt(eps) (v - u^2))."""
    s = 10 * np.sqrt(eps)
    return np.array([[-1.0, 0.0], [-2 * s * w[0], s]])


def rosen_residual_np(w, eps=1.0):
    return np.array([1 - w[0], 10 * np.sqrt(eps) * (w[1] - w[0] ** 2)])


def random_tree(backend, params, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [cc.backends.asarray(backend, scale * rng.standard_normal(tuple(p.shape))) for p in params]


def state_with(backend, params, z, lam, count=0):
    xp = array_namespace(params[0])
    return CurveBallState(z=list(z), lam=cc.backends.asarray(backend, np.asarray(float(lam))),
                          count=xp.asarray(count))
