"""Shared fixtures. Tests run on one thread: CI has 2 cores and results must not depend on threading."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# The machine's index of privacy ledgers (privacy/ledger_index.py) is never the account's own: tests create deployed
# sites over the same synthetic patients again and again. Set before any fixture starts a process (module-scoped
# deployments inherit it); each test then gets an index of its own (`isolated_ledger_index`).
SESSION_INDEX_DIR = Path(tempfile.mkdtemp(prefix="oncofed-test-index-"))
os.environ["ONCOFED_LEDGER_INDEX"] = str(SESSION_INDEX_DIR / "ledger-index.json")

from simulations.baseline import SHARED_DATA  # noqa: E402 - ../shared/data, or ONCOFED_SHARED_DATA


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_unconfigure(config):
    import shutil

    shutil.rmtree(SESSION_INDEX_DIR, ignore_errors=True)


# xdist hands out whole modules (--dist loadfile), in collection order (--no-loadscope-reorder): the modules
# that take longest start first, so the suite ends when the longest one does rather than when a long module
# handed out last does. Minutes each in a fresh clone's run on 2 workers (docs/results.md#the-test-suite).
LONGEST_FIRST = ("test_deployment.py", "test_federation.py", "test_distributed_dp.py", "test_benchmarks.py",
                 "test_scale.py", "test_experiment.py", "test_privacy_ledger.py", "test_serve.py", "test_registry.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept


@pytest.fixture(autouse=True)
def isolated_ledger_index(monkeypatch, tmp_path_factory) -> Path:
    """This test's own index of privacy ledgers: another test's sites (the same synthetic patients) are not this one's."""
    path = tmp_path_factory.mktemp("ledger-index") / "ledger-index.json"
    monkeypatch.setenv("ONCOFED_LEDGER_INDEX", str(path))
    return path


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "tcga_pancan33" / "labels.csv").is_file():
        pytest.skip(f"needs the consortium's shared data at {SHARED_DATA} (absent here; ONCOFED_SHARED_DATA names another folder)")
    return SHARED_DATA


@pytest.fixture
def tiny_schema():
    from tests.factories import tiny_schema

    return tiny_schema()
