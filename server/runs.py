"""The operator's view of training runs: `oncofed runs list | follow | stop`, the progress `oncofed run` prints
while its run trains, and what the Prometheus exporter knows of the sites.

Everything here reads; nothing starts a process or calls the SuperLink's APIs (except `stop`, which asks
the SuperLink through `flwr stop`):
  - each run's files, written by its ServerApp: status.json (after every round), progress.json (at every
    SecAgg+ stage and reply, server/progress.py), metrics.jsonl, result.json (at the end), and
    flwr-runs.json (the SuperLink's run ids of this run, written by `oncofed run`), delivery-runs.json (those of
    its deliveries, written by `oncofed deliver`, with how one ended early: stopped, or the server's exit);
  - the SuperLink's SQLite database (state/superlink.db), opened read-only for one short query: the
    status of each run (pending, starting, running, finished:completed|failed|stopped) and of each site
    (online, offline, registered). Its layout is flwr 1.41's (tables run, task, node); a query that fails
    on another layout answers "unknown" instead of failing the caller.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared_models.files import held_lock, write_json_atomic
from shared_models.flower_tools import flower_tool
from shared_models.protocol import FOREIGN_APP
from server.run_files import (DELIVERY_RUNS, FLWR_LOG, FLWR_RUNS, METRICS, PROGRESS, RESULT, RUN_FILE, STATUS,
                              WRITTEN_BY, metrics_lines)

QUEUED = ("pending", "starting")  # no ServerApp yet: the SuperExec, a restarted one too, launches it
LAUNCHED = ("running",)  # its ServerApp runs, and dies with the SuperExec
RUNNING = QUEUED + LAUNCHED  # not ended


def _u64(v: int | None) -> int | None:
    """Flower stores its uint64 ids as signed 64-bit integers."""
    return v + 2**64 if v is not None and v < 0 else v


def _i64(v: int) -> int:
    """An id as Flower stores it (the inverse of _u64)."""
    return v - 2**64 if v >= 2**63 else v


def _superlink_rows(db: Path, *queries: tuple[str, tuple]) -> list[list[tuple]] | None:
    """Each query's rows from the SuperLink's database, read-only; None when it cannot be read (no database yet,
    another flwr layout, locked for longer than 1 s)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            return [con.execute(sql, params).fetchall() for sql, params in queries]
        finally:
            con.close()
    except sqlite3.Error:
        return None


def read_superlink(db: Path) -> dict | None:
    """{"runs": {run_id: status}, "nodes": {node_id: status}} from the SuperLink's database, read-only;
    None when it cannot be read (no database yet, another flwr layout, locked for longer than 1 s)."""
    rows = _superlink_rows(db, ("SELECT run.run_id, task.starting_at, task.running_at, task.finished_at, "
                                "task.sub_status FROM run JOIN task ON task.task_id = run.primary_task_id", ()),
                           ("SELECT node_id, status, online_until FROM node", ()))
    if rows is None:
        return None
    runs = {_u64(run_id): (f"finished:{sub}" if finished else "running" if running else
                           "starting" if starting else "pending")
            for run_id, starting, running, finished, sub in rows[0]}
    now, nodes = time.time(), {}
    for node_id, status, online_until in rows[1]:
        if status == "online" and online_until is not None and online_until < now:
            status = "offline"  # Flower marks it so at its next read; the heartbeat has lapsed
        nodes[_u64(node_id)] = status
    return {"runs": runs, "nodes": nodes}


def flwr_run_code(db: Path, run_id: int) -> tuple[str, str] | None:
    """(fab_version, fab_hash) the SuperLink recorded for a flwr run: the version and the SHA-256 of the app bundle
    (FAB) `flwr run` built from the checkout; None when it cannot be read."""
    rows = _superlink_rows(db, ("SELECT fab_version, fab_hash FROM run WHERE run_id = ?", (_i64(run_id),)))
    row = rows[0][0] if rows and rows[0] else None
    return (str(row[0]), str(row[1])) if row and row[1] else None


def code_change(root: Path, name: str, run_id: int) -> str:
    """"" when flwr run `run_id` (a resume of run `name`) runs the code the run started with (its first flwr run's
    FAB); otherwise what changed and what it means: `flwr run` builds the app from the checkout as it is now, so a
    resume after the code changed continues the run with the new code (and the run config frozen at its start)."""
    ids = _json(root / "runs" / name / FLWR_RUNS) or []
    db = root / "state" / "superlink.db"
    first = flwr_run_code(db, ids[0]) if ids and ids[0] != run_id else None
    now = flwr_run_code(db, run_id)
    if first is None or now is None or first[1] == now[1]:
        return ""
    return (f"run {name!r}: the code differs from the code the run started with (app version {first[0]}, FAB SHA-256 "
            f"{first[1][:16]}..., flwr run {ids[0]}; now version {now[0]}, {now[1][:16]}...): the checkout changed "
            f"since. The run continues with the new code and the run config frozen when it started (run.json). To "
            f"continue it with the old code instead: `oncofed runs stop {root} {name}`, check out the code it started "
            f"with, and `oncofed run {root} --name {name} --resume` again")


def registered_sites(root: Path, superlink: dict | None) -> list[dict]:
    """consortium.json's sites (not removed) with the SuperLink's status of each."""
    record = _json(root / "consortium.json") or {}
    nodes = (superlink or {}).get("nodes", {})
    return [{**s, "status": "registration cut short: run the same add-site again" if s.get("pending") else
             nodes.get(int(s["node_id"]), "unknown to the SuperLink") if superlink else "unknown"}
            for s in record.get("sites", []) if not s.get("removed")]


