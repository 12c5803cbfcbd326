"""`oncofed server start`: preflight, then the SuperLink (TLS, node authentication, database) on loopback,
its SuperExec (which launches every run's ServerApp), the nginx proxy on the public address, and the
Prometheus endpoint, supervised as one service.

    CONSORTIUM/state/superlink.db   runs and registered sites survive a restart
    CONSORTIUM/state/server.json    process ids and state of this service and of each process it supervises
    CONSORTIUM/logs/superlink.log   the SuperLink's log (and every ServerApp's)
    CONSORTIUM/logs/superexec.log   the SuperExec's log
    CONSORTIUM/proxy/               nginx.conf, its logs and pid
    CONSORTIUM/runs/NAME/           one training run (`oncofed run`): checkpoints, metrics, audit, status

The process stays in the foreground (for systemd or a terminal); SIGTERM or Ctrl-C stops all of it.
Flower's SuperLink starts its SuperExec itself and never notices when it dies (runs then stay pending
forever while the SuperLink's /health says 200: issue 17). So the SuperLink runs with `--isolation
process` and this service starts the SuperExec itself, next to the SuperLink and nginx, watches all
three, and restarts whichever dies (backoff from 2 s, doubling to 60 s). `/health` on the public
address is answered by this service (nginx forwards it here): 200 when all three are up and the
SuperLink answers, otherwise 503 naming what is down; `oncofed run` checks it before submitting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from privacy.pki import parse_address, read_consortium
from privacy.preflight import (
    Check,
    Holder,
    check_port_free,
    check_private_key,
    check_server_certificate,
    port_holder,
    port_in_use,
    report,
)
from privacy.preflight import free_port_after as preflight_free_port_after
from privacy.registry import control_address, control_address_setting
from privacy.site_config import host_port
from server import proxy
from server.processes import (
    answers_health,
    secure_superlink_command,
    signal_group,
    start_group,
    stop_group,
    wait_healthy,
)
from shared_models.files import pid_alive, write_json_atomic
from shared_models.flower_tools import METRICS_PORT, QUIET_ENV

FLOWER_ENV = {**QUIET_ENV,
              # the SuperLink's task launcher polls every second by default; 0.2 s shortens each round
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
              # Flower 1.41's SuperLink serves its Fleet, Control and Runtime APIs on its one --port (the consortium's
              # control-address). These switch on its legacy gRPC Control and Fleet servers as well, on 0.0.0.0:9093
              # and 0.0.0.0:9092, ports no consortium setting names: a second consortium's SuperLink would collide on
              # them, and the Control API would listen on every interface, past the proxy. Off, whatever the
              # operator's environment says.
              "FLWR_INTERNAL_GRPC_CONTROL_API": "0", "FLWR_INTERNAL_GRPC_FLEET_API": "0"}


def service_env() -> dict:
    """The environment of the SuperLink and the SuperExec: this process's, FLOWER_ENV over it."""
    return {**os.environ, **FLOWER_ENV}


class DeployError(RuntimeError):
    """A deployment step failed: names the file or process and the fix."""


class SubmittedError(DeployError):
    """A failure after the command's flwr run was submitted (it goes on, said so): not a preflight the operator fixes
    before anything ran, so the command exits 1, not 2."""


class RunFailedError(DeployError):
    """The run ended without a model (no site trained): there is nothing to deliver or continue, whatever is done,
    so the command exits 1, as `oncofed run` does for that run, not 2 (a preflight the operator can fix)."""


@dataclass(frozen=True)
class Consortium:
    root: Path
    record: dict

    @classmethod
    def load(cls, root: str | Path) -> "Consortium":
        root = Path(root).resolve()
        return cls(root, read_consortium(root / "consortium.json", DeployError))

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


