"""The run config's epsilon bound has one home: the privacy layer's entry point, which product code reads run
configs through; the contract layer cannot be called without saying which bound applies."""

from __future__ import annotations

import re

import pytest

from privacy import MAX_BUDGET
from privacy.run_config import load_run_config, parse_run_overrides
from shared_models.run_config import RunConfig, RunConfigError, parse_overrides

LIMIT = re.escape(f"{MAX_BUDGET:g}")


def test_the_entry_point_refuses_an_epsilon_above_what_the_sites_accounting_verifies():
    with pytest.raises(RunConfigError, match=rf"^study.toml: .*\n  - epsilon: Input should be less than or equal to "
                                             rf"{LIMIT} \(got {re.escape(f'{MAX_BUDGET + 0.5!r}')}\).*at most {LIMIT} "
                                             r"\(privacy.MAX_BUDGET\)"):
        load_run_config({"schema": "s.json", "epsilon": MAX_BUDGET + 0.5}, source="study.toml")
    assert load_run_config({"schema": "s.json", "epsilon": MAX_BUDGET}).privacy.epsilon == MAX_BUDGET


def test_a_delta_that_would_allow_releasing_a_record_whole_is_refused_naming_the_key():
    # a review found delta 0.5 accepted, and a site without its own privacy-delta pinning its ledger to it
    from privacy.run_config import load_run_config

    assert load_run_config({"schema": "s.json", "delta": 1e-4}).privacy.delta == 1e-4
    with pytest.raises(RunConfigError, match=r"delta: Input should be less than or equal to 0.0001 \(got 0.5\)"):
        load_run_config({"schema": "s.json", "delta": 0.5})


def test_dp_without_a_held_out_part_is_refused_at_the_start():
    # every DP site fits its normalisation on half its held-out part: with val-fraction 0 each would refuse every
    # round, and the operator would be told that every hospital's data failed validation
    from privacy.run_config import load_run_config

    with pytest.raises(RunConfigError, match="val-fraction 0 with dp"):
        load_run_config({"schema": "s.json", "val-fraction": 0})
    assert load_run_config({"schema": "s.json", "val-fraction": 0, "dp": False}).site.val_fraction == 0


def test_the_overrides_entry_point_refuses_an_epsilon_above_the_limit_and_says_why():
    with pytest.raises(RunConfigError, match=rf"(?s)^--set: .*epsilon: Input should be less than or equal to {LIMIT} .*"
                                             rf"at most {LIMIT} .*what the site's accounting verifies"):
        parse_run_overrides(["epsilon=1000"])
    assert parse_run_overrides([f"epsilon={MAX_BUDGET}"]) == {"epsilon": MAX_BUDGET}


def test_the_contract_cannot_be_called_without_saying_which_bound_applies():
    with pytest.raises(TypeError, match="max_epsilon"):
        RunConfig.from_flower({"schema": "s.json"})  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_epsilon"):
        parse_overrides(["epsilon=8"])  # type: ignore[call-arg]


def test_max_epsilon_none_is_an_explicit_no_bound():
    assert RunConfig.from_flower({"schema": "s.json", "epsilon": 1000.0}, max_epsilon=None).privacy.epsilon == 1000.0
    assert parse_overrides(["epsilon=1000"], max_epsilon=None) == {"epsilon": 1000}


# --- one typed, nested run config; every default defined once --------------------------------------------------
def test_pyproject_lists_exactly_the_typed_defaults():
    """`[tool.flwr.app.config]` is generated from the typed config (`python -m shared_models.run_config`): a
    default changed in one place and not the other fails here."""
    import tomllib
    from pathlib import Path

    from shared_models.run_config import APP_SCHEMA, app_defaults, defaults, pyproject_block

    root = Path(__file__).resolve().parents[1]
    assert app_defaults(root) == {**defaults(), "schema": APP_SCHEMA}
    text = (root / "pyproject.toml").read_text()
    assert pyproject_block() in text, "pyproject.toml's [tool.flwr.app.config]: regenerate it with " \
                                      "python -m shared_models.run_config"
    assert tomllib.loads(pyproject_block())["tool"]["flwr"]["app"]["config"] == app_defaults(root)


