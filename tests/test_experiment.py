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
        "cv-folds = 2", 'cv-folds = 2\n[run]\ndp-mode = "distributed"\ntrusted-sites = 2').replace("local-epochs = 1\n", "")
    assert ExperimentConfig.load(write(tmp_path, text)).grid.strategy == ["fedadam"]


def test_a_distributed_dp_grid_with_local_epochs_is_refused_before_any_cell(tmp_path):
    # dp-mode "distributed" takes no local step: [experiment] local-epochs reached every cell's run config, where the
    # run config now refuses it; checked with the cells' other values, not at the first cell's server
    text = TINY.replace('strategy = ["fedavg"]', 'strategy = ["fedadam"]').replace(
        "cv-folds = 2", 'cv-folds = 2\n[run]\ndp-mode = "distributed"\ntrusted-sites = 2')
    with pytest.raises(ExperimentError, match=r"\[experiment\] rounds = 2, local-epochs = 1\)(?s:.*)local-epochs 1 is "
                                              "not used there"):
        ExperimentConfig.load(write(tmp_path, text))


def test_grid_enumerates_every_combination_once(tmp_path):
    text = TINY.replace('strategy = ["fedavg"]', 'strategy = ["fedavg", "fedprox", "fedadam"]') \
               .replace("privacy = [8]", 'privacy = ["off", 1, 3, 8]').replace("seed = [0]", "seed = [0, 1]")
    cfg = ExperimentConfig.load(write(tmp_path, text))
    grid = cells(cfg)
    fed = [c for c in grid if c.method == "federated"]
    assert len(fed) == 3 * 4 * 2 and len(grid) == len(fed) + 4 * 2
    assert len({c.id for c in grid}) == len(grid)
    assert {c.privacy for c in fed} == {"off", "1", "3", "8"}


def test_per_data_partitions_must_cover_every_data_set_before_anything_is_written(tmp_path):
    config = write(tmp_path, TINY.replace('partition = ["dirichlet:1.0"]', 'partition = { brca = ["iid"] }'))
    with pytest.raises(ExperimentError, match="no entry for data 'synthetic'") as e:
        run_experiment(config, tmp_path / "results", log=lambda s: None)
    assert str(config) in str(e.value) and "[grid.partition]" in str(e.value)
    assert not (tmp_path / "results" / "experiment.toml").exists()


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


def test_the_research_guides_example_config_is_valid(tmp_path):
    """docs/research-guide.md's config: every cell it makes can run (its partitions too)."""
    import re

    if not (Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga_brca_pam50").is_dir():
        pytest.skip("the guide's grid reads BRCA from ../shared/data, which is absent")
    guide = (Path(__file__).resolve().parents[1] / "docs" / "research-guide.md").read_text()
    cfg = ExperimentConfig.load(write(tmp_path, re.search(r"```toml\n(.*?)```", guide, re.S).group(1)))
    assert {c.data for c in cells(cfg)} == {"pancan33", "brca", "synthetic"}


def test_demographics_read_age_in_days_as_years_and_keep_plain_strings(tmp_path):
    from simulations.experiment import _demographics

    class Schema:  # only the id column is read
        id_column = "patient"

    (tmp_path / "clinical.csv").write_text("patient,age_at_diagnosis,gender\nA,20211.0,Female\nB,,\nC,14610,male\n")
    (tmp_path / "labels.csv").write_text("patient,pam50,tss\nA,LumA,3C\nB,Basal,NA\nC,Her2,A2\n")
    age, gender, tss = _demographics(tmp_path, ["A", "B", "C"], Schema)
    assert age[0] == pytest.approx(55.33, abs=0.01) and np.isnan(age[1]) and age[2] == pytest.approx(40.0, abs=0.01)
    assert list(gender) == ["female", "", "male"] and gender.dtype.kind == "U" and tss.dtype.kind == "U"


# --- grid values that cannot run are refused before any cell --------------------------------------------------
SMALL = """
[experiment]
name = "small"
rounds = 1
local-epochs = 1

[grid]
data = ["synthetic"]
partition = ["iid"]
sites = [2]

[baselines]
methods = ["logistic"]

[synthetic]
classes = 3
patients-per-site = 30
omics-widths = [12]
tabular-columns = 0
holdout-patients = 30
"""

PANCAN = """
[experiment]
name = "pancan"

[grid]
data = ["pancan33"]
partition = ["iid"]
sites = [2]
"""


@pytest.mark.parametrize("edit, expected", [
    # the research guide's own example grid crossed data = synthetic with by:center8
    (('partition = ["iid"]', 'partition = ["iid", "by:center8"]'), "[grid] partition 'by:center8': synthetic data"),
])
def test_a_by_partition_of_synthetic_data_is_refused_by_the_config_check(tmp_path, edit, expected):
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL.replace(*edit)))
    assert str(tmp_path / "exp.toml") in str(e.value) and expected in str(e.value), str(e.value)