def server_checks(c: Consortium, metrics_port: int = 0) -> list[Check]:
    host, _ = c.public
    checks = check_server_certificate(c.path("server", "server.crt"), c.path("server", "server.key"),
                                      c.path("ca", "ca.crt"), list(dict.fromkeys([host, "127.0.0.1", "localhost"])))
    checks += [check_private_key(c.path("server", "server.key"), "server TLS key"),
               check_private_key(c.path("signing", "signing.key"), "model-signing key"),
               check_private_key(c.path("ca", "ca.key"), "CA key")]
    binary = proxy.nginx_binary()
    checks.append(Check("nginx", binary is not None, binary or proxy.NGINX_HINT))
    checks += port_checks(c, metrics_port)
    if left := orphaned_processes(c):
        checks.append(Check("processes of an earlier `oncofed server start`", False,
                            f"{orphans_left(c, left)}; then start again"))
    try:
        c.path("state").mkdir(exist_ok=True)
        probe = c.path("state", ".write-probe")
        probe.write_text("")
        probe.unlink()
        checks.append(Check(f"database directory {c.path('state')}", True, "writable"))
    except OSError as e:
        checks.append(Check(f"database directory {c.path('state')}", False, f"not writable ({e.strerror})"))
    return checks


@dataclass(frozen=True)
class Listen:
    """A port `oncofed server start` listens on, and the one setting that chooses it."""
    what: str
    host: str
    port: int
    setting: str


def listening_ports(c: Consortium, metrics_port: int = 0) -> list[Listen]:
    """Every port the service listens on, each from its one setting (its own /health takes a free loopback port).
    The SuperLink listens on its control-address port alone (FLOWER_ENV), which the SuperExec, the ServerApps it
    launches, the proxy and the operator's flwr commands (`oncofed runs`, `consortium add-site`: registry.flwr_home)
    all read from consortium.json."""
    host, port = c.public
    record = c.path("consortium.json")
    ports = [Listen("public (proxy) address", proxy.listen_host(host), port,
                    f'"address" in {record} (`oncofed consortium init --address`; the sites connect to it)'),
             Listen("SuperLink loopback address", "127.0.0.1", c.internal_port, control_address_setting(c.root))]
    if metrics_port:
        ports.append(Listen("metrics (--metrics-port) address", "127.0.0.1", metrics_port, "--metrics-port"))
    return ports


def _same_socket(a: Listen, b: Listen) -> bool:
    unspecified = ("0.0.0.0", "::")
    return a.port == b.port and (a.host == b.host or a.host in unspecified or b.host in unspecified)


def port_checks(c: Consortium, metrics_port: int = 0) -> list[Check]:
    """Each port distinct from the others and free; a taken one names who holds it (another consortium's SuperLink
    by its directory), its setting, and a port free now to set it to."""
    ports, checks = listening_ports(c, metrics_port), []
    for i, p in enumerate(ports):
        name = f"{p.what} {host_port(p.host, p.port)}"
        if clash := next((q for q in ports[:i] if _same_socket(p, q)), None):
            checks.append(Check(name, False, f"the same port as the {clash.what} ({clash.setting}): set {p.setting} to "
                                f"another port, e.g. {free_port_after(p.port, ports)}"))
            continue
        check, holder = check_port_held(p.host, p.port, p.what)
        if holder is not None:
            if holder.root == c.root:
                fix = (f"this consortium's own: its server runs already (`oncofed server stop {c.root}`), or a killed "
                       f"one left it running (`kill {holder.pid}`)")
            else:
                fix = (f"each consortium on this machine needs ports of its own: set {p.setting} to a free port, e.g. "
                       f"{free_port_after(p.port, ports)}")
            check = Check(name, False, f"held by {holder.text}; {fix}")
        checks.append(check)
    return checks


def free_port_after(port: int, taken: list[Listen] = ()) -> int:
    """The first port above `port` free on loopback now and none of `taken`: what an error suggests for a setting."""
    return preflight_free_port_after(port, {t.port for t in taken})


def check_port_held(host: str, port: int, what: str) -> tuple[Check, Holder | None]:
    """check_port_free, and who holds the port when another process listens on it (None when it is free, or cannot be
    bound for another reason: a privileged port, an address not this machine's)."""
    check = check_port_free(host, port, what)
    return check, port_holder(port) if port_in_use(check) else None


