"""A residual network with BatchNorm on the digits, trained by layer-wise curvature methods.

    python docs/examples/torch_resnet_bn.py            # 3 epochs per method
    python docs/examples/torch_resnet_bn.py --smoke    # a few steps (the test suite runs this)

K-FAC preconditions every Conv2d and the Linear head; ESN and MK precondition
the head (the output chain of dense layers); the BatchNorm affine parameters take
the plain gradient step (each method says which once, in a warning). The
running statistics are updated once per step, exactly as one ``net(x)`` in
train mode would.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import curvcore as cc
from curvcore.backends.torch import Optimizer
from curvcore.data import digits


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def make_resnet(channels: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         ResBlock(channels), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 16, 10)).double()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the test suite")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    split = digits(seed=0)
    x = torch.tensor(split.x_train.reshape(-1, 1, 8, 8))
    y = torch.tensor(split.y_train)
    x_test, y_test = torch.tensor(split.x_test.reshape(-1, 1, 8, 8)), torch.tensor(split.y_test)
    steps = 5 if args.smoke else 3 * (len(y) // 64)
    results = {}
    for name, method in {"K-FAC": cc.KFAC(lr=0.3, refresh_every=10), "ESN": cc.ESN(lr=0.3),
                         "MK": cc.MK(lr=0.5), "SGD": cc.SGD(lr=0.1, momentum=0.9)}.items():
        net = make_resnet()
        opt = Optimizer(net, method, nn.CrossEntropyLoss())
        gen = torch.Generator().manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                idx = torch.randint(len(y), (64,), generator=gen)
                info = opt.step(x[idx], y[idx])
        net.eval()
        with torch.no_grad():
            acc = float((net(x_test).argmax(1) == y_test).double().mean())
        results[name] = {"last batch loss": float(info["loss"]), "test accuracy": acc,
                         "preconditioned tensors": int(info.get("n_preconditioned", 0))}
        print(f"{name:6s} loss {results[name]['last batch loss']:.4f}  test acc {acc:.3f}  "
              f"preconditioned {results[name]['preconditioned tensors']} tensors"
              + (f"  ({caught[0].message})" if caught else ""))
    return results


if __name__ == "__main__":
    main()
