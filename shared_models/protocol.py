"""What the server and the sites exchange beyond Flower's own messages: field names, the metric names a
site may send, and the model package the server delivers (one definition, imported by server/ and
client/, which never import each other).

The audit anchors: every round the server sends AUDIT_ANCHOR, its run audit-log head (entries, last hash)
signed with the consortium's model-signing key, and each site keeps the newest per run
(privacy.audit.AnchorStore); each site sends AUDIT_HEAD, the last hash of its own audit log, which the
server records in its run log. Each party's copy of the other's head is what `oncofed audit verify
--anchors` checks a log against: a log rewritten from the start, chain and head recomputed, no longer
holds the anchored hash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

# --- server -> site: a round's fit config (server.strategy.build_strategy; evaluation gets the same) ------------
RUN_KEY = "run-key"  # the run's key (run name + random suffix): a site's ledger, releases, audit are per run key
SERVER_ROUND = "server-round"  # the round number; a resumed run goes on counting
SECAGG_MAX_WEIGHT = "secagg-max-weight"  # SecAgg+'s max-weight, 0 without SecAgg+: a larger site refuses
SECAGG_CLIPPING_RANGE = "secagg-clipping-range"  # SecAgg+'s clipping range: a larger update is refused, not clipped
AUDIT_ANCHOR = "audit-anchor"  # also in the model delivery: the server's signed audit head (JSON); absent when the
#                                run has no signing key
NOISE_PLAN = "noise-plan"  # dp-mode "distributed": JSON {"scale", "variance"} of the aggregate noise the server
#                            computed; a site whose own plan differs refuses (the parties run different accountants)
SECAGG_MASKS = "secagg-masks"  # how the server's SecAgg+ draws masks (privacy.secagg_masks.VERSION): a site that
#                                draws them another way refuses, since their masks would not cancel in the sum
PREVIOUS_ROUND = "previous-round"  # JSON {"round", "status", "reason"} of the last round whose training ended (e.g.
#                                    "abandoned"; with "received": true if the server held its updates' unmasked sum
#                                    before abandoning it), with the next message each site gets:
#                                    that round's evaluation, the next round's SecAgg+ setup (in SETUP_TERMS) and
#                                    training request; the last round's with the model delivery (with RUN_KEY), or in
#                                    a `query.round_outcome` (ROUND_OUTCOME) when no model is delivered. A site says
#                                    an abandoned round in its log and audit log; a DP site notes it on the round's
#                                    ledger entry

# --- site -> server: a refusal, an error reply instead of a fit result (client.app.site_policy_mod) ------------
SETUP_TERMS = "oncofed.round"  # a ConfigRecord beside SecAgg+'s setup configs: the round's RUN_KEY and SERVER_ROUND,
# so that a site checks before key sharing whether it could train the round (client.app.unready_refusal), and the
# PREVIOUS_ROUND, if any
REFUSAL_PREFIX = "refused: "  # how the reason starts; the rest says why in words that name no patient
# how a site's error starts when the run's app is not the OncoFed it installed (client.clientapp_process): the server
# then names the fix, one version everywhere, instead of a fix at the sites' data or budgets
FOREIGN_APP = "the site refuses the app the server sent"

# --- site -> server: fit metrics (client.app, from client.local_round's results) -------------------------------
SITE = "site"  # the site's name (also in evaluation metrics and the delivery reply)
AUDIT_HEAD = "audit-head"  # the last hash of the site's audit log after the round's entry
RESENT = "resent"  # 1: the update was released before (a resumed server asked again): same bits, no new spend
LOCAL_STEPS = "local_steps"
TRAIN_SECONDS = "train_seconds"
ROUND_SECONDS = "round_seconds"  # training, privacy bookkeeping and local evaluation
TRAIN_LOSS = "train_loss"  # without DP only: under DP the loss on the sampled batches stays at the site
EPSILON = "epsilon"  # the site's cumulative epsilon after the round
RUN_EPSILON = "run_epsilon"  # the epsilon of this run's rounds alone: what the run's model costs the site's patients
NOISE_MULTIPLIER = "noise_multiplier"
SAMPLE_RATE = "sample_rate"
LOCAL_VAL_ACCURACY = "local_val_accuracy"  # the trained local model on the site's held-out part
LOCAL_VAL_MACRO_F1 = "local_val_macro_f1"
# dp-mode "distributed": what the server needs to decode the SecAgg+ sum, and the site's worst case
EPSILON_WORST_CASE = "epsilon_worst_case"  # epsilon if only the site's own noise share protected it
TRUSTED_SITES = "trusted_sites"
GRID_SCALE = "grid_scale"

# --- site -> server: evaluation metrics of the global model on the site's held-out part ----------------------
LOSS = "loss"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced_accuracy"
MACRO_F1 = "macro_f1"
SCORES = (ACCURACY, BALANCED_ACCURACY, MACRO_F1)  # a model's scores, as every report and result table names them
# the run's last round only: JSON {pattern: [patients, right]} of the global model on the held-out part, per
# modality pattern (client.calibration.pattern_outcomes: the patients with the pattern's modalities, the others
# masked; a pattern with fewer than min-count patients is not sent); the server sums them into ModelPackage.patterns
PATTERNS = "patterns"

# What a site may send and the server records: a site cannot leak another value by accident.
FIT_METRICS = frozenset({SITE, AUDIT_HEAD, RESENT, LOCAL_STEPS, TRAIN_SECONDS, ROUND_SECONDS, TRAIN_LOSS, EPSILON,
                         RUN_EPSILON, NOISE_MULTIPLIER, SAMPLE_RATE, LOCAL_VAL_ACCURACY, LOCAL_VAL_MACRO_F1, EPSILON_WORST_CASE,
                         TRUSTED_SITES, GRID_SCALE})
# No site's patient count is among them: under DP it would tell neighbouring datasets apart (docs/privacy.md).
# EPSILON (and EPSILON_WORST_CASE) under DP: the site's ledger as it stands, so the delivered package carries every
# spend, also a round's whose update a crash or refusal kept from the sum the server recorded
EVALUATE_METRICS = frozenset({SITE, LOSS, ACCURACY, BALANCED_ACCURACY, MACRO_F1, PATTERNS, EPSILON, RUN_EPSILON,
                              EPSILON_WORST_CASE})


CONSORTIUM_PATTERN_MIN = 30  # held-out patients, summed over the sites, for a pattern to enter the package
CONSORTIUM_PATTERN_SITES = 3  # and sites: no site can subtract its own counts from a sum and learn another site's


def pattern_key(names) -> str:
    """A modality pattern's name: the present modalities in the schema's order, joined by '+'."""
    return "+".join(names)


def is_schema_pattern(mods: list[str], modalities: list[str]) -> bool:
    """Whether `mods` is a modality pattern of a schema with these `modalities`: some of their names, each once, in
    the schema's order (what pattern_key's name of a pattern splits into)."""
    return bool(mods) and [m for m in modalities if m in mods] == mods


def consortium_patterns(summed: Mapping[str, Any] | None, modalities: list[str]) -> dict:
    """The package's `patterns` from a round's summed PATTERNS ({pattern: {"n", "right", "sites"}}): the patterns of
    the schema's `modalities` with at least CONSORTIUM_PATTERN_MIN patients at CONSORTIUM_PATTERN_SITES sites or
    more."""
    out = {}
    for key, e in (summed or {}).items():
        mods = key.split("+")
        if not is_schema_pattern(mods, modalities):
            continue  # not one of the schema's patterns (a site's error): dropped alone
        if e["n"] >= CONSORTIUM_PATTERN_MIN and e["sites"] >= CONSORTIUM_PATTERN_SITES:
            out[key] = {"modalities": mods, "n_heldout": int(e["n"]),
                        "accuracy": round(e["right"] / e["n"], 4), "sites": int(e["sites"])}
    return out


TEXT_METRICS = frozenset({SITE, AUDIT_HEAD, PATTERNS})  # text (PATTERNS: JSON); every other metric is a number
# may be +infinity: no finite epsilon could be proven (privacy.accounting, e.g. a worst case whose bad events cost more
# than delta at every epsilon), which the package and /metrics must say rather than an earlier round's finite value
EPSILON_METRICS = frozenset({EPSILON, RUN_EPSILON, EPSILON_WORST_CASE})


def is_number(value: Any, infinite: bool = False) -> bool:
    """A finite int or float (not a bool): what every metric outside TEXT_METRICS must be; `infinite`: +inf too."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        math.isfinite(value) or (infinite and value == math.inf))


