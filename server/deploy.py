"""`oncofed server start`: preflight, then the SuperLink (TLS, node authentication, database) on loopback,
the nginx proxy on the public address, and the Prometheus endpoint, supervised as one service.

    CONSORTIUM/state/superlink.db   runs and registered sites survive a restart
    CONSORTIUM/state/server.json    process ids of this service, its SuperLink and its proxy
    CONSORTIUM/logs/superlink.log   the SuperLink's log (and every ServerApp's)
    CONSORTIUM/proxy/               nginx.conf, its logs and pid
    CONSORTIUM/runs/NAME/           one training run (`oncofed run`): checkpoints, metrics, audit, status

The process stays in the foreground (for systemd or a terminal); SIGTERM or Ctrl-C stops all of it.
If the SuperLink or the proxy dies, the other is stopped too and the exit status is non-zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from privacy.pki import parse_address
from privacy.preflight import (
    Check,
    check_port_free,
    check_private_key,
    check_server_certificate,
    https_health,
    report,
)
from privacy.registry import control_address
from server import proxy
from shared_models.files import read_json_file, write_json_atomic

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              # the SuperLink's task launcher polls every second by default; 0.2 s shortens each round
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


class DeployError(RuntimeError):
    """A deployment step failed: names the file or process and the fix."""


@dataclass(frozen=True)
class Consortium:
    root: Path
    record: dict

    @classmethod
    def load(cls, root: str | Path) -> "Consortium":
        root = Path(root).resolve()
        return cls(root, read_json_file(root / "consortium.json", DeployError,
                                        "pass the directory written by `oncofed consortium init`"))

    @property
    def public(self) -> tuple[str, int]:
        return parse_address(self.record["address"])

    @property
    def internal_port(self) -> int:
        return parse_address(control_address(self.record))[1]

    @property
    def control_address(self) -> str:
        return control_address(self.record)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


def server_checks(c: Consortium) -> list[Check]:
    host, port = c.public
    checks = check_server_certificate(c.path("server", "server.crt"), c.path("server", "server.key"),
                                      c.path("ca", "ca.crt"), list(dict.fromkeys([host, "127.0.0.1", "localhost"])))
    checks += [check_private_key(c.path("server", "server.key"), "server TLS key"),
               check_private_key(c.path("signing", "signing.key"), "model-signing key"),
               check_private_key(c.path("ca", "ca.key"), "CA key")]
    binary = proxy.nginx_binary()
    checks.append(Check("nginx", binary is not None, binary or proxy.NGINX_HINT))
    checks.append(check_port_free(proxy.listen_host(host).strip("[]"), port, "public (proxy) address"))
    checks.append(check_port_free("127.0.0.1", c.internal_port, "SuperLink loopback address"))
    try:
        c.path("state").mkdir(exist_ok=True)
        probe = c.path("state", ".write-probe")
        probe.write_text("")
        probe.unlink()
        checks.append(Check(f"database directory {c.path('state')}", True, "writable"))
    except OSError as e:
        checks.append(Check(f"database directory {c.path('state')}", False, f"not writable ({e.strerror})"))
    return checks


def superlink_command(c: Consortium) -> list[str]:
    return ["flower-superlink", "--ssl-ca-certfile", str(c.path("ca", "ca.crt")),
            "--ssl-certfile", str(c.path("server", "server.crt")), "--ssl-keyfile", str(c.path("server", "server.key")),
            "--enable-supernode-auth", "--database", str(c.path("state", "superlink.db")),
            "--host", "127.0.0.1", "--port", str(c.internal_port), "--disable-runtime-dependency-installation"]


def wait_healthy(address: str, ca: Path, proc: subprocess.Popen | None, timeout: float, what: str,
                 log_file: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"{what} exited with code {proc.returncode} while starting; see {log_file}")
        try:
            if https_health(address, ca, timeout=2.0) == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise DeployError(f"{what} did not answer https://{address}/health within {timeout:.0f} s; see {log_file}")


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process and its children (each service runs in its own process group); the group is
    signalled even if its leader already exited (nginx workers, flower-superexec may remain)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def start_server(root: str | Path, metrics_port: int = 9464, out=sys.stdout) -> int:
    """Run the consortium's server until stopped; returns the exit status."""
    c = Consortium.load(root)
    out.write(report(f"server {c.record['name']!r}", server_checks(c)) + "\n")
    host, port = c.public
    proxy.write_config(c.root, host, port, c.internal_port)
    c.path("logs").mkdir(exist_ok=True)
    c.path("runs").mkdir(exist_ok=True)
    env = {**os.environ, **FLOWER_ENV}
    link_log = c.path("logs", "superlink.log")
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    stopping = False

    def shutdown(signum=None, frame=None):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        with link_log.open("a") as fh:
            link = subprocess.Popen(superlink_command(c), env=env, cwd=c.root, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        procs.append(("SuperLink", link, link_log))
        wait_healthy(c.control_address, c.path("ca", "ca.crt"), link, 60, "the SuperLink", link_log)
        nginx_log = c.path("proxy", "logs", "error.log")
        with c.path("logs", "nginx.out").open("a") as fh:
            nginx = subprocess.Popen(proxy.nginx_command(c.root), stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        procs.append(("proxy (nginx)", nginx, nginx_log))
        wait_healthy(f"127.0.0.1:{port}", c.path("ca", "ca.crt"), nginx, 30, "the proxy", nginx_log)
        write_json_atomic(c.path("state", "server.json"), {
            "pid": os.getpid(), "superlink_pid": link.pid, "proxy_pid": nginx.pid, "started": time.time(),
            "public": c.record["address"], "control": c.control_address, "metrics_port": metrics_port})
        if metrics_port:
            from server.metrics import serve_metrics

            serve_metrics(c, metrics_port)
        out.write(f"serving: sites connect to https://{host}:{port} (Fleet API only); operator commands use "
                  f"{c.control_address} (loopback); metrics on http://127.0.0.1:{metrics_port}/metrics; "
                  f"logs in {c.path('logs')}\n")
        out.flush()
        while not stopping:
            for what, proc, log_file in procs:
                if proc.poll() is not None:
                    out.write(f"{what} exited with code {proc.returncode}; stopping the server; see {log_file}\n")
                    return 1
            time.sleep(0.5)
        out.write("stopped\n")
        return 0
    except DeployError as e:
        out.write(f"{e}\n")
        return 1
    finally:
        for _, proc, _ in reversed(procs):
            stop_group(proc)
