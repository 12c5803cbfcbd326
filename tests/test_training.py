"""Local training loop and centralized baseline as a specification (synthetic data, tiny model, seconds)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared_models import ModelConfig, MultiModalTransformer
from shared_models.evaluation import evaluate
from shared_models.training import (
    TrainConfig,
    WarmupCosine,
    WeightedCrossEntropy,
    build_loader,
    build_loss,
    build_optimizer,
    class_counts,
    class_weights,
    fit,
    lr_multiplier,
    train_epochs,
)
from tests.factories import drop_modalities, random_inputs

TINY = ModelConfig(d_model=16, n_heads=2, n_latents=4, chunk_size=16, latent_blocks=0, tabular_blocks=0,
                   fusion_blocks=1, ff_mult=1, dropout=0.0)


def _toy(schema, n: int, seed: int = 0):
    """A learnable problem: each class shifts the omics features `expr` by its own fixed random mean."""
    x = random_inputs(schema, n, seed)
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
    expr = schema.layout().slices["expr"]
    means = torch.randn(3, expr.stop - expr.start, generator=torch.Generator().manual_seed(123))
    x[:, expr] += 0.6 * means[y]
    for i in range(0, n, 5):  # some patients lack a modality, as at a real site
        drop_modalities(schema, x, i, ["prot"])
    return x, y


def _model(schema, seed: int = 0) -> MultiModalTransformer:
    torch.manual_seed(seed)
    return MultiModalTransformer(schema, TINY)


# --- learning ------------------------------------------------------------------------------------------
def test_training_reduces_the_loss_and_beats_chance_on_held_out_rows(tiny_schema):
    x, y = _toy(tiny_schema, 480)
    model = _model(tiny_schema)
    before = evaluate(model, x[400:], y[400:])
    result = fit(model, x[:400], y[:400], TrainConfig(epochs=12, lr=3e-3, patience=None))
    after = evaluate(model, x[400:], y[400:])
    assert result.history[-1].train_loss < 0.6 * result.history[0].train_loss
    assert after.loss < before.loss
    assert after.accuracy > 0.6  # chance is about 1/3


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(tiny_schema):
    x, y = _toy(tiny_schema, 128)
    cfg = TrainConfig(epochs=2, batch_size=32)
    states = []
    for seed in (7, 7, 8):
        model = _model(tiny_schema, seed)
        fit(model, x, y, cfg.model_copy(update={"seed": seed}))
        states.append(model.state_dict())
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], atol=0, rtol=0)
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


# --- schedule ------------------------------------------------------------------------------------------
def test_warmup_is_linear_then_cosine_decays_to_the_floor():
    total, warmup = 100, 10
    assert lr_multiplier(0, total, warmup) == pytest.approx(0.1)
    assert lr_multiplier(4, total, warmup) == pytest.approx(0.5)
    assert lr_multiplier(9, total, warmup) == pytest.approx(1.0)
    assert lr_multiplier(10, total, warmup) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_multiplier(55, total, warmup) == pytest.approx(0.5)  # half-way through the decay
    assert lr_multiplier(100, total, warmup) == pytest.approx(0.0)
    assert lr_multiplier(500, total, warmup, min_fraction=0.1) == pytest.approx(0.1)  # stays at the floor
    assert lr_multiplier(0, total, 0) == pytest.approx(1.0)  # no warm-up


def _lrs_of_steps(cfg: TrainConfig, total_steps: int, first_step: int, batches: int, epochs: int) -> list[float]:
    """The learning rate of every optimizer step of one `train_epochs` call, seen from its per-step hook."""
    model = nn.Linear(2, 3)
    optimizer = build_optimizer(model, cfg)
    schedule = WarmupCosine.of(optimizer, cfg, total_steps=total_steps, first_step=first_step)
    loader = [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))] * batches
    seen = []
    train_epochs(model, loader, optimizer, F.cross_entropy, epochs=epochs, schedule=schedule,
                 after_step=lambda: seen.append(optimizer.param_groups[0]["lr"]))
    return seen


def test_the_loop_sets_the_scheduled_lr_before_every_step():
    seen = _lrs_of_steps(TrainConfig(lr=0.01, warmup_fraction=0.1), total_steps=100, first_step=0, batches=25,
                         epochs=4)  # 100 steps, 10 of warm-up
    assert len(seen) == 100
    assert seen[0] == pytest.approx(0.001)
    assert seen[9] == pytest.approx(0.01)
    assert seen[55] == pytest.approx(0.005)
    assert seen[99] < 1e-5


def test_a_later_round_continues_the_runs_one_schedule():
    cfg = TrainConfig(lr=0.01, warmup_fraction=0.1)
    whole_run = _lrs_of_steps(cfg, total_steps=100, first_step=0, batches=25, epochs=4)
    third_round = _lrs_of_steps(cfg, total_steps=100, first_step=50, batches=25, epochs=1)
    assert third_round == whole_run[50:75]  # the same floats: one schedule, however the run is cut into rounds


def test_the_loop_counts_steps_and_samples_and_averages_the_loss_per_sample():
    model = nn.Linear(2, 3)
    nn.init.zeros_(model.weight)  # every logit 0: each sample's loss is log 3
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = [(torch.ones(n, 2), torch.zeros(n, dtype=torch.int64)) for n in (4, 4, 1)]
    totals = train_epochs(model, loader, optimizer, F.cross_entropy, epochs=2)
    assert (totals.steps, totals.samples) == (6, 18)
    assert totals.mean_loss == pytest.approx(math.log(3))


# --- loss ----------------------------------------------------------------------------------------------
def test_class_weights_are_finite_and_zero_for_a_class_without_training_rows():
    counts = np.array([10, 0, 30])
    w = class_weights(counts)
    assert torch.isfinite(w).all()
    assert w[1] == 0
    assert w[0] == pytest.approx(3 * w[2])  # inverse frequency
    assert float((w * torch.tensor(counts)).sum() / counts.sum()) == pytest.approx(1.0)  # mean 1 over rows
    loss = WeightedCrossEntropy(w)(torch.randn(6, 3), torch.tensor([0, 1, 2, 1, 0, 2]))  # e.g. a validation batch
    assert torch.isfinite(loss)


def test_weighted_loss_is_a_sum_of_per_sample_terms_over_the_batch_size():
    logits, y = torch.randn(5, 3), torch.tensor([0, 2, 2, 1, 0])
    w = torch.tensor([2.0, 0.5, 1.0])
    expected = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    torch.testing.assert_close(WeightedCrossEntropy(w)(logits, y), expected)
    # dropping one sample leaves the others' terms unchanged (what DP-SGD's per-sample clipping needs)
    torch.testing.assert_close(WeightedCrossEntropy(w)(logits[1:], y[1:]) * 4, expected * 5 - w[0] * F.cross_entropy(
        logits[:1], y[:1]))
    assert WeightedCrossEntropy(w)(logits[:0], y[:0]) == 0  # an empty Poisson batch gives 0, not NaN


def test_build_loss_without_class_weighting_is_plain_cross_entropy():
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    loss = build_loss(TrainConfig(class_weighting=False))
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))


def test_softmax_over_present_classes_gives_absent_classes_no_gradient():
    # FedRS with alpha 0: a site without class 1 must neither push class 1's logit down nor up
    counts = np.array([4, 0, 6])
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 2, 2, 0, 2])
    loss = build_loss(TrainConfig(class_weighting=False, softmax_over="present"), counts)
    value = loss(logits, y)
    value.backward()
    assert torch.all(logits.grad[:, 1] == 0) and torch.all(logits.grad[:, [0, 2]] != 0)
    kept = logits.detach()[:, [0, 2]]
    torch.testing.assert_close(value, F.cross_entropy(kept, torch.tensor([0, 1, 1, 0, 1])))
    # with class weights the weights are those of the full class index
    weighted = build_loss(TrainConfig(class_weighting=True, softmax_over="present"), counts)(logits.detach(), y)
    w = class_weights(counts)
    torch.testing.assert_close(weighted, (w[y] * F.cross_entropy(kept, torch.tensor([0, 1, 1, 0, 1]),
                                                                 reduction="none")).mean())
    # still per sample: an empty batch gives 0
    assert loss(logits.detach()[:0], y[:0]) == 0


def test_softmax_over_present_classes_refuses_a_label_it_was_not_built_for():
    loss = build_loss(TrainConfig(class_weighting=False, softmax_over="present"), np.array([4, 0, 6]))
    with pytest.raises(ValueError, match=r"labels \[1\] are outside"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="need the training class counts"):
        build_loss(TrainConfig(class_weighting=False, softmax_over="present"))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_weight_decay_applies_to_linear_weights_only(tiny_schema, optimizer):
    model = _model(tiny_schema)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05, optimizer=optimizer, momentum=0.8))
    assert isinstance(opt, {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer])
    groups = opt.param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    if optimizer == "sgd":
        assert all(g["momentum"] == 0.8 for g in groups)


# --- early stopping ------------------------------------------------------------------------------------
def test_early_stopping_restores_the_best_epochs_weights(tiny_schema):
    x, y = _toy(tiny_schema, 300)
    y_val = y[200:][torch.randperm(100, generator=torch.Generator().manual_seed(0))]  # unlearnable validation
    model = _model(tiny_schema)
    snapshots = []
    result = fit(model, x[:200], y[:200], TrainConfig(epochs=40, lr=3e-3, patience=3, monitor="loss"),
                 x[200:], y_val, log=lambda r: snapshots.append(copy.deepcopy(model.state_dict())))
    val_losses = [r.val["loss"] for r in result.history]
    assert result.best_epoch == 1 + int(np.argmin(val_losses))
    assert result.epochs_run == result.best_epoch + 3 < 40  # stopped after `patience` epochs without progress
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[result.best_epoch - 1][k], atol=0, rtol=0)
    assert result.best_val.loss == pytest.approx(min(val_losses))


# --- evaluation ----------------------------------------------------------------------------------------
class _Fixed(nn.Module):
    """Returns the stored logits of the rows whose index is in column 0; records the modes it ran in."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.modes, self.batches = logits, set(), []

    def forward(self, x):
        self.modes.add(self.training)
        self.batches.append(len(x))
        return self.logits[x[:, 0].long()]


