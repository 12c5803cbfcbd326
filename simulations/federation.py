"""Run a simulated federation through Flower's simulation engine, end to end, and report it.

    partition (if needed) -> start a private local SuperLink -> `flwr run <project> local` ->
    stop the SuperLink -> evaluate the delivered global model on patients of held-out sites

The SuperLink is started here (the same command `flwr run . local` would start, with its own
FLWR_HOME and ports), so it is always stopped afterwards and never clashes with another user's.
The apps run in this Python environment (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1): Flower
would otherwise install the project's dependencies, torch included, into a fresh environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.submit import is_duplicate_log_line
from shared_models.run_config import flwr_overrides

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "simulations" / "data" / "tcga_pancan33"
PANCAN_SCHEMA = ROOT / "simulations" / "schemas" / "tcga_pancan33.json"


class SimulationError(RuntimeError):
    """A simulated run that could not complete; the message says where its logs are."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict:
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_HOME=str(flwr_home), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
               FLWR_LOCAL_CONTROL_API_PORT=str(control_port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def process_table() -> dict[int, tuple[int, int, int]]:
    """{pid: (parent pid, utime + stime in clock ticks, session id)} of every process (Linux /proc; empty
    elsewhere)."""
    out = {}
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ... utime stime
            out[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[3]))
    return out