def test_the_flat_keys_fill_typed_sections_and_the_model_is_built_from_its_section_as_it_is():
    from shared_models.run_config import ModelConfig

    cfg = load_run_config({"schema": "s.json", "d-model": 32, "num-rounds": 3, "secagg": False, "dp-mode": "site",
                           "min-count": 7, "local-optimizer": "adamw"})
    assert (cfg.model.d_model, cfg.federation.num_rounds, cfg.secagg.enabled, cfg.site.min_count,
            cfg.training.optimizer) == (32, 3, False, 7, "adamw")
    assert isinstance(cfg.model, ModelConfig) and cfg.model == ModelConfig(d_model=32, modality_dropout=0.0,
                                                                           fusion_blocks=1)  # DP's
    assert load_run_config(cfg.flat()) == cfg  # the flat view reads back as the same config
    assert load_run_config(cfg.model_dump(by_alias=True)) == cfg  # and so does the nested form


def test_the_dp_and_no_dp_recipes_are_named_presets_a_deployment_and_a_simulation_both_get():
    from shared_models.run_config import RECIPES, ModelConfig

    def training(**values):
        t = load_run_config({"schema": "s.json", **values}).training
        return t.optimizer, t.lr, t.batch_size

    def bound(**values):
        return load_run_config({"schema": "s.json", **values}).privacy.max_grad_norm

    assert training() == ("sgd", RECIPES["dp"].lr["sgd"], 192) == ("sgd", 100.0, round(0.3 * RECIPES["dp"].patients))
    # the clipping bound: the recipe's in dp-mode 'site', its own in 'distributed', 1.0 without DP; a number wins
    assert (bound(), bound(**{"local-optimizer": "adamw"}), bound(dp=False)) == (0.01, 1.0, 1.0)
    assert bound(**{"dp-mode": "distributed", "strategy": "fedadam"}) == 0.1

    # fusion-blocks: the recipe's in dp-mode 'site' (chosen on the validation parts), 2 without DP and in
    # 'distributed' (the model its recipe was chosen on); a number wins; a model built outside a run has 2
    def blocks(**values):
        return load_run_config({"schema": "s.json", **values}).model.fusion_block_count

    assert (blocks(), blocks(dp=False), blocks(**{"dp-mode": "distributed", "strategy": "fedadam"})) == (
        RECIPES["dp"].fusion_blocks, 2, 2) == (1, 2, 2)
    assert blocks(**{"fusion-blocks": 3}) == 3 and ModelConfig().fusion_block_count == 2

    def dropout(**values):
        return load_run_config({"schema": "s.json", **values}).model.modality_dropout

    # modality dropout: the no-DP recipe's 0.25, none under DP (either mode); a number wins
    assert (dropout(), dropout(dp=False), dropout(**{"dp-mode": "distributed", "strategy": "fedadam"}),
            dropout(dp=False, **{"modality-dropout": 0.1})) == (0.0, 0.25, 0.0, 0.1)
    assert bound(**{"max-grad-norm": 0.5, "lr": 2.0}) == bound(**{"max-grad-norm": 0.5, "dp": False}) == 0.5
    assert training(dp=False) == ("sgd", 0.2, 64)
    assert training(dp=False, **{"local-optimizer": "adamw"}) == ("adamw", 0.002, 64)
    assert training(**{"local-optimizer": "adamw"}) == ("adamw", 0.02, 192)
    assert training(dp=False, lr=0.5, **{"batch-size": 32}) == ("sgd", 0.5, 32)  # a number overrides the recipe
    with pytest.raises(RunConfigError, match=r'batch-size: use a whole number >= 1 or "auto" .*\(got 2.5\)'):
        load_run_config({"schema": "s.json", "batch-size": 2.5})


def test_the_training_loop_config_is_a_view_of_the_run_config():
    cfg = load_run_config({"schema": "s.json", "dp": False, "local-epochs": 3, "local-softmax": "site", "seed": 4})
    tc = cfg.train_config()
    assert (tc.lr, tc.batch_size, tc.epochs, tc.optimizer, tc.seed, tc.max_grad_norm) == \
        (cfg.training.lr, cfg.training.batch_size, 3, "sgd", 4, cfg.privacy.max_grad_norm)
    assert tc.class_weighting and tc.softmax_over == "present"
    assert load_run_config({"schema": "s.json"}).train_config().class_weighting is False  # DP: no label weights


