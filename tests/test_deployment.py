"""A real deployment on loopback, every part a real process: `oncofed server start` (SuperLink with TLS,
node authentication and a database, behind the nginx proxy), three `oncofed site start` SuperNodes on
vendored pan-cancer hospitals, `oncofed run` with DP and SecAgg+. Then the faults of issue 5:

  a) a site whose key is not registered is refused;
  b) a SuperNode killed during round 2: the run completes with the others, the audit log records it;
  c) the server killed during round 2: restart, `oncofed run --resume`, rounds complete from the
     checkpoint, and every site's privacy ledger holds exactly the rounds it trained;
  d) a signing key the sites do not trust stops `oncofed run` at preflight (no site spends anything); a
     package signed by it is refused by the site, whose previous model stays active; a site that trained
     but missed the delivery makes `oncofed run` exit 3, and `oncofed deliver` installs the model there;
  e) the Control API through the proxy is refused (flwr's own CLI and raw requests) while training passes;
  f) the Fleet API answering HTTP 500 for a while: every SuperNode retries and stays up;
  g) the SuperExec (and the proxy) killed: `/health` names it, `oncofed server start` restarts it;
  h) a site whose data fails validation (read again by each message's fresh ClientApp process) refuses at SecAgg+'s
     setup: a round left with enough sites is trained by the others, who alone spend; a round left short of
     min-sites is abandoned before any site trains, and no ledger records it.

The tests share one deployment, run in file order and share runs between faults (three runs and a resume). They need nginx (`.ci/run`
installs Debian's nginx-light) and skip with that reason without it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.app import DATA_REFUSAL as DATA_REFUSAL_REASON
from privacy.accounting import epsilon
from server.processes import free_port
from server.proxy import nginx_binary
from simulations.federation import ensure_partition

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(nginx_binary() is None, reason="needs nginx (Debian: apt-get install nginx-light; "
                                 ".ci/run installs it)")]

ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
RUN = ["--set", "local-epochs=1", "--set", "min-sites=2", "--set", "round-timeout=90.0", "--set", "epsilon=4.0",
       "--set", "evaluate-every=10", "--set", "batch-size=64"]


def oncofed(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oncofed", *args], env=ENV, capture_output=True, text=True,
                          **kw)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("a") as fh:
        return subprocess.Popen([sys.executable, "-m", "oncofed", *args], env=ENV, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(30)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class Deployment:
    def __init__(self, root: Path):
        self.root = root
        self.op = root / "op"
        self.public, self.internal, self.metrics = free_port(), free_port(), free_port()
        self.server: subprocess.Popen | None = None
        self.sites: dict[str, subprocess.Popen] = {}

    def start_server(self) -> None:
        log = self.root / "server.out"
        before = log.read_text().count("serving:") if log.exists() else 0
        self.server = spawn(["server", "start", str(self.op), "--metrics-port", str(self.metrics)], log)
        wait_for(lambda: log.read_text().count("serving:") > before or self.server.poll() is not None,
                 90, "the server to start")
        assert self.server.poll() is None, (self.root / "server.out").read_text()[-3000:]

    def kill_server(self) -> None:
        """SIGKILL the service and every process under it (SuperLink, its ServerApp, nginx): a crash."""
        pids = json.loads((self.op / "state" / "server.json").read_text())
        for key in ("superlink_pid", "superexec_pid", "proxy_pid"):
            try:
                os.killpg(pids[key], signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass
        kill_group(self.server)

    def start_site(self, name: str) -> subprocess.Popen:
        # a free port picked now: one picked when the module's fixture was made (minutes before) was taken by
        # another process in between once (the preflight's "local runtime port ... Address already in use")
        proc = spawn(["site", "start", str(self.root / name), "--port", str(free_port()),
                      "--poll-interval", "0.3"], self.root / f"{name}.out")
        self.sites[name] = proc
        return proc

    def site_audit(self, name: str) -> list[dict]:
        return read_jsonl(self.root / name / "state" / "audit.jsonl")

    def run(self, name: str, *args: str) -> subprocess.Popen:
        return spawn(["run", str(self.op), "--name", name, *RUN, *args], self.root / f"run-{name}.out")

    def status(self, run: str) -> dict:
        try:
            return json.loads((self.op / "runs" / run / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        for proc in [*self.sites.values(), self.server]:
            if proc is not None and proc.poll() is None:
                kill_group(proc, signal.SIGTERM)


PATIENTS_PER_SITE = 250  # the deployment's mechanics, not its accuracy (fewer trip the label-leak check at C0)


def _first_patients(site: Path, n: int) -> None:
    """Keep n of a vendored hospital's patients, those with the most modalities first (no table left empty), in
    every table (the pan-cancer schema, so the model and its messages through the proxy keep their real size)."""
    import pandas as pd

    labels = pd.read_csv(site / "labels.csv", dtype=str, keep_default_na=False)
    labels = labels.sample(frac=1.0, random_state=0)  # a fair sample of the hospital's types
    present = labels[[c for c in labels.columns if c.startswith("has_")]].astype(int).sum(axis=1)
    labels = labels.loc[present.sort_values(ascending=False, kind="stable").index[:n]]
    labels.to_csv(site / "labels.csv", index=False)
    keep = set(labels["patient"])
    for table in site.glob("*.csv*"):
        if table.name != "labels.csv":
            df = pd.read_csv(table, dtype=str, keep_default_na=False)
            df[df[df.columns[0]].isin(keep)].to_csv(table, index=False)


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    data = ensure_partition(root / "data")
    for i in range(4):
        _first_patients(data / f"C{i}", PATIENTS_PER_SITE)
    d = Deployment(root)
    r = oncofed("consortium", "init", str(d.op), "--name", "e2e", "--address", f"127.0.0.1:{d.public}",
                "--internal-port", str(d.internal))
    assert r.returncode == 0, r.stderr
    for i in range(4):
        r = oncofed("site", "init", str(root / f"C{i}"), "--name", f"C{i}", "--consortium", str(d.op / "public"),
                    "--ca-fingerprint", json.loads((d.op / "consortium.json").read_text())["ca_sha256"],
                    "--data", str(data / f"C{i}"), "--budget", "100")
        assert r.returncode == 0, r.stderr
    # C2's site.json reports C0's name (a misconfigured or dishonest site): its records must still go under the name
    # its key is registered with (run config site-registry), and C0's stay C0's
    site_json = root / "C2" / "site.json"
    site_json.write_text(json.dumps({**json.loads(site_json.read_text()), "site-name": "C0"}))
    d.start_server()
    for i in range(3):
        r = oncofed("consortium", "add-site", str(d.op), "--name", f"C{i}", "--key",
                    str(root / f"C{i}" / "keys" / "site.key.pub"))
        assert r.returncode == 0, r.stderr + r.stdout
        d.start_site(f"C{i}")
    yield d
    d.stop()


def _https(d: Deployment, method: str, path: str) -> int:
    ctx = ssl.create_default_context(cafile=str(d.op / "ca" / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", d.public, context=ctx, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)  # the raw path: no client-side normalising
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_unregistered_site_is_refused(dep):
    proc = dep.start_site("C3")
    code = proc.wait(120)
    out = (dep.root / "C3.out").read_text()
    assert code == 3, out[-2000:]
    assert "oncofed consortium add-site" in out and "preflight passed" in out


def test_c_e_run_survives_a_server_crash_and_the_proxy_hides_the_control_api(dep):
    # (h) C1's data fails validation as the run starts: it refuses round 1 at SecAgg+'s setup, and C0 and C2 (min-sites
    # 2) train it without C1, which spends nothing on it; its data is back for round 2, which all three train
    seen = len(dep.site_audit("C1"))
    with _labels_missing(dep, "C1"):
        run = dep.run("main", "--set", "num-rounds=2")
        wait_for(lambda: any(e.get("event") == "round_refused" and e.get("round") == 1
                             for e in dep.site_audit("C1")[seen:]), 240, "C1 to refuse round 1 of run main")
    # (e) while the run's training traffic passes through the proxy
    wait_for(lambda: dep.status("main").get("round", 0) >= 1, 240, "round 1 of run main")
    assert _https(dep, "GET", "/health") == 200
    for path in ("/v1/control/list-runs", "/v1/runtime/get-run", "/v1/fleet/../control/list-runs",
                 "/v1/fleet/%2e%2e/control/list-runs", "//v1/control/list-runs"):
        assert _https(dep, "POST", path) == 403, path
    assert _https(dep, "POST", "/v1/fleet/pull-messages") not in (403, 404)  # reaches Flower's Fleet API
    home = dep.root / "flwr-home-outsider"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "p"\n[superlink.p]\naddress = "127.0.0.1:{dep.public}"\n'
                                      f'root-certificates = "{dep.op / "ca" / "ca.crt"}"\n')
    outsider = subprocess.run(["flwr", "ls", "p"], env={**ENV, "FLWR_HOME": str(home)}, capture_output=True,
                              text=True, timeout=120)
    assert outsider.returncode != 0 and "main" not in outsider.stdout
    # (c) kill the whole server while round 2 is under way: once a site has trained round 2
    wait_for(lambda: any(e.get("event") == "round_trained" and e.get("round") == 2
                         for n in ("C0", "C1", "C2") for e in dep.site_audit(n)), 240, "round 2 training")
    dep.kill_server()
    kill_group(run)
    assert dep.status("main")["round"] == 1
    dep.start_server()
    resumed = dep.run("main", "--set", "num-rounds=2", "--resume")
    assert resumed.wait(600) == 0, (dep.root / "run-main.out").read_text()[-4000:]
    result = json.loads((dep.op / "runs" / "main" / "result.json").read_text())
    assert result["first_round"] == 2 and result["round"] == 2
    assert sorted(d["site"] for d in result["deliveries"] if d["installed"]) == ["C0", "C1", "C2"]
    assert [d.get("reported_site") for d in result["deliveries"] if d["site"] == "C2"] == ["C0"]
    metrics = read_jsonl(dep.op / "runs" / "main" / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    from client.model_store import ModelStore
    from privacy.signing import load_public

    for name in ("C0", "C1", "C2"):
        store = ModelStore(dep.root / name / "models")
        assert store.active() == "v0001"
        store.verify("v0001", load_public(dep.root / name / "trust" / "signing.pub"))
        # the ledger holds every round the site trained (audit log), once each, and nothing else
        ledger = json.loads((dep.root / name / "state" / "privacy-ledger.json").read_text())
        entries = [e for e in ledger["entries"] if e["run_id"] == result["run"]]
        trained = [e for e in dep.site_audit(name) if e.get("event") == "round_trained" and e["run"] == result["run"]]
        assert all(e["status"] == "committed" for e in entries), entries
        assert sorted((e["round"], e["steps"]) for e in entries) == sorted((t["round"], int(t["steps"]))
                                                                            for t in trained)
        assert {e["round"] for e in entries} == ({2} if name == "C1" else {1, 2})
        mechanisms = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert result["site_epsilon"][name] == pytest.approx(epsilon(mechanisms, ledger_delta(ledger)), rel=1e-6)
    assert sorted(result["site_epsilon"]) == ["C0", "C1", "C2"]  # the registered names: C2 reports "C0"
    audit = read_jsonl(dep.op / "runs" / "main" / "audit.jsonl")
    assert [e["event"] for e in audit].count("run_start") == 2 and audit[-1]["event"] == "run_end"
    # (h) C1's refusal, at setup, with its reason: in its own audit log and in the run's record of round 1
    assert [(e["run"], e["round"], e.get("stage")) for e in dep.site_audit("C1")[seen:]
            if e["event"] == "round_refused"] == [(result["run"], 1, "setup")]
    node = {s["name"]: int(s["node_id"]) for s in json.loads((dep.op / "consortium.json").read_text())["sites"]}
    first = next(e for e in audit if e["event"] == "round" and e["round"] == 1)
    assert sorted(first["participants"]) == sorted([node["C0"], node["C2"]]), first
    assert [r["reason"] for r in first["refused"]] == [DATA_REFUSAL.format("C1")] and first["dropped"] == [], first
    assert oncofed("audit", "verify", str(dep.op / "runs" / "main" / "audit.jsonl")).returncode == 0
    scrape = wait_for(lambda: _metrics(dep), 60, "metrics")
    assert 'oncofed_rounds_completed{run="' in scrape and "oncofed_site_epsilon{site=\"C0\"}" in scrape


DATA_REFUSAL = "{}: " + DATA_REFUSAL_REASON


@contextlib.contextmanager
def _labels_missing(dep: Deployment, name: str):
    """The site's labels table moved away, then back: its data fails validation meanwhile (no labels table), and a
    deployed site reads its tables again for every message (a fresh ClientApp process each)."""
    labels = Path(json.loads((dep.root / name / "site.json").read_text())["data-path"]) / "labels.csv"
    away = dep.root / f"{name}-labels.csv"
    os.replace(labels, away)
    try:
        yield
    finally:
        os.replace(away, labels)


def ledger_delta(ledger: dict) -> float:
    return float(ledger.get("delta", 1e-5))


def _metrics(dep: Deployment) -> str:
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{dep.metrics}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def _health(dep: Deployment) -> tuple[int, dict]:
    """The public /health (through the proxy): status and JSON body."""
    ctx = ssl.create_default_context(cafile=str(dep.op / "ca" / "ca.crt"))
    conn = http.client.HTTPSConnection("127.0.0.1", dep.public, context=ctx, timeout=10)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, {}
    except OSError:
        return 0, {}
    finally:
        conn.close()


FAULT = '        location = /v1/fleet/pull-messages { return 500 "database is locked\\n"; }\n'


def _proxy_answers_500(dep: Deployment, on: bool) -> None:
    """Make the proxy answer every Fleet pull with HTTP 500, as the SuperLink did under load ("database is
    locked"), or stop it: nginx reloads its configuration on SIGHUP."""
    conf = dep.op / "proxy" / "nginx.conf"
    text = conf.read_text()
    text = text.replace("        location /v1/fleet/ {", FAULT + "        location /v1/fleet/ {", 1) if on else \
        text.replace(FAULT, "")
    conf.write_text(text)
    os.kill(json.loads((dep.op / "state" / "server.json").read_text())["proxy_pid"], signal.SIGHUP)


def _ledgers(dep: Deployment) -> dict[str, bytes]:
    files = {n: dep.root / n / "state" / "privacy-ledger.json" for n in ("C0", "C1", "C2")}
    return {n: f.read_bytes() if f.exists() else b"" for n, f in files.items()}


def _deliver_with(dep: Deployment, run: str, signing_key: Path) -> subprocess.CompletedProcess:
    """What `oncofed deliver` submits, but with another signing key and without its preflight: a package
    signed by a key the sites do not trust, as a misconfigured or hostile server would send it."""
    from server.checkpoint import load_latest
    from shared_models.run_config import flwr_overrides

    values = {**load_latest(dep.op / "runs" / run / "checkpoints").meta["run_config"], "resume": False,
              "deliver-only": True, "signing-key": str(signing_key)}
    project = Path(__file__).resolve().parents[1]
    return subprocess.run(["flwr", "run", str(project), "consortium", "--stream", "--run-config",
                           flwr_overrides(values)], env={**ENV, "FLWR_HOME": str(dep.op / "flwr")},
                          capture_output=True, text=True, timeout=600)


def test_g_d_f_b_superexec_restarted_wrong_key_refused_http_500_ridden_out_site_killed_and_delivered_later(dep):
    """One run, four faults (a run costs minutes; each fault costs seconds):
    (g) the SuperExec killed: /health names it while it is down and `oncofed server start` restarts it;
    (d) a signing key the sites do not trust stops `oncofed run` at preflight, before any site spends epsilon;
    (f) in round 1 the Fleet API answers HTTP 500 to every pull for a while (injected at the proxy): every
        SuperNode retries with backoff and stays up, and the round completes with all three sites;
    (b) C2's SuperNode dies in round 2: the run completes with the others, but C2 trained round 1 and has no
        model, so `oncofed run` exits 3 and the metrics say so; a package signed by another key is refused by
        C2; `oncofed deliver` then installs the run's model at C2 without retraining.
    Before issue 17 the SuperExec stayed dead behind a 200 /health (runs pending forever), one 500 ended each
    SuperNode's loop for good, and "finished" was reported with no model delivered."""
    from client.model_store import ModelStore
    from privacy.signing import generate_signing_key

    os.kill(json.loads((dep.op / "state" / "server.json").read_text())["superexec_pid"], signal.SIGKILL)
    code, body = wait_for(lambda: (lambda h: h if h[0] == 503 else None)(_health(dep)), 10,
                          "/health to report the SuperExec down", poll=0.1)
    assert body["down"] == ["superexec"] and "superexec" in body["reason"], body
    wait_for(lambda: _health(dep)[0] == 200, 60, "the SuperExec to be restarted")
    assert json.loads((dep.op / "state" / "server.json").read_text())["components"]["superexec"]["restarts"] == 1

    forged = dep.root / "forged"
    generate_signing_key(forged / "signing.key", forged / "signing.pub")
    before = _ledgers(dep)
    r = oncofed("run", str(dep.op), "--name", "forged", *RUN, "--set", "num-rounds=2",
                "--set", f'signing-key="{forged / "signing.key"}"')
    assert r.returncode == 2 and "not the key the sites trust" in r.stderr, r.stdout + r.stderr
    assert _ledgers(dep) == before and not (dep.op / "runs" / "forged" / "checkpoints").exists()

    run = dep.run("drop", "--set", "num-rounds=2", "--set", "round-timeout=600.0")  # a loaded machine trains slowly
    wait_for(lambda: (dep.op / "runs" / "drop" / "progress.json").exists(), 240, "round 1 of run drop to start")
    _proxy_answers_500(dep, True)
    try:
        wait_for(lambda: all("answered 500" in (dep.root / f"{n}.out").read_text() for n in ("C0", "C1", "C2")),
                 90, "every site to be answered 500")
        time.sleep(3)
    finally:
        _proxy_answers_500(dep, False)
    wait_for(lambda: dep.status("drop").get("round", 0) >= 1, 900, "round 1 of run drop")
    assert dep.status("drop")["participating"] == 3, dep.status("drop")  # every site rode out the 500s
    assert all(dep.sites[n].poll() is None for n in ("C0", "C1", "C2"))
    kill_group(dep.sites["C2"])  # as round 2 starts: SecAgg+ goes on with the two sites left
    assert run.wait(1200) == 3, (dep.root / "run-drop.out").read_text()[-4000:]
    out = (dep.root / "run-drop.out").read_text()
    assert "installed at 2 of the 3 sites that trained; not at C2 (" in out and "oncofed deliver" in out
    assert "[progress" in out and "sites answered" in out, out[-3000:]
    rounds = [e for e in read_jsonl(dep.op / "runs" / "drop" / "audit.jsonl") if e["event"] == "round"]
    node = {s["name"]: int(s["node_id"]) for s in json.loads((dep.op / "consortium.json").read_text())["sites"]}
    assert len(rounds[0]["participants"]) == 3, rounds
    assert sorted(rounds[-1]["participants"]) == sorted([node["C0"], node["C1"]])
    assert node["C2"] in rounds[-1]["dropped"]
    status = dep.status("drop")
    assert (status["finished"], status["trained"], status["delivered"], status["delivery_ok"]) == (1, 3, 2, 0)
    scrape = wait_for(lambda: 'oncofed_run_delivery_ok{run="' in (m := _metrics(dep)) and m, 60, "metrics")
    assert f'oncofed_run_delivery_ok{{run="drop",run_key="{status["run"]}"}} 0.0' in scrape
    assert 'oncofed_server_process_restarts{process="superexec"} 1.0' in scrape
    final_sha256 = json.loads((dep.op / "runs" / "drop" / "result.json").read_text())["arrays_sha256"]

    def active_sha256(name: str) -> str | None:
        store = ModelStore(dep.root / name / "models")
        return store.package(store.active())["arrays_sha256"] if store.active() else None

    assert active_sha256("C0") == active_sha256("C1") == final_sha256 != active_sha256("C2")

    dep.start_site("C2")
    refused = _deliver_with(dep, "drop", forged / "signing.key")
    assert refused.returncode == 0, refused.stdout[-3000:] + refused.stderr[-2000:]
    assert dep.site_audit("C2")[-1]["event"] == "model_refused" and active_sha256("C2") != final_sha256
    c2 = next(d for d in json.loads((dep.op / "runs" / "drop" / "result.json").read_text())["deliveries"]
              if d.get("site") == "C2")
    assert not c2["installed"] and "signature" in c2["error"]

    ledgers = _ledgers(dep)
    r = oncofed("deliver", str(dep.op), "drop", timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "installed at all 3 site(s) that trained" in r.stdout
    assert active_sha256("C2") == final_sha256
    assert dep.site_audit("C2")[-1]["event"] == "model_installed" and _ledgers(dep) == ledgers  # no spend
    assert dep.status("drop")["delivery_ok"] == 1
    # (7) each side's audit log verifies against the head the other side holds
    for name in ("C0", "C2"):
        r = oncofed("audit", "verify", str(dep.op / "runs" / "drop" / "audit.jsonl"), "--anchors",
                    str(dep.root / name / "state" / "audit-anchors.json"))
        assert r.returncode == 0 and "anchored head" in r.stdout, r.stdout + r.stderr
        r = oncofed("audit", "verify", str(dep.root / name / "state" / "audit.jsonl"), "--anchors",
                    str(dep.op / "runs" / "drop" / "audit.jsonl"),  # C2's site.json names C0: its registered name
                    *(["--site", name] if name == "C2" else []))
        assert r.returncode == 0 and "anchored head" in r.stdout, r.stdout + r.stderr
    listed = oncofed("runs", "list", str(dep.op))
    assert listed.returncode == 0 and any(ln.startswith("main ") and "completed" in ln
                                          for ln in listed.stdout.splitlines()), listed.stdout
    scrape = wait_for(lambda: "oncofed_sites_online 3.0" in (m := _metrics(dep)) and m, 60, "C2 back online")
    assert "oncofed_sites_registered 3.0" in scrape, scrape
    # the proxy killed too: restarted, its orphaned workers (which hold the port) reaped first
    os.kill(json.loads((dep.op / "state" / "server.json").read_text())["proxy_pid"], signal.SIGKILL)  # master only
    wait_for(lambda: json.loads((dep.op / "state" / "server.json").read_text())["components"]["proxy"]["restarts"]
             == 1 and _health(dep)[0] == 200, 60, "the proxy to be restarted")


def test_h_a_round_a_refusing_site_leaves_short_of_min_sites_is_abandoned_at_setup_before_any_site_spends(dep):
    """(h) A site that would refuse says so at SecAgg+'s setup, in the fresh ClientApp process that reads its tables
    again: C1's data fails validation, and with min-sites 3 the round is left with 2 sites, so it is abandoned before
    any site trains. No site's ledger or audit log records a spend for it, the run records C1's refusal with its
    reason, there is no model to deliver (exit 1), and every site's audit log says why the round was abandoned. (A
    refusal that leaves enough sites, while the others train and spend: C1 in round 1 of run main, test_c_e.)"""
    seen = {n: len(dep.site_audit(n)) for n in ("C0", "C1", "C2")}
    with _labels_missing(dep, "C1"):
        run = dep.run("short", "--set", "num-rounds=1", "--set", "min-sites=3")
        assert run.wait(600) == 1, (dep.root / "run-short.out").read_text()[-4000:]
    run_key = json.loads((dep.op / "runs" / "short" / "result.json").read_text())["run"]
    (record,) = read_jsonl(dep.op / "runs" / "short" / "metrics.jsonl")
    assert (record["status"], record["participants"], record["dropped"]) == ("abandoned", [], []), record
    assert "2 sites completed SecAgg+'s setup, fewer than 3" in record["reason"], record["reason"]
    assert "before any site trains" in record["reason"]
    assert [r["reason"] for r in record["refused"]] == [DATA_REFUSAL.format("C1")] and "node" in record["refused"][0]
    assert [e["refused"] for e in read_jsonl(dep.op / "runs" / "short" / "audit.jsonl") if e["event"] == "round"] == [
        record["refused"]]
    for name in ("C0", "C1", "C2"):
        ledger = dep.root / name / "state" / "privacy-ledger.json"  # none at a site that never read its data
        assert not ledger.exists() or not [e for e in json.loads(ledger.read_text())["entries"] if e["run_id"] == run_key]
        audit = [(e["event"], e.get("stage"), e.get("spent")) for e in dep.site_audit(name)[seen[name]:]
                 if e.get("run") == run_key]
        assert audit == ([("round_refused", "setup", None)] if name == "C1" else []) + [
            ("round_abandoned", None, False)], (name, audit)


def test_j_a_run_whose_code_differs_from_the_sites_installation_runs_nothing_at_any_site(dep, tmp_path):
    """(j) Flower installs the run's app, the server's code, at every site: a run submitted from a checkout whose
    DP-SGD differs by one line (half the noise) is refused at every site before any of its code runs, each site
    naming the file (client/clientapp_process.py), and no site's ledger or audit log records anything of it."""
    import shutil

    project = Path(__file__).resolve().parents[1]
    copy = tmp_path / "checkout"
    for d in ("oncofed", "client", "server", "shared_models", "privacy", "simulations"):
        shutil.copytree(project / d, copy / d, ignore=lambda where, names: [
            n for n in names if n == "__pycache__" or (Path(where) == project / "simulations" and n == "data")])
    shutil.copy(project / "pyproject.toml", copy / "pyproject.toml")
    local_round = copy / "client" / "local_round.py"
    text = local_round.read_text()
    assert "    return max(sigma, own), q, total, target" in text
    local_round.write_text(text.replace("    return max(sigma, own), q, total, target",
                                        "    return 0.5 * max(sigma, own), q, total, target"))
    ledgers, seen = _ledgers(dep), {n: len(dep.site_audit(n)) for n in ("C0", "C1", "C2")}
    logged = {n: (dep.root / f"{n}.out").read_text().count("refuses the app the server sent") for n in ("C0", "C1")}
    with (dep.root / "run-tampered.out").open("w") as out:  # the operator's `oncofed` is the altered checkout's
        # (in the checkout: `python -m` puts the working directory first on sys.path, before PYTHONPATH)
        run = subprocess.run([sys.executable, "-m", "oncofed", "run", str(dep.op), "--name", "tampered", *RUN,
                              "--set", "num-rounds=1"], env={**ENV, "PYTHONPATH": str(copy)}, cwd=copy, stdout=out,
                             stderr=subprocess.STDOUT, timeout=600)
    said = (dep.root / "run-tampered.out").read_text()
    assert run.returncode != 0 and "put the server and the sites on one" in said, said[-3000:]  # the fix: versions
    assert _ledgers(dep) == ledgers
    for name in ("C0", "C1"):  # (C2 reports C0's name: its log is its own all the same)
        log = (dep.root / f"{name}.out").read_text()
        assert log.count("refuses the app the server sent") > logged[name], log[-3000:]
        assert "client/local_round.py" in log.split("refuses the app the server sent")[-1][:600]
    for name in ("C0", "C1", "C2"):
        assert not [e for e in dep.site_audit(name)[seen[name]:] if e["event"] in ("round_trained", "round_refused")]
