"""SecAgg+'s masks come from the whole seed (privacy/secagg_masks.py): Flower 1.41 folds a seed into 32 bits, so
a server that unmasked a sum of two sites could search one pairwise mask's 2^32 seeds for a site's own update."""

from __future__ import annotations

import numpy as np


def test_seeds_that_flower_folds_into_one_give_different_masks_here():
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flower_masks

    from privacy.secagg_masks import pseudo_rand_gen

    a = bytes(range(32))
    b = a[4:8] + a[0:4] + a[8:]  # two 4-byte words swapped: the same XOR fold
    shapes = [(3, 5), (), (7,)]
    assert all(np.array_equal(x, y) for x, y in zip(flower_masks(a, 2 ** 32, shapes), flower_masks(b, 2 ** 32, shapes)))
    ours_a, ours_b = pseudo_rand_gen(a, 2 ** 32, shapes), pseudo_rand_gen(b, 2 ** 32, shapes)
    assert not any(np.array_equal(x, y) for x, y in zip(ours_a, ours_b))
    again = pseudo_rand_gen(a, 2 ** 32, shapes)  # the server recomputes a site's mask from its seed: the same
    assert all(np.array_equal(x, y) for x, y in zip(ours_a, again))
    assert [x.shape for x in ours_a] == [(3, 5), (), (7,)] and all(x.dtype == np.int64 for x in ours_a)


def test_the_masks_are_uniform_over_the_range():
    from scipy import stats

    from privacy.secagg_masks import pseudo_rand_gen

    [m] = pseudo_rand_gen(b"\x01" * 32, 2 ** 32, [(200_000,)])
    assert m.min() >= 0 and m.max() < 2 ** 32
    counts = np.bincount((m >> 28).astype(np.int64), minlength=16)  # the top 4 bits: 16 equal cells
    assert stats.chisquare(counts).pvalue > 1e-4
    [small] = pseudo_rand_gen(b"\x02" * 32, 7, [(70_000,)])
    assert set(np.unique(small)) == set(range(7))  # every value of the range, its top one included


def test_the_sites_mod_and_the_servers_workflow_both_use_them():
    import client.app  # noqa: F401 - importing either side installs them
    import server.workflow  # noqa: F401
    from privacy.secagg_masks import installed

    assert installed()


def test_a_site_refuses_a_secagg_round_whose_server_draws_masks_another_way():
    """Masks drawn two ways do not cancel: the sum would be noise of the modulus' size. A site refuses a SecAgg+
    round from a server that does not say it draws them as the site does, before anything is trained."""
    from flwr.common import FitIns, ndarrays_to_parameters

    from client.app import masks_refusal
    from privacy.secagg_masks import VERSION
    from shared_models.protocol import SECAGG_MASKS, SECAGG_MAX_WEIGHT

    def fit(**config):
        return FitIns(ndarrays_to_parameters([np.zeros(2)]), config)

    assert masks_refusal(fit(**{SECAGG_MAX_WEIGHT: 2000.0, SECAGG_MASKS: VERSION})) == ""
    assert masks_refusal(fit(**{SECAGG_MAX_WEIGHT: 0.0})) == ""  # no SecAgg+: no masks
    assert "Flower 1.41 does (32-bit seeds)" in masks_refusal(fit(**{SECAGG_MAX_WEIGHT: 2000.0}))
    assert "the masks would not cancel" in masks_refusal(fit(**{SECAGG_MAX_WEIGHT: 2000.0, SECAGG_MASKS: "other"}))
