"""The hospital site's Flower ClientApp: validate, train under DP, answer SecAgg+, store the global model.

The site's own settings come from the SuperNode's node config in a deployment:
    data-path        the site directory (tables)           state-dir    ledger, normalisation
    model-dir        the site's model store                 privacy-budget  epsilon the site allows
    require-secagg   refuse unmasked training requests (default true)
    require-dp       refuse training requests without DP-SGD (run config dp = false; default true)
    min-aggregate-sites  the fewest sites whose sum the site helps unmask (default and minimum 2)
    max-trusted-sites    dp-mode "distributed": the most sites (itself included) the site will assume add
                     their noise share honestly (default 1: it relies on no other site, so it refuses
                     distributed runs until its data-protection officer raises it)
    require-padded-batches  refuse DP-SGD runs with dp-pad-batches = false (default true)
In a simulation each node only gets `partition-id`; the site is the partition-id-th site of the
run config's `data-root` manifest, and its state lives under `site-state-root`.

SecAgg+ exists only for Flower's legacy messages, so training answers legacy fit records.
"""

from __future__ import annotations

import json
import traceback
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.app import Error
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common.recorddict_compat import (
    evaluateres_to_recorddict,
    fitres_to_recorddict,
    recorddict_to_evaluateins,
    recorddict_to_fitins,
)

from client.releases import Release, ReleaseDamaged, ReleaseStore
from privacy import secagg_masks
from privacy.audit import ANCHORS_FILE, AUDIT_FILE, AnchorStore, AuditError, AuditLog
from privacy.run_config import load_run_config
from privacy.site_config import NODE_POLICY_KEYS, SITE_CONFIG_KEY, SiteConfig, SiteConfigError, stricter
from shared_models.protocol import (ARRAYS_RECORD, AUDIT_ANCHOR, AUDIT_HEAD, CONFIG_RECORD, EPSILON, EPSILON_WORST_CASE,
                                    EVALUATE_METRICS, FIT_METRICS, LOCAL_STEPS, LOSS, PACKAGE_INFO,
                                    NOISE_PLAN, PREVIOUS_ROUND, REFUSAL_PREFIX, REPLY, RESENT, ROUND_OUTCOME, RUN_KEY,
                                    RUN_EPSILON, SAVE_MODEL, SECAGG_MASKS,
                                    SECAGG_CLIPPING_RANGE, SECAGG_MAX_WEIGHT, SERVER_ROUND, SETUP_TERMS, SITE, DeliveryReply,
                                    ModelPackage, allowed_metrics)
from shared_models.run_config import DP_SGD_STEP, RunConfig
from shared_models.wire import is_packed, pack, unpack

if TYPE_CHECKING:
    from client.site import PreparedSite, SitePaths
    from privacy.distributed import SecAggGrid

# torch, Opacus and the site's data are imported only by the handlers that need them: in a deployment
# every message starts a fresh ClientApp process, and two of SecAgg+'s four stages need neither (setup reads the
# site's data for its checks before any site trains: unready_refusal; the training stage trains).
MIN_AGGREGATE_SITES = SiteConfig.model_fields["min_aggregate_sites"].default  # a sum of one is one site's update


secagg_masks.install()  # SecAgg+'s masks from the whole seed, as the server's workflow draws them (privacy/secagg_masks.py)


class SiteRefusal(Exception):
    """The site does not take part in this round; the reason (no patient data in it) goes to the server."""


@dataclass(frozen=True)
class SiteSettings:
    name: str
    index: int
    paths: "SitePaths"
    budget_epsilon: float
    require_secagg: bool
    min_aggregate_sites: int = MIN_AGGREGATE_SITES  # node config min-aggregate-sites: the site's own floor
    require_dp: bool = False  # node config require-dp (a deployment's default: true)
    max_trusted_sites: int | None = None  # node config max-trusted-sites (deployment default 1); None: simulation
    require_padded_batches: bool = False  # node config require-padded-batches (a deployment's default: true)
    delta: float | None = None  # node config privacy-delta; None: the run's (the ledger keeps the smallest)
    budget_missing: bool = False  # a deployed site without privacy-budget: it trains no DP run (budget_refusal)
    min_count: int = 1  # node config min-count: no run reports a smaller count from this site (the run's may be larger)
    policy_unreadable: bool = False  # site.json could not be read again (site_settings): the site trains in no round
    # a deployed site claims its patients in the machine's index of ledgers (shared_ledger_refusal); site_dir: its
    # site.json's directory, when known. A simulation's sites do not (privacy/ledger_index.py)
    ledger_index: bool = False
    site_dir: Path | None = None


def site_settings(context: Context, cfg: RunConfig) -> SiteSettings:
    from client.site import SitePaths, simulated_site_paths

    node = context.node_config
    if "data-path" in node:  # a real deployment: the site's own configuration is authoritative
        data = Path(str(node["data-path"]))
        state = Path(str(node.get("state-dir", data.parent / "oncofed-state")))
        models = Path(str(node.get("model-dir", state / "models")))
        # its policy typed and bounded by site.json's model (privacy/site_config.py), whose defaults are a deployment's
        site = SiteConfig.parse({**{k: node[k] for k in NODE_POLICY_KEYS if k in node}, "state-dir": str(state),
                                 "model-dir": str(models)}, source="the SuperNode's --node-config (site.json)")
        unreadable = False
        if SITE_CONFIG_KEY in node:  # site.json as it is now: a tightened policy holds without a restart
            try:
                site = stricter(site, SiteConfig.load(str(node[SITE_CONFIG_KEY])))
            except (SiteConfigError, OSError) as e:  # a half-saved edit: its path and values stay in the site's log
                log(WARNING, "site %s: site.json cannot be read: %s", site.site_name or data.name, e)
                unreadable = True
        return SiteSettings(site.site_name or data.name, 0, SitePaths(data, state, models),
                            cfg.privacy.epsilon if site.privacy_budget is None else site.privacy_budget,
                            site.require_secagg, site.min_aggregate_sites, site.require_dp, site.max_trusted_sites,
                            site.require_padded_batches, site.privacy_delta, site.privacy_budget is None,
                            site.min_count, unreadable, ledger_index=True,
                            site_dir=Path(str(node[SITE_CONFIG_KEY])).parent if SITE_CONFIG_KEY in node else None)
    index = int(node["partition-id"])
    root = cfg.path(cfg.run.data_root)
    sites = json.loads((root / "manifest.json").read_text())["sites"]  # written by `oncofed partition`
    if index >= len(sites):
        raise ValueError(f"partition-id {index} but {root}/manifest.json lists {len(sites)} sites; run the simulation "
                         f"with num-supernodes={len(sites)}")
    return SiteSettings(sites[index]["name"], index, simulated_site_paths(cfg, sites[index]), cfg.privacy.epsilon,
                        cfg.secagg.enabled)


def accounting_delta(settings: SiteSettings, cfg: RunConfig) -> float:
    """The delta the site's ledger is opened with: the site's own (node config privacy-delta), or without one
    the run's. The ledger keeps the smallest delta it was ever opened with, so no later run re-prices the spend
    downwards. A run asking for a smaller delta than the site's is refused (`delta_refusal`): recorded, it would
    re-price the site's spend upwards for good."""
    return cfg.privacy.delta if settings.delta is None else settings.delta


SITE_JSON_UNREADABLE = ("its site.json cannot be read now (an edit half saved? details in the site's log): it takes no part "
                        "in training until the file is fixed")
DATA_REFUSAL = ("its data failed validation, or holds too few patients for the run's held-out part (val-fraction): the "
                "site's log says which; `oncofed validate` checks the tables")


def budget_refusal(settings: SiteSettings, cfg: RunConfig) -> str:
    """Why this site refuses to spend on the run ("" when it does not): a deployed site's budget is its own. Taken
    from the run's epsilon, the operator could raise it run by run (the ledger checks spend against the budget it
    is opened with)."""
    if cfg.privacy.enabled and settings.budget_missing:
        return ("this site's node config sets no privacy-budget, and a deployed site does not take the run's epsilon "
                "as its budget: set privacy-budget in the site's site.json (`oncofed site init --budget` writes it)")
    return ""


