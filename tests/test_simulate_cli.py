"""`oncofed simulate`'s command line: what it refuses and what its first line says, without starting a federation
(a stand-in partition of two hospitals; the federated run itself is replaced by one that does not start)."""

from __future__ import annotations

import inspect
import json

import pytest
from typer.testing import CliRunner

import simulations.federation as fed
from oncofed.cli import app


@pytest.fixture
def simulate(tmp_path, monkeypatch):
    """Runs `oncofed simulate ARGS --out DIR` over two stand-in hospitals; a run that gets past every check stops
    at run_federation with 'not started here' (exit 1)."""
    out = tmp_path / "run"

    def partition(data_root, **_):
        data_root.mkdir(parents=True, exist_ok=True)
        (data_root / "manifest.json").write_text(json.dumps({
            "sites": [{"name": "C0", "dir": "C0"}, {"name": "C1", "dir": "C1"}], "holdout": {"dir": "holdout",
                                                                                            "patients": 10}}))
        return data_root

    def not_started(*a, **k):
        raise fed.SimulationError("not started here")
    monkeypatch.setattr(fed, "ensure_partition", partition)
    monkeypatch.setattr(fed, "run_federation", not_started)
    return lambda *args: CliRunner().invoke(app, ["simulate", *args, "--out", str(out)])


def test_a_setting_given_as_an_option_and_with_set_is_refused_naming_both(simulate, tmp_path):
    """--set was applied after the options and won without a word (`--lr 0.5 --set lr=1` trained at lr 1)."""
    cases = {"num-rounds": (["--rounds", "5", "--set", "num-rounds=3"], "--rounds 5 and --set num-rounds=3"),
             "dp": (["--dp", "--set", "dp=false"], "--dp and --set dp=false"),
             "epsilon": (["--epsilon", "4", "--set", "epsilon=2"], "--epsilon 4 and --set epsilon=2"),
             "secagg": (["--no-secagg", "--set", "secagg=true"], "--no-secagg and --set secagg=true"),
             "strategy": (["--strategy", "fedadam", "--set", "strategy=fedavgm"],
                          "--strategy fedadam and --set strategy=fedavgm"),
             "local-epochs": (["--local-epochs", "1", "--set", "local-epochs=3"],
                              "--local-epochs 1 and --set local-epochs=3"),
             "lr": (["--lr", "0.5", "--set", "lr=1"], "--lr 0.5 and --set lr=1"),
             "batch-size": (["--batch-size", "32", "--set", "batch-size=64"],
                            "--batch-size 32 and --set batch-size=64")}
    for key, (args, said) in cases.items():
        result = simulate(*args)
        assert result.exit_code == 2 and f"{said} both set {key}: give it once" in result.output, result.output
    assert not (tmp_path / "run").exists()  # refused before anything is written
    # the options that set a run-config key are SETTING_KEYS, the only settings federation_config takes (--out and
    # --eval-data set keys --set may not; --seed is the partition's and, unless --set seed=S, the training seed:
    # docs/research-guide.md); each is an option of the command
    from simulations.cli_simulate import simulate as command

    assert set(fed.SETTING_KEYS) <= set(inspect.signature(command).parameters)
    with pytest.raises(TypeError, match="momentum not among its settings"):
        fed.federation_config(tmp_path, tmp_path, 1, seed=0, momentum=0.5)
    assert set(cases) == set(fed.SETTING_KEYS.values())


@pytest.mark.parametrize("written", ["False", "off", "no", "0"])
def test_epsilon_with_dp_off_is_refused_however_dp_false_is_written(simulate, written):
    """`--set dp=False` is a string to TOML, which the run config reads as false: the run had no DP, and the refusal,
    which looked for the boolean false, let --epsilon 4 pass."""
    result = simulate("--set", f"dp={written}", "--epsilon", "4")
    assert result.exit_code == 2 and "epsilon 4 with DP off" in result.output, result.output


def test_a_distributed_runs_first_line_says_a_round_is_one_dp_step_of_the_consortium(simulate):
    """In dp-mode 'distributed' the server steps its optimizer on the consortium's noisy gradient once a round; the
    line named local epochs, a local lr and optimizer, none of which such a run uses."""
    from privacy.run_config import load_run_config
    from shared_models.run_config import app_defaults

    result = simulate("--strategy", "fedavgm", "--rounds", "3", "--set", "dp-mode=distributed")
    assert result.exit_code == 1 and "not started here" in result.output, result.output
    run = load_run_config({**app_defaults(fed.ROOT), "strategy": "fedavgm", "dp-mode": "distributed"})
    line = result.output.splitlines()[0]
    assert (f"DP on (distributed mode), epsilon {run.privacy.epsilon:g}, SecAgg+ on, fedavgm server-lr "
            f"{run.federation.server_lr:g} momentum {run.training.momentum:g}, 3 rounds of one DP step of the "
            f"consortium (sample-rate {run.privacy.sample_rate:g}, clipping bound {run.privacy.max_grad_norm:g}, the "
            f"noisy sum divided by batch-size {run.training.batch_size})") in line, line
    assert "local epochs" not in line and " lr " not in line and run.training.optimizer not in line
    site = simulate("--rounds", "3").output.splitlines()[0]  # dp-mode 'site': each site's local training
    assert f"fedavg, 3 rounds of {run.training.local_epochs} local epochs, batch " in site, site
