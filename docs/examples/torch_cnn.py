"""Train a small CNN on the digits with curvcore methods inside an ordinary PyTorch loop.

    python docs/examples/torch_cnn.py            # 3 epochs per method
    python docs/examples/torch_cnn.py --smoke    # a few steps (the test suite runs this)

The digits (8x8, scikit-learn, nothing downloaded) are (B, 1, 8, 8) images. Each
method drives the network through ``curvcore.backends.torch.Optimizer``, a
``torch.optim.Optimizer``, with a ``StepLR`` schedule; K-FAC preconditions the
convolution with its Kronecker factors.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import curvcore as cc
from curvcore.backends.torch import Optimizer
from curvcore.data import digits


def make_cnn(seed: int = 0) -> nn.Module:
    """Conv2d -> ReLU -> MaxPool -> Linear, float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 16, 10)).double()


def load(device: str = "cpu") -> tuple[torch.Tensor, ...]:
    split = digits(seed=0)
    as_images = lambda a: torch.tensor(a.reshape(-1, 1, 8, 8), dtype=torch.float64, device=device)  # noqa: E731
    return (as_images(split.x_train), torch.tensor(split.y_train, device=device),
            as_images(split.x_test), torch.tensor(split.y_test, device=device))


def train(method: cc.Method, epochs: int, steps_per_epoch: int | None, batch: int = 64, seed: int = 0) -> dict:
    """Train one method; returns the final training loss, test accuracy and seconds."""
    x, y, x_test, y_test = load()
    net, loss = make_cnn(seed), nn.CrossEntropyLoss()
    opt = Optimizer(net, method, loss)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)  # per epoch
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for k, i in enumerate(range(0, len(y) - batch + 1, batch)):
            if steps_per_epoch is not None and k >= steps_per_epoch:
                break
            idx = order[i:i + batch]
            opt.step(x[idx], y[idx])
        sched.step()
    with torch.no_grad():
        train_loss = float(loss(net(x), y))
        accuracy = float((net(x_test).argmax(1) == y_test).double().mean())
    return {"train loss": train_loss, "test accuracy": accuracy, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    args = parser.parse_args(argv)
    epochs, steps = (1, 5) if args.smoke else (3, None)
    torch.set_num_threads(1)
    methods = {"SGD": cc.SGD(lr=0.1, momentum=0.9), "CurveBall": cc.CurveBall(),
               "K-FAC": cc.KFAC(lr=0.3, refresh_every=10)}
    results = {name: train(m, epochs, steps) for name, m in methods.items()}
    print(f"{'method':10s} {'train loss':>10s} {'test acc':>9s} {'seconds':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['train loss']:10.4f} {r['test accuracy']:9.3f} {r['seconds']:8.2f}")
    return results


if __name__ == "__main__":
    main()
