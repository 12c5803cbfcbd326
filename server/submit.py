"""`oncofed run`: preflight, then `flwr run` of this project on the consortium's SuperLink, followed to the end.

Every run has a directory CONSORTIUM/runs/NAME (checkpoints, metrics.jsonl, audit.jsonl, status.json,
result.json). The run config starts from pyproject's [tool.flwr.app.config], then the consortium's
own values (absolute paths, the signing key, the number of registered sites), then `--set` overrides.
`--resume` continues NAME from its latest checkpoint after a server crash with the run config frozen
when it started (run.json; a `--set` that changes it is refused) and the same run key, so every site
recognises the run: a round it never finished replaces its pending entry, a round whose update it had
already sent is sent again unchanged, never trained (and spent) twice.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from privacy.preflight import Check, check_reachable, check_signing_key, report
from privacy.run_config import load_run_config
from server.checkpoint import UNFROZEN, CheckpointError, frozen_run, has_checkpoint, run_config_changes
from server.deploy import FLOWER_ENV, Consortium, DeployError, check_server_health, server_health
from server.processes import run_flwr
from shared_models.files import exclusive_lock, write_json_atomic
from shared_models.flower_tools import flower_tool
from shared_models.run_config import RunConfig, RunConfigError, app_defaults, flwr_overrides
from server.run_files import CHECKPOINTS, DELIVERY_RUNS, FLWR_LOG, FLWR_RUNS, RESULT, RUN_FILE
from server.runs import (INTERRUPTED, NO_SITE_TRAINED, code_change, deliveries_in_progress, drop_stale_interrupted,
                         no_model, no_model_verdict, read_superlink, written_by)

PROJECT = Path(__file__).resolve().parents[1]
_DUPLICATE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:")  # flwr streams each ServerApp line twice


def is_duplicate_log_line(line: str) -> bool:
    return bool(_DUPLICATE.match(line))


class TracebackFolder:
    """An operator reads the ServerApp's stream: a Python traceback in it (a refusal the ServerApp raises, e.g. a
    resumed run whose config changed) is shown as its last line, the error, and where the whole one is kept."""

    def __init__(self, log_path: Path):
        self.log_path, self.inside = log_path, False

    def show(self, line: str) -> str | None:
        """The line to show (None: folded away)."""
        if "Traceback (most recent call last):" in line:
            self.inside = True
            return None
        if self.inside:
            if line[:1].isspace() or not line.strip() or line.startswith(("During handling of the above",
                                                                          "The above exception was")):
                return None
            self.inside = False
            return f"{line.rstrip()}  (traceback in {self.log_path})\n"
        return line


_STARTED = re.compile(r"Successfully started run (\d+)")


def flwr_run_started(line: str) -> int | None:
    """The flwr run id a line of `flwr run`'s output says it submitted (its first line), else None."""
    return int(m.group(1)) if (m := _STARTED.search(line)) else None


def env_for(c: Consortium) -> dict:
    from privacy.registry import flwr_home

    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home(c.root, c.record))}


def _record_flwr_run(run_dir: Path, run_id: int) -> None:
    f = run_dir / FLWR_RUNS
    ids = json.loads(f.read_text()) if f.exists() else []
    write_json_atomic(f, ids + [run_id])


def stop_previous(run_dir: Path, env: dict, out) -> None:
    """Before resuming: stop the SuperLink's earlier runs of this name that have not ended. Preflight refuses a resume
    while one is live (live_flwr_runs: it may be training); this stops the rest, one the server's exit ended that
    the database still calls running, or one the database could not show (unreadable for a moment)."""
    f = run_dir / FLWR_RUNS
    for run_id in (json.loads(f.read_text()) if f.exists() else []):
        proc = subprocess.run([flower_tool("flwr"), "stop", str(run_id), "consortium"], env=env, capture_output=True, text=True,
                              timeout=120)
        out.write(f"earlier flwr run {run_id}: " + ("stopped\n" if proc.returncode == 0 else "already ended\n"))


def project_defaults() -> dict:
    try:
        return app_defaults(PROJECT)
    except RunConfigError as e:
        raise DeployError(f"{e}; `oncofed run` submits the OncoFed project directory") from None


# run-config keys `oncofed run` sets from the consortium directory, --name and --resume
RUN_SETS = frozenset({"base-dir", "output-dir", "resume", "deliver-only", "site-registry"})