def delta_refusal(settings: SiteSettings, cfg: RunConfig) -> str:
    """Why this site refuses the run's DP delta ("" when it does not)."""
    if cfg.privacy.enabled and settings.delta is not None and cfg.privacy.delta < settings.delta:
        return (f"the run's delta {cfg.privacy.delta:g} is below this site's privacy-delta {settings.delta:g} (its node "
                "config), at which it accounts every epsilon: the operator must set delta >= it")
    return ""


def site_schema_path(context: Context, cfg: RunConfig) -> Path:
    """The schema the site trains and installs under: its own pinned copy (site.json `schema`, trust/schema.json,
    in the node config) in a deployment; the run config's in a simulation. The run config's path is the server
    machine's and may not exist at the site."""
    own = str(context.node_config.get("schema", ""))
    return Path(own) if own else cfg.path(cfg.run.schema_path)


_PREPARED: dict[tuple, "PreparedSite"] = {}  # one per site and schema, reused across rounds in this process


def prepared(settings: SiteSettings, cfg: RunConfig, schema_path: Path) -> "PreparedSite":
    from client.site import prepare_site
    from shared_models.schema import FeatureSchema

    schema = FeatureSchema.load(schema_path)  # site_schema_path: the site's own in a deployment
    delta = accounting_delta(settings, cfg)
    min_count = max(cfg.site.min_count, settings.min_count)  # the site's own floor holds whatever the run asks
    key = (str(settings.paths.site_dir), schema.content_hash(), settings.budget_epsilon, delta, cfg.training.seed,
           cfg.site.val_fraction, min_count, cfg.privacy.enabled)
    if key not in _PREPARED:
        _PREPARED[key] = prepare_site(schema, settings.paths, budget_epsilon=settings.budget_epsilon,
                                      delta=delta, val_fraction=cfg.site.val_fraction, min_count=min_count,
                                      seed=cfg.training.seed, dp=cfg.privacy.enabled)
        site = _PREPARED[key]
        log(INFO, "site %s: %s training and %s held-out patients, spent epsilon %.3f of %.3f", settings.name,
            len(site.train.y), len(site.val.y), site.ledger.spent(site.dataset_fingerprint), settings.budget_epsilon)
    return _PREPARED[key]


# the site's settings of the training message being handled, read (site.json included) by the first of its handlers
# that needs them and reused by the next (site_policy_mod, SecAgg+'s collect stage, the train handler): one read of
# site.json per message, and one policy for all of its checks. The next message reads site.json again (`stricter`).
_MESSAGE_SETTINGS: ContextVar[list | None] = ContextVar("oncofed_message_settings", default=None)


def message_settings(context: Context, cfg: RunConfig) -> SiteSettings:
    """site_settings, read once per training message (site_policy_mod scopes it); outside one, read now."""
    held = _MESSAGE_SETTINGS.get()
    if held is None:
        return site_settings(context, cfg)
    if not held:
        held.append(site_settings(context, cfg))
    return held[0]


