"""Reproduce Table 1 of the CurveBall paper (the protocol is described in docs/methods/curveball.md).

Problems: Rosenbrock (deterministic, eps ~ U[0,1], eps ~ U[0,3]; 100 runs each)
and Rahimi & Recht (two linear layers, cond(A) = 1e5; 10 init seeds).
Methods: CurveBall (cc.CurveBall, lam0 = 0.1 and 1), SGD + momentum and Adam
(grid-searched), Levenberg-Marquardt (explicit, below) and BFGS (explicit, with
scipy.optimize.line_search: Wolfe conditions by cubic interpolation).

Writes docs/experiments/results/curveball_table1.{json,md} and
docs/img/curveball_rosenbrock.png (see docs/experiments/README.md). Run:
``python docs/experiments/curveball_table1.py`` (about 2-4 minutes on a 2-core CPU).
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _common import caption, main, pyplot, savefig
from scipy.optimize import line_search

import curvcore as cc
from curvcore.backends.function import FunctionModel

NAME = "curveball_table1"
TOL = 1e-4
NOISE = {"det": (1.0, 1.0), "U[0,1]": (0.0, 1.0), "U[0,3]": (0.0, 3.0)}
MAX_CB = 1000          # spec: CurveBall, LM and BFGS on Rosenbrock
MAX_FIRST = 10000      # SGD and Adam on Rosenbrock (the paper reports up to ~4000)
MAX_RR = 500           # spec: Rahimi & Recht, second-order methods
MAX_RR_FIRST = 3000    # SGD and Adam on Rahimi & Recht
SGD_GRID = {"lr": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "momentum": [0.5, 0.9, 0.95, 0.99, 0.995, 0.999]}
ADAM_GRID = {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0], "beta1": [0.5, 0.9, 0.99]}
RR_SGD_GRID = {"lr": [0.03, 0.1, 0.3, 1.0], "momentum": [0.9]}
RR_ADAM_GRID = {"lr": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1], "beta1": [0.9]}

# ---------------------------------------------------------------------------
# Rosenbrock: r(w; eps) = (1 - u, 10 sqrt(eps) (v - u^2)), objective R/2 = |r|^2/2
# ---------------------------------------------------------------------------


def residual(w, eps):
    return np.array([1 - w[0], 10 * np.sqrt(eps) * (w[1] - w[0] ** 2)])


def jacobian(w, eps):
    s = 10 * np.sqrt(eps)
    return np.array([[-1.0, 0.0], [-2 * s * w[0], s]])


def rosen_model() -> FunctionModel:
    """Rosenbrock as a protocol model: params [w], x = [[eps]], output r (1, 2), MSE with y = 0."""
    def forward(p, x):
        return residual(p[0], x[0, 0])[None, :]

    def jvp(p, x, t):
        return forward(p, x), (jacobian(p[0], x[0, 0]) @ t[0])[None, :]

    def vjp(p, x):
        return forward(p, x), lambda u: [jacobian(p[0], x[0, 0]).T @ u[0]]

    return FunctionModel(forward, jvp, vjp)


def starts_and_noise(lims, max_iter):
    """Spec protocol: starts from default_rng(0); run r's per-step noise from default_rng(1000 + r)."""
    rng = np.random.default_rng(0)
    starts = np.array([(rng.uniform(-2, 2), rng.uniform(-1, 3)) for _ in range(100)])
    noise = np.stack([np.random.default_rng(1000 + r).uniform(*lims, size=max_iter) for r in range(100)])
    return starts, noise


def run_library(opt, w0, eps_seq, max_iter, path=None):
    """A curvcore method on the Rosenbrock model; steps until ||w - 1|| < TOL, or None."""
    model, loss, y = rosen_model(), cc.losses.MSE(), np.zeros((1, 2))
    opt.validate = False
    params, state = [np.array(w0, dtype=float)], None
    state = opt.init(params)
    for k in range(1, max_iter + 1):
        params, state, _ = opt.step(model, loss, params, state, np.full((1, 1), eps_seq[k - 1]), y)
        if path is not None:
            path.append(params[0].copy())
        if np.linalg.norm(params[0] - 1) < TOL:
            return k
    return None


def grad_batch(W, eps):
    """Gradient of R/2 for a batch of points W (N, 2) with noise eps (N,)."""
    s = 10 * np.sqrt(eps)
    r1, r2 = 1 - W[:, 0], s * (W[:, 1] - W[:, 0] ** 2)
    return np.stack([-r1 - 2 * s * W[:, 0] * r2, s * r2], axis=1)