def run_values(c: Consortium, run_dir: Path, overrides: dict, resume: bool, n_sites: int) -> dict:
    values = {**project_defaults(), "base-dir": str(PROJECT), "output-dir": str(run_dir),
              "signing-key": str(c.path("signing", "signing.key")), "site-registry": str(c.path("consortium.json")),
              "resume": resume}
    if c.path("public", "schema.json").is_file():  # the schema every site received in its bundle (and validated)
        values["schema"] = str(c.path("public", "schema.json"))
    if n_sites:
        values["sites"] = n_sites
    values.update(overrides)
    return values


def resume_values(run_dir: Path, overrides: dict) -> dict:
    """The run config a run was started with (frozen in its run.json), for `--resume`; a `--set` that
    changes any of it is refused: the sites agreed to the run as it started (rounds, epsilon, recipe)."""
    try:
        frozen = frozen_run(run_dir)
    except CheckpointError as e:
        raise DeployError(str(e)) from None
    if frozen is None:
        raise DeployError(f"run {run_dir.name!r} was never started ({run_dir / RUN_FILE} is missing): nothing to "
                          "resume; drop --resume")
    try:
        changed = run_config_changes(frozen["run_config"], {**frozen["run_config"], **overrides}, frozen["resolved"])
    except RunConfigError as e:
        raise DeployError(str(e)) from None
    if changed:
        raise DeployError(f"--resume continues run {run_dir.name!r} exactly as it started; --set would change "
                          f"{'; '.join(changed)}. Drop those --set values, or start a new run with another --name")
    # the keys a resumed run may change (keep-checkpoints): as the run started, unless --set changes them
    return {**frozen["run_config"], **frozen["unfrozen"], **{k: v for k, v in overrides.items() if k in UNFROZEN},
            "resume": True}


def run_checks(c: Consortium, cfg: RunConfig, run_dir: Path, resume: bool, sites: list[dict] | None,
               sites_error: str) -> list[Check]:
    checks = [check_reachable(c.control_address, c.path("ca", "ca.crt"), "SuperLink"), check_server_health(c)]
    # the sites' trust anchor, before any site spends epsilon on a model it would then refuse
    checks.append(check_signing_key(Path(cfg.run.signing_key), c.path("public", "signing.pub")))
    schema = cfg.path(cfg.run.schema_path)
    checks.append(Check(f"schema {schema}", schema.is_file(), "present" if schema.is_file() else
                        "missing: set --set schema=PATH (relative paths start at the project directory)"))
    if schema.is_file() and c.record.get("schema_sha256"):
        from privacy.pki import fingerprint

        same = fingerprint(schema) == c.record["schema_sha256"]
        checks.append(Check(f"schema {schema} against the sites' bundle", same, "the one every site received" if same
                            else f"SHA-256 {fingerprint(schema)} is not the {c.record['schema_sha256']} of the schema "
                            f"every site received ({c.path('public', 'schema.json')}): the sites validated their data "
                            "against that one; drop --set schema"))
    if cfg.run.eval_data:
        ev = cfg.path(cfg.run.eval_data)
        checks.append(Check(f"eval-data {ev}", ev.is_dir(), "present" if ev.is_dir() else "not a directory"))
    started = (run_dir / RUN_FILE).exists() or has_checkpoint(run_dir / CHECKPOINTS)
    superlink = read_superlink(c.path("state", "superlink.db"))
    if resume and (stale := drop_stale_interrupted(run_dir, c.path("state", "superlink.db"))):
        checks.append(Check(f"run {run_dir.name}: {INTERRUPTED}", True, stale, warning=True))
    if live := live_flwr_runs(c, run_dir):  # resumed, it would be stopped (stop_previous) and trained over
        checks.append(Check(f"run {run_dir.name}", False, f"flwr run {live[-1]} of this name is still "
                            "pending or running on the SuperLink (submitted by another `oncofed run`): "
                            f"follow it with `oncofed runs follow {c.root} {run_dir.name}`, "
                            + (f"or stop it with `oncofed runs stop {c.root} {run_dir.name}` and then resume"
                               if resume else "or choose another --name")))
    elif resume and (delivering := deliveries_in_progress(run_dir, superlink)):
        # its ServerApp holds the run's lock (a resumed one would wait 60 s for it and fail) and writes result.json
        checks.append(Check(f"run {run_dir.name}", False, f"flwr run {delivering[-1]}, an `oncofed deliver` of this "
                            "run (sending the model of its finished training), is still pending or running on the "
                            f"SuperLink: nothing is resumed while it runs. Wait for it (`oncofed runs follow {c.root} "
                            f"{run_dir.name}` gives its verdict; once it has written {RESULT} the run is finished and "
                            f"`oncofed deliver` is what sends its model again), or stop it with `oncofed runs stop "
                            f"{c.root} {run_dir.name}` and then resume"))
    elif resume and (verdict := no_model_verdict(c.root, run_dir.name)):
        checks.append(Check(f"run {run_dir.name}", False, verdict))
    elif resume and (run_dir / RESULT).exists():  # resumed, it would send its model again over the sites' installs
        checks.append(Check(f"run {run_dir.name}", False, f"finished ({run_dir / RESULT}): nothing to resume; "
                            f"`oncofed deliver {c.root} {run_dir.name}` sends its model again to the sites that have "
                            "not installed it; to train further, start a new run with another --name"))
    elif resume:
        checks.append(Check(f"run {run_dir.name}", started, "started before: resumed with its frozen configuration"
                            if started else f"never started ({run_dir / RUN_FILE} is missing): nothing to resume; "
                            "drop --resume"))
    else:
        finished = (run_dir / RESULT).exists()
        checks.append(Check(f"run {run_dir.name}", not started, "new" if not started else
                            f"{run_dir} holds a run that {NO_SITE_TRAINED}: choose another --name"
                            if no_model(c.root, run_dir.name) else
                            f"{run_dir} holds a run that finished: choose another --name (`oncofed deliver` sends "
                            "its model again)" if finished else
                            f"{run_dir} already holds a run: if it stopped, pass --resume to continue it (`oncofed "
                            "runs list` says whether it still runs); else choose another --name"))
    if sites is None:
        checks.append(Check("registered sites", False, f"cannot be listed ({sites_error})"))
    else:
        online = sum(s.get("status") == "online" for s in sites)
        needed = max(cfg.federation.min_sites, cfg.federation.sites)
        enough = len(sites) >= needed
        checks.append(Check("registered sites", enough, f"{len(sites)} registered, {online} online; min-sites "
                            f"{cfg.federation.min_sites}" + (f", sites {cfg.federation.sites}" if cfg.federation.sites
                                                             else "")
                            + ("" if enough else f": fewer than the {needed} the run needs; register more with "
                               "`oncofed consortium add-site`, or lower --set min-sites / sites")))
        if enough and online < (cfg.federation.sites or cfg.federation.min_sites):
            checks.append(Check("sites online", True, f"only {online} online: the run waits up to round-timeout "
                                f"({cfg.federation.round_timeout:g} s) for {cfg.federation.sites or cfg.federation.min_sites}"
                                f", then starts if at least min-sites ({cfg.federation.min_sites}) came", warning=True))
    return checks


