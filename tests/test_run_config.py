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
    assert load_run_config({"schema": "s.json", "epsilon": MAX_BUDGET}).epsilon == MAX_BUDGET


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
    assert RunConfig.from_flower({"schema": "s.json", "epsilon": 1000.0}, max_epsilon=None).epsilon == 1000.0
    assert parse_overrides(["epsilon=1000"], max_epsilon=None) == {"epsilon": 1000}
