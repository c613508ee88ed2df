"""hypothesis when it is installed; otherwise stand-ins that skip the property tests
(the GPU machine has no hypothesis and no network), so the other tests still run."""
from __future__ import annotations

import pytest

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where hypothesis is missing
    AVAILABLE = False

    def given(*args, **kwargs):
        return lambda fn: pytest.mark.skip(reason="hypothesis is not installed")(fn)

    class _Strategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _Strategies()
    settings = None

__all__ = ["AVAILABLE", "given", "settings", "st"]