def _latest_flwr_runs(root: Path, superlink: dict | None) -> dict[str, tuple[int, str | None]]:
    """{run name (its directory under runs/): (its latest flwr run id, the SuperLink's status of it or None)}."""
    states = (superlink or {}).get("runs", {})
    return {d.parent.name: (ids[-1], states.get(ids[-1])) for d in (root / "runs").glob(f"*/{FLWR_RUNS}")
            if isinstance(ids := _json(d), list) and ids}


def live_run_names(root: Path, superlink: dict | None, states=RUNNING) -> set[str]:
    """The names of the runs (directories under runs/) whose latest flwr run the SuperLink has in one of `states`
    (default pending, starting or running)."""
    return {name for name, (_, state) in _latest_flwr_runs(root, superlink).items() if state in states}


INTERRUPTED = "interrupted.json"  # in a run's directory: the server's exit that ended its flwr run


def record_interrupted(root: Path, why: str, superlink: dict | None) -> list[str]:
    """Write into each run the SuperLink has running that the server's exit (`why`) ends it: Flower 1.41 starts every
    ServerApp with `--parent-pid` of the SuperExec, and a ServerApp stops when that process dies (so with the
    SuperExec, the `oncofed server start` it is chained to, a restart or `oncofed server stop`). Not a pending or
    starting one: it has no ServerApp yet (Flower puts a starting one whose launch lapsed back to pending), and the
    restarted SuperExec launches it; recorded, the resume preflight (live_flwr_runs) would take it for dead once it
    runs. Returns the names."""
    live = {name: run_id for name, (run_id, state) in _latest_flwr_runs(root, superlink).items() if state in LAUNCHED}
    for name, run_id in live.items():
        write_json_atomic(root / "runs" / name / INTERRUPTED, {"flwr_run": run_id, "why": why, "at": time.time()})
    return sorted(live)


def _utc_seconds(text) -> float | None:
    """Epoch seconds of a time the SuperLink's database holds (flwr 1.41: ISO text in UTC), None if it is not one."""
    from datetime import datetime, timezone

    try:
        at = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return (at if at.tzinfo else at.replace(tzinfo=timezone.utc)).timestamp()


def _running_since(db: Path, run_id: int) -> float | None | str:
    """When the SuperLink's database has flwr run `run_id` running since (epoch seconds; its task's running_at), None
    when it never ran (pending or starting), "unknown" when it cannot tell."""
    rows = _superlink_rows(db, ("SELECT task.running_at FROM run JOIN task ON task.task_id = run.primary_task_id "
                                "WHERE run.run_id = ?", (_i64(run_id),)))
    if not rows or not rows[0]:
        return "unknown"
    if rows[0][0][0] is None:
        return None
    at = _utc_seconds(rows[0][0][0])
    return "unknown" if at is None else at


def flwr_runs_since(run_dir: Path, db: Path, since: float) -> list[tuple[int, bool, float, bool]] | None:
    """The flwr runs on the run's directory (their run config's output-dir) the SuperLink's database holds as
    submitted since `since` (epoch seconds; their task's pending_at), oldest first: (id, whether it is a delivery
    (deliver-only), when it was submitted, whether flwr-runs.json or delivery-runs.json names it). [] with no database
    (nothing was ever submitted); None when it cannot be read."""
    if not db.exists():
        return []
    rows = _superlink_rows(db, ("SELECT run.run_id, run.override_config, task.pending_at FROM run JOIN task ON "
                                "task.task_id = run.primary_task_id", ()))
    if rows is None:
        return None
    ids = _json(run_dir / FLWR_RUNS)
    named = set(ids if isinstance(ids, list) else []) | {e["flwr_run"] for e in delivery_runs(run_dir)}
    found = []
    for run_id, config, pending_at in rows[0]:
        try:
            config = json.loads(config or "{}")
        except ValueError:
            continue
        output_dir = config.get("output-dir") if isinstance(config, dict) else None
        at = _utc_seconds(pending_at) if pending_at is not None else None
        if isinstance(output_dir, str) and Path(output_dir).resolve() == run_dir.resolve() and at is not None \
                and at >= since:
            found.append((at, _u64(run_id), config.get("deliver-only") is True))
    return [(run_id, delivery, at, run_id in named) for at, run_id, delivery in sorted(found)]


def interrupted_record(run_dir: Path, db: Path) -> tuple[dict | None, str]:
    """(the server's exit that ended the run's flwr run, from its interrupted.json, None if none did; why a record
    there does not apply, "" if it does or there is none). OncoFed before 36a5957 also recorded a flwr run that was
    pending or starting, which had no ServerApp to lose and which the restarted SuperExec launches: read as written,
    such a record called that run dead once it ran (the --resume preflight passed, and the resume stopped it and
    trained over it; `oncofed runs list` called a later failure the server's exit). A record applies only to a flwr
    run the SuperLink's database has running since before the record was written (a run that ran never runs again;
    a database that cannot tell leaves the record as written)."""
    record = _json(run_dir / INTERRUPTED)
    if not isinstance(record, dict) or not isinstance(record.get("flwr_run"), int):
        return None, ""
    since, at = _running_since(db, record["flwr_run"]), record.get("at")
    if since is None:
        why = "it has not run yet (pending or starting)"
    elif isinstance(since, float) and isinstance(at, (int, float)) and since > at:
        why = f"it started running after that, at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    else:
        return record, ""
    return None, (f"{run_dir / INTERRUPTED} records flwr run {record['flwr_run']} as ended by the server's exit "
                  f"({record.get('why')}), but {why}: an older OncoFed recorded a run that was only pending. Ignored "
                  "and removed")


def drop_stale_interrupted(run_dir: Path, db: Path) -> str:
    """Remove the run's interrupted.json when it does not apply (interrupted_record); returns why, "" if kept."""
    _, stale = interrupted_record(run_dir, db)
    if stale:
        (run_dir / INTERRUPTED).unlink(missing_ok=True)
    return stale


