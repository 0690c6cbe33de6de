"""Fixtures (backends, problems) and settings (JAX float64, one torch thread, hypothesis profiles).

Test files import helpers from ``backend_list``, ``cases`` and ``reference``, never from here.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

try:  # float64 in JAX must be switched on before any JAX array exists (tests only)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
except ImportError:  # pragma: no cover - jax is in the test extra
    pass

try:  # hypothesis profiles (tests/test_properties.py): `pytest --hypothesis-profile=thorough` for a long run
    from hypothesis import settings

    # CI: few examples, fixed (derandomized) draws so every run tests the same nets; no example database
    settings.register_profile("default", max_examples=12, deadline=None, derandomize=True, database=None)
    settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True)
    settings.load_profile("default")
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass

from backend_list import ARRAY_API, params  # noqa: E402
from cases import make_problem  # noqa: E402

try:  # the test matrices are tiny: one torch thread avoids oversubscribing a 2-core machine
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(params=params())
def backend(request):
    """Every backend, skipped where missing (and not expected: ``backend_list``)."""
    return request.param


@pytest.fixture(params=params(ARRAY_API))
def array_api_backend(request):
    """numpy, array_api_strict, cupy."""
    return request.param


@pytest.fixture
def problem():
    """``make_problem`` as a fixture: ``problem(backend, sizes=..., ...)``."""
    return make_problem


class SyncCounter:
    """Counts conversions of torch tensors to Python values (each a host sync on a GPU) in ``n``."""

    n = 0

    def per_step(self, method, model, params, x, y, steps: int, loss: str = "ce") -> tuple[list[int], dict]:
        """The count of each of ``steps`` steps of ``method`` from its initial state, and the last ``info``."""
        state, counts = method.init(params), []
        for _ in range(steps):
            self.n = 0
            params, state, info = method.step(model, loss, params, state, x, y)
            counts.append(self.n)
        return counts, info


@pytest.fixture
def torch_syncs(monkeypatch) -> SyncCounter:
    """A :class:`SyncCounter` over every ``Tensor.__bool__/__int__/__float__/__index__/item/tolist``."""
    import torch

    counter = SyncCounter()
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter.n += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counter