def site_policy_mod(msg: Message, context: Context, call_next):
    """SecAgg+ for training messages, with the site's rules around it:
    - a site that requires SecAgg+ refuses unmasked training requests (otherwise a server could simply ask
      for individual updates);
    - a site that refuses a round drops out of its SecAgg+ exchange (an error reply, no masked vector)
      instead of adding a zero vector: a refusal must not count as a contribution, or the unmasked "sum"
      of the round could be one hospital's update;
    - at the unmask stage the site gives its key shares only if at least max(min-sites, its own
      min-aggregate-sites) sites sent masked vectors: it never helps unmask a sum of fewer sites."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return secaggplus_mod(msg, context, call_next)
    scope = _MESSAGE_SETTINGS.set([])
    try:
        return _site_policy(msg, context, call_next)
    finally:
        _MESSAGE_SETTINGS.reset(scope)


def _site_policy(msg: Message, context: Context, call_next) -> Message:
    cfg = load_run_config(context.run_config)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        if message_settings(context, cfg).require_secagg:
            raise PermissionError("site policy: training requests must use secure aggregation (SecAgg+); "
                                  "this one does not, so the site sends nothing")
        if cfg.privacy.enabled and cfg.privacy.distributed:
            raise PermissionError(DISTRIBUTED_OUTSIDE_SECAGG)
        return _refusing(msg, context, call_next)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(SecAggKey.STAGE) == Stage.SETUP:
        # Withholding its own key shares enforces the site's floor only if every unmasking needs at least that
        # many sites' shares: with SecAgg+'s threshold below it, the other sites' shares unmask a smaller sum that
        # includes this site's update. Run-wide floors (min-sites, trusted-sites) every honest site enforces alike.
        settings = message_settings(context, cfg)
        terms = msg.content.config_records.get(SETUP_TERMS, {})  # the round's run key and number (server/workflow.py)
        run_key, rnd = str(terms.get(RUN_KEY, "") or _run_key(context)), int(terms.get(SERVER_ROUND, 0) or 0)
        note_round_outcome(context, settings, cfg, run_key, terms.get(PREVIOUS_ROUND))  # the first word after it
        threshold, shares = int(configs.get(SecAggKey.THRESHOLD, 0)), int(configs.get(SecAggKey.SHARE_NUMBER, 0))
        if 2 * threshold <= shares:  # two disjoint halves of the neighbours could each unmask: a server that sends
            # different sites different unmask lists could then take one site's update out exactly (2026-12-06 review)
            reason = (f"{settings.name}: SecAgg+ unmasks a sum with the key shares of {threshold} of the {shares} "
                      "sites that hold shares, not more than half of them, so a server that tells different sites "
                      "different things could unmask a single site's update; the site takes no part in the round (the "
                      "operator sets secagg-threshold above 0.5)")
            return _no_key_shares(msg, context, settings, reason, secagg_threshold=threshold, share_number=shares)
        if threshold < settings.min_aggregate_sites:
            reason = (f"{settings.name}: SecAgg+ unmasks a sum with the key shares of {threshold} sites, fewer than the "
                      f"site's min-aggregate-sites {settings.min_aggregate_sites}, so the other sites could unmask a sum "
                      "of fewer sites without this one; the site takes no part in the round (the operator raises "
                      "secagg-threshold, or the site lowers min-aggregate-sites)")
            return _no_key_shares(msg, context, settings, reason, secagg_threshold=threshold,
                                  needed=settings.min_aggregate_sites)
        audit = site_audit(settings)
        try:
            reason, _ = unready_refusal(settings, cfg, context, run_key, audit, rnd)
        except Exception:  # noqa: BLE001 - an error reply would carry the traceback (and maybe data) to the server
            log(WARNING, "site %s: the round's checks failed:\n%s", settings.name, traceback.format_exc())
            reason = "the site could not check the round (details in the site's log)"
        if reason:  # said before any site trains: a round it would refuse later costs the others their spend
            log(WARNING, "site %s refuses the round at SecAgg+'s setup: %s", settings.name, reason)
            _audit_quietly(audit, settings.name, "round_refused", run=run_key, round=rnd, stage="setup", reason=reason)
            return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=REFUSAL_PREFIX + f"{settings.name}: "
                                + reason), reply_to=msg)
    if configs.get(SecAggKey.STAGE) == Stage.UNMASK:
        settings = message_settings(context, cfg)
        if settings.policy_unreadable:  # its floor now is unknown: no key shares rather than the one it started with
            return _no_key_shares(msg, context, settings, f"{settings.name}: {SITE_JSON_UNREADABLE}; the site gives no "
                                  "key shares")
        # dp-mode "distributed": a sum of fewer than trusted-sites contributions carries less noise than assumed
        trusted = cfg.privacy.trusted_sites if cfg.privacy.distributed else 0
        need = max(cfg.federation.min_sites, settings.min_aggregate_sites, trusted)
        listed = list(configs.get(SecAggKey.ACTIVE_NODE_ID_LIST, []))
        dead = list(configs.get(SecAggKey.DEAD_NODE_ID_LIST, []))
        active = set(listed)
        # Flower's mod hands over, per listed node, its self-mask seed share (active) or its pairwise-key share
        # (dead) without checking the lists: a node listed twice would count twice below, and a node listed both
        # active and dead would have both its secrets handed over, which unmask its vector alone.
        if len(active) != len(listed) or len(set(dead)) != len(dead) or active & set(dead) or (
                msg.metadata.dst_node_id not in active):
            reason = (f"{settings.name}: the server's unmask request lists a node twice, as both active and dead, or "
                      "not this site among the active ones; the site gives no key shares")
            return _no_key_shares(msg, context, settings, reason, active_sites=len(active), needed=need,
                                  malformed=True)
        if len(active) < need:
            reason = (f"{settings.name}: {len(active)} sites sent masked vectors, fewer than {need} (min-sites "
                      f"{cfg.federation.min_sites}, the site's min-aggregate-sites {settings.min_aggregate_sites}"
                      + (f", the run's trusted-sites {trusted}" if trusted else "") + "); the site "
                      "gives no key shares, so this sum is never unmasked")
            return _no_key_shares(msg, context, settings, reason, active_sites=len(active), needed=need)
        if reason := _unmasked_before(settings, context, sorted(active)):
            return _no_key_shares(msg, context, settings, reason, active_sites=len(active), needed=need,
                                  unmasked_before=True)
    if configs.get(SecAggKey.STAGE) == Stage.COLLECT_MASKED_VECTORS:
        return _refusing(msg, context, lambda m, c: secaggplus_mod(m, c, _into_one_exchange(cfg, call_next)))
    return _refusing(msg, context, lambda m, c: secaggplus_mod(m, c, call_next))


ONE_SUM_RECORD_UNREADABLE = ("the record of the SecAgg+ exchange this round's update was sent in before cannot be "
                             "read (details in the site's log); the site sends nothing in this round")
ONE_SUM_RECORD_UNMARKED = ("the record of this SecAgg+ exchange could not be marked as sent (a full disk or a state "
                           "directory it cannot write: details in the site's log); the update was not sent (its "
                           "spend, if any, stays counted once)")
ONE_SUM_RECORD_UNWRITABLE = ("the record of this SecAgg+ exchange could not be kept (a full disk or a state directory "
                             "it cannot write: details in the site's log); the round was not trained and nothing was sent")


def _into_one_exchange(cfg: RunConfig, call_next):
    """The train handler as SecAgg+'s collect stage calls it, just before the site's masked update leaves: a round's
    update (resent under DP, retrained to the same bits without DP) goes into the SecAgg+ exchange among one set of
    sites only. Its self mask is unmasked by the key shares of any `threshold` of those that completed setup (its
    neighbours), not by this site's own: sent again among other neighbours, it could be unmasked in a second sum
    by sites that gave no key shares for the first (the unmask-stage check binds only this site's shares). Among
    the same neighbours, those that gave no shares for the first sum are fewer than the threshold, provided more
    than half are needed. The neighbours are kept before the update leaves, for every round with or without DP."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    def handler(msg: Message, context: Context) -> Message:
        fitins = recorddict_to_fitins(msg.content, keep_input=True)
        run_key, rnd = str(fitins.config.get(RUN_KEY, "")), int(fitins.config.get(SERVER_ROUND, 0) or 0)
        if not run_key or not rnd:  # (the train handler refuses such a request)
            return call_next(msg, context)
        settings = message_settings(context, cfg)
        state = context.state.config_records.get(RECORD_KEY_STATE, {})
        neighbours = sorted(int(i) for i in state.get("public_keys_dict:K", []))
        threshold = int(state.get("threshold", 0))
        releases = ReleaseStore(settings.paths.state_dir)
        try:
            before = releases.sent_among(run_key, rnd)
        except ReleaseDamaged as e:
            log(WARNING, "site %s: %s", settings.name, e)
            raise _refusal(fitins, msg, settings.name, ONE_SUM_RECORD_UNREADABLE, site_audit(settings)) from None
        if before is not None and (before[0] != neighbours or len(neighbours) - before[1] >= threshold):
            raise _refusal(fitins, msg, settings.name, (
                f"round {rnd} of run {run_key} was sent before in a SecAgg+ exchange among other sites (a resumed "
                "round, or new node ids) or with a higher threshold; sent again in this one, the sites that gave no key shares for the first sum "
                "could unmask a second sum holding the same update, so the site sends nothing in this round (its "
                "spend, if any, stays counted once)"), site_audit(settings))
        if before is None:  # kept before the round trains (and, under DP, spends): a record that cannot be written
            try:  # refuses the round with nothing spent, not an update already paid for
                releases.record_sent(run_key, rnd, neighbours, threshold)
            except OSError as e:
                log(WARNING, "site %s: the round's SecAgg+ neighbours cannot be kept in %s: %s", settings.name,
                    releases.root, e)
                raise _refusal(fitins, msg, settings.name, ONE_SUM_RECORD_UNWRITABLE, site_audit(settings)) from None
        try:
            reply = call_next(msg, context)
        except BaseException:
            if before is None:  # nothing left the site: the record must not bind a later attempt
                releases.forget_sent(run_key, rnd)
            raise
        if reply.has_error():
            if before is None:
                releases.forget_sent(run_key, rnd)
            return reply
        try:  # from here the record binds even if this process dies: a killed attempt's record does not (sent_among)
            releases.mark_left(run_key, rnd)
        except (OSError, ReleaseDamaged) as e:
            log(WARNING, "site %s: the round's SecAgg+ neighbours cannot be kept in %s: %s", settings.name,
                releases.root, e)
            raise _refusal(fitins, msg, settings.name, ONE_SUM_RECORD_UNMARKED, site_audit(settings)) from None
        return reply

    return handler


def _no_key_shares(msg: Message, context: Context, settings: SiteSettings, reason: str, **fields) -> Message:
    """The site's refusal at a SecAgg+ stage: logged, in its audit log (`unmask_refused` with `fields`), and the
    error reply that keeps its key shares (and, at setup, its whole part in the round) from the server."""
    log(WARNING, "site %s: %s", settings.name, reason)
    _audit_quietly(site_audit(settings), settings.name, "unmask_refused", run=_run_key(context), **fields)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=REFUSAL_PREFIX + reason), reply_to=msg)


def _unmasked_before(settings: SiteSettings, context: Context, active: list[int]) -> str:
    """Why the site gives no key shares for this round's sum ("" when it gives them): its update for this round
    was unmasked before in a sum over other sites. A resumed round resends the same bits under DP, and without DP
    retrains the same bits (seeded training); two sums over different sets would reveal, by their difference,
    single sites' updates. The set is kept, for every round with or without DP, before the shares leave."""
    state = context.state.config_records.get("oncofed", {})
    run_key, rnd = str(state.get(RUN_KEY, "")), int(state.get(SERVER_ROUND, 0) or 0)
    releases = ReleaseStore(settings.paths.state_dir)
    if not run_key or not rnd:
        return ""
    try:
        before = releases.unmasked_with(run_key, rnd)
        if before is None:
            releases.record_unmask(run_key, rnd, active)
            return ""
    except ReleaseDamaged as e:  # read as "never unmasked", the site would give shares for another sum
        log(WARNING, "site %s: %s", settings.name, e)
        return (f"{settings.name}: the record of the sum this round was unmasked in cannot be read (details in the "
                "site's log); the site gives no key shares")
    except OSError as e:
        log(WARNING, "site %s: the sum this round is unmasked in cannot be kept: %s", settings.name, e)
        return (f"{settings.name}: the record of this sum could not be kept (details in the site's log); the site "
                "gives no key shares")
    if before == active:
        return ""  # the same sum again: nothing new
    return (f"{settings.name}: round {rnd} of run {run_key} was unmasked before in a sum over other sites "
            f"({len(before)} then, {len(active)} now); its update goes into no second sum, whose difference with "
            "the first could reveal single updates, so the site gives no key shares")


def _refusing(msg: Message, context: Context, call_next) -> Message:
    try:
        return call_next(msg, context)
    except SiteRefusal as e:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=REFUSAL_PREFIX + str(e)), reply_to=msg)


def _run_key(context: Context) -> str:
    return str(context.state.config_records.get("oncofed", {}).get(RUN_KEY, ""))


def _audit_quietly(audit: AuditLog, site: str, event: str, **fields) -> None:
    """An audit entry whose failure is logged, not raised: the event (a refusal) happens either way."""
    try:
        audit.append(event, **fields)
    except (AuditError, OSError) as e:
        log(WARNING, "site %s: audit log: %s", site, e)