def allowed_metrics(metrics: Mapping[str, Any], allowed: frozenset[str]) -> tuple[dict, list[str]]:
    """(the metrics whose names are allowed and whose values are of their kind, what was left out: a name outside
    the allow-list as it is, one of the wrong kind with what it should be). The server reads numbers as numbers:
    one site's text where a number belongs stopped the ServerApp after the round's sum was unmasked, at every
    resume again (a review, 2026-12-06)."""
    kept, left_out = {}, []
    for k, v in metrics.items():
        if k not in allowed:
            left_out.append(k)
        elif isinstance(v, str) if k in TEXT_METRICS else is_number(v, infinite=k in EPSILON_METRICS):
            kept[k] = v
        else:
            left_out.append(f"{k} (a {type(v).__name__}, not {'text' if k in TEXT_METRICS else 'a number'})")
    return kept, sorted(left_out)


# --- the model delivery: server -> site `query.save_model`, and the site's reply -----------------------------
SAVE_MODEL = "save_model"  # the query's action: the server sends message type "query.save_model"
ROUND_OUTCOME = "round_outcome"  # "query.round_outcome": the last round's PREVIOUS_ROUND and RUN_KEY, no model
ARRAYS_RECORD = "arrays"  # the final model's weight arrays (state_dict order)
CONFIG_RECORD = "config"  # PACKAGE_INFO, AUDIT_ANCHOR, RUN_KEY, PREVIOUS_ROUND; in the reply, REPLY
PACKAGE_INFO = "package-info"  # JSON of the signed ModelPackage
REPLY = "reply"  # JSON of the site's DeliveryReply


