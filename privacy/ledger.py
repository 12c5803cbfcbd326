"""A site's privacy ledger: every DP-SGD mechanism ever run on its data, across rounds and runs.

One JSON file per site (in the site's state directory, never sent anywhere). Entries are keyed by
(dataset fingerprint, run id, round, attempt). A dataset's spend is the composition of every entry
of every dataset of the site (below).

Crash safety (write-ahead):
1. `begin_round` checks the budget with the round's planned steps and writes a *pending* entry
   before any training. A refused round writes nothing.
2. `commit_round` records the steps actually executed, before the update leaves the site.
A pending entry left by a crash counts as spent (the ledger never loses spend). If the same run
retries the same round, that pending entry is replaced, not added to (nothing is counted twice).
A committed round is never trained again: `begin_round` raises `AlreadyReleased`, and the site
resends the update it already released for that round (client/releases.py) or refuses. So a round
whose update left the site counts once, whatever happens to the server afterwards.

Each run has a plan, fixed at its first round at this site (`start_run`): the run's epsilon, its
rounds and steps, its noise. A later request of the same run that changes any of them, a round
beyond the plan, more steps than planned, or a spend beyond the run's epsilon is refused.

A round of `dp-mode = "distributed"` (privacy/distributed.py) is one Skellam step; its entry keeps the
mechanism relied on (the grid, the sensitivities, the aggregate noise and the trusted sites), and the
ledger reports two epsilons for it: under the run's trust assumption (the aggregate noise of
`trusted-sites` honest shares; the budget is enforced on it) and the worst case, the site's own noise
share alone (`spent(..., worst_case=True)`).

Every epsilon is accounted at the ledger's delta, pinned in the file: the smallest delta the site was ever
opened with (its own node config's, or in a simulation the run's). A later run with a larger delta cannot
re-price the site's past spend downwards; one with a smaller delta re-prices it upwards (conservative).

A run's patients are fixed when it starts: its plan and its released rounds are found whatever the site's
dataset is now, so a run whose training set changes (patients added, another split) is refused instead of
being trained again under a fresh plan. Two processes training the same round (a resumed server asking
again while the first attempt still trains) both run, but only the first to commit sends its update.

A site's spend is one sum over every dataset it ever registered (every run on its data, whatever the schema
or split), not only over those sharing a patient with the current one: which patients were in an earlier
dataset must not change the noise or the epsilon a run reports.

Every write is atomic (temp file, fsync, rename) under an exclusive file lock. The ledger file is created,
empty, before its lock file ever exists, so a lock file beside no ledger means the ledger was lost: the site
refuses to train (a fresh ledger would forget the spend) until it is restored from backup.

One ledger sees only its own file. A second site directory over the same patients (a re-key, a copy, a second
consortium on the same data) would start a second, empty ledger and spend their budget again: the machine's index of
ledgers (privacy/ledger_index.py) lets `site init` and a deployed site's rounds see the other ledgers of the machine.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privacy import LEGACY_PADDING_TAIL
from privacy.accounting import MAX_BUDGET, UNPROVABLE, BudgetError, Mechanism, Overflow, epsilon
from privacy.audit import AUDIT_FILE, AuditLog
from privacy.distributed import SkellamPlan
from shared_models.files import write_json_atomic

LEDGER_FORMAT = "oncofed-privacy-ledger/1"
LEDGER_FILE = "privacy-ledger.json"  # in the site's state directory
EPSILON_SLACK = 1e-6  # PRV's grid is deterministic: the run's last round lands on its cap up to float noise


def dataset_fingerprint(patient_ids: list[str], schema_hash: str) -> tuple[str, int]:
    """(fingerprint, number of patients): the same patients under the same schema = the same dataset. The
    ledger keeps only the fingerprint and the count: one spend per site needs no patient's id, hashed or not."""
    hashed = sorted({hashlib.sha256(f"{schema_hash}:{pid}".encode()).hexdigest()[:16] for pid in patient_ids})
    return hashlib.sha256(("\n".join(hashed)).encode()).hexdigest(), len(hashed)