def sent_metrics(metrics: dict, allowed: frozenset[str], site: str) -> dict:
    """Only the metric names of the protocol's allow-list leave the site; any other stays (and is logged) here."""
    kept, left_out = allowed_metrics(metrics, allowed)
    if left_out:
        log(WARNING, "site %s: metrics %s are not in shared_models.protocol's allow-list or of the wrong kind; not sent", site,
            ", ".join(left_out))
    return kept


def packed_arrays_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost: what arrives packed (shared_models/wire.py: one array per ArrayRecord, a few objects to pull
    instead of two per tensor) is unpacked before anything reads it, SecAgg+ included; the reply is packed."""
    if msg.has_content() and is_packed(msg.content):
        msg.content = unpack(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply


app = ClientApp(mods=[packed_arrays_mod])


def site_audit(settings: SiteSettings) -> AuditLog:
    return AuditLog(settings.paths.state_dir / AUDIT_FILE)


def signing_trust(context: Context, cfg: RunConfig) -> str:
    """The site's trust anchor for what the server signs (models, audit anchors): its node config's
    signing-public-key, else (simulation) the run config's; "" when it has none."""
    return str(context.node_config.get("signing-public-key", "")) or (
        str(cfg.path(cfg.run.signing_public_key)) if cfg.run.signing_public_key else "")


def keep_server_anchor(settings: SiteSettings, context: Context, cfg: RunConfig, anchor_json) -> None:
    """The server's signed audit head (shared_models.protocol), kept in the site's own state: what
    `oncofed audit verify --anchors` checks the server's run log against. Never stops a round."""
    if not anchor_json:
        return
    trust = signing_trust(context, cfg)
    try:
        AnchorStore(settings.paths.state_dir / ANCHORS_FILE).keep(str(anchor_json), trust or None)
    except (AuditError, OSError, ValueError) as e:
        log(WARNING, "site %s: the server's audit anchor was not kept: %s", settings.name, e)


def _refusal(fitins, msg: Message, site: str, reason: str, audit: AuditLog | None = None,
             run_config: bool = False, another_attempt: bool = False) -> SiteRefusal:
    """The round is refused: logged and audited here; raised by the caller, the site then drops out of the
    round (see site_policy_mod). The reason says why in words that name no patient. `run_config`: the run's
    settings cause it, and would again in every later round (see `_withheld_if_refused`). `another_attempt`: another
    attempt at the same round committed it (ledger.AlreadyReleased): that attempt's update is being sent, so this
    refusal says nothing about whether the round's update left (`_withheld_if_refused` leaves its entry alone)."""
    log(WARNING, "site %s refuses the round: %s", site, reason)
    if audit is not None:
        _audit_quietly(audit, site, "round_refused", run=str(fitins.config.get(RUN_KEY)),
                       round=int(fitins.config.get(SERVER_ROUND, 0)), reason=reason)
    refusal = SiteRefusal(f"{site}: {reason}")
    refusal.run_config, refusal.another_attempt = run_config, another_attempt
    return refusal


@app.train(mods=[site_policy_mod])
def train(msg: Message, context: Context) -> Message:
    from shared_models.training import release_freed_memory, training_process

    training_process()  # one thread; the memory a step frees kept for the next step
    try:
        return _train(msg, context)
    finally:
        release_freed_memory()  # and given back when the round ends


REQUIRE_DP_REFUSAL = ("site policy: training without differential privacy (run config dp = false) is refused; the "
                      "site's node config require-dp allows only DP-SGD")


AUDIT_UNWRITABLE = "its audit log cannot be written (details in the site's log)"
TRAINING_FAILED = "local training failed (details in the site's log)"  # a traceback would carry data to the server
RELEASE_NO_ROOM = ("its state directory cannot keep a copy of the update (a full disk or a directory it cannot "
                   "write: details in the site's log); it refuses before spending")
RELEASE_UNWRITABLE = ("its copy of the update could not be kept (a full disk or a state directory it cannot write: "
                      "details in the site's log); the round is counted as spent, and nothing was sent")


def _keep_release(releases, run_key: str, rnd: int, release, fitins, msg: Message, site: str,
                  audit: AuditLog) -> None:
    """Keep the copy a resumed server gets back (releases.save), before the update leaves; a copy that cannot be
    written refuses the round instead of sending an update it could not resend (the OSError, with its path, stays
    in the site's log)."""
    try:
        releases.save(run_key, rnd, release)
    except OSError as e:
        log(WARNING, "site %s: the released update cannot be kept in %s: %s", site, releases.root, e)
        raise _refusal(fitins, msg, site, RELEASE_UNWRITABLE, audit) from None


def unready_refusal(settings: SiteSettings, cfg: RunConfig, context: Context, run_key: str,
                    audit: AuditLog, rnd: int = 0) -> tuple[str, "PreparedSite | None"]:
    """(why this site cannot train the run's round, "" if it can; its prepared data once read): every check that
    needs no training request, run by the train handler before it spends and by site_policy_mod at SecAgg+'s setup
    stage, so that a site that will refuse says so before any site trains: the server then abandons a round that
    could not be unmasked before anyone spends on it (in dp-mode "distributed" one refusing site of trusted-sites
    would otherwise cost every other site the round's budget). `rnd` (the setup stage's): also the ledger's verdict on
    the round, without a pending entry (the train handler's ledger gives it as it begins the round)."""
    from client.local_round import round_precheck
    from client.site import SiteDataError
    from privacy.accounting import BudgetError

    if settings.policy_unreadable:  # its policy now is unknown: it trains in no round (models are still installed)
        return SITE_JSON_UNREADABLE, None
    if reason := budget_refusal(settings, cfg) or delta_refusal(settings, cfg):
        return reason, None
    if settings.require_dp and not cfg.privacy.enabled:  # before the site's tables are read for such a run
        return REQUIRE_DP_REFUSAL, None
    if cfg.privacy.distributed and (reason := trust_refusal(settings, cfg)):
        return reason, None
    try:
        site = prepared(settings, cfg, site_schema_path(context, cfg))
    except SiteDataError as e:
        log(WARNING, "site %s: data failed validation:\n%s", settings.name, e)
        # The report names patient rows: it stays in the site's log; the server gets the verdict only.
        # One message for both causes: a refusal for too small a held-out part would tell the server that the site's
        # patient count is below a bound, a bit one patient can flip.
        return DATA_REFUSAL, None
    if reason := padding_refusal(settings, cfg) or (cfg.privacy.enabled and (
            stale_ledger_refusal(settings, site) or (run_key and withheld_refusal(site, run_key)))):
        return reason, site
    if cfg.privacy.enabled and run_key and rnd:
        if (entry := site.ledger.released(site.dataset_fingerprint, run_key, rnd)) is not None:  # a resend's terms
            try:
                release = ReleaseStore(settings.paths.state_dir).load(run_key, rnd)
            except ReleaseDamaged as e:
                return damaged_release(rnd, run_key, e), site
            if problem := resend_problem(rnd, run_key, release, entry):
                return problem, site
        try:
            round_precheck(site, cfg, run_key, rnd)
        except BudgetError as e:
            return str(e), site
    try:  # the update's record must be writable before its spend: a round trained and then withheld for it is lost
        audit.check_appendable()
    except (AuditError, OSError) as e:
        log(WARNING, "site %s: audit log: %s", settings.name, e)
        return AUDIT_UNWRITABLE, site
    if cfg.privacy.enabled:  # and so must the copy a resumed server gets back (_keep_release), for the same reason
        try:
            ReleaseStore(settings.paths.state_dir).check_writable()
        except OSError as e:
            log(WARNING, "site %s: released updates: %s", settings.name, e)
            return RELEASE_NO_ROOM, site
        # last: the patients are claimed in the machine's index only by a round every other check lets through
        if reason := shared_ledger_refusal(settings, site, audit):
            return reason, site
    return "", site


