"""Under DP nothing a site sends depends on how many patients it trains on.

Each site's ledger accounts its epsilon for adding or removing one patient (Opacus' accountant). That
guarantee holds only if the two neighbouring datasets give the same distribution of everything sent: a
count sent in the clear (a FedAvg weight, a metric), or a sample rate, a step count, a noise multiplier or a
divisor derived from it, tells them apart with certainty. Here one site trains a round on its data and on
the same data less one training patient, through the ClientApp's own train handler: what Flower would carry
to the server is compared, field by field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitins_to_recorddict, recorddict_to_fitres

from shared_models.protocol import (AUDIT_HEAD, LOCAL_VAL_ACCURACY, LOCAL_VAL_MACRO_F1, ROUND_SECONDS, RUN_KEY,
                                    SECAGG_MASKS, SECAGG_MAX_WEIGHT, SERVER_ROUND, TRAIN_SECONDS)
from privacy.secagg_masks import VERSION
from tests.factories import in_secagg, site_message

# What may differ between the two: the seconds (a side channel docs/privacy.md names), the audit chain's hash
# (it covers the site's own log, which records its count), the trained model's scores on the held-out part
# (a function of the DP update and of patients DP does not cover; the same here, as no held-out patient changes)
MAY_DIFFER = {TRAIN_SECONDS, ROUND_SECONDS, AUDIT_HEAD, LOCAL_VAL_ACCURACY, LOCAL_VAL_MACRO_F1}


def _reply(tmp: Path, site: str, tables, run: dict, weights):
    from client.app import train
    from tests.sitefixtures import write_site

    write_site(tmp / site, tables)
    state = RecordDict()
    state.config_records[RECORD_KEY_STATE] = ConfigRecord({  # what Flower's SecAgg+ setup stage leaves in the state
        "clipping_range": 1.0, "target_range": 2 ** 30, "mod_range": 2 ** 32, "max_weight": 2000.0,
        "public_keys_dict:K": [1, 2, 3]})
    context = Context(run_id=1, node_id=1, state=state, run_config=run, node_config={
        "data-path": str(tmp / site), "state-dir": str(tmp / f"{site}-state"), "privacy-budget": 8.0,
        "max-trusted-sites": 3, "require-secagg": False, "site-name": "St Mary"})
    fit = FitIns(ndarrays_to_parameters(weights), {SERVER_ROUND: 1, RUN_KEY: "run-X", SECAGG_MAX_WEIGHT: 2000.0,
                                                   SECAGG_MASKS: VERSION})
    reply = train(site_message(in_secagg(fitins_to_recorddict(fit, keep_input=True))), context)
    assert not reply.has_error(), reply.error
    return recorddict_to_fitres(reply.content, keep_input=True)


@pytest.mark.parametrize("mode", [
    {"dp-mode": "site", "strategy": "fedavg"},
    {"dp-mode": "distributed", "strategy": "fedavgm", "trusted-sites": 3, "sites": 3}])
def test_what_a_dp_site_sends_is_the_same_with_one_training_patient_less(tmp_path, mode, monkeypatch):
    from client.site import held_out_split
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables

    schema = site_schema()
    run = {"schema": str(schema.save(tmp_path / "schema.json")), "num-rounds": 3, "d-model": 32, "min-sites": 2,
           "sample-rate": 0.5, "epsilon": 8.0, **mode}
    full = site_tables(n_per_class=20)
    train_rows, _ = held_out_split(list(full["labels"]["patient"]), 0.2, 0)
    gone = full["labels"]["patient"].iloc[int(train_rows[0])]  # a training patient
    less = {k: df[df["patient"] != gone].reset_index(drop=True) for k, df in full.items()}
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(run).model))

    replies = []
    for name, tables in (("a", full), ("b", less)):  # one site in two worlds: two machines, two indexes of ledgers
        monkeypatch.setenv("ONCOFED_LEDGER_INDEX", str(tmp_path / f"{name}-index.json"))
        replies.append(_reply(tmp_path, name, tables, run, weights))
    a, b = replies
    # the FedAvg weight: batch-size / sample-rate in site mode ("auto": 0.5 x 640 / 0.5, the recipe's public patient
    # count), max-weight on the distributed grid
    assert a.num_examples == b.num_examples == (640 if mode["dp-mode"] == "site" else 2000)
    assert set(a.metrics) == set(b.metrics) and "patients" not in a.metrics
    same = sorted(set(a.metrics) - MAY_DIFFER)
    assert {k: a.metrics[k] for k in same} == {k: b.metrics[k] for k in same}, same
    assert {"epsilon", "noise_multiplier", "sample_rate", "local_steps"} <= set(same)
    n = len(train_rows)
    assert not {n, n - 1} & {v for v in a.metrics.values() if isinstance(v, (int, float))}
    # nor is it in the audit entry whose hash is sent (AUDIT_HEAD): every other field is known to the server
    import json

    for site in ("a", "b"):
        trained = [json.loads(line) for line in (tmp_path / f"{site}-state" / "audit.jsonl").read_text().splitlines()
                   if '"round_trained"' in line]
        assert trained and not any("patients" in e for e in trained)
    # the site's own ledgers hold the same plan: sample rate, steps and noise from the run config alone
    plans = []
    for site in ("a", "b"):
        runs = json.loads((tmp_path / f"{site}-state" / "privacy-ledger.json").read_text())["runs"]
        (plan,) = [{k: v for k, v in r.items() if k in ("noise_multiplier", "sample_rate", "steps_per_round")}
                   for key, r in runs.items() if key.endswith(":run-X")]
        plans.append(plan)
    assert plans[0] == plans[1] and len(plans[0]) == 3
