"""Flower's processes, started and ended in one way for the deployed server (server/deploy.py: a TLS
SuperLink, its SuperExec and nginx, each in a process group of its own) and for the simulated federations
(simulations/federation.py: a private insecure SuperLink, then `flwr run`).

Ending a process group is not always enough: the SuperExec a local SuperLink starts and the simulation's
Ray processes run in sessions of their own and would outlive an interrupted run, holding memory and CPU.
`stop_tree` ends those sessions too; the process tree is read with psutil.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from privacy.preflight import https_health
from shared_models.flower_tools import QUIET_ENV, flower_tool



class LaunchError(RuntimeError):
    """A Flower process that did not start; the message names its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(command: list[str], env: dict | None = None, cwd: Path | None = None,
                log_file: Path | None = None) -> subprocess.Popen:
    """`command` in a session and process group of its own (stop_group ends it with its children), its output
    appended to `log_file` (discarded without one)."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull if log_file is None else log_file, "a") as fh:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def answers_health(address: str, ca: Path | None = None, timeout: float = 2.0) -> bool:
    """Whether /health at `address` answers 200: over TLS verified against `ca`, plain HTTP without one."""
    try:
        if ca is not None:
            return https_health(address, ca, timeout=timeout) == 200
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


def wait_healthy(address: str, ca: Path | None, proc: subprocess.Popen | None, timeout: float, what: str,
                 log_file: Path, error: type[Exception] = LaunchError) -> None:
    """Until `address` answers /health; `error` if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise error(f"{what} exited with code {proc.returncode} while starting; see {log_file}")
        if answers_health(address, ca):
            return
        time.sleep(0.2)
    scheme = "https" if ca is not None else "http"
    raise error(f"{what} did not answer {scheme}://{address}/health within {timeout:.0f} s; see {log_file}")


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process and its children (started by start_group): SIGTERM to the group, then SIGKILL to whatever
    is left after `grace` seconds, the leader's children included (nginx workers, the ServerApp a SuperExec
    launched) even if the leader exited first."""
    deadline = time.monotonic() + grace
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.2)
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def process_table() -> dict[int, tuple[int, float, int]]:
    """{pid: (parent pid, CPU seconds (user + system), session id)} of every process."""
    out = {}
    for p in psutil.process_iter(["ppid", "cpu_times"]):
        try:
            sid = os.getsid(p.pid)
        except OSError:  # ended meanwhile
            continue
        ppid, cpu = p.info["ppid"], p.info["cpu_times"]
        if ppid is not None and cpu is not None:
            out[p.pid] = (ppid, cpu.user + cpu.system, sid)
    return out


def process_tree(roots: list[int], table: dict[int, tuple[int, float, int]] | None = None) -> list[int]:
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


def sessions_below(root: int) -> set[int]:
    """Session ids of `root` and of every process below it, this process's own excepted."""
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


def stop_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """stop_group, and then every session started below `proc` (see the module's docstring)."""
    sessions = sessions_below(proc.pid) if proc.poll() is None else set()
    stop_group(proc, grace)
    end_sessions(sessions)


def secure_superlink_command(ca: Path, cert: Path, key: Path, database: Path, port: int) -> list[str]:
    """A deployed SuperLink on loopback: TLS, node authentication, a database that survives restarts, and its
    ServerApps launched by a separate SuperExec (`--isolation process`); through server/flower_processes.py
    (a longer SQLite busy timeout)."""
    return [sys.executable, "-m", "server.flower_processes", "superlink", "--ssl-ca-certfile", str(ca),
            "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
            "--database", str(database), "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation", "--isolation", "process"]


@dataclass
class LocalSuperLink:
    process: subprocess.Popen
    env: dict
    log_file: Path

    def stop(self) -> None:
        """End the SuperLink and everything it started (its SuperExec, the simulation's Ray processes)."""
        stop_tree(self.process)


def start_local_superlink(work: Path) -> LocalSuperLink:
    """A private insecure SuperLink for Flower's simulation engine, with its own FLWR_HOME (work/.flwr) and
    ports: the one `flwr run . local` would start, but never shared with another user's and always stopped.
    The apps run in this Python environment (FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1): Flower would
    otherwise install the project's dependencies, torch included, into a fresh environment."""
    flwr_home = work / ".flwr"
    (flwr_home / "local-superlink").mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    http_port, control_port = free_port(), free_port()
    env = {**os.environ, **QUIET_ENV, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(flwr_home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_file = flwr_home / "local-superlink" / "superlink.log"
    cmd = [flower_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
           "--log-file", str(log_file), "--database", ":flwr-in-memory:"]
    link = LocalSuperLink(start_group(cmd, env), env, log_file)
    try:
        wait_healthy(f"127.0.0.1:{http_port}", None, link.process, 60, "the local SuperLink (flower-superlink)",
                     log_file)
    except BaseException:  # LaunchError, or Ctrl-C / SIGTERM while it starts: never left running
        link.stop()
        raise
    return link


def run_flwr(args: list[str], env: dict, log_path: Path, on_line: Callable[[str], None], *, append: bool = False,
             new_session: bool = False, on_start: Callable[[subprocess.Popen], Callable[[], None]] | None = None) -> int:
    """`flwr run ARGS` to its end, every line of its output written to `log_path` and handed to `on_line`;
    returns its exit code. Interrupted (an exception, Ctrl-C), it is ended too.

    `on_start(proc)`, called once it runs, may start what watches it (a timeout, a progress printer that ends
    it when the server goes down) and returns what stops those when the stream ends. `new_session`: its own
    session (`oncofed run`: a terminal's Ctrl-C reaches this process, which ends it)."""
    proc, stop_watching = None, None
    try:
        with open(log_path, "a" if append else "w") as log:
            proc = subprocess.Popen([flower_tool("flwr"), "run", *args], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
            stop_watching = on_start(proc) if on_start is not None else None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                on_line(line)
            return proc.wait()
    finally:
        if stop_watching is not None:
            stop_watching()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
