"""The per-process part of the data-parallel tests (imported by the spawned processes)."""

from __future__ import annotations

import os
import warnings

import numpy as np

NETS = ("mlp", "plain_mlp", "cnn")
STEPS = 5
BATCH = 32


def build(net: str, seed: int = 0):
    """The digits MLP [64, 32, 10] or the digits CNN, float64, the same weights in every process."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if net == "mlp":  # a module that takes the generic path (Flatten first)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    if net == "plain_mlp":  # Sequential(Linear, act, Linear): the hand-written sweeps, on (B, 64) inputs
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10)).double()


def batches(n_steps: int = STEPS, seed: int = 0):
    """``n_steps`` full batches of digits images (B, 1, 8, 8) with labels, the same in every process."""
    import torch

    from curvcore.data import digits

    split = digits(seed=0)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        idx = rng.choice(len(split.y_train), BATCH, replace=False)
        out.append((torch.tensor(split.x_train[idx].reshape(-1, 1, 8, 8)), torch.tensor(split.y_train[idx])))
    return out


def inputs(net: str, x):
    """The images as (B, 64) rows for the plain MLP."""
    return x.reshape(x.shape[0], -1) if net == "plain_mlp" else x


def run(method: str, net: str, shard: tuple[int, int] | None, process_group=None) -> dict[int, list[np.ndarray]]:
    """Params after steps 1 and ``STEPS`` of ``method`` on ``net``; ``shard = (rank, size)`` takes that part."""
    import curvcore as cc
    from curvcore.backends.torch import Optimizer

    module = build(net)
    opt = Optimizer(module, cc.get_method(method).make_test(), "ce", process_group=process_group)
    out = {}
    for t, (x, y) in enumerate(batches(), start=1):
        x = inputs(net, x)
        if shard is not None:
            rank, size = shard
            part = slice(rank * BATCH // size, (rank + 1) * BATCH // size)
            x, y = x[part], y[part]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(x, y)
        if t in (1, STEPS):
            out[t] = [p.detach().numpy().copy() for p in module.parameters()]
    return out


def worker(rank: int, size: int, port: int, folder: str, methods: list[str]) -> None:
    """One process of a 2-process gloo group on 127.0.0.1: every method on both nets, results to ``folder``."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        for net in NETS:
            for method in methods:
                res = run(method, net, (rank, size), dist.group.WORLD)
                np.savez(os.path.join(folder, f"{method}-{net}-{rank}.npz"),
                         **{f"{t}_{i}": a for t, ps in res.items() for i, a in enumerate(ps)})
    finally:
        _leave(dist)


def _leave(dist) -> None:
    """Wait for the other rank, then tear the group down: a rank destroying its gloo group while the other
    still talks to it can abort (``terminate called without an active exception``, seen once under load)."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def bad_setup_worker(rank: int, size: int, port: int, folder: str, scenario: str) -> None:
    """Ranks that disagree (batch sizes, or weights at start); each rank writes the error it raised."""
    import torch
    import torch.distributed as dist

    import curvcore as cc
    from curvcore.backends.torch import Optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    message = "no error"
    try:
        module = build("mlp")
        if scenario == "weights" and rank == 1:
            with torch.no_grad():
                next(module.parameters()).add_(1e-3)
        opt = Optimizer(module, cc.CurveBall(), "ce", process_group=dist.group.WORLD)
        x, y = batches(1)[0]
        n = 16 if scenario != "batch" or rank == 0 else 8
        opt.step(x[:n], y[:n])
    except (ValueError, TypeError) as err:
        message = f"{type(err).__name__}: {err}"
    finally:
        with open(os.path.join(folder, f"{scenario}-{rank}.txt"), "w") as fh:
            fh.write(message)
        _leave(dist)
