"""A site's SuperExec as `oncofed site start`'s SuperNode launches it (`python -m client.flower_superexec ARGS...`, in
place of Flower's `flower-superexec`: client/supernode.py): Flower's own, which reaps the ClientApps it launched once
they end (shared_models.flower_tools.run_superexec), and launches each as `oncofed-clientapp`, which checks that the app
the server sent is the site's own OncoFed before it runs (client/clientapp_process.py). Flower's drops each launch's
Popen: a site kept ~2 `flwr-clientapp` zombies a round for its SuperNode's whole life, each counting against the
service's task limit."""

from __future__ import annotations

import sys

from client.clientapp_process import launcher
from shared_models.flower_tools import run_superexec

REAPER = "reap-clientapps"


def superexec_command(command: list[str]) -> list[str]:
    """The command the SuperNode launches its SuperExec with, this module in place of Flower's `flower-superexec`
    (any other command as it is)."""
    if command and command[0] == "flower-superexec":
        return [sys.executable, "-m", "client.flower_superexec", *command[1:]]
    return command


def launch_own_clientapp() -> None:
    """Every ClientApp this SuperExec launches is `oncofed-clientapp` (the one installed with this Python), not Flower's
    `flwr-clientapp`: Flower's launcher takes the command from this table."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(launcher())


if __name__ == "__main__":
    launch_own_clientapp()
    run_superexec(sys.argv[1:], REAPER)
