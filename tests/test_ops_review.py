"""Operator-path faults found in review: each test reproduces one without starting Flower or nginx."""

from __future__ import annotations

import socket

import pytest

from privacy.pki import init_consortium
from server.deploy import Consortium, server_checks


@pytest.fixture
def consortium(tmp_path):
    init_consortium(tmp_path / "op", "t", "127.0.0.1:8443", internal_port=9092)
    return Consortium.load(tmp_path / "op")


def test_a_metrics_port_in_use_fails_preflight_naming_the_option(consortium):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        failed = [c for c in server_checks(consortium, port) if not c.ok]
    assert any(f"127.0.0.1:{port}" in c.name and "--metrics-port" in c.name for c in failed), failed
    assert all("--metrics-port" not in c.name for c in server_checks(consortium, 0))
