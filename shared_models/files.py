"""File writes and hashes shared by the server, the sites and the tools: one definition of each."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, newline: str | None = None,
                owner_only: bool = False) -> Iterator[IO]:
    """A file opened for writing whose content replaces `path` when the block ends, so that a crash leaves
    either the old or the new file: written to a sibling, fsynced, renamed over, and the rename made durable
    (directory fsync). An error in the block leaves `path` as it was. `owner_only`: mode 0600 whatever the
    umask. One file only: a directory of files is written to a sibling directory and renamed over.
    The sibling's name is unique (created exclusively), so two writers of one file never write into the same
    temporary: each renames a whole file over `path`, and the last rename wins."""
    path = Path(path)
    if "w" not in mode:
        raise ValueError(f"atomic_file writes a new file: mode {mode!r} must contain 'w'")
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), newline=newline) as fh:
            if owner_only:
                os.fchmod(fh.fileno(), 0o600)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_failure(e: OSError, where: str | Path) -> str:
    """Why a write in the directory `where` failed and what to change there, for a message a person reads (a bare
    "[Errno 28] No space left on device" named neither the disk nor the way on)."""
    if e.errno == errno.ENOSPC:
        return f"the disk holding {where} is full: free space there"
    if e.errno == errno.EDQUOT:
        return f"the disk quota of this account on {where} is used up: free space there or raise the quota"
    if e.errno == errno.EFBIG:  # past a process limit (`ulimit -f`) a write fails so: Python ignores SIGXFSZ
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft == resource.RLIM_INFINITY:
            return (f"a file in {where} is larger than its file system allows (this process has no file-size limit): "
                    "move the directory to a file system that holds larger files")
        return (f"a file in {where} is larger than this process's file-size limit, {soft} bytes (`ulimit -f`, "
                "RLIMIT_FSIZE): raise it where the process is started (`ulimit -f unlimited`, or LimitFSIZE=infinity "
                "in its systemd unit)")
    return "fix that"


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's content (a directory's: its entries, so a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: str | Path) -> None:
    """fsync every file of a directory written as a sibling, then the directory itself: call before renaming it
    into place, so that after a power loss the name never points at files the disk did not get."""
    for f in sorted(Path(path).rglob("*"), key=lambda p: -len(p.parts)):  # files first, then their directories
        fsync_path(f)
    fsync_path(path)


def write_json_atomic(path: str | Path, payload, indent: int = 1) -> None:
    """Replace `path` with `payload` as JSON (and a final newline), atomically (`atomic_file`)."""
    with atomic_file(path) as fh:
        json.dump(payload, fh, indent=indent)
        fh.write("\n")


def complete_bytes(path: str | Path) -> int:
    """The bytes of a file up to the end of its last complete line (read from the end, a chunk at a time)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        while size:
            start = max(0, size - 65536)
            fh.seek(start)
            chunk = fh.read(size - start)
            if (i := chunk.rfind(b"\n")) >= 0:
                return start + i + 1
            size = start
    return 0


def cut_partial_line(path: str | Path) -> int:
    """Cuts a JSON-lines file back to the end of its last complete line and returns the bytes cut (0 when it
    ends in a newline, or is missing). A crash in the middle of an append leaves a partial line; the next
    append would join its own line to it, and one unparseable line stops every reader of the file."""
    try:
        keep = complete_bytes(path)
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if keep == size:
                return 0
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
            return size - keep
    except FileNotFoundError:
        return 0


def append_json_line(path: str | Path, payload) -> None:
    """One JSON line appended to `path` and fsynced (JSON-lines logs: metrics.jsonl)."""
    with open(path, "a") as fh:
        fh.write(json.dumps(payload) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text`, atomically (`atomic_file`)."""
    with atomic_file(path) as fh:
        fh.write(text)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        raise ValueError(f"key {twice[0]!r} given twice: one of the values would be silently ignored; keep one")
    return dict(pairs)


def read_json_file(path: Path, error: type[Exception], hint: str) -> dict:
    """A JSON settings file, or `error` naming the file and how to produce it (a key given twice is refused)."""
    if Path(path).is_dir():
        raise error(f"{path}: a directory, where a JSON file is expected: give the file's path, not its "
                    f"directory's; {hint}")
    try:
        return json.loads(Path(path).read_text(), object_pairs_hook=_no_duplicate_keys)
    except (OSError, ValueError) as e:
        raise error(f"{Path(path).parent}: no readable {Path(path).name} ({e}); {hint}") from None


def exclusive_lock(path: Path, wait: float = 0.0):
    """The open file `path` holding an exclusive flock (the kernel releases it when the file is closed or the
    process ends, a crash included), or None if another holder keeps it for `wait` seconds. Keep a reference
    to the file: the lock lives as long as it stays open."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held open: the lock is the open file
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.close()
                return None
            time.sleep(0.5)


@contextmanager
def held_lock(path: Path, wait: float, busy: Exception):
    """`exclusive_lock(path, wait)` held for the block, released after it; `busy` is raised when another holder kept
    it for `wait` seconds (one read-change-write of a shared file at a time)."""
    fh = exclusive_lock(path, wait)
    if fh is None:
        raise busy
    try:
        yield
    finally:
        fh.close()


def pid_alive(pid) -> bool:
    """Whether a process of this id exists (one of another user's counts); False for no id at all."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True
