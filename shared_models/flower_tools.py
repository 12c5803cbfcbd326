"""Flower's command-line tools (flwr, flower-supernode, flower-superlink) of the environment OncoFed runs in.

OncoFed runs them as subprocesses. Taken from PATH, a service started as /opt/oncofed/venv/bin/oncofed (the
systemd units) without the virtualenv on its PATH found none (a traceback) or another Flower installation's, whose
version may not be the pinned one. The tool beside this interpreter comes first; PATH is the fallback.
"""

from __future__ import annotations

import shutil
import sys
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
