"""What differs from Flower's legacy FedAvg/FedProx/FedAdam: sites send deltas, and sites may refuse.

SecAgg+ exists only for Flower's legacy stack, so the strategies are the legacy ones. Sites send
weight deltas (local - global), which keep SecAgg+'s quantisation precise. The aggregated delta is
turned back into full weights (global + mean delta, in float64) before the base strategy's
aggregate_fit, so FedAvg and FedProx return global + mean delta and FedAdam receives the mean
delta as its pseudo-gradient.

In dp-mode "distributed" (privacy/distributed.py) the SecAgg+ sum is the consortium's noisy sum of
clipped per-sample gradients on an integer grid: the strategy decodes the exact integer sum, divides it
by the grid scale and the run's batch-size (a public stand-in for the expected total batch) and
hands minus that gradient to the base strategy as the mean delta, so FedAvgM steps server momentum and
FedAdam steps Adam on it (post-processing of the DP sum).

A site that refuses a round (privacy budget, failed validation) drops out of it: its reply is an
error whose reason starts with "refused: " (no vector, so under SecAgg+ a refusal never counts as a
contribution; SecAgg+ removes its masks as for any dropout). The round's record keeps refusals,
failures and dropouts apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from types import MappingProxyType

import numpy as np
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from privacy.distributed import GridError, SecAggGrid, decode_sum
from shared_models.protocol import (ACCURACY, BALANCED_ACCURACY, EVALUATE_METRICS, FIT_METRICS, GRID_SCALE, MACRO_F1,
                                    PATTERNS, PREVIOUS_ROUND, REFUSAL_PREFIX, RUN_KEY, SAMPLE_RATE, SERVER_ROUND,
                                    SITE, TRAIN_LOSS, allowed_metrics, is_number)
from shared_models.run_config import RunConfig

FEDADAM_TAU = 1e-3

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedavgm": FedAvgM}


def failure_reason(f) -> str:
    """Readable text of one entry of Flower's `failures` list."""
    if isinstance(f, BaseException):
        err = f.args[0] if f.args else f
        reason = str(getattr(err, "reason", err))
        if "Message: " in reason:  # simulation wraps the site's exception text after a traceback
            reason = reason.rsplit("Message: ", 1)[1].rstrip("'>")
        reason = reason.strip()
        # a refusal whole (refusal_reason shortens its reason, as the workflow's record of it): cut to its last 500
        # characters it lost its prefix and counted as a failure too
        return reason if REFUSAL_PREFIX in reason else reason[-500:]
    proxy, res = f
    return f"node {proxy.node_id}: {res.status.code.name} {res.status.message}"


def refusal_reason(text: str) -> str:
    """A site's refusal's reason, the text after REFUSAL_PREFIX, as the round records keep it."""
    body = text.split(REFUSAL_PREFIX, 1)[1].strip()
    return body if len(body) <= 500 else body[:300] + " [...] " + body[-190:]


def aggregated_line(rnd: int, aggregated: int, sampled: int, refused: int, dropped: list, failures: int,
                    distinct_errors: int) -> str:
    """The round's count of sites, beside Flower's "received R results and F failures": F counts failed messages, and
    under SecAgg+ one site that goes away can fail a message at several stages (two failures, one site). A site that
    failed sent no update, so it is among those without a reply (`dropped`), not counted twice."""
    said = f"round {rnd}: aggregated {aggregated} of {sampled} sampled sites ({refused} refused, {len(dropped)} " \
           f"without an update" + (f": nodes {', '.join(map(str, dropped))}" if dropped else "") + ")"
    if failures:
        said += (f"; Flower's {failures} failure(s) are failed messages (one site can fail several of SecAgg+'s stages), "
                 f"{distinct_errors} distinct error(s), logged above")
    return said


def recorded(metrics, allowed: frozenset[str], node_id) -> dict:
    """A site's metrics as the server records them: the protocol's allow-list only (shared_models.protocol)."""
    kept, left_out = allowed_metrics(metrics, allowed)
    if left_out:
        log(WARNING, "node %s sent metrics outside the protocol's allow-list or of the wrong kind (%s); not recorded",
            node_id, ", ".join(left_out))
    return kept


def weighted_mean(pairs: list[tuple[int, dict]], key: str) -> float | None:
    """The mean of a metric over the sites that sent it as a number (Flower passes their metrics unchecked; the
    node that sent another kind is named by `recorded`)."""
    pairs = [(n, m[key]) for n, m in pairs if is_number(m.get(key))]
    total = sum(n for n, _ in pairs)
    return sum(n * float(v) for n, v in pairs) / total if total else None


