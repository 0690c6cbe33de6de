"""Data-parallel training with curvcore on torch.distributed: 2 CPU processes (gloo) on the digits.

    python docs/examples/torch_ddp.py                     # launches its 2 processes itself
    torchrun --nproc-per-node 2 docs/examples/torch_ddp.py
    python docs/examples/torch_ddp.py --smoke             # a few steps (the test suite runs this)
    python docs/examples/torch_ddp.py --measure out.json  # time and bytes per step, every method

Every rank builds the same network (same seed), passes ``process_group`` to
``curvcore.backends.torch.Optimizer`` and feeds its own half of each batch;
the method all-reduces what it needs, so both ranks take exactly the step one
process would take on the whole batch. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import curvcore as cc
from curvcore.backends.torch import Optimizer
from curvcore.data import digits

NETS = {"small": [64, 64, 10], "medium": [784, 512, 256, 10]}


def mlp(sizes: list[int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if k < len(sizes) - 2 else [])
    return nn.Sequential(*layers).double()


def train(rank: int, size: int, steps: int) -> None:
    """Train CurveBall on the digits MLP; rank 0 prints the loss (the same on every rank)."""
    split = digits(seed=0)
    x, y = torch.tensor(split.x_train), torch.tensor(split.y_train)
    net = mlp(NETS["small"])
    opt = Optimizer(net, cc.CurveBall(), nn.CrossEntropyLoss(), process_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(0)  # the same batches on every rank
    for step in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:64]
        mine = idx[rank * 64 // size:(rank + 1) * 64 // size]
        info = opt.step(x[mine], y[mine])
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {float(info['loss']):.4f}  ({opt.reducer.collectives} collectives so far)")


def measure(rank: int, size: int, out: str | None) -> dict:
    """Per method and net: median step time, and bytes this rank sends per step (after one warm-up step)."""
    rng = np.random.default_rng(0)
    rows = []
    for net_name, sizes in NETS.items():
        B = 64 if net_name == "small" else 512
        x = torch.tensor(rng.standard_normal((B, sizes[0])))
        y = torch.tensor(rng.integers(0, sizes[-1], B))
        part = slice(rank * B // size, (rank + 1) * B // size)
        for method in cc.method_names():
            net = mlp(sizes)
            group = dist.group.WORLD if size > 1 else None
            opt = Optimizer(net, cc.get_method(method).make(), "ce", process_group=group)
            opt.method.validate = False
            times, sent, calls = [], [], []
            for _ in range(6 if net_name == "small" else 3):
                before = (opt.reducer.bytes, opt.reducer.collectives) if opt.reducer else (0, 0)
                t0 = time.perf_counter()
                opt.step(x[part], y[part])
                times.append(time.perf_counter() - t0)
                after = (opt.reducer.bytes, opt.reducer.collectives) if opt.reducer else (0, 0)
                sent.append(after[0] - before[0])
                calls.append(after[1] - before[1])
            param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
            rows.append({"net": net_name, "method": method, "ms": 1e3 * statistics.median(times[1:]),
                         "bytes": statistics.median(sent[1:]), "max_bytes": max(sent[1:]),
                         "collectives": statistics.median(calls[1:]), "param_bytes": param_bytes,
                         "settings": repr(opt.method)})
    if rank == 0 and out:
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return {"rows": rows}


def _process(rank: int, size: int, port: int, mode: str, arg: object) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        train(rank, size, arg) if mode == "train" else measure(rank, size, arg)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    parser.add_argument("--measure", metavar="JSON", help="time and bytes per step of every method")
    parser.add_argument("--procs", type=int, default=2, help="processes (1: the single-process baseline)")
    args = parser.parse_args(argv)
    mode, arg = ("measure", args.measure) if args.measure else ("train", 5 if args.smoke else 60)
    if args.procs == 1 and mode == "measure":
        torch.set_num_threads(1)
        measure(0, 1, arg)
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        try:
            train(dist.get_rank(), dist.get_world_size(), arg) if mode == "train" else measure(
                dist.get_rank(), dist.get_world_size(), arg)
        finally:
            dist.destroy_process_group()
        return
    mp.spawn(_process, args=(args.procs, _free_port(), mode, arg), nprocs=args.procs, join=True)


if __name__ == "__main__":
    main()