LABELS = "simulations/data/tcga_pancan33/labels.csv"


@pytest.mark.parametrize("edit, expected", [
    (('partition = ["iid"]', 'partition = ["by:centre8"]'), [LABELS, "has no column 'centre8'", "center8"]),
    (('partition = ["iid"]\nsites = [2]', 'partition = ["by:center8"]\nsites = [10]'),
     ["[grid] sites = 10", LABELS, "8 distinct 'center8' values"]),
    (('partition = ["iid"]\nsites = [2]', 'partition = ["dirichlet:0.05"]\nsites = [20]'),
     ["[grid] sites = 20", "[experiment] min-site-patients = 400", "8000 patients", LABELS]),
    (('sites = [2]', 'sites = [20]'), ["[grid] sites = 20", "[experiment] min-site-patients = 400", "'iid'", LABELS]),
    (('name = "pancan"', 'name = "pancan"\nholdout-column = "site"'), ["[experiment] holdout-column = 'site'", LABELS]),
])
def test_a_cohort_partition_that_cannot_be_made_is_refused_naming_the_keys_and_the_labels_file(tmp_path, edit, expected):
    text = PANCAN.replace(*edit).replace('name = "pancan"', 'name = "pancan"\nmin-site-patients = 400')
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, text))
    message = str(e.value)
    assert str(tmp_path / "exp.toml") in message and all(part in message for part in expected), message
    assert "--" not in message  # config keys, not the CLI flags of `oncofed partition`


@pytest.mark.parametrize("partition", ["iid", "dirichlet:1000"])
def test_sites_times_min_site_patients_is_checked_against_the_patients_left_after_the_hold_out(tmp_path, partition):
    """35 x 200 = 7000 is below the cohort's 7688 patients but above the 6232 the hold-out leaves at seed 0: the
    grid was accepted, an iid split gave sites of 178 and a Dirichlet cell failed naming --sites."""
    text = PANCAN.replace('partition = ["iid"]', f'partition = ["{partition}"]').replace("sites = [2]", "sites = [35]")
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, text.replace('name = "pancan"', 'name = "pancan"\nmin-site-patients = 200')))
    message = str(e.value)
    assert all(part in message for part in ["[grid] sites = 35", "seed = 0", "6232 patients besides the 1456 held out",
                                            "[experiment] min-site-patients = 200 = 7000 patients", LABELS]), message
    assert "--" not in message
    assert ExperimentConfig.load(write(tmp_path, text.replace('name = "pancan"', 'name = "pancan"\nmin-site-patients = 150')))


def test_a_cohort_dirichlet_draw_that_cannot_be_made_is_refused_naming_the_config_keys(tmp_path):
    text = PANCAN.replace('partition = ["iid"]', 'partition = ["dirichlet:0.01"]').replace("sites = [2]", "sites = [8]")
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, text.replace('name = "pancan"', 'name = "pancan"\nmin-site-patients = 700')))
    message = str(e.value)
    assert "no Dirichlet draw gives every site [experiment] min-site-patients = 700" in message, message
    assert "--" not in message


@pytest.mark.parametrize("key", ["sites = 12", "alpha = 100.0", "seed = 7", "min-site-patients = 20"])
def test_synthetic_keys_each_cell_sets_are_refused(tmp_path, key):
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL + key + "\n"))
    name = key.split(" ")[0]
    assert f"[synthetic]: ['{name}'] are set for each cell" in str(e.value), str(e.value)