def delivery_runs(run_dir: Path) -> list[dict]:
    """The flwr runs `oncofed deliver` submitted for the run (delivery-runs.json), oldest first: {"flwr_run",
    "submitted"}, "stopping" {"why", "at"} while `oncofed runs stop` stops it, and "ended" {"how": "stopped" |
    "interrupted", "why", "at"} once `oncofed runs stop` or the server's exit ended it. Apart from flwr-runs.json, the
    run's training attempts (what --resume and the metrics judge)."""
    entries = _json(run_dir / DELIVERY_RUNS)
    return [e for e in entries if isinstance(e, dict) and "flwr_run" in e] if isinstance(entries, list) else []


def record_delivery_run(run_dir: Path, flwr_run: int, submitted: float | None = None) -> None:
    """`oncofed deliver` submitted flwr run `flwr_run` for the run (at `submitted`, default now): what `oncofed runs
    stop` stops and the server's exit is recorded in (its id is nowhere else in the run's directory until its
    ServerApp writes result.json). Its caller holds the run's submit lock and, on a DeployError, leaves it naming
    itself (SubmitLock.leave): the next holder records the flwr run (server.submit._take_over)."""
    with _deliveries_locked(run_dir, f"flwr run {flwr_run}, an `oncofed deliver` of the run, is not recorded there, "
                            "and goes on: once that command is done, the next `oncofed deliver "
                            f"{run_dir.parent.parent} {run_dir.name}` records it (from the SuperLink's database)"):
        write_json_atomic(run_dir / DELIVERY_RUNS, [*delivery_runs(run_dir), {
            "flwr_run": flwr_run, "submitted": time.time() if submitted is None else submitted}])


DELIVERIES_LOCK_WAIT = 60.0  # seconds a change of delivery-runs.json waits for another command's


def _deliveries_locked(run_dir: Path, undone: str = "nothing was recorded; run this command again once that one is "
                                                    "done"):
    """One read-change-write of delivery-runs.json at a time: `oncofed deliver` records a delivery, `oncofed runs
    stop` and the server's exit record how one ended, each perhaps at the same moment; unlocked, the last write
    would drop what the others wrote (a delivery no stop or exit record could find again). Kept longer by another:
    DeployError, the operator's, naming the file, its lock and `undone`, what was not recorded and what to do."""
    from server.deploy import DeployError

    lock = run_dir / f"{DELIVERY_RUNS}.lock"
    return held_lock(lock, wait=DELIVERIES_LOCK_WAIT, busy=DeployError(
        f"{run_dir / DELIVERY_RUNS}: another oncofed command has kept it locked for {DELIVERIES_LOCK_WAIT:g} s "
        f"({lock}; `fuser -v {lock}` names it): {undone}"))


def end_delivery_run(run_dir: Path, flwr_run: int, how: str, why: str) -> None:
    """Record that delivery flwr run `flwr_run` ended before its ServerApp recorded it: `how` stopped or interrupted."""
    _change_open_delivery(run_dir, flwr_run, ended={"how": how, "why": why, "at": time.time()})


def mark_stopping(run_dir: Path, flwr_run: int, why: str) -> None:
    """Record that `why` is stopping delivery flwr run `flwr_run` ("" withdraws it). Written before `flwr stop` is
    asked: the SuperLink calls the run stopped, and `oncofed deliver` (whose stream that ends) reads it, before `flwr
    stop` returns and end_delivery_run records it; this is how such a reader knows who stopped it."""
    _change_open_delivery(run_dir, flwr_run, **({"stopping": {"why": why, "at": time.time()}} if why else {}))


def _change_open_delivery(run_dir: Path, flwr_run: int, **fields) -> None:
    """One locked read-change-write of delivery-runs.json: the entry of delivery flwr run `flwr_run` not yet ended
    loses its "stopping" (a stop in progress is settled either way) and gains `fields`."""
    with _deliveries_locked(run_dir):
        entries = delivery_runs(run_dir)
        for e in entries:
            if e["flwr_run"] == flwr_run and not e.get("ended"):
                e.pop("stopping", None)
                e.update(fields)
        write_json_atomic(run_dir / DELIVERY_RUNS, entries)


def delivery_state(run_dir: Path, entry: dict, superlink: dict | None) -> str:
    """What became of a delivery's flwr run: in progress | finished | stopped | interrupted | failed | unknown. Its
    own records first (result.json naming it: a stop or an exit after they were written ended nothing), then how it
    was recorded as ended (the SuperLink's database calls a run whose ServerApp died with the server running until
    Flower sees its heartbeat lapse), then the database."""
    if written_by(run_dir, entry["flwr_run"]):
        return "finished"
    if entry.get("ended"):
        return str(entry["ended"].get("how"))
    state = (superlink or {}).get("runs", {}).get(entry["flwr_run"]) if superlink else None
    if state is None:
        return "unknown"
    return "in progress" if state in RUNNING else {"finished:completed": "finished",
                                                    "finished:stopped": "stopped"}.get(state, "failed")


def deliveries_in_progress(run_dir: Path, superlink: dict | None, states=RUNNING) -> list[int]:
    """The flwr runs of the run's `oncofed deliver`s the SuperLink has in one of `states` (default pending, starting or
    running) and that did not end otherwise (delivery_state), oldest first."""
    runs = (superlink or {}).get("runs", {})
    return [e["flwr_run"] for e in delivery_runs(run_dir)
            if delivery_state(run_dir, e, superlink) == "in progress" and runs.get(e["flwr_run"]) in states]


def delivering_run_names(root: Path, superlink: dict | None, states=RUNNING) -> dict[str, int]:
    """{run name: its latest delivery flwr run} for each run with an `oncofed deliver` in progress
    (deliveries_in_progress)."""
    return {f.parent.name: ids[-1] for f in (root / "runs").glob(f"*/{DELIVERY_RUNS}")
            if (ids := deliveries_in_progress(f.parent, superlink, states))}


