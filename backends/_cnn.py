"""The digits CNN on torch and flax with identical weights (behind :func:`curvcore.backends.cnn`).

``Conv2d(1, c, 3, padding=1) -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(16 c, 10)`` on 8 x 8
images: ``(B, 1, 8, 8)`` on torch, ``(B, 8, 8, 1)`` on flax. The weights are drawn once with
NumPy in the torch layout (:func:`init_weights`) and moved to flax's layout by
:func:`torch_to_flax`: the conv kernel ``(c, 1, 3, 3)`` becomes ``(3, 3, 1, c)``, and the head's
columns, which torch flattens in ``(c, h, w)`` order and flax in ``(h, w, c)`` order, are permuted.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

SIDE = 8
CLASSES = 10
POOLED = SIDE // 2


def init_weights(channels: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """float64 weights in the torch layout, drawn like torch's default init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    rng = np.random.default_rng(seed)

    def uniform(fan_in: int, shape: tuple) -> np.ndarray:
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    head_in = channels * POOLED * POOLED
    return {"conv.weight": uniform(9, (channels, 1, 3, 3)), "conv.bias": uniform(9, (channels,)),
            "fc.weight": uniform(head_in, (CLASSES, head_in)), "fc.bias": uniform(head_in, (CLASSES,))}


def torch_to_flax(weights: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The torch-layout weights (NumPy) as flax's params of :func:`flax_module`."""
    conv_w, fc_w = np.asarray(weights["conv.weight"]), np.asarray(weights["fc.weight"])
    c = conv_w.shape[0]
    head = fc_w.reshape(CLASSES, c, POOLED, POOLED).transpose(2, 3, 1, 0).reshape(-1, CLASSES)
    return {"Conv_0": {"kernel": conv_w.transpose(2, 3, 1, 0), "bias": np.asarray(weights["conv.bias"])},
            "Dense_0": {"kernel": head, "bias": np.asarray(weights["fc.bias"])}}


def flax_to_torch(params: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """The inverse of :func:`torch_to_flax` (NumPy arrays in the torch layout)."""
    kernel, head = np.asarray(params["Conv_0"]["kernel"]), np.asarray(params["Dense_0"]["kernel"])
    c = kernel.shape[-1]
    fc_w = head.reshape(POOLED, POOLED, c, CLASSES).transpose(3, 2, 0, 1).reshape(CLASSES, -1)
    return {"conv.weight": kernel.transpose(3, 2, 0, 1), "conv.bias": np.asarray(params["Conv_0"]["bias"]),
            "fc.weight": fc_w, "fc.bias": np.asarray(params["Dense_0"]["bias"])}


def torch_cnn(weights: dict[str, np.ndarray], dtype: str, device: Any = None) -> tuple[Any, list]:
    """``(TorchModel, params)`` of the CNN holding ``weights``."""
    import torch
    from torch import nn

    from .torch import TorchModel

    c = weights["conv.weight"].shape[0]
    tdtype = getattr(torch, dtype)
    net = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(c * POOLED * POOLED, CLASSES)).to(dtype=tdtype, device=device)
    with torch.no_grad():
        for p, key in zip(net.parameters(), ("conv.weight", "conv.bias", "fc.weight", "fc.bias")):
            p.copy_(torch.as_tensor(weights[key], dtype=tdtype))
    model = TorchModel(net)
    return model, model.params()


@functools.cache
def flax_module(channels: int, dtype: str) -> Any:
    """The CNN as a ``flax.linen`` module on ``(B, 8, 8, 1)`` images."""
    import flax.linen as nn
    import jax.numpy as jnp

    class DigitsCNN(nn.Module):
        channels: int
        param_dtype: Any

        @nn.compact
        def __call__(self, x: Any) -> Any:
            x = nn.relu(nn.Conv(self.channels, (3, 3), padding=1, param_dtype=self.param_dtype)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            return nn.Dense(CLASSES, param_dtype=self.param_dtype)(x.reshape(x.shape[0], -1))

    return DigitsCNN(channels, getattr(jnp, dtype))


def flax_cnn(weights: dict[str, np.ndarray], dtype: str, device: Any = None) -> tuple[Any, dict]:
    """``(FlaxModel, params)`` of the CNN holding ``weights``."""
    import jax

    from .jax import from_flax, from_numpy

    module = flax_module(int(weights["conv.weight"].shape[0]), dtype)
    params = jax.tree_util.tree_map(lambda a: from_numpy(a.astype(dtype), device=device), torch_to_flax(weights))
    return from_flax(module, {"params": params})
