"""The hash-chained audit log: every edit, insertion, removal or reordering is reported."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from privacy.audit import AuditError, AuditLog, verify
from privacy.site_config import SiteConfig


def _log(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("round", round=i + 1, participants=[11, 22], site_epsilon={"C0": 0.5 * (i + 1)})
    return log.path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_an_intact_log_verifies(tmp_path):
    report = verify(_log(tmp_path))
    assert report.ok and report.entries == 5 and not report.warnings


@pytest.mark.parametrize("size", [10, 5000, 70000])
def test_appends_after_an_entry_longer_than_the_tail_window_keep_one_chain(tmp_path, size):
    """The O(1) tail check reads a small window first: an entry that does not fit in it (or in the large one)
    still leads to a correct next append, by a fresh writer too."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("a", note="x" * size)
    log.append("b")
    AuditLog(tmp_path / "audit.jsonl").append("c", note="y" * size)
    AuditLog(tmp_path / "audit.jsonl").append_many([("d", {}), ("e", {"note": "z" * size})], head=False)
    AuditLog(tmp_path / "audit.jsonl").append("f")
    report = verify(tmp_path / "audit.jsonl")
    assert report.ok and report.entries == 6 and not report.warnings


def test_an_edited_entry_is_reported(tmp_path):
    path = _log(tmp_path)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["site_epsilon"]["C0"] = 0.1  # understate a site's spend
    lines[2] = json.dumps(entry, sort_keys=True)
    _write(path, lines)
    report = verify(path)
    assert not report.ok and any("line 3" in p and "edited" in p for p in report.problems)


def test_an_inserted_entry_is_reported_even_with_a_valid_hash(tmp_path):
    path = _log(tmp_path)
    lines = _lines(path)
    forged = json.loads(lines[1])
    forged["round"] = 99
    from privacy.audit import entry_hash

    forged["hash"] = entry_hash(forged)
    _write(path, lines[:2] + [json.dumps(forged, sort_keys=True)] + lines[2:])
    report = verify(path)
    assert not report.ok and any("inserted" in p for p in report.problems)


def test_a_removed_entry_in_the_middle_is_reported(tmp_path):
    path = _log(tmp_path)
    lines = _lines(path)
    _write(path, lines[:2] + lines[3:])
    report = verify(path)
    assert not report.ok and any("seq 3 where 2 was expected" in p for p in report.problems)


def test_removed_entries_at_the_end_are_reported_by_the_head(tmp_path):
    path = _log(tmp_path)
    lines = _lines(path)
    _write(path, lines[:-1])
    assert any("last entry (seq 4) was removed" in p for p in verify(path).problems)
    _write(path, lines[:-2])
    assert any("entries were removed or rewritten" in p for p in verify(path).problems)


def test_reordered_entries_are_reported(tmp_path):
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)
    assert not verify(path).ok


def test_a_crash_between_append_and_head_update_is_a_warning_and_the_next_append_repairs_it(tmp_path):
    path = _log(tmp_path)
    head = path.with_name(path.name + ".head")
    before = head.read_text()
    AuditLog(path).append("round", round=6)
    head.write_text(before)  # as if the process died after writing the line, before moving the head
    report = verify(path)
    assert report.ok and report.warnings and "one entry behind" in report.warnings[0]
    AuditLog(path).append("run_end")
    report = verify(path)
    assert report.ok and not report.warnings and report.entries == 7


def test_an_entry_whose_write_was_cut_short_is_removed_and_appends_go_on(tmp_path, monkeypatch):
    """A full disk during a write (the failed write is cut back) or a kill mid-write (the next writer cuts the partial
    line): the log ends with its last whole entry and later appends go on, instead of every later append (a resumed
    run's run_start, `oncofed deliver`, add-site) being refused for a broken chain."""
    import errno

    path = _log(tmp_path)
    log = AuditLog(path)
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        log.append("round", round=6)
    monkeypatch.setattr(os, "write", real_write)
    assert verify(path).ok and verify(path).entries == 5
    with open(path, "ab") as fh:  # a kill mid-write: half an entry, no newline
        fh.write(_lines(path)[-1].encode()[:40])
    AuditLog(path).append("round", round=6)
    report = verify(path)
    assert report.ok and report.entries == 6, report.format()