def test_an_error_names_the_flat_key_a_user_writes():
    with pytest.raises(RunConfigError) as e:
        load_run_config({"schema": "s.json", "secagg-threshold": 2, "d-model": 4, "bogus": 1, "n-heads": 3})
    text = str(e.value)
    for line in ("secagg-threshold: Input should be less than or equal to 1 (got 2)",
                 "d-model: Input should be greater than or equal to 8 (got 4)",
                 "bogus: Extra inputs are not permitted; unknown key"):
        assert f"  - {line}" in text
    with pytest.raises(RunConfigError, match=r"secagg-threshold: Input should be greater than 0.5 \(got 0.5\)"):
        load_run_config({"schema": "s.json", "secagg-threshold": 0.5})  # two halves could each unmask
    # and above 0.5, one Flower rounds to half of some count of share holders (round half to even: 0.6 x 4 -> 2)
    with pytest.raises(RunConfigError, match=r"rounds 0.6 x 4 share holders to 2, half of them.* use at least 0.63"):
        load_run_config({"schema": "s.json", "secagg-threshold": 0.6})
    assert load_run_config({"schema": "s.json", "secagg-threshold": 0.63}).secagg.threshold == 0.63
    for frozen in ({"resume": True}, {"deliver-only": True}):  # a run started before the check resumes and delivers
        assert load_run_config({"schema": "s.json", "secagg-threshold": 0.6, **frozen}).secagg.threshold == 0.6
    with pytest.raises(RunConfigError, match=r"d-model \(64\) must be divisible by n-heads \(3\)"):
        load_run_config({"schema": "s.json", "n-heads": 3})