def superlink_port_refusal(port: int) -> str:
    """Why `oncofed consortium init --internal-port PORT` is refused on this machine ("" if it is not): the port is held
    now, by another consortium's SuperLink most likely (named), which this one's would collide with."""
    _, holder = check_port_held("127.0.0.1", port, "SuperLink loopback address")
    if holder is None:
        return ""
    return (f"--internal-port {port}: 127.0.0.1:{port} is held by {holder.text} on this machine; each "
            f"consortium here needs a SuperLink port of its own: pass --internal-port {free_port_after(port)} (free "
            "now). Nothing was written")


def server_state(root: Path) -> dict:
    """The consortium's state/server.json (what `oncofed server start` records), {} when absent or unreadable."""
    try:
        return json.loads((Path(root) / "state" / "server.json").read_text())
    except (OSError, ValueError):
        return {}


def orphaned_processes(c: Consortium) -> list[tuple[str, int]]:
    """(component, pid) of the processes a killed `oncofed server start` of this consortium left running (its
    children run in their own sessions, so they outlive it unless a service manager kills its cgroup). A pid is
    named only if its command line names this consortium's directory, so a reused pid is never blamed."""
    state = server_state(c.root)
    if not state.get("pid") or pid_alive(state["pid"]):
        return []
    left = []
    for key in ("superlink_pid", "superexec_pid", "proxy_pid"):
        pid = state.get(key)
        try:
            cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, TypeError, ValueError):
            continue
        if str(c.root) in cmdline:
            left.append((key.removesuffix("_pid"), int(pid)))
    return left


def orphans_left(c: Consortium, left: list[tuple[str, int]]) -> str:
    """What a killed `oncofed server start` left running (orphaned_processes) and how to stop it."""
    return (f"its supervisor (pid {server_state(c.root).get('pid')}) was killed and left "
            f"{', '.join(f'{k} pid {p}' for k, p in left)} running, holding the ports: `oncofed server stop {c.root}` "
            f"stops them")


def stop_orphans(c: Consortium, left: list[tuple[str, int]], grace: float = 10.0) -> str:
    """Stop what a killed `oncofed server start` left (orphaned_processes: only pids whose command line names this
    consortium): SIGTERM to each one's process group (start_group made each a group leader: nginx's workers and
    the rest go with it), SIGKILL to what is left after `grace` seconds. Returns what was done."""
    def signal_it(pid: int, sig: int) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:  # not the leader of its own group (not started by start_group): the process alone
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for _, pid in left:
        signal_it(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for _, p in left) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = [(k, p) for k, p in left if pid_alive(p)]
    for _, pid in killed:
        signal_it(pid, signal.SIGKILL)
    write_json_atomic(c.path("state", "server.json"), {"pid": None, "stopped": time.time()})
    return (f"{c.root}: the server's supervisor (`oncofed server start`) had been killed; stopped what it left running: "
            f"{', '.join(f'{k} (pid {p})' for k, p in left)}"
            + (f" ({', '.join(k for k, _ in killed)} only by SIGKILL after {grace:g} s)" if killed else "")
            + f". `oncofed server start {c.root}` starts the server again")


def _is_server_of(pid: int, root: Path) -> bool:
    """Whether process `pid` is an `oncofed server start` of the consortium at `root` (so a pid the kernel reused
    after a killed service is never signalled): its command line holds `server start` and the directory."""
    import psutil

    try:
        proc = psutil.Process(pid)
        args = proc.cmdline()  # readable for another user's process too: a reused pid is told apart first
        if "start" not in args or "server" not in args:
            return False
        cwd = Path(proc.cwd())
    except psutil.AccessDenied:
        raise DeployError(f"pid {pid} (the server recorded in {root / 'state' / 'server.json'}) belongs to another user: "
                          "run `oncofed server stop` as the service's user (or root); under systemd, `systemctl stop "
                          "oncofed-server`") from None
    except (psutil.Error, OSError):
        return False
    return any((cwd / a).resolve() == root.resolve() for a in args if a and not a.startswith("-"))


