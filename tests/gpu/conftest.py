"""GPU tests run only where CUDA is usable; elsewhere they skip cleanly."""

from __future__ import annotations

import pytest

from kvfabric.tiers.gpu import cuda_usable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cuda_usable():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
