"""Privacy at the site: DP-SGD accounting and the site's privacy ledger (and, later, keys and certificates)."""

# The largest epsilon a site may set as its budget (node config privacy-budget, run config epsilon,
# `oncofed site init --budget`). Up to it the ledger's epsilon is the PRV accountant's, which Opacus' own
# accountant confirms after every round; above it the ledger falls back to the looser RDP bound (PRV's
# grid would need many GB), which Opacus' PRV figure contradicts, so every round would be refused
# (measured: a budget of 1000 trained and then withheld all 10 rounds). Here, no import of opacus.
MAX_BUDGET = 100.0

SITE_BUDGET = 8.0  # a site's privacy budget over all runs unless `oncofed site init --budget` says otherwise

MIN_RUN_SHARE = 0.5
"""A site joins a new dp-mode 'site' run only if what is left of its budget is at least this share of the run's epsilon:
with less its noise grows many-fold (0.08 of 8 left: noise multiplier 3.2, the consortium's model at macro-F1 0.12 in
an operator's trial), and in a SecAgg+ sum the noisiest site's noise is everyone's."""

# How rarely a padded Poisson batch is outgrown (privacy/sampling.py), per step; the ledger prices it (accounting.Overflow).
PADDING_TAIL = 2.0 ** -80  # a DP-SGD step (dp-mode "site")
DISTRIBUTED_PADDING_TAIL = 2.0 ** -200  # a distributed round's one step: its worst case may claim up to MAX_BUDGET
LEGACY_PADDING_TAIL = 2.0 ** -40  # a ledger entry from before the tail was recorded (2026-12-07) was padded at this