def systemd_unit(cgroup: str) -> str | None:
    """The systemd system service a process runs in, from its /proc/PID/cgroup text (a line ending in
    /system.slice/NAME.service), None when it is not one: a process started from a login shell or a terminal
    (user.slice, whatever the shell's environment says) is not."""
    for line in cgroup.splitlines():
        parts = line.rsplit(":", 1)[-1].split("/")
        if "system.slice" in parts and parts[-1].endswith(".service"):
            return parts[-1]
    return None


def _systemd_unit_of(pid: int) -> str | None:
    try:
        return systemd_unit(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None


def stop_server(root: str | Path, timeout: float = 60.0, force: bool = False) -> str:
    """SIGTERM to this consortium's running `oncofed server start`, which stops the SuperLink, the SuperExec (and a
    ServerApp it runs) and the proxy, as Ctrl-C does; waits up to `timeout` seconds for it to end. Refused while a
    run trains or an `oncofed deliver` runs unless `force` (it would end them: named, with how each goes on); one
    still pending is named as such, not refused for (the restarted server starts it). With that process killed
    (kill -9), the SuperLink, SuperExec and proxy it left running instead (stop_orphans). Returns what happened;
    raises DeployError when it cannot be stopped, would stop a run or a delivery, or is not this consortium's."""
    c = Consortium.load(root)
    pid = server_state(c.root).get("pid")
    if not pid or not pid_alive(pid):
        if left := orphaned_processes(c):
            return stop_orphans(c, left)
        return f"{c.root}: the server is not running"
    if not _is_server_of(int(pid), c.root):
        raise DeployError(f"{c.path('state', 'server.json')}: pid {pid} is not this consortium's `oncofed server start` "
                          "(it ended without recording that, and the pid was reused): nothing was stopped; the "
                          "server is not running")
    if unit := _systemd_unit_of(int(pid)):  # its unit's Restart=always would start it again
        raise DeployError(f"{c.root}: the server (pid {pid}) runs as the systemd service {unit}, which would start it "
                          f"again: `systemctl stop {unit}`")
    from server.runs import LAUNCHED, QUEUED, delivering_run_names, live_run_names, read_superlink

    superlink = read_superlink(c.path("state", "superlink.db"))
    # only a running flwr run has a ServerApp, which dies with the SuperExec; a pending or starting one has none to
    # lose and the restarted server launches it (as record_interrupted knows): it is named, not refused for
    live = sorted(live_run_names(c.root, superlink, LAUNCHED))
    delivering = delivering_run_names(c.root, superlink, LAUNCHED)
    queued = sorted(live_run_names(c.root, superlink, QUEUED))
    queued_deliveries = delivering_run_names(c.root, superlink, QUEUED)
    doing, ended, again, waiting = _stop_wording(c, live, delivering, queued, queued_deliveries)
    if ended and not force:
        raise DeployError(f"{c.root}: {doing}, and stopping the server stops them (Flower ends a ServerApp with the "
                          f"SuperExec that started it). Wait for them (`oncofed runs follow {c.root} NAME`), or stop "
                          f"now with --force: their checkpoints and the installs recorded so far stay, and once the "
                          f"server is back {again}{waiting}")
    signalled = time.time()
    try:
        os.kill(int(pid), signal.SIGTERM)
    except PermissionError:
        raise DeployError(f"{c.root}: not allowed to signal the server (pid {pid}): run `oncofed server stop` as the "
                          "service's user (or root); under systemd, `systemctl stop oncofed-server`") from None
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        raise DeployError(f"{c.root}: the server (pid {pid}) is still stopping after {timeout:g} s; wait, or "
                          f"`kill -9 {pid}` (its SuperLink, SuperExec and proxy are then named by the next "
                          "`oncofed server start`)")
    if queued or queued_deliveries:
        # pending when looked at above, launched before the server ended: its exit recorded what it ended, which is said
        from server.runs import delivery_runs, interrupted_record

        def since_signalled(record: dict | None) -> bool:  # recorded by this exit, not an earlier one
            return bool(record) and float(record.get("at", 0)) >= signalled

        db = c.path("state", "superlink.db")
        started = [n for n in queued if since_signalled(interrupted_record(c.root / "runs" / n, db)[0])]
        started_deliveries = {n: i for n, i in queued_deliveries.items() if any(
            e["flwr_run"] == i and since_signalled(e.get("ended")) and e["ended"].get("how") == "interrupted"
            for e in delivery_runs(c.root / "runs" / n))}
        if started or started_deliveries:
            _, ended, again, waiting = _stop_wording(
                c, sorted([*live, *started]), {**delivering, **started_deliveries},
                [n for n in queued if n not in started],
                {n: i for n, i in queued_deliveries.items() if n not in started_deliveries})
    return f"{c.root}: server stopped (pid {pid})" + (f"; it stopped {ended}: once the server is back, {again}"
                                                        if ended else "") + waiting


def _stop_wording(c: "Consortium", live: list[str], delivering: dict[str, int], queued: list[str],
                  queued_deliveries: dict[str, int]) -> tuple[str, str, str, str]:
    """What `oncofed server stop` says: (what it would stop, as it goes on; what it ended; how each goes on once the
    server is back; the pending runs and deliveries it does not end)."""
    doing, ended, again = [], [], []
    if live:
        doing.append(f"run(s) {', '.join(live)} are training")
        ended.append(f"run(s) {', '.join(live)}")
        again.append("; ".join(f"`oncofed run {c.root} --name {n} --resume`" for n in live) + " continues them")
    if delivering:
        ended.append(_deliveries_of(delivering))
        doing.append(f"{ended[-1]} is in progress")
        again.append("; ".join(f"`oncofed deliver {c.root} {n}`" for n in delivering) + " sends the model again to "
                     "the sites that have not installed it")
    waiting = " and ".join(([f"run(s) {', '.join(queued)}"] if queued else [])
                           + ([_deliveries_of(queued_deliveries)] if queued_deliveries else []))
    waiting = waiting and (f"; {waiting} pending (not started yet), which stopping the server does not end: the "
                           f"server starts them when it is back (`oncofed server start {c.root}`)")
    return " and ".join(doing), " and ".join(ended), "; ".join(again), waiting


def _deliveries_of(runs: dict[str, int]) -> str:
    """{run name: its delivery's flwr run} as `oncofed server stop` names them."""
    return "the delivery of run(s) " + ", ".join(f"{n} (`oncofed deliver`, flwr run {i})" for n, i in runs.items())


def superexec_command(c: Consortium, parent_pid: int) -> list[str]:
    """The SuperExec that launches ServerApps for the SuperLink (its Runtime API, over TLS on loopback);
    it exits when this service does (`--parent-pid`). Flower 1.41 starts each ServerApp with `--parent-pid` of the
    SuperExec, and the ServerApp stops when it dies: a running run ends with either process (its checkpoints stay;
    `oncofed run --resume` continues it); the service records which (server.runs.record_interrupted, and for an
    `oncofed deliver`'s, record_interrupted_deliveries)."""
    return [sys.executable, "-m", "server.flower_processes", "superexec", "--runtime-api-address",
            f"127.0.0.1:{c.internal_port}",
            "--root-certificates", str(c.path("ca", "ca.crt")), "--parent-pid", str(parent_pid)]


RESTART_FIRST_DELAY = 2.0
RESTART_MAX_DELAY = 60.0
STABLE_SECONDS = 60.0  # up this long: the next failure restarts after RESTART_FIRST_DELAY again


@dataclass
class Supervised:
    """One process of the service, restarted with backoff whenever it exits while the service runs."""
    key: str
    what: str
    command: list[str]
    log_file: Path
    env: dict | None = None
    cwd: Path | None = None
    # nginx's workers outlive a killed master and keep the port: stop the whole group before restarting.
    # Not the SuperExec's: its ServerApp stops on its own once the SuperExec is gone (Flower's `--parent-pid`),
    # after a last write of its files.
    reap_group: bool = True
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    last_exit: str = ""
    down_since: float | None = None
    next_start: float = 0.0
    delay: float = RESTART_FIRST_DELAY

    def start(self) -> None:
        self.proc = start_group(self.command, self.env, self.cwd, self.log_file)
        self.started, self.down_since = time.time(), None

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self, out) -> bool:
        """Notice an exit (schedule the restart) or restart when due; True if the state changed."""
        now = time.time()
        if self.proc is not None and self.down_since is None and self.proc.poll() is not None:
            code = self.proc.returncode
            if self.reap_group:
                signal_group(self.proc.pid, signal.SIGKILL)  # the leader is gone: only orphans remain
            self.last_exit = (f"killed by signal {-code}" if code < 0 else f"exited with code {code}") + \
                time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
            if now - self.started > STABLE_SECONDS:
                self.delay = RESTART_FIRST_DELAY
            self.down_since, self.next_start = now, now + self.delay
            out.write(f"{self.what} {self.last_exit}; restarting it in {self.delay:.0f} s; see {self.log_file}\n")
            out.flush()
            self.delay = min(self.delay * 2, RESTART_MAX_DELAY)
            return True
        if self.down_since is not None and now >= self.next_start:
            self.restarts += 1
            self.start()
            out.write(f"{self.what} restarted (restart {self.restarts})\n")
            out.flush()
            return True
        return False

    def state(self) -> dict:
        """What /health shows (to the sites too: no paths, no process ids)."""
        return {"up": self.up, "restarts": self.restarts, "last_exit": self.last_exit, "down_since": self.down_since}


