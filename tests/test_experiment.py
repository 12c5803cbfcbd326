"""`oncofed experiment`: config checks, the grid, and one real (tiny) grid through Flower's simulation engine."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from simulations.experiment import COLUMNS, ExperimentConfig, ExperimentError, cells, run_experiment

TINY = """
[experiment]
name = "tiny"
rounds = 2
local-epochs = 1

[grid]
data = ["synthetic"]
strategy = ["fedavg"]
privacy = [8]
sites = [2]
partition = ["dirichlet:1.0"]
seed = [0]

[baselines]
methods = ["pooled", "pooled-cv", "local", "logistic"]
cv-folds = 2

[synthetic]
classes = 3
patients-per-site = 60
omics-widths = [120, 30]
holdout-patients = 90
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("edit, expected", [
    (("privacy = [8]", "privacy = [0]"), "grid.privacy"),
    (("privacy = [8]", 'privacy = ["none"]'), '"off" or a per-site epsilon in (0, 100]'),
    (("privacy = [8]", "privacy = [1000]"), "the largest budget a site's accounting verifies"),
    (('partition = ["dirichlet:1.0"]', 'partition = ["dirichlet:-1"]'), "dirichlet:0.5"),
    (('strategy = ["fedavg"]', 'strategy = ["fedsgd"]'), "grid.strategy"),
    (('data = ["synthetic"]', 'data = ["lung"]'), "unknown data set 'lung'"),
    (("rounds = 2", "rounds = 2\nround = 3"), "experiment.round"),
    (("cv-folds = 2", "cv-folds = 2\n[run]\nnum-rounds = 3"), "set by the grid"),
    (("cv-folds = 2", "cv-folds = 2\n[run]\nlr = -1"), "lr"),
    (("classes = 3", "classes = 1"), "classes must be at least 2"),
    (("cv-folds = 2", 'cv-folds = 2\n[run]\nlocal-softmax = "site"'), "with privacy = 8"),  # refused with DP
    # each cell's strategy and sites count too: fedprox with mu 0 is FedAvg, trusted-sites above the cell's sites
    (('strategy = ["fedavg"]', 'strategy = ["fedavg", "fedprox"]\n'), "strategy = 'fedprox'"),
])
def test_bad_config_names_the_key(tmp_path, edit, expected):
    old, new = edit
    assert old in TINY
    text = TINY.replace(old, new)
    if "fedprox" in new:
        text = text.replace("cv-folds = 2", "cv-folds = 2\n[run]\nproximal-mu = 0")
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, text))
    assert str(tmp_path / "exp.toml") in str(e.value) and expected in str(e.value), str(e.value)


def test_run_keys_are_checked_as_each_privacy_level_runs_them(tmp_path):
    # a softmax over each site's own types is refused with DP only: fine in a grid without DP
    text = TINY.replace("privacy = [8]", 'privacy = ["off"]').replace("cv-folds = 2", 'cv-folds = 2\n[run]\nlocal-softmax = "site"')
    assert ExperimentConfig.load(write(tmp_path, text)).run == {"local-softmax": "site"}


def test_a_distributed_dp_grid_is_checked_with_the_cells_server_optimizer(tmp_path):
    text = TINY.replace('strategy = ["fedavg"]', 'strategy = ["fedadam"]').replace(
        "cv-folds = 2", 'cv-folds = 2\n[run]\ndp-mode = "distributed"\ntrusted-sites = 2')
    assert ExperimentConfig.load(write(tmp_path, text)).grid.strategy == ["fedadam"]


def test_grid_enumerates_every_combination_once(tmp_path):
    text = TINY.replace('strategy = ["fedavg"]', 'strategy = ["fedavg", "fedprox", "fedadam"]') \
               .replace("privacy = [8]", 'privacy = ["off", 1, 3, 8]').replace("seed = [0]", "seed = [0, 1]")
    cfg = ExperimentConfig.load(write(tmp_path, text))
    grid = cells(cfg)
    fed = [c for c in grid if c.method == "federated"]
    assert len(fed) == 3 * 4 * 2 and len(grid) == len(fed) + 4 * 2
    assert len({c.id for c in grid}) == len(grid)
    assert {c.privacy for c in fed} == {"off", "1", "3", "8"}


def test_per_data_partitions_must_cover_every_data_set(tmp_path):
    text = TINY.replace('partition = ["dirichlet:1.0"]', 'partition = { brca = ["iid"] }')
    with pytest.raises(ExperimentError, match="no entry for data 'synthetic'"):
        cells(ExperimentConfig.load(write(tmp_path, text)))


