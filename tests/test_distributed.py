"""Data-parallel training with torch.distributed: 2 processes x half batch == 1 process x full batch.

Two CPU processes (gloo, 127.0.0.1 only, bounded time) run every registered
method on the digits MLP and CNN, each on its half of the same batches; after
1 and 5 steps their params equal the single-process steps on the full batch to
1e-10 in float64 (the all-reduces only change the summation order).
"""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import curvcore as cc
import distributed_worker as W

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(fn, *args, timeout=TIMEOUT_S):
    """Run ``fn(rank, 2, port, *args)`` in 2 spawned processes; fail (killing them) after ``timeout`` s."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(2, _free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process run did not finish in {timeout} s (a rank hung?)")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Run the 2-process group once for every method; the per-rank results as files."""
    folder = tmp_path_factory.mktemp("ddp")
    _two_processes(W.worker, str(folder), cc.method_names())
    return folder


@pytest.mark.parametrize("net", W.NETS)
@pytest.mark.parametrize("method", cc.method_names())
def test_two_half_batches_equal_one_full_batch(two_process_results, method, net):
    torch.set_num_threads(1)
    ref = W.run(method, net, None)
    for rank in (0, 1):
        got = np.load(two_process_results / f"{method}-{net}-{rank}.npz")
        for t in (1, W.STEPS):
            for i, want in enumerate(ref[t]):
                a = got[f"{t}_{i}"]
                assert np.max(np.abs(a - want)) <= 1e-10 * max(np.max(np.abs(want)), 1e-300), (rank, t, i)


@pytest.mark.parametrize("scenario,message", [("batch", "batch sizes differ across ranks"),
                                              ("weights", "weights or method states differ across ranks")])
def test_disagreeing_ranks_raise_on_every_rank_instead_of_hanging(tmp_path, scenario, message):
    _two_processes(W.bad_setup_worker, str(tmp_path), scenario, timeout=180)
    for rank in (0, 1):
        assert message in (tmp_path / f"{scenario}-{rank}.txt").read_text(), rank


def test_a_ddp_module_is_refused():
    """A DDP-wrapped module is refused with a pointer to process_group (no process group needed)."""
    from curvcore.backends.torch import Optimizer

    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # skip DDP's own setup: only the type matters here
            torch.nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match="process_group"):
        Optimizer(FakeDDP(W.build("mlp")), cc.SGD(), "ce")