def first_order_batch(kind, settings, starts, noise, max_iter):
    """SGD+momentum or Adam for every (setting, run) at once, vectorised over rows.

    The update rules are those of cc.SGD / cc.Adam (checked against them in
    ``check_vectorised``). Returns iterations (settings, runs), NaN = not converged.
    """
    G, R = len(settings), len(starts)
    W = np.tile(starts, (G, 1))
    lr = np.repeat([s["lr"] for s in settings], R)[:, None]
    m = np.zeros_like(W)
    v = np.zeros_like(W)
    if kind == "sgd":
        mom = np.repeat([s["momentum"] for s in settings], R)[:, None]
    else:
        b1 = np.repeat([s["beta1"] for s in settings], R)[:, None]
        b2 = 0.999
    hit = np.full(G * R, np.nan)
    eps_all = np.tile(noise, (G, 1))
    with np.errstate(all="ignore"):
        for k in range(1, max_iter + 1):
            g = grad_batch(W, eps_all[:, k - 1])
            if kind == "sgd":
                m = mom * m + g
                W = W - lr * m
            else:
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                W = W - lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + 1e-8)
            done = np.linalg.norm(W - 1, axis=1) < TOL
            hit = np.where(np.isnan(hit) & done, k, hit)
    return hit.reshape(G, R)