def process_tree(roots: list[int], table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """The given processes and every process below them, sorted."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(seen)


def _sessions_below(root: int) -> set[int]:
    """Session ids of `root` and of every process below it (the SuperExec and Ray start their own)."""
    table = process_table()
    return {table[p][2] for p in process_tree([root], table) if p in table} - {os.getsid(0)}


def session_processes(sessions: set[int]) -> list[int]:
    """The live processes of these sessions, this one excepted."""
    return [p for p, (_, _, sid) in process_table().items() if sid in sessions and p != os.getpid()]


def end_sessions(sessions: set[int]) -> None:
    """SIGTERM every process of these sessions (this one excepted), SIGKILL what is left 10 s later."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 2.0)):
        for pid in session_processes(sessions):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while session_processes(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class LocalSuperLink:
    process: subprocess.Popen
    env: dict
    log_file: Path

    def stop(self) -> None:
        """End the SuperLink and everything it started, also what left its process group: the SuperExec
        and the simulation's Ray processes run in sessions of their own and would outlive an
        interrupted run, holding memory and CPU."""
        sessions = _sessions_below(self.process.pid) if self.process.poll() is None else set()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        end_sessions(sessions)


def start_local_superlink(work: Path) -> LocalSuperLink:
    flwr_home = work / ".flwr"
    (flwr_home / "local-superlink").mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    http_port, control_port = free_port(), free_port()
    env = flower_env(flwr_home, http_port, control_port)
    log_file = flwr_home / "local-superlink" / "superlink.log"
    cmd = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
           "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
           "--log-file", str(log_file), "--database", ":flwr-in-memory:"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=1).is_success:
                return LocalSuperLink(proc, env, log_file)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    LocalSuperLink(proc, env, log_file).stop()
    raise SimulationError(f"flower-superlink did not become ready within 60 s; see {log_file}")


def ensure_partition(data_root: Path, *, by: str = "center8", seed: int = 0) -> Path:
    """The vendored pan-cancer cohort cut into its center8 hospitals, with held-out tss patients."""
    if (data_root / "manifest.json").exists():
        return data_root
    from shared_models.schema import FeatureSchema
    from simulations.partition import partition_cohort

    partition_cohort(VENDORED, FeatureSchema.load(PANCAN_SCHEMA), data_root, by=by, seed=seed, holdout_column="tss",
                     holdout_frac=0.2)
    return data_root


def federation_config(out: Path, sites: Path, n_sites: int, *, rounds: int, dp: bool, epsilon: float, secagg: bool,
                      strategy: str, seed: int, local_epochs: int = 2, lr: float | None = None,
                      batch_size: int | None = None, eval_data: Path | None = None, schema: Path | None = None,
                      extra: dict | None = None) -> dict:
    """The run config of a simulated federation whose working files live under `out`.

    Optimizer, learning rate and batch default to the values chosen on the pan-cancer federation's sites'
    validation parts (docs/results.md): SGD with momentum, with DP at lr 1 and expected batch 256 (per-sample
    clipping bounds every step), without DP at lr 0.2 and batch 64; AdamW when `extra` sets local-optimizer =
    "adamw" (lr 0.02 with DP, 0.002 without). The consortium's
    model-signing key is generated once in out/keys: the server signs the final model and every site
    verifies it before installing it.
    """
    from privacy.signing import generate_signing_key

    keys = out / "keys"
    if not (keys / "signing.key").exists():
        generate_signing_key(keys / "signing.key", keys / "signing.pub")
    optimizer = (extra or {}).get("local-optimizer", "sgd")
    default_lr = (1.0 if optimizer == "sgd" else 0.02) if dp else (0.2 if optimizer == "sgd" else 0.002)
    cfg = {"base-dir": str(ROOT), "data-root": str(sites), "site-state-root": str(out / "state"),
           "output-dir": str(out / "server"), "num-rounds": rounds, "sites": n_sites, "min-sites": min(2, n_sites),
           "epsilon": epsilon, "dp": dp, "secagg": secagg, "strategy": strategy, "local-epochs": local_epochs,
           "local-optimizer": optimizer, "lr": lr if lr is not None else default_lr,
           "batch-size": batch_size if batch_size is not None else (256 if dp else 64), "seed": seed,
           "round-timeout": 900.0, "signing-key": str(keys / "signing.key"),
           "signing-public-key": str(keys / "signing.pub")}
    if schema is not None:
        cfg["schema"] = str(schema)
    if eval_data is not None:
        cfg["eval-data"] = str(eval_data)
    cfg.update(extra or {})
    return cfg


def run_federation(work: Path, run_config: dict, n_sites: int, stream=sys.stdout) -> dict:
    """`flwr run` the project as a simulated federation of n_sites; returns the server's result.json."""
    link = start_local_superlink(work)
    overrides = flwr_overrides(run_config)
    cmd = ["flwr", "run", str(ROOT), "local", "--stream",
           "--federation-config", f"num-supernodes={n_sites} client-resources-num-cpus=1",
           "--run-config", overrides]
    log_path = work / "flwr-run.log"
    proc = None
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=link.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                if stream is not None and _interesting(line):
                    stream.write(line)
                    stream.flush()
            proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # interrupted: end `flwr run` too
            proc.terminate()
            proc.wait()
        link.stop()
    result_file = Path(run_config["output-dir"]) / "result.json"
    if proc.returncode != 0 or not result_file.exists():
        raise SimulationError(f"the federated run did not complete (flwr exit {proc.returncode}); "
                              f"see {log_path} and {link.log_file}")
    return json.loads(result_file.read_text())


def _interesting(line: str) -> bool:
    if is_duplicate_log_line(line):
        return False
    keys = ("round", "ROUND", "refuse", "failed", "dropped", "delivered", "WARNING", "ERROR", "installed",
            "Traceback", "Error", "privacy: ", "distributed DP: ")  # which DP mode ran and what it assumes
    return any(k in line for k in keys)


def load_installed(model_dir: Path):
    """(model in eval mode, schema, version) of the active version of a site's model store."""
    from client.model_store import ModelStore
    from shared_models.schema import FeatureSchema
    from shared_models.weights import load_weights

    version = ModelStore(model_dir).active()
    schema = FeatureSchema.load(model_dir / version / "schema.json")
    return load_weights(model_dir / version / "weights.pt", schema).eval(), schema, version


def evaluate_on_site(model_dir: Path, site_dir: Path) -> dict:
    """The installed global model on a labelled site it never saw, normalised with that site's own
    statistics (as a new hospital would serve it)."""
    import torch

    from shared_models.evaluation import classification_metrics, predict_logits
    from shared_models.site_data import load_labelled_site

    model, schema, version = load_installed(model_dir)
    ds = load_labelled_site(schema, site_dir)
    pred = predict_logits(model, torch.from_numpy(ds.x)).argmax(dim=1).numpy()
    m = classification_metrics(ds.y, pred, len(schema.classes))
    present = set(np.unique(ds.y).tolist())
    absent = np.bincount(pred[~np.isin(pred, list(present))], minlength=len(schema.classes))
    return {"patients": int(len(ds.y)), "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": m["macro_f1"], "model_version": version,
            "per_class_f1": {schema.classes[c]: f for c, f in enumerate(m["per_class_f1"]) if c in present},
            # types none of these patients has, predicted anyway: each counts F1 0 in macro-F1 (scikit-learn's
            # definition: the mean over the types in the labels or the predictions)
            "predicted_absent_types": {schema.classes[c]: int(n) for c, n in enumerate(absent) if n}}


RARE_PATIENTS = 60  # a type with fewer patients across all training sites counts as rare in the summary


def f1_by_class_size(per_class_f1: dict[str, float], class_counts: dict[str, int],
                     threshold: int = RARE_PATIENTS) -> dict:
    """Mean held-out F1 of the types with >= threshold training patients across the federation and of
    the rarer ones (DP-SGD's cost falls on small groups; macro-F1 weighs them like the others)."""
    groups = {"common": [c for c in per_class_f1 if class_counts.get(c, 0) >= threshold],
              "rare": [c for c in per_class_f1 if class_counts.get(c, 0) < threshold]}
    return {name: {"types": sorted(cs), "patients": [class_counts.get(c, 0) for c in sorted(cs)],
                   "mean_f1": float(np.mean([per_class_f1[c] for c in cs])) if cs else None}
            for name, cs in groups.items()} | {"threshold": threshold}


def clean(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


def summarize(metrics_file: Path) -> list[dict]:
    rows = []
    for line in metrics_file.read_text().splitlines():
        r = json.loads(line)
        eps = r.get("site_epsilon", {})
        rows.append({"round": r["round"], "sites": len(r.get("participants", [])),
                     "refused": len(r.get("refused", [])), "failed": len(r.get("failures", [])),
                     "macro_f1": r.get("global", {}).get("macro_f1"), "accuracy": r.get("global", {}).get("accuracy"),
                     "max_epsilon": max(eps.values()) if eps else None, "seconds": r.get("seconds"),
                     "server_macro_f1": (r.get("server_eval") or {}).get("macro_f1")})
    return rows


__all__ = ["run_federation", "federation_config", "ensure_partition", "evaluate_on_site", "f1_by_class_size", "summarize", "SimulationError"]