def record_interrupted_deliveries(root: Path, why: str, superlink: dict | None) -> list[str]:
    """record_interrupted for deliveries: each delivery flwr run the SuperLink has running is recorded as ended by
    the server's exit (`why`), so that `oncofed runs` and `oncofed deliver` say so and what to do, instead of a
    delivery in progress. Not a pending one: the restarted SuperExec launches it. Returns the runs' names."""
    runs = (superlink or {}).get("runs", {})
    names = set()
    for f in (root / "runs").glob(f"*/{DELIVERY_RUNS}"):
        for e in delivery_runs(f.parent):
            if not e.get("ended") and runs.get(e["flwr_run"]) in LAUNCHED and not written_by(f.parent, e["flwr_run"]):
                end_delivery_run(f.parent, e["flwr_run"], "interrupted", why)
                names.add(f.parent.name)
    return sorted(names)


def delivery_ended_early(root: Path, name: str, entry: dict, state: str) -> str:
    """What became of a delivery that ended without recording what it did, and what to do: "" for one in progress,
    finished or unknown. What it sent before it ended is not lost: a site that installed the model keeps it and says
    so to the next delivery, which records it."""
    said = f"`oncofed deliver` of run {name!r} (flwr run {entry['flwr_run']})"
    again = f"`oncofed deliver {root} {name}` sends it again to the sites that have not installed it"
    # a delivery being stopped by `oncofed runs stop` is stopped in the SuperLink's database before it is recorded
    ended = entry.get("ended") or (entry.get("stopping") if state == "stopped" else None) or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ended.get("at", 0)))
    if state == "stopped":
        return f"{said} was stopped ({ended.get('why', '`flwr stop`')}{', ' + when if ended else ''}): {again}"
    if state == "interrupted":
        return (f"{said} was ended by the server's exit ({ended.get('why')}, {when}): once the server is up "
                f"(`oncofed server start {root}`), {again}")
    if state == "failed":
        return (f"{said} failed; see {root / 'runs' / name / FLWR_LOG} and {root / 'logs' / 'superlink.log'}; after "
                f"fixing the cause, {again}")
    return ""


def unfinished_run_names(root: Path, superlink: dict | None) -> set[str]:
    """The runs whose latest flwr run ended (failed or stopped) without its result: training stopped before the end,
    and nothing goes on until `oncofed run --resume`."""
    return {name for name, (_, state) in _latest_flwr_runs(root, superlink).items()
            if state in ("finished:failed", "finished:stopped") and not (root / "runs" / name / RESULT).exists()}


def site_names(root: Path) -> dict[int, str]:
    from privacy.pki import ProvisioningError
    from privacy.registry import registered_names

    try:
        return {int(node): name for node, name in registered_names(root / "consortium.json").items()}
    except ProvisioningError:
        return {}


NO_SITE_TRAINED = "failed: no site trained"  # a run whose rounds all ran without updating the model (no_model_verdict)


def no_model(root: Path, name: str, names: dict[int, str] | None = None) -> tuple[str, str] | None:
    """(why, next step): the one verdict on a run that ended without a model (result.json's `not_delivered`: no round
    updated the global model, e.g. every site refused every round), None for any other run: what `oncofed run`, `runs list`,
    `deliver` and `run --resume` say of it. Its rounds ran, so there is nothing to resume, and its model is the
    untrained one, so nothing to deliver: what is wrong is at the sites, and a new run is the next step. The
    refusals are said once per distinct reason, with the sites that gave it."""
    run_dir = root / "runs" / name
    result = _json(run_dir / RESULT)
    if not isinstance(result, dict) or not result.get("not_delivered"):
        return None
    try:
        lines = metrics_lines(run_dir / METRICS)
    except (OSError, ValueError):
        lines = []
    from server.checkpoint import why_no_update

    why = why_no_update(lines, names=site_names(root) if names is None else names, short=True) if lines else \
        result["not_delivered"][:300]
    if FOREIGN_APP in why or FOREIGN_APP in result["not_delivered"]:
        fix = ("the sites run another OncoFed version than this server, and a site runs only the version it installed "
               f"(each names the files that differ, in {run_dir / METRICS}): put the server and the sites on one "
               "version (docs/operator-guide.md, Upgrades)")
    else:
        fix = (f"fix the cause at the sites (a site's privacy budget, its data: each refusal in {run_dir / METRICS} "
               "says what to do)")
    return why, (f"nothing to deliver (the model is the untrained initial one) and nothing to resume (its rounds ran): "
                 f"{fix}, then start a new run: `oncofed run {root} --name NEW_NAME`")


def no_model_verdict(root: Path, name: str) -> str | None:
    """no_model's (why, next step) as one sentence."""
    found = no_model(root, name)
    return None if found is None else f"{NO_SITE_TRAINED} ({found[0]}); {found[1]}"


def _registered_before(site: dict, when: float) -> bool:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(site.get("added"))).timestamp() <= when
    except ValueError:
        return True  # no time recorded: it counts