def known_fingerprint(datasets: dict, patient_ids: list[str], schema_hash: str, *earlier_hashes: str
                      ) -> tuple[str, int]:
    """`dataset_fingerprint` of these patients as the ledger's `datasets` know them: under `schema_hash` unless
    the ledger registered them under one of `earlier_hashes`, another hash of the same schema (the site passes
    `FeatureSchema.accepted_hashes()`). A dataset keeps its fingerprint, and with it its runs' plans and
    released rounds, when the schema's hash is computed anew."""
    current = dataset_fingerprint(patient_ids, schema_hash)
    if current[0] in datasets:
        return current
    earlier = (dataset_fingerprint(patient_ids, h) for h in earlier_hashes)
    return next((fp for fp in earlier if fp[0] in datasets), current)


def read_ledger(path: str | Path) -> dict:
    """A ledger file's contents (datasets, runs, entries), for reading only: no lock, no budget needed."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        # Refuse rather than start from zero: a lost ledger would silently reset the spend.
        raise BudgetError(f"{path}: privacy ledger unreadable ({e}); restore it from backup. "
                          "Training is refused until then") from None
    if not isinstance(state, dict) or state.get("format") != LEDGER_FORMAT:
        raise BudgetError(f"{path}: not an OncoFed privacy ledger")
    if not isinstance(state.get("datasets"), dict) or not isinstance(state.get("entries"), list) or not all(
            isinstance(e, dict) for e in state["entries"]) or not isinstance(state.get("runs", {}), dict):
        raise BudgetError(f"{path}: privacy ledger damaged (its datasets, runs or entries are missing or not what a "
                          "ledger holds); restore it from a backup. Training is refused until then")
    try:
        for e in state["entries"]:
            _recorded_tail(e)
    except BudgetError as e:
        raise BudgetError(f"{path}: {e}") from None
    return state


def recorded_spend(state: dict) -> tuple[float, int, int]:
    """(the epsilon spent, as the last committed round recorded it; committed rounds; rounds begun and not finished)
    of a ledger's contents (`read_ledger`): what a person is shown, without running the accountant, but for a ledger
    with entries written before 2026-12-07, whose recorded figures leave the padding's overflow out: the accountant
    prices its committed rounds once, as the ledger now does (it can be far above, or infinite). TypeError or
    ValueError: an entry is damaged."""
    committed = [e for e in state["entries"] if e.get("status") == "committed"]
    spent = max((float(e.get("epsilon_after", 0.0)) for e in committed), default=0.0)
    if isinstance(state.get("delta"), float) and any("padding_tail" not in e for e in committed):
        spent = max(spent, epsilon([m for e in committed for m in _mechanisms(e)], state["delta"]))
    return spent, len(committed), len(state["entries"]) - len(committed)


class AlreadyReleased(BudgetError):
    """The run's round was committed (its update left the site) before: it is not trained again."""


@dataclass(frozen=True)
class RunPlan:
    """What a site agreed to when a run first asked it to train: fixed for the run's whole life."""

    epsilon: float  # what the run may add to the site's spend
    epsilon_cap: float  # the site's total spend may not pass this while the run trains (<= the site's budget)
    num_rounds: int
    steps_per_round: int
    noise_multiplier: float
    sample_rate: float
    terms: dict = field(default_factory=dict)  # the run-config values that fix the mechanism, as requested
    mechanism: dict = field(default_factory=dict)  # dp-mode "distributed": SkellamPlan.to_dict(); {}: Gaussian

    @property
    def planned_steps(self) -> int:
        return self.num_rounds * self.steps_per_round

    def changes(self, terms: dict) -> list[str]:
        """The terms a later request of this run changes, as 'key: planned -> requested'."""
        return [f"{k}: {self.terms.get(k)!r} -> {v!r}" for k, v in sorted(terms.items()) if self.terms.get(k) != v]


