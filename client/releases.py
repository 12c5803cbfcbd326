"""The updates a site has released, kept so that a resumed server gets the same bits, not a new spend.

Under DP a round's update is a release of the site's data: its privacy ledger counts it once, when it
is committed (before the update leaves the site). If the server crashes after that and resumes the
run from an earlier checkpoint, it asks for the same round again. Training again would be a second
release (a second spend); instead the site sends back the update it already released, which reveals
nothing new (resending is post-processing of what the server could already have kept). It does so
only for the same run, round and global weights: any other request for a released round is refused.

One file per (run, round) in the site's state directory, written atomically before the update leaves.
Only the newest `KEEP` rounds of a run stay: the server asks for round r only after checkpointing round
r - 1, and it resumes from its latest checkpoint, so a resumed server can ask again only for the newest
round the site released. An older round asked again finds no copy and is refused (no second spend).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_models.files import atomic_file, pid_alive


class ReleaseDamaged(Exception):
    """A file of `released/` that cannot be read (an update's copy, or the record of the sum or of the SecAgg+
    neighbours a round went into): `path` (relative to the site's state directory), `why`."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


@dataclass
class Release:
    global_sha256: str  # the global weights the update was trained from
    delta: list[np.ndarray]
    num_examples: int
    metrics: dict


KEEP = 2  # the newest released round is the one a resumed server can ask again; one more for margin


class ReleaseStore:
    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir) / "released"

    @staticmethod
    def directory(run_id: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", run_id)

    def _path(self, run_id: str, rnd: int) -> Path:
        return self.root / self.directory(run_id) / f"round-{rnd:04d}.npz"

    def check_writable(self, room: int = 64 << 20) -> None:
        """Raise OSError if a copy could not be kept now: the directory cannot be made or written, or its disk has
        less than `room` bytes free (a model's copy is a few MB; the margin keeps a round from being trained, spent
        and then withheld for want of space). Writes nothing."""
        import errno
        import shutil

        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OSError(errno.EACCES, "cannot write to it", str(self.root))
        if (free := shutil.disk_usage(self.root).free) < room:
            raise OSError(errno.ENOSPC, f"{free >> 20} MB free, fewer than {room >> 20} MB", str(self.root))

    def kept(self) -> list[tuple[str, int]]:
        """(run directory, round) of every release copy on disk: updates that left the site under DP."""
        return sorted((p.parent.name, int(p.stem.split("-")[1])) for p in self.root.glob("*/round-[0-9]*.npz"))

    def unrecorded(self, committed) -> list[str]:
        """The release copies whose round a ledger's committed rounds lack: that ledger is older than what the site
        sent (restored from an old backup), and would spend those rounds again. `committed`: a function returning the
        ledger's committed rounds (PrivacyLedger.committed_rounds), called after the copies are listed: a round
        another process of the site commits, then saves, between the two reads is then in both (listed the other way
        round, it would be a copy without its ledger record, and the site would refuse to train for a stale ledger)."""
        kept = self.kept()
        recorded = {(self.directory(run), rnd) for run, rnd in committed()}
        return [f"{run}/round-{rnd:04d}" for run, rnd in kept if (run, rnd) not in recorded]

    def save(self, run_id: str, rnd: int, release: Release) -> None:
        path = self._path(run_id, rnd)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"global_sha256": release.global_sha256, "num_examples": release.num_examples,
                "metrics": release.metrics}
        with atomic_file(path, "wb") as fh:
            np.savez(fh, *release.delta, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        for old in sorted(path.parent.glob("round-[0-9]*.npz"))[:-KEEP]:  # after the new one is durable
            if int(old.stem.split("-")[1]) < rnd:
                old.unlink(missing_ok=True)
                old.with_suffix(".unmask.json").unlink(missing_ok=True)
                old.with_suffix(".secagg.json").unlink(missing_ok=True)

    def has(self, run_id: str, rnd: int) -> bool:
        return self._path(run_id, rnd).exists()

    def _record(self, run_id: str, rnd: int, kind: str) -> Path:
        return self._path(run_id, rnd).with_suffix(f".{kind}.json")

    def _read(self, run_id: str, rnd: int, kind: str) -> dict | None:
        """A round's record, None only if there is none: a record that cannot be read raises ReleaseDamaged, for
        read as "none" it would let the site put the round's update into a second sum (the check fails closed)."""
        path = self._record(run_id, rnd, kind)
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ReleaseDamaged(path.relative_to(self.root.parent), f"{type(e).__name__}: {e}") from None

    def _write(self, run_id: str, rnd: int, kind: str, record: dict) -> None:
        path = self._record(run_id, rnd, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "w") as fh:
            fh.write(json.dumps(record))
        # kept for every round, DP or not (a run without DP keeps no release beside it): only the newest KEEP
        # rounds can be asked again, as for the releases. A round whose copy is kept keeps its records (`save` drops
        # them with it): a site that skipped a round would otherwise resend a copy whose exchange it forgot
        for old in sorted(path.parent.glob(f"round-[0-9]*.{kind}.json"))[:-KEEP]:
            if (old_rnd := int(old.name.split(".")[0].split("-")[1])) < rnd and not self.has(run_id, old_rnd):
                old.unlink(missing_ok=True)

    def _field(self, record: dict, key: str, run_id: str, rnd: int, kind: str, ids: bool = True):
        value = record.get(key)
        if not (isinstance(value, list) and all(type(i) is int for i in value) if ids else type(value) is int):
            raise ReleaseDamaged(self._record(run_id, rnd, kind).relative_to(self.root.parent),
                                 f"{key!r} is not {'a list of node ids' if ids else 'a number of sites'}")
        return value

    def unmasked_with(self, run_id: str, rnd: int) -> list[int] | None:
        """The sites (SecAgg+ node ids) whose sum this site helped unmask in this round, None if it did not;
        ReleaseDamaged if the record cannot be read."""
        record = self._read(run_id, rnd, "unmask")
        return None if record is None else self._field(record, "active", run_id, rnd, "unmask")

    def record_unmask(self, run_id: str, rnd: int, active: list[int]) -> None:
        """Kept before the key shares leave: a released update is only ever unmasked in this one sum. In a
        second sum over other sites (a resumed round) the difference of the two would reveal single updates."""
        self._write(run_id, rnd, "unmask", {"active": sorted(int(i) for i in active)})

    def sent_among(self, run_id: str, rnd: int) -> tuple[list[int], int] | None:
        """(the SecAgg+ neighbours, the threshold) of the exchange this round's masked update left the site in,
        None if it never left; ReleaseDamaged if the record cannot be read. A record kept before training whose
        attempt ended before its update could leave (its process is gone, killed mid-training, and it never marked
        the update leaving: `mark_left`) binds nothing: nothing was sent. One of an earlier version, without the
        mark, binds."""
        record = self._read(run_id, rnd, "secagg")
        if record is None:
            return None
        if record.get("left") is False and not _alive(record.get("pid")):
            return None
        return (self._field(record, "neighbours", run_id, rnd, "secagg"),
                self._field(record, "threshold", run_id, rnd, "secagg", ids=False))

    def record_sent(self, run_id: str, rnd: int, neighbours: list[int], threshold: int) -> None:
        """Kept before the masked update leaves: the sites holding shares of its self-mask seed (SecAgg+'s
        neighbours, those that completed setup) and how many shares unmask it. The update goes into no exchange
        among other sites: there the sites that gave no key shares for the first sum could unmask a second one."""
        self._write(run_id, rnd, "secagg", {"neighbours": sorted(int(i) for i in neighbours),
                                            "threshold": int(threshold), "left": False, "pid": os.getpid()})

    def mark_left(self, run_id: str, rnd: int) -> None:
        """The attempt's update is leaving now (written before it is masked and sent): from here the record binds
        even once this process is gone. OSError: not marked, and the update must not leave."""
        record = self._read(run_id, rnd, "secagg") or {}
        self._write(run_id, rnd, "secagg", {**record, "left": True})

    def forget_sent(self, run_id: str, rnd: int) -> None:
        """Drop the record `record_sent` kept for an attempt whose update did not leave after all (the round was refused
        or failed at the site): it must not bind a later attempt to sites that never received anything."""
        self._record(run_id, rnd, "secagg").unlink(missing_ok=True)

    def load(self, run_id: str, rnd: int) -> Release | None:
        """The round's released update, None if none was kept; ReleaseDamaged if its file cannot be read."""
        path = self._path(run_id, rnd)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = [z[f"arr_{i}"] for i in range(len(z.files) - 1)]
            return Release(meta["global_sha256"], arrays, int(meta["num_examples"]), meta["metrics"])
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise ReleaseDamaged(path.relative_to(self.root.parent), f"{type(e).__name__}: {e}") from None


def _alive(pid) -> bool:
    """Whether process `pid` may still be running (and so may still send what it trains); a pid not a number counts
    as alive."""
    return True if type(pid) is not int or pid <= 0 else pid_alive(pid)