def sites_left_out(root: Path, name: str) -> tuple[str, str]:
    """The registered sites that had no part in a finished run, for its last line, as (those that refused every round
    it ran, with their reasons, each once; those never seen in any round nor at the delivery: never connected while it
    ran, e.g. a SuperNode not started), each "" when none. Sites registered after it ended, or removed, are not
    named."""
    from server.checkpoint import newest_rounds, refusals, said_refusals

    run_dir = root / "runs" / name
    try:
        rounds = list(newest_rounds(metrics_lines(run_dir / METRICS)).values())
    except (OSError, ValueError):
        return "", ""
    record, result = _json(root / "consortium.json") or {}, _json(run_dir / RESULT) or {}
    ended = max((float(r["ended"]) for r in rounds if isinstance(r.get("ended"), (int, float))), default=0.0) or \
        _mtime(run_dir / RESULT) or time.time()
    sites = {int(s["node_id"]): s["name"] for s in record.get("sites", [])
             if s.get("node_id") and not s.get("removed") and not s.get("pending") and _registered_before(s, ended)}
    by_name = {n: node for node, n in sites.items()}
    seen: set[int] = set()
    refused_rounds: dict[int, int] = {}
    for r in rounds:
        seen |= {int(n) for n in [*(r.get("participants") or []), *(r.get("sites") or {}), *(r.get("dropped") or [])]}
        refusing = {by_name[n] for found, _ in refusals([r], sites) for n in found if n in by_name}
        for node in refusing:
            refused_rounds[node] = refused_rounds.get(node, 0) + 1
    seen |= {int(d["node"]) for d in result.get("deliveries") or [] if d.get("installed") and d.get("node") is not None}
    every = sorted(sites[n] for n, k in refused_rounds.items() if rounds and k == len(rounds))
    never = sorted(sites[n] for n in sites if n not in seen and n not in refused_rounds)
    mine = [(found, why) for found, why in refusals(rounds, sites) if set(found) & set(every)]
    return (f"refused every round: {said_refusals(mine, short=True)}" if every else "",
            f"registered but never connected while it ran: {', '.join(never)} (is each one's `oncofed site start` "
            "running? `oncofed consortium list-sites` shows who is online)" if never else "")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rounds_seconds(metrics: Path) -> list[float]:
    """Wall seconds of each completed round of the current ServerApp process (metrics.jsonl `seconds`)."""
    try:
        lines = metrics_lines(metrics)
    except (OSError, ValueError):
        return []
    marks = [float(x.get("seconds", 0.0)) for x in lines]
    return [b - a for a, b in zip(marks, marks[1:]) if b > a]


