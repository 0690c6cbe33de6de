"""curvcore: second-order training methods written once over the Python array API.

>>> import curvcore as cc
>>> model, params = cc.backends.mlp("numpy", [64, 32, 10], activation="tanh", seed=0)
>>> opt = cc.SGD(lr=0.1, momentum=0.9)
>>> state = opt.init(params)
"""

from . import losses, methods, protocol, tree, tree_algebra
from .curvature import Linearization, ggn_vp, linearization
from .layers import LayerSpec, Records
from .methods import REGISTRY
from .methods import get as get_method
from .methods import names as method_names
from .methods._base import LayerwiseMethod, Method
from .methods.adam import Adam
from .methods.sgd import SGD
from .protocol import LayerRecord, Model

from . import backends  # noqa: E402  (backends import the core; keep last)
from .checkpoint import load, save  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    """Every registered method class by name (``cc.CurveBall``)."""
    return getattr(methods, name)


__all__ = [
    "Adam", "SGD", "LayerRecord", "LayerSpec", "LayerwiseMethod", "Linearization", "Method", "Model", "REGISTRY",
    "Records", "backends", "get_method", "ggn_vp", "linearization", "load", "losses", "method_names", "protocol", "save", "tree",
    "tree_algebra",
]
