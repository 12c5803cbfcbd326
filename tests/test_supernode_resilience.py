"""`oncofed site start` under the server's errors (client/supernode.py): HTTP 5xx retried with Flower's backoff
for a bounded time, and an exit status that makes a service manager restart the site when Flower's loop
ends (the deployment test injects real 500s through the proxy; these pin the two rules)."""

from __future__ import annotations

import subprocess
import sys
import time
import types

import httpx


def _error(status: int, path: str = "/v1/fleet/pull-messages") -> httpx.HTTPStatusError:
    request = httpx.Request("POST", f"https://consortium.example{path}")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))


def test_server_errors_are_retried_within_the_window_and_given_up_after_it():
    from client.supernode import _patch_retries
    from flwr.supernode import fleet_http_connection as fhc

    real = fhc.make_simple_http_retry_invoker
    try:
        _patch_retries(window=0.5)
        invoker = fhc.make_simple_http_retry_invoker()
        assert not invoker.should_giveup(_error(500))  # Flower 1.41 alone gives up here
        assert not invoker.should_giveup(_error(429))
        assert invoker.should_giveup(_error(400))  # a request error is not retried
        time.sleep(0.6)
        assert invoker.should_giveup(_error(500))  # the window is over: the loop may end (exit 4)
        invoker.on_success(types.SimpleNamespace(tries=1, elapsed_time=0.0))
        assert not invoker.should_giveup(_error(503))  # a success opens a new window
    finally:
        fhc.make_simple_http_retry_invoker = real


def test_the_site_exits_4_when_flowers_loop_ends_instead_of_hanging():
    script = """
import sys, threading
import flwr.supernode.cli.flower_supernode
fs = sys.modules["flwr.supernode.cli.flower_supernode"]  # the package attribute of that name is the function
threading.Thread(target=threading.Event().wait, name="like-the-runtime-api").start()  # non-daemon: used to hang
fs.flower_supernode = lambda: None  # Flower's loop returns: it swallowed the error that ended it
from client.supernode import run_supernode
from privacy.site_config import SiteConfig
raise SystemExit(run_supernode(SiteConfig.parse({"site-name": "C9", "superlink": "127.0.0.1:1", "root-certificates": "ca.crt",
                                "auth-supernode-private-key": "site.key", "state-dir": "state", "model-dir": "models"}), port=1))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "restarts it" in proc.stderr