@dataclass(frozen=True)
class RoundTicket:
    """A round that passed the budget check and is being trained."""

    dataset: str
    run_id: str
    round: int
    attempt: int
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    epsilon_before: float
    projected_epsilon: float


class PrivacyLedger:
    def __init__(self, path: str | Path, budget_epsilon: float, delta: float):
        if budget_epsilon <= 0:
            raise BudgetError(f"privacy budget epsilon must be > 0 (got {budget_epsilon}); set the site's budget")
        if budget_epsilon > MAX_BUDGET:
            raise BudgetError(
                f"privacy budget epsilon {budget_epsilon:g} is above {MAX_BUDGET:g}, the largest this site's accounting "
                f"verifies (Opacus' PRV accountant; above it the ledger can only give a looser bound that Opacus "
                f"contradicts, and every round would be refused). A budget this large protects no record in any "
                f"meaningful sense: set the site's budget (node config privacy-budget; simulation: epsilon) to at "
                f"most {MAX_BUDGET:g}, or train without DP (run config dp = false)")
        if not (0 < delta < 1):
            raise BudgetError(f"delta must be in (0, 1) (got {delta}); use less than 1 / number of patients")
        self.path, self.budget_epsilon, self.delta = Path(path), float(budget_epsilon), float(delta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create()
        self._read()  # the delta pinned in the file, if smaller than the one asked for

    # --- storage ----------------------------------------------------------------------------
    @property
    def _lock_path(self) -> Path:
        return self.path.with_suffix(self.path.suffix + ".lock")

    def _create(self) -> None:
        """A new site's empty ledger, before any lock file: link(2) puts it in place only if no ledger is there
        (another process may create it at the same moment), so an existing ledger is never overwritten."""
        lost = [what for what, seen in (
            (self._lock_path.name, lambda: self._lock_path.exists()),
            ("released updates in released/", lambda: any((self.path.parent / "released").glob("*/round-*.npz"))),
            (f"rounds trained in {AUDIT_FILE}",
             lambda: bool(AuditLog(self.path.parent / AUDIT_FILE).last("round_trained"))),
        ) if seen()]
        if lost and self.path.exists():
            return  # another process created it (and took its lock) since this one looked
        if lost:
            raise BudgetError(
                f"{self.path}: the privacy ledger is missing, but {' and '.join(lost)} show that this site has trained "
                "with one. A new ledger would start from zero and forget the spend: restore the ledger from a backup "
                "(with the rest of the state directory). Training is refused until then")
        tmp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.new")
        write_json_atomic(tmp, {"format": LEDGER_FORMAT, "delta": self.delta, "datasets": {}, "entries": []})
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass  # another process created it first: its ledger stands
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self):
        lock = self._lock_path
        with open(lock, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self) -> dict:
        state = read_ledger(self.path)  # refuses a missing ledger: it was created when this object was
        pinned = state.get("delta")
        if pinned is None:  # a ledger from before the delta was pinned: the smallest delta its runs were planned at
            planned = [r.get("terms", {}).get("delta") for r in state.get("runs", {}).values()]
            planned = [d for d in planned if isinstance(d, (int, float)) and 0 < d < 1]
            pinned = min(planned) if planned else None
        if isinstance(pinned, (int, float)) and 0 < pinned < self.delta:
            self.delta = float(pinned)  # every epsilon at the smallest delta the site was ever opened with
        return state

    def _write(self, state: dict) -> None:
        state["delta"] = self.delta
        write_json_atomic(self.path, state)

    # --- queries ----------------------------------------------------------------------------
    @staticmethod
    def _history(state: dict, skip: tuple | None = None, worst_case: bool = False) -> list[Mechanism]:
        """Every mechanism the site ran, on any of its datasets: its spend is one, whoever was in each. Counting
        only the datasets that share a patient with the current one made the spend, and so the run's noise
        multiplier and its reported epsilon (both sent to the server), depend on whether one patient had been in
        an earlier dataset: a bit about a patient outside any DP mechanism. The site-wide sum depends only on the
        site's run history."""
        return [m for e in state["entries"] if (e["dataset"], e["run_id"], e["round"], e["attempt"]) != skip
                for m in _mechanisms(e, worst_case)]

    def register_dataset(self, patient_ids: list[str], schema_hash: str, *earlier_hashes: str) -> str:
        """The dataset's fingerprint, registered if new (`known_fingerprint`: under `schema_hash`, unless the ledger
        has it under one of `earlier_hashes`)."""
        with self._locked() as state:
            fp, n = known_fingerprint(state["datasets"], patient_ids, schema_hash, *earlier_hashes)
            if fp not in state["datasets"]:
                state["datasets"][fp] = {"n_patients": n, "registered": time.time()}
                self._write(state)
        return fp

    def history(self, dataset: str, excluding: "RoundTicket | None" = None, worst_case: bool = False
                ) -> list[Mechanism]:
        """Every mechanism run on the site's data (any dataset's: `dataset` names the one asking); `excluding`
        leaves out a round in progress (Opacus' accountant, restored from this, adds the round's steps as they
        run); `worst_case` takes distributed rounds with the site's own noise share alone."""
        state = self._read()
        skip = None if excluding is None else (excluding.dataset, excluding.run_id, excluding.round, excluding.attempt)
        return self._history(state, skip=skip, worst_case=worst_case)

    def run_spent(self, run_id: str) -> float:
        """The epsilon of one run's committed rounds alone: what the model that run delivers costs the site's patients
        by itself (each run trains from fresh weights; `spent` is every run's together, pending rounds included). Under
        the trust assumption in a distributed run."""
        return run_epsilon(self._read(), run_id, self.delta)

    def spent(self, dataset: str, worst_case: bool = False) -> float:
        """The site's epsilon (every dataset's: `dataset` names the one asking); with worst_case, distributed rounds count only the site's own noise share
        (what it has if every other site colluded with the server)."""
        return epsilon(self.history(dataset, worst_case=worst_case), self.delta)

    @staticmethod
    def _plan(state: dict, dataset: str, run_id: str) -> RunPlan | None:
        """The run's plan at this dataset; BudgetError if the run started here on another dataset (its
        patients changed: added or removed rows, another split)."""
        runs = state.get("runs", {})
        for key, d in runs.items():
            started_on, _, rid = key.partition(":")
            if rid == run_id and started_on != dataset and "num_rounds" in d:
                # no patient counts in the text: a refusal's reason goes to the server
                raise BudgetError(
                    f"run {run_id} started at this site on another training set: the "
                    "site's tables or their split (seed, val-fraction) changed during the run. A run's patients are "
                    "fixed when it starts, so nothing was trained or sent: finish the run on the tables it started "
                    "with, or start a new run")
        d = runs.get(f"{dataset}:{run_id}")
        if d is None or "num_rounds" not in d:
            return None
        return RunPlan(**{k: d[k] for k in RunPlan.__dataclass_fields__ if k in d})

    def run_plan(self, dataset: str, run_id: str) -> RunPlan | None:
        """The plan a run was given at its first round here (None for a run this site has not seen)."""
        return self._plan(self._read(), dataset, run_id)

    def start_run(self, dataset: str, run_id: str, plan: RunPlan) -> RunPlan:
        """Record the run's plan; if the run already has one (a restarted site or server), that one stands."""
        with self._locked() as state:
            saved = self._plan(state, dataset, run_id)
            if saved is not None:
                return saved
            state.setdefault("runs", {})[f"{dataset}:{run_id}"] = {
                **asdict(plan), "planned_steps": plan.planned_steps, "started": time.time()}
            self._write(state)
        return plan

    def withheld(self, run_id: str) -> list[tuple[int, dict]]:
        """(round, outcome) of the run's rounds that were spent but whose update never left (outcome "withheld")."""
        return [(e["round"], e["outcome"]) for e in self._read()["entries"] if e["run_id"] == run_id
                and e["status"] == "committed" and e.get("outcome", {}).get("status") == "withheld"]

    def committed_rounds(self) -> set[tuple[str, int]]:
        """(run, round) of every update this ledger says left the site, on any dataset."""
        return {(e["run_id"], e["round"]) for e in self._read()["entries"] if e["status"] == "committed"}

    def released(self, dataset: str, run_id: str, rnd: int) -> dict | None:
        """The committed entry of a run's round, if its update already left the site (from this dataset or,
        had the site's tables changed since, from the one the run trained on)."""
        entries = [e for e in self._read()["entries"]
                   if (e["run_id"], e["round"], e["status"]) == (run_id, rnd, "committed")]
        return next((e for e in entries if e["dataset"] == dataset), entries[0] if entries else None)

    # --- a round ------------------------------------------------------------------------------
    def begin_round(self, dataset: str, run_id: str, rnd: int, noise_multiplier: float, sample_rate: float,
                    steps: int, mechanism: SkellamPlan | None = None, *, padding_tail: float) -> RoundTicket:
        """Check the budget for this round and write a pending entry; raise BudgetError to refuse.
        `mechanism`: a distributed round's Skellam plan (None: DP-SGD's Gaussian steps). `padding_tail`: the
        probability per step that a Poisson sample outgrows its padded batch (privacy/sampling.py; 0: the steps are
        not padded, and their timing is outside the claim), priced in delta with the steps (accounting.Overflow): no
        default, so that no caller leaves the price out by omission."""
        with self._locked() as state:
            key, before, projected = self._checked_round(state, dataset, run_id, rnd, noise_multiplier, sample_rate,
                                                         steps, mechanism, padding_tail)
            attempt = key[3]
            state["entries"] = [e for e in state["entries"]
                                if (e["dataset"], e["run_id"], e["round"], e["attempt"]) != key]
            state["entries"].append({
                "dataset": dataset, "run_id": run_id, "round": rnd, "attempt": attempt, "status": "pending",
                "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps,
                **({"mechanism": mechanism.to_dict()} if mechanism is not None else {}),
                "padding_tail": float(padding_tail), "started": time.time()})
            self._write(state)
        return RoundTicket(dataset, run_id, rnd, attempt, noise_multiplier, sample_rate, steps, before, projected)

    def check_round(self, dataset: str, run_id: str, rnd: int, noise_multiplier: float, sample_rate: float,
                    steps: int, mechanism: SkellamPlan | None = None, *, padding_tail: float) -> None:
        """begin_round's checks without its pending entry: raise BudgetError if the round would be refused. A site
        asks at SecAgg+'s setup stage, before any site trains, so that a round it would refuse costs no one a spend."""
        self._checked_round(self._read(), dataset, run_id, rnd, noise_multiplier, sample_rate, steps, mechanism,
                            padding_tail)

    def _checked_round(self, state: dict, dataset: str, run_id: str, rnd: int, noise_multiplier: float,
                       sample_rate: float, steps: int, mechanism: SkellamPlan | None,
                       padding_tail: float) -> tuple[tuple, float, float]:
        """(the round's entry key, epsilon before it, epsilon after it), or BudgetError: the round is refused."""
        if not 0 <= padding_tail < 1:
            raise ValueError(f"padding_tail must be a probability below 1, not {padding_tail!r}")
        if any((e["run_id"], e["round"], e["status"]) == (run_id, rnd, "committed") for e in state["entries"]):
            raise AlreadyReleased(f"round {rnd} of run {run_id} was trained and its update sent before; the "
                                  "site does not train it again (a resumed server gets the same update back)")
        plan = self._plan(state, dataset, run_id)
        same = [e for e in state["entries"] if (e["dataset"], e["run_id"], e["round"]) == (dataset, run_id, rnd)]
        if plan is not None:
            self._check_plan(state, plan, dataset, run_id, rnd, noise_multiplier, sample_rate, steps)
        pending = [e for e in same if e["status"] == "pending"]
        attempt = pending[-1]["attempt"] if pending else len(same) + 1
        key = (dataset, run_id, rnd, attempt)
        past = self._history(state, skip=key)
        before = epsilon(past, self.delta)
        this = mechanism.steps(steps) if mechanism is not None else (noise_multiplier, sample_rate, steps)
        projected = epsilon(past + [this, Overflow(steps, padding_tail)], self.delta)
        if plan is not None and projected > plan.epsilon_cap + EPSILON_SLACK:
            raise BudgetError(
                f"round {rnd} refused: run {run_id} may bring this site's spend to epsilon "
                f"{plan.epsilon_cap:.3f} (its epsilon {plan.epsilon:g} on top of what was spent when it started); "
                f"this round would bring it to {projected:.3f}"
                f"{', no finite epsilon' + UNPROVABLE if math.isinf(projected) else ''}. Nothing was trained or sent")
        if projected > self.budget_epsilon:
            raise BudgetError(
                f"round {rnd} refused: the site has spent epsilon {before:.3f} of its budget "
                f"{self.budget_epsilon:g} (delta {self.delta:g}); this round ({steps} steps, noise "
                f"{noise_multiplier:.3f}) would bring it to {projected:.3f}"
                f"{', no finite epsilon' + UNPROVABLE if math.isinf(projected) else ''}."
                " Nothing was trained or sent"
            )
        return key, before, projected

    @staticmethod
    def _check_plan(state: dict, plan: RunPlan, dataset: str, run_id: str, rnd: int, noise_multiplier: float,
                    sample_rate: float, steps: int) -> None:
        if not 1 <= rnd <= plan.num_rounds:
            raise BudgetError(f"round {rnd} refused: run {run_id} was planned with {plan.num_rounds} rounds at this "
                              "site. Nothing was trained or sent")
        if (noise_multiplier, sample_rate) != (plan.noise_multiplier, plan.sample_rate):
            raise BudgetError(f"round {rnd} refused: run {run_id} was planned with noise multiplier "
                              f"{plan.noise_multiplier:.4f} and sample rate {plan.sample_rate:.4f}, not "
                              f"{noise_multiplier:.4f} and {sample_rate:.4f}")
        done = sum(e["steps"] for e in state["entries"] if (e["dataset"], e["run_id"]) == (dataset, run_id)
                   and e["round"] != rnd and e["status"] == "committed")
        if done + steps > plan.planned_steps:
            raise BudgetError(f"round {rnd} refused: run {run_id} has run {done} of its {plan.planned_steps} planned "
                              f"steps here; {steps} more would exceed the plan. Nothing was trained or sent")

    def note_outcome(self, dataset: str | None, run_id: str, rnd: int, **outcome) -> bool:
        """Record what became of a committed round's update (e.g. status "abandoned", the server's reason and whether
        the site gave its key shares for the round's sum: the server kept no model step from it, but its sum may have
        been unmasked before, as by a server that lost the round's checkpoint). The spend stays counted: the update
        left the site. False if the
        round has no committed entry here. `dataset` None: the run's round on whichever dataset it trained (a run
        key and round name one spend; the model delivery, which loads no data, notes the last round so). A round the
        site itself withheld keeps that outcome: the server's later word (e.g. "abandoned", since the site sent
        nothing) does not replace what the site knows, which its later requests are refused on."""
        with self._locked() as state:
            for e in state["entries"]:
                if ((e["run_id"], e["round"], e["status"]) == (run_id, rnd, "committed")
                        and dataset in (None, e["dataset"])):
                    if e.get("outcome", {}).get("status") == "withheld":
                        return False
                    e["outcome"] = {**outcome, "noted": time.time()}
                    self._write(state)
                    return True
        return False

    def commit_round(self, ticket: RoundTicket, executed_steps: int) -> float:
        """Record the steps actually run; returns the dataset's cumulative epsilon."""
        return self._commit(ticket, executed_steps)[0]

    def commit_distributed_round(self, ticket: RoundTicket, executed_steps: int) -> tuple[float, float]:
        """commit_round for a distributed round: (epsilon under the trust assumption, worst-case epsilon with
        the site's own noise share alone), both as recorded in the entry."""
        spent, worst = self._commit(ticket, executed_steps)
        if worst is None:
            raise BudgetError(f"round {ticket.round} of run {ticket.run_id} is not a distributed round")
        return spent, worst

    def _commit(self, ticket: RoundTicket, executed_steps: int) -> tuple[float, float | None]:
        if executed_steps > ticket.planned_steps:
            raise BudgetError(f"round {ticket.round} ran {executed_steps} steps, more than the "
                              f"{ticket.planned_steps} checked against the budget")
        with self._locked() as state:
            for e in state["entries"]:
                if (e["dataset"], e["run_id"], e["round"], e["attempt"]) == (
                        ticket.dataset, ticket.run_id, ticket.round, ticket.attempt):
                    if e["status"] == "committed":  # another process trained this round at the same time, and sent it
                        raise AlreadyReleased(
                            f"round {ticket.round} of run {ticket.run_id} was trained by another attempt at the same "
                            "time (a resumed server asked again), whose update was sent: this one is withheld")
                    e.update(status="committed", steps=int(executed_steps), committed=time.time())
                    break
            else:
                raise BudgetError(f"{self.path}: no pending entry for round {ticket.round}; was the ledger replaced?")
            spent, worst = epsilon(self._history(state), self.delta), None
            e["epsilon_after"] = spent
            if "mechanism" in e:  # the second number of a distributed round: the site's share alone
                worst = e["epsilon_worst_case_after"] = epsilon(self._history(state, worst_case=True), self.delta)
            self._write(state)
        return spent, worst