class DeltaMixin:
    """Goes in front of a legacy strategy class (see `build_strategy`)."""

    def init_delta(self, weights: list[np.ndarray]) -> None:
        self.global_weights = [np.asarray(w, dtype=np.float32) for w in weights]
        self.round_info: dict = {}
        self.timing: dict = {}  # seconds per phase of the current round (server.workflow fills most of it)
        self.sampled: set[int] = set()
        self.outcomes: dict[int, dict] = {}  # round -> {"status", "reason"}: told to the sites in the next round

    evaluate_every, num_rounds = 1, 0
    grid: SecAggGrid | None = None  # dp-mode "distributed": the SecAgg+ grid the sites' sums are on
    expected_batch: float = 0.0  # and what the noisy sum is divided by: the run's batch-size (build_strategy)

    updated = False  # whether a round of the run moved the global model (this attempt's, or one before a resume)

    def configure_evaluate(self, server_round, parameters, client_manager):
        """Sites score the global model every `evaluate-every` rounds and always after the last one (in a
        deployment each evaluation is a fresh process per site that reloads its data), but never the untrained
        initial model: while no round has updated it, a score says nothing of the run and costs every site."""
        if server_round != self.num_rounds and server_round % max(self.evaluate_every, 1):
            return []
        if not self.updated:
            log(INFO, "round %s: no round has updated the global model yet, so the sites do not score the untrained "
                "initial model", server_round)
            return []
        ins = super().configure_evaluate(server_round, parameters, client_manager)
        for _, evaluate_ins in ins:  # the round's own outcome: the first message the sites get after its training
            evaluate_ins.config.update(self.told(server_round))
        return ins

    def told(self, server_round: int) -> dict:
        """{PREVIOUS_ROUND: round `server_round`'s outcome} for the sites, {} before it has one. It goes with the
        next message every site gets whatever it is (the round's evaluation, the next round's SecAgg+ setup and
        training request, the model delivery): Flower's SuperNodes only pull what a workflow sends, and a message of
        its own would cost every site a process and wait for the sites that dropped out (docs/privacy.md)."""
        outcome = self.outcomes.get(server_round)
        return {} if outcome is None else {PREVIOUS_ROUND: json.dumps({"round": server_round, **outcome})}

    def setup_terms(self, server_round: int) -> dict:
        """What goes beside SecAgg+'s setup configs (server.workflow.PollingGrid, SETUP_TERMS): the round's run key
        and number, for the sites' checks before key sharing, and the last round's outcome."""
        fit = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
        return {**{k: fit[k] for k in (RUN_KEY, SERVER_ROUND) if k in fit}, **self.told(server_round - 1)}

    errored: Mapping[int, str] = MappingProxyType({})  # the round's refusing nodes -> their reasons (workflow)
    max_fit: int = 0  # SecAgg+ runs: the most sites a round samples, the number its range was sized for (0: all)
    min_fit: int = 1  # the fewest real contributions (weight > 0) a round steps on: min-sites, trusted-sites

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Flower samples every connected site (fraction-fit 1); under SecAgg+ at most the `sites` the run's range
        was sized for (more values would wrap the modulus and the server would step on a wrong sum)."""
        sample, least = super().num_fit_clients(num_available_clients)
        if self.max_fit and sample > self.max_fit:
            log(WARNING, "%s sites are connected and the run is sized for %s (run config sites): each round "
                "samples %s of them, as SecAgg+'s range holds no more; start a run with sites = %s to train "
                "with all", sample, self.max_fit, self.max_fit, sample)
            sample = self.max_fit
        return sample, min(least, sample)

    def configure_fit(self, server_round, parameters, client_manager):
        ins = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = {proxy.node_id for proxy, _ in ins}
        for _, fit_ins in ins:  # what became of the last round's updates, again: a site may have missed it
            fit_ins.config.update(self.told(server_round - 1))
        return ins

    def aggregate_fit(self, server_round, results, failures):
        t = time.perf_counter()
        try:
            return self._aggregate_fit(server_round, results, failures)
        finally:
            self.timing["aggregate"] = round(time.perf_counter() - t, 4)

    def record_outcomes(self, server_round: int, failures, replied: set[int]) -> tuple[list, list, list]:
        """(refused, failed, dropped) of a round, logged and kept in `round_info`."""
        reasons = list(dict.fromkeys(failure_reason(f) for f in failures))  # SecAgg+ may repeat one
        # one refusal per refusing node (two sites may give the same words), then any the workflow did not see
        refused = [{"reason": r, "node": n} for n, r in sorted(self.errored.items())]  # node: who, for the run's end
        seen = set(self.errored.values())
        refused += [{"reason": t} for r in reasons if REFUSAL_PREFIX in r and (t := refusal_reason(r)) not in seen]
        failed = [r for r in reasons if REFUSAL_PREFIX not in r]
        dropped = sorted(self.sampled - replied - self.errored.keys())  # an error reply (a refusal) is not a dropout
        for r in failed:
            log(WARNING, "round %s: a site failed: %s", server_round, r)
        for r in refused:
            log(WARNING, "round %s: refused by %s", server_round, r["reason"])
        if dropped:
            log(WARNING, "round %s: no reply from nodes %s (dropped or refused)", server_round, dropped)
        self.round_info.update(round=server_round, failures=failed, refused=refused, dropped=dropped)
        return refused, failed, dropped

    def record_abandoned(self, server_round: int, failures, replied: set[int], reason: str) -> None:
        """A round that ended without an update (too few contributions to unmask, or SecAgg+ halted)."""
        self.round_info = {"round": server_round, "participants": [], "sites": {}}
        self.record_outcomes(server_round, failures, replied)
        self._abandon(server_round, reason)

    def _aggregate_fit(self, server_round, results, failures):
        ok = [(p, r) for p, r in results if r.num_examples > 0]
        self.round_info = {
            "round": server_round, "participants": sorted(p.node_id for p, _ in ok),
            "sites": {str(p.node_id): {k: v for k, v in recorded(r.metrics, FIT_METRICS, p.node_id).items()
                                       if isinstance(v, (int, float, str))} for p, r in results},
        }
        refused, reasons, dropped = self.record_outcomes(server_round, failures, {p.node_id for p, _ in results})
        if not ok:  # abandoned as any round without an update, so that its sites hear why
            self._abandon(server_round, "no site contributed an update (every site sampled refused, failed or sent "
                          "nothing)")  # replies of weight 0 carry no update: nothing was received
            return None, {}
        if len(ok) < self.min_fit:  # e.g. a reply of weight 0 counted among SecAgg+'s senders, or no SecAgg+ at all
            self._abandon(server_round, f"{len(ok)} site(s) contributed, fewer than {self.min_fit} (min-sites, or "
                          "trusted-sites in dp-mode 'distributed'): the round's sum is not stepped on", received=True)
            return None, {}
        if self.grid is not None:
            mean = self._distributed_step(server_round, ok)
            if mean is None:
                return None, {}
        else:
            total = sum(r.num_examples for _, r in ok)
            cache: dict[int, list[np.ndarray]] = {}
            mean = None
            for _, r in ok:  # under SecAgg+ every result carries the same (already summed) vector
                d = cache.setdefault(id(r.parameters), [np.asarray(a, np.float64) for a in parameters_to_ndarrays(r.parameters)])
                w = r.num_examples / total
                mean = [w * a for a in d] if mean is None else [m + w * a for m, a in zip(mean, d)]
        self.last_delta = mean
        full = ndarrays_to_parameters([g.astype(np.float64) + d for g, d in zip(self.global_weights, mean)])
        # FedAvgM starts its momentum at "round 1" (it asserts a momentum vector after): a resumed run or an
        # abandoned first round starts it later
        base_round = 1 if isinstance(self, FedAvgM) and not getattr(self, "momentum_vector", None) else server_round
        params, metrics = super().aggregate_fit(
            base_round, [(p, FitRes(r.status, full, r.num_examples, r.metrics)) for p, r in ok], failures)
        if params is None:
            return None, metrics
        self.global_weights = [a.astype(np.float32) for a in parameters_to_ndarrays(params)]
        if hasattr(self, "current_weights"):  # FedAdam keeps its own copy of the weights
            self.current_weights = [a.copy() for a in self.global_weights]
        if isinstance(self, FedAvgM):  # and FedAvgM its own
            self.initial_parameters = ndarrays_to_parameters(self.global_weights)
        self.round_info["status"] = "updated"
        self.outcomes[server_round] = {"status": "updated"}
        self.updated = True
        log(INFO, "%s", aggregated_line(server_round, len(ok), len(self.sampled), len(refused), dropped,
                                        len(failures), len(reasons)))
        return ndarrays_to_parameters(self.global_weights), metrics

    def _abandon(self, server_round: int, reason: str, received: bool = False) -> None:
        """`received`: abandoned after the server received the round's updates (under SecAgg+, their unmasked sum): the
        round is then said so in metrics.jsonl, the run's audit log and to the sites, whose spend for it stands."""
        said = {"status": "abandoned", "reason": reason, **({"received": True} if received else {})}
        self.round_info.update(said)
        self.outcomes[server_round] = dict(said)
        log(WARNING, "round %s abandoned: %s; the global model is unchanged%s", server_round, reason,
            " (after the server received its updates' sum: the sites' spend for it stands)" if received else "")

    def _distributed_step(self, server_round: int, ok) -> list[np.ndarray] | None:
        """Minus the consortium's noisy mean gradient, from the SecAgg+ sum of the sites' grid vectors."""
        sites = [self.round_info["sites"][str(p.node_id)] for p, _ in ok]  # recorded: checked, once
        weights = {r.num_examples for _, r in ok}
        scales = {float(m.get(GRID_SCALE, 0)) for m in sites}
        rates = {float(m.get(SAMPLE_RATE, 0)) for m in sites}
        problem = ""
        if weights != {int(self.grid.max_weight)}:
            problem = f"sites sent weights {sorted(weights)}, not max-weight {self.grid.max_weight:g}"
        elif len(scales) != 1 or len(rates) != 1 or 0 in scales or 0 in rates:
            problem = f"the sites' grids disagree (grid scales {sorted(scales)}, sample rates {sorted(rates)})"
        if problem:
            self._abandon(server_round, problem, received=True)
            return None
        try:
            total = decode_sum(parameters_to_ndarrays(ok[0][1].parameters), len(ok), self.grid)
        except GridError as e:  # a site that put other values on the grid: the round, not the run, ends
            self._abandon(server_round, str(e), received=True)
            return None
        # divided by the run's batch-size, a public number: the true expected batch (sample rate x the sites'
        # patients) would need their counts, which under DP no site sends (docs/privacy.md)
        expected_batch = float(self.expected_batch)
        gradient = total.astype(np.float64) / (scales.pop() * expected_batch)
        # the exact integer sum the step is made of, for audit (tests/test_distributed_dp.py checks it against
        # the sum of what the sites released)
        self.round_info.update(expected_batch=round(expected_batch, 1),
                               grid_sum_sha256=hashlib.sha256(total.astype("<i8").tobytes()).hexdigest())
        out, at = [], 0
        for g in self.global_weights:
            out.append(-gradient[at:at + g.size].reshape(g.shape))
            at += g.size
        return out

    def aggregate_evaluate(self, server_round, results, failures):
        """Keeps each site's own evaluation (its held-out part) for the round's metrics line."""
        # by node id, with the name each reported: the recorder files them under the sites' labels (site_labels)
        self.round_info["site_eval"] = {
            str(p.node_id): {"site": str(r.metrics.get(SITE, p.node_id)), "patients": r.num_examples, **{
                k: float(v) for k, v in recorded(r.metrics, EVALUATE_METRICS, p.node_id).items()
                if isinstance(v, (int, float))}}
            for p, r in results if r.num_examples > 0}
        summed = summed_patterns((p.node_id, recorded(r.metrics, EVALUATE_METRICS, p.node_id).get(PATTERNS),
                                  r.num_examples) for p, r in results if r.num_examples > 0)
        if summed:
            self.round_info["patterns"] = summed
        # a site with no held-out patient (too small a site, or one that refused) answers with 0 patients: it has
        # nothing to weigh in, and when no site has any, Flower's weighted loss would divide by zero and end the run
        evaluated = [(p, r) for p, r in results if r.num_examples > 0]
        return super().aggregate_evaluate(server_round, evaluated, failures)

    # FedAdam's moment estimates are strategy state: they go into every checkpoint.
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"{name}_{i}": a for name in ("m_t", "v_t", "momentum_vector")
                for i, a in enumerate(getattr(self, name, None) or [])}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for name in ("m_t", "v_t", "momentum_vector"):
            keys = sorted((k for k in arrays if k.startswith(name + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
            if keys:
                setattr(self, name, [arrays[k] for k in keys])


MAX_PATTERNS_BYTES = 1 << 16  # a site's PATTERNS text: 2^M - 1 short entries (31 for five modalities: ~1 KB)


def summed_patterns(sent) -> dict:
    """The sites' PATTERNS summed: {pattern: {"n", "right", "sites"}}. `sent`: (node id, the site's JSON
    {pattern: [patients, right]} or None, the patients it evaluated). A site's whole measurement is left out, with a
    warning naming the node, when it is not such an object of at most MAX_PATTERNS_BYTES, or an entry has a key that
    is not '+'-joined names, or counts outside 1 <= patients <= the patients it evaluated and 0 <= right <= patients
    (a site's error must not fail the run, and no site may claim more patients than it evaluated). Keys that are not
    the schema's patterns are dropped when the package is built (protocol.consortium_patterns)."""
    out: dict[str, dict] = {}
    for node, raw, evaluated in sent:
        if raw is None:
            continue
        try:
            entries = json.loads(raw) if isinstance(raw, str) and len(raw) <= MAX_PATTERNS_BYTES else None
            ok = isinstance(entries, dict) and all(
                isinstance(k, str) and k and all(k.split("+")) and isinstance(v, list) and len(v) == 2
                and all(isinstance(c, int) and not isinstance(c, bool) for c in v) and 0 <= v[1] <= v[0]
                and 1 <= v[0] <= evaluated for k, v in entries.items())
        except Exception:  # noqa: BLE001 - e.g. RecursionError on deeply nested text: the site's, not the run's
            ok = False
        if not ok:
            log(WARNING, "node %s: its modality-pattern outcomes are not {pattern: [patients, right]} within the "
                "patients it evaluated: left out", node)
            continue
        for key, (n, right) in entries.items():
            e = out.setdefault(key, {"n": 0, "right": 0, "sites": 0})
            e["n"], e["right"], e["sites"] = e["n"] + n, e["right"] + right, e["sites"] + 1
    return out


def build_strategy(cfg: RunConfig, weights: list[np.ndarray], n_sites: int, fit_config: dict, evaluate_fn=None):
    """The legacy strategy with deltas. `min_available_clients` is the per-round minimum, not the
    number of sites: the legacy sampler blocks until that many nodes are connected, so one site gone
    for good would freeze the run (the server waits for all sites once, before round 1)."""
    base = BASES[cfg.federation.strategy]
    cls = type(f"Delta{base.__name__}", (DeltaMixin, base), {})
    n_min = min(cfg.federation.min_sites, n_sites)
    kw = dict(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=n_min, min_evaluate_clients=n_min,
        min_available_clients=n_min, initial_parameters=ndarrays_to_parameters(weights), evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda rnd: {**fit_config, SERVER_ROUND: rnd},
        on_evaluate_config_fn=lambda rnd: {**fit_config, SERVER_ROUND: rnd},
        fit_metrics_aggregation_fn=lambda ms: {k: v for k in (TRAIN_LOSS,) if (v := weighted_mean(ms, k)) is not None},
        evaluate_metrics_aggregation_fn=lambda ms: {
            k: v for k in (ACCURACY, BALANCED_ACCURACY, MACRO_F1) if (v := weighted_mean(ms, k)) is not None},
    )
    if base is FedProx:
        kw["proximal_mu"] = cfg.federation.proximal_mu
    if base is FedAdam:
        # tau, Adam's floor under sqrt(v), in the units of what it steps on: in dp-mode "distributed" a mean of
        # gradients clipped to C, so that the recipe does not change with C but through the clipping
        unit = cfg.privacy.max_grad_norm if cfg.privacy.distributed else 1.0
        kw.update(eta=cfg.federation.server_lr, eta_l=cfg.training.lr, beta_1=0.9, beta_2=0.99, tau=FEDADAM_TAU * unit)
    if base is FedAvgM:
        kw.update(server_learning_rate=cfg.federation.server_lr, server_momentum=cfg.training.momentum)
    strategy = cls(**kw)
    strategy.evaluate_every, strategy.num_rounds = cfg.federation.evaluate_every, cfg.federation.num_rounds
    strategy.expected_batch = cfg.training.batch_size  # dp-mode "distributed": what the noisy sum is divided by
    strategy.max_fit = n_sites if cfg.secagg.enabled else 0  # SecAgg+'s range holds n_sites values (server.app)
    strategy.min_fit = max(n_min, cfg.privacy.trusted_sites if cfg.privacy.distributed else 0)
    strategy.init_delta(weights)
    return strategy
