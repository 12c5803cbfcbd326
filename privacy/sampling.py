"""Poisson sampling at a fixed cost: padded batches.

DP-SGD's subsampling analysis assumes the sampled set secret, its size included. A step's cost grows with
the rows it computes, and a site's round seconds and its reply's arrival time are visible to the server,
so a batch of exactly the sampled patients would publish their number step by step. Here every step
computes `padded_batch(n, q)` rows: the Poisson sample, filled up with patients it did not sample,
weighted 0 in the loss (WeightedCrossEntropy's mask), in a secret random order. A filler row's
per-sample gradient is exactly zero, so the clipped sum, the noise, the division by the expected batch
and the accounting are those of the unpadded step (tests/test_dp_clipping.py). A sample larger than
the padding is computed whole: its time then shows the sample's size, an event of probability at most the
padding's tail per step (PADDING_TAIL in `dp-mode = "site"`, DISTRIBUTED_PADDING_TAIL for a distributed round's
one step), which the ledger prices in delta at the epsilon it reports: (1 + e^eps) x the history's summed tails
(privacy/accounting.py `Overflow`), 1.5e-19 at epsilon 8 over 60 steps. The site-mode tail keeps the price below a
millionth of delta 1e-5 for claims up to epsilon ~24 over 600 steps (beyond, it grows as e^eps), the distributed one
up to MAX_BUDGET, as the Skellam steps' own bad events (2^-200 a step).

Both DP modes use it: `dp-mode = "distributed"` for its one step per round (client/local_round.py), and
`dp-mode = "site"` for every step of its local epochs (run config `dp-pad-batches`, on by default; its cost
in the sites' training time: docs/results.md). The padded size grows with the site's patient count, so a
round's seconds reveal the site's size roughly: a side channel the epsilon does not cover (docs/privacy.md),
unless the run sets `dp-pad-to`, a public bound on the sites' training patients: every site's steps then compute
the bound's rows (`step_rows`), filler patients repeated where the site has fewer.

Every helper here takes the tail from its caller, as the ledger's `padding_tail` does: the rows a step computes and
the overflow the ledger prices must be of one tail, chosen in one place (client.local_round.padding_tail).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


FLOAT32_GRID = 2 ** 24  # torch.rand's float32 draws are multiples of 2^-24


def opacus_poisson_loader(dataset, sample_rate: float, generator: torch.Generator | None):
    """Opacus' own Poisson loader (run config `dp-pad-batches = false`), including each patient with probability at
    most `sample_rate`, the rate the accountant charges. Opacus draws `torch.rand(n) < rate` in float32, whose
    values are multiples of 2^-24, so a patient is included with probability ceil(rate 2^24) / 2^24, above the
    rate for almost every rate (1.4e-3 relative at 1e-5): its sampler compares with the rate rounded down to
    that grid instead, which float32 holds exactly. The loader's `sample_rate` stays the run's, for the accountant."""
    from opacus.data_loader import DPDataLoader

    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=generator)
    loader.batch_sampler.sample_rate = math.floor(sample_rate * FLOAT32_GRID) / FLOAT32_GRID
    return loader


@functools.lru_cache(maxsize=256)
def padded_batch(n_patients: int, sample_rate: float, *, tail: float) -> int:
    """The rows a step always computes: the smallest b with P(Binomial(n, q) > b) <= tail, at most n (for
    n = 620 at q = 0.3: 308 at the tail 2^-80, against 186 sampled on average). From the exact log tail:
    scipy's `binom.isf` saturates to n below tails of ~2^-50."""
    from scipy.stats import binom

    if n_patients <= 0:
        return 0
    b = np.arange(n_patients + 1)
    within = binom.logsf(b, n_patients, sample_rate) <= math.log(tail)  # P(X > b) <= tail, increasing in b
    return int(b[within][0]) if within.any() else n_patients


def step_rows(n_patients: int, sample_rate: float, pad_to: int = 0, *, tail: float) -> int:
    """The rows each DP step of a site computes: padded_batch of its own patient count, or, with the run's public
    bound `dp-pad-to` (at least the site's count), of the bound: then the seconds do not depend on the count."""
    return padded_batch(max(n_patients, pad_to), sample_rate, tail=tail) if n_patients > 0 else 0


def padded_sample(n: int, sample_rate: float, generator: torch.Generator | None,
                  rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Poisson sample of n patients at `sample_rate` (each independently, as Opacus' DPDataLoader draws it),
    padded to `rows` (`step_rows` at the caller's tail) with patients it did not sample: (row indices, mask: 1
    sampled, 0 filler), both parts in a secret random order. A sample larger than `rows` is returned whole.
    `rows` above n (a public bound, `step_rows`): the filler repeats patients, still weighted 0."""
    # float64: float32 draws are multiples of 2^-24, which include a patient at ceil(q 2^24) / 2^24 >= q, above the
    # rate the accountant charges (1.4e-3 relative at q = 1e-5)
    sampled = torch.rand(n, dtype=torch.float64, generator=generator) < sample_rate
    chosen = sampled.nonzero().squeeze(1)
    fill = max(0, rows - len(chosen))
    perm = torch.randperm(n, generator=generator)  # over all n: its cost does not depend on the sample
    filler = perm[~sampled[perm]][:fill]
    if len(filler) < fill:  # rows above n: rows - n repeats, whatever the sample is (the cost stays the bound's)
        filler = torch.cat([filler, torch.randint(n, (fill - len(filler),), generator=generator)])
    index = torch.cat([chosen, filler])
    mask = torch.cat([torch.ones(len(chosen)), torch.zeros(len(filler))])
    order = torch.randperm(len(index), generator=generator)
    return index[order], mask[order]


class PaddedPoissonLoader:
    """Poisson batches as Opacus' DPDataLoader draws them (each patient independently at `sample_rate`, by
    default 1 / len(loader); exactly `steps` steps per epoch, where DPDataLoader's int(1 / sample_rate) is one
    fewer for some rates, e.g. 92 for 1 / 93), each padded: an epoch yields (x, y, mask) batches of
    step_rows(n, q, pad_to, tail=tail) rows. `dataset` is the loader's TensorDataset (kept: Opacus' make_private reads
    len(loader.dataset))."""

    def __init__(self, dataset: torch.utils.data.TensorDataset, steps: int, generator: torch.Generator | None,
                 sample_rate: float | None = None, pad_to: int = 0, *, tail: float):
        if steps < 1:
            raise ValueError(f"a padded Poisson loader needs at least one step per epoch; got {steps}")
        self.dataset, self.steps, self.generator = dataset, steps, generator
        self.sample_rate = 1.0 / steps if sample_rate is None else float(sample_rate)
        self.rows = step_rows(len(dataset), self.sample_rate, pad_to, tail=tail)

    @classmethod
    def from_data_loader(cls, loader, generator: torch.Generator | None, sample_rate: float | None = None,
                         steps: int | None = None, pad_to: int = 0, *, tail: float) -> "PaddedPoissonLoader":
        if not isinstance(loader.dataset, torch.utils.data.TensorDataset):
            raise TypeError("padded Poisson batches need the loader's dataset as a TensorDataset (x, y); got "
                            f"{type(loader.dataset).__name__}")
        return cls(loader.dataset, len(loader) if steps is None else steps, generator, sample_rate, pad_to, tail=tail)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        x, y = self.dataset.tensors[:2]
        for _ in range(self.steps):
            index, mask = padded_sample(len(y), self.sample_rate, self.generator, self.rows)
            yield x[index], y[index], mask
