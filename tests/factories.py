"""Small schemas and inputs for tests: every column kind, and any subset of modalities missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from shared_models.schema import FeatureSchema, Modality
from simulations.synthetic import random_model_inputs


def tiny_schema(omics_width: int = 130, name: str = "tiny") -> FeatureSchema:
    return FeatureSchema(
        name=name,
        label_column="subtype",
        classes=["A", "B", "C"],
        modalities=[
            Modality(name="expr", kind="omics", features=[f"g{i}" for i in range(omics_width)]),
            Modality(name="prot", kind="omics", features=[f"p{i}" for i in range(20)]),
            Modality(
                name="clinical", kind="tabular", features=["age", "stage", "smoker"],
                column_types={"stage": "categorical", "smoker": "binary"}, levels={"stage": ["I", "II", "III"]},
            ),
            Modality(name="mutation", kind="tabular", features=[f"m{i}" for i in range(8)],
                     column_types={f"m{i}": "binary" for i in range(8)}),
        ],
    )


def random_inputs(schema: FeatureSchema, n: int, seed: int = 0) -> torch.Tensor:
    """Valid model inputs: standard normals, level indices for categoricals, 0/1 for binaries."""
    return random_model_inputs(schema, n, seed)


def drop_modalities(schema: FeatureSchema, x: torch.Tensor, row: int, names: list[str]) -> None:
    layout = schema.layout()
    for name in names:
        x[row, layout.slices[name]] = float("nan")


def in_stage(progress: Path, rnd: int, stage: str, answered: bool = False):
    """A predicate: the server's progress.json says round `rnd` is in `stage` (and, if `answered`, a site has
    replied in it)."""
    def ready() -> bool:
        try:
            p = json.loads(progress.read_text())
        except (OSError, ValueError):
            return False
        return p.get("round") == rnd and p.get("stage") == stage and (not answered or bool(p.get("answered")))
    return ready


def kill_local_superlink_when(work: Path, ready, timeout: float = 300.0) -> threading.Thread:
    """A thread that SIGKILLs the local SuperLink of `work` (simulations.federation) and every process below it
    (ServerApp, simulated sites) once `ready()` holds: a crash of the whole server stack."""
    from server.processes import process_tree

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not ready():
            time.sleep(0.05)
        out = subprocess.run(["pgrep", "-f", f"{work}/.flwr/local-superlink"], capture_output=True, text=True).stdout
        for victim in process_tree([int(p) for p in out.split()]):
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def dropout_seeds(monkeypatch) -> list[int]:
    """The seed of torch's global generator each time a Dropout layer draws its masks."""
    from shared_models import layers

    seen, forward = [], layers.Dropout.forward

    def recording(self, x):
        if self.training and self.p > 0:
            seen.append(torch.initial_seed())
        return forward(self, x)

    monkeypatch.setattr(layers.Dropout, "forward", recording)
    return seen


def fsynced_paths(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, in order (a file's or a directory's)."""
    import os

    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    return synced


def site_message(content, message_type: str | None = None):
    """A message from the server to the site of node 1, as its SuperNode hands it to the ClientApp (a TRAIN
    message unless `message_type` says otherwise)."""
    from flwr.app import Message, Metadata
    from flwr.app.message_type import MessageType

    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=600.0, message_type=message_type or MessageType.TRAIN)
    return Message(content, metadata=meta)


def in_secagg(content):
    """A training request's content as Flower's SecAgg+ mod hands it to the train handler at its masked-vectors stage
    (its configs record there, the stage key popped): a distributed-DP site trains only inside SecAgg+."""
    from flwr.app import ConfigRecord
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({})
    return content


def unmask_message(active: list[int], dead: list[int]):
    """SecAgg+'s unmask stage for node 1: the sites that sent masked vectors (active) and those that did not."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    return site_message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({
        Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})}))


def started_run(tmp_path, run_id: int = 1):
    """A new run of the project's run config under tmp_path/runs/x, started by the ServerApp's start_or_resume:
    (its output directory, run config values, schema, RunStart)."""
    from flwr.app import Context, RecordDict

    from privacy.run_config import load_run_config
    from server.app import start_or_resume
    from server.submit import PROJECT
    from shared_models.run_config import app_defaults

    out = tmp_path / "runs" / "x"
    values = {**app_defaults(PROJECT), "base-dir": str(PROJECT), "output-dir": str(out)}
    cfg = load_run_config(values, source="run config")
    schema = FeatureSchema.load(cfg.path(cfg.run.schema_path))
    start = start_or_resume(cfg, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                         run_config=values), schema, out)
    return out, values, schema, start


def registered_consortium(root: Path, sites: dict[str, int]):
    """A consortium directory at `root` (privacy.pki.init_consortium) whose register holds `sites` ({name: node id}),
    its SuperLink on a port nothing listens on (another consortium's may be on 9092): what the operator's commands
    read, without a server."""
    import socket

    from privacy.pki import init_consortium
    from server.deploy import Consortium

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_consortium(root, "t", "127.0.0.1:8443", internal_port=port)
    record = json.loads((root / "consortium.json").read_text())
    record["sites"] = [{"name": n, "node_id": str(i), "key_sha256": "ab", "added": "2026-12-06T19:03:22Z"}
                       for n, i in sites.items()]
    (root / "consortium.json").write_text(json.dumps(record))
    return Consortium.load(root)


@contextmanager
def stand_in_server(root: Path, cwd: Path, on_stop: str = ""):
    """A real process whose command line reads `... server start ROOT` (it sleeps for a minute), recorded in ROOT's
    state/server.json as the consortium's server: what `oncofed server stop` finds and signals. `on_stop`: Python it
    runs when signalled (SIGTERM), then exits, as the server's exit records what it ended. Yields the process;
    killed on exit."""
    code = "import time; time.sleep(60)"
    if on_stop:
        code = ("import signal, sys, time\ndef stop(*_):\n" + "".join(f"    {line}\n" for line in on_stop.splitlines())
                + "    sys.exit(0)\nsignal.signal(signal.SIGTERM, stop)\nprint('ready', flush=True)\ntime.sleep(60)")
    server = subprocess.Popen([sys.executable, "-c", code, "server", "start", str(root)], cwd=cwd,
                              stdout=subprocess.PIPE if on_stop else None)
    if on_stop:  # signalled before its handler is set, it would end as the plain stand-in does
        server.stdout.readline()
    threading.Thread(target=server.wait, daemon=True).start()  # reaped when it ends (not left a zombie)
    try:
        deadline = time.monotonic() + 30
        while b"sleep" not in Path(f"/proc/{server.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        (root / "state" / "server.json").write_text(json.dumps({"pid": server.pid}))
        yield server
    finally:
        server.kill()