def test_min_site_patients_holds_for_synthetic_dirichlet_sites(tmp_path):
    from simulations.experiment import ensure_cell_partition

    text = SMALL.replace('name = "small"', 'name = "small"\nmin-site-patients = 25').replace(
        'partition = ["iid"]', 'partition = ["dirichlet:1.0"]').replace("sites = [2]", "sites = [4]").replace(
        "patients-per-site = 30", "patients-per-site = 40")
    cfg = ExperimentConfig.load(write(tmp_path, text))
    _, _, manifest = ensure_cell_partition(cfg, cells(cfg)[0], tmp_path / "results")
    assert min(s["patients"] for s in manifest["sites"]) >= 25  # the generator's own floor alone gave a site 11


def test_a_synthetic_dirichlet_partition_no_draw_can_make_is_refused_by_the_config_check(tmp_path):
    text = SMALL.replace('name = "small"', 'name = "small"\nmin-site-patients = 25').replace(
        'partition = ["iid"]', 'partition = ["dirichlet:0.05"]').replace("sites = [2]", "sites = [5]")
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, text))
    assert ("[grid] partition 'dirichlet:0.05' with sites = 5, seed = 0" in str(e.value)
            and "[experiment] min-site-patients" in str(e.value)), str(e.value)


def test_min_site_patients_above_the_synthetic_sites_mean_is_refused(tmp_path):
    text = SMALL.replace('name = "small"', 'name = "small"\nmin-site-patients = 31')
    with pytest.raises(ExperimentError, match=r"\[experiment\] min-site-patients = 31: more than \[synthetic\] "
                                              r"patients-per-site = 30"):
        ExperimentConfig.load(write(tmp_path, text))


@pytest.mark.parametrize("edit, expected", [
    (("sites = [2]", "sites = [2]\nprivacy = [8, 8.0]"), "[grid] privacy: 8.0 is listed twice"),
    (("sites = [2]", "sites = [2]\nseed = [0, 0]"), "[grid] seed: 0 is listed twice"),
    (('partition = ["iid"]', 'partition = ["dirichlet:0.5", "dirichlet:0.50"]'),
     "[grid] partition: 'dirichlet:0.5' and 'dirichlet:0.50' are the same value"),
])
def test_equal_grid_values_are_refused(tmp_path, edit, expected):
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL.replace(*edit)))
    assert expected in str(e.value) and "results.csv" in str(e.value), str(e.value)


def test_close_epsilons_are_cells_of_their_own_named_exactly(tmp_path):
    cfg = ExperimentConfig.load(write(tmp_path, SMALL.replace("sites = [2]", "sites = [2]\nprivacy = [1, 1.0000001]")))
    fed = [c for c in cells(cfg) if c.method == "federated"]
    assert len({c.id for c in fed}) == 2
    assert sorted(float(c.privacy) for c in fed) == [1, 1.0000001]
    assert [c.privacy for c in fed][0] == "1"  # whole budgets keep their short ids (eps8, not eps8.0)


@pytest.mark.parametrize("key", ["resume = true", "deliver-only = true", 'base-dir = "/elsewhere"',
                                 'signing-key = "consortium.key"', 'signing-public-key = "consortium.pub"'])
def test_operator_run_keys_are_refused_by_name_before_any_cell(tmp_path, key):
    """They passed the check and stopped the first cell with "the server app ended without a result"."""
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL + "[run]\n" + key + "\n"))
    name = key.split(" ")[0]
    assert f"[run]: ['{name}'] are set by the grid, [experiment] or the simulation" in str(e.value), str(e.value)


def test_local_epochs_in_run_is_refused_beside_experiment_local_epochs(tmp_path):
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL + "\n[run]\nlocal-epochs = 5\n"))
    assert "[run]: ['local-epochs']" in str(e.value) and "[experiment] local-epochs" in str(e.value), str(e.value)


# --- a results directory under a changed config ----------------------------------------------------------------
def test_a_changed_config_replaces_the_old_one_while_no_cell_has_finished(tmp_path):
    out = tmp_path / "results"
    run_experiment(write(tmp_path, SMALL), out, log=lambda s: None, only="^nothing$")
    changed = write(tmp_path, SMALL.replace("holdout-patients = 30", "holdout-patients = 40"))
    run_experiment(changed, out, log=lambda s: None, only="^nothing$")
    assert (out / "experiment.toml").read_text() == changed.read_text()