def run_epsilon(state: dict, run_id: str, delta: float) -> float:
    """The epsilon of run `run_id`'s committed rounds alone in a ledger's contents (`read_ledger`): the rounds whose
    updates left the site, so all the run's model can depend on (a pending round's update never left; the site's
    spend counts it all the same). The rounds are chosen by run, never by dataset: which count depends on the run
    history alone."""
    return epsilon([m for e in state["entries"] if e["run_id"] == run_id and e["status"] == "committed"
                    for m in _mechanisms(e)], delta)


def _mechanisms(entry: dict, worst_case: bool = False) -> list[Mechanism]:
    """A ledger entry as the accountant takes it: its steps, and their padding's overflow (an entry written before
    the ledger recorded the padding's tail, 2026-12-07, is priced at the tail every padded step had then)."""
    if entry.get("mechanism", {}).get("kind") == "skellam":
        steps = _skellam_steps(tuple(sorted(entry["mechanism"].items())), entry["steps"], worst_case)
    else:
        steps = (entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
    return [steps, Overflow(entry["steps"], _recorded_tail(entry))]


def _recorded_tail(entry: dict) -> float:
    """The padding tail an entry records (LEGACY_PADDING_TAIL for one written before the ledger recorded it), or
    BudgetError: a damaged entry (read_ledger names the file)."""
    tail = entry.get("padding_tail", LEGACY_PADDING_TAIL)
    if type(tail) not in (int, float) or not 0 <= tail < 1:
        raise BudgetError(f"privacy ledger damaged: an entry of run {entry.get('run_id')!r} round {entry.get('round')!r} "
                          f"has padding_tail {tail!r}, not a probability below 1; restore it from a backup. Training "
                          "is refused until then")
    return float(tail)


@functools.lru_cache(maxsize=1024)
def _skellam_steps(mechanism: tuple, steps: int, worst_case: bool) -> Mechanism:
    """Memoised: a distributed run's entries all carry the same plan, and every budget check reads them all."""
    return SkellamPlan.from_dict(dict(mechanism)).steps(steps, worst_case=worst_case)