def test_a_last_entry_cut_after_the_head_recorded_it_is_kept_as_evidence_not_cut_away(tmp_path):
    """The cut of a partial line is for a crash mid-write, which never moves the head. A last entry that the head
    records whole and that is now cut short was damaged or altered afterwards: the next append (a prediction, a
    round) cut it away before refusing, erasing what was left of it. It now refuses and leaves the file as it was."""
    path = _log(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # the last entry's end and its newline gone; the head counts them
    with pytest.raises(AuditError, match="head recorded it whole"):
        AuditLog(path).append("prediction", model_version="v0001")
    assert path.read_bytes() == whole[:-20]
    report = verify(path)
    assert not report.ok and any("not a JSON entry" in p for p in report.problems), report.format()


def test_appending_to_a_broken_chain_is_refused_naming_the_command(tmp_path):
    path = _log(tmp_path)
    lines = _lines(path)
    _write(path, lines[:1] + lines[2:])
    with pytest.raises(AuditError, match="oncofed audit verify"):
        AuditLog(path).append("round", round=6)


def _append_many(path: str, worker: int) -> None:
    log = AuditLog(path)
    for i in range(10):
        log.append("round", worker=worker, i=i)


def test_concurrent_writers_keep_one_valid_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs = [multiprocessing.Process(target=_append_many, args=(str(path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    report = verify(path)
    assert report.ok and report.entries == 30


def _append_with(log: AuditLog, worker: int) -> None:
    for i in range(20):
        log.append_many([("prediction", {"worker": worker, "i": i})] * 2, head=i % 5 == 0)


def test_one_log_object_shared_by_threads_and_forked_children_keeps_one_valid_chain(tmp_path):
    """The log keeps its files open between appends: threads of one process share them behind a mutex, a
    forked child opens its own (flock does not tell apart holders of one open file description), and a log
    replaced under the same path is reopened."""
    import threading

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("start")  # the files are open before the fork
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_with, args=(log, 10 + w)) for w in range(2)]
    threads = [threading.Thread(target=_append_with, args=(log, w)) for w in range(3)]
    for t in procs + threads:
        t.start()
    for t in procs + threads:
        t.join()
    assert all(p.exitcode == 0 for p in procs)
    report = verify(path)
    assert report.ok and report.entries == 1 + 5 * 20 * 2, report.format()
    path.rename(tmp_path / "old.jsonl")
    (tmp_path / "audit.jsonl.head").unlink()
    log.append("new log")  # another file under the path: read and appended afresh
    assert verify(path).ok and verify(path).entries == 1


def test_a_child_forked_while_a_thread_holds_the_log_appends_and_a_replaced_lock_file_still_excludes(tmp_path,
                                                                                                     monkeypatch):
    import fcntl
    import os
    import threading
    import time

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("start")
    slow = threading.Event()
    real_fsync, parent = os.fsync, os.getpid()

    def slowed(fd):
        if os.getpid() == parent:
            slow.set()
            time.sleep(0.5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slowed)
    t = threading.Thread(target=lambda: log.append("slow"))
    t.start()
    slow.wait(5)  # the thread holds the log's mutex and lock now
    child = multiprocessing.get_context("fork").Process(target=_append_with, args=(log, 99))
    child.start()
    child.join(30)
    t.join()
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert child.exitcode == 0  # not stuck on the parent's mutex, copied while held
    assert verify(path).ok and verify(path).entries == 2 + 20 * 2

    lock = tmp_path / "audit.jsonl.head.lock"
    lock.unlink()  # e.g. a clean-up: the next lock is taken on the file the path names now
    with log._lock(fcntl.LOCK_EX):
        other = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_oncofed_audit_verify_exits_non_zero_on_tampering(tmp_path):
    from typer.testing import CliRunner

    from oncofed.cli import app

    path = _log(tmp_path)
    ok = CliRunner().invoke(app, ["audit", "verify", str(path)])
    assert ok.exit_code == 0 and "ok, 5 entries" in ok.output
    _write(path, _lines(path)[1:])
    bad = CliRunner().invoke(app, ["audit", "verify", str(path)])
    assert bad.exit_code == 1 and "altered or damaged" in bad.output


def test_a_crash_during_a_group_commit_is_a_warning_and_the_next_append_repairs_it(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("run_start")
    head = (tmp_path / "audit.jsonl.head").read_text()
    log.append_many([("prediction", {"i": i}) for i in range(3)])
    (tmp_path / "audit.jsonl.head").write_text(head)  # the lines reached the disk, the head did not
    report = verify(path)
    assert report.ok and "3 entries behind" in report.warnings[0]
    log.append("run_end")
    report = verify(path)
    assert report.ok and not report.warnings and report.entries == 5



# --- the head's durability off the request path: crash points and the deferred head ----------------------
class _Crash(Exception):
    pass


def _crash_at(monkeypatch, step: int) -> list[str]:
    """From now on, the `step`-th durability call (os.fsync or os.replace, in order) raises, as a crash there
    would stop the writer; returns the calls made."""
    import os

    calls, fsync, replace = [], os.fsync, os.replace

    def hook(name, real):
        def call(*args):
            calls.append(name)
            if len(calls) == step:
                raise _Crash(name)
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", hook("fsync", fsync))
    monkeypatch.setattr(os, "replace", hook("replace", replace))
    return calls


@pytest.mark.parametrize("restarted", [True, False], ids=["restarted-writer", "same-writer"])
@pytest.mark.parametrize("first", [True, False], ids=["first-append", "later-append"])
@pytest.mark.parametrize("step", range(1, 7))
def test_a_crash_at_any_durability_step_leaves_a_log_that_verifies_and_the_next_append_repairs(
        tmp_path, monkeypatch, first, step, restarted):
    """A new log: its empty head (fsync, rename, directory fsync), then the lines (fsync) and the head (fsync,
    rename); later appends: the last three only. After a crash at each step the log verifies with at most a
    warning (never a removed or rewritten entry), the head is never ahead of it, and a restarted writer
    appends and repairs the head (as does the same writer, whose failed step was an error, not a crash)."""
    path = tmp_path / "audit.jsonl"
    if not first:
        _log(tmp_path, 3)
    steps = (["fsync", "replace", "fsync"] if first else []) + ["fsync", "fsync", "replace"]
    log = AuditLog(path)
    calls = _crash_at(monkeypatch, step)
    try:
        log.append_many([("prediction", {"i": i}) for i in range(2)])
    except _Crash:
        assert calls == steps[:step]
    else:
        assert step > len(steps) and calls == steps
    monkeypatch.undo()
    if path.exists():  # else the crash came before the first line: there is no log yet
        report = verify(path)
        assert report.ok, report.format()
        assert all("behind" in w for w in report.warnings)
    (AuditLog(path) if restarted else log).append("run_end")
    report = verify(path)
    written = step >= len(steps) - 2  # the lines are written before their fsync (a crash there may keep them)
    assert report.ok and not report.warnings and report.entries == (0 if first else 3) + 2 * written + 1


def test_a_deferred_head_costs_one_fsync_per_commit_and_write_head_catches_up(tmp_path):
    path = _log(tmp_path, 2)
    log = AuditLog(path)
    for i in range(3):
        log.append_many([("prediction", {"i": i}), ("prediction", {"i": -i})], head=False)
    assert log.fsyncs == {"log": 3, "head": 0, "directory": 0}
    report = verify(path)
    assert report.ok and "6 entries behind" in report.warnings[0] and "prediction service" in report.warnings[0]
    assert log.head_behind and log.write_head() and not log.write_head()
    report = verify(path)
    assert report.ok and not report.warnings and report.entries == 8
    assert log.fsyncs == {"log": 3, "head": 1, "directory": 0}


def test_a_crash_while_writing_a_deferred_head_leaves_it_behind_never_ahead(tmp_path, monkeypatch):
    path = _log(tmp_path, 2)
    log = AuditLog(path)
    log.append_many([("prediction", {"i": 1})], head=False)
    for step in (1, 2):  # the head's fsync, its rename
        _crash_at(monkeypatch, step)
        with pytest.raises(_Crash):
            log.write_head()
        monkeypatch.undo()
        report = verify(path)
        assert report.ok and "one entry behind" in report.warnings[0]
    assert log.write_head() and not verify(path).warnings


def test_a_writer_whose_head_lags_refuses_a_log_that_lost_entries_it_wrote(tmp_path):
    """The head lags the service's commits, so it cannot see the last entries removed; the writer can."""
    path = _log(tmp_path, 2)
    log = AuditLog(path)
    log.append_many([("prediction", {"i": i}) for i in range(3)], head=False)
    _write(path, _lines(path)[:-1])
    assert verify(path).ok  # the head (2 entries) is behind what is left: only a warning
    with pytest.raises(AuditError, match="no longer holds"):
        log.append_many([("prediction", {"i": 9})], head=False)


def test_another_writer_appending_while_the_head_lags_keeps_one_chain_and_the_head_never_moves_back(tmp_path):
    path = _log(tmp_path, 1)
    service, other = AuditLog(path), AuditLog(path)
    service.append_many([("prediction", {"i": 0})], head=False)
    other.append("model_fallback", version="v0001")  # e.g. `oncofed predict`: verifies, appends, writes the head
    service.append_many([("prediction", {"i": 1})], head=False)
    assert service.write_head()
    report = verify(path)
    assert report.ok and not report.warnings and report.entries == 4
    other.append("run_end")
    assert not service.write_head() and verify(path).entries == 5 and not verify(path).warnings

# --- anchors held by the other party: a rewrite by whoever holds the log and its head ---------------------

def _recompute(path: Path, lines: list[dict]) -> None:
    """What someone with write access does: rewrite entries, recompute every hash and the head."""
    from privacy.audit import GENESIS, entry_hash

    prev, out = GENESIS, []
    for seq, entry in enumerate(lines):
        entry = {**entry, "seq": seq, "prev": prev}
        entry.pop("hash", None)
        entry["hash"] = prev = entry_hash(entry)
        out.append(json.dumps(entry, sort_keys=True))
    _write(path, out)
    path.with_name(path.name + ".head").write_text(json.dumps({"entries": len(out), "hash": prev}))


@pytest.fixture()
def server_run(tmp_path):
    """A server run log (CONSORTIUM/runs/r1/audit.jsonl) whose signed head reached a site after round 2."""
    from privacy.audit import AnchorStore, signed_anchor
    from privacy.signing import generate_signing_key, load_private

    op = tmp_path / "op"
    generate_signing_key(op / "signing" / "signing.key", op / "signing" / "signing.pub")
    log = AuditLog(op / "runs" / "r1" / "audit.jsonl")
    log.append("run_start", run="r1-abc")
    for rnd in (1, 2):
        log.append("round", round=rnd, site_epsilon={"C0": 0.5 * rnd})
    anchor = signed_anchor(log, load_private(op / "signing" / "signing.key"), run="r1-abc", run_name="r1")
    store = tmp_path / "C0" / "state" / "audit-anchors.json"
    assert AnchorStore(store).keep(json.dumps(anchor), op / "signing" / "signing.pub") is not None
    log.append("round", round=3, site_epsilon={"C0": 1.5})
    return log.path, store


def test_a_recomputed_server_chain_verifies_alone_but_not_against_the_sites_anchor(server_run):
    path, store = server_run
    entries = [json.loads(x) for x in _lines(path)]
    entries[1]["site_epsilon"]["C0"] = 0.1  # understate a site's spend, then make the chain whole again
    _recompute(path, entries)
    assert verify(path).ok  # the weakness: the chain and the head are where the writer is
    from privacy.audit import anchors_for

    report = verify(path, anchors_for(path, store)[0])
    assert not report.ok and any("no longer holds" in p for p in report.problems)


def test_an_emptied_server_log_with_its_head_deleted_is_detected_by_the_anchor(server_run):
    from typer.testing import CliRunner

    from oncofed.cli import app

    path, store = server_run
    ok = CliRunner().invoke(app, ["audit", "verify", str(path), "--anchors", str(store)])
    assert ok.exit_code == 0 and "holds all 1 anchored head(s)" in ok.output
    path.write_text("")
    path.with_name(path.name + ".head").unlink()
    assert verify(path).ok  # alone, an empty log is a clean one
    bad = CliRunner().invoke(app, ["audit", "verify", str(path), "--anchors", str(store)])
    assert bad.exit_code == 1 and "no longer holds" in bad.output and "signed by the server" in bad.output


def test_a_site_keeps_only_server_anchors_that_verify_and_the_newest_per_run(server_run, tmp_path):
    from privacy.audit import AnchorStore, signed_anchor
    from privacy.signing import generate_signing_key, load_private

    path, store = server_run
    generate_signing_key(tmp_path / "evil.key", tmp_path / "evil.pub")
    forged = signed_anchor(AuditLog(path), load_private(tmp_path / "evil.key"), run="r1-abc", run_name="r1")
    with pytest.raises(AuditError, match="does not verify"):
        AnchorStore(store).keep(json.dumps(forged), path.parents[2] / "signing" / "signing.pub")
    newer = signed_anchor(AuditLog(path), load_private(path.parents[2] / "signing" / "signing.key"),
                          run="r1-abc", run_name="r1")
    assert AnchorStore(store).keep(json.dumps(newer), path.parents[2] / "signing" / "signing.pub")["entries"] == 4
    assert AnchorStore(store).load()["server"]["r1"]["entries"] == 4


def test_a_recomputed_site_chain_is_detected_by_the_heads_the_server_recorded(tmp_path):
    """The site sends its head with every update; the server's run log records it; a site that rewrites
    its history (say, drops a round it trained) no longer holds the recorded head."""
    from typer.testing import CliRunner

    from oncofed.cli import app

    site_log = AuditLog(tmp_path / "C0" / "state" / "audit.jsonl")
    site_log.path.parent.mkdir(parents=True)
    SiteConfig(site_name="C0", state_dir=str(site_log.path.parent), model_dir=str(tmp_path / "C0" / "models")).write(
        tmp_path / "C0" / "site.json")
    server = AuditLog(tmp_path / "op" / "runs" / "r1" / "audit.jsonl")
    for rnd in (1, 2):
        head = site_log.append("round_trained", run="r1-abc", round=rnd, epsilon=0.5 * rnd)["hash"]
        server.append("round", round=rnd, site_audit_heads={"C0": head, "C1": "f" * 64})
    site_log.append("prediction", model="v0001")
    ok = CliRunner().invoke(app, ["audit", "verify", str(site_log.path), "--anchors", str(server.path)])
    assert ok.exit_code == 0 and "holds all 2 anchored head(s)" in ok.output
    entries = [json.loads(x) for x in _lines(site_log.path)]
    _recompute(site_log.path, [entries[0], entries[2]])  # round 2's training removed, chain recomputed
    assert verify(site_log.path).ok
    bad = CliRunner().invoke(app, ["audit", "verify", str(site_log.path), "--anchors", str(server.path)])
    assert bad.exit_code == 1 and "round entry seq 1" in bad.output
    site_log.path.write_text("")
    site_log.head.unlink()
    assert CliRunner().invoke(app, ["audit", "verify", str(site_log.path), "--anchors", str(server.path)]).exit_code == 1


def test_an_anchor_kept_by_a_site_without_a_trust_anchor_still_verifies_later_and_a_forged_one_does_not(tmp_path):
    from privacy.audit import AnchorStore, anchors_for, signed_anchor
    from privacy.signing import generate_signing_key, load_private

    generate_signing_key(tmp_path / "signing.key", tmp_path / "signing.pub")
    generate_signing_key(tmp_path / "evil.key", tmp_path / "evil.pub")
    log = AuditLog(tmp_path / "runs" / "r1" / "audit.jsonl")
    log.append("run_start", run="r1-abc")
    store = tmp_path / "site" / "audit-anchors.json"
    AnchorStore(store).keep(json.dumps(signed_anchor(log, load_private(tmp_path / "signing.key"), run="r1-abc",
                                                     run_name="r1")), None)  # kept, marked unverified
    assert AnchorStore(store).load()["server"]["r1"]["unverified"] is True
    held, problems = anchors_for(log.path, store, signing_public_key=tmp_path / "signing.pub")
    assert len(held) == 1 and not problems and verify(log.path, held).ok
    held, problems = anchors_for(log.path, store, signing_public_key=tmp_path / "evil.pub")
    assert not held and "is not the consortium's" in problems[0]


def test_a_damaged_anchors_file_is_set_aside_not_overwritten_by_the_next_anchor(server_run):
    """A site's audit-anchors.json that no longer parses (a hand edit gone wrong) read as empty, and the next
    server anchor replaced the file: every other run's signed head, the evidence the operator's run logs are
    checked against, was gone. The damaged file is now kept beside the new one."""
    from privacy.audit import AnchorStore, signed_anchor
    from privacy.signing import load_private

    path, store = server_run
    damaged = store.read_text().replace('"server"', '"server" ,,', 1)  # one slip of the editor
    store.write_text(damaged)
    newer = signed_anchor(AuditLog(path), load_private(path.parents[2] / "signing" / "signing.key"),
                          run="r1-abc", run_name="r1")
    assert AnchorStore(store).keep(json.dumps(newer), path.parents[2] / "signing" / "signing.pub") is not None
    kept = list(store.parent.glob("audit-anchors.json.damaged-*"))
    assert len(kept) == 1 and kept[0].read_text() == damaged
    assert AnchorStore(store).load()["server"]["r1"]["entries"] == 4


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_an_append_whose_head_cannot_be_written_leaves_no_entry(tmp_path, monkeypatch, failing):
    """A full disk after the line is durable, at the head: the caller is told nothing was recorded (the service then
    refuses the model switch it was recording), so the log must not hold the line either."""
    import errno

    path = _log(tmp_path, 3)
    before = path.read_bytes()
    log = AuditLog(path)
    calls, real = [], getattr(os, failing)

    def disk_full_at_the_head(*args):  # the line's fsync goes through; the head's write fails
        calls.append(args)
        if failing == "replace" or len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, failing, disk_full_at_the_head)
    with pytest.raises(OSError, match="No space"):
        log.append("model_activated", version="v0002")
    monkeypatch.undo()
    assert path.read_bytes() == before
    report = verify(path)
    assert report.ok and not report.warnings and report.entries == 3, report.format()
    log.append("run_end")  # the same writer goes on from the log as it is
    report = verify(path)
    assert report.ok and not report.warnings and report.entries == 4
    assert "model_activated" not in path.read_text()
