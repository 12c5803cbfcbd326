"""Append-only, hash-chained audit log (JSON lines), kept by the server and by every site.

Each line is one event: `seq` (0, 1, ...), `time` (UTC, ISO 8601), `event`, the event's fields,
`prev` (the previous entry's hash; 64 zeros for the first) and `hash`, the SHA-256 of the entry's
canonical JSON without `hash`. A head file beside the log (`<log>.head`, replaced atomically after
appends; the prediction service defers it, below) holds the entry count and the last hash, so that
removing entries from the end is detected too. `verify` reports every edited, inserted, removed or
reordered entry.

What the chain does and does not prove: anyone who edits an entry must recompute every later hash
and the head; a chain alone cannot stop someone with write access from doing exactly that, or from
emptying the log and deleting the head. So each party's head is anchored with the other party
(shared_models.protocol): every round the server sends each site its run log's head signed with the
consortium's model-signing key (`signed_anchor`; the site keeps the newest per run in its
`AnchorStore`), and each site sends its own head to the server, which records it in the run's log.
`verify(path, anchors)` then requires every anchored hash to still be in the log at its position: a
log rewritten or emptied before an anchor was taken no longer holds it. (Entries after the last
anchor the other party received are protected by the chain alone until the next exchange.)

Appends take an exclusive lock (flock) on the head file, so concurrent writers (several ServerApp
or ClientApp processes) serialise; the line is fsynced before the head moves, so the head is never
ahead of the durable log. An append is all or nothing for its caller: if it raises an OSError (a full disk), the
log holds none of its entries (a head that cannot be written takes the fsynced lines back out). A head BEHIND the
log is a handled state: `verify` reports it as a warning
and the next append (or `write_head`) repairs it. It arises two ways:
- a crash between the line and the head;
- the prediction service's group commit (`append_many(..., head=False)`): it fsyncs the lines, answers,
  and moves the head only when its audit queue goes idle (at least once a second under load, and at
  shutdown), so a commit under load costs one fsync, not three. Truncation detection by the head lags
  by at most that; the writing process itself keeps the log's end in memory and refuses to extend a
  log that lost entries it wrote.
The head is replaced by rename without a directory fsync: after a crash either the old head (behind: a
warning) or the new one is found, never a torn one (the temporary file is fsynced before the rename).
A new log's head (0 entries) is written, with its directory fsynced, before its first line, so that
no crash leaves entries without a head (which reads as entries removed from the end).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from shared_models.files import complete_bytes, cut_partial_line, write_json_atomic

GENESIS = "0" * 64
ANCHOR_KIND = "oncofed-audit-anchor/1"
ANCHORS_FORMAT = "oncofed-audit-anchors/1"
AUDIT_FILE = "audit.jsonl"  # a site's in its state directory, the server's in a run's output directory
ANCHORS_FILE = "audit-anchors.json"  # in a site's state directory, beside its audit log


class AuditError(ValueError):
    """An audit log that cannot be appended to (its chain is broken, or it lost entries): names the file and the fix."""


def entry_hash(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class VerifyReport:
    path: Path
    entries: int = 0
    last_hash: str = GENESIS
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    anchored: int = 0  # anchors held by another party that this log was checked against

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        if self.ok:
            lines = [f"{self.path}: ok, {self.entries} entries, chain intact, last hash {self.last_hash[:16]}..."
                     + (f", holds all {self.anchored} anchored head(s)" if self.anchored else "")]
        else:
            lines = [f"{self.path}: {len(self.problems)} problem(s); the log has been altered or damaged:"]
            lines += [f"  - {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _read_head(head: Path) -> dict | None:
    try:
        return json.loads(head.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": True}


def verify(path: str | Path, anchors: list[dict] = ()) -> VerifyReport:
    """Check every line, the chain and the head, and that the log still holds every anchored entry
    (`anchors`: {"hash", optional "entries", "source"} held by another party). Never raises for a damaged file."""
    path = Path(path)
    report = VerifyReport(path)
    if not path.exists():
        report.problems.append(f"{path} does not exist")
        return report
    prev, expected_seq = GENESIS, 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        report.problems.append(f"{path} cannot be read: {e}")
        return report
    for lineno, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            report.problems.append(f"line {lineno}: not a JSON entry ({e}): edited or damaged")
            continue
        seq = entry.get("seq")
        if entry.get("hash") != entry_hash(entry):
            report.problems.append(f"line {lineno} (seq {seq}): its content does not match its hash: edited")
        if seq != expected_seq:
            kind = "removed before it" if isinstance(seq, int) and seq > expected_seq else "inserted or reordered"
            report.problems.append(f"line {lineno}: seq {seq} where {expected_seq} was expected: entries {kind}")
        if entry.get("prev") != prev:
            report.problems.append(f"line {lineno} (seq {seq}): does not chain to the entry before it: an entry "
                                   "was inserted, removed or reordered")
        prev = str(entry.get("hash"))
        expected_seq = (seq + 1) if isinstance(seq, int) else expected_seq + 1
        report.entries += 1
    report.last_hash = prev
    head = _read_head(_head_path(path))
    if head is None:
        if report.entries:
            report.problems.append(f"{_head_path(path).name} is missing: entries may have been removed from the end")
    elif head.get("unreadable"):
        report.problems.append(f"{_head_path(path).name} is unreadable")
    elif head.get("entries") == report.entries + 1:
        report.problems.append(f"the last entry (seq {report.entries}) was removed: the head records "
                               f"{head['entries']} entries")
    elif (isinstance(head.get("entries"), int) and 0 <= head["entries"] < report.entries
          and head.get("hash") == _hash_at(lines, head["entries"] - 1)):
        behind = report.entries - head["entries"]
        report.warnings.append(f"the head is {'one entry' if behind == 1 else f'{behind} entries'} behind the log: "
                               "a running prediction service moves it when its audit queue goes idle (at least once "
                               "a second), else a crash came between an append and the head update; the next "
                               "append repairs it")
    elif head.get("entries") != report.entries or head.get("hash") != report.last_hash:
        report.problems.append(f"the head records {head.get('entries')} entries ending in "
                               f"{str(head.get('hash'))[:16]}..., the log has {report.entries} ending in "
                               f"{report.last_hash[:16]}...: entries were removed or rewritten")
    _check_anchors(report, lines, anchors)
    return report


def _check_anchors(report: VerifyReport, lines: list[str], anchors: list[dict]) -> None:
    seq_of = {}
    for line in lines:
        try:
            entry = json.loads(line)
            seq_of[str(entry.get("hash"))] = entry.get("seq")
        except (ValueError, AttributeError):
            continue
    before = len(report.problems)
    for a in anchors:
        at = f"{a['entries']} entries ending in " if isinstance(a.get("entries"), int) else "an entry hashing to "
        what = f"{a.get('source', 'an anchor')} holds this log's head as of {a.get('time', '?')} ({at}{a['hash'][:16]}...)"
        if a["hash"] not in seq_of:
            report.problems.append(f"{what}, which this log ({report.entries} entries) no longer holds: the log was "
                                   "rewritten, its chain recomputed, or it was emptied or replaced after that point")
        elif isinstance(a.get("entries"), int) and seq_of[a["hash"]] != a["entries"] - 1:
            report.problems.append(f"{what}, found here as seq {seq_of[a['hash']]}: entries were inserted or removed "
                                   "before it")
    if len(report.problems) == before:
        report.anchored = len(anchors)


def signed_anchor(log: "AuditLog", key, **ids) -> dict:
    """The log's current head (entries, last hash) with `ids` (run key, run name), signed with `key`
    (the consortium's Ed25519 model-signing key): what the server sends to every site each round."""
    from privacy.signing import sign

    entries, last = log.current_head()
    return sign({"kind": ANCHOR_KIND, **ids, "entries": entries, "hash": last,
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}, key)


class AnchorStore:
    """A party's copies of the other party's audit heads (a site's `state/audit-anchors.json`): the newest
    server anchor per run, its signature checked against the consortium's model-signing key."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"format": ANCHORS_FORMAT, "server": {}}
        return data if isinstance(data, dict) and isinstance(data.get("server"), dict) else \
            {"format": ANCHORS_FORMAT, "server": {}}

    def keep(self, anchor_json: str, signing_public_key: str | Path | None) -> dict | None:
        """Store a server anchor if its signature verifies (or no trust anchor is configured: then it is
        kept marked unverified) and it is newer than the one held for its run. Returns what was kept."""
        from privacy.signing import SignatureError, load_public, verify as verify_signature

        anchor = json.loads(anchor_json)
        if not isinstance(anchor, dict) or anchor.get("kind") != ANCHOR_KIND or "run_name" not in anchor:
            raise AuditError(f"not an audit anchor: {anchor_json[:200]}")
        if signing_public_key:
            try:
                verify_signature(anchor, load_public(signing_public_key))
            except SignatureError as e:
                raise AuditError(f"the server's audit anchor for run {anchor.get('run')} does not verify: {e}") from None
        else:
            anchor = {**anchor, "unverified": True}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.load()
            if not data["server"] and self.path.exists() and self._damaged():
                self._set_aside()
            held = data["server"].get(str(anchor["run_name"]))
            if held and int(held.get("entries", 0)) >= int(anchor.get("entries", 0)):
                return None
            data["server"][str(anchor["run_name"])] = anchor
            write_json_atomic(self.path, data)
        return anchor

    def _damaged(self) -> bool:
        """The file exists but holds no anchors file (a hand edit gone wrong, a restore of another file)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return True
        return not (isinstance(data, dict) and isinstance(data.get("server"), dict))

    def _set_aside(self) -> None:
        """Keep a damaged anchors file beside the new one, never overwrite it: its other runs' signed heads are
        the evidence the operator's run logs are checked against, and may be recoverable by hand."""
        import logging

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        os.replace(self.path, aside)
        logging.getLogger(__name__).warning(
            "%s: not an anchors file; kept as %s (repair it by hand and merge it back) and a new one started",
            self.path, aside)


def anchors_for(log: str | Path, source: str | Path, site: str | None = None,
                signing_public_key: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """The anchors `source` holds for `log`, and problems with the source itself.

    `source` is either a site's anchor store (audit-anchors.json: the server's signed heads, for the run
    log runs/NAME/audit.jsonl, matched by NAME) or a server run audit log (.jsonl: the heads site `site`
    sent, recorded in its `round`, `run_end` and `redelivery` entries)."""
    from privacy.signing import SignatureError, load_public, verify as verify_signature

    log, source = Path(log), Path(source)
    problems: list[str] = []
    if source.suffix == ".jsonl":
        if not site:
            raise AuditError(f"--anchors {source} is a server run log: name the site whose log {log} is with --site")
        rep = verify(source)
        if not rep.ok:
            problems.append(f"the anchoring log {source} does not verify itself: its anchors prove nothing")
        out = []
        for line in source.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            heads = dict(e.get("site_audit_heads") or {})
            for d in e.get("deliveries") or []:
                if isinstance(d, dict) and d.get("site") and d.get("audit_head"):
                    heads[str(d["site"])] = d["audit_head"]
            if heads.get(site):
                out.append({"hash": str(heads[site]), "time": e.get("time"),
                            "source": f"{source} ({e.get('event')} entry seq {e.get('seq')})"})
        return out, problems
    store = AnchorStore(source).load()
    run_name = log.parent.name
    anchor = store["server"].get(run_name)
    if anchor is None:
        return [], [f"{source} holds no anchor for run {run_name!r} (runs: {', '.join(store['server']) or 'none'})"]
    if signing_public_key:
        try:
            verify_signature({k: v for k, v in anchor.items() if k != "unverified"}, load_public(signing_public_key))
        except SignatureError as e:
            return [], [f"{source}: the anchor for run {run_name!r} is not the consortium's ({e})"]
    return [{"hash": str(anchor["hash"]), "entries": int(anchor["entries"]), "time": anchor.get("time"),
             "source": f"{source} (run {run_name!r}, signed by the server)"}], problems


def _hash_at(lines: list[str], index: int) -> str:
    if index < 0:
        return GENESIS
    try:
        return json.loads(lines[index]).get("hash", "")
    except (ValueError, IndexError, AttributeError):
        return ""


def _head_path(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


class AuditLog:
    """`AuditLog(path).append("round", round=3, participants=[...])`. `fsyncs` counts this process's
    fsyncs by file (log, head, directory): the disk's share of a commit, for the service's /metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.head = _head_path(self.path)
        self.fsyncs = {"log": 0, "head": 0, "directory": 0}
        self._end: dict | None = None  # {"entries", "hash", "bytes", "time"} of the log as this process last saw it
        self._head: tuple | None = None  # (entries, hash, bytes) this process last wrote to the head
        # the log kept open between appends, for reading its tail and appending (reopened when the path names
        # another file, or in a forked child): a commit then makes 8 system calls, not ~15. Each one gives up
        # the GIL, and the service's event loop may keep it for up to the switch interval: a commit of 5
        # entries took 2.5 ms at the median beside a busy thread instead of 6.5 (git log -p docs/results.md)
        self._open: tuple | None = None  # (pid, device, inode, reader, appender)
        self._lock_fd: tuple | None = None  # (pid, descriptor of <log>.head.lock)
        self._mutexes: dict[int, threading.Lock] = {}  # by process id (see _lock)
        self._dir_made = False

    def append(self, event: str, **fields) -> dict:
        return self.append_many([(event, fields)])[0]

    def check_appendable(self) -> None:
        """Raise AuditError or OSError if an append would fail now (a broken chain, a lost head with entries behind
        it, a file that cannot be opened for writing); writes nothing. A site checks it before it spends budget on an
        update whose record it could not then write."""
        if not self._dir_made:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._dir_made = True
        with self._lock(fcntl.LOCK_EX):
            self._tail()
            self._files(create=True)

    def last(self, event: str, **match) -> dict:
        """The newest entry of `event` whose fields equal `match`, or {} (read from the end of the log)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event and all(entry.get(k) == v for k, v in match.items()):
                return entry
        return {}

    def append_many(self, items: list[tuple[str, dict]], *, head: bool = True) -> list[dict]:
        """Several entries under one lock and one fsync (the prediction service's group commit). With
        `head=False` the head is left behind for `write_head` (the module docstring says why that is safe)."""
        if not self._dir_made:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._dir_made = True
        with self._lock(fcntl.LOCK_EX):
            seq, prev = self._tail()
            size = self._end["bytes"] if self._end else 0
            if seq == 0 and not self.head.exists():  # a head of 0 entries first: a crash after the line is "behind"
                self._end = {"entries": 0, "hash": GENESIS, "bytes": size, "time": None}
                self._write_head()
            entries, lines = [], []
            for event, fields in items:
                entry = {"seq": seq, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                         "event": event, **fields, "prev": prev}
                entry["hash"] = entry_hash(entry)
                entries.append(entry)
                lines.append(json.dumps(entry, sort_keys=True, default=str) + "\n")
                seq, prev = seq + 1, entry["hash"]
            data = "".join(lines).encode()
            fd = self._files(create=True)[4]
            written = 0
            try:
                while written < len(data):
                    written += os.write(fd, data[written:])
                self._fsync(fd, "log")
            except OSError:  # a full disk, an I/O error: the log ends where it did, not in a partial line
                os.ftruncate(fd, size)
                raise
            # no other writer appends while the lock is held; the next append checks the size and the last line
            before, self._end = self._end, {"entries": seq, "hash": prev, "bytes": size + len(data),
                                            "time": entries[-1]["time"]}
            if head:
                try:
                    self._write_head()
                except OSError:
                    # the caller is told nothing was recorded and refuses its action (an activation, a round): the
                    # durable lines must go too, or the log records what never happened. (A crash here instead keeps
                    # them with the head behind: the handled state above.)
                    if self._head != (seq, prev, size + len(data)):  # (the head did not move to them)
                        os.ftruncate(fd, size)
                        self._end = before
                        self._fsync(fd, "log")
                    raise
        return entries

    def _files(self, create: bool = False, st: os.stat_result | None = None) -> tuple | None:
        """(pid, device, inode, reader fd, appender fd) of the file the path names now (`st`: its stat, if
        taken), opened again when that is another file or this is a forked child; None if there is none."""
        if st is None:
            st = _stat_or_none(self.path)
        kept = self._open
        if kept is not None and st is not None and kept[:3] == (os.getpid(), st.st_dev, st.st_ino):
            return kept
        if st is None and not create:
            return None
        self._close_files()
        appender = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            reader = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(appender)
            raise
        st = os.fstat(appender)
        self._open = (os.getpid(), st.st_dev, st.st_ino, reader, appender)
        return self._open

    def _close_files(self) -> None:
        kept, self._open = getattr(self, "_open", None), None
        if kept is not None and kept[0] == os.getpid():  # a forked child leaves its parent's descriptors alone
            for fd in kept[3:]:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __del__(self):
        self._close_files()
        lock = getattr(self, "_lock_fd", None)
        if lock is not None and lock[0] == os.getpid():
            try:
                os.close(lock[1])
            except OSError:
                pass

    @property
    def head_behind(self) -> bool:
        """This process appended entries the head does not record yet (a hint: `write_head` checks under the lock)."""
        end = self._end
        return end is not None and self._head != (end["entries"], end["hash"], end["bytes"])

    def write_head(self) -> bool:
        """Move the head to the log's end if appends left it behind; True if it was written."""
        if not self.head_behind:
            return False
        with self._lock(fcntl.LOCK_EX):
            self._tail()
            if self._end is None:
                return False
            if _read_head(self.head) == {k: self._end[k] for k in ("entries", "hash", "bytes")}:  # another writer's
                self._head = (self._end["entries"], self._end["hash"], self._end["bytes"])
                return False
            self._write_head()
        return True

    def current_head(self) -> tuple[int, str]:
        """(entries, last hash) of the log now."""
        with self._lock(fcntl.LOCK_SH):
            return self._tail()

    @contextmanager
    def _lock(self, kind: int):
        """The append lock (flock on `<log>.head.lock`) across processes; across this process's threads, a mutex
        in front of it (they share one open file description, which flock does not tell apart). A forked child
        gets a mutex and a description of its own (the parent's mutex may have been held at the fork); a lock
        file replaced under its path is opened again (a flock on the old one would exclude nobody)."""
        pid = os.getpid()
        with self._mutexes.setdefault(pid, threading.Lock()):
            path = self.head.with_name(self.head.name + ".lock")
            while True:
                if self._lock_fd is None or self._lock_fd[0] != pid:  # new, or a forked child: its own description
                    self._lock_fd = (pid, os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
                fd = self._lock_fd[1]
                fcntl.flock(fd, kind)
                held, now = os.fstat(fd), _stat_or_none(path)
                if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)  # the path names another file (or none) now: lock that one
                os.close(fd)
                self._lock_fd = None
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _fast_tail(self, known: dict | None, st: os.stat_result) -> tuple[int, str] | None:
        """O(1): `known` (the head, or this process's last view) names the log's size, entry count and last
        hash, and the last line matches them. Anything else (an older head, a crash between line and head,
        another writer, any change of size) takes the full verification. `oncofed audit verify` always
        checks the whole chain. `st`: the log's stat, taken under the lock."""
        if not known or "bytes" not in known or known.get("unreadable") or st.st_size != known["bytes"]:
            return None
        size = known["bytes"]
        last = []
        if size:
            fd = self._files(st=st)[3]
            for window in (4096, 65536):  # an entry is a few hundred bytes: the small window nearly always holds it
                chunk = os.pread(fd, min(window, size), max(0, size - window))
                if size <= window or b"\n" in chunk[:-1]:  # the last line starts inside the window
                    break
            last = chunk.splitlines()[-1:]
        try:
            entry = json.loads(last[0]) if last else None
        except ValueError:
            return None
        if (entry is None or entry.get("hash") != known.get("hash") or entry.get("seq") != known.get("entries", 0) - 1
                or entry_hash(entry) != entry["hash"]):
            return None
        return known["entries"], known["hash"]

    def _tail(self) -> tuple[int, str]:  # under the lock
        """(next seq, last hash), from the log itself; refuses to extend a broken chain, or a log that no
        longer holds the entries this process last saw in it (the head may lag: see the module docstring)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._end = None
            return 0, GENESIS
        size = st.st_size
        fast = self._fast_tail(self._end, st) or self._fast_tail(_read_head(self.head), st)
        if fast is None and size and _ends_mid_line(self.path):  # a write a kill cut short: never an entry
            head = _read_head(self.head) or {}
            if isinstance(head.get("bytes"), int) and head["bytes"] > complete_bytes(self.path):
                # the head moves only after the line is on disk: a head that counts the cut line's bytes means the
                # line was whole once and was damaged or cut since, not a crash; cutting it would erase the evidence
                raise AuditError(f"{self.path}: its last line is cut short, but the head recorded it whole: the log "
                                 f"was damaged or altered after it was written (run `oncofed audit verify {self.path}`)"
                                 "; keep it as evidence (nothing was changed) and start a new log")
            import logging

            logging.getLogger(__name__).warning("%s: removed %d bytes of an entry whose write was cut short (a kill "
                                                "or a full disk)", self.path, cut_partial_line(self.path))
            st = os.stat(self.path)
            size = st.st_size
            fast = self._fast_tail(self._end, st) or self._fast_tail(_read_head(self.head), st)
        if fast is None:
            seen = ([{**self._end, "source": f"this process's last view of {self.path.name}"}]
                    if self._end and self._end["entries"] else [])
            report = verify(self.path, seen)
            if not report.ok:
                raise AuditError(f"{self.path}: refusing to append to an audit log whose chain is broken or "
                                 "that lost entries "
                                 f"(run `oncofed audit verify {self.path}`); keep it as evidence and start a new "
                                 f"log:\n{report.format()}")
            fast = report.entries, report.last_hash
        same = self._end is not None and (self._end["entries"], self._end["hash"]) == fast
        self._end = {"entries": fast[0], "hash": fast[1], "bytes": size,
                     "time": self._end["time"] if same else datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        return fast

    def _write_head(self) -> None:  # under the lock
        """Replace the head by rename after fsyncing the new one; the directory is fsynced only when the head
        is created (a lost rename leaves the old head: behind, a warning)."""
        first = not self.head.exists()
        tmp = self.head.with_name(self.head.name + ".tmp")
        end = self._end
        try:
            with open(tmp, "w") as fh:
                json.dump({"entries": end["entries"], "hash": end["hash"], "bytes": end["bytes"]}, fh, indent=1)
                fh.write("\n")
                fh.flush()
                self._fsync(fh.fileno(), "head")
            os.replace(tmp, self.head)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._head = (end["entries"], end["hash"], end["bytes"])
        if first:
            dir_fd = os.open(self.head.parent, os.O_RDONLY)
            try:
                self._fsync(dir_fd, "directory")
            finally:
                os.close(dir_fd)

    def _fsync(self, fd: int, what: str) -> None:
        os.fsync(fd)
        self.fsyncs[what] += 1
