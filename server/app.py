"""The consortium's Flower ServerApp: rounds of SecAgg+-aggregated site updates, checkpoints, delivery.

    parse the run config -> initial (or checkpointed) weights -> strategy (deltas) ->
    rounds (SecAgg+ fit, evaluate, checkpoint + metrics after each) -> push the final model to
    every site (`query.save_model`) -> result.json
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context
from flwr.common import parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from privacy import secagg_masks
from privacy.audit import AUDIT_FILE, AuditLog, signed_anchor
from privacy.pki import ProvisioningError
from privacy.registry import read_register, registered_names
from privacy.run_config import load_run_config
from privacy.signing import canonical, load_private, sign
from server.checkpoint import (freeze_run, frozen_run, hold_run_lock, load_latest, model_updated, resume_command,
                               round_outcome, rounds_updated, run_config_changes, save_checkpoint, why_no_update, write_json_atomic)
from server.delivery import (FINISHED_STEP_S, audited, dated_after_earlier_runs, deliver, delivery_status,
                             delivery_summary, finished_at, redeliver, save_package, sites_that_trained, tell_outcome)
from server.strategy import build_strategy
from server.workflow import RoundsWorkflow, TimedSecAggPlusWorkflow, active_sites
from shared_models.evaluation import evaluate
from shared_models.files import append_json_line, atomic_file, cut_partial_line, write_failure
from shared_models.model import MultiModalTransformer
from shared_models.protocol import (AUDIT_ANCHOR, AUDIT_HEAD, EPSILON, EPSILON_WORST_CASE, NOISE_PLAN, RUN_EPSILON,
                                    RUN_KEY,
                                    SECAGG_CLIPPING_RANGE, SECAGG_MASKS, SECAGG_MAX_WEIGHT, SITE, ModelPackage,
                                    consortium_patterns)
from shared_models.run_config import SECAGG_MAX_SHARES, ModelConfig, RunConfig
from shared_models.schema import FeatureSchema
from shared_models.site_data import load_labelled_site
from shared_models.validation import validate_site
from shared_models.weights import arrays_sha256, load_arrays, state_arrays, trainable_layout
from server.run_files import CHECKPOINTS, FINAL_WEIGHTS, METRICS, PACKAGE, RESULT, STATUS, WRITTEN_BY, metrics_lines

torch.set_num_threads(1)
app = ServerApp()


def secagg_workflow(cfg: RunConfig, n_sites: int) -> TimedSecAggPlusWorkflow:
    """SecAgg+ parameters derived from the number of sites.

    Up to SECAGG_MAX_SHARES sites every site is every other's neighbour (num_shares=1.0: consortia
    have 3-20 hospitals); beyond that each site shares its keys with SECAGG_MAX_SHARES neighbours
    (SecAgg+'s sparse graph: all-to-all sharing made a 100-site round 2.5x slower than without
    SecAgg+, git log -p docs/results.md), and the threshold stays that share of the neighbours. The
    sum of n quantised vectors must stay below the modulus (2**32, Flower's limit), so the
    quantisation range is the largest power of two leaving room for n+1 summands. Sites send
    deltas (|delta| << clipping range), so the quantisation step 2*clip/Q is ~1e-8 of the range.
    """
    q_bits = 32 - math.ceil(math.log2(n_sites + 1))
    return TimedSecAggPlusWorkflow(
        num_shares=min(1.0, SECAGG_MAX_SHARES / n_sites), reconstruction_threshold=cfg.secagg.threshold,
        max_weight=cfg.secagg.max_weight, clipping_range=cfg.secagg.clipping_range, quantization_range=2**q_bits, modulus_range=2**32,
        timeout=cfg.federation.round_timeout, min_contributors=max(2, min(cfg.federation.min_sites, n_sites),
                                                        cfg.privacy.trusted_sites if cfg.privacy.distributed else 0),
        refuse_wrap=cfg.privacy.distributed)


def log_distributed_plan(cfg: RunConfig, schema: FeatureSchema) -> str:
    """The noise every site will add (the sites compute the same plan and refuse a round whose NOISE_PLAN,
    returned here, differs), beside what pooled DP-SGD with the Gaussian mechanism would need for the same
    schedule: the cost of the exact discrete mechanism's accounting. Sized, as at the sites, by the model's
    trainable coordinates (the noised ones), not by every array the model sends."""
    from privacy.accounting import noise_multiplier_for
    from privacy.distributed import plan_message, run_config_plan

    _, noised = trainable_layout(MultiModalTransformer(schema, cfg.model))
    p = run_config_plan(cfg, int(noised.sum()))
    gaussian = noise_multiplier_for(cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.sample_rate, cfg.federation.num_rounds)
    log(INFO, "distributed DP: %s rounds of one step at sample rate %s; aggregate noise multiplier %.3f (pooled "
        "Gaussian DP-SGD: %.3f); each site adds 1/%s of the noise variance", cfg.federation.num_rounds, cfg.privacy.sample_rate,
        p.noise_multiplier * p.scale * p.max_grad_norm / p.l2, gaussian, cfg.privacy.trusted_sites)
    if p.noise_multiplier * p.scale * p.max_grad_norm / p.l2 > 1.5 * gaussian:
        log(WARNING, "distributed DP: at sample rate %s and %s rounds the Skellam accounting (Renyi DP) needs over 1.5x "
            "the noise of pooled Gaussian DP-SGD; a lower sample-rate with more rounds costs less (docs/privacy.md)",
            cfg.privacy.sample_rate, cfg.federation.num_rounds)
    return plan_message(p)


def privacy_summary(cfg: RunConfig) -> str:
    """What the run's DP relies on, in one line for the operator's log and the package."""
    if not cfg.privacy.enabled:
        return "no differential privacy: the model's only protection is SecAgg+ (the server sees sums of updates)"
    if cfg.privacy.distributed:
        return (f"dp-mode distributed (Skellam noise shares under SecAgg+): each site's epsilon holds for what the "
                f"server sees as long as at least {cfg.privacy.trusted_sites} of the sites in each round's sum add their noise "
                f"share and the server does "
                "not collude with enough sites to unmask single updates; each site also reports its worst case, its "
                "own share alone")
    return "dp-mode site: each site's update is DP on its own; it holds whatever the server and other sites do"


def server_evaluation(cfg: RunConfig, schema: FeatureSchema):
    """`evaluate_fn` for the legacy strategy: the global model on the run config's `eval-data` site
    directory (held by the operator, normalised with its own statistics), after every round."""
    site_dir = cfg.path(cfg.run.eval_data)
    report = validate_site(schema, site_dir, min_count=cfg.site.min_count)
    if not report.ok:
        raise ValueError(f"run config eval-data = {cfg.run.eval_data!r}: the validation site directory is not usable; "
                         f"fix it or set eval-data = \"\"\n{report.format_report()}")
    ds = load_labelled_site(schema, site_dir)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    model = MultiModalTransformer(schema, cfg.model)
    log(INFO, "server evaluation on %s patients of %s after every round", len(y), site_dir)

    def evaluate_fn(server_round: int, arrays: list[np.ndarray], config: dict):
        load_arrays(model, arrays)
        m = evaluate(model, x, y)
        return m.loss, {"accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "macro_f1": m.macro_f1,
                        "patients": len(y)}

    return evaluate_fn


@dataclass
class RunStart:
    """Where the rounds start: a new run's initial weights, or a resumed run's checkpoint."""

    run_key: str
    weights: list[np.ndarray]
    first_round: int
    site_epsilon: dict[str, float]
    site_epsilon_worst_case: dict[str, float]
    site_run_epsilon: dict[str, float]
    strategy_state: dict[str, np.ndarray] | None = None
    round_records: dict | None = None  # the checkpointed round's metrics line and audit entry


def start_or_resume(cfg: RunConfig, context: Context, schema: FeatureSchema, out: Path) -> RunStart:
    """A new run (its run config frozen in run.json), or the checkpointed one to resume, refused if the request
    changes the run config it started with or its schema."""
    ckpt_root = out / CHECKPOINTS
    frozen = frozen_run(out)
    if frozen is not None and not cfg.run.resume:
        raise ValueError(f"{out} already holds run {frozen['run_key']} ({out / 'run.json'}); a new run never replaces "
                         "it: continue it with `oncofed run --resume`, or choose another --name")
    if cfg.run.resume:
        if frozen is None:
            raise ValueError(f"run config resume = true but {out} holds no started run ({out / 'run.json'} is "
                             "missing): nothing to resume; start the run without resume")
        if changed := run_config_changes(frozen["run_config"], dict(context.run_config), frozen["resolved"]):
            raise ValueError(f"{out / 'run.json'}: a resumed run keeps the configuration it started with; this "
                             f"request changes {'; '.join(changed)}. Resume without changes (`oncofed run --resume` "
                             "reloads it), or start a new run under another name")
    checkpoint = load_latest(ckpt_root) if cfg.run.resume else None
    if checkpoint is not None:
        if not schema.matches(checkpoint.meta.get("schema_hash")):
            raise ValueError(f"{ckpt_root}: checkpoint was trained under another schema; resume with that schema")
        if checkpoint.meta.get("run_key") != frozen["run_key"]:  # its sites' ledgers and spend are another run's
            raise ValueError(f"{ckpt_root}: the checkpoint is of run {checkpoint.meta.get('run_key')}, but "
                             f"{out / 'run.json'} is of run {frozen['run_key']}: checkpoints of another run were put "
                             "here; restore this run's checkpoints, or start a new run under another name")
        if why := unfit_weights(schema, cfg.model, checkpoint.weights):
            raise ValueError(f"{ckpt_root}: run {frozen['run_key']}'s checkpoint weights do not fit the model of this "
                             f"run config ({why}): {out / 'run.json'} or the checkpoints were changed since it trained (restore "
                             "both as the run left them), or this OncoFed builds the model otherwise than the one that "
                             "trained it (an architecture key added since and missing from server/checkpoint.py "
                             "ADDED_KEYS: resume with the OncoFed that started the run); or start a new run under "
                             "another name")
        log(INFO, "resuming run %s after round %s from %s", checkpoint.meta["run_key"], checkpoint.round, ckpt_root)
        return RunStart(checkpoint.meta["run_key"], checkpoint.weights, checkpoint.round + 1,
                        checkpoint.meta.get("site_epsilon", {}), checkpoint.meta.get("site_epsilon_worst_case", {}),
                        checkpoint.meta.get("site_run_epsilon", {}), checkpoint.strategy_state,
                        checkpoint.meta.get(ROUND_RECORDS))
    # a new run, or one that crashed before its first checkpoint (same seed: the same initial weights)
    torch.manual_seed(cfg.training.seed)
    weights = state_arrays(MultiModalTransformer(schema, cfg.model))
    run_key = frozen["run_key"] if frozen else f"{cfg.run.name}-{uuid.uuid4().hex[:8]}"
    if frozen:
        log(INFO, "resuming run %s from its start (it ended before its first checkpoint)", run_key)
    if not cfg.run.resume:
        freeze_run(out, run_key, dict(context.run_config))
    return RunStart(run_key, weights, 1, {}, {}, {})


def unfit_weights(schema: FeatureSchema, model: ModelConfig, weights: list) -> str:
    """How `weights` do not fit the model `model` builds ("" when they fit); a differing fusion depth is named, since
    "auto" resolves it by the run's dp-mode."""
    def shapes(m) -> list:
        return [a.shape for a in state_arrays(MultiModalTransformer(schema, m))]

    got, expected, blocks = [np.shape(a) for a in weights], shapes(model), model.fusion_block_count
    if got == expected:
        return ""
    per_block = len(shapes(model.model_copy(update={"fusion_blocks": blocks + 1}))) - len(expected)
    n, rest = divmod(len(got) - len(expected), per_block)
    if not rest and n and blocks + n >= 1 and shapes(model.model_copy(update={"fusion_blocks": blocks + n})) == got:
        return f"their model has fusion-blocks = {blocks + n}, this run config's {blocks}"
    return f"{len(got)} arrays against {len(expected)}, or other shapes"


ROUND_RECORDS = "round_records"  # checkpoint meta: the round's metrics.jsonl line and audit entry


def recover_round_records(out: Path, start: RunStart, audit: AuditLog) -> None:
    """Before a resumed run's first round: metrics.jsonl cut back to its last complete line, and the
    checkpointed round's metrics line and audit entry written if a crash came between the checkpoint and
    them (marked `recovered`). Without this a partial line stopped every reader of metrics.jsonl (the
    delivery of a finished run included) and the audit log lacked the round the run resumed after."""
    metrics = out / METRICS
    if cut := cut_partial_line(metrics):
        log(WARNING, "%s: removed the last %s bytes, a line a crash cut short (the checkpoint keeps the round's "
            "line)", metrics, cut)
    rec = start.round_records
    if not rec:
        return
    rnd = rec["metrics"]["round"]
    # only a round newer than the last one recorded is missing: a run resumed from an older checkpoint (the newest
    # moved aside, damaged) has its later rounds recorded already, and re-runs them
    last = (_last_metrics(metrics) or {}).get("round")
    if last is None or last < rnd:
        append_json_line(metrics, {**rec["metrics"], "recovered": True})
        log(WARNING, "%s: round %s's line written from its checkpoint (a crash came before it)", metrics, rnd)
    elif last > rnd:
        log(WARNING, "%s: resuming after round %s, from a checkpoint older than the last round recorded (%s); the "
            "rounds after it run again and are recorded again", metrics, rnd, last)
    last_entry = audit.last("round", run=rec["audit"]["run"]).get("round")
    if last_entry is None or last_entry < rnd:
        audit.append("round", **rec["audit"], recovered=True)
        log(WARNING, "%s: round %s's entry written from its checkpoint (a crash came before it)", audit.path, rnd)


def keep_site_epsilons(info: dict, names: dict, records: dict[str, dict]) -> None:
    """The round's epsilons into the run's per-site records ({metric: {site: epsilon}}: EPSILON, RUN_EPSILON,
    EPSILON_WORST_CASE): each contributing site's from its update (`names`: node -> its label); then, from its
    evaluation, the ledger of a site that trained in this run, never lowering a record: a round whose spend no update
    told (a crash after the spend, a refusal to resend) still reaches the package."""
    for nid, site in info.get("sites", {}).items():
        for key, kept in records.items():
            if key in site and nid in names:
                kept[names[nid]] = float(site[key])
    for name, e in info.get("site_eval", {}).items():  # by label (RoundRecorder files them so)
        for key, kept in records.items():
            if key in e and name in kept:
                kept[name] = max(kept[name], float(e[key]))


class RoundRecorder:
    """What the server keeps after every round: the checkpoint, a metrics.jsonl line, status.json (Prometheus),
    the run audit log's round entry and a new signed anchor for the sites, and the round's log line."""

    def __init__(self, cfg: RunConfig, context: Context, schema: FeatureSchema, out: Path, start: RunStart,
                 audit: AuditLog, anchor_audit, evaluate_fn, t0: float) -> None:
        self.cfg, self.run_config, self.schema_hash, self.out = cfg, dict(context.run_config), schema.content_hash(), out
        self.run_key, self.audit, self.anchor_audit, self.evaluated = start.run_key, audit, anchor_audit, evaluate_fn is not None
        self.site_epsilon, self.site_epsilon_worst_case = start.site_epsilon, start.site_epsilon_worst_case
        self.site_run_epsilon = start.site_run_epsilon  # this run's rounds alone (the site's total: site_epsilon)
        # each name's records belong to the node that reported it first in this ServerApp's life (not kept across a
        # resume: a restarted federation's SuperNodes register again under new node ids)
        self.site_nodes: dict[str, str] = {}
        # deployment: the names the nodes' keys were registered under, read before round 1 (a wrong path fails the
        # run before any site trains) and again each round (a site added meanwhile)
        self.registry = cfg.path(cfg.run.site_registry) if cfg.run.site_registry else None
        self.registered, removed = read_register(self.registry) if self.registry else ({}, {})
        self.connectable = active_sites(self.registered, removed)  # read once: RoundsWorkflow names those awaited
        self.metrics_file, self.ckpt_root = out / METRICS, out / CHECKPOINTS
        self.resume = resume_command(out, self.registry)  # a simulation's differs from a consortium's run
        self.t0, self.round_started = t0, time.time()  # t0: the ServerApp's start
        self.clock_behind_said = False  # the warning that the clock reads before an earlier run's date, said once
        self.status = {"run": self.run_key, "num_rounds": cfg.federation.num_rounds, "round": start.first_round - 1,
                       "finished": 0, "site_epsilon": self.site_epsilon,
                       # 0 while the global model is the untrained initial one: /metrics names no model then
                       "rounds_updated": rounds_updated(metrics_lines(self.metrics_file), before=start.first_round)}
        self.status["model_updated"] = int(self.status["rounds_updated"] > 0)
        write_json_atomic(out / STATUS, self.status)  # read by server/metrics.py (Prometheus)

    def registered_now(self) -> dict[str, str] | None:
        if self.registry is None:
            return None
        try:
            self.registered = registered_names(self.registry)
        except ProvisioningError as e:  # mid-run (a write in progress elsewhere): the names read last
            log(WARNING, "%s; site names as registered when last read", e)
        return self.registered

    def _worst_case(self) -> dict:
        return {"site_epsilon_worst_case": dict(self.site_epsilon_worst_case)} if self.cfg.privacy.distributed else {}

    def __call__(self, rnd: int, lctx: LegacyContext) -> None:
        arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
            lctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
        info = lctx.strategy.round_info
        registered = self.registered_now()
        names = site_labels(info.get("sites", {}), self.site_nodes, registered)
        if evals := info.get("site_eval"):  # by node id (each with the name it reported): filed as the epsilons are
            labels = site_labels({nid: {SITE: e.get("site", nid)} for nid, e in evals.items()}, self.site_nodes,
                                 registered)
            info = {**info, "site_eval": {labels.get(nid, f"node {nid}"): {k: v for k, v in e.items() if k != "site"}
                                          for nid, e in evals.items()}}
        keep_site_epsilons(info, names, {EPSILON: self.site_epsilon, RUN_EPSILON: self.site_run_epsilon,
                                         EPSILON_WORST_CASE: self.site_epsilon_worst_case})
        line = self._metrics_line(rnd, lctx, info, arrays)
        audit_round = dict(run=self.run_key, round=rnd, status=info.get("status"),
                           **({"received": True} if info.get("received") else {}),
                           participants=info.get("participants", []), refused=info.get("refused", []),
                           failures=info.get("failures", []), dropped=info.get("dropped", []),
                           weights_sha256=line["weights_sha256"], site_epsilon=dict(self.site_epsilon),
                           site_audit_heads={names[nid]: m[AUDIT_HEAD] for nid, m in info.get("sites", {}).items()
                                             if AUDIT_HEAD in m and nid in names})
        # the round's records travel in its checkpoint: a crash before they reach metrics.jsonl and the audit
        # log leaves them for the resumed run to write (recover_round_records)
        save_checkpoint(self.ckpt_root, rnd, arrays, lctx.strategy.state_arrays(), {
            "run_key": self.run_key, "schema_hash": self.schema_hash, "strategy": self.cfg.federation.strategy,
            "run_config": self.run_config, "site_epsilon": self.site_epsilon,
            "site_epsilon_worst_case": self.site_epsilon_worst_case, "site_run_epsilon": self.site_run_epsilon,
            ROUND_RECORDS: {"metrics": line, "audit": audit_round}}, keep=self.cfg.run.keep_checkpoints,
            resume=self.resume)
        append_json_line(self.metrics_file, line)
        self.status.update(round=rnd, round_seconds=round(time.time() - self.round_started, 2),
                           participating=len(info.get("participants", [])), site_epsilon=dict(self.site_epsilon),
                           site_run_epsilon=dict(self.site_run_epsilon),
                           **self._worst_case(), weights_sha256=line["weights_sha256"],
                           rounds_updated=self.status["rounds_updated"] + (info.get("status") == "updated"))
        self.status["model_updated"] = int(self.status["rounds_updated"] > 0)
        write_json_atomic(self.out / STATUS, self.status)
        self.round_started = time.time()
        self.audit.append("round", **audit_round)
        self.anchor_audit()
        g, se = line["global"], line["server_eval"] or {}
        log(INFO, "round %s done: %s sites, global macro-F1 %s (sites' held-out parts)%s, max site epsilon %s%s", rnd,
            len(info.get("participants", [])), _fmt(g.get("macro_f1")),
            f", {_fmt(se.get('macro_f1'))} on eval-data" if se else "",
            _fmt(max(self.site_epsilon.values()) if self.site_epsilon else None),
            f" (this run's rounds alone: {_fmt(max(self.site_run_epsilon.values()))})"
            if self.site_run_epsilon and self.site_run_epsilon != self.site_epsilon else "")

    def _dated(self, ended: float) -> float:
        """The round's model's date (`finished` in the package, if it is the last): after every model the consortium's
        other runs finished before it, however the server's clock was set since; said once when the clock is behind."""
        finished, earlier = dated_after_earlier_runs(self.out, ended)
        if earlier and not self.clock_behind_said:
            self.clock_behind_said = True
            log(WARNING, "the server's clock reads %s, not after the date of run %s's model (%s, %s): the clock was "
                "ahead then or is behind now; this run's models are dated %s s after it, so the sites take them for "
                "the newer ones; check the server's clock (NTP)", _utc(ended), earlier["run"],
                _utc(earlier["finished"]), self.out.parent / earlier["run"] / PACKAGE, FINISHED_STEP_S)
        return finished

    def _metrics_line(self, rnd: int, lctx: LegacyContext, info: dict, arrays: list[np.ndarray]) -> dict:
        h, ended = lctx.history, round(time.time(), 3)
        return {"round": rnd, "seconds": round(time.time() - self.t0, 2), "ended": ended,
                "finished": self._dated(ended), **info,
                "global": {"loss": dict(h.losses_distributed).get(rnd),
                           **{k: dict(v).get(rnd) for k, v in h.metrics_distributed.items()}},
                "fit": {k: dict(v).get(rnd) for k, v in h.metrics_distributed_fit.items()},
                "server_eval": ({"loss": dict(h.losses_centralized).get(rnd),
                                 **{k: dict(v).get(rnd) for k, v in h.metrics_centralized.items()}}
                                if self.evaluated else None),
                "site_epsilon": dict(self.site_epsilon), "site_run_epsilon": dict(self.site_run_epsilon),
                "weights_sha256": arrays_sha256(arrays),
                **self._worst_case(), "timing": dict(getattr(lctx.strategy, "timing", {}))}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_run_config(context.run_config, source="run config (server)")
    t0 = time.time()
    out = cfg.path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # held until this process ends: a second ServerApp of this run fails here, before it touches any file
    lock = hold_run_lock(out, wait=0.0 if cfg.new_run else 60.0)  # noqa: F841
    if cfg.run.deliver_only:  # `oncofed deliver`: the saved final model again, no training
        return redeliver(grid, cfg, flwr_run=context.run_id)
    schema = FeatureSchema.load(cfg.path(cfg.run.schema_path))
    n_sites = cfg.federation.sites or cfg.federation.min_sites
    signing_key = load_private(cfg.path(cfg.run.signing_key)) if cfg.run.signing_key else None  # fail before round 1
    start = start_or_resume(cfg, context, schema, out)
    remaining = cfg.federation.num_rounds - start.first_round + 1
    if remaining < 1:
        log(WARNING, "the checkpoint already holds all %s rounds; delivering the final model", cfg.federation.num_rounds)

    audit = AuditLog(out / AUDIT_FILE)
    if cfg.run.resume:
        recover_round_records(out, start, audit)
    audit.append("run_start", run=start.run_key, first_round=start.first_round, num_rounds=cfg.federation.num_rounds,
                 schema_hash=schema.content_hash(), strategy=cfg.federation.strategy, secagg=cfg.secagg.enabled,
                 dp=cfg.privacy.enabled, min_sites=cfg.federation.min_sites,
                 run_config_sha256=hashlib.sha256(canonical(dict(context.run_config))).hexdigest())
    fit_config = {RUN_KEY: start.run_key, SECAGG_MAX_WEIGHT: cfg.secagg.max_weight if cfg.secagg.enabled else 0.0,
                  SECAGG_CLIPPING_RANGE: cfg.secagg.clipping_range, SECAGG_MASKS: secagg_masks.VERSION}

    def anchor_audit() -> str:  # the run log's head, signed, for every site to keep (privacy/audit.py)
        if signing_key is None:
            return ""
        fit_config[AUDIT_ANCHOR] = json.dumps(signed_anchor(audit, signing_key, run=start.run_key, run_name=out.name))
        return fit_config[AUDIT_ANCHOR]

    anchor_audit()
    evaluate_fn = server_evaluation(cfg, schema) if cfg.run.eval_data else None
    strategy = build_strategy(cfg, start.weights, n_sites, fit_config, evaluate_fn=evaluate_fn)
    strategy.outcomes.update(resumed_outcome(out, start.first_round))
    strategy.updated = model_updated(metrics_lines(out / METRICS), before=start.first_round)  # rounds before a resume
    log(INFO, "privacy: %s", privacy_summary(cfg))
    fit_workflow = secagg_workflow(cfg, n_sites) if cfg.secagg.enabled else None
    if cfg.privacy.distributed:
        from privacy.distributed import SecAggGrid

        strategy.grid = SecAggGrid(fit_workflow.clipping_range, fit_workflow.quantization_range,
                                   fit_workflow.modulus_range, fit_workflow.max_weight)
        if cfg.privacy.trusted_sites > n_sites:
            raise ValueError(f"run config trusted-sites = {cfg.privacy.trusted_sites} but the run is sized for "
                             f"{n_sites} sites (sites, or min-sites when sites is 0): no round could ever be "
                             "unmasked; set sites to the number of hospitals or lower trusted-sites")
        strategy.grid.check(n_sites)  # before round 1: a grid the sites' values could leave is refused
        fit_config[NOISE_PLAN] = log_distributed_plan(cfg, schema)
    if start.strategy_state is not None:
        strategy.load_state_arrays(start.strategy_state)
    recorder = RoundRecorder(cfg, context, schema, out, start, audit, anchor_audit, evaluate_fn, t0)

    lctx = LegacyContext(context=context, strategy=strategy,
                         config=ServerConfig(num_rounds=max(remaining, 0), round_timeout=cfg.federation.round_timeout))
    final = start.weights
    if remaining > 0:
        RoundsWorkflow(fit_workflow=fit_workflow, first_round=start.first_round, on_round_end=recorder,
                       wait_for_sites=n_sites, wait_timeout=cfg.federation.round_timeout,
                       message_timeout=cfg.federation.round_timeout,
                       enough_sites=max(cfg.federation.min_sites, cfg.privacy.trusted_sites if cfg.privacy.distributed else 0),
                       registered=recorder.connectable)(grid, lctx)
        final = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
            lctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
    deliver_final(grid, cfg, schema, out, recorder, [np.asarray(a, dtype=np.float32) for a in final], signing_key,
                  start.first_round, flwr_run=context.run_id)


def site_labels(sites: dict, owners: dict, registered: dict | None = None) -> dict:
    """{node id: the name its site's records are filed under} for one round's replies.

    In a deployment (`registered`: node id -> the name its authentication key was registered under) a node's
    records go under its registered name, whatever name it reports (a difference is logged: its site.json says
    otherwise); a node missing from the register, under "name (unregistered node N)".
    Without a register (simulation), a name belongs to the node that first reported it alone in a round
    (`owners`, name -> node id, updated here; the recorder keeps it for the ServerApp's life); any other node
    reporting it (a misconfigured or dishonest site) is filed as "name (node N)". Either way no node's epsilon
    or audit head silently overwrites another's."""
    from collections import Counter

    named = {str(nid): str(m[SITE]) for nid, m in sites.items() if SITE in m}
    if registered:
        labels = {}
        for nid in map(str, sites):
            reported = named.get(nid)
            if nid in registered:
                labels[nid] = registered[nid]
                if reported is not None and reported != registered[nid]:
                    log(WARNING, "node %s, registered as site %r, reports the site name %r: its records are filed "
                        "under %r; the site's site.json site-name should say so", nid, registered[nid], reported,
                        registered[nid])
            elif reported is not None:
                labels[nid] = f"{reported} (unregistered node {nid})"
                log(WARNING, "node %s reports the site name %r but is not in the consortium's register: its records "
                    "are kept apart as %r; was it registered without `oncofed consortium add-site`?", nid, reported,
                    labels[nid])
        return labels
    count = Counter(named.values())
    for nid, name in sorted(named.items()):
        if name not in owners and count[name] == 1:
            owners[name] = nid
    labels = {}
    for nid, name in named.items():
        labels[nid] = name if owners.get(name) == nid else f"{name} (node {nid})"
        if labels[nid] != name:
            log(WARNING, "node %s reports the site name %r, which another node reported first: its records are "
                "kept apart as %r; check the sites' site-name settings", nid, name, labels[nid])
    return labels


def deliver_final(grid: Grid, cfg: RunConfig, schema: FeatureSchema, out: Path, recorder: RoundRecorder,
                  final: list[np.ndarray], signing_key, first_round: int, flwr_run: int | None = None) -> None:
    """The final model: described, signed, saved beside the checkpoints, sent to every site; result.json, naming
    `flwr_run` (this ServerApp's flwr run: how `oncofed run` tells its own attempt's result from an earlier one). A run
    in which no round updated the model (every site refused, or every round was abandoned, in this attempt and
    any before a resume) delivers nothing: its model is the untrained initial one. result.json's `not_delivered`
    then says why, round by round (`oncofed run`, `oncofed simulate` and `oncofed runs follow` print it, exit 1)."""
    rounds = metrics_lines(recorder.metrics_file)
    if not model_updated(rounds):
        reason = (f"no round updated the global model, so the untrained initial model is neither scored, signed nor "
                  f"delivered: {why_no_update(rounds, names=recorder.registered_now())} ({recorder.metrics_file})")
        log(WARNING, "run %s: %s", recorder.run_key, reason)
        if previous := round_outcome(out, cfg.federation.num_rounds):  # no delivery to carry it to the ledgers
            tell_outcome(grid, previous, recorder.run_key, cfg.federation.round_timeout)
        recorder.audit.append("run_end", run=recorder.run_key, round=cfg.federation.num_rounds, arrays_sha256=None,
                              deliveries=[], not_delivered=reason)
        recorder.status.update(finished=1, delivered=0, trained=0, delivery_ok=0, undelivered=[])
        write_json_atomic(out / STATUS, recorder.status)
        write_json_atomic(out / RESULT, {
            "run": recorder.run_key, "round": cfg.federation.num_rounds, "first_round": first_round,
            WRITTEN_BY: flwr_run, "not_delivered": reason, "deliveries": [], "seconds": round(time.time() - recorder.t0, 1),
            "metrics_file": str(recorder.metrics_file), "checkpoints": str(out / CHECKPOINTS)})
        return
    last = rounds[-1]
    package = ModelPackage(
        run=recorder.run_key, round=cfg.federation.num_rounds, schema_hash=schema.content_hash(),
        arrays_sha256=arrays_sha256(final), strategy=cfg.federation.strategy, secagg=cfg.secagg.enabled,
        dp=cfg.privacy.enabled, site_epsilon=recorder.site_epsilon, delta=cfg.privacy.delta,
        **({"site_run_epsilon": recorder.site_run_epsilon} if recorder.site_run_epsilon else {}),
        **(dict(dp_mode=cfg.privacy.mode, trusted_sites=cfg.privacy.trusted_sites, mechanism="skellam",
                site_epsilon_worst_case=recorder.site_epsilon_worst_case) if cfg.privacy.distributed else {}),
        privacy=privacy_summary(cfg), metrics=last.get("global", {}), finished=finished_at(out, last, final),
        architecture=cfg.model.model_dump(),
        **({"patterns": patterns} if (patterns := consortium_patterns(
            last.get("patterns"), [m.name for m in schema.modalities])) else {})).description()
    if signing_key is not None:
        package = sign(package, signing_key)
    else:
        log(WARNING, "run config signing-key is empty: the final model is delivered unsigned; sites with a trust "
            "anchor will refuse it")
    written = out / FINAL_WEIGHTS
    try:
        with atomic_file(written, "wb") as fh:  # a crash leaves the old file or the whole new one
            np.savez(fh, *final)
        written = out / PACKAGE
        save_package(out, package)  # with final_weights.npz: what `oncofed deliver` sends again
    except OSError as e:  # before anything is sent: resumed, the run goes from its last checkpoint to the delivery
        raise OSError(e.errno, f"run {recorder.run_key}'s final model could not be written to {written} "
                      f"({e.strerror or e}): {write_failure(e, out)}, then {recorder.resume}; the checkpoints of "
                      "every round are kept") from None
    by_name = recorder.registry is None  # a simulation: no register ties a site to its node id
    trained = sites_that_trained(rounds, by_name)
    deliveries = deliver(grid, final, package, cfg.federation.round_timeout, anchor=recorder.anchor_audit(),
                         previous=round_outcome(out, cfg.federation.num_rounds), registered=recorder.registered_now(),
                         expected=trained, by_name=by_name)
    sent = deliveries
    if (out / RESULT).exists():  # delivered before (preflight refuses this; a direct `flwr run` does not)
        deliveries = kept_installs(json.loads((out / RESULT).read_text()).get("deliveries", []), deliveries)
    # status.json first, then result.json, then run_end: a crash between them leaves status finished, so the metrics
    # alert on an undelivered run (and `oncofed deliver` writes the run_end it lacks); the other way round, a crash
    # left status unfinished and no result, and after an `oncofed deliver` with sites down no alert fired
    recorder.status.update(finished=1, weights_sha256=package["arrays_sha256"],
                           **delivery_status(out, deliveries, by_name=by_name, sites=trained))
    write_json_atomic(out / STATUS, recorder.status)
    write_json_atomic(out / RESULT, {
        **package, "first_round": first_round, WRITTEN_BY: flwr_run, "seconds": round(time.time() - recorder.t0, 1),
        "deliveries": deliveries, "metrics_file": str(recorder.metrics_file), "checkpoints": str(out / CHECKPOINTS)})
    recorder.audit.append("run_end", run=recorder.run_key, round=cfg.federation.num_rounds,
                          arrays_sha256=package["arrays_sha256"], deliveries=audited(sent))
    ok, summary = delivery_summary(recorder.status, deliveries, out.parent.parent)
    log(INFO if ok else WARNING, "%s; result in %s", summary, out / RESULT)


def kept_installs(before: list[dict], new: list[dict]) -> list[dict]:
    """This delivery's records over an earlier one's, except that a site's earlier install is never replaced by a
    refusal: it refuses the same model sent again as a rollback, and still holds it (`redeliver` keeps them too)."""
    kept = {int(d["node"]): d for d in before if d.get("installed") and d.get("node") is not None}
    merged = [d for d in new if d.get("installed") or d.get("node") is None or int(d["node"]) not in kept]
    renewed = {int(d["node"]) for d in merged if d.get("node") is not None}
    return [d for n, d in kept.items() if n not in renewed] + merged


def resumed_outcome(out: Path, first_round: int) -> dict[int, dict]:
    """The outcome of the round a resumed run continues after ({} for a fresh run), from metrics.jsonl (recovered
    from the checkpoint if a crash came before its line): told to the sites with the next round, as any round's,
    so that an abandoned round's entry in their ledgers says why also across a resume."""
    outcome = round_outcome(out, first_round - 1)
    return {} if outcome is None else {first_round - 1: {k: v for k, v in outcome.items() if k != "round"}}


def _last_metrics(path: Path) -> dict | None:
    lines = metrics_lines(path)
    return lines[-1] if lines else None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
