"""Test tiers follow the folder a test lives in: tests/unit, tests/component, tests/e2e.

The marker is added here so that `-m unit` (or `-m "not slow"`) selects by tier without
every module repeating it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_TIERS = ("unit", "component", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