def test_the_changed_config_refusal_names_a_fix_that_works(tmp_path):
    out = tmp_path / "results"
    run_experiment(write(tmp_path, SMALL), out, log=lambda s: None, only="logistic$")  # one finished cell
    changed = write(tmp_path, SMALL.replace("holdout-patients = 30", "holdout-patients = 40"))
    with pytest.raises(ExperimentError, match=r"\[synthetic\] differ") as e:
        run_experiment(changed, out, log=lambda s: None, only="^nothing$")
    assert f"delete {out / 'cells'}" in str(e.value)
    import shutil

    shutil.rmtree(out / "cells")  # the fix the message gives
    run_experiment(changed, out, log=lambda s: None, only="^nothing$")
    assert (out / "experiment.toml").read_text() == changed.read_text()


@pytest.mark.parametrize("config, change, made_with", [
    ("synthetic", ("holdout-patients = 30", "holdout-patients = 40"), lambda m: m["holdout"]["patients"] == 40),
    ("cohort", ('name = "pancan"', 'name = "pancan"\nholdout-frac = 0.1'),
     lambda m: m["method"]["holdout_frac"] == 0.1)])
def test_a_partition_is_not_reused_under_other_settings_that_shape_it(tmp_path, config, change, made_with):
    from simulations.experiment import ensure_cell_partition

    text = SMALL if config == "synthetic" else PANCAN
    first = ExperimentConfig.load(write(tmp_path, text))
    ensure_cell_partition(first, cells(first)[0], tmp_path / "results")
    other = ExperimentConfig.load(write(tmp_path, text.replace(*change)))
    _, _, manifest = ensure_cell_partition(other, cells(other)[0], tmp_path / "results")
    assert made_with(manifest)


# --- baselines --------------------------------------------------------------------------------------------
def test_transformer_baselines_train_the_model_a_no_dp_cell_resolves(tmp_path):
    from privacy.run_config import load_run_config
    from shared_models.schema import FeatureSchema
    from simulations.experiment import _site_sets, ensure_cell_partition, train_transformer

    cfg = ExperimentConfig.load(write(tmp_path, SMALL))
    fed, schema_path, manifest = ensure_cell_partition(cfg, cells(cfg)[0], tmp_path / "results")
    schema = FeatureSchema.load(schema_path)
    sites, _ = _site_sets(schema, fed, manifest)
    model = train_transformer(schema, sites["site_00"], cfg, seed=0)
    no_dp_cell = load_run_config({**cfg.run_config(), "dp": False}).model  # as a privacy = "off" cell resolves it
    assert model.config.modality_dropout == no_dp_cell.modality_dropout == 0.25  # not the DP recipe's 0.0


def test_a_transformer_baseline_records_the_recipe_it_trained(tmp_path):
    from simulations.experiment import run_cell

    cfg = ExperimentConfig.load(write(tmp_path, SMALL.replace('methods = ["logistic"]', 'methods = ["pooled"]')))
    cell = next(c for c in cells(cfg) if c.method == "pooled")
    run_cell(cfg, cell, tmp_path / "results", log=lambda s: None)
    done = json.loads((tmp_path / "results" / "cells" / cell.id / "rows.json").read_text())
    assert done["model"]["recipe"].startswith("no-dp") and done["model"]["modality-dropout"] == 0.25


def test_local_logistic_gives_a_site_of_one_class_the_classifier_of_that_class(tmp_path):
    from simulations.experiment import ensure_cell_partition, run_cell

    text = SMALL.replace('partition = ["iid"]', 'partition = ["dirichlet:0.05"]').replace("sites = [2]", "sites = [4]") \
                .replace('methods = ["logistic"]', 'methods = ["local-logistic"]') \
                .replace("patients-per-site = 30", "patients-per-site = 60").replace("holdout-patients = 30",
                                                                                      "holdout-patients = 60")
    cfg = ExperimentConfig.load(write(tmp_path, text))
    cell = next(c for c in cells(cfg) if c.method == "local-logistic")
    _, _, manifest = ensure_cell_partition(cfg, cell, tmp_path / "results")
    lone = [s["name"] for s in manifest["sites"] if sum(1 for n in s["class_counts"].values() if n) == 1]
    assert lone, "the partition should give some site a single class"
    rows = {r["site"]: r for r in run_cell(cfg, cell, tmp_path / "results", log=lambda s: None)}
    assert set(rows) == {s["name"] for s in manifest["sites"]}
    # the held-out site is balanced over 3 classes: always answering one class is right for a third of it
    assert rows[lone[0]]["accuracy"] == pytest.approx(1 / 3) and rows[lone[0]]["macro_f1"] == pytest.approx(1 / 6)


