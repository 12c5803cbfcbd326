"""Delivery of a run's final model as a step of its own: the ServerApp's push after training, and
`oncofed deliver CONSORTIUM RUN`, which pushes the saved final model again without retraining.

A run ends with RUN_DIR/final_weights.npz and package.json (the package description the server signs).
Delivery signs the package with the run config's signing key, sends it with the weights to sites
(`query.save_model`; each site verifies the signature and the weights' SHA-256 before installing)
and records who installed it:

    result.json   deliveries: one entry per site sent the model (installed, version, or the error) and per site
                  that trained but was not connected to be sent it (the error says so)
    status.json   delivered (sites that installed it), trained (sites whose update entered a round),
                  delivery_ok (1 when every site that trained installed it); read by server/metrics.py
    audit.jsonl   run_end (the first delivery), redelivery (every later one)

`oncofed deliver` submits the same Flower app with `deliver-only = true` and the run's own config
(from its checkpoint), so the ServerApp skips training: it re-signs the saved package (a run signed
with the wrong key is delivered again with the right one), waits up to round-timeout for the sites
that trained but have not installed it, and sends it to every connected site that has not.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np

from shared_models.files import write_json_atomic
from shared_models.protocol import (ARRAYS_RECORD, AUDIT_ANCHOR, CONFIG_RECORD, PACKAGE_INFO, PREVIOUS_ROUND, REPLY,
                                    ROUND_OUTCOME, RUN_KEY, SAVE_MODEL, SITE, DeliveryReply)
from server.run_files import (CHECKPOINTS, FINAL_WEIGHTS, FLWR_LOG, METRICS, PACKAGE, RESULT, STATUS, WRITTEN_BY,
                              metrics_lines)

DELIVERY_SHORT_EXIT = 3  # `oncofed run` / `oncofed deliver`: trained, but not every site that trained installed it
_RESULT_ONLY = ("first_round", "seconds", "deliveries", "metrics_file", "checkpoints", "redelivered", WRITTEN_BY)


NOT_CONNECTED = "not connected when the final model was sent"


def deliver(grid, final: list[np.ndarray], package: dict, timeout: float, node_ids=None,
            anchor: str = "", previous: dict | None = None, registered: dict | None = None,
            expected=(), unreached: str = NOT_CONNECTED, by_name: bool = False) -> list[dict]:
    """Send the final model to `node_ids` (default: every connected site); each installs it in its model store.
    `previous`: the last round's outcome (server.checkpoint.round_outcome), which no next round will carry: a DP
    site notes an abandoned one on that round's ledger entry. `registered` (node id -> name, from the consortium's
    register): each delivery is filed under the node's registered name, the name it reported kept beside it when
    it differs. `expected`: nodes that should have it (those that trained, or their `TrainedSite`s); one not sent it
    is recorded as not installed, `unreached` the reason. `by_name` (a simulation, as in `trained_sites`): a site
    sent it under a node id that never trained (its SuperNode's id after a resume) counts as sent it."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    config = {PACKAGE_INFO: json.dumps(package), RUN_KEY: str(package.get("run", ""))}
    if anchor:
        config[AUDIT_ANCHOR] = anchor
    if previous:
        config[PREVIOUS_ROUND] = json.dumps(previous)
    content = RecordDict({ARRAYS_RECORD: ArrayRecord(numpy_ndarrays=final), CONFIG_RECORD: ConfigRecord(config)})
    nodes = list(grid.get_node_ids()) if node_ids is None else list(node_ids)
    out = [{"node": reply.metadata.src_node_id, **_reply(reply)}
           for reply in _query(grid, SAVE_MODEL, content, nodes, timeout)]
    answered = {d["node"] for d in out}
    out += [{"node": nid, **_not_installed(f"no reply within {timeout:g} s")} for nid in nodes if nid not in answered]
    _file_under_registered(out, registered)
    groups = [g if isinstance(g, TrainedSite) else TrainedSite(None, [int(g)]) for g in expected]
    sent = set(nodes)  # a site sent it under any of its node ids answered above
    renamed = _newcomer_names(out, groups) if by_name else set()  # (a simulation's site resumed under a new id)
    unsent = [{"node": g.nodes[-1], **({"site": g.name} if g.name else {}), **_not_installed(unreached)}
              for g in groups if not sent & set(g.nodes) and g.name not in renamed]
    _file_under_registered(unsent, registered)
    return out + unsent


def _file_under_registered(deliveries: list[dict], registered: dict | None) -> None:
    """Each delivery under its node's registered name, the name the site reported kept beside it when it differs."""
    for d in deliveries:
        if (name := (registered or {}).get(str(d["node"]))) is not None and d.get("site") != name:
            d.update(site=name, **({"reported_site": d["site"]} if d.get("site") else {}))


def tell_outcome(grid, previous: dict, run_key: str, timeout: float) -> int:
    """A run that delivers no model still tells every site what became of its last round (`query.round_outcome`),
    so that an abandoned round's ledger entry says why; returns how many sites answered."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict({CONFIG_RECORD: ConfigRecord({PREVIOUS_ROUND: json.dumps(previous), RUN_KEY: run_key})})
    return len(_query(grid, ROUND_OUTCOME, content, list(grid.get_node_ids()), timeout))


def _query(grid, action: str, content, nodes: list[int], timeout: float) -> list:
    from flwr.app import Message
    from flwr.app.message_type import MessageType

    from server.workflow import PollingGrid

    messages = [Message(content=content, dst_node_id=nid, message_type=f"{MessageType.QUERY}.{action}") for nid in nodes]
    return list(PollingGrid(grid, timeout).send_and_receive(messages))


def _not_installed(error: str) -> dict:
    return {"installed": False, "error": error}


def _reply(reply) -> dict:
    """A site's delivery reply (shared_models.protocol.DeliveryReply) as the server records it."""
    if reply.has_error():
        return _not_installed(reply.error.reason[-300:])
    try:
        text = str(reply.content[CONFIG_RECORD][REPLY])
        return DeliveryReply.model_validate_json(text).model_dump(exclude_unset=True)
    except (KeyError, ValueError) as e:
        return _not_installed(f"the site's reply is not a delivery reply: {str(e)[:300]}")


def audited(deliveries: list[dict]) -> list[dict]:
    """What the run's audit log keeps of each delivery: who, whether it installed (or why not), its audit head."""
    return [{k: d.get(k) for k in ("site", "node", "installed", "version", "error", "audit_head")} for d in deliveries]


@dataclass
class TrainedSite:
    """A site whose update entered at least one aggregate of the run: the name it reported (None if not recorded)
    and the node ids it trained under, in the order first seen (one, unless a resumed simulation gave it another)."""
    name: str | None
    nodes: list[int]


def trained_sites(run_dir: Path, by_name: bool = False) -> list[TrainedSite]:
    """The sites that trained in the run (metrics.jsonl, every attempt; a last line a crash cut short is skipped): see
    `sites_that_trained`."""
    return sites_that_trained(metrics_lines(run_dir / METRICS), by_name)


def sites_that_trained(records: list[dict], by_name: bool = False) -> list[TrainedSite]:
    """The sites that trained in the run, from its metrics.jsonl records. A deployment's node keeps its id (bound to
    its key): one site per node. `by_name` (a simulation, whose SuperNodes get new ids when a run resumes): nodes
    that reported the same site name and never trained in the same round are one site, under its newest id."""
    seen: dict[int, tuple[str | None, set[int]]] = {}  # node -> (its reported name, the rounds it trained in)
    for record in records:
        try:
            sites = record.get("sites") or {}
            for n in record.get("participants", []):
                name = (sites.get(str(n)) or {}).get(SITE)
                before = seen.get(int(n), (None, set()))
                seen[int(n)] = (str(name) if name else before[0], before[1] | {record.get("round")})
        except (ValueError, TypeError, AttributeError):
            continue
    out: list[TrainedSite] = []
    named: dict[str, list[TrainedSite]] = {}
    for n, (name, rounds) in seen.items():
        same = [g for g in named.get(name, []) if not any(rounds & seen[m][1] for m in g.nodes)] if by_name and name \
            else []
        if same:
            same[0].nodes.append(n)
            continue
        out.append(TrainedSite(name, [n]))
        if name:
            named.setdefault(name, []).append(out[-1])
    return out


def trained_nodes(run_dir: Path) -> set[int]:
    """Nodes whose update entered at least one aggregate of the run (metrics.jsonl, every attempt)."""
    return {n for g in trained_sites(run_dir) for n in g.nodes}


def installed_nodes(deliveries: list[dict]) -> set[int]:
    return {int(d["node"]) for d in deliveries if d.get("installed") and d.get("node") is not None}


def _newcomer_names(deliveries: list[dict], sites: list[TrainedSite], installed_only: bool = False) -> set[str]:
    """The site names of deliveries to nodes that trained in no round: in a simulation (names it sets itself), a site
    resumed after the last round it trained in comes back under a new node id."""
    trained = {n for g in sites for n in g.nodes}
    return {str(d["site"]) for d in deliveries if d.get("site") and d.get("node") is not None
            and int(d["node"]) not in trained and (d.get("installed") or not installed_only)}


def removed_nodes(run_dir: Path) -> dict[str, str]:
    """{node id: when} of the sites removed from the consortium whose runs directory holds `run_dir`
    (CONSORTIUM/runs/NAME; {} for a simulation's run, which has no register)."""
    from privacy.registry import removed_sites

    return removed_sites(run_dir.parent.parent / "consortium.json")


def _split_removed(nodes: list, removed: dict[str, str]) -> tuple[dict[str, str], list]:
    """({node id: when removed} of the `nodes` the register removed, the others in their order)."""
    gone = {str(n): removed[str(n)] for n in nodes if str(n) in removed}
    return gone, [n for n in nodes if str(n) not in gone]


def delivery_now(run_dir: Path, status: dict) -> dict:
    """status.json as the register stands now: a site `remove-site` took out after the delivery was recorded is
    listed under `removed`, not `undelivered` (status.json is rewritten only by the next `oncofed deliver`), so
    `oncofed runs`, the verdict and the undelivered alert stop counting it at once."""
    if not status.get("undelivered"):
        return status
    gone, missing = _split_removed(status["undelivered"], removed_nodes(run_dir))
    if not gone:
        return status
    return {**status, "undelivered": missing, "delivery_ok": int(not missing),
            "removed": {**(status.get("removed") or {}), **gone}}


def delivery_status(run_dir: Path, deliveries: list[dict], by_name: bool = False,
                    sites: list[TrainedSite] | None = None, removed: dict[str, str] | None = None) -> dict:
    """status.json's delivery fields: who installed the final model against who trained it (`trained_sites`, or
    `sites` when the caller has read them; `by_name`, a simulation's: a site that installed it under a node id that
    never trained counts too). A site removed from the consortium (`removed`, {node id: when}, default the register's)
    can never install it: it is listed under `removed`, not `undelivered`, so the alert on the run clears."""
    sites = trained_sites(run_dir, by_name) if sites is None else sites
    removed = ({} if by_name else removed_nodes(run_dir)) if removed is None else removed
    installed = installed_nodes(deliveries)
    renamed = _newcomer_names(deliveries, sites, installed_only=True) if by_name else set()
    short = [g.nodes[-1] for g in sites if not set(g.nodes) & installed and g.name not in renamed]
    gone, missing = _split_removed(short, removed)
    missing = sorted(missing)
    return {"delivered": len(installed), "trained": len(sites), "delivery_ok": int(not missing),
            "undelivered": missing, **({"removed": gone} if gone else {})}


def delivery_summary(status: dict, deliveries: list[dict], consortium_dir: Path | None = None) -> tuple[bool, str]:
    """(ok, what became of the final model) over the sites that trained (status.json's delivery fields): how many of
    them installed it, and each one that did not with the reason its delivery recorded. The ServerApp's log, the
    verdict of `oncofed run` / `oncofed deliver` and `oncofed runs` all say this."""
    trained, missing = int(status.get("trained") or 0), [int(n) for n in status.get("undelivered") or []]
    removed = status.get("removed") or {}
    at_trained = trained - len(missing) - len(removed)
    others = int(status.get("delivered") or 0) - at_trained  # installed, but never trained (joined at the end)
    also = f" (and at {others} connected site(s) that did not train)" if others > 0 else ""
    gone = "; ".join(f"{name} was removed from the consortium ({when}): not sent" for name, when in
                     zip(site_names(deliveries, list(removed), consortium_dir), removed.values()))
    if not missing:
        if removed:
            return True, (f"final model installed at all {at_trained} site(s) that trained and are still in the "
                          f"consortium{also}; {gone}")
        return True, f"final model installed at all {trained} site(s) that trained{also}"
    reasons = {}
    for d in deliveries:  # the last entry of each node (a redelivery replaces the earlier one)
        if d.get("node") is not None and not d.get("installed"):
            reasons[int(d["node"])] = str(d.get("error") or "no reason recorded")
    names = site_names(deliveries, missing, consortium_dir)
    why = [f"{name} ({reasons.get(n, NOT_CONNECTED)[:200]})" for name, n in zip(names, missing)]
    return False, (f"final model installed at {at_trained} of the {trained - len(removed)} sites that trained"
                   f"{' and are still in the consortium' if removed else ''}{also}; not at {'; '.join(why)}"
                   + (f"; {gone}" if gone else ""))


def site_names(deliveries: list[dict], nodes, consortium_dir: Path | None = None) -> list[str]:
    """Names for node ids: from the operator's register (consortium.json), else the sites' own replies."""
    from server.runs import site_names as registered

    names = {int(d["node"]): d["site"] for d in deliveries if d.get("site") and d.get("node") is not None}
    if consortium_dir is not None:
        names.update(registered(consortium_dir))
    return [names.get(int(n), f"node {n}") for n in nodes]


FINISHED_STEP_S = 1.0  # a model dated by an earlier run's date is dated this much after it


def dated_after_earlier_runs(out: Path, ended: float) -> tuple[float, dict | None]:
    """The date of a model whose round ended at `ended` by the server's clock: `ended`, or FINISHED_STEP_S after the
    newest `finished` of the models the consortium's other runs saved (runs/*/package.json) when that is not
    before it. Those packages exist now, so their models finished before this one, whatever their dates say: a
    server clock that ran ahead for one run and was corrected since would otherwise date the next run's model before
    it, and every site would refuse that as a rollback (client.model_store). Returns (the date, None or
    {"run": the run directory, "finished": its date} when the clock read before that date)."""
    dates = {}
    for f in out.parent.glob(f"*/{PACKAGE}"):
        try:
            finished = json.loads(f.read_text()).get("finished")
        except (OSError, ValueError, AttributeError):
            continue  # being replaced, or not a package: the others still order this model
        if f.parent.name != out.name and isinstance(finished, (int, float)):
            dates[f.parent.name] = float(finished)
    run = max(dates, key=dates.__getitem__, default=None)
    if run is None or dates[run] < ended:
        return ended, None
    return round(dates[run] + FINISHED_STEP_S, 3), {"run": run, "finished": dates[run]}


def finished_at(out: Path, last: dict, final: list[np.ndarray], otherwise=lambda: round(time.time(), 3)) -> float:
    """When the final model was finished: the date its last round recorded (`dated_after_earlier_runs` at that
    round's end: so a run resumed only to deliver, days later, stays older than the runs that finished meanwhile, and
    no site's model store takes it for the newest: its `finished` orders re-deliveries); a round recorded before
    that date was kept, its end; for a last round recorded without either, the time an earlier attempt's saved
    package gave these same weights, else `otherwise()` (now, for a model finished in this process)."""
    from shared_models.weights import arrays_sha256

    for key in ("finished", "ended"):
        if isinstance(last.get(key), (int, float)):
            return float(last[key])
    try:
        saved = json.loads((out / PACKAGE).read_text())
        if saved.get("arrays_sha256") == arrays_sha256(final) and isinstance(saved.get("finished"), (int, float)):
            return float(saved["finished"])
    except (OSError, ValueError):
        pass
    return otherwise()


def save_package(run_dir: Path, package: dict) -> None:
    """The signed package description, beside final_weights.npz: what `oncofed deliver` sends again."""
    write_json_atomic(run_dir / PACKAGE, package)


def load_final(run_dir: Path) -> tuple[list[np.ndarray], dict]:
    """The saved final weights and their package description (unsigned), checked against each other."""
    from privacy.signing import SIGNATURE_KEY
    from shared_models.weights import arrays_sha256

    from server.runs import no_model_verdict

    weights = run_dir / FINAL_WEIGHTS
    if verdict := no_model_verdict(run_dir.parent.parent, run_dir.name):  # it has no final model, nor will it
        raise ValueError(f"run {run_dir.name!r} {verdict}")
    if not weights.exists():
        raise ValueError(f"{weights} is missing: run {run_dir.name!r} never finished training; continue it with "
                         "`oncofed run --resume` instead")
    with np.load(weights) as z:
        final = [z[f"arr_{i}"] for i in range(len(z.files))]
    if (run_dir / PACKAGE).exists():
        package = json.loads((run_dir / PACKAGE).read_text())
    elif (run_dir / RESULT).exists():  # a run finished before package.json was kept
        package = {k: v for k, v in json.loads((run_dir / RESULT).read_text()).items() if k not in _RESULT_ONLY}
    else:
        raise ValueError(f"{run_dir}: neither {PACKAGE} nor {RESULT}: nothing describes the final model to sign")
    package = {k: v for k, v in package.items() if k != SIGNATURE_KEY}
    if arrays_sha256(final) != package.get("arrays_sha256"):
        raise ValueError(f"{weights}: SHA-256 {arrays_sha256(final)[:16]}... is not the package's "
                         f"{str(package.get('arrays_sha256'))[:16]}...: the saved final model was altered; not sent")
    _check_against_audit(run_dir, package)
    return final, package


def _check_against_audit(run_dir: Path, package: dict) -> None:
    """The model to re-sign must be the global model the run's hash-chained audit log (whose heads the sites
    hold) recorded after its last round: final_weights.npz and package.json rewritten together are not."""
    from privacy.audit import AUDIT_FILE, AuditLog, verify

    log = run_dir / AUDIT_FILE
    report = verify(log)
    if not report.ok:
        raise ValueError(f"{log}: the run's audit log does not verify ({'; '.join(report.problems[:2])}): the final "
                         "model cannot be tied to the run; not signed or sent")
    last = AuditLog(log).last("round", run=package.get("run"))
    if last.get("weights_sha256") != package.get("arrays_sha256"):
        raise ValueError(f"{run_dir / FINAL_WEIGHTS}: its SHA-256 {str(package.get('arrays_sha256'))[:16]}... is not "
                         f"the global model the audit log recorded after run {package.get('run')}'s last round "
                         f"({str(last.get('weights_sha256'))[:16]}...): not signed or sent")


def redeliver(grid, cfg, flwr_run: int | None = None) -> None:
    """The ServerApp with `deliver-only = true`: sign and send the run's saved final model to every site
    that has not installed it; no training, no privacy spend. result.json then names `flwr_run` (this ServerApp's):
    how `oncofed deliver` knows this delivery finished."""
    from flwr.common.logger import log

    from privacy.audit import AUDIT_FILE, AuditLog, signed_anchor
    from privacy.signing import load_private, sign

    out = cfg.path(cfg.run.output_dir)
    final, package = load_final(out)
    if not cfg.run.signing_key:
        raise ValueError("run config signing-key is empty: `oncofed deliver` sends signed models only")
    key = load_private(cfg.path(cfg.run.signing_key))
    # a package saved before the architecture was signed gains it: the run's own config built these arrays; one saved
    # before it was dated gains its last round's end (a site orders deliveries by it: undated, it would not be
    # compared, and an earlier run sent again would replace a newer active model)
    if not isinstance(finished := package.get("finished"), (int, float)):  # never "now": that would date it newest
        finished = finished_at(out, (metrics_lines(out / METRICS) or [{}])[-1], final,
                               otherwise=lambda: round((out / FINAL_WEIGHTS).stat().st_mtime, 3))  # written at delivery
    package = sign({**package, "architecture": package.get("architecture") or cfg.model.model_dump(),
                    "finished": finished}, key)
    result = json.loads((out / RESULT).read_text()) if (out / RESULT).exists() else {**package}
    before = list(result.get("deliveries", []))
    done = installed_nodes(before)
    removed = removed_nodes(out)  # a site removed from the consortium can no longer connect: not waited for
    wanted = {n for n in trained_nodes(out) - done if str(n) not in removed}
    deadline = time.monotonic() + cfg.federation.round_timeout
    while wanted - set(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(1.0)  # a site that trained may be reconnecting
    targets = sorted(set(grid.get_node_ids()) - done)
    log(INFO, "delivering run %s's final model again to %s site(s) (%s installed it before)", package.get("run"),
        len(targets), len(done))
    audit = AuditLog(out / AUDIT_FILE)
    anchor = json.dumps(signed_anchor(audit, key, run=package.get("run"), run_name=out.name))
    from server.checkpoint import round_outcome

    from privacy.registry import registered_names

    new = deliver(grid, final, package, cfg.federation.round_timeout, node_ids=targets, anchor=anchor,
                  previous=round_outcome(out, int(package.get("round", 0))),
                  registered=registered_names(cfg.path(cfg.run.site_registry)) if cfg.run.site_registry else None,
                  expected=wanted, unreached=f"{NOT_CONNECTED} again (`oncofed deliver` waited "
                  f"{cfg.federation.round_timeout:g} s for it)")
    renewed = {d["node"] for d in new}
    deliveries = [d for d in before if d.get("node") not in renewed] + new
    save_package(out, package)
    write_json_atomic(out / RESULT, {**result, **package, "deliveries": deliveries, "redelivered": time.time(),
                                     WRITTEN_BY: flwr_run})
    status = json.loads((out / STATUS).read_text()) if (out / STATUS).exists() else {"run": package.get("run")}
    status.pop("removed", None)
    # training finished (this is its saved model): whatever a crash during the run's own delivery left in status.json,
    # the undelivered alert needs finished 1 (server/metrics.py)
    status.update(finished=1, **delivery_status(out, deliveries, removed=removed))
    write_json_atomic(out / STATUS, status)
    ended = bool(audit.last("run_end", run=package.get("run")))  # else the run's own delivery never ended: this one does
    if ended:
        audit.append("redelivery", run=package.get("run"), arrays_sha256=package["arrays_sha256"],
                     deliveries=audited(new))
    else:
        audit.append("run_end", run=package.get("run"), round=package.get("round"),
                     arrays_sha256=package["arrays_sha256"], deliveries=audited(deliveries), by="oncofed deliver")
    ok, summary = delivery_summary(status, deliveries, out.parent.parent)
    log(INFO if ok else WARNING, "%s", summary)


# --- the operator's side: `oncofed run`'s verdict and `oncofed deliver` ---------------------------------------

def delivery_verdict(run_dir: Path) -> tuple[bool, str]:
    """(ok, message) for a run whose training finished: did every site that trained install the model?"""
    try:
        status = json.loads((run_dir / STATUS).read_text())
        deliveries = json.loads((run_dir / RESULT).read_text()).get("deliveries", [])
    except (OSError, ValueError):
        return False, f"{run_dir / STATUS} or {RESULT} unreadable: delivery unknown"
    status = delivery_now(run_dir, status) if "delivery_ok" in status else {**status, **delivery_status(run_dir,
                                                                                                      deliveries)}
    ok, summary = delivery_summary(status, deliveries, run_dir.parent.parent)
    return ok, summary if ok else (f"{summary}. When the cause is fixed, send it again without retraining: "
                                   f"`oncofed deliver {run_dir.parent.parent} {run_dir.name}`")


def delivery_checks(c, run_dir: Path, cfg) -> list:
    from privacy.preflight import Check, check_reachable, check_signing_key

    from server.deploy import check_server_health

    # the server's processes as `oncofed run` checks them: with the SuperExec down the delivery run would wait forever
    checks = [check_reachable(c.control_address, c.path("ca", "ca.crt"), "SuperLink"), check_server_health(c),
              check_signing_key(Path(cfg.run.signing_key), c.path("public", "signing.pub"))]
    try:
        load_final(run_dir)
        checks.append(Check(f"final model {run_dir / FINAL_WEIGHTS}", True, "matches its package"))
    except (OSError, ValueError) as e:
        checks.append(Check(f"final model {run_dir / FINAL_WEIGHTS}", False, str(e)))
    if busy := run_in_progress(c, run_dir):
        checks.append(Check(f"run {run_dir.name}", False, busy))
    return checks


def run_in_progress(c, run_dir: Path) -> str:
    """Why `oncofed deliver` must not start now, "" if nothing holds the run: a flwr run of it the SuperLink has
    pending or running, an `oncofed deliver`'s (delivery-runs.json) or its training's (flwr-runs.json, whose
    ServerApp delivers the model itself when training ends), but for one that wrote result.json (it is ending). A
    second ServerApp of the run would wait 60 s for the one holding the run's lock (server.checkpoint.hold_run_lock)
    and then fail."""
    from server.runs import deliveries_in_progress, read_superlink, written_by
    from server.submit import live_flwr_runs

    if delivering := deliveries_in_progress(run_dir, read_superlink(c.path("state", "superlink.db"))):
        what = f"flwr run {delivering[-1]}, an `oncofed deliver` of this run, is"
    # a training whose ServerApp wrote result.json has delivered and is ending: the new one waits for its lock
    elif training := [i for i in live_flwr_runs(c, run_dir) if not written_by(run_dir, i)]:
        what = (f"flwr run {training[-1]}, this run's training (`oncofed run`), which delivers the model when it "
                "ends, is")
    else:
        return ""
    return (f"{what} still pending or running on the SuperLink. Follow it to its verdict with "
            f"`oncofed runs follow {c.root} {run_dir.name}`, or stop it with `oncofed runs stop {c.root} "
            f"{run_dir.name}` and then `oncofed deliver {c.root} {run_dir.name}` again")


def submit_delivery(root: str | Path, name: str, out=sys.stdout) -> int:
    """`oncofed deliver`: preflight, then the Flower app with deliver-only = true and the run's own config."""
    from privacy.preflight import report
    from privacy.run_config import load_run_config
    from server.checkpoint import CheckpointError, load_latest
    from server.deploy import Consortium, DeployError, RunFailedError, SubmittedError, server_health
    from server.processes import run_flwr
    from server.runs import (delivery_ended_early, delivery_runs, delivery_state, follow_dropped_stream,
                             no_model_verdict, read_superlink, record_delivery_run, written_by)
    from server.submit import PROJECT, env_for, flwr_run_started, is_duplicate_log_line, submit_lock
    from shared_models.run_config import flwr_overrides

    c = Consortium.load(root)
    run_dir = c.path("runs", name)
    if not run_dir.is_dir():
        known = sorted(d.name for d in c.path("runs").glob("*") if d.is_dir()) if c.path("runs").is_dir() else []
        raise DeployError(f"no run {name!r} in {c.path('runs')} (runs: {', '.join(known) or 'none'}); "
                          "`oncofed runs list` names them")
    if verdict := no_model_verdict(c.root, name):
        raise RunFailedError(f"run {name!r} {verdict}")
    try:
        checkpoint = load_latest(run_dir / CHECKPOINTS)
    except CheckpointError as e:
        raise DeployError(str(e)) from None
    if checkpoint is None or "run_config" not in checkpoint.meta:
        raise DeployError(f"run {name!r}: no checkpoint in {run_dir / 'checkpoints'}; `oncofed deliver` sends the "
                          "final model of a run that finished training")
    values = {**checkpoint.meta["run_config"], "signing-key": str(c.path("signing", "signing.key")),
              "site-registry": str(c.path("consortium.json")), "resume": False, "deliver-only": True}
    cfg = load_run_config(values, source=f"run {name!r}'s run config")
    # from the preflight (which reads delivery-runs.json) until this delivery's flwr run is recorded there: a second
    # `oncofed deliver` (or `oncofed run --resume`) at the same moment would pass the same preflight
    lock = submit_lock(c, name, "`oncofed deliver`", out)
    try:
        out.write(report(f"deliver {name!r}", delivery_checks(c, run_dir, cfg)) + "\n")
        attempt: list[int] = []  # this delivery's flwr run id: what its ServerApp writes into result.json

        def on_line(line: str) -> None:
            if (run_id := flwr_run_started(line)) is not None:
                attempt.append(run_id)
                try:  # what `oncofed runs stop` stops, the server's exit is recorded in
                    record_delivery_run(run_dir, run_id)
                except DeployError as e:
                    lock.leave()  # the next `oncofed deliver` records it
                    raise SubmittedError(str(e)) from None
                lock.close()  # recorded: the next `oncofed deliver` sees it in its preflight
            if not is_duplicate_log_line(line):
                out.write(line)
                out.flush()

        log_path = run_dir / FLWR_LOG
        code = run_flwr([str(PROJECT), "consortium", "--stream", "--run-config", flwr_overrides(values)], env_for(c),
                        log_path, on_line, append=True, new_session=True,
                        on_start=lambda proc: lock.flwr_started(proc.pid))  # (named in the lock: _take_over)
    finally:
        lock.close()
    flwr_run = attempt[0] if attempt else None
    if flwr_run is not None:  # a dropped stream (a SuperLink restart) leaves the delivery going on: followed to its end
        follow_dropped_stream(c.root, name, flwr_run, code, out, f"the delivery of run {name!r} (flwr run {flwr_run})",
                              "the delivery", health=lambda: server_health(c))
    if not written_by(run_dir, flwr_run):
        # the database before the run's files: `oncofed runs stop` records who stops a delivery before the database
        # calls it stopped, so a stop seen there is seen with its cause
        superlink = read_superlink(c.path("state", "superlink.db"))
        mine = next((e for e in delivery_runs(run_dir) if e["flwr_run"] == flwr_run), None)
        state = delivery_state(run_dir, mine, superlink) if mine else ""
        out.write((mine and delivery_ended_early(c.root, name, mine, state)
                   or f"delivery of run {name!r} did not finish (flwr exit {code}); see {log_path}") + "\n")
        return 1
    ok, message = delivery_verdict(run_dir)
    out.write(f"run {name!r}: {message}\n")
    return 0 if ok else DELIVERY_SHORT_EXIT
