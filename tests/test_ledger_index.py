"""One ledger per set of patients on a machine: a second site directory over the same data (a re-key, a move by copy,
a second consortium) started a fresh, empty ledger and spent the patients' budget again. The machine's index of
ledgers (privacy/ledger_index.py) lets `site init`, `site start` and a deployed site's rounds see the other ledgers."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from privacy.ledger import LEDGER_FILE, PrivacyLedger
from privacy.ledger_index import INDEX_ENV, LedgerIndex, index_path
from privacy.pki import ProvisioningError, fingerprint, init_consortium, init_site


@pytest.fixture
def consortium(tmp_path):
    init_consortium(tmp_path / "op", "t", "fl.example.org:8443", internal_port=9092)
    return tmp_path / "op"


def _site(consortium: Path, root: Path, data: Path, **kw):
    return init_site(root, root.name, consortium / "public", str(data),
                     ca_fingerprint=fingerprint(consortium / "ca/ca.crt"), **kw)


def _spend(state_dir: str | Path, rounds: int = 1, run: str = "run-1") -> PrivacyLedger:
    """Rounds trained on the site's ledger, as its training app records them."""
    ledger = PrivacyLedger(Path(state_dir) / LEDGER_FILE, 8.0, 1e-5)
    for rnd in range(1, rounds + 1):
        ledger.commit_round(ledger.begin_round("dataset-a", run, rnd, 1.5, 0.05, 5, padding_tail=0.0), 5)
    return ledger


def test_the_tests_never_use_the_accounts_own_index(isolated_ledger_index):
    assert index_path() == isolated_ledger_index
    assert Path.home() not in index_path().parents


def test_the_index_lives_under_the_accounts_state_directory_unless_the_environment_names_it(monkeypatch, tmp_path):
    monkeypatch.delenv(INDEX_ENV)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert index_path() == tmp_path / "xdg" / "oncofed" / "ledger-index.json"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert index_path() == tmp_path / "home" / ".local" / "state" / "oncofed" / "ledger-index.json"


def test_a_second_site_init_over_the_same_data_is_refused_naming_the_site_its_ledger_and_its_spend(consortium,
                                                                                                  tmp_path):
    (tmp_path / "data").mkdir()
    first = _site(consortium, tmp_path / "st-mary", tmp_path / "data")
    _spend(first.state_dir, rounds=2)
    spent = PrivacyLedger(Path(first.state_dir) / LEDGER_FILE, 8.0, 1e-5).spent("dataset-a")
    with pytest.raises(ProvisioningError) as refused:
        _site(consortium, tmp_path / "st-mary-rekeyed", tmp_path / "data")
    message = str(refused.value)
    assert f"site directory {tmp_path / 'st-mary'}" in message
    assert f"ledger {Path(first.state_dir) / LEDGER_FILE}: epsilon {spent:.3f} spent in 2 round(s)" in message
    assert f"--state-dir {first.state_dir}" in message and "--allow-second-ledger" in message
    assert "Nothing was written" in message and not (tmp_path / "st-mary-rekeyed").exists()


def test_a_site_whose_ledger_is_gone_does_not_stop_a_new_site_init(consortium, tmp_path):
    """Only a ledger that still exists holds spend: a site that never trained, or whose state moved away, does not."""
    (tmp_path / "data").mkdir()
    first = _site(consortium, tmp_path / "a", tmp_path / "data")
    _site(consortium, tmp_path / "b", tmp_path / "data")  # `a` has no ledger yet
    _spend(first.state_dir)
    Path(first.state_dir).rename(tmp_path / "a-state-archived")
    _site(consortium, tmp_path / "c", tmp_path / "data")


def test_site_init_keeping_the_other_sites_state_dir_continues_its_spend(consortium, tmp_path):
    from client.supernode import ledger_check

    (tmp_path / "data").mkdir()
    old = _site(consortium, tmp_path / "old", tmp_path / "data")
    before = _spend(old.state_dir, rounds=2).spent("dataset-a")
    new = _site(consortium, tmp_path / "new", tmp_path / "data", state_dir=old.state_dir)
    assert new.state_dir == old.state_dir
    assert f"epsilon {before:.3f} of the budget 8 spent" in ledger_check(tmp_path / "new", new).detail
    ledger = PrivacyLedger(Path(new.state_dir) / LEDGER_FILE, 8.0, 1e-5)
    assert ledger.spent("dataset-a") == before
    ledger.commit_round(ledger.begin_round("dataset-a", "run-2", 1, 1.5, 0.05, 5, padding_tail=0.0), 5)
    assert ledger.spent("dataset-a") > before  # the new site's rounds add to the old spend, not to zero
    with pytest.raises(ProvisioningError, match="a site directory, not a state directory; give its state directory"):
        _site(consortium, tmp_path / "newer", tmp_path / "data", state_dir=str(tmp_path / "old"))