# --- the command line -----------------------------------------------------------------------------------------
def oncofed(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "oncofed", *args], capture_output=True, text=True, timeout=120)


def test_cli_names_only_when_it_is_not_a_regular_expression(tmp_path):
    res = oncofed("experiment", str(write(tmp_path, SMALL)), "--out", str(tmp_path / "results"), "--only", "(")
    assert res.returncode == 2 and "--only '(': not a regular expression" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "results").exists()


def test_cli_names_out_when_it_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    res = oncofed("experiment", str(write(tmp_path, SMALL)), "--out", str(tmp_path / "afile"))
    assert res.returncode == 2 and f"--out {tmp_path / 'afile'}: is a file" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_cell_whose_sites_all_refused_says_so_and_where_their_reasons_are(tmp_path):
    from simulations.experiment import why_no_model

    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "metrics.jsonl").write_text(json.dumps({
        "round": 1, "participants": [], "status": "abandoned",
        "refused": [{"reason": "site_00: its data failed validation"}, {"reason": "site_01: its data failed "
                                                                                  "validation"}]}) + "\n")
    why = why_no_model(tmp_path)
    assert "no round of 1 aggregated" in why and "site_00: its data failed validation" in why
    assert str(tmp_path / "flower" / "flwr-run.log") in why and "fewer [grid] sites" in why


def test_an_only_that_matches_no_cell_says_so_and_names_the_ids(tmp_path):
    said: list[str] = []
    run_experiment(write(tmp_path, SMALL), tmp_path / "results", log=said.append, only="fedavgg")
    note = next(s for s in said if s.startswith("--only"))
    assert "'fedavgg' matches none of the" in note and "-fedavg-" in note, said


def test_a_pooled_cv_cell_is_reported_as_cross_validated_not_held_out(tmp_path):
    said: list[str] = []
    text = SMALL.replace('methods = ["logistic"]', 'methods = ["pooled-cv"]\ncv-folds = 2')
    run_experiment(write(tmp_path, text), tmp_path / "results", log=said.append, only="pooled-cv$")
    done = next(s for s in said if "pooled-cv:" in s)
    assert "cross-validated macro-F1 (inside the pool)" in done and "held-out" not in done, said


def test_a_misspelt_key_is_refused_with_the_keys_its_section_has(tmp_path):
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL.replace("[grid]\n", "[grid]\nstrategies = [\"fedavg\"]\n")
                                    .replace("[baselines]", "[baseline]")))
    message = str(e.value)
    assert "grid.strategies: Extra inputs are not permitted (a misspelling? [grid] has: data, strategy," in message
    assert "baseline: Extra inputs are not permitted (a misspelling? the config has: experiment, grid, baselines" \
        in message, message


def test_a_misspelt_synthetic_key_is_refused_with_the_generators_keys(tmp_path):
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, SMALL.replace("classes = 3", "classs = 3")))
    message = str(e.value)
    assert "[synthetic]: got an unexpected keyword argument 'classs'" in message
    assert "classes, patients-per-site, omics-widths" in message and "min-site-patients" not in message, message