@pytest.mark.slow
def test_tiny_grid_runs_writes_tidy_rows_and_resumes(tmp_path):
    config, out = write(tmp_path, TINY), tmp_path / "results"
    run_experiment(config, out, log=lambda s: None)
    rows = json.loads((out / "results.json").read_text())["rows"]
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and list(table[0]) == COLUMNS

    fed = [r for r in rows if r["method"] == "federated"]
    for rnd in (1, 2):
        sites = {r["site"]: r for r in fed if r["round"] == rnd}
        assert {"held-out", "global", "site_00", "site_01"} <= set(sites)
        assert sites["held-out"]["patients"] == 90 and 0 <= sites["held-out"]["macro_f1"] <= 1
        for s in ("site_00", "site_01"):  # each site's own evaluation and its cumulative spend
            assert 0 < sites[s]["epsilon_spent"] <= 8.0
    last = {r["site"]: r for r in fed if r["round"] == 2}
    first = {r["site"]: r for r in fed if r["round"] == 1}
    assert last["site_00"]["epsilon_spent"] > first["site_00"]["epsilon_spent"]

    by_method = {m: [r for r in rows if r["method"] == m] for m in ("pooled", "pooled-cv", "local", "logistic")}
    assert [r["site"] for r in by_method["pooled"]] == ["held-out"]
    assert [r["site"] for r in by_method["pooled-cv"]] == ["fold-0", "fold-1", "mean"]
    assert sorted(r["site"] for r in by_method["local"]) == ["site_00", "site_01"]
    assert all(r["patients"] == 90 for r in by_method["local"] + by_method["logistic"])

    cell = next(out.glob("cells/*fedavg-eps8"))
    pred = np.load(cell / "predictions.npz")
    held = pred["split"] == "held-out"
    assert held.sum() == 90 and (~held).sum() > 0  # site patients sampled for the 2-D map
    pred = np.load(cell / "predictions.npz", allow_pickle=False)  # plain arrays: no pickled objects
    assert {pred[k].dtype.kind for k in ("split", "site", "gender", "classes")} == {"U"}
    assert pred["proba"].shape == (len(pred["y"]), 3) and np.allclose(pred["proba"].sum(1), 1, atol=1e-4)
    final = json.loads((cell / "final.json").read_text())
    # The final held-out row of the grid is the delivered model's score, which final.json recomputes.
    assert final["held_out"]["macro_f1"] == pytest.approx(last["held-out"]["macro_f1"], abs=1e-6)
    assert set(final["modality_ablation"]) == set(pred["modalities"])
    # accuracy per modality pattern on the held-out patients (the others masked): every modality alone at least
    assert {m for m in pred["modalities"]} <= set(final["modality_patterns"])
    assert all(e["patients"] >= 30 and 0 <= e["accuracy"] <= 1 for e in final["modality_patterns"].values())

    # Resume: finished cells are skipped; an unfinished one (no rows.json) is run again from scratch.
    (out / "cells" / "synthetic-dirichlet_1.0-2-s0-logistic" / "rows.json").unlink()
    (out / "cells" / "synthetic-dirichlet_1.0-2-s0-logistic" / "partial.tmp").write_text("left by a crash")
    said: list[str] = []
    run_experiment(config, out, log=said.append)
    skipped = [s for s in said if "skipped" in s]
    assert len(skipped) == 4 and any("logistic: held-out macro-F1" in s for s in said)
    assert not (out / "cells" / "synthetic-dirichlet_1.0-2-s0-logistic" / "partial.tmp").exists()
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [{**r, "seconds": None} for r in again] == [{**r, "seconds": None} for r in rows]  # same split, same fit

    # another configuration beside the grid: its finished cells would be skipped by their ids and mixed in
    kept = (out / "experiment.toml").read_text()
    other = tmp_path / "other" / "exp.toml"
    other.parent.mkdir()
    other.write_text(config.read_text().replace("classes = 3", "classes = 5"))
    with pytest.raises(ExperimentError, match=r"\[synthetic\] differ from .*results would mix two configurations"):
        run_experiment(other, out, log=lambda s: None)
    assert (out / "experiment.toml").read_text() == kept


EXPERIMENTS = Path(__file__).resolve().parents[1] / "simulations" / "experiments"


def test_committed_strategy_grid_is_valid():
    cfg = ExperimentConfig.load(EXPERIMENTS / "strategies.toml")
    assert {c.strategy for c in cells(cfg)} >= {"fedavg", "fedprox", "fedadam"}


def test_committed_real_study_is_valid():
    brca = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga_brca_pam50"
    if not brca.is_dir():
        pytest.skip(f"the real-data study reads BRCA from {brca}, which is absent (../shared/data not beside the "
                    "checkout)")
    cfg = ExperimentConfig.load(EXPERIMENTS / "real-study.toml")
    grid = cells(cfg)
    assert {c.data for c in grid} == {"pancan33", "brca"}
    assert {c.method for c in grid} == {"federated", "pooled", "pooled-cv", "local", "logistic"}


def test_demographics_read_age_in_days_as_years_and_keep_plain_strings(tmp_path):
    from simulations.experiment import _demographics

    class Schema:  # only the id column is read
        id_column = "patient"

    (tmp_path / "clinical.csv").write_text("patient,age_at_diagnosis,gender\nA,20211.0,Female\nB,,\nC,14610,male\n")
    (tmp_path / "labels.csv").write_text("patient,pam50,tss\nA,LumA,3C\nB,Basal,NA\nC,Her2,A2\n")
    age, gender, tss = _demographics(tmp_path, ["A", "B", "C"], Schema)
    assert age[0] == pytest.approx(55.33, abs=0.01) and np.isnan(age[1]) and age[2] == pytest.approx(40.0, abs=0.01)
    assert list(gender) == ["female", "", "male"] and gender.dtype.kind == "U" and tss.dtype.kind == "U"
