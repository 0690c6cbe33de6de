"""The backends as a table: one module per array library with the same interface, dispatched by name."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

import curvcore as cc
from curvcore.backends import _adapter

INTERFACE = [name for name, _ in inspect.getmembers(_adapter.Adapter, inspect.isfunction) if not name.startswith("_")]
AVAILABLE = cc.backends.names()


def test_the_interface_is_the_six_functions():
    assert sorted(INTERFACE) == ["build_mlp", "from_numpy", "namespace", "probe", "synchronize", "to_numpy"]


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_backend_module_has_the_interface(name):
    module = cc.backends.adapter(name)
    assert module.__name__ == f"curvcore.backends.{name}"
    for fn in INTERFACE:
        assert callable(getattr(module, fn, None)), f"curvcore.backends.{name} lacks {fn}()"
    for fn in ("from_numpy", "build_mlp", "synchronize"):
        own = inspect.signature(getattr(module, fn)).parameters
        assert list(own) == [p for p in inspect.signature(getattr(_adapter.Adapter, fn)).parameters if p != "self"]


@pytest.mark.parametrize("name", AVAILABLE)
def test_dispatch_round_trips_and_synchronizes_nested_trees(name):
    """asarray -> backend_of/to_numpy give back the values; synchronize returns any tree unchanged."""
    a = np.arange(6.0).reshape(2, 3).astype("float32")
    b = cc.backends.asarray(name, a)
    assert cc.backends.backend_of(b) == name
    assert cc.backends.namespace(name) is cc.backends.adapter(name).namespace()
    back = cc.backends.to_numpy(b)
    assert back.dtype == np.float32 and np.array_equal(back, a)
    tree = ([b], {"s": (b, 3)}, None)
    assert cc.backends.synchronize(tree) is tree
    assert cc.backends.block_until_ready([b])[0] is b


def test_unknown_names_and_devices_are_refused():
    with pytest.raises(ValueError, match="unknown backend 'numpyy'"):
        cc.backends.adapter("numpyy")
    with pytest.raises(ValueError, match="unknown backend"):
        cc.backends.mlp("tensorflow", [2, 2])
    assert _adapter.parse_device("cuda:1") == ("cuda", 1)
    assert _adapter.parse_device("gpu") == ("gpu", 0)
    assert _adapter.parse_device(2) == ("cuda", 2)
    with pytest.raises(ValueError, match="'cuda:x'"):
        _adapter.parse_device("cuda:x")


def test_a_framework_that_cannot_run_is_quiet_and_a_broken_adapter_is_loud(monkeypatch):
    """``Unavailable`` (e.g. no CUDA device) and a missing framework (also as the cause of the adapter's own
    ImportError) are quiet; a missing module of another name is a bug in the adapter and warns."""
    backends = cc.backends
    monkeypatch.setattr(backends, "_ERRORS", {})  # the probe's messages of this test stay here

    def raising(err):
        def import_module(name):
            raise err
        return import_module

    missing = ImportError("curvcore.backends.cupy needs CuPy")
    missing.__cause__ = ModuleNotFoundError("No module named 'cupy'", name="cupy")
    for err in (_adapter.Unavailable("no CUDA device"), missing,
                ModuleNotFoundError("No module named 'cupy_backends'", name="cupy_backends")):
        monkeypatch.setattr(backends.importlib, "import_module", raising(err))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backends._probe("cupy") is False
    monkeypatch.setattr(backends.importlib, "import_module", raising(ModuleNotFoundError("x", name="cupz")))
    with pytest.warns(RuntimeWarning, match="'cupy' is installed but failed to load"):
        assert backends._probe("cupy") is False
