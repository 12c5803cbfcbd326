"""File writes and hashes shared by the server, the sites and the tools: one definition of each."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, payload, indent: int = 1) -> None:
    """Replace `path` with `payload` as JSON so that a crash leaves either the old or the new file:
    written to a sibling, fsynced, renamed over, and the rename made durable (directory fsync)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=indent)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json_file(path: Path, error: type[Exception], hint: str) -> dict:
    """A JSON settings file, or `error` naming the file and how to produce it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise error(f"{Path(path).parent}: no readable {Path(path).name} ({e}); {hint}") from None
