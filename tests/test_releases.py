"""A site's released updates and the records of the SecAgg+ exchange and sum each round went into
(client/releases.py): each record lives as long as the copy it binds."""

from __future__ import annotations

import numpy as np

from client.releases import KEEP, Release, ReleaseStore


def test_a_kept_copy_keeps_its_records_when_the_site_skips_a_round(tmp_path):
    """The review of 2026-12-06 (D3): records were pruned to the newest KEEP record files, copies to the newest KEEP
    copies; a round whose record was written but whose copy was not (a round refused or killed after its exchange
    record) pushed out the record of a round whose copy stayed, and that copy could be resent among other sites.
    A copy's records go with it, and only with it."""
    store, run = ReleaseStore(tmp_path), "run-x"
    assert KEEP == 2
    for rnd in (1, 2):
        store.record_sent(run, rnd, [1, 2, 3], 2)
        store.record_unmask(run, rnd, [1, 2, 3])
        store.save(run, rnd, Release("g", [np.zeros(3)], 10, {}))
    store.record_sent(run, 3, [1, 2, 3], 2)  # round 3's exchange is recorded, its copy never kept
    store.record_unmask(run, 3, [1, 2, 3])
    assert store.load(run, 1) is not None
    assert store.sent_among(run, 1) == ([1, 2, 3], 2) and store.unmasked_with(run, 1) == [1, 2, 3]

    store.save(run, 4, Release("g", [np.zeros(3)], 10, {}))  # the copy of round 1 goes, and its records with it
    assert store.load(run, 1) is None and store.sent_among(run, 1) is None and store.unmasked_with(run, 1) is None
    assert store.sent_among(run, 2) == ([1, 2, 3], 2) and store.load(run, 2) is not None


def test_records_without_copies_keep_the_newest_rounds(tmp_path):
    """A run without DP keeps no copies: its records are still pruned to the newest KEEP rounds."""
    store = ReleaseStore(tmp_path)
    for rnd in range(1, 6):
        store.record_sent("run-y", rnd, [1, 2], 2)
    assert [store.sent_among("run-y", r) is not None for r in range(1, 6)] == [False, False, False, True, True]
