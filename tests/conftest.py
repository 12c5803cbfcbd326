"""Shared fixtures. Tests run on one thread: CI has 2 cores and results must not depend on threading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "tcga_pancan33" / "labels.csv").is_file():
        pytest.skip(f"needs the consortium's shared data at {SHARED_DATA} (absent in this checkout)")
    return SHARED_DATA


@pytest.fixture
def tiny_schema():
    from tests.factories import tiny_schema

    return tiny_schema()
