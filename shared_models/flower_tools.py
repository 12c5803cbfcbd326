"""Flower's command-line tools (flwr, flower-supernode, flower-superlink) of the environment OncoFed runs in.

OncoFed runs them as subprocesses. Taken from PATH, a service started as /opt/oncofed/venv/bin/oncofed (the
systemd units) without the virtualenv on its PATH found none (a traceback) or another Flower installation's, whose
version may not be the pinned one. The tool beside this interpreter comes first; PATH is the fallback.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def flower_tool(name: str) -> str:
    """The path of Flower's `name` tool installed with this Python, else the one on PATH, else `name` (the error of
    running it then names it)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name) or name