def _train(msg: Message, context: Context) -> Message:
    from client.local_round import train_round
    from client.site import keep_run_normalizer
    from privacy.accounting import BudgetError
    from privacy.ledger import AlreadyReleased

    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    cfg = load_run_config(context.run_config, source="run config (site)")
    settings = message_settings(context, cfg)
    rnd = int(fitins.config[SERVER_ROUND])
    run_key = str(fitins.config[RUN_KEY])
    context.state.config_records["oncofed"] = ConfigRecord({RUN_KEY: run_key, SERVER_ROUND: rnd})
    audit = site_audit(settings)
    keep_server_anchor(settings, context, cfg, fitins.config.get(AUDIT_ANCHOR))
    note_round_outcome(context, settings, cfg, run_key, fitins.config.get(PREVIOUS_ROUND))
    if reason := masks_refusal(fitins):
        raise _refusal(fitins, msg, settings.name, reason, audit)
    reason, site = unready_refusal(settings, cfg, context, run_key, audit)
    if reason:
        raise _refusal(fitins, msg, settings.name, reason, audit)
    keep_run_normalizer(settings.paths.state_dir, run_key, site.normalizer)
    if cfg.privacy.distributed:
        return _train_distributed(msg, fitins, context, cfg, settings, site, audit)
    n = len(site.train.y)
    max_weight = float(fitins.config.get(SECAGG_MAX_WEIGHT, 0) or 0)
    weight = fedavg_weight(cfg, n, max_weight)
    if max_weight and weight > max_weight:
        raise _refusal(fitins, msg, settings.name, f"{n} training patients exceed secagg-max-weight {max_weight:g}; "
                        "the operator must raise secagg-max-weight", audit)
    from shared_models.weights import arrays_sha256

    global_arrays = parameters_to_ndarrays(fitins.parameters)
    releases = ReleaseStore(settings.paths.state_dir)
    if cfg.privacy.enabled and (entry := site.ledger.released(site.dataset_fingerprint, run_key, rnd)) is not None:
        _resend_terms(fitins, msg, settings, site, run_key, cfg, audit)
        return _resend(msg, fitins, settings, _release(releases, run_key, rnd, fitins, msg, settings, audit),
                       arrays_sha256(global_arrays), audit, entry)
    with _withheld_if_refused(site, settings, run_key, rnd):  # a refusal after the spend: the ledger says so
        try:
            result = train_round(site, global_arrays, cfg, run_key, rnd, site_seed=settings.index)
        except BudgetError as e:
            raise _refusal(fitins, msg, settings.name, str(e), audit, another_attempt=isinstance(e, AlreadyReleased))
        except Exception:  # noqa: BLE001 - an error reply would carry the traceback (and maybe data) to the server
            log(WARNING, "site %s: local training failed:\n%s", settings.name, traceback.format_exc())
            raise _refusal(fitins, msg, settings.name, TRAINING_FAILED, audit)
        delta = [d.astype(np.float64) for d in result.delta]  # SecAgg+ scales and quantises in float64
        if not all(np.isfinite(d).all() for d in delta):
            # NaN or inf would pass SecAgg+'s range check and be quantised into garbage (or, without it, make the
            # global model NaN for every site): the site sends nothing instead
            start = "the global weights it received are not finite" if not all(
                np.isfinite(a).all() for a in global_arrays) else "local training diverged"
            raise _refusal(fitins, msg, settings.name, f"its update is not finite ({start}): nothing was sent; the "
                           "operator should lower the learning rate (run config lr) or restart from a finite "
                           "checkpoint", audit, run_config=True)
        if max_weight:
            # SecAgg+ clips |delta * weight / max_weight| to the clipping range silently: refuse instead.
            peak = max(float(np.abs(d).max()) for d in delta) * weight / max_weight
            clip = float(fitins.config.get(SECAGG_CLIPPING_RANGE, cfg.secagg.clipping_range))
            if peak > clip:  # the peak in the site's log only: a statistic of this one update, which enters no sum
                log(WARNING, "site %s: its update's largest value x weight / max-weight is %.3g", settings.name, peak)
                raise _refusal(fitins, msg, settings.name, f"its update exceeds secagg-clipping-range {clip:g} and "
                               "would be clipped silently: nothing was sent; the operator should raise the range, or "
                               "lower the run's local recipe if it makes updates diverge (run config lr, max-grad-norm, "
                               f"weight-decay: under DP-SGD a step scales with lr x max-grad-norm, {DP_SGD_STEP:g} in the "
                               "recipe)",
                               audit, run_config=True)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        try:  # recorded before the update leaves the site
            # under DP without the patient count: the entry's hash leaves as AUDIT_HEAD, and with every other field
            # known to the server (or guessable: seq, a timestamp in the round's window) a count in it could be found
            # by trying each value; the ledger keeps the count
            counted = {} if cfg.privacy.enabled else {"patients": n}
            trained = audit.append("round_trained", run=run_key, round=rnd, **counted,
                                   epsilon=metrics.get(EPSILON), steps=metrics.get(LOCAL_STEPS))
        except (AuditError, OSError) as e:
            log(WARNING, "site %s: audit log: %s", settings.name, e)
            raise _refusal(fitins, msg, settings.name, AUDIT_UNWRITABLE)
        metrics[SITE] = settings.name
        metrics[AUDIT_HEAD] = trained["hash"]  # the server records it: an anchor of this log outside the site
        metrics = sent_metrics(metrics, FIT_METRICS, settings.name)
        if cfg.privacy.enabled:  # kept before it leaves: a resumed server asking for this round again gets these bits back
            _keep_release(releases, run_key, rnd, Release(arrays_sha256(global_arrays), delta, weight, metrics), fitins,
                          msg, settings.name, audit)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(delta), weight, metrics)
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def fedavg_weight(cfg: RunConfig, n_patients: int, max_weight: float) -> int:
    """A site-mode update's FedAvg weight: the site's patient count without DP. Under DP the same public number at
    every site, since the count would otherwise leave it beside an epsilon accounted for adding or removing one
    patient (docs/privacy.md): batch-size / sample-rate, the count whose expected batch is batch-size, at most
    max-weight. The DP update is a sum over the site's patients divided by batch-size, so SecAgg+ (which scales
    it by weight / max-weight before its clipping range) sees the magnitudes a weight of the count gave it."""
    if not cfg.privacy.enabled:
        return n_patients
    public = max(1, round(cfg.training.batch_size / cfg.privacy.sample_rate))
    return min(int(max_weight), public) if max_weight else public


DISTRIBUTED_OUTSIDE_SECAGG = (
    "dp-mode 'distributed': a site's update carries only its share of the noise, private only inside a SecAgg+ sum; "
    "this training request is not a SecAgg+ round, so the site sends nothing (the SecAgg+ state an earlier round "
    "left does not make it one)")