class ModelPackage(BaseModel):
    """The description of a delivered model, as the server signs it (privacy.signing: canonical JSON of these
    fields, plus a "signature" field, kept as an extra). Fields are declared in the order the server has always
    sent them; `description()` gives the fields set, so packages and signatures of earlier runs are unchanged."""

    model_config = ConfigDict(extra="allow")

    run: str
    round: int
    schema_hash: str
    arrays_sha256: str  # shared_models.weights.arrays_sha256 of the delivered arrays
    strategy: str = ""
    secagg: bool = True
    dp: bool = True
    site_epsilon: dict[str, float] = {}  # each site's cumulative epsilon, by site name
    delta: float = 0.0
    # dp-mode "distributed" only
    dp_mode: str | None = None
    trusted_sites: int | None = None
    mechanism: str | None = None
    site_epsilon_worst_case: dict[str, float] | None = None
    privacy: str = ""  # what the run's DP relies on, in one line
    metrics: dict[str, Any] = {}  # the last round's global metrics (the sites' held-out parts)
    # when the run's training ended (Unix time): a site does not activate a model older than its active one
    # (a re-delivery of an earlier run would roll it back); packages from before 2026-12-05 have none
    finished: float | None = None
    # the architecture the arrays belong to (ModelConfig.model_dump()): signed, so that a weights file whose
    # settings were edited (e.g. a gain, the number of heads: no array changes shape) is refused as altered; the
    # site builds the model from it. Packages signed before 2026-12-05 15:00 have none (`oncofed deliver` adds it)
    architecture: dict[str, Any] | None = None
    # each site's epsilon of this run's rounds alone, by site name: what this model costs the site's patients by
    # itself (under the trust assumption in dp-mode "distributed"); packages from before 2026-12-06 have none
    site_run_epsilon: dict[str, float] | None = None
    # the final model per modality pattern on the sites' held-out parts (the last round's PATTERNS, summed:
    # {pattern: {"modalities", "n_heldout", "accuracy", "sites"}}, consortium_patterns' selection): what a site
    # judges answers by for the patterns its own `serve calibrate` has not measured. Packages from runs before
    # d1ec8be (2026-12-05) have none
    patterns: dict[str, Any] | None = None

    @classmethod
    def parse(cls, info) -> ModelPackage:
        """The package of a delivery's JSON object; ValueError names each missing or mistyped field."""
        try:
            return cls.model_validate(info)
        except ValidationError as e:
            raise ValueError("not a model package: " + "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'package'}: {err['msg']}" for err in e.errors())) from None

    def description(self) -> dict:
        """The package as the server signs and sends it: the fields set, in declaration order."""
        return self.model_dump(exclude_unset=True)


class DeliveryReply(BaseModel):
    """A site's answer to the model delivery (the server adds the node id and keeps it in result.json). It names no
    path of the site's machine: the server needs to know what was installed, not where (a field an earlier site
    sends, such as its version's path, is dropped when the reply is read)."""

    site: str
    installed: bool
    version: str | None = None  # installed: the model store's version and its arrays' SHA-256
    arrays_sha256: str | None = None
    error: str | None = None  # not installed: why, and the version that stays active ("" none)
    active: str | None = None
    audit_head: str | None = None  # the last hash of the site's audit log after recording the delivery

    def to_json(self) -> str:
        return json.dumps(self.model_dump(exclude_unset=True))
