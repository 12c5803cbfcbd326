"""RUN_DIR/progress.json: where the ServerApp is inside the current round, for `oncofed run` and `oncofed runs
follow` (which print it) between the per-round status.json writes (a round takes minutes).

    {"round": 2, "stage": "share_keys", "stage_started": ..., "message_type": "train",
     "asked": [node ids], "answered": [node ids], "updated": ...}

Written by the ServerApp only: `stage` when each SecAgg+ stage starts (server/workflow.py's
TimedSecAggPlusWorkflow), `asked`/`answered` at every message exchange as replies come in (PollingGrid); before round
1, stage `waiting for sites` with the registered sites as `asked` and those connected as `answered`.
Node ids only: the operator's tools name the sites from consortium.json. Writing never fails a round.
"""

from __future__ import annotations

import time
from pathlib import Path

from shared_models.files import write_json_atomic
from server.run_files import PROGRESS

_state: dict = {}
_path: list[Path | None] = [None]


def _write() -> None:
    if _path[0] is None:
        return
    _state["updated"] = time.time()
    try:
        write_json_atomic(_path[0], _state)
    except OSError:
        pass  # progress is a convenience: a full disk must not stop training


def stage(context, name: str) -> None:
    """A SecAgg+ stage of the current round starts (`context`: the workflow's LegacyContext)."""
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    rc = context.run_config
    out = Path(str(rc.get("output-dir", "")))
    if not str(rc.get("output-dir", "")):
        return
    if not out.is_absolute():
        out = Path(str(rc.get("base-dir", "."))) / out
    _path[0] = out / PROGRESS
    cfg = context.state.config_records.get(MAIN_CONFIGS_RECORD)
    rnd = int(cfg[Key.CURRENT_ROUND]) if cfg is not None and Key.CURRENT_ROUND in cfg else None
    _state.clear()
    _state.update(round=rnd, stage=name.removesuffix("_stage"), stage_started=time.time(), message_type="",
                  asked=[], answered=[])
    _write()


def exchange(message_type: str, asked: list[int], answered: list[int]) -> None:
    """Messages of one exchange were sent to `asked`; `answered` have replied so far."""
    if _path[0] is None:
        return
    if message_type != _state.get("message_type") and message_type != "train":
        # outside SecAgg+'s stages (evaluation, delivery of the final model): the message type is the stage
        _state.update(stage="delivery" if message_type.startswith("query.") else message_type,
                      stage_started=time.time())
    _state.update(message_type=message_type, asked=sorted(asked), answered=sorted(set(answered)))
    _write()


WAITING_FOR_SITES = "waiting for sites"


def waiting_for_sites(context, expected: list[int], connected: list[int]) -> None:
    """Before round 1: the sites the run waits for (`asked`: the registered ones and any connected) and those connected
    so far (`answered`), so the operator's tools name a site that has not come."""
    if _state.get("stage") != WAITING_FOR_SITES:
        stage(context, WAITING_FOR_SITES)
    if _path[0] is None:
        return
    _state.update(asked=list(expected), answered=list(connected))
    _write()