def test_site_init_on_the_command_line_refuses_then_keeps_the_ledger(consortium, tmp_path):
    from typer.testing import CliRunner

    from oncofed.cli import app

    (tmp_path / "data").mkdir()
    old = _site(consortium, tmp_path / "old", tmp_path / "data")
    _spend(old.state_dir)
    args = ["site", "init", "--name", "New", "--consortium", str(consortium / "public"), "--data",
            str(tmp_path / "data"), "--ca-fingerprint", fingerprint(consortium / "ca/ca.crt")]
    refused = CliRunner().invoke(app, [*args[:2], str(tmp_path / "new"), *args[2:]])
    assert refused.exit_code == 2 and f"--state-dir {old.state_dir}" in refused.output
    kept = CliRunner().invoke(app, [*args[:2], str(tmp_path / "new"), *args[2:], "--state-dir", old.state_dir])
    assert kept.exit_code == 0, kept.output
    assert f"privacy ledger {Path(old.state_dir) / LEDGER_FILE} kept: epsilon" in kept.output
    second = CliRunner().invoke(app, [*args[:2], str(tmp_path / "other"), *args[2:], "--allow-second-ledger"])
    assert second.exit_code == 0, second.output
    assert json.loads((tmp_path / "other" / "site.json").read_text())["state-dir"] == str(tmp_path / "other" / "state")


def test_an_index_that_cannot_be_written_refuses_site_init_and_site_start(consortium, tmp_path, monkeypatch):
    """A site whose claim on its patients cannot be recorded could be joined by a second ledger unseen."""
    from client.supernode import ledger_index_check

    for data in ("data", "other-data"):
        (tmp_path / data).mkdir()
    site = _site(consortium, tmp_path / "s", tmp_path / "data")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(INDEX_ENV, str(tmp_path / "a-file" / "ledger-index.json"))
    with pytest.raises(ProvisioningError, match=f"cannot be written .*set {INDEX_ENV} to a file it can write"):
        _site(consortium, tmp_path / "t", tmp_path / "other-data")
    assert not (tmp_path / "t").exists()
    check = ledger_index_check(tmp_path / "s", site)
    assert not check.ok and INDEX_ENV in check.detail


def test_site_start_warns_of_another_site_reading_the_same_data(consortium, tmp_path):
    from client.supernode import ledger_index_check

    (tmp_path / "data").mkdir()
    first = _site(consortium, tmp_path / "a", tmp_path / "data")
    second = _site(consortium, tmp_path / "b", tmp_path / "data")  # before `a` trained
    assert not ledger_index_check(tmp_path / "b", second).warning
    _spend(first.state_dir)
    check = ledger_index_check(tmp_path / "b", second)
    assert check.ok and check.warning and f"set this site.json's state-dir to {first.state_dir}" in check.detail


