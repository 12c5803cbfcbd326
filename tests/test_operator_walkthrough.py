"""Faults an operator met walking through the guide (operator review of 2026-12-06): each test reproduces one with
real files, without starting Flower or nginx."""

from __future__ import annotations

import json
import logging
import types

import pytest


def test_a_site_that_never_connects_is_named_while_the_run_waits_and_in_its_failure(tmp_path, monkeypatch, caplog):
    """A run waited up to round-timeout (600 s) for a site showing only `round 0/2 done`, then failed with a count
    ("3 did; at least 4 needed") and no name: the registered sites not connected are named, a removed one is not."""
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    import server.workflow
    from server.workflow import RoundsWorkflow

    register = tmp_path / "consortium.json"
    register.write_text(json.dumps({"sites": [
        {"name": "Hosp A", "node_id": "11"}, {"name": "Hosp B", "node_id": "12"},
        {"name": "Hosp C", "node_id": "13", "removed": "2026-12-06T10:00:00Z"}, {"name": "Hosp D", "node_id": "14"}]}))
    cm = SimpleClientManager()
    cm.register(GridClientProxy(11, None, 0))
    context = types.SimpleNamespace(client_manager=cm, state=types.SimpleNamespace(config_records={}),
                                    run_config={"site-registry": str(register), "output-dir": str(tmp_path / "r1")})
    (tmp_path / "r1").mkdir()
    monkeypatch.setattr(server.workflow, "WAIT_REPORT_EVERY", 0.3)
    workflow = RoundsWorkflow(wait_for_sites=3, wait_timeout=1.0, enough_sites=2)
    caplog.set_level(logging.INFO, logger="flwr")
    with pytest.raises(RuntimeError, match=r"\(1 did; at least 2 needed\); not connected: Hosp B \(node 12\), "
                                           r"Hosp D \(node 14\); check that each one's SuperNode is running"):
        workflow._wait_for_sites(context)
    assert "not yet: Hosp B (node 12), Hosp D (node 14)" in caplog.text and "Hosp C" not in caplog.text
    progress = json.loads((tmp_path / "r1" / "progress.json").read_text())  # what `oncofed run` prints meanwhile
    assert progress["stage"] == "waiting for sites" and progress["asked"] == [11, 12, 14]
    assert progress["answered"] == [11]
    cm.register(GridClientProxy(12, None, 0))  # enough (min-sites 2) to start without Hosp D, named
    caplog.clear()
    workflow._wait_for_sites(context)
    assert "only 2 of the 3 expected sites connected within 1 s; not connected: Hosp D (node 14); starting" \
        in caplog.text