def test_an_out_directory_another_tool_wrote_is_refused_before_anything_is_written(tmp_path):
    """`experiment --out` took any existing directory (a simulate --out) and wrote its cells among its files."""
    other = tmp_path / "a-simulate-run"
    (other / "server").mkdir(parents=True)
    (other / "summary.json").write_text("{}")
    with pytest.raises(ExperimentError, match="no experiment.toml, so it is not an experiment's results directory"):
        run_experiment(write(tmp_path, SMALL), other, log=lambda s: None, only="nothing")
    assert sorted(p.name for p in other.iterdir()) == ["server", "summary.json"]
    empty = tmp_path / "empty"
    (empty / "lost+found").mkdir(parents=True)  # an empty directory (a fresh file system's) is a new results directory
    (empty / ".keep").write_text("")
    run_experiment(write(tmp_path, SMALL), empty, log=lambda s: None, only="nothing")
    assert (empty / "experiment.toml").is_file()


def test_ctrl_c_says_the_finished_cells_are_kept_and_how_to_resume(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import simulations.experiment as experiment
    import simulations.federation as federation
    from oncofed.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    monkeypatch.setattr(federation, "terminate_as_exit", lambda: None)  # not this test process's signal handlers
    r = CliRunner().invoke(app, ["experiment", str(write(tmp_path, SMALL)), "--out", str(tmp_path / "out")])
    assert r.exit_code == 130 and "run the same command again to resume" in r.output, r.output


def test_sigterm_says_the_finished_cells_are_kept_and_how_to_resume(tmp_path, monkeypatch):
    """`timeout` or a closed terminal stopped the grid without a word (only Ctrl-C was answered)."""
    import os
    import signal

    from typer.testing import CliRunner

    import simulations.experiment as experiment
    from oncofed.cli import app

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler `oncofed experiment` installs raises here
    monkeypatch.setattr(experiment, "run_experiment", terminated)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        r = CliRunner().invoke(app, ["experiment", str(write(tmp_path, SMALL)), "--out", str(tmp_path / "out")])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert r.exit_code == 128 + signal.SIGTERM and "run the same command again to resume" in r.output, r.output


@pytest.mark.parametrize("damage", ['{"seconds": 1.0, "rows": [{"cell": "x"', '{"seconds": 1.0, "rows": 3}'])
def test_a_damaged_rows_json_is_named_and_its_cell_runs_again(tmp_path, damage):
    """A cut-short or edited rows.json counted as done and then stopped the grid with a bare JSONDecodeError."""
    config, out = write(tmp_path, SMALL), tmp_path / "results"
    run_experiment(config, out, log=lambda s: None, only="logistic$")
    done = next(out.glob("cells/*-logistic/rows.json"))
    rows = json.loads(done.read_text())["rows"]
    done.write_text(damage)
    said: list[str] = []
    run_experiment(config, out, log=said.append, only="logistic$")
    assert any(str(done) in s and "the cell is not done; it runs again" in s for s in said), said
    assert [r["site"] for r in json.loads(done.read_text())["rows"]] == [r["site"] for r in rows]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == len(rows)


@pytest.mark.parametrize("table", ["sites = { synthetic = [2], synthtic = [5] }",
                                   'partition = { synthetic = ["iid"], synthtic = ["iid"] }'])
def test_a_per_data_table_naming_a_data_set_not_in_the_grid_is_refused(tmp_path, table):
    """`sites = { synthetic = [3], synthtic = [5] }` ran with the misspelt entry ignored."""
    field = table.split(" ")[0]
    text = SMALL.replace(f"{field} = " + ('["iid"]' if field == "partition" else "[2]"), table)
    with pytest.raises(ExperimentError) as e:
        ExperimentConfig.load(write(tmp_path, text))
    assert f"[grid.{field}] synthtic: not among [grid] data (synthetic)" in str(e.value), str(e.value)


def test_settings_no_cell_reads_are_named_when_the_grid_starts(tmp_path):
    text = SMALL.replace('name = "small"', 'name = "small"\nholdout-column = "tss"').replace(
        'methods = ["logistic"]', 'methods = ["logistic"]\ncv-folds = 3')
    said: list[str] = []
    run_experiment(write(tmp_path, text), tmp_path / "results", log=said.append, only="nothing")
    assert "note: [experiment] holdout-column: unused, the grid has only synthetic data" in said[0], said
    assert "note: [baselines] cv-folds: unused, [baselines] methods has no pooled-cv" in said, said
    said.clear()
    run_experiment(write(tmp_path, SMALL), tmp_path / "other", log=said.append, only="nothing")
    assert not any("unused" in s for s in said), said