def test_a_damaged_index_is_set_aside_and_rebuilt_from_the_ledgers_it_names(consortium, tmp_path,
                                                                            isolated_ledger_index):
    """The index holds no spend (each ledger holds its own), so a damaged one is not a reason to stop every site of
    the machine: it is kept aside for inspection and rebuilt from the ledgers and site.json files it still names."""
    (tmp_path / "data").mkdir()
    old = _site(consortium, tmp_path / "old", tmp_path / "data")
    _spend(old.state_dir)
    LedgerIndex().claim(Path(old.state_dir) / LEDGER_FILE, "dataset-a", {"dataset-a"})
    text = isolated_ledger_index.read_text()
    isolated_ledger_index.write_text(text[: text.index('"site-dirs"')])  # cut short after the ledger's path
    index = LedgerIndex()
    others = index.claim(tmp_path / "copy" / LEDGER_FILE, "dataset-a", {"dataset-a"})
    assert [o.ledger for o in others] == [Path(old.state_dir) / LEDGER_FILE]  # its spent dataset, from the ledger
    assert others[0].site_dirs == (str(tmp_path / "old"),)  # and its site, from the site.json beside its state
    assert len(index.notes) == 1 and "set aside as" in index.notes[0]
    aside = [p for p in isolated_ledger_index.parent.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_text() == text[: text.index('"site-dirs"')]
    with pytest.raises(ProvisioningError, match=f"site directory {tmp_path / 'old'}"):  # and its data path
        _site(consortium, tmp_path / "new", tmp_path / "data")
    assert os.stat(isolated_ledger_index).st_mode & 0o077 == 0  # rewritten for this account alone


# --- a deployed site's rounds ------------------------------------------------------------------------------------


def test_the_ledger_that_spent_on_the_patients_holds_them_whoever_claimed_first(tmp_path):
    """A ledger that spent before the index knew it claimed nothing; a second, empty ledger claiming the patients
    first must not take them (it would be told to refuse the ledger with the spend, and to move to its own empty
    one). The ledger with spend holds them; with spend in both, both are refused (review of 2026-12-06)."""
    spent, empty = tmp_path / "A" / "state", tmp_path / "B" / "state"
    spent.mkdir(parents=True), empty.mkdir(parents=True)
    _spend(spent, rounds=3)
    PrivacyLedger(empty / LEDGER_FILE, 8.0, 1e-5)
    index = LedgerIndex()
    assert index.claim(empty / LEDGER_FILE, "dataset-a", {"dataset-a"}) == []  # the index knew of no other
    assert index.claim(spent / LEDGER_FILE, "dataset-a", {"dataset-a"}) == []  # spend holds: not refused
    [holder] = index.claim(empty / LEDGER_FILE, "dataset-a", {"dataset-a"})  # now the empty one is refused
    assert holder.ledger == (spent / LEDGER_FILE).resolve() and "spent in 3 round(s)" in holder.describe()
    _spend(empty)  # both have spend on the patients (two copies trained apart): both refused
    assert [o.ledger for o in index.claim(spent / LEDGER_FILE, "dataset-a", {"dataset-a"})] == [
        (empty / LEDGER_FILE).resolve()]
    assert len(index.claim(empty / LEDGER_FILE, "dataset-a", {"dataset-a"})) == 1


def _deployed(tmp: Path, data: str, state: str):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1, state=RecordDict(), node_config={
        "data-path": str(tmp / data), "state-dir": str(tmp / state), "privacy-budget": 8.0, "require-secagg": False},
        run_config={"schema": str(tmp / "schema.json"), "num-rounds": 3, "d-model": 32, "dp-mode": "site",
                    "batch-size": 32, "sample-rate": 0.5, "secagg": False})


def _fit(weights, rnd: int):
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    from shared_models.protocol import RUN_KEY, SERVER_ROUND
    from tests.factories import site_message

    return site_message(fitins_to_recorddict(FitIns(ndarrays_to_parameters(weights), {SERVER_ROUND: rnd,
                                                                                       RUN_KEY: "run-X"}), True))


def test_a_round_on_tables_copied_to_another_path_is_refused_before_any_spend(tmp_path, monkeypatch):
    """A second state directory over a copy of the site's tables: the same patients, which another ledger of the machine
    has spent on. The round is refused before any spend; the server is told without a path, the site's log and audit
    log name the other ledger and the fix. The first site, which trained first, keeps training."""
    import torch

    from client.app import LEDGER_INDEX_UNWRITABLE, SHARED_LEDGER_REFUSAL, SiteRefusal, train
    from privacy.audit import AUDIT_FILE, AuditLog
    from privacy.run_config import load_run_config
    from shared_models.model import MultiModalTransformer
    from shared_models.weights import state_arrays
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema()
    schema.save(tmp_path / "schema.json")
    write_site(tmp_path / "site", site_tables(n_per_class=20))
    first = _deployed(tmp_path, "site", "state")
    torch.manual_seed(0)
    weights = state_arrays(MultiModalTransformer(schema, load_run_config(first.run_config).model))
    assert not train(_fit(weights, 1), first).has_error()

    shutil.copytree(tmp_path / "site", tmp_path / "copy")
    with pytest.raises(SiteRefusal) as refused:
        train(_fit(weights, 1), _deployed(tmp_path, "copy", "copy-state"))
    assert str(refused.value).endswith(SHARED_LEDGER_REFUSAL) and str(tmp_path) not in str(refused.value)
    copied = json.loads((tmp_path / "copy-state" / LEDGER_FILE).read_text())
    assert copied["entries"] == [] and "runs" not in copied, "nothing was planned or spent"
    shared = AuditLog(tmp_path / "copy-state" / AUDIT_FILE).last("ledger_shared")
    assert shared["ledgers"] == [str(tmp_path / "state" / LEDGER_FILE)]
    assert f"set this site's state-dir (site.json) to {tmp_path / 'state'}" in shared["detail"]

    assert not train(_fit(weights, 2), first).has_error()  # the copy's refused registration holds nothing

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(INDEX_ENV, str(tmp_path / "a-file" / "ledger-index.json"))
    spent = json.loads((tmp_path / "state" / LEDGER_FILE).read_text())["entries"]
    with pytest.raises(SiteRefusal, match=re.escape(LEDGER_INDEX_UNWRITABLE)):
        train(_fit(weights, 3), first)
    assert json.loads((tmp_path / "state" / LEDGER_FILE).read_text())["entries"] == spent


