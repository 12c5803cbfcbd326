"""Flower's legacy DefaultWorkflow with what a consortium needs around each round.

Same body as `flwr.server.workflow.DefaultWorkflow.__call__` (flwr 1.41), plus: the run waits for
every site once before round 1; the round count can start after a checkpoint's round (SecAgg+ and
FedAdam's bias correction use it); a hook runs after every round (checkpoint, metrics); every
message exchange gets a timeout and faster reply polling (`PollingGrid`); each phase is timed.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ConfigRecord
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.server.compat import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid

from privacy import secagg_masks
from server import progress
from server.strategy import refusal_reason
from shared_models.protocol import REFUSAL_PREFIX, SETUP_TERMS
from shared_models.wire import is_packed, pack, unpack

secagg_masks.install()  # SecAgg+'s masks from the whole seed, as the sites' mod draws them (privacy/secagg_masks.py)


class PollingGrid:
    """The Grid, with a timeout on every exchange and replies polled every `interval` seconds.

    flwr 1.41's gRPC Grid polls the SuperLink for replies every 3 s, so each of a round's message
    exchanges (SecAgg+ has four, evaluation one) costs up to 3 s of idle waiting, most of SecAgg+'s
    overhead on a short round. The legacy evaluate workflow also calls send_and_receive without a
    timeout, so a vanished site would block it. Same push/pull calls; only the pacing differs.
    """

    def __init__(self, grid: Grid, timeout: float, interval: float = 0.1):
        self._grid, self._timeout, self._interval = grid, timeout, interval
        self.errored: dict[int, str] = {}  # node -> its refusal's reason: nodes that refused a training message
        self.setup_terms: dict = {}  # the round's run key and number, sent beside SecAgg+'s setup configs

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        timeout = self._timeout if timeout is None else timeout
        messages = list(messages)
        kind, asked = (messages[0].metadata.message_type if messages else ""), [m.metadata.dst_node_id for m in messages]
        for m in messages:  # one array per ArrayRecord on the wire (shared_models/wire.py)
            if m.has_content():
                if self.setup_terms and _secagg_stage(m) == "setup":
                    m.content.config_records[SETUP_TERMS] = ConfigRecord(dict(self.setup_terms))
                m.content = pack(m.content)
        pending = set(self._grid.push_messages(messages))
        end, replies = time.monotonic() + timeout, []
        progress.exchange(kind, asked, [])
        while pending:
            got = list(self._grid.pull_messages(pending))
            for m in got:
                if m.has_content() and is_packed(m.content):
                    m.content = unpack(m.content)
            replies.extend(got)
            if kind == MessageType.TRAIN:  # a refusal is an answer, not a dropout (the SuperLink's own error reply
                # for a node gone offline is no refusal: that node dropped out)
                self.errored.update((m.metadata.src_node_id, refusal_reason(str(m.error.reason))) for m in got
                                    if m.has_error() and REFUSAL_PREFIX in str(m.error.reason))
            if got:
                progress.exchange(kind, asked, [m.metadata.src_node_id for m in replies])
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or time.monotonic() >= end:
                break
            time.sleep(self._interval)
        return replies


def _secagg_stage(m) -> str:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey

    configs = m.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(SecAggKey.STAGE, "")) if configs is not None else ""


class TimedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with the wall time of each of its four stages recorded in
    `strategy.timing` (benchmarks/round.py reads them from metrics.jsonl), and one fix.

    The fix (flwr 1.41): the workflow fixes its set of sampled sites before the setup stage, and at
    unmask asks every survivor for the key shares of every sampled site that is gone. A site lost in
    setup or share-keys never distributed shares (and no survivor masked with it), so every survivor
    failed with `KeyError` in `secaggplus_mod._unmask` and the round was lost: one hospital's
    SuperNode dying as a round starts stopped the round for all (tests/test_deployment.py, fault b).
    After those two stages the sampled set (and each site's neighbours) is narrowed to the sites that
    completed them; a site lost later is still unmasked with the survivors' shares, as Flower intends.
    """

    def __init__(self, *args, min_contributors: int = 2, refuse_wrap: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # refuse_wrap (dp-mode "distributed"): a sum of more sites than the range was sized for is not unmasked,
        # since it could wrap the modulus (in dp-mode "site" the values sit near the range's centre)
        self.min_contributors, self.refuse_wrap = min_contributors, refuse_wrap
        for name in ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage"):
            setattr(self, name, self._timed(name, getattr(self, name)))

    def _enough_to_unmask(self, context, state, stage: str = "collect_masked_vectors_stage") -> bool:
        """The sum is unmasked only if at least `min_contributors` sites sent masked vectors. Refusing sites
        send none (they drop out), so a round in which all but one site refused is never unmasked: the
        "sum" would be that one hospital's update. The sites check the same before giving key shares.
        After setup and key sharing (before any site trains) the same count abandons a round that could never
        be unmasked, so that no site spends budget on an update nobody will use."""
        n = len(state.active_node_ids)
        # each site counts the active sites among its SecAgg+ neighbours (beyond 21 sites a sparse graph: not all of
        # them), and gives no key shares for fewer than its floor: a round one site would refuse is not started
        seen = min((len(nb & state.active_node_ids) for nid, nb in getattr(state, "nid_to_neighbours", {}).items()
                    if nid in state.active_node_ids), default=n)
        before = stage != "collect_masked_vectors_stage"
        wraps = not before and self.refuse_wrap and n * self.quantization_range >= self.modulus_range
        if n >= self.min_contributors and seen >= self.min_contributors and not wraps:
            return True
        rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        did = "completed SecAgg+'s " + stage.removesuffix("_stage").replace("_", " ") if before else "sent masked vectors"
        reason = (f"{n} sites {did}, fewer than {self.min_contributors} (min-sites, or trusted-sites in "
                  "dp-mode 'distributed')" if n < self.min_contributors else
                  f"{n} sites {did}, but a site's SecAgg+ neighbourhood holds {seen} of them, fewer than "
                  f"{self.min_contributors} (min-sites, or trusted-sites in dp-mode 'distributed'), so that site would "
                  "refuse its key shares: with more than 21 sites SecAgg+ shares keys among 21 neighbours (fewer when "
                  "fewer sites connect); lower min-sites or trusted-sites" if seen < self.min_contributors else
                  f"{n} sites' values of range {self.quantization_range} could wrap SecAgg+'s modulus "
                  f"{self.modulus_range} (the range was sized for fewer sites: set the run config's sites)")
        context.strategy.record_abandoned(rnd, getattr(state, "failures", []), set(state.active_node_ids),
                                          f"{reason}: " + ("abandoned before any site trains" if before
                                                           else "the sum is not unmasked"))
        return False

    @staticmethod
    def _narrow_to_active(state) -> None:
        keep = set(state.active_node_ids)
        state.sampled_node_ids = keep
        state.nid_to_neighbours = {nid: set(nb) & keep for nid, nb in state.nid_to_neighbours.items() if nid in keep}

    def _timed(self, name, stage):
        def run(grid, context, state):
            progress.stage(context, name)  # RUN_DIR/progress.json, for `oncofed run` / `oncofed runs follow`
            t = time.perf_counter()
            if name == "setup_stage" and isinstance(grid, PollingGrid):  # the sites check the round before key sharing
                rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
                grid.setup_terms = context.strategy.setup_terms(rnd)
            try:
                ok = stage(grid, context, state)
                if ok and name in ("setup_stage", "share_keys_stage"):
                    self._narrow_to_active(state)
                    ok = self._enough_to_unmask(context, state, name)
                if ok and name == "collect_masked_vectors_stage":
                    ok = self._enough_to_unmask(context, state)
                if not ok and context.strategy.round_info.get("status") == "halted":
                    rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
                    halted = (f"SecAgg+ halted in its {name.removesuffix('_stage').replace('_', ' ')} stage: "
                              f"{len(state.active_node_ids)} site(s) left in the round, and a site's neighbourhood "
                              f"kept fewer than SecAgg+'s reconstruction threshold of {getattr(state, 'threshold', '?')}")
                    if name in ("setup_stage", "share_keys_stage"):
                        halted += ": abandoned before any site trains"
                    context.strategy.record_abandoned(rnd, getattr(state, "failures", []),
                                                      set(state.active_node_ids), halted)
                return ok
            finally:
                timing = getattr(context.strategy, "timing", None)
                if timing is not None:
                    timing[f"secagg_{name.removesuffix('_stage')}"] = round(time.perf_counter() - t, 3)

        return run


WAIT_REPORT_EVERY = 30.0  # s between the lines naming the sites a run still waits for before round 1


def active_sites(names: dict[str, str], removed: dict[str, str]) -> dict[int, str]:
    """{node id: name} of the sites in the consortium's register (privacy.registry.read_register: its names and the
    removed ones), those removed left out: they can no longer connect."""
    return {int(n): name for n, name in names.items() if n not in removed}


class RoundsWorkflow(DefaultWorkflow):
    def __init__(self, fit_workflow=None, evaluate_workflow=None, *, first_round: int = 1,
                 on_round_end: Callable[[int, LegacyContext], None] | None = None, wait_for_sites: int = 0,
                 wait_timeout: float = 3600.0, message_timeout: float = 600.0, enough_sites: int = 0,
                 registered: dict[int, str] | None = None):
        super().__init__(fit_workflow=fit_workflow, evaluate_workflow=evaluate_workflow)
        # {node id: name} of the consortium's registered sites that can connect (active_sites; a simulation: none),
        # to name the sites waited for
        self.registered = registered or {}
        self.first_round, self.on_round_end = first_round, on_round_end
        self.wait_for_sites, self.wait_timeout = wait_for_sites, wait_timeout
        self.enough_sites = enough_sites  # after the wait, start with this many (min-sites) rather than fail
        self.message_timeout = message_timeout

    def _wait_for_sites(self, context: LegacyContext) -> None:
        """Wait up to wait_timeout for wait_for_sites sites to connect. The registered sites (`registered`) not connected
        yet are named every WAIT_REPORT_EVERY s in the log and progress.json (`oncofed run`, `runs follow`), and in the
        failure: a site that never comes was a silent wait (600 s)."""
        cm, deadline = context.client_manager, time.monotonic() + self.wait_timeout
        registered = self.registered
        log(INFO, "waiting for %s sites to connect", self.wait_for_sites)
        while True:
            connected = {int(cid) for cid in cm.all()}
            absent = ", ".join(f"{name} (node {n})" for n, name in sorted(registered.items()) if n not in connected)
            progress.waiting_for_sites(context, sorted(set(registered) | connected), sorted(connected))
            if len(connected) >= self.wait_for_sites:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            log(INFO, "%s of %s sites connected, %.0f s left to wait%s", len(connected), self.wait_for_sites, left,
                f"; not yet: {absent}" if absent else "")
            cm.wait_for(self.wait_for_sites, timeout=min(WAIT_REPORT_EVERY, left))
        named = f"; not connected: {absent}" if absent else ""
        if not self.enough_sites or len(connected) < self.enough_sites:
            raise RuntimeError(f"fewer than {self.wait_for_sites} sites connected within {self.wait_timeout:.0f} s "
                               f"({len(connected)} did; at least {max(self.enough_sites, 1)} needed){named}; check "
                               "that each one's SuperNode is running (`oncofed site start` at the hospital) and its "
                               "key registered (`oncofed consortium list-sites`)")
        # every round still needs min-sites (and its SecAgg+ floor): a missing site only trains less
        log(WARNING, "only %s of the %s expected sites connected within %.0f s%s; starting with them",
            len(connected), self.wait_for_sites, self.wait_timeout, named)

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        grid = PollingGrid(grid, self.message_timeout)
        thread, f_stop, c_done = start_update_client_manager_thread(grid, context.client_manager)
        c_done.wait()
        try:
            if self.wait_for_sites:
                self._wait_for_sites(context)
            default_init_params_workflow(grid, context)
            cfg = ConfigRecord()
            cfg[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            for rnd in range(self.first_round, self.first_round + context.config.num_rounds):
                log(INFO, "")
                log(INFO, "[ROUND %s]", rnd)
                cfg[Key.CURRENT_ROUND] = rnd
                context.strategy.round_info = {"round": rnd, "status": "halted"}
                grid.errored.clear()
                context.strategy.errored = grid.errored  # the round's refusals, kept out of its dropped list
                timing = context.strategy.timing = {}
                t = time.perf_counter()
                self.fit_workflow(grid, context)
                timing["fit"] = round(time.perf_counter() - t, 3)
                t = time.perf_counter()
                default_centralized_evaluation_workflow(grid, context)
                timing["server_evaluate"] = round(time.perf_counter() - t, 3)
                t = time.perf_counter()
                self.evaluate_workflow(grid, context)
                timing["site_evaluate"] = round(time.perf_counter() - t, 3)
                if self.on_round_end is not None:
                    self.on_round_end(rnd, context)
        finally:
            f_stop.set()
            thread.join()