def test_evaluate_matches_scikit_learn_in_eval_mode_and_batches():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2, 0])
    y_pred = np.array([0, 1, 1, 1, 3, 2, 0, 0, 1, 2, 3, 0])  # class 3 predicted, never true; class 4 unseen
    logits = torch.randn(12, 5)
    logits[torch.arange(12), torch.tensor(y_pred)] = 10.0
    model = _Fixed(logits).train()
    x = torch.arange(12, dtype=torch.float32)[:, None]
    m = evaluate(model, x, torch.tensor(y_true), batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m.accuracy == pytest.approx(accuracy_score(y_true, y_pred))
        assert m.balanced_accuracy == pytest.approx(balanced_accuracy_score(y_true, y_pred))
        assert m.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"))
        per_class = f1_score(y_true, y_pred, average=None, labels=[0, 1, 2, 3])
    assert m.per_class_f1[:4] == pytest.approx(list(per_class)) and m.per_class_f1[4] is None
    assert m.loss == pytest.approx(float(F.cross_entropy(logits, torch.tensor(y_true))))
    assert model.modes == {False} and model.batches == [5, 5, 2]
    assert model.training  # the caller's mode is restored


# --- DP-SGD reuse --------------------------------------------------------------------------------------
def test_the_loop_runs_under_opacus_without_its_own_clipping(tiny_schema):
    from opacus import PrivacyEngine

    from shared_models.layers import register_grad_samplers

    register_grad_samplers()

    x, y = _toy(tiny_schema, 128)
    model = _model(tiny_schema)
    cfg = TrainConfig(batch_size=32, epochs=1)
    optimizer = build_optimizer(model, cfg)
    loader = build_loader(x, y, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks, optimizer, loader = PrivacyEngine(accountant="prv").make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False)
        schedule = WarmupCosine.of(optimizer, cfg, total_steps=len(loader))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        totals = train_epochs(model, loader, optimizer, build_loss(cfg, class_counts(y, 3)), schedule=schedule,
                              max_grad_norm=None)
    hooks.cleanup()
    assert math.isfinite(totals.mean_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- centralized baseline ------------------------------------------------------------------------------
def _write_cohort(root, schema, n_sites: int = 10, per_site: int = 24, seed: int = 0):
    """A pooled cohort on disk: sites (tss codes include "NA" and "02") each with a few classes."""
    codes = ["NA", "02"] + [f"S{i}" for i in range(n_sites - 2)]
    n = n_sites * per_site
    x, y = _toy(schema, n, seed)
    ids = [f"P{i:04d}" for i in range(n)]
    tss = np.repeat(codes, per_site)
    pd.DataFrame({"patient": ids, "subtype": [schema.classes[k] for k in y.tolist()], "tss": tss}).to_csv(
        root / "labels.csv", index=False)
    layout = schema.layout()
    for m in schema.modalities:
        block = x[:, layout.slices[m.name]].numpy()
        df = pd.DataFrame(block, columns=m.features)
        for f in m.categorical_columns:
            df[f] = [m.levels[f][int(v)] for v in df[f]]
        df.insert(0, "patient", ids)
        keep = ~np.isnan(block).all(axis=1)
        df[keep].to_csv(root / f"{m.name}.csv", index=False)
    return ids, tss


def test_baseline_holds_out_whole_sites_reads_NA_as_a_site_and_is_deterministic(tmp_path, tiny_schema):
    from simulations.baseline import load_cohort, split_by_group

    _write_cohort(tmp_path, tiny_schema)
    cohort = load_cohort(tmp_path, tiny_schema)
    assert {"NA", "02"} <= set(cohort.groups)
    split = split_by_group(cohort.y, cohort.groups, seed=3)
    parts = [set(cohort.groups[idx]) for idx in (split.train, split.val, split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])  # no site in two parts
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(len(cohort.ids)))
    again = split_by_group(cohort.y, cohort.groups, seed=3)
    assert np.array_equal(split.test, again.test) and np.array_equal(split.val, again.val)


def test_baseline_test_patients_are_the_partition_holdout(tmp_path, tiny_schema):
    from simulations.baseline import load_cohort, split_by_group
    from simulations.partition import choose_holdout

    _write_cohort(tmp_path, tiny_schema)
    cohort = load_cohort(tmp_path, tiny_schema)
    split = split_by_group(cohort.y, cohort.groups, seed=5, test_frac=0.2)
    held = choose_holdout(cohort.groups, cohort.y, 0.2, np.random.default_rng(5))
    assert np.array_equal(np.flatnonzero(held), split.test)


def _baseline_cli(tmp_path, schema):
    """(the `baseline` command in an app of its own, arguments for a small cohort written under tmp_path)."""
    import typer

    from simulations.cli_baseline import register

    cohort_dir = tmp_path / "cohort"
    cohort_dir.mkdir()
    _write_cohort(cohort_dir, schema)
    schema_path = schema.save(tmp_path / "schema.json")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `baseline` a named sub-command
    return app, ["baseline", "--cohort", str(cohort_dir), "--schema", str(schema_path), "--epochs", "2"]


def test_baseline_command_prints_both_models_and_writes_json(tmp_path, tiny_schema):
    from typer.testing import CliRunner

    app, args = _baseline_cli(tmp_path, tiny_schema)
    out = tmp_path / "result.json"
    res = CliRunner().invoke(app, args + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "transformer" in res.output and "logistic regression" in res.output
    result = json.loads(out.read_text())
    for model in ("transformer", "logistic"):
        assert 0 <= result[model]["test"]["macro_f1"] <= 1


def test_baseline_over_several_seeds_reports_mean_and_spread(tmp_path, tiny_schema):
    from typer.testing import CliRunner

    app, args = _baseline_cli(tmp_path, tiny_schema)
    out = tmp_path / "result.json"
    args = args + ["--only", "logistic", "--out", str(out)]
    res = CliRunner().invoke(app, args + ["--seeds", "0,1"])
    assert res.exit_code == 0, res.output
    assert "over 2 splits (seeds 0, 1)" in res.output
    result = json.loads(out.read_text())
    f1 = result["summary"]["logistic"]["macro_f1"]
    assert result["seeds"] == [0, 1] and len(f1["per_seed"]) == 2
    assert f1["mean"] == pytest.approx(np.mean(f1["per_seed"]))
    bad = CliRunner().invoke(app, args + ["--seeds", "0,x"])
    assert bad.exit_code == 2 and "--seeds 0,x" in bad.output


def test_baseline_over_seeds_gives_the_sample_sd_as_the_report_does():
    """`--seeds` printed the population sd (n) as "sd"; the experiment report gives the sample sd (n-1)."""
    from simulations.cli_baseline import format_seeds, summarize_seeds

    f1 = [0.713, 0.841, 0.697]
    runs = [{"seed": s, "logistic": {"test": {"accuracy": v, "balanced_accuracy": v, "macro_f1": v}}}
            for s, v in enumerate(f1)]
    result = summarize_seeds(runs)
    assert result["summary"]["logistic"]["macro_f1"]["sd"] == pytest.approx(np.std(f1, ddof=1))
    assert "mean +- sample sd (n-1)" in format_seeds(result)


def test_baseline_command_without_a_schema_for_a_directory_says_what_to_pass(tmp_path):
    import typer
    from typer.testing import CliRunner

    from simulations.cli_baseline import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["baseline", "--cohort", str(tmp_path)])
    assert res.exit_code == 2
    assert "--schema" in res.output