@pytest.mark.parametrize("key", ["max-grad-norm", "lr", "server-lr", "round-timeout", "secagg-clipping-range",
                                 "weight-decay", "delta"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_number_that_is_not_finite_is_refused(key, value):
    # max-grad-norm = inf would make the DP noise infinite and the update NaN; none of these has a meaning at inf
    with pytest.raises(RunConfigError, match=f"  - {key}: (Input should be a finite number|use a number > 0)"):
        load_run_config({"schema": "s.json", key: value})


@pytest.mark.parametrize("off", ["false", "False", "no", "0", 0, False])
def test_dp_off_in_any_spelling_gets_the_no_dp_recipe(off):
    # DP off but the DP recipe kept (lr 100, clipping bound 0.01) would train a model without noise at the DP rates
    cfg = load_run_config({"schema": "s.json", "dp": off})
    plain = load_run_config({"schema": "s.json", "dp": False})
    assert not cfg.privacy.enabled
    assert (cfg.training.lr, cfg.training.batch_size, cfg.privacy.max_grad_norm) == \
        (plain.training.lr, plain.training.batch_size, plain.privacy.max_grad_norm)


@pytest.mark.parametrize("key, says", [("enabled", "'dp' or 'secagg'"), ("num_rounds", "'num-rounds'"),
                                       ("trusted_sites", "'trusted-sites'")])
def test_a_field_name_is_not_a_key_and_the_refusal_names_the_key(key, says):
    # `enabled` is secagg's and privacy's field alike: it was read as one of them, then Flower refused the run
    # without naming the key
    with pytest.raises(RunConfigError, match=f"{key}: .*unknown key: the run config's key is {says}"):
        parse_overrides([f"{key}=1"], max_epsilon=None)


@pytest.mark.parametrize("values, says", [
    ({"min-sites": 5, "sites": 2}, "min-sites 5 exceeds sites 2"),
    ({"dp-mode": "distributed", "strategy": "fedadam", "trusted-sites": 5}, "trusted-sites 5 exceeds the run's min-sites 2"),
    ({"dp-mode": "distributed", "strategy": "fedadam", "trusted-sites": 5, "sites": 4}, "trusted-sites 5 exceeds the run's 4 sites")])
def test_site_counts_that_contradict_each_other_are_refused_before_a_run_starts(values, says):
    with pytest.raises(RunConfigError, match=says):
        load_run_config({"schema": "s.json", **values})


def test_a_floor_above_secaggs_neighbourhood_is_refused_at_the_run_config():
    """Beyond 21 sites SecAgg+ shares each site's keys among 21 neighbours: a site asking for more contributors than
    that (min-sites, or trusted-sites in distributed mode) would refuse to help unmask every round."""
    from privacy.run_config import load_run_config
    from shared_models.run_config import SECAGG_MAX_SHARES

    with pytest.raises(RunConfigError, match="exceeds 21, the most SecAgg\\+ neighbours"):
        load_run_config({"schema": "s.json", "sites": 30, "min-sites": SECAGG_MAX_SHARES + 1})
    assert load_run_config({"schema": "s.json", "sites": 30, "min-sites": SECAGG_MAX_SHARES}).federation.min_sites == 21


def test_every_strategy_the_run_config_accepts_is_one_the_server_builds():
    import typing

    from server.strategy import BASES
    from shared_models.run_config import Strategy

    assert set(typing.get_args(Strategy)) == set(BASES)


def test_the_app_flower_installs_holds_the_code_and_schemas_only():
    """Flower packs the project into the app (FAB) that the SuperLink stores and every host installs; it
    refuses a run whose FAB exceeds FAB_MAX_SIZE. Docs and result files must not travel (nor make a new
    install at every host when they change), and every module the apps may import must."""
    import io
    import subprocess
    import zipfile
    from pathlib import Path

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    root = Path(__file__).resolve().parents[1]
    fab = build_fab_from_disk(root)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    tracked = subprocess.run(["git", "ls-files", "oncofed", "client", "server", "shared_models", "privacy",
                              "simulations"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    needed = {p for p in tracked if p.endswith(".py") or p.startswith("simulations/schemas/")}
    assert needed and needed <= names, sorted(needed - names)
    assert not {n for n in names if n.split("/")[0] in ("docs", "benchmarks", "tests")}
    assert len(fab) < FAB_MAX_SIZE / 4, f"the app is {len(fab):,} bytes, Flower's limit {FAB_MAX_SIZE:,}"


@pytest.mark.parametrize("key, value, says", [("fusion-blocks", 0, "a whole number >= 1"),
                                              ("fusion-blocks", "two", "a whole number >= 1"),
                                              ("modality-dropout", 2, "a probability in [0, 1)")])
def test_a_bad_number_or_auto_is_one_problem_saying_what_to_write(key, value, says):
    # pydantic checked the value against each type it may be (a number, "auto") and reported both failures
    with pytest.raises(RunConfigError, match=r"invalid \(1 problem\)") as e:
        load_run_config({"schema": "s.json", key: value})
    assert f'{key}: use {says} or "auto"' in str(e.value)


# --- settings that go together: refused at load rather than trained otherwise than meant ----------------------
@pytest.mark.parametrize("given, says", [
    ({"lr": 1.0}, 'lr 1 with max-grad-norm "auto" \\(the DP recipe\'s 0.01\\).* 0.01 times the recipe\'s update'),
    ({"max-grad-norm": 1.0}, 'max-grad-norm 1 with lr "auto" \\(the DP recipe\'s 100\\).* 100 times the recipe\'s update')])
def test_under_dp_sgd_lr_or_max_grad_norm_given_alone_is_refused_naming_the_pair(given, says):
    """The DP recipe's bound 0.01 clips every patient's gradient, so a step scales with lr x max-grad-norm (1 in the
    recipe). A review found each given alone accepted, the other kept at the recipe's: max-grad-norm 1 made each
    round's update ~100x the recipe's (every site then refused under SecAgg+, naming secagg-clipping-range), lr 1
    made it 1/100."""
    with pytest.raises(RunConfigError, match=says) as e:
        load_run_config({"schema": "s.json", **given})
    text = str(e.value)
    assert "lr x max-grad-norm, 1 in the recipe" in text and "max-grad-norm 0.1 with lr 10" in text
    assert "Give both lr and max-grad-norm (e.g. " in text and ") or neither" in text
    for frozen in ({"resume": True}, {"deliver-only": True}):  # a run started before the check resumes and delivers
        assert load_run_config({"schema": "s.json", **given, **frozen})


@pytest.mark.parametrize("values", [
    {"lr": 1.0, "max-grad-norm": 1.0},  # both given: what the user chose
    {"lr": 100.0, "max-grad-norm": 0.1},
    {},  # neither: the recipe
    {"lr": 100.0}, {"max-grad-norm": 0.01},  # the one given is the recipe's own value
    {"lr": 1.0, "local-optimizer": "adamw"},  # AdamW's step does not scale with the bound
    {"lr": 1.0, "dp": False}, {"max-grad-norm": 0.5, "dp": False},  # without DP the bound is the global norm's
    {"max-grad-norm": 1.0, "dp-mode": "distributed", "strategy": "fedadam"}])  # lr is not used there
def test_lr_and_max_grad_norm_are_accepted_given_together_or_where_they_do_not_pair(values):
    cfg = load_run_config({"schema": "s.json", **values})
    assert load_run_config(cfg.flat()) == cfg


@pytest.mark.parametrize("values, product, at_most", [
    ({"weight-decay": 0.01}, "1", "0.001 at lr 100"),  # the DP recipe's lr 100: each step's decay term is the weight
    ({"weight-decay": 0.04}, "4", "0.001 at lr 100"),  # diverged: |w| 171 after one round
    ({"weight-decay": 600, "local-optimizer": "adamw", "dp": False}, "1.2", "50 at lr 0.002")])  # w (1 - 1.2) flips
def test_lr_times_weight_decay_of_one_or_more_is_refused_naming_both(values, product, at_most):
    with pytest.raises(RunConfigError, match=rf"weight-decay \S+ with lr \S+: lr x weight-decay = {product}\b") as e:
        load_run_config({"schema": "s.json", **values})
    assert f"lower weight-decay to at most {at_most}" in str(e.value)
    assert load_run_config({"schema": "s.json", **values, "resume": True})  # a run started before the check
    assert load_run_config({"schema": "s.json", "weight-decay": 0.001}).training.weight_decay == 0.001


DISTRIBUTED = {"dp-mode": "distributed", "strategy": "fedadam"}


@pytest.mark.parametrize("key, value", [("lr", 0.5), ("local-epochs", 3), ("local-optimizer", "adamw"),
                                        ("weight-decay", 0.0), ("warmup-fraction", 0.2)])
def test_dp_mode_distributed_refuses_the_local_training_keys_it_does_not_use(key, value):
    """dp-mode "distributed" takes one DP-SGD step of the consortium per round at the server (FedAdam's eta_l, which
    Flower is given lr as, is never read): these were accepted and silently did nothing."""
    with pytest.raises(RunConfigError, match=rf"dp-mode 'distributed' takes one DP-SGD step .*: {key} \S+ is not used "
                                             r"there \(the step is server-lr with the strategy's optimizer, over each "
                                             r"site's sample-rate .* clipped to max-grad-norm\); remove it"):
        load_run_config({"schema": "s.json", **DISTRIBUTED, key: value})
    assert load_run_config({"schema": "s.json", **DISTRIBUTED, key: value, "resume": True})  # started before the check
    pair = {"max-grad-norm": 1 / value} if key == "lr" else {}  # under DP-SGD in site mode lr comes with its bound
    assert load_run_config({"schema": "s.json", **DISTRIBUTED, key: value, **pair, "dp-mode": "site"})  # used there


def test_dp_mode_distributed_accepts_the_defaults_and_the_keys_its_step_uses():
    from shared_models.run_config import defaults

    # Flower merges every default in (lr "auto", local-epochs 2, ...): a default is not a setting to refuse
    cfg = load_run_config({**defaults(), "schema": "s.json", **DISTRIBUTED, "momentum": 0.5, "server-lr": 0.003,
                           "sample-rate": 0.2, "max-grad-norm": 0.5})
    assert (cfg.training.momentum, cfg.federation.server_lr) == (0.5, 0.003)  # momentum: FedAvgM's server momentum
    assert load_run_config(cfg.flat()) == cfg  # the resolved values read back (lr: the recipe's, unused)