def health_report(services: list[Supervised], superlink_answers) -> tuple[int, dict]:
    """(HTTP status, body) of /health: 200 only when every process is up and the SuperLink answers."""
    components = {s.key: s.state() for s in services}
    down = [s.key for s in services if not s.up]
    if "superlink" not in down and not superlink_answers():
        components["superlink"]["up"] = False
        components["superlink"]["last_exit"] = "running but its /health does not answer 200"
        down.append("superlink")
    body = {"status": "ok" if not down else "down", "down": down, "components": components}
    if down:
        body["reason"] = "; ".join(f"{k} is down ({components[k]['last_exit'] or 'starting'}; being restarted, "
                                   f"see logs/{k}.log on the server)" for k in down)
    return (200 if not down else 503), body


def serve_health(report, host: str = "127.0.0.1", port: int = 0):
    """A plain-HTTP /health on loopback (nginx forwards the public /health here); returns the server."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            code, body = report() if self.path.split("?")[0] == "/health" else (404, {"error": "only /health"})
            data = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # nginx logs the requests
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True, name="oncofed-health").start()
    return server


def server_health(c: Consortium, timeout: float = 3.0) -> tuple[bool, str]:
    """(all up, why not) from the running `oncofed server start`'s /health (its loopback port in server.json)."""
    import urllib.error
    import urllib.request

    state = c.path("state", "server.json")
    port = server_state(c.root).get("health_port")
    if port is None:
        return False, f"the server is not running ({state} has no health port): start it with `oncofed server start`"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return True, json.loads(r.read()).get("status", "ok")
    except urllib.error.HTTPError as e:
        try:
            return False, json.loads(e.read()).get("reason", f"/health answered {e.code}")
        except ValueError:
            return False, f"/health answered {e.code}"
    except (OSError, ValueError):
        return False, "the server is not running (its /health does not answer): start it with `oncofed server start`"