def secagg_grid(context: Context) -> "SecAggGrid":
    """The SecAgg+ parameters this round's values go through, as Flower's setup stage gave them to this
    site (secaggplus_mod keeps them in the context's state before the fit stage calls the train handler)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from privacy.distributed import SecAggGrid

    state = context.state.config_records.get(RECORD_KEY_STATE)
    if state is None or not state.get("target_range"):
        raise SiteRefusal("dp-mode 'distributed' trains only inside SecAgg+ (no SecAgg+ setup was received)")
    return SecAggGrid(float(state["clipping_range"]), int(state["target_range"]), int(state["mod_range"]),
                      float(state["max_weight"]))


def trust_refusal(settings: SiteSettings, cfg: RunConfig) -> str:
    """Why this site refuses the run's trust assumption ("" if it accepts it): the site is authoritative on
    how many sites it relies on to add their noise share."""
    if settings.max_trusted_sites is not None and cfg.privacy.trusted_sites > settings.max_trusted_sites:
        return (f"site policy: the run assumes {cfg.privacy.trusted_sites} sites add their noise share honestly (run config "
                f"trusted-sites); this site relies on at most {settings.max_trusted_sites} (node config "
                "max-trusted-sites). Nothing was trained or sent")
    return ""


def stale_ledger_refusal(settings: SiteSettings, site) -> str:
    """Why this site cannot train on its ledger ("" if it can): the ledger lacks rounds whose updates the site's
    release copies show it sent (a ledger restored from a backup older than the last round). Trained on, it would
    spend them again and a resumed server asking for one would get a second, fresh update of the same patients."""
    missing = ReleaseStore(settings.paths.state_dir).unrecorded(site.ledger.committed_rounds)
    if not missing:
        return ""
    return (f"its privacy ledger has no record of {len(missing)} update(s) the site sent ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} in its released/ directory): the ledger is older than the site's "
            "state, e.g. restored from a backup taken before those rounds, and would spend them again. Restore a "
            "backup of the ledger newer than the last round; training is refused until then. Nothing was trained "
            "or sent")


SHARED_LEDGER_REFUSAL = ("another privacy ledger on the site's machine holds its patients, all or some (another site "
                         "directory over them: the site's log names it, with the fix); spent here, their "
                         "epsilon would not count what that ledger spent. Nothing was trained or sent")
LEDGER_INDEX_UNWRITABLE = ("its machine's index of privacy ledgers cannot be written (details in the site's log); it "
                           "refuses before spending")


def shared_ledger_refusal(settings: SiteSettings, site, audit: AuditLog) -> str:
    """Why this site cannot spend on its patients in its own ledger ("" if it can): another ledger of the machine that
    still exists holds them (privacy/ledger_index.py: a second site directory over the same patients, or a copy of
    its tables under another path, whatever its split, seed or schema, or tables sharing any patient), and a spend here would start from this ledger's zero. Otherwise the dataset is
    claimed as this ledger's. The refusal the server gets names no path; the site's log and audit log name the other
    ledger and the fix."""
    from privacy.ledger import dataset_fingerprint
    from privacy.ledger_index import LedgerIndex, LedgerIndexError, spend_of

    if not settings.ledger_index:
        return ""
    index = LedgerIndex()
    held = {dataset_fingerprint(site.train.ids, h)[0] for h in site.schema.accepted_hashes()}
    try:
        others = index.claim(site.ledger.path, site.dataset_fingerprint, held, data_path=settings.paths.site_dir,
                             site_dir=settings.site_dir, patients=[*site.train.ids, *site.val.ids])  # any split
    except LedgerIndexError as e:
        log(WARNING, "site %s: %s", settings.name, e)
        return LEDGER_INDEX_UNWRITABLE
    finally:
        for note in index.notes:
            log(WARNING, "site %s: %s", settings.name, note)
    if not others:
        return ""
    detail = (f"patients of {settings.paths.site_dir} are held by another privacy ledger of this machine: "
              f"{'; '.join(o.describe() for o in others)}. This site's ledger {site.ledger.path} "
              f"({spend_of(site.ledger.path)}) would count their rounds from its own spend, so it refuses every DP "
              f"round on them. Keep one ledger for these patients: if this site's ledger has spent nothing on them, stop "
              f"that site and set this site's state-dir (site.json) to {others[0].state_dir}, or train from that site "
              "(this site's tables may be a copy of its); if both have spent on them, ledgers cannot be merged: train "
              "from one site only, and count the other's spend against these patients' budget by hand")
    log(WARNING, "site %s: %s", settings.name, detail)
    _audit_quietly(audit, settings.name, "ledger_shared", ledgers=[str(o.ledger) for o in others], detail=detail)
    return SHARED_LEDGER_REFUSAL


def withheld_refusal(site, run_key: str) -> str:
    """Why this site refuses the run's next round before spending ("" if it does not): an earlier round of the run
    was withheld after its spend for a cause the run's settings make (an update outside SecAgg+'s range, or not
    finite), which every later round would meet again, spending the site's budget for nothing each time."""
    for rnd, outcome in site.ledger.withheld(run_key):
        if outcome.get("cause") == "run-config":
            return (f"round {rnd} of run {run_key} was withheld after its spend ({outcome.get('reason', '')}); "
                    "the run's settings would withhold every later round the same way, so the site refuses them "
                    "before spending. The operator fixes the setting and starts a new run. Nothing was trained or sent")
    return ""


def masks_refusal(fitins) -> str:
    """Why this site refuses a SecAgg+ round whose server draws masks another way ("" if it does not): the masks
    would not cancel, and the sum the server steps on would be noise of the modulus' size, not the sites' sum."""
    if float(fitins.config.get(SECAGG_MAX_WEIGHT, 0) or 0) <= 0:
        return ""  # no SecAgg+
    theirs = fitins.config.get(SECAGG_MASKS)
    if theirs == secagg_masks.VERSION:
        return ""
    return (f"the server's SecAgg+ draws its masks as {theirs or 'Flower 1.41 does (32-bit seeds)'}, this site as "
            f"{secagg_masks.VERSION} (privacy/secagg_masks.py): the masks would not cancel in the sum; the consortium "
            "runs one OncoFed version at the server and every site. Nothing was trained or sent")


def padding_refusal(settings: SiteSettings, cfg: RunConfig) -> str:
    """Why this site refuses the run's DP batches ("" if it accepts them): with require-padded-batches, a
    site-mode DP run must pad its Poisson batches (distributed steps always do)."""
    if (settings.require_padded_batches and cfg.privacy.enabled and cfg.privacy.mode == "site"
            and not cfg.privacy.pad_batches):
        return ("site policy: the run's DP-SGD steps would compute exactly the patients sampled (run config "
                "dp-pad-batches = false), so the round's seconds would reveal how many were; the site's node config "
                "require-padded-batches allows only padded batches. Nothing was trained or sent")
    return ""


NOTED = "oncofed.noted"  # context.state: {run key: [rounds]} whose outcome the site has noted in this flwr run
# (a cache: the state of a message that was refused is not kept, so the audit log says what was noted)


def note_round_outcome(context: Context, settings: SiteSettings, cfg: RunConfig, run_key, previous) -> None:
    """The server's word on a round whose training ended (PREVIOUS_ROUND), with the next message the site gets from
    the server whatever it is: that round's evaluation, the next round's SecAgg+ setup or training request, the model
    delivery or `query.round_outcome` (server.strategy.DeltaMixin.told). An abandoned round is said in the site's log
    and audit log (`round_abandoned`, with the server's reason) and, at a DP site whose update for it left, on that
    round's ledger entry: its spend stays counted, once. The server kept no model step from it, but its sum may
    have been unmasked first (a server that lost the round's checkpoint): the site says whether it gave its key
    shares for that sum (`shares_given`), never that its update was not used. Each round once, though the next
    messages repeat it (one may not have reached the site; a resumed server tells it once more; the message it was
    noted with may have been refused, its state not kept). Loads no data; never stops the message."""
    from client.site import ledger_path
    from privacy.ledger import PrivacyLedger

    if not (previous and run_key):
        return
    try:
        info = json.loads(str(previous))
        if info.get("status") != "abandoned":
            return
        rnd, reason = int(info["round"]), str(info.get("reason", ""))[:500]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log(WARNING, "site %s: the server's note on a round that ended is not one: %s", settings.name, e)
        return
    noted = context.state.config_records.get(NOTED) or ConfigRecord()
    if rnd in list(noted.get(str(run_key), [])):
        return
    noted[str(run_key)] = [*noted.get(str(run_key), []), rnd]
    context.state.config_records[NOTED] = noted
    audit = site_audit(settings)
    try:
        if audit.last("round_abandoned", run=str(run_key), round=rnd):
            return
    except OSError as e:
        log(WARNING, "site %s: audit log: %s", settings.name, e)
    try:  # the site's own knowledge: whether its key shares went to the round's sum (if so it may have been unmasked)
        shares = ReleaseStore(settings.paths.state_dir).unmasked_with(str(run_key), rnd) is not None
    except ReleaseDamaged:
        shares = True  # unknown: may have
    spent, path = False, ledger_path(settings.paths)
    if cfg.privacy.enabled and path.exists():
        try:
            ledger = PrivacyLedger(path, budget_epsilon=settings.budget_epsilon, delta=accounting_delta(settings, cfg))
            spent = ledger.note_outcome(None, str(run_key), rnd, status="abandoned", reason=reason,
                                        shares_given=shares)
        except (ValueError, OSError) as e:
            log(WARNING, "site %s: the server's note on round %s was not recorded in the ledger: %s", settings.name,
                rnd, e)
    log(WARNING, "site %s: the server abandoned round %s of run %s: %s%s%s", settings.name, rnd, run_key, reason,
        "; it kept no model step from the round, though this site gave its key shares for the round's sum, which "
        "may have been unmasked" if shares else "",
        "; the update this site sent for it left the site, and its spend stays counted, once" if spent else "")
    _audit_quietly(audit, settings.name, "round_abandoned", run=str(run_key), round=rnd,
                   reason=reason, spent=spent, shares_given=shares)