def check_vectorised(kind, setting, w0, eps_seq, steps=100):
    """The vectorised update equals cc.SGD / cc.Adam on the Rosenbrock model (1e-10, 100 steps)."""
    opt = cc.SGD(lr=setting["lr"], momentum=setting["momentum"]) if kind == "sgd" else \
        cc.Adam(lr=setting["lr"], betas=(setting["beta1"], 0.999))
    path: list = []
    run_library(opt, w0, eps_seq, steps, path)
    W = np.array(w0, dtype=float)[None, :]
    m, v = np.zeros_like(W), np.zeros_like(W)
    for k in range(1, len(path) + 1):
        g = grad_batch(W, np.array([eps_seq[k - 1]]))
        if kind == "sgd":
            m = setting["momentum"] * m + g
            W = W - setting["lr"] * m
        else:
            b1 = setting["beta1"]
            m = b1 * m + (1 - b1) * g
            v = 0.999 * v + 0.001 * g * g
            W = W - setting["lr"] * (m / (1 - b1**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
        assert np.max(np.abs(W[0] - path[k - 1])) <= 1e-10 * max(1, np.max(np.abs(path[k - 1]))), (kind, k)


def grid(spec):
    keys = list(spec)
    out = [{}]
    for key in keys:
        out = [{**o, key: val} for o in out for val in spec[key]]
    return out


def best_setting(settings, hits):
    """Most runs converged, then the lowest mean iterations."""
    scores = [(-np.sum(~np.isnan(h)), np.nanmean(h) if np.any(~np.isnan(h)) else np.inf) for h in hits]
    i = min(range(len(settings)), key=lambda j: scores[j])
    return settings[i], hits[i]


def levenberg_marquardt(fun_jac, w0, converged, max_iter, lam0=1e-3, path=None):
    """Levenberg's damped Gauss-Newton step ``-(J^T J + lam I)^-1 J^T r`` with Marquardt's schedule.

    ``fun_jac(w, k) -> (r, J)`` for iteration k (the same noise for the trial point);
    accept if ``|r|^2`` decreases (lam /= 10), else reject (lam *= 10). Every
    iteration (accepted or not) counts. Returns the iteration count or None.
    """
    w, lam = np.array(w0, dtype=float), lam0
    for k in range(1, max_iter + 1):
        r, J = fun_jac(w, k)
        step = -np.linalg.solve(J.T @ J + lam * np.eye(w.size), J.T @ r)
        r_new, _ = fun_jac(w + step, k)
        if r_new @ r_new < r @ r:
            w, lam = w + step, max(lam / 10, 1e-12)
        else:
            lam = min(lam * 10, 1e12)
        if path is not None:
            path.append(w.copy())
        if converged(w):
            return k
    return None


def bfgs(fun, w0, converged, max_iter, path=None):
    """BFGS with a Wolfe line search (scipy.optimize.line_search, cubic interpolation).

    ``fun(w) -> (f, g)``. A failed line search resets the inverse Hessian to the
    identity and backtracks along -g (Armijo); pairs with ``s^T y <= 0`` are skipped.
    """
    w = np.array(w0, dtype=float)
    H = np.eye(w.size)
    cache: dict = {}

    def fg(x):
        key = x.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = fun(x)
        return cache[key]

    f, g = fg(w)
    for k in range(1, max_iter + 1):
        p = -H @ g
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                alpha, *_ = line_search(lambda x: fg(x)[0], lambda x: fg(x)[1], w, p, g, f, maxiter=20)
        if alpha is None or not np.isfinite(alpha):
            H, p, alpha = np.eye(w.size), -g, 1.0
            while alpha > 1e-12 and fg(w + alpha * p)[0] > f - 1e-4 * alpha * (g @ g):
                alpha /= 2
        s = alpha * p
        w_new = w + s
        f_new, g_new = fg(w_new)
        yv = g_new - g
        if s @ yv > 1e-300:
            rho = 1.0 / (s @ yv)
            V = np.eye(w.size) - rho * np.outer(s, yv)
            H = V @ H @ V.T + rho * np.outer(s, s)
        w, f, g = w_new, f_new, g_new
        if path is not None:
            path.append(w.copy())
        if converged(w):
            return k
    return None


def rosen_lm(w0, eps_seq, path=None):
    return levenberg_marquardt(lambda w, k: (residual(w, eps_seq[k - 1]), jacobian(w, eps_seq[k - 1])), w0,
                               lambda w: np.linalg.norm(w - 1) < TOL, MAX_CB, path=path)


def rosen_bfgs(w0, lims, seed, path=None):
    """Fresh noise at every new evaluation point (the paper: "at each evaluation of the function")."""
    rng = np.random.default_rng(seed)

    def fun(w):
        eps = rng.uniform(*lims) if lims[0] != lims[1] else lims[0]
        r, J = residual(w, eps), jacobian(w, eps)
        return 0.5 * r @ r, J.T @ r

    return bfgs(fun, w0, lambda w: np.linalg.norm(w - 1) < TOL, MAX_CB, path=path)


def stats(hits):
    h = np.asarray(hits, dtype=float)
    ok = h[~np.isnan(h)]
    return {"mean": float(np.mean(ok)) if ok.size else None, "std": float(np.std(ok)) if ok.size else None,
            "max": float(np.max(ok)) if ok.size else None, "converged": int(ok.size), "runs": int(h.size)}


def rosenbrock_table(results: dict, settings_used: dict) -> None:
    for name, lims in NOISE.items():
        t0 = time.perf_counter()
        starts, noise = starts_and_noise(lims, MAX_FIRST)
        for lam in (0.1, 1.0):
            hits = [run_library(cc.CurveBall(lam=lam), w0, noise[r], MAX_CB) for r, w0 in enumerate(starts)]
            results[f"CurveBall (lam0={lam:g})"][name] = stats([np.nan if h is None else h for h in hits])
        for kind, spec in (("sgd", SGD_GRID), ("adam", ADAM_GRID)):
            sets = grid(spec)
            best, hits = best_setting(sets, first_order_batch(kind, sets, starts, noise, MAX_FIRST))
            check_vectorised(kind, best, starts[0], noise[0])
            label = "SGD + momentum" if kind == "sgd" else "Adam"
            results[label][name] = stats(hits)
            settings_used[f"{label} / Rosenbrock {name}"] = best
        results["Levenberg-Marquardt"][name] = stats(
            [np.nan if (h := rosen_lm(w0, noise[r])) is None else h for r, w0 in enumerate(starts)])
        results["BFGS"][name] = stats(
            [np.nan if (h := rosen_bfgs(w0, lims, 1000 + r)) is None else h for r, w0 in enumerate(starts)])
        print(f"Rosenbrock {name}: {time.perf_counter() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------------------
# Rahimi & Recht: y = A x, cond(A) = 1e5, MLP 6-6-6 identity, full batch, MSE
# ---------------------------------------------------------------------------


def rr_data():
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    V = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    A = U @ np.diag(np.logspace(0, -5, 6)) @ V.T
    X = rng.standard_normal((1000, 6))
    return X, X @ A.T


def rr_run(opt, seed, max_iter):
    """Steps until the full-batch loss < TOL (the loss after step k is the next step's info['loss'])."""
    X, Y = rr_data()
    model, params = cc.backends.mlp("numpy", [6, 6, 6], activation="identity", seed=seed)
    loss = cc.losses.MSE()
    state = opt.init(params)
    try:
        for k in range(max_iter + 1):
            new, state, info = opt.step(model, loss, params, state, X, Y)
            if float(info["loss"]) < TOL:
                return k
            if not np.isfinite(float(info["loss"])) or float(info["loss"]) > 1e6:
                return None
            params = new
    except (FloatingPointError, ValueError):
        return None
    return None


def rr_second_order(kind, seed):
    X, Y = rr_data()
    model, params = cc.backends.mlp("numpy", [6, 6, 6], activation="identity", seed=seed)
    shapes = [p.shape for p in params]
    sizes = [int(np.prod(s)) for s in shapes]
    B = X.shape[0]

    def unflat(w):
        out, i = [], 0
        for s, n in zip(shapes, sizes):
            out.append(w[i:i + n].reshape(s))
            i += n
        return out

    def res_jac(w, k=None):
        ps = unflat(w)
        f = model.forward(ps, X)
        cols = []
        for j in range(w.size):  # J by JVPs along the unit vectors (the model's forward mode)
            e = np.zeros(w.size)
            e[j] = 1.0
            cols.append(model.jvp(ps, X, unflat(e))[1].ravel())
        return (f - Y).ravel() / np.sqrt(B), np.stack(cols, axis=1) / np.sqrt(B)

    def fun(w):
        ps = unflat(w)
        f, pull = model.vjp(ps, X)
        gr = pull((f - Y) / B)
        return 0.5 * np.sum((f - Y) ** 2) / B, np.concatenate([a.ravel() for a in gr])

    def converged(w):
        return fun(w)[0] < TOL

    w0 = np.concatenate([p.ravel() for p in params])
    if kind == "lm":
        return levenberg_marquardt(res_jac, w0, converged, MAX_RR)
    return bfgs(fun, w0, converged, MAX_RR)


def rr_table(results: dict, settings_used: dict) -> None:
    t0 = time.perf_counter()
    seeds = range(10)
    for lam in (0.1, 1.0):
        hits = [rr_run(cc.CurveBall(lam=lam), s, MAX_RR) for s in seeds]
        results[f"CurveBall (lam0={lam:g})"]["Rahimi & Recht"] = stats([np.nan if h is None else h for h in hits])
    for label, spec, make in (
        ("SGD + momentum", RR_SGD_GRID, lambda s: cc.SGD(lr=s["lr"], momentum=s["momentum"])),
        ("Adam", RR_ADAM_GRID, lambda s: cc.Adam(lr=s["lr"], betas=(s["beta1"], 0.999))),
    ):
        sets = grid(spec)
        search = [[np.nan if (h := rr_run(make(s), seed, MAX_RR_FIRST)) is None else h for seed in range(3)]
                  for s in sets]
        best, _ = best_setting(sets, [np.array(h) for h in search])
        hits = [rr_run(make(best), seed, MAX_RR_FIRST) for seed in seeds]
        results[label]["Rahimi & Recht"] = stats([np.nan if h is None else h for h in hits])
        settings_used[f"{label} / Rahimi & Recht"] = best
    for label, kind in (("Levenberg-Marquardt", "lm"), ("BFGS", "bfgs")):
        hits = [rr_second_order(kind, s) for s in seeds]
        results[label]["Rahimi & Recht"] = stats([np.nan if h is None else h for h in hits])
    print(f"Rahimi & Recht: {time.perf_counter() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------

PAPER = {
    "SGD + momentum": ["370 ± 40", "846 ± 217", "4069 ± 565", "95 ± 2"],
    "Adam": ["799 ± 160.5", "1290 ± 476", "2750 ± 257", "95 ± 5"],
    "Levenberg-Marquardt": ["16 ± 4", "8 ± 3", "11 ± 5", "9 ± 4"],
    "BFGS": ["19 ± 4", "44 ± 21", "63 ± 29", "43 ± 21"],
    "CurveBall (lam0=0.1)": ["13 ± 0.5", "12 ± 1", "13 ± 1", "35 ± 11"],
    "CurveBall (lam0=1)": ["—", "—", "—", "—"],
}
COLUMNS = ["det", "U[0,1]", "U[0,3]", "Rahimi & Recht"]


def cell(s):
    if s is None or s["mean"] is None:
        return f"none of {s['runs']}" if s else "—"
    txt = f"{s['mean']:.1f} ± {s['std']:.1f}"
    if s["converged"] < s["runs"]:
        txt += f" ({s['converged']}/{s['runs']})"
    return txt


def render(data: dict) -> dict[str, str]:
    results, settings_used = data["results"], data["settings"]
    lines = [caption(data, NAME), "",
             "| method | Rosenbrock det. | U[0,1] | U[0,3] | Rahimi & Recht |", "|---|---|---|---|---|"]
    for method, row in results.items():
        lines.append(f"| {method} (ours) | " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |")
        lines.append(f"| {method} (paper) | " + " | ".join(PAPER[method]) + " |")
    lines.append("")
    lines.append("Selected first-order settings (grid search): " + "; ".join(
        f"{k}: {', '.join(f'{a}={b:g}' for a, b in v.items())}" for k, v in settings_used.items()))
    return {"": "\n".join(lines)}


def trajectories_png(settings_used):
    plt = pyplot()
    w0 = np.array([-1.5, 2.0])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    uu, vv = np.meshgrid(np.linspace(-2, 2, 300), np.linspace(-2, 3, 300))
    R = (1 - uu) ** 2 + 100 * (vv - uu**2) ** 2
    for ax, (name, lims) in zip(axes[:2], (("deterministic", (1.0, 1.0)), ("eps ~ U[0,1]", (0.0, 1.0)))):
        eps = np.random.default_rng(1000).uniform(*lims, size=MAX_FIRST)
        ax.contourf(uu, vv, np.log1p(R), levels=30, cmap="Greys")
        paths = {}
        key = "det" if lims[0] == lims[1] else "U[0,1]"
        sgd, adam = settings_used[f"SGD + momentum / Rosenbrock {key}"], settings_used[f"Adam / Rosenbrock {key}"]
        for label, opt in (("CurveBall lam0=0.1", cc.CurveBall(lam=0.1)),
                           ("SGD+momentum", cc.SGD(lr=sgd["lr"], momentum=sgd["momentum"])),
                           ("Adam", cc.Adam(lr=adam["lr"], betas=(adam["beta1"], 0.999)))):
            p: list = [w0.copy()]
            run_library(opt, w0, eps, MAX_CB if label.startswith("CurveBall") else MAX_FIRST, p)
            paths[label] = np.array(p)
        p = [w0.copy()]
        rosen_lm(w0, eps, p)
        paths["Levenberg-Marquardt"] = np.array(p)
        p = [w0.copy()]
        rosen_bfgs(w0, lims, 1000, p)
        paths["BFGS"] = np.array(p)
        for label, P in paths.items():
            ax.plot(P[:, 0], P[:, 1], ".-", ms=3, lw=1, label=f"{label} ({len(P) - 1} it.)")
        ax.plot([1], [1], "r*", ms=12)
        ax.set_xlim(-2, 2)
        ax.set_ylim(-2, 3)
        ax.set_title(f"Rosenbrock {name}, start (-1.5, 2)")
        ax.legend(fontsize=7, loc="lower right")
        if name == "deterministic":
            det_paths = paths
    for label, P in det_paths.items():
        axes[2].semilogy(np.arange(len(P)), [np.linalg.norm(w - 1) for w in P], label=label)
    axes[2].axhline(TOL, color="k", ls=":", lw=1)
    axes[2].set_xscale("symlog", linthresh=10)
    axes[2].set_xlim(left=0)
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("||w - (1, 1)||")
    axes[2].set_title("deterministic: distance to the minimum")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    savefig(fig, "curveball_rosenbrock.png")


def run(args) -> dict:
    methods = ["CurveBall (lam0=0.1)", "CurveBall (lam0=1)", "SGD + momentum", "Adam", "Levenberg-Marquardt",
               "BFGS"]
    results: dict = {m: {} for m in methods}
    settings_used: dict = {}
    rosenbrock_table(results, settings_used)
    rr_table(results, settings_used)
    trajectories_png(settings_used)
    return {"results": results, "settings": settings_used,
            "grids": {"rosenbrock_sgd": SGD_GRID, "rosenbrock_adam": ADAM_GRID, "rr_sgd": RR_SGD_GRID,
                      "rr_adam": RR_ADAM_GRID},
            "max_iter": {"curveball_lm_bfgs_rosenbrock": MAX_CB, "first_order_rosenbrock": MAX_FIRST,
                         "second_order_rr": MAX_RR, "first_order_rr": MAX_RR_FIRST}}


if __name__ == "__main__":
    main(sys.modules[__name__])
