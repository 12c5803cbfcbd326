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
  a finished run's `flwr-serverapp` stayed a zombie (`<defunct>`) until the next run was launched. Both changes
  are shared_models.flower_tools.run_superexec, which a site's SuperExec runs too (client/flower_superexec.py).
"""

from __future__ import annotations

import sys

from shared_models.flower_tools import run_superexec

SQLITE_BUSY_TIMEOUT_MS = 60_000


def superlink(argv: list[str]) -> None:
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(("busy_timeout", str(SQLITE_BUSY_TIMEOUT_MS)) if k == "busy_timeout" else (k, v)
                                     for k, v in sql_mixin.SQLITE_PRAGMAS)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv]  # flwr names its process (and exit messages) from argv[0]
    flower_superlink()


def superexec(argv: list[str]) -> None:
    run_superexec(argv, "reap-serverapps")


if __name__ == "__main__":
    {"superlink": superlink, "superexec": superexec}[sys.argv[1]](sys.argv[2:])