def _train_distributed(msg: Message, fitins, context: Context, cfg: RunConfig, settings: SiteSettings, site,
                       audit: AuditLog) -> Message:
    """dp-mode "distributed": the site's trust contract, then one DP step on SecAgg+'s grid (client/local_round)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from client.local_round import distributed_round
    from privacy.accounting import BudgetError
    from privacy.distributed import GridError
    from privacy.ledger import AlreadyReleased
    from shared_models.weights import arrays_sha256

    rnd, run_key = int(fitins.config[SERVER_ROUND]), str(fitins.config[RUN_KEY])
    if RECORD_KEY_CONFIGS not in msg.content.config_records:  # (site_policy_mod refuses it first; a second line)
        raise _refusal(fitins, msg, settings.name, DISTRIBUTED_OUTSIDE_SECAGG, audit)
    grid = secagg_grid(context)
    state = context.state.config_records[RECORD_KEY_STATE]
    n_sites = len(state.get("public_keys_dict:K", [])) or cfg.federation.sites or cfg.federation.min_sites
    global_arrays = parameters_to_ndarrays(fitins.parameters)
    releases = ReleaseStore(settings.paths.state_dir)
    if (entry := site.ledger.released(site.dataset_fingerprint, run_key, rnd)) is not None:
        _resend_terms(fitins, msg, settings, site, run_key, cfg, audit)
        release = _release(releases, run_key, rnd, fitins, msg, settings, audit)
        if release is not None and (problem := grid.off_grid(release.delta, release.num_examples, n_sites)):
            raise _refusal(fitins, msg, settings.name, f"round {rnd} of run {run_key} was released on another SecAgg+ "
                           f"grid ({problem}); resent into this one, Flower would change the values and the sum would "
                           "not be the Skellam mechanism the site accounted for, so the site sends nothing", audit)
        return _resend(msg, fitins, settings, release, arrays_sha256(global_arrays), audit, entry)
    with _withheld_if_refused(site, settings, run_key, rnd):  # a refusal after the spend: the ledger says so
        try:
            grid.check(n_sites)
            server_plan = json.loads(fitins.config[NOISE_PLAN]) if NOISE_PLAN in fitins.config else None
            result = distributed_round(site, global_arrays, cfg, run_key, rnd, grid, site_seed=settings.index,
                                       server_plan=server_plan)
        except (BudgetError, GridError) as e:
            raise _refusal(fitins, msg, settings.name, str(e), audit, another_attempt=isinstance(e, AlreadyReleased))
        except Exception:  # noqa: BLE001 - an error reply would carry the traceback (and maybe data) to the server
            log(WARNING, "site %s: distributed step failed:\n%s", settings.name, traceback.format_exc())
            raise _refusal(fitins, msg, settings.name, TRAINING_FAILED, audit)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        try:  # recorded before the update leaves the site
            trained = audit.append("round_trained", run=run_key, round=rnd,  # no patient count (see train)
                                   epsilon=metrics[EPSILON], epsilon_worst_case=metrics[EPSILON_WORST_CASE],
                                   mechanism="skellam", trusted_sites=cfg.privacy.trusted_sites, steps=1)
        except (AuditError, OSError) as e:
            log(WARNING, "site %s: audit log: %s", settings.name, e)
            raise _refusal(fitins, msg, settings.name, AUDIT_UNWRITABLE)
        metrics[SITE] = settings.name
        metrics[AUDIT_HEAD] = trained["hash"]
        metrics = sent_metrics(metrics, FIT_METRICS, settings.name)
        _keep_release(releases, run_key, rnd, Release(arrays_sha256(global_arrays), result.delta, result.num_examples,
                                                      metrics), fitins, msg, settings.name, audit)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(result.delta), result.num_examples, metrics)
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _resend_terms(fitins, msg: Message, settings: SiteSettings, site, run_key: str, cfg: RunConfig,
                  audit: AuditLog) -> None:
    """A released round is resent only under the plan it was released under: a request of the run that changes
    any term of its plan (dp-mode, trusted-sites, epsilon, ...) is refused, as for a fresh round. Otherwise the
    next stages would run under the request's terms: a share noised for `trusted-sites` t unmasked in a sum the
    request's smaller trusted-sites allows, or a distributed share sent as a site-mode update, unmasked."""
    from client.local_round import saved_plan
    from privacy.accounting import BudgetError

    try:
        saved_plan(site, run_key, cfg)
    except BudgetError as e:
        raise _refusal(fitins, msg, settings.name, str(e), audit) from None


@contextmanager
def _withheld_if_refused(site, settings: SiteSettings, run_key: str, rnd: int):
    """A refusal once the round's spend is committed (the accountants disagree, the update is not finite or
    outside SecAgg+'s range, the audit log cannot be written): nothing left the site, yet the spend counts (the
    computation ran). The ledger entry says so (outcome "withheld" and why), so that a resumed server asking for
    the round is told the truth, not that its copy is gone."""
    try:
        yield
    except SiteRefusal as e:
        if getattr(e, "another_attempt", False):  # the round was committed by another attempt, whose update is sent
            raise
        try:
            if (site.ledger.released(site.dataset_fingerprint, run_key, rnd) is not None
                    and not ReleaseStore(settings.paths.state_dir).has(run_key, rnd)):
                site.ledger.note_outcome(site.dataset_fingerprint, run_key, rnd, status="withheld",
                                         reason=str(e)[:500], **({"cause": "run-config"} if getattr(
                                             e, "run_config", False) else {}))
        except (ValueError, OSError) as note_error:
            log(WARNING, "site %s: the ledger's note of a withheld update was not written: %s", settings.name,
                note_error)
        raise


def _release(releases: ReleaseStore, run_key: str, rnd: int, fitins, msg: Message, settings: SiteSettings,
             audit: AuditLog):
    """The round's released update to send again, None if none was kept; a refusal naming the file if it is damaged."""
    try:
        return releases.load(run_key, rnd)
    except ReleaseDamaged as e:
        log(WARNING, "site %s: %s", settings.name, e)
        raise _refusal(fitins, msg, settings.name, damaged_release(rnd, run_key, e), audit) from None


def damaged_release(rnd: int, run_key: str, e: ReleaseDamaged) -> str:
    return (f"round {rnd} of run {run_key} was trained and sent before, and the site's copy of that update ({e.path}) "
            f"cannot be read ({e.why}); training it again would spend the privacy budget twice, so the site sends "
            "nothing. Restore the file from a backup of the site's state directory to send it again")


def resend_problem(rnd: int, run_key: str, release, entry: dict | None, global_sha256: str | None = None) -> str:
    """Why a round whose update already left the site cannot be sent again ("" if it can): withheld, no copy kept,
    or (`global_sha256` given) a copy trained from other global weights. Never trained again: a second spend."""
    twice = "training it again would spend the privacy budget twice, so the site sends nothing"
    if release is None and (entry or {}).get("outcome", {}).get("status") == "withheld":
        return (f"round {rnd} of run {run_key} was trained before and its update withheld "
                f"({entry['outcome'].get('reason', '')}); its spend counts, and {twice}")
    if release is None:
        return (f"round {rnd} of run {run_key} was trained before (its spend counts) and no copy of its update is kept "
                f"(a crash before the copy was written, which may have kept it from being sent, or a deleted file); {twice}")
    if global_sha256 is not None and release.global_sha256 != global_sha256:
        return (f"round {rnd} of run {run_key} was trained before (its spend counts) and sent from other global "
                f"weights; {twice}")
    return ""


