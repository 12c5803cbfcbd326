"""Flower's command-line tools (flwr, flower-supernode, flower-superlink) of the environment OncoFed runs in, and the
SuperExec both sides run (`run_superexec`).

OncoFed runs them as subprocesses. Taken from PATH, a service started as /opt/oncofed/venv/bin/oncofed (the
systemd units) without the virtualenv on its PATH found none (a traceback) or another Flower installation's, whose
version may not be the pinned one. The tool beside this interpreter comes first; PATH is the fallback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}  # no telemetry, no update check
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})  # HTTP answers of a proxy in front of the SuperLink retried
SUPERLINK_INTERNAL_PORT = 9092  # the SuperLink's own port behind the TLS proxy, unless the operator chose another
METRICS_PORT = 9464             # the server's Prometheus /metrics on 127.0.0.1
SUPERNODE_POLL_S = 0.5          # seconds between an idle SuperNode's pulls (Flower's own: 3)
SERVER_ERROR_RETRY_S = 600.0    # how long a SuperNode keeps retrying a server that answers errors before it exits


def flower_tool(name: str) -> str:
    """The path of Flower's `name` tool installed with this Python, else the one on PATH, else `name` (the error of
    running it then names it)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name) or name


REAP_SECONDS = 5.0


def reap_dropped_children() -> None:
    """Collect the exit status of every child whose Popen was dropped while it ran (as Flower's SuperExec drops
    the apps it launches): Python keeps those in subprocess's list of active children and reaps them only when a
    new Popen is made. Children someone still holds a Popen for are theirs to wait for, and are not touched."""
    subprocess._cleanup()  # the standard library's own reaping of that list (no status is taken from anyone)


def _reap_forever(stop: threading.Event) -> None:
    while not stop.wait(REAP_SECONDS):
        reap_dropped_children()


def run_superexec(argv: list[str], reaper: str) -> None:
    """Flower's `flower-superexec` in this process, with two changes: HTTP 500 and 429 retried with Flower's backoff
    like 502/503/504 (one 500 on `acquire-task` ended Flower's SuperExec, and with it every later launch), and a
    thread (named `reaper`) that reaps the apps it launched once they end: Flower's SuperExec drops each launch's
    Popen, so each finished `flwr-serverapp` (the server's) or `flwr-clientapp` (a site's, ~2 a round) stayed a
    zombie until the next launch, or for a site's SuperNode its whole life, counting against its service's task
    limit."""
    from flwr.supercore.retry import http_retry

    http_retry._RETRYABLE_STATUS_CODES = RETRIED_STATUS  # read at each failure by Flower's should-give-up test
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *argv]
    threading.Thread(target=_reap_forever, args=(threading.Event(),), name=reaper, daemon=True).start()
    flower_superexec()
