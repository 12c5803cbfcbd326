"""Flower's legacy DefaultWorkflow with what a consortium needs around each round.

Same body as `flwr.server.workflow.DefaultWorkflow.__call__` (flwr 1.41), plus: the run waits for
every site once before round 1; the round count can start after a checkpoint's round (SecAgg+ and
FedAdam's bias correction use it); a hook runs after every round (checkpoint, metrics); the
evaluate step gets a timeout (the legacy one has none, so a vanished site would block it).
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.server.compat import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_evaluate_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid


class _TimeoutGrid:
    """A Grid whose send_and_receive always has a timeout."""

    def __init__(self, grid: Grid, timeout: float):
        self._grid, self._timeout = grid, timeout

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout)


def evaluate_with_timeout(timeout: float) -> Callable[[Grid, Context], None]:
    def workflow(grid: Grid, context: Context) -> None:
        default_evaluate_workflow(_TimeoutGrid(grid, timeout), context)

    return workflow


class RoundsWorkflow(DefaultWorkflow):
    def __init__(self, fit_workflow=None, evaluate_workflow=None, *, first_round: int = 1,
                 on_round_end: Callable[[int, LegacyContext], None] | None = None, wait_for_sites: int = 0,
                 wait_timeout: float = 3600.0):
        super().__init__(fit_workflow=fit_workflow, evaluate_workflow=evaluate_workflow)
        self.first_round, self.on_round_end = first_round, on_round_end
        self.wait_for_sites, self.wait_timeout = wait_for_sites, wait_timeout

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            if self.wait_for_sites:
                log(INFO, "waiting for %s sites to connect", self.wait_for_sites)
                if not context.client_manager.wait_for(self.wait_for_sites, timeout=int(self.wait_timeout)):
                    raise RuntimeError(f"fewer than {self.wait_for_sites} sites connected within "
                                       f"{self.wait_timeout:.0f} s; check that every site's SuperNode is running")
            default_init_params_workflow(grid, context)
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for rnd in range(self.first_round, self.first_round + context.config.num_rounds):
                log(INFO, "")
                log(INFO, "[ROUND %s]", rnd)
                cfg[Key.CURRENT_ROUND] = rnd
                context.strategy.round_info = {"round": rnd, "status": "halted"}
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(grid, context)
                if self.on_round_end is not None:
                    self.on_round_end(rnd, context)
        finally:
            f_stop.set()
            thread.join()