def _resend(msg: Message, fitins, settings: SiteSettings, release, global_sha256: str, audit: AuditLog,
            entry: dict | None = None) -> Message:
    """A round of this run whose update already left the site: the same update again, or a refusal."""
    rnd, run_key = int(fitins.config[SERVER_ROUND]), str(fitins.config[RUN_KEY])
    if problem := resend_problem(rnd, run_key, release, entry, global_sha256):
        raise _refusal(fitins, msg, settings.name, problem, audit)
    log(INFO, "site %s: round %s of run %s was released before; sending the same update again (no new spend)",
        settings.name, rnd, run_key)
    _audit_quietly(audit, settings.name, "round_resent", run=run_key, round=rnd)
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(release.delta), release.num_examples,
                 sent_metrics({**release.metrics, RESENT: 1}, FIT_METRICS, settings.name))
    return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    import torch

    from client.site import SiteDataError, evaluate_global

    torch.set_num_threads(1)
    ins = recorddict_to_evaluateins(msg.content, keep_input=True)
    cfg = load_run_config(context.run_config, source="run config (site)")
    settings = site_settings(context, cfg)
    note_round_outcome(context, settings, cfg, ins.config.get(RUN_KEY), ins.config.get(PREVIOUS_ROUND))
    n, metrics = 0, {}
    if settings.require_dp and not cfg.privacy.enabled:  # its held-out metrics would leave without DP's preparation
        # (the normalisation fitted on the training part): a run the site refuses to train for, nor scores
        log(WARNING, "site %s: %s; the global model is not scored here either", settings.name, REQUIRE_DP_REFUSAL)
    else:
        try:
            site = prepared(settings, cfg, site_schema_path(context, cfg))
            last = int(ins.config.get(SERVER_ROUND, 0) or 0) == cfg.federation.num_rounds  # the model delivered
            n, metrics = evaluate_global(site, parameters_to_ndarrays(ins.parameters), cfg, patterns=last)
            if n and cfg.privacy.enabled:  # the ledger's spend: the package's epsilon is never below it
                metrics[EPSILON] = site.ledger.spent(site.dataset_fingerprint)
                if run_key := ins.config.get(RUN_KEY):
                    metrics[RUN_EPSILON] = site.ledger.run_spent(str(run_key))
                if cfg.privacy.distributed:
                    metrics[EPSILON_WORST_CASE] = site.ledger.spent(site.dataset_fingerprint, worst_case=True)
        except SiteDataError:
            pass
    if n:
        metrics[SITE] = settings.name
    loss = float(metrics.get(LOSS, 0.0))  # Flower's own field, as computed: a NaN loss stays NaN, never 0 by the filter
    metrics = sent_metrics(metrics, EVALUATE_METRICS, settings.name)
    res = EvaluateRes(Status(Code.OK, "ok"), loss, n, metrics)
    return Message(evaluateres_to_recorddict(res), reply_to=msg)


@app.query(ROUND_OUTCOME)
def round_outcome(msg: Message, context: Context) -> Message:
    """The last round's outcome, sent by a run that delivers no model (no round updated it)."""
    cfg = load_run_config(context.run_config, source="run config (site)")
    config = msg.content[CONFIG_RECORD]
    note_round_outcome(context, site_settings(context, cfg), cfg, config.get(RUN_KEY), config.get(PREVIOUS_ROUND))
    return Message(RecordDict({CONFIG_RECORD: ConfigRecord({REPLY: "noted"})}), reply_to=msg)


def package_architecture(package: ModelPackage, cfg: RunConfig):
    """The architecture to build the delivered arrays into: the one the server signed (the run config's for a
    package from before it was signed)."""
    from client.model_store import ModelStoreError
    from shared_models.run_config import ModelConfig

    if package.architecture is None:
        return cfg.model
    try:
        return ModelConfig(**package.architecture)
    except ValueError as e:
        raise ModelStoreError(f"the package's architecture is not one this site can build ({e}); not installed") from None


def _run_normalizer(settings: SiteSettings, schema, run_key: str):
    """The normalisation this site's patients were trained with in the run (kept when the site first prepared its data
    for it: client.site.keep_run_normalizer), kept with the installed version; None when the site trained no round
    of the run (it then serves with STATE_DIR/normalizer.json). Never fitted again here: the site's tables may have
    changed since the run (a refreshed export), and the model would be served with statistics it never saw."""
    from client.site import run_normalizer_path
    from shared_models.site_data import Normalizer

    path = run_normalizer_path(settings.paths.state_dir, run_key)
    try:
        return Normalizer.load(path, schema) if path.is_file() else None
    except Exception as e:  # noqa: BLE001 - the model installs either way; the reason goes to the log
        log(WARNING, "site %s: the run's normalisation %s could not be kept with the model (%s); it is served with "
            "the site's state normalizer.json", settings.name, path, e)
        return None


@app.query(SAVE_MODEL)
def save_model(msg: Message, context: Context) -> Message:
    """Install the final global model pushed by the server as a new version of the site's store."""
    from client.model_store import ModelStore, ModelStoreError
    from privacy.signing import SignatureError, load_public
    from privacy.signing import verify as verify_signature
    from shared_models.schema import FeatureSchema

    cfg = load_run_config(context.run_config, source="run config (site)")
    settings = site_settings(context, cfg)
    config = msg.content[CONFIG_RECORD]
    note_round_outcome(context, settings, cfg, config.get(RUN_KEY), config.get(PREVIOUS_ROUND))  # the last round's
    schema = FeatureSchema.load(site_schema_path(context, cfg))
    arrays = msg.content[ARRAYS_RECORD].to_numpy_ndarrays()
    info = json.loads(str(msg.content[CONFIG_RECORD][PACKAGE_INFO]))  # kept verbatim: what the server signed
    keep_server_anchor(settings, context, cfg, msg.content[CONFIG_RECORD].get(AUDIT_ANCHOR))
    store = ModelStore(settings.paths.model_dir)
    trust = signing_trust(context, cfg)
    package = None
    try:
        try:
            package = ModelPackage.parse(info)
        except ValueError as e:
            raise ModelStoreError(f"{e}; not installed, {store.active() or 'no model'} stays active") from None
        if trust:
            try:
                verify_signature(info, load_public(trust))
            except SignatureError as e:
                raise ModelStoreError(f"{e}; not installed, {store.active() or 'no model'} stays active") from None
        else:
            log(WARNING, "site %s has no model-signing trust anchor (node config signing-public-key): the "
                "package's signature is not checked", settings.name)
        if not schema.matches(package.schema_hash):
            raise ModelStoreError(f"model built for schema {package.schema_hash[:12]}..., this site uses "
                                  f"{schema.content_hash()[:12]}...")
        try:
            version = store.install(schema, package_architecture(package, cfg), arrays, info,
                                    expected_arrays_sha256=package.arrays_sha256,
                                    normalizer=lambda: _run_normalizer(settings, schema, str(package.run)),
                                    split={"seed": cfg.training.seed, "val_fraction": cfg.site.val_fraction})
        except OSError as e:  # a full disk, a read-only model-dir: refused like any package, not a traceback
            log(WARNING, "site %s: the model-dir %s cannot be written: %s", settings.name, store.root, e)
            raise ModelStoreError(  # the reply goes to the server: the site's paths stay in its log
                f"the site's model-dir cannot be written ({e.strerror or type(e).__name__}): not installed, "
                f"{store.active() or 'no model'} stays active; free space there or let the site's account write it, "
                "then ask the operator to send the model again (`oncofed deliver`)") from None
        reply = DeliveryReply(site=settings.name, installed=True, version=version,  # no path: the site's own business
                              arrays_sha256=store.package(version)["arrays_sha256"])
        log(INFO, "site %s installed the global model of round %s as %s", settings.name, package.round, version)
    except ModelStoreError as e:
        log(WARNING, "site %s did not install the model: %s", settings.name, e)
        reply = DeliveryReply(site=settings.name, installed=False, error=str(e), active=store.active() or "")
    try:
        entry = site_audit(settings).append("model_installed" if reply.installed else "model_refused",
                                            run=package and package.run, round=package and package.round,
                                            version=reply.version,
                                            arrays_sha256=reply.arrays_sha256 or (package and package.arrays_sha256),
                                            error=reply.error)
        reply.audit_head = entry["hash"]  # the server records it (run_end): this log anchored outside the site
    except (AuditError, OSError) as e:
        log(WARNING, "site %s: audit log: %s", settings.name, e)
    return Message(RecordDict({CONFIG_RECORD: ConfigRecord({REPLY: reply.to_json()})}), reply_to=msg)
