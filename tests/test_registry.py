"""The operator's site register against a real SuperLink with TLS and node authentication."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from privacy.audit import verify
from privacy.pki import ProvisioningError, fingerprint, init_consortium, init_site
from privacy.registry import add_site, list_sites, remove_site
from server.processes import free_port, stop_group

pytestmark = pytest.mark.slow


@pytest.fixture()
def consortium(tmp_path):
    port = free_port()
    root = tmp_path / "op"
    # the SuperLink on its loopback (control) port, as `oncofed server start` runs it; no proxy needed here
    init_consortium(root, "test consortium", f"127.0.0.1:{free_port()}", internal_port=port)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "link"), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.Popen(
        ["flower-superlink", "--ssl-ca-certfile", str(root / "ca" / "ca.crt"), "--ssl-certfile",
         str(root / "server" / "server.crt"), "--ssl-keyfile", str(root / "server" / "server.key"),
         "--enable-supernode-auth", "--database", str(tmp_path / "link.db"), "--host", "127.0.0.1", "--port",
         str(port), "--disable-runtime-dependency-installation"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.3)
    time.sleep(1.0)
    yield root
    stop_group(proc, grace=30)  # SIGTERM, then SIGKILL if the SuperLink has not exited: never left running


def test_sites_are_registered_listed_and_removed_with_an_audit_trail(consortium, tmp_path):
    from privacy.site_config import replace_key_command

    for name in ("C0", "C1"):
        init_site(tmp_path / name, name, consortium / "public",
                  ca_fingerprint=fingerprint(consortium / "ca" / "ca.crt"))
        add_site(consortium, name, tmp_path / name / "keys" / "site.key.pub")
    listed = {s["name"]: s for s in list_sites(consortium)}
    assert set(listed) == {"C0", "C1"} and all(s["status"] == "registered" for s in listed.values())
    assert listed["C0"]["key_sha256"] == fingerprint(tmp_path / "C0" / "keys" / "site.key.pub")  # as site init printed
    with pytest.raises(ProvisioningError, match="already registered"):
        add_site(consortium, "C0", tmp_path / "C0" / "keys" / "site.key.pub")
    remove_site(consortium, "C1")
    assert [s["name"] for s in list_sites(consortium)] == ["C0"]
    # Flower never takes a key twice: the removed site's key, or another site's under a new name, is named
    with pytest.raises(ProvisioningError, match="site 'C1'.s \\(removed\\).*makes a new one") as refused:
        add_site(consortium, "C1", tmp_path / "C1" / "keys" / "site.key.pub")
    # the hospital guide's replacement, which moves the old pair away first (ssh-keygen stops at "Overwrite (y/n)?")
    assert replace_key_command("keys/site.key") in str(refused.value) and "mv keys/site.key" in str(refused.value)
    with pytest.raises(ProvisioningError, match="site 'C0'.s;"):
        add_site(consortium, "C9", tmp_path / "C0" / "keys" / "site.key.pub")
    events = [json.loads(x)["event"] for x in (consortium / "audit.jsonl").read_text().splitlines()]
    assert events == ["site_added", "site_added", "site_removed"] and verify(consortium / "audit.jsonl").ok


def test_a_key_flower_would_refuse_is_refused_before_contacting_the_superlink(consortium, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "ed.pub"
    path.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" x\n")
    with pytest.raises(ProvisioningError, match="must be ECDSA P-384"):
        add_site(consortium, "bad", path)


def test_an_unreachable_superlink_is_named(tmp_path):
    init_consortium(tmp_path / "op", "c", f"127.0.0.1:{free_port()}")
    init_site(tmp_path / "s", "C0", tmp_path / "op" / "public",
              ca_fingerprint=fingerprint(tmp_path / "op" / "ca" / "ca.crt"))
    with pytest.raises(ProvisioningError, match="is the consortium's SuperLink running"):
        add_site(tmp_path / "op", "C0", tmp_path / "s" / "keys" / "site.key.pub")
    from typer.testing import CliRunner

    from oncofed.cli import app

    res = CliRunner().invoke(app, ["consortium", "add-site", str(tmp_path / "op"), "--name", "C0", "--key",
                                   str(tmp_path / "s" / "keys" / "site.key.pub")])
    assert res.exit_code == 2 and "SuperLink running" in res.output


class _FakeSuperLink:
    """`flwr supernode register / ls / unregister` as the SuperLink answers them (a key is taken once), slow enough
    for two operators' commands to overlap, and able to die right after it registered a key."""

    def __init__(self, die_after_register: bool = False):
        self.keys, self.nodes, self.next, self.die = set(), {}, 100, die_after_register

    def __call__(self, root, command, *args):
        if command == "register":
            key = open(args[0], "rb").read()
            time.sleep(0.3)
            if key in self.keys:
                raise ProvisioningError("`flwr supernode register` failed: Public key already in use")
            self.keys.add(key)
            self.nodes[str(self.next)], self.next = "registered", self.next + 1
            if self.die:
                self.die = False
                raise KeyboardInterrupt  # the operator's command killed after the SuperLink took the key
            return {"success": True, "node-id": self.next - 1}
        if command == "ls":
            return {"success": True, "nodes": [{"node-id": n, "status": s} for n, s in self.nodes.items()]}
        if command == "unregister":
            if self.die:
                self.nodes.pop(args[0])
                self.die = False
                raise KeyboardInterrupt
            if self.nodes.pop(args[0], None) is None:
                raise ProvisioningError("`flwr supernode unregister` failed: node not found")
            return {"success": True}


