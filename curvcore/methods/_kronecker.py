"""The Kronecker family's module under its earlier private name (kept importable): see :mod:`.kronecker`."""

from .kronecker import *  # noqa: F401,F403
