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
    # every option that sets a run-config key (--out and --eval-data set keys --set may not; --seed is the partition's
    # and, unless --set seed=S, the training seed: docs/research-guide.md)
    from simulations.cli_simulate import simulate as command

    options = set(inspect.signature(command).parameters) & set(inspect.signature(fed.federation_config).parameters)
    assert options - {"out", "eval_data", "seed"} == set(fed.SETTING_KEYS)
    assert set(cases) == set(fed.SETTING_KEYS.values())


@pytest.mark.parametrize("written", ["False", "off", "no", "0"])
def test_epsilon_with_dp_off_is_refused_however_dp_false_is_written(simulate, written):
    """`--set dp=False` is a string to TOML, which the run config reads as false: the run had no DP, and the refusal,
    which looked for the boolean false, let --epsilon 4 pass."""
    result = simulate("--set", f"dp={written}", "--epsilon", "4")
    assert result.exit_code == 2 and "epsilon 4 with DP off" in result.output, result.output