def _sites(tmp_path, names):
    init_consortium(tmp_path / "op", "c", "127.0.0.1:9092", internal_port=9093)
    for name in names:
        init_site(tmp_path / name, name, tmp_path / "op" / "public",
                  ca_fingerprint=fingerprint(tmp_path / "op" / "ca" / "ca.crt"))
    return tmp_path / "op"


def test_two_operators_adding_sites_at_once_lose_no_registration(tmp_path, monkeypatch):
    import threading

    from privacy import registry

    op = _sites(tmp_path, ["A", "B"])
    monkeypatch.setattr(registry, "_flwr", _FakeSuperLink())
    threads = [threading.Thread(target=add_site, args=(op, n, tmp_path / n / "keys" / "site.key.pub")) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = json.loads((op / "consortium.json").read_text())
    assert sorted((s["name"], s["node_id"]) for s in record["sites"]) in ([("A", "100"), ("B", "101")],
                                                                          [("A", "101"), ("B", "100")])


def test_a_registration_or_removal_cut_short_is_completed_by_the_same_command_again(tmp_path, monkeypatch):
    """Killed after the SuperLink took the key but before consortium.json recorded it: the key would be admitted by
    Flower and unknown to OncoFed, and add-site could never be retried ("already in use"). The pending record lets
    the same add-site complete it; likewise a removal cut short after the SuperLink dropped the node."""
    from privacy import registry

    op = _sites(tmp_path, ["A"])
    link = _FakeSuperLink(die_after_register=True)
    monkeypatch.setattr(registry, "_flwr", link)
    key = tmp_path / "A" / "keys" / "site.key.pub"
    with pytest.raises(KeyboardInterrupt):
        add_site(op, "A", key)
    assert list_sites(op)[0]["status"].startswith("registration cut short")
    with monkeypatch.context() as down:  # retried while the SuperLink is unreachable: the trace is kept
        down.setattr(registry, "_flwr", lambda root, command, *a: (_ for _ in ()).throw(
            ProvisioningError("`flwr supernode register` failed: is the consortium's SuperLink running there")))
        with pytest.raises(ProvisioningError, match="SuperLink running"):
            add_site(op, "A", key)
    assert json.loads((op / "consortium.json").read_text())["sites"][0].get("pending")
    site = add_site(op, "A", key)
    assert site["node_id"] == "100" and [s["name"] for s in list_sites(op)] == ["A"]
    assert list_sites(op)[0]["status"] == "registered"
    link.die = True
    with pytest.raises(KeyboardInterrupt):
        remove_site(op, "A")
    removed = remove_site(op, "A")
    assert removed["removed"] and list_sites(op) == [] and link.nodes == {}
    events = [json.loads(x) for x in (op / "audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["site_added", "site_removed"] and events[1]["key_sha256"] == site["key_sha256"]


def test_flower_tools_are_the_ones_installed_with_this_python_whatever_path_holds(monkeypatch):
    """A service started as /opt/oncofed/venv/bin/oncofed without the venv on PATH found no flwr (or another
    installation's): the tools beside the interpreter come first."""
    import sys
    from pathlib import Path

    from shared_models.flower_tools import flower_tool

    monkeypatch.setenv("PATH", "/nonexistent")
    assert flower_tool("flwr") == str(Path(sys.executable).with_name("flwr"))
    assert Path(flower_tool("flower-supernode")).is_file()


def test_a_running_site_whose_key_the_operator_removes_is_told_so_and_what_to_ask(consortium, tmp_path):
    """After `consortium remove-site`, a connected site's `site start` ended with Flower's "SuperExec terminated
    gracefully" and nothing else (exit 0). The SuperLink now answers its requests 401: the site says the consortium
    no longer knows its key, what to ask the operator and how to rejoin (a new key: a removed one is never taken
    again), and exits 3, the exit that needs the operator."""
    import sys

    link = json.loads((consortium / "consortium.json").read_text())["control-address"]  # no proxy here
    (tmp_path / "data").mkdir()
    init_site(tmp_path / "s", "C0", consortium / "public", str(tmp_path / "data"),
              ca_fingerprint=fingerprint(consortium / "ca" / "ca.crt"))
    add_site(consortium, "C0", tmp_path / "s" / "keys" / "site.key.pub")
    log = tmp_path / "site.log"
    script = ("from client.supernode import load_site, run_supernode\n"
              f"raise SystemExit(run_supernode(load_site({str(tmp_path / 's')!r}), {free_port()}, 0.5, "
              f"{link!r}))\n")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "site-flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    with open(log, "w") as out:
        site = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "SuperNode ID" not in log.read_text() and site.poll() is None and time.monotonic() < deadline:
            time.sleep(0.3)
        assert "SuperNode ID" in log.read_text(), log.read_text()  # connected with its registered key
        remove_site(consortium, "C0")
        assert site.wait(timeout=120) == 3, log.read_text()
    finally:
        stop_group(site, grace=10)
    said = " ".join(log.read_text().split())
    assert "the consortium does not, or no longer, know this site's key" in said, said
    assert "Ask the operator whether this site is still a member" in said and "make a new key" in said


def test_a_registered_site_whose_clock_is_behind_the_servers_is_told_to_set_its_clock_not_to_send_its_key(
        consortium, tmp_path):
    """A registered site whose machine's clock is 400 s behind the SuperLink's (Flower's signatures are accepted up to
    305 s late) was told at start that the operator had not registered its key. Now the server's Date header names the
    cause. A real SuperLink; the site's clock is Flower's `now`, set back in the site's process."""
    import sys

    link = json.loads((consortium / "consortium.json").read_text())["control-address"]
    (tmp_path / "data").mkdir()
    init_site(tmp_path / "s", "C9", consortium / "public", str(tmp_path / "data"),
              ca_fingerprint=fingerprint(consortium / "ca" / "ca.crt"))
    add_site(consortium, "C9", tmp_path / "s" / "keys" / "site.key.pub")
    script = ("import datetime\nimport flwr.supercore.date as d\nreal = d.now\n"
              "d.now = lambda: real() - datetime.timedelta(seconds=400)\n"
              "from client.supernode import load_site, run_supernode\n"
              f"raise SystemExit(run_supernode(load_site({str(tmp_path / 's')!r}), {free_port()}, 0.5, {link!r}))\n")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "site-flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    log = tmp_path / "site.log"
    with open(log, "w") as out:  # a file, not a pipe: the site's SuperExec outlives it by seconds
        site = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        code = site.wait(timeout=120)
    finally:
        stop_group(site, grace=10)
    said = " ".join(log.read_text().split())
    assert code == 3, said
    import re

    assert re.search(r"this machine's clock is (399|400|401) s behind the server's", said), said
    assert "the site's key is not the cause" in said and "add-site" not in said, said


def test_a_401_from_a_server_whose_clock_differs_blames_the_clock_and_one_from_a_server_in_time_blames_the_key(
        consortium, tmp_path):
    """The same 401 answers a removed key and a request signed at a time the SuperLink does not accept (Flower takes
    one signed up to 5 s ahead of or 305 s behind its clock): the site told both causes. The answer's Date header
    says which: the site's refused requests are watched through Flower's own interceptor, here with answers of a
    server 400 s ahead, one in time, and one without a Date."""
    import re
    from email.utils import formatdate

    import httpx
    from flwr.supernode import fleet_http_connection as fhc

    from cryptography.hazmat.primitives.asymmetric import ec

    from client.supernode import _watch_key_refusals, key_refused, load_site

    (tmp_path / "data").mkdir()
    init_site(tmp_path / "s", "C0", consortium / "public", str(tmp_path / "data"),
              ca_fingerprint=fingerprint(consortium / "ca" / "ca.crt"))
    settings = load_site(tmp_path / "s")
    original = fhc.NodeAuthHttpInterceptor
    refused: list[str] = []
    try:
        _watch_key_refusals(refused)
        key = ec.generate_private_key(ec.SECP384R1())
        watching = fhc.NodeAuthHttpInterceptor(key, key.public_key())

        class Context:
            def __init__(self):
                self.request = httpx.Request("POST", "https://link/v1/fleet/pull-messages")

        for offset in (400, 0, None, -60, -5.5):  # the server's clock less this machine's
            headers = {} if offset is None else {"date": formatdate(time.time() + offset, usegmt=True)}
            watching.intercept(Context(), lambda ctx, h=headers: httpx.Response(401, headers=h))
    finally:
        fhc.NodeAuthHttpInterceptor = original
    assert len(refused) == 5
    clock, in_time, no_date, ahead, edge = (" ".join(key_refused(settings, [r]).split()) for r in refused)
    assert re.search(r"this machine's clock is (60|61) s ahead of the server's", ahead), ahead
    # 5.5 s ahead: just past Flower's 5 s, which a Date header's whole seconds (measured -5.5 to -6.5) cannot tell
    # from just inside it: the key, and the clock named
    assert "no longer, know this site's key" in edge and "check this machine's clock" in edge, edge
    assert re.search(r"this machine's clock is (399|400) s behind the server's", clock) and "timedatectl" in clock, clock
    assert "the site's key is not the cause" in clock and "remove-site" not in clock
    assert "no longer, know this site's key" in in_time and "clock" not in in_time, in_time
    assert "no longer, know this site's key" in no_date and "check this machine's clock" in no_date, no_date