@dataclass
class RunView:
    name: str
    run_dir: Path
    status: dict = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    flwr_ids: list[int] = field(default_factory=list)
    superlink_status: str | None = None  # of flwr_run, else of the latest flwr run of this name; None: unknown
    round_seconds: list[float] = field(default_factory=list)
    status_written: float = 0.0  # when status.json was last written: the end of the last round
    interrupted: dict | None = None  # the server's exit that ended that flwr run (record_interrupted)
    flwr_run: int | None = None  # the one flwr run followed (`oncofed run`'s or `oncofed deliver`'s own); None: any
    delivery: dict | None = None  # the latest `oncofed deliver`'s flwr run (delivery_runs), None: no `oncofed deliver` of the run
    delivery_state: str = ""  # what became of it (delivery_state)
    following_delivery: bool = False  # flwr_run is an `oncofed deliver`'s

    @classmethod
    def load(cls, root: Path, name: str, superlink: dict | None, flwr_run: int | None = None) -> "RunView":
        """The run as its files and the SuperLink show it; its state is flwr run `flwr_run`'s (an `oncofed deliver`'s
        is not in flwr-runs.json), by default its latest's."""
        d = root / "runs" / name
        ids = _json(d / FLWR_RUNS) or []
        of = flwr_run if flwr_run is not None else (ids or [None])[-1]
        status = (superlink or {}).get("runs", {}).get(of) if of is not None and superlink else None
        i = interrupted_record(d, root / "state" / "superlink.db")[0] if of is not None else None
        interrupted = i if i and i.get("flwr_run") == of else None
        deliveries = delivery_runs(d)
        followed = next((e for e in deliveries if e["flwr_run"] == of), None) if flwr_run is not None else None
        if followed and (state := delivery_state(d, followed, superlink)) in ("stopped", "interrupted"):
            # as the database will say once Flower notices: a delivery that died with the server is not followed on
            status = "finished:stopped" if state == "stopped" else "finished:failed"
            interrupted = followed["ended"] if state == "interrupted" else None
        latest = deliveries[-1] if deliveries else None
        return cls(name, d, _json(d / STATUS) or {}, _json(d / PROGRESS) or {}, _json(d / RESULT), ids, status,
                   _rounds_seconds(d / METRICS), _mtime(d / STATUS), interrupted, flwr_run, latest,
                   delivery_state(d, latest, superlink) if latest else "", followed is not None)

    @property
    def finished(self) -> bool:
        """result.json is written; when one flwr run is followed, by it (an earlier attempt's result is not its own)."""
        return bool(self.result) and (self.flwr_run is None or self.result.get(WRITTEN_BY) == self.flwr_run)

    @property
    def state(self) -> str:
        """pending | starting | running | completed | failed | stopped | unknown (SuperLink's view first; a run that
        ended without a model is failed whatever Flower calls it: no site trained)."""
        if self.result and self.result.get("not_delivered"):
            return "failed"
        if self.superlink_status:
            return self.superlink_status.removeprefix("finished:")
        return "completed" if self.finished else "unknown"

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def eta_seconds(self) -> float | None:
        done, total = int(self.status.get("round") or 0), int(self.status.get("num_rounds") or 0)
        if not self.round_seconds and self.status.get("round_seconds"):
            self.round_seconds = [float(self.status["round_seconds"])]
        if not total or not self.round_seconds or not self.running:
            return None
        per_round = sum(self.round_seconds[-3:]) / len(self.round_seconds[-3:])
        into = time.time() - (self.status_written or time.time())
        return max(0.0, per_round * (total - done) - max(0.0, into))

    def describe(self, names: dict[int, str], server_down: str = "") -> str:
        """One line: round, SecAgg+ stage, which sites answered and which are awaited, ETA; with the server down
        (`server_down`, why), the SuperLink's last record of a running run says nothing of training: that instead."""
        done, total = int(self.status.get("round") or 0), self.status.get("num_rounds") or "?"
        parts = [f"{self.state}", f"round {done}/{total} done"]
        if found := no_model(self.run_dir.parent.parent, self.name, names):
            fix = ("put the server and the sites on one OncoFed version" if FOREIGN_APP in found[0] else
                   "fix it at the sites (each refusal in metrics.jsonl says how)")
            return " · ".join([NO_SITE_TRAINED, parts[1], found[0], f"next: {fix}, then a new run with another --name"])
        # progress.json is the training's (a delivery's ServerApp writes none): not what a delivery followed is doing
        p = {} if self.following_delivery else self.progress
        if self.running and server_down and not self.following_delivery:
            return " · ".join([f"{self.state} when the server went down", parts[1], f"not training: {server_down}"])
        if self.interrupted and not self.running and not self.result:
            parts[0] += (f": ended by the server's exit ({self.interrupted.get('why')}, "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.interrupted.get('at', 0)))})")
        if self.running and p.get("stage"):
            name = lambda n: names.get(int(n), str(n))  # noqa: E731
            answered, asked = p.get("answered", []), p.get("asked", [])
            waiting = [n for n in asked if n not in answered]
            stage = f"round {p.get('round') or done + 1}: {p['stage']}"
            if asked:
                stage += f", {len(answered)}/{len(asked)} sites answered"
                if answered:
                    stage += f" ({', '.join(sorted(name(n) for n in answered))})"
                if waiting:
                    stage += f", waiting for {', '.join(sorted(name(n) for n in waiting))}"
            if p.get("stage_started"):
                stage += f", {time.time() - float(p['stage_started']):.0f} s in this stage"
            parts.append(stage)
        eta = None if self.following_delivery else self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA ~{_minutes(eta)}")
        elif self.running and done == 0 and not self.following_delivery:
            parts.append("ETA after round 1")
        if self.delivery_state == "in progress":
            since = time.strftime("%H:%M:%S", time.localtime(self.delivery.get("submitted", 0)))
            parts.append(f"`oncofed deliver` (flwr run {self.delivery['flwr_run']}, since {since}) "
                         + ("was delivering the model when the server went down" if server_down else
                            "is delivering the model again"))
        elif self.delivery and (ended := delivery_ended_early(self.run_dir.parent.parent, self.name, self.delivery,
                                                               self.delivery_state)):
            parts.append(ended)
        if self.result:
            from server.delivery import delivery_now, delivery_status, delivery_summary

            deliveries = self.result.get("deliveries", [])
            status = (delivery_now(self.run_dir, self.status) if "delivery_ok" in self.status
                      else delivery_status(self.run_dir, deliveries))
            parts.append(delivery_summary(status, deliveries, self.run_dir.parent.parent)[1])
        return " · ".join(parts)


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def list_runs(root: Path) -> list[RunView]:
    superlink = read_superlink(root / "state" / "superlink.db")
    dirs = sorted((d for d in (root / "runs").glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime)
    return [RunView.load(root, d.name, superlink) for d in dirs]


# `oncofed run` and `oncofed runs follow` stop following (the run stays) when the server is down this long
SERVER_DOWN_GIVE_UP = 180.0


class ServerHealth:
    """The server's health as a follower of a run sees it, asked once a poll: `down`, why it is down ("" while up or
    without a `health` to ask), and `since`, when it went down (None while up)."""

    def __init__(self, health=None):
        self.health, self.down, self.since = health, "", None

    def check(self) -> str | None:
        """Ask once; what changed: the new reason it is down, "" when it is up again, None when nothing changed (or
        there is nothing to ask)."""
        if self.health is None:
            return None
        ok, reason = self.health()
        before = self.down
        self.down, self.since = ("", None) if ok else (reason, self.since or time.time())
        return None if self.down == before else self.down


def follow(root: Path, name: str, out, poll: float = 2.0, health=None, timeout: float = 0.0,
           give_up: float = SERVER_DOWN_GIVE_UP, flwr_run: int | None = None) -> int:
    """Print the run's progress whenever it changes, until its flwr run `flwr_run` (default its latest) ends:
    0 completed (result.json written, by `flwr_run` when given), 1 failed or stopped, 3 given up (`timeout` seconds,
    the server's /health failing for `give_up` seconds, or the SuperLink's state unreadable for 10 min). A crashed
    server leaves its database saying "running" for ever."""
    names, last, unknown_since, t0 = site_names(root), "", None, time.time()
    server = ServerHealth(health)
    while True:
        view = RunView.load(root, name, read_superlink(root / "state" / "superlink.db"), flwr_run)
        if server.check():
            out.write(f"[{time.strftime('%H:%M:%S')}] server: {server.down}\n")
            out.flush()
        since = server.since and time.strftime('%H:%M:%S', time.localtime(server.since))
        line = view.describe(names, server.down and f"the server is down since {since}")
        if line != last:
            out.write(f"[{time.strftime('%H:%M:%S')}] run {name}: {line}\n")
            out.flush()
            last = line
        if server.since is not None and view.running and time.time() - server.since >= give_up:
            out.write(f"run {name}: the server has not answered for {give_up:g} s ({server.down}); stopped "
                      "following. The run does not train while the server is down: start it (`oncofed server start "
                      f"{root}`), "
                      f"then `oncofed runs list {root}`; a run it shows failed or stopped continues with "
                      f"`oncofed run {root} --name {name} --resume`\n")
            out.flush()
            return 3
        if view.superlink_status is None and not view.finished:
            unknown_since = unknown_since or time.time()
            if time.time() - unknown_since > 600:
                out.write(f"run {name}: the SuperLink's state has been unreadable for 10 minutes; stopped following\n")
                return 3
        else:
            unknown_since = None
        if not view.running and view.state != "unknown":
            return 0 if view.state == "completed" and view.finished and not view.result.get("not_delivered") else 1
        if timeout and time.time() - t0 > timeout:
            return 3
        time.sleep(poll)


def stop(root: Path, name: str, env: dict, out) -> tuple[int, int]:
    """Ask the SuperLink to stop every flwr run of this name that has not finished, its deliveries' (`oncofed
    deliver`) too, each delivery stopped so recorded in the run's directory (end_delivery_run); returns how many of
    each (training, delivery) it stopped."""
    superlink = read_superlink(root / "state" / "superlink.db")
    view = RunView.load(root, name, superlink)
    trained = delivered = 0
    for run_id in view.flwr_ids:
        status = (superlink or {}).get("runs", {}).get(run_id)
        if status is not None and status not in RUNNING:
            continue
        trained += _flwr_stop(run_id, "", env, out)
    for entry in delivery_runs(view.run_dir):
        if delivery_state(view.run_dir, entry, superlink) not in ("in progress", "unknown"):
            continue
        mark_stopping(view.run_dir, entry["flwr_run"], "`oncofed runs stop`")
        stopped = False
        try:
            stopped = _flwr_stop(entry["flwr_run"], " (`oncofed deliver`)", env, out)
        finally:
            if stopped:
                delivered += 1
                end_delivery_run(view.run_dir, entry["flwr_run"], "stopped", "`oncofed runs stop`")
            else:  # not stopped by it: a later stop (`flwr stop`'s) is not to be called this one
                mark_stopping(view.run_dir, entry["flwr_run"], "")
    return trained, delivered


def _flwr_stop(run_id: int, what: str, env: dict, out) -> bool:
    """`flwr stop` of one flwr run; True when it stopped it (one already finished is not counted, nor a failure)."""
    proc = subprocess.run([flower_tool("flwr"), "stop", str(run_id), "consortium"], env=env, capture_output=True,
                          text=True, timeout=120)
    why = (proc.stdout + proc.stderr).strip()[-300:]
    if proc.returncode != 0 and "already finished" in why.lower():  # an earlier flwr run of a resumed run, asked
        out.write(f"flwr run {run_id}{what}: already finished\n")  # because the database was busy: nothing to stop
        return False
    out.write(f"flwr run {run_id}{what}: " + ("stopped\n" if proc.returncode == 0 else f"not stopped ({why})\n"))
    return proc.returncode == 0


def restart_hint(root: Path, view: RunView) -> str:
    """How to go on with a run that is no longer running: --resume once it has started (its run.json is written
    before round 1; the checkpoints hold the rounds done), otherwise the same `oncofed run` again."""
    if not (view.run_dir / RUN_FILE).exists():
        return (f"it had not started training: `oncofed run {root} --name {view.name}` (without --resume) starts it "
                "again")
    done, total = int(view.status.get("round") or 0), view.status.get("num_rounds") or "?"
    return (f"its checkpoints stay (round {done}/{total} done): `oncofed run {root} --name {view.name} --resume` "
            "continues it with the configuration it started with; or start a new run with another --name")


class ProgressPrinter:
    """While `oncofed run` streams the ServerApp's log: a line of progress whenever it changes (the log is
    silent for minutes between sampling and aggregation), the server's health when a process is down, and
    `on_server_down` once the server has been down for SERVER_DOWN_GIVE_UP seconds."""

    def __init__(self, root: Path, name: str, out, health=None, on_server_down=None, poll: float = 3.0):
        import threading

        self.root, self.name, self.out, self.health, self.poll = root, name, out, health, poll
        self.on_server_down, self.server_down = on_server_down, ""
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="oncofed-progress")

    def write(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def start(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        names, last, server = site_names(self.root), "", ServerHealth(self.health)
        while not self._stop.wait(self.poll):
            try:
                view = RunView.load(self.root, self.name, read_superlink(self.root / "state" / "superlink.db"))
                line = view.describe(names) if view.flwr_ids else ""
                if line and line != last:
                    self.write(f"[progress {time.strftime('%H:%M:%S')}] {line}\n")
                    last = line
                if server.check() is not None:
                    self.write(f"[server] {server.down}\n" if server.down else "[server] all processes up again\n")
                down_for = time.time() - server.since if server.since is not None else 0.0
                if down_for > SERVER_DOWN_GIVE_UP and not self.server_down:
                    self.server_down = server.down
                    if self.on_server_down is not None:
                        self.on_server_down()
            except Exception as e:  # noqa: BLE001 - the display must never end the run's follower
                self.write(f"[progress] cannot be shown ({e})\n")


def written_by(run_dir: Path, flwr_run: int | None) -> bool:
    """Whether flwr run `flwr_run`'s ServerApp wrote the run's result.json last (its WRITTEN_BY): how `oncofed run` and
    `oncofed deliver` know their own attempt finished. Not by its time: the clock may step back while a run trains."""
    result = _json(run_dir / RESULT)
    return flwr_run is not None and isinstance(result, dict) and result.get(WRITTEN_BY) == flwr_run


def finished_verdict(run_dir: Path, name: str) -> tuple[int, str]:
    """(exit code, message) of a run whose ServerApp wrote its result: 0 every site that trained installed the model,
    DELIVERY_SHORT_EXIT some did not (`oncofed deliver` sends it again), 1 no round updated the model, so there is
    nothing to deliver (a deliver could not help: no_model_verdict says what to fix)."""
    from server.delivery import DELIVERY_SHORT_EXIT, delivery_verdict

    root = run_dir.parent.parent
    refused_all, never = sites_left_out(root, name)
    if verdict := no_model_verdict(root, name):  # (their refusals are the verdict's own words)
        return 1, f"run {name!r} {verdict}" + (f"; {never}" if never else "")
    delivered, message = delivery_verdict(run_dir)
    left_out = "; ".join(x for x in (refused_all, never) if x)
    return (0 if delivered else DELIVERY_SHORT_EXIT), (f"run {name!r} finished training: {run_dir / RESULT}; "
                                                       f"{message}" + (f". Left out: {left_out}" if left_out else ""))


def follow_dropped_stream(root: Path, name: str, flwr_run: int | None, flwr_exit: int | None, out, what: str,
                         how_to_stop: str, health=None) -> RunView | None:
    """After the log stream of flwr run `flwr_run` (`oncofed run`'s or `oncofed deliver`'s own attempt at run `name`,
    `what`) ended: the run's view with that flwr run's state. One the SuperLink still has pending or running without
    its result written (the stream dropped: a SuperLink restart, which a ServerApp survives) is first followed from
    the run's files until it ends; None when following was given up, the server being down (follow said so)."""
    db = root / "state" / "superlink.db"
    view = RunView.load(root, name, read_superlink(db), flwr_run)
    if view.running and not view.finished:
        out.write(f"the log stream ended (flwr exit {flwr_exit}) but {what} is still {view.state} on the SuperLink: "
                  f"following its progress instead (Ctrl-C stops following, not {how_to_stop})\n")
        if follow(root, name, out, health=health, flwr_run=flwr_run) == 3:
            return None
        view = RunView.load(root, name, read_superlink(db), flwr_run)
    return view


def ended_without_result(root: Path, view: RunView, log_path: Path, flwr_exit: int | None = None) -> str:
    """What became of a run whose flwr run ended without writing its result, from the SuperLink's state, and how to go
    on (`flwr_exit`: that of the `flwr run` whose log stream ended; None for `oncofed runs follow`, which has none)."""
    superlink_log, name = root / "logs" / "superlink.log", view.name
    exit_said = "" if flwr_exit is None else f"flwr exit {flwr_exit}"
    if view.state == "stopped":
        return (f"run {name!r} was stopped on the SuperLink (`oncofed runs stop` or `flwr stop`"
                f"{exit_said and '; ' + exit_said}): {restart_hint(root, view)}")
    if view.state == "failed":  # (flwr's own exit code says nothing here: 0 even then)
        return (f"run {name!r} failed on the SuperLink; see {log_path} and {superlink_log}; after fixing the cause, "
                f"{restart_hint(root, view)}")
    if view.state == "completed":
        return f"run {name!r} ended without writing its result ({exit_said and exit_said + '; '}see {superlink_log})"
    return (f"run {name!r}: {exit_said and f'the log stream ended ({exit_said}) and '}the SuperLink's state of the run "
            f"cannot be read ({root / 'state' / 'superlink.db'}); check `oncofed runs list {root}` once the server is "
            "up, and continue with --resume only when it shows the run failed or stopped")


def after_stream(root: Path, name: str, flwr_exit: int | None, log_path: Path, out, health=None,
                 server_down: str = "", flwr_run: int | None = None) -> int:
    """`oncofed run`'s verdict once its log stream ended: finished_verdict's when its attempt (flwr run `flwr_run`,
    default the run's latest) wrote result.json; otherwise what happened to the run, from the SuperLink's own state.
    A run still running (the stream dropped: a SuperLink restart) is followed from its files until it ends, then
    judged the same way (a dropped stream used to suggest `--resume`, which would have stopped a healthy run, and
    then to exit 0 whoever had not installed the model)."""
    run_dir = root / "runs" / name
    flwr_run = flwr_run if flwr_run is not None else (_json(run_dir / FLWR_RUNS) or [None])[-1]
    if server_down and not written_by(run_dir, flwr_run):
        state = RunView.load(root, name, read_superlink(root / "state" / "superlink.db"), flwr_run).state
        out.write(f"run {name!r}: the server has been down for {SERVER_DOWN_GIVE_UP:.0f} s ({server_down}); stopped "
                  f"following. The run itself is {state} as far as the SuperLink's database tells; once the "
                  f"server is up, `oncofed runs follow {root} {name}` shows it\n")
        return 1
    view = follow_dropped_stream(root, name, flwr_run, flwr_exit, out, f"run {name!r}",
                                 f"the run; `oncofed runs stop {root} {name}` stops the run", health)
    if view is None:  # the server is down: said so, with what to do
        return 1
    if written_by(run_dir, flwr_run):  # whatever the SuperLink says of the flwr run: the model went out
        code, message = finished_verdict(run_dir, name)
        out.write(message + "\n")
        return code
    out.write(ended_without_result(root, view, log_path, flwr_exit) + "\n")
    return 1


def follow_to_verdict(root: Path, name: str, out, poll: float = 2.0, health=None) -> int:
    """`oncofed runs follow`: the run's progress until it ends, then `oncofed run`'s verdict and exit code: once its
    result.json is written, finished_verdict's (0 every site that trained installed the model; 3 some did not, named,
    with `oncofed deliver`; 1 no model), whoever wrote it last (the run, or an `oncofed deliver` since: the deliveries
    as they stand); otherwise 1, with how to go on, or when following was given up (the server down: said so). It
    exited 0 for any run that completed, hiding a site that trained and never installed the model. An `oncofed
    deliver` of it in progress is followed to its end first (the verdict before it would name the sites it is sending
    the model to), and one that ended without recording its delivery is said with what to do."""
    db = root / "state" / "superlink.db"
    view = RunView.load(root, name, read_superlink(db))
    delivering = view.delivery["flwr_run"] if view.delivery_state == "in progress" else None
    if follow(root, name, out, poll=poll, health=health, flwr_run=delivering) == 3:
        return 1
    view = RunView.load(root, name, read_superlink(db))
    if delivering is not None and (ended := delivery_ended_early(root, name, view.delivery, view.delivery_state)):
        out.write(ended + "\n")  # then the verdict on the deliveries as they stand
    if view.result:
        code, message = finished_verdict(view.run_dir, name)
        out.write(message + "\n")
        return code
    out.write(ended_without_result(root, view, view.run_dir / FLWR_LOG) + "\n")
    return 1
