"""The run config as the product reads it: the contract's checks plus the largest epsilon a site's accounting verifies.

`shared_models.run_config` is the contract both sides share and may not import this layer, so its
`RunConfig.from_flower` and `parse_overrides` take the bound as a required `max_epsilon`. The server, the
sites, the command lines, the simulations and the benchmarks read every run config through these two
functions instead, so that no caller can leave the bound out and accept a budget the ledger cannot verify.
"""

from __future__ import annotations

from privacy import MAX_BUDGET
from shared_models.run_config import RunConfig, parse_overrides


def load_run_config(values: dict, source: str = "run config") -> RunConfig:
    """The validated run config; an epsilon above MAX_BUDGET is refused like any bad value (RunConfigError
    naming `epsilon`, the limit and where the value came from: `source`)."""
    return RunConfig.from_flower(values, source=source, max_epsilon=MAX_BUDGET)


def parse_run_overrides(items: list[str], source: str = "--set") -> dict:
    """KEY=VALUE overrides typed and checked as `shared_models.run_config.parse_overrides` does, with an
    epsilon above MAX_BUDGET refused."""
    return parse_overrides(items, source=source, max_epsilon=MAX_BUDGET)
