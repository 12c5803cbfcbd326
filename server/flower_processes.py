"""Flower's SuperLink and SuperExec as `oncofed server start` runs them (`python -m server.flower_processes
superlink|superexec ARGS...`): Flower's own entry points with two changes for a loaded server (issue 17).

- SuperLink: SQLite's busy timeout 60 s instead of Flower's 5 s. Every pull, heartbeat and Runtime API
  call is a write transaction on one database; on a busy 2-core server a writer waited more than 5 s,
  Flower answered HTTP 500 "database is locked", and the ServerApp's task heartbeat (which retries only
  503/504) stopped, so the SuperLink expired its token and the run failed. Waiting longer is correct:
  the writes are short, only their queue was long.
- SuperExec: HTTP 500 and 429 retried with Flower's backoff like 502/503/504. One 500 on `acquire-task`
  ended Flower's SuperExec, and with it every new run's launch, while the SuperLink stayed healthy.
  (The supervisor restarts it anyway; this keeps a transient error from costing a restart.)
  And it reaps the ServerApps it launched once they end: Flower's SuperExec drops each launch's Popen, so
  a finished run's `flwr-serverapp` stayed a zombie (`<defunct>`) until the next run was launched.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from shared_models.flower_tools import RETRIED_STATUS

SQLITE_BUSY_TIMEOUT_MS = 60_000
REAP_SECONDS = 5.0


def reap_dropped_children() -> None:
    """Collect the exit status of every child whose Popen was dropped while it ran (as Flower's SuperExec drops
    its ServerApps'): Python keeps those in subprocess's list of active children and reaps them only when a
    new Popen is made. Children someone still holds a Popen for are theirs to wait for, and are not touched."""
    subprocess._cleanup()  # the standard library's own reaping of that list (no status is taken from anyone)


def _reap_forever(stop: threading.Event) -> None:
    while not stop.wait(REAP_SECONDS):
        reap_dropped_children()


def superlink(argv: list[str]) -> None:
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(("busy_timeout", str(SQLITE_BUSY_TIMEOUT_MS)) if k == "busy_timeout" else (k, v)
                                     for k, v in sql_mixin.SQLITE_PRAGMAS)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]  # flwr names its process (and exit messages) from argv[0]
    flower_superlink()


def superexec(argv: list[str]) -> None:
    from flwr.supercore.retry import http_retry

    http_retry._RETRYABLE_STATUS_CODES = RETRIED_STATUS  # read at each failure by Flower's should-give-up test
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *argv]
    threading.Thread(target=_reap_forever, args=(threading.Event(),), name="reap-serverapps", daemon=True).start()
    flower_superexec()


if __name__ == "__main__":
    {"superlink": superlink, "superexec": superexec}[sys.argv[1]](sys.argv[2:])