def live_flwr_runs(c: Consortium, run_dir: Path) -> list[int]:
    """This run name's flwr runs the SuperLink's database holds as pending, starting or running, but for one the
    server's exit ended (interrupted.json, written by `oncofed server start` before its SuperLink starts): its
    ServerApp died with the SuperExec, and the database calls it running until Flower sees its heartbeat lapse. A
    pending or starting one the restarted SuperExec launches: live, and never recorded there (record_interrupted), so
    once it runs it is not taken for the one the exit ended (a flwr run that ran never runs again)."""
    from server.runs import LAUNCHED, RUNNING, interrupted_record, read_superlink

    try:
        ids = json.loads((run_dir / FLWR_RUNS).read_text())
    except (OSError, ValueError):
        return []
    runs = (read_superlink(c.path("state", "superlink.db")) or {}).get("runs", {})
    ended = (interrupted_record(run_dir, c.path("state", "superlink.db"))[0] or {}).get("flwr_run")
    return [i for i in ids if runs.get(i) in RUNNING and not (runs[i] in LAUNCHED and i == ended)]


class SubmitLock:
    """Held by one `oncofed run NAME` or `oncofed deliver NAME` from its preflight until its flwr run is recorded
    (flwr-runs.json, delivery-runs.json): a second one at the same moment would pass the same preflight (which reads
    those files) and start a second ServerApp on the same run directory. An flock, which the kernel releases when its
    holder ends, a crash included; meanwhile the file names the holder ({"pid", "command", "since"}, and "flwr_pid"
    once its `flwr run` started), and it is emptied on release, so a free lock whose file still names a holder was
    left by one killed before it recorded its flwr run: the next holder takes it over (_take_over)."""

    def __init__(self, c: Consortium, name: str, command: str, out=None):
        path = c.path("runs", f".{name}.submit.lock")
        # its holder names itself just after it locks and empties the file just before it releases: an empty file
        # under a held lock is one of those moments, not a holder unknown (refused so: 3 in 30 of two started at once)
        holder, deadline = None, time.monotonic() + 0.5
        while ((fh := exclusive_lock(path)) is None and (holder := _lock_holder(path)) is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        if fh is None:
            who = _named(holder) if holder else "another `oncofed run` or `oncofed deliver`"
            raise DeployError(f"{who} is submitting run {name!r} right now ({path} is locked): nothing was submitted. "
                              f"Wait for it: `oncofed runs follow {c.root} {name}` follows it once submitted")
        if left := _lock_holder(path):
            try:
                said = _take_over(c, name, path, left)
            except BaseException:
                fh.close()  # still naming the killed one: the next command looks again
                raise
            if out is not None:
                out.write(said)
        self._fh, self._holder = fh, {"pid": os.getpid(), "command": command, "since": time.time()}
        self._write()

    def _write(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps(self._holder))
        self._fh.flush()

    def flwr_started(self, pid: int) -> None:
        """Name the holder's `flwr run` (process `pid`) too: in a session of its own, it outlives a killed holder."""
        if not self._fh.closed:
            self._holder["flwr_pid"] = pid
            self._write()

    def close(self) -> None:
        """Release it (again: nothing)."""
        if not self._fh.closed:
            self._fh.truncate(0)  # released by its holder, not left by a crash
            self._fh.close()

    def leave(self) -> None:
        """Release it still naming this holder, as one killed before it recorded its flwr run leaves it: the next
        holder records what this one submitted (_take_over)."""
        self._fh.close()


def _lock_holder(path: Path) -> dict | None:
    """Who the submit lock file names ({"pid", "command", "since"}, perhaps "flwr_pid"), None if nobody (or being
    written)."""
    try:
        holder = json.loads(path.read_text())
        return {**holder, "since": float(holder["since"])} if isinstance(holder.get("command"), str) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _named(holder: dict) -> str:
    return (f"{holder['command']} (pid {holder.get('pid')}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))})")


def _take_over(c: Consortium, name: str, path: Path, left: dict) -> str:
    """What a command says that found run `name`'s submit lock (`path`) left by a holder killed (or crashed) before
    it recorded its flwr run, having recorded what that one submitted. Its `flwr run` has a session of its own and
    outlives it: it may have submitted a flwr run, a ServerApp on this run's directory that no record names (neither
    the preflight, `oncofed runs stop` nor --resume would see it), or still be about to. Each flwr run the SuperLink's
    database holds for this directory since the holder locked, unnamed, is recorded as its kind is (flwr-runs.json, or
    delivery-runs.json for a deliver-only one): the preflight that follows then refuses while it is pending or
    running, and `oncofed runs` follows and stops it. Recorded rather than named in a refusal: a refusal leaves it
    unnamed for every command after. Refused (DeployError; the lock file still names the killed one, for the next
    command to look again) while nothing of it is in the database but its `flwr run` still runs: it may yet submit."""
    from server.runs import flwr_runs_since, record_delivery_run

    run_dir, db = c.path("runs", name), c.path("state", "superlink.db")
    who = (f"{path}: left by {_named(left)} of run {name!r}, which ended (killed or crashed) before recording its "
           "flwr run")
    submitted = flwr_runs_since(run_dir, db, left["since"])
    flwr_pid = left.get("flwr_pid")
    if not submitted and flwr_pid and _flwr_run_of(flwr_pid, run_dir):
        raise DeployError(f"{who}, but its `flwr run` (pid {flwr_pid}) still runs and may yet submit a flwr run that "
                          "no record names: nothing was submitted. Wait for it to end, or end it (`kill "
                          f"{flwr_pid}`; a flwr run it already submitted goes on), then run this command again: it "
                          "records what that one submitted")
    if submitted is None:
        return (f"{who}; taken over, but a flwr run it may have submitted cannot be looked for (the SuperLink's "
                f"database {db} cannot be read): one would be recorded in neither {FLWR_RUNS} nor {DELIVERY_RUNS} of "
                f"{run_dir}, so neither this preflight nor `oncofed runs` would see it\n")
    said = []
    for run_id, delivery, at, recorded in submitted:
        if not recorded and delivery:
            record_delivery_run(run_dir, run_id, at)
        elif not recorded:
            _record_flwr_run(run_dir, run_id)
        said.append(f"flwr run {run_id} ({'an `oncofed deliver`' if delivery else 'training'}, recorded"
                    f"{'' if recorded else ' now'} in {run_dir / (DELIVERY_RUNS if delivery else FLWR_RUNS)})")
    if not said:
        return f"{who}; taken over: it submitted no flwr run (the SuperLink's database holds none of the run since)\n"
    return f"{who}; taken over: it had submitted {', '.join(said)}, which this preflight and `oncofed runs` see\n"


def _flwr_run_of(pid, run_dir: Path) -> bool:
    """Whether process `pid` is a `flwr run` of this run directory (its --run-config names it): a pid the kernel reused
    since is not."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:  # ended, not reaped yet
            return False
        args = proc.cmdline()
    except psutil.AccessDenied:
        return True  # another user's process of that pid: it may be
    except (psutil.Error, OSError, TypeError, ValueError):
        return False
    return "run" in args and any(str(run_dir) in a for a in args)


def submit_lock(c: Consortium, name: str, command: str = "`oncofed run`", out=None) -> SubmitLock:
    """The run's SubmitLock for `command`; DeployError naming the holder when another holds it."""
    return SubmitLock(c, name, command, out)


def submit_run(root: str | Path, name: str, overrides: dict, *, resume: bool = False, timeout: float = 0.0,
               out=sys.stdout) -> int:
    if reserved := sorted(set(overrides) & RUN_SETS):
        raise DeployError(f"--set {', '.join(reserved)}: `oncofed run` sets {'these' if len(reserved) > 1 else 'this'} "
                          "itself (the run's files live in the consortium's runs/NAME; --resume continues a run; "
                          "`oncofed deliver` sends a final model again)")
    c = Consortium.load(root)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise DeployError(f"--name {name!r}: use letters, digits, '.', '_' and '-'")
    run_dir = c.path("runs", name)
    lock = submit_lock(c, name, "`oncofed run`", out)
    try:
        return _submit_run(c, name, run_dir, overrides, resume, timeout, out, lock)
    finally:
        lock.close()


def _submit_run(c: Consortium, name: str, run_dir: Path, overrides: dict, resume: bool, timeout: float, out,
                lock) -> int:
    from privacy.pki import ProvisioningError
    from privacy.registry import list_sites

    try:
        sites, sites_error = list_sites(c.root), ""
    except ProvisioningError as e:
        sites, sites_error = None, str(e)
    if resume:
        values = resume_values(run_dir, overrides)
    else:
        values = run_values(c, run_dir, overrides, resume, len(sites or []) if "sites" not in overrides else 0)
    cfg = load_run_config(values, source="run config")
    out.write(report(f"run {name!r}", run_checks(c, cfg, run_dir, resume, sites, sites_error)) + "\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        stop_previous(run_dir, env_for(c), out)
    started = time.monotonic()
    env = env_for(c)
    log_path = run_dir / FLWR_LOG
    from server.runs import ProgressPrinter, after_stream

    shown: list[ProgressPrinter] = []

    def watch(proc: subprocess.Popen):
        import threading

        lock.flwr_started(proc.pid)
        # a run waiting for sites prints nothing: a watchdog, not a check per line
        timer = threading.Timer(timeout, proc.terminate) if timeout else None
        if timer is not None:
            timer.start()
        shown.append(ProgressPrinter(c.root, name, out, health=lambda: server_health(c), on_server_down=proc.terminate))
        shown[0].start()
        return lambda: (shown[0].stop(), timer is not None and timer.cancel())

    folder = TracebackFolder(log_path)
    attempt: list[int] = []  # this submission's flwr run id: what its ServerApp writes into result.json

    def on_line(line: str) -> None:
        if (run_id := flwr_run_started(line)) is not None:
            attempt.append(run_id)
            _record_flwr_run(run_dir, run_id)
            lock.close()  # recorded: the next `oncofed run NAME` sees it in its preflight
            if resume and (changed := code_change(c.root, name, run_id)):
                shown[0].write(f"{changed}\n")
        if not is_duplicate_log_line(line) and (line := folder.show(line)) is not None:
            shown[0].write(line)

    returncode = run_flwr([str(PROJECT), "consortium", "--stream", "--run-config", flwr_overrides(values)], env,
                          log_path, on_line, append=True, new_session=True, on_start=watch)
    flwr_run = attempt[0] if attempt else None
    if timeout and time.monotonic() - started >= timeout and not written_by(run_dir, flwr_run):
        out.write(f"--timeout {timeout:g} s reached: stopping the run on the SuperLink\n")
        stop_previous(run_dir, env, out)
        from server.runs import RunView, restart_hint

        out.write(f"run {name!r} stopped; {restart_hint(c.root, RunView.load(c.root, name, None))}\n")
        return 1
    return after_stream(c.root, name, returncode, log_path, out, health=lambda: server_health(c),
                        server_down=shown[0].server_down, flwr_run=flwr_run)