def check_server_health(c: Consortium) -> Check:
    ok, why = server_health(c)
    return Check("server processes (SuperLink, SuperExec, proxy)", ok, "all up" if ok else why)


def start_server(root: str | Path, metrics_port: int = METRICS_PORT, out=sys.stdout) -> int:
    """Run the consortium's server until stopped; returns the exit status."""
    c = Consortium.load(root)
    out.write(report(f"server {c.record['name']!r}", server_checks(c, metrics_port)) + "\n")
    host, port = c.public
    c.path("logs").mkdir(exist_ok=True)
    c.path("runs").mkdir(exist_ok=True)
    env = service_env()
    ca = c.path("ca", "ca.crt")
    command = secure_superlink_command(ca, c.path("server", "server.crt"), c.path("server", "server.key"),
                                       c.path("state", "superlink.db"), c.internal_port)
    link = Supervised("superlink", "the SuperLink", command, c.path("logs", "superlink.log"), env, c.root)
    superexec = Supervised("superexec", "the SuperExec", superexec_command(c, os.getpid()),
                           c.path("logs", "superexec.log"), env, c.root, reap_group=False)
    nginx = Supervised("proxy", "the proxy (nginx)", proxy.nginx_command(c.root), c.path("logs", "proxy.log"))
    services = [link, superexec, nginx]
    stopping = False

    def shutdown(signum=None, frame=None):
        nonlocal stopping
        stopping = True

    def superlink_answers() -> bool:
        return link.up and answers_health(c.control_address, ca)

    health = serve_health(lambda: health_report(services, superlink_answers))
    health_port = health.server_address[1]
    proxy.write_config(c.root, host, port, c.internal_port, health_port=health_port)
    started = time.time()

    def record() -> None:
        write_json_atomic(c.path("state", "server.json"), {
            "pid": os.getpid(), "superlink_pid": link.proc.pid if link.proc else None,
            "superexec_pid": superexec.proc.pid if superexec.proc else None,
            "proxy_pid": nginx.proc.pid if nginx.proc else None, "started": started,
            "public": c.record["address"], "control": c.control_address, "metrics_port": metrics_port,
            "health_port": health_port,
            "components": {s.key: {**s.state(), "pid": s.proc.pid if s.proc else None, "log": str(s.log_file)}
                           for s in services}})

    def interrupted(why: str) -> None:  # the runs this exit ends, in their directories, before the database says failed
        from server.runs import read_superlink, record_interrupted, record_interrupted_deliveries

        superlink = read_superlink(c.path("state", "superlink.db"))
        if names := record_interrupted(c.root, why, superlink):
            out.write(f"run(s) {', '.join(names)} stopped: {why}; `oncofed run {c.root} --name NAME --resume` "
                      "continues each\n")
        if names := record_interrupted_deliveries(c.root, why, superlink):
            out.write(f"the delivery of run(s) {', '.join(names)} stopped: {why}; `oncofed deliver {c.root} NAME` "
                      "sends each again\n")
        out.flush()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        # a run its database still calls running lost its ServerApp when the last server exited (kill -9, crash)
        interrupted("the server exited (killed or crashed) while it ran")
        link.start()
        wait_healthy(c.control_address, ca, link.proc, 60, "the SuperLink", link.log_file, DeployError)
        superexec.start()
        nginx.start()
        wait_healthy(proxy.reached_at(host, port), ca, nginx.proc, 30, "the proxy",
                     c.path("proxy", "logs", "error.log"), DeployError)
        record()
        if metrics_port:
            from server.metrics import serve_metrics

            try:
                serve_metrics(c, metrics_port)
            except OSError as e:  # taken between preflight and now
                raise DeployError(f"metrics: cannot listen on 127.0.0.1:{metrics_port} ({e.strerror}); choose "
                                  "another --metrics-port (0: off)") from None
        out.write(f"serving: sites connect to https://{c.record['address']} (Fleet API only); operator commands use "
                  f"{c.control_address} (loopback); metrics on http://127.0.0.1:{metrics_port}/metrics; "
                  f"health on https://{c.record['address']}/health; logs in {c.path('logs')}\n")
        out.flush()
        while not stopping:
            superexec_was_up = superexec.up
            if any([s.check(out) for s in services]):
                record()
            if superexec_was_up and not superexec.up:
                interrupted(f"the SuperExec exited ({superexec.last_exit or 'unknown cause'})")
            time.sleep(0.5)
        out.write("stopped\n")
        return 0
    except DeployError as e:
        out.write(f"{e}\n")
        return 1
    finally:
        health.shutdown()
        if stopping:
            interrupted("the server was stopped (`oncofed server stop`, SIGTERM or Ctrl-C)")
        for s in reversed(services):
            if s.proc is not None:
                stop_group(s.proc)
        write_json_atomic(c.path("state", "server.json"), {"pid": None, "stopped": time.time()})