def _prepared(tmp: Path, name: str, seed: int = 0, val_fraction: float = 0.2, tables=None):
    """A deployed site's data and state as its rounds see them, over the tables in tmp/data (or `tables`)."""
    from client.app import SiteSettings
    from client.site import SitePaths, prepare_site
    from tests.sitefixtures import site_schema, write_site

    data = tmp / name / "data"
    if tables is not None:
        write_site(data, tables)
    else:
        shutil.copytree(tmp / "data", data)
    paths = SitePaths(data, tmp / name / "state", tmp / name / "models")
    site = prepare_site(site_schema(), paths, budget_epsilon=8.0, delta=1e-5, val_fraction=val_fraction,
                        min_count=1, seed=seed, dp=True)
    return site, SiteSettings(name, 0, paths, 8.0, True, ledger_index=True, site_dir=tmp / name)


def _claim(site, settings) -> str:
    from client.app import shared_ledger_refusal
    from privacy.audit import AuditLog

    return shared_ledger_refusal(settings, site, AuditLog(settings.paths.state_dir / "audit.jsonl"))


def _other_patients(shared: str | None = None) -> dict:
    """Tables of other patients (Q000, ...), the first of them renamed `shared` if given."""
    from tests.sitefixtures import site_tables

    tables = site_tables(n_per_class=20, seed=7)
    for table in tables.values():
        table["patient"] = table["patient"].str.replace("P", "Q")
        if shared:
            table.loc[0, "patient"] = shared
    return tables


def test_a_copy_of_the_tables_under_another_split_is_refused_and_the_index_names_no_patient(tmp_path,
                                                                                           isolated_ledger_index):
    """The index claimed training splits, so a copy of a site's tables trained at another seed or val-fraction (most
    of its training patients the first site's) was another dataset to it and spent from zero (review of 2026-12-06).
    A round claims the site's patients, whatever the split, and a patient shared with another ledger is held by it;
    the index keeps them only as tags under its own key, from which no patient id can be read."""
    from client.app import SHARED_LEDGER_REFUSAL
    from tests.sitefixtures import site_tables, write_site

    write_site(tmp_path / "data", site_tables(n_per_class=20))
    first, first_settings = _prepared(tmp_path, "A")
    assert _claim(first, first_settings) == ""
    first.ledger.commit_round(first.ledger.begin_round(first.dataset_fingerprint, "run-A", 1, 1.0, 0.1, 10, padding_tail=0.0), 10)
    for name, kw in (("seed", {"seed": 1}), ("val-fraction", {"val_fraction": 0.3})):
        copy, settings = _prepared(tmp_path, name, **kw)
        assert copy.dataset_fingerprint != first.dataset_fingerprint  # another split, the same patients
        assert _claim(copy, settings) == SHARED_LEDGER_REFUSAL, name

    one, settings = _prepared(tmp_path, "one-shared", tables=_other_patients(shared=first.val.ids[0]))
    assert _claim(one, settings) == SHARED_LEDGER_REFUSAL
    other, settings = _prepared(tmp_path, "others", tables=_other_patients())
    assert _claim(other, settings) == ""  # no patient in common: its own ledger

    text = isolated_ledger_index.read_text()
    assert not any(pid in text for pid in [*first.train.ids, *first.val.ids])
    key = isolated_ledger_index.with_name(isolated_ledger_index.name + ".key")
    assert os.stat(key).st_mode & 0o077 == 0


def test_an_index_entry_of_an_earlier_version_still_holds_its_datasets(tmp_path, isolated_ledger_index):
    """An index written before patients were tagged has only the datasets of each ledger: they still hold, and the
    ledger's next claim adds its tags."""
    from client.app import SHARED_LEDGER_REFUSAL
    from tests.sitefixtures import site_tables, write_site

    write_site(tmp_path / "data", site_tables(n_per_class=20))
    first, first_settings = _prepared(tmp_path, "A")
    first.ledger.commit_round(first.ledger.begin_round(first.dataset_fingerprint, "run-A", 1, 1.0, 0.1, 10, padding_tail=0.0), 10)
    isolated_ledger_index.write_text(json.dumps({"format": "oncofed-ledger-index/1", "ledgers": {
        str(first.ledger.path.resolve()): {"data-path": str(tmp_path / "A" / "data"), "site-dirs": [],
                                           "datasets": [first.dataset_fingerprint], "updated": 0}}}))
    copy, settings = _prepared(tmp_path, "copy")
    assert _claim(copy, settings) == SHARED_LEDGER_REFUSAL  # the same split: its fingerprint
    assert _claim(first, first_settings) == ""  # the first site's round tags its patients
    moved, settings = _prepared(tmp_path, "seed", seed=1)
    assert _claim(moved, settings) == SHARED_LEDGER_REFUSAL
