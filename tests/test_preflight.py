"""Preflight checks, the proxy configuration and the Prometheus collector, without starting servers
(tests/test_deployment.py runs them for real)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

import pytest

from privacy.pki import fingerprint, init_consortium, init_site
from privacy.preflight import (
    PreflightError,
    check_ca,
    check_port_free,
    check_private_key,
    check_reachable,
    check_server_certificate,
    check_site_key,
    report,
)
from server.metrics import ConsortiumCollector
from server.proxy import listen_host, render
from shared_models.run_config import RunConfigError, flwr_overrides, parse_overrides


@pytest.fixture
def consortium(tmp_path):
    init_consortium(tmp_path / "op", "t", "fl.example.org:8443", internal_port=9092)
    return tmp_path / "op"


def _server(op, hosts, now=None):
    return check_server_certificate(op / "server/server.crt", op / "server/server.key", op / "ca/ca.crt", hosts, now)


def test_server_certificate_checks(consortium, tmp_path):
    assert all(c.ok and not c.warning for c in _server(consortium, ["fl.example.org", "127.0.0.1", "localhost"]))
    wrong_name = [c for c in _server(consortium, ["other.example.org"]) if not c.ok]
    assert len(wrong_name) == 1 and "other.example.org" in wrong_name[0].detail
    late = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=380)
    soon = [c for c in _server(consortium, ["fl.example.org"], now=late) if c.warning]
    assert soon and "days left" in soon[0].detail
    expired = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    assert any("expired" in c.detail and not c.ok for c in _server(consortium, ["fl.example.org"], now=expired))
    other = init_consortium(tmp_path / "other", "o", "x.example:1") and tmp_path / "other"
    foreign = check_server_certificate(other / "server/server.crt", other / "server/server.key",
                                       consortium / "ca/ca.crt", ["x.example"])
    assert any("not signed by" in c.detail for c in foreign if not c.ok)
    mixed = check_server_certificate(consortium / "server/server.crt", other / "server/server.key",
                                     consortium / "ca/ca.crt", ["fl.example.org"])
    assert any("does not match" in c.detail for c in mixed if not c.ok)
    assert check_ca(consortium / "ca/ca.crt").ok


def test_key_permissions_and_kind(consortium, tmp_path):
    key = consortium / "signing/signing.key"
    assert check_private_key(key, "signing key").ok
    os.chmod(key, 0o644)
    bad = check_private_key(key, "signing key")
    assert not bad.ok and "chmod 600" in bad.detail
    site = init_site(tmp_path / "s", "S", consortium / "public", "",
                     ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    assert check_site_key(tmp_path / "s/keys/site.key").ok
    pem = check_site_key(consortium / "server/server.key")  # PEM, not OpenSSH
    # the fix keeps the site directory: a new `site init` would start an empty privacy ledger elsewhere
    assert not pem.ok and "ssh-keygen -t ecdsa -b 384" in pem.detail and "site init" not in pem.detail
    assert site.state_dir.startswith("/")  # absolute: the ClientApp runs elsewhere


def test_the_key_replacement_the_preflight_prints_runs_without_stopping_at_overwrite(consortium, tmp_path):
    """The documented `ssh-keygen ... -f keys/site.key` over the existing key stopped at "Overwrite (y/n)?". The
    command the preflight prints (the same as the hospital guide's and add-site's) moves the old pair away first,
    makes a key Flower accepts, and prints the new fingerprint, which it says to set as site.json's
    public-key-sha256."""
    import re
    import subprocess

    from cryptography.hazmat.primitives import serialization

    init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    key = tmp_path / "s/keys/site.key"
    old = key.read_bytes()
    pem = serialization.load_ssh_private_key(old, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key.write_bytes(pem)  # a key Flower does not take: the preflight prints the replacement
    check = check_site_key(key)
    assert not check.ok and "public-key-sha256" in check.detail, check.detail
    [command] = re.findall(r"`([^`]*ssh-keygen[^`]*)`", check.detail)
    done = subprocess.run(["bash", "-c", command], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert check_site_key(key).ok and (key.parent / "old" / "site.key").read_bytes() == pem
    assert done.stdout.split()[-2] == fingerprint(tmp_path / "s/keys/site.key.pub")  # sha256sum: "DIGEST  PATH"


def test_a_port_that_cannot_be_bound_says_why_and_the_fix(monkeypatch):
    import errno

    # an address that is not this machine's (TEST-NET-1, RFC 5737)
    foreign = check_port_free("192.0.2.1", 9092, "SuperLink")
    assert not foreign.ok and "not an address of this machine" in foreign.detail and "0.0.0.0" in foreign.detail

    def denied(self, address):  # as an unprivileged service binding port 443
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(socket.socket, "bind", denied)
    low = check_port_free("0.0.0.0", 443, "proxy")
    assert not low.ok and "CAP_NET_BIND_SERVICE" in low.detail and "1024" in low.detail
    assert "another process holds it" not in low.detail


def test_port_and_reachability(consortium):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not check_port_free("127.0.0.1", port, "p").ok
        bad = check_reachable(f"127.0.0.1:{port}", consortium / "ca/ca.crt", "server")  # not TLS
        assert not bad.ok
    closed = check_reachable(f"127.0.0.1:{port}", consortium / "ca/ca.crt", "server")
    assert not closed.ok and "oncofed server start" in closed.detail


def test_report_lists_every_failure(consortium):
    checks = _server(consortium, ["nope.example"]) + [check_private_key(consortium / "missing.key", "k")]
    with pytest.raises(PreflightError) as e:
        report("server", checks)
    assert "2 preflight checks failed" in str(e.value) and "nope.example" in str(e.value) and "missing" in str(e.value)


def test_proxy_exposes_only_fleet_and_health(consortium):
    conf = render(consortium, "fl.example.org", 8443, 9092)
    locations = [line.strip() for line in conf.splitlines() if line.strip().startswith("location")]
    # a named location (@...) answers only nginx's own error_page, never a request's path
    assert locations == ["location /v1/fleet/ {", "location = /health {", "location @health_down {", "location / {"]
    assert "return 403" in conf and "server 127.0.0.1:9092;" in conf and "proxy_ssl_verify on;" in conf
    assert "listen 0.0.0.0:8443 ssl;" in conf and listen_host("10.1.2.3") == "10.1.2.3"
    assert json.loads((consortium / "consortium.json").read_text())["control-address"] == "127.0.0.1:9092"


def test_collector_reads_the_latest_run(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    (tmp_path / "old").mkdir()
    (tmp_path / "old/status.json").write_text(json.dumps({"run": "old", "round": 9}))
    os.utime(tmp_path / "old/status.json", (1, 1))
    (tmp_path / "new").mkdir()
    (tmp_path / "new/status.json").write_text(json.dumps({
        "run": "r-1", "round": 2, "round_seconds": 12.5, "participating": 3, "finished": 0,
        "site_epsilon": {"C0": 2.5}, "weights_sha256": "ab", "rounds_updated": 1}))
    reg = CollectorRegistry()
    reg.register(ConsortiumCollector(tmp_path))
    text = generate_latest(reg).decode()
    assert 'oncofed_rounds_completed{run="new",run_key="r-1"} 2.0' in text
    assert 'oncofed_rounds_updated{run="new",run_key="r-1"} 1.0' in text  # one of the two ended without changing it
    assert 'oncofed_round_duration_seconds{run="new",run_key="r-1"} 12.5' in text
    assert 'oncofed_site_epsilon{site="C0"} 2.5' in text
    assert 'oncofed_model_info{round="2",run="new",run_key="r-1",sha256="ab"} 1.0' in text
    assert 'run="old"' not in text  # not finished, not running: only the run started last


def test_run_config_overrides():
    values = parse_overrides(["num-rounds=3", 'schema="a b.json"', "dp=false", "run-name=x"], max_epsilon=None)
    assert values == {"num-rounds": 3, "schema": "a b.json", "dp": False, "run-name": "x"}
    assert flwr_overrides(values) == 'num-rounds=3 schema="a b.json" dp=false run-name="x"'
    # a text-only key keeps what was written where TOML would read a date or a number
    assert parse_overrides(["run-name=2026-12-06", "output-dir=2026"], max_epsilon=None) == {
        "run-name": "2026-12-06", "output-dir": "2026"}
    with pytest.raises(RunConfigError, match="num-rounds"):
        parse_overrides(["num-rounds=zero"], max_epsilon=None)
    with pytest.raises(RunConfigError, match="KEY=VALUE"):
        parse_overrides(["num-rounds"], max_epsilon=None)
    assert parse_overrides(["wide-rank=full", "wide-gain=2"], max_epsilon=None) == {"wide-rank": "full", "wide-gain": 2}
    assert parse_overrides(["wide-rank=16"], max_epsilon=None) == {"wide-rank": 16}
    for bad in ("half", "-1", "true"):
        with pytest.raises(RunConfigError, match=r'wide-rank: use "full" .* or a rank >= 0'):
            parse_overrides([f"wide-rank={bad}"], max_epsilon=None)
    # checks across keys wait for the whole run config: --no-dp may come from another option
    assert parse_overrides(["local-softmax=site"], max_epsilon=None) == {"local-softmax": "site"}
    with pytest.raises(RunConfigError, match="local-softmax: Input should be 'all' or 'site'"):
        parse_overrides(["local-softmax=mine"], max_epsilon=None)


def test_simulate_refuses_a_bad_run_config_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from oncofed.cli import app

    # the last run's output is there: a refused run deletes none of it (its sites' ledgers, its checkpoints)
    kept = [tmp_path / "run" / "state" / "C0" / "privacy-ledger.json", tmp_path / "run" / "server" / "latest.json",
            tmp_path / "run" / "flower" / "flwr-run.log"]
    for f in kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("the last run's")
    for keep in ([], ["--keep"]):
        result = CliRunner().invoke(app, ["simulate", "--epsilon", "1000", "--out", str(tmp_path / "run"), *keep])
        assert result.exit_code == 2 and "epsilon" in result.output and "at most 100" in result.output
        assert all(f.read_text() == "the last run's" for f in kept)
    # a check across keys, on the run config as flwr would merge it (DP is on by default)
    result = CliRunner().invoke(app, ["simulate", "--set", "local-softmax=site", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "local-softmax 'site'" in result.output and "dp false" in result.output
    assert all(f.read_text() == "the last run's" for f in kept)
    result = CliRunner().invoke(app, ["simulate", "--set", "schema=nope.json", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "nope.json is not a file" in result.output
    assert all(f.read_text() == "the last run's" for f in kept)
    for args in (["--no-dp", "--epsilon", "3"], ["--set", "dp=false", "--epsilon", "3"], ["--no-dp", "--set", "epsilon=3"]):
        result = CliRunner().invoke(app, ["simulate", *args, "--out", str(tmp_path / "run")])
        assert result.exit_code == 2 and "epsilon 3 with DP off" in result.output, args  # it was ignored silently
    assert all(f.read_text() == "the last run's" for f in kept)


def test_simulate_does_not_report_a_model_no_site_contributed_to(tmp_path, monkeypatch):
    """Every round refused (e.g. every site over its budget): the initial weights are not scored as a result."""
    import json as _json

    from typer.testing import CliRunner

    import simulations.federation as federation
    from oncofed.cli import app

    def refused_everywhere(flower_dir, cfg, n_sites):
        server = tmp_path / "run" / "server"
        server.mkdir(parents=True)
        (server / "metrics.jsonl").write_text("".join(_json.dumps(
            {"round": r, "participants": [], "refused": list(range(n_sites)), "seconds": r}) + "\n" for r in (1, 2)))
        return {"deliveries": [{"site": "C0", "installed": True, "version": "v0001"}], "arrays_sha256": "0" * 64}

    monkeypatch.setattr(federation, "run_federation", refused_everywhere)
    result = CliRunner().invoke(app, ["simulate", "--rounds", "2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "no round aggregated an update from any site" in result.output
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_site_checks_its_data_against_the_schema_training_uses(consortium, tmp_path):
    """site.json's schema (the consortium's, as the bundle brought it) is the one the data is validated with; an
    altered copy, or a --schema other than it, fails preflight instead of validating against the wrong schema."""
    from client.supernode import _schema_check

    site = init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    check, used = _schema_check(site, None)
    assert check.ok and used == Path(site.schema_path)  # validated even without --schema
    assert _schema_check(site, Path(site.schema_path))[0].ok
    other = tmp_path / "other.json"
    other.write_text(Path(site.schema_path).read_text().replace('"version"', '"description": "x", "version"', 1))
    check, used = _schema_check(site, other)
    assert not check.ok and "is not the schema training uses" in check.detail and used == Path(site.schema_path)
    Path(site.schema_path).write_text(other.read_text())  # trust/schema.json altered
    check, _ = _schema_check(site, None)
    assert not check.ok and "SHA-256 differs from site.json's schema-sha256" in check.detail


def test_a_schema_path_that_does_not_exist_is_named_missing_and_the_data_still_validated(consortium, tmp_path):
    """`site start --schema .../schema.jsn` (a typo) said "is not the schema training uses", never that the file does not
    exist, and skipped validating the data although site.json's schema was fine: it names the file as missing, the fix
    (leave --schema out), and validates the data against site.json's schema."""
    from client.supernode import site_checks

    (tmp_path / "data").mkdir()
    site = init_site(tmp_path / "s", "S", consortium / "public", str(tmp_path / "data"),
                     ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    typo = tmp_path / "s" / "trust" / "schema.jsn"
    checks = {c.name: c for c in site_checks(site, 29555, typo)}
    assert not checks[f"--schema {typo}"].ok
    assert "no such file; leave --schema out" in checks[f"--schema {typo}"].detail
    data = checks[f"site data {tmp_path / 'data'}"]
    assert "not validated" not in data.detail and "fails validation" in data.detail, data.detail  # an empty directory


def test_site_init_warns_of_data_that_site_start_would_refuse_naming_the_column_and_the_fix(tmp_path):
    """`site init --data DIR` whose labels table misspells the label column (`cancer_typ`) succeeded silently; it showed
    only at `site start`. init validates the tables as the start's preflight does and warns (the key and settings do
    not depend on them; the tables can be fixed in place), naming the column and the fix."""
    from typer.testing import CliRunner

    from oncofed.cli import app
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema().save(tmp_path / "schema.json")
    init_consortium(tmp_path / "op", "t", "fl.example.org:8443", internal_port=9092, schema=schema)
    tables = site_tables()
    tables["labels"] = tables["labels"].rename(columns={"subtype": "subtyp"})
    data = write_site(tmp_path / "data", tables)
    res = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s"), "--name", "S", "--consortium",
                                   str(tmp_path / "op" / "public"), "--data", str(data), "--ca-fingerprint",
                                   fingerprint(tmp_path / "op" / "ca/ca.crt")])
    assert res.exit_code == 0 and (tmp_path / "s" / "site.json").exists(), res.output
    assert f"warning: --data {data} fails validation" in res.output, res.output
    assert "labels.csv, column 'subtype': no label column 'subtype'" in res.output
    assert "fix: add the column 'subtype'" in res.output and "oncofed validate --schema" in res.output
    write_site(tmp_path / "fine", site_tables())
    res = CliRunner().invoke(app, ["site", "init", str(tmp_path / "t"), "--name", "T", "--consortium",
                                   str(tmp_path / "op" / "public"), "--data", str(tmp_path / "fine"),
                                   "--ca-fingerprint", fingerprint(tmp_path / "op" / "ca/ca.crt")])
    assert res.exit_code == 0 and "fails validation" not in res.output, res.output


def test_site_start_validates_the_data_at_the_sites_min_count_as_site_init_and_training_do(tmp_path):
    """A site of min-count 7 whose `smoker` is 1 for its 6 patients of class A and 0 for everyone else: not a label
    leak at 7 (a leak needs two values each held by min-count patients), so site init and every run's training
    (the larger of the site's min-count and the run's) accept it. site start's preflight validated at the default 5
    and refused to start the site init had passed."""
    from client.cli import _data_problems
    from client.supernode import site_checks
    from shared_models.validation import validate_site
    from tests.sitefixtures import site_schema, site_tables, write_site

    schema = site_schema().save(tmp_path / "schema.json")
    init_consortium(tmp_path / "op", "t", "fl.example.org:8443", internal_port=9092, schema=schema)
    tables = site_tables(n_per_class=6)
    tables["clinical"]["smoker"] = (tables["labels"].subtype == "A").astype(int)
    data = write_site(tmp_path / "data", tables)
    site = init_site(tmp_path / "s", "S", tmp_path / "op" / "public", str(data), min_count=7,
                     ca_fingerprint=fingerprint(tmp_path / "op" / "ca/ca.crt"))
    assert validate_site(site_schema(), data, min_count=7).ok  # what training at min-count 7 reads
    assert _data_problems(site) == ""
    (check,) = [c for c in site_checks(site, 29555, None) if c.name == f"site data {data}"]
    assert check.ok, check.detail
    assert not validate_site(site_schema(), data).ok  # at the default 5 it is one
    # the command a refusal names validates as the refusal did, at the site's min-count
    tables["labels"] = tables["labels"].rename(columns={"subtype": "subtyp"})
    write_site(data, tables)
    (check,) = [c for c in site_checks(site, 29555, None) if c.name == f"site data {data}"]
    assert not check.ok and f"--data {data} --min-count 7`" in check.detail, check.detail
    assert f"--data {data} --min-count 7`" in _data_problems(site)


def test_a_budget_that_refuses_every_default_run_is_warned_of_at_site_init_and_start(consortium, tmp_path):
    """`site init --budget 0.001` was accepted silently and every run was then refused, the reason only in the audit
    log: init and the start's preflight say why, with the numbers (a warning: the site may mean to be strict)."""
    from typer.testing import CliRunner

    from client.supernode import site_checks
    from oncofed.cli import app
    from privacy.accounting import low_budget_warning
    from privacy.site_config import SiteConfig

    res = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s"), "--name", "S", "--consortium",
                                   str(consortium / "public"), "--ca-fingerprint",
                                   fingerprint(consortium / "ca/ca.crt"), "--budget", "0.001"])
    warning = low_budget_warning(0.001)
    assert res.exit_code == 0 and (tmp_path / "s" / "site.json").exists(), res.output
    assert f"warning: {warning}" in " ".join(res.output.split()), res.output
    site = SiteConfig.load(tmp_path / "s" / "site.json")
    said = [c for c in site_checks(site, 29555, None) if c.name == "privacy-budget 0.001"]
    assert [(c.ok, c.warning, c.detail) for c in said] == [(True, True, warning)]
    fine = init_site(tmp_path / "t", "T", consortium / "public", "",
                     ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    assert [c.warning for c in site_checks(fine, 29555, None) if c.name.startswith("privacy-budget")] == [False]


def test_a_site_preflight_names_what_the_service_account_cannot_use_instead_of_failing_later(consortium, tmp_path,
                                                                                            monkeypatch):
    """After `sudo oncofed site init`, a service running as its own user: a root-owned state directory (it exists,
    so creating it succeeds) or key is a failed check naming the fix, not an [ok] then a PermissionError at the first
    ledger write, or a traceback; a server port answering TLS but not HTTPS is a failed check too."""
    import http.client

    import privacy.preflight as preflight
    from client.supernode import site_checks

    site = init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    real_write, real_read = Path.write_bytes, Path.read_bytes

    def denied(self, *args):
        if self.name.startswith(".preflight-") and self.parent.name == "state" or self.name == "site.key":
            raise PermissionError(13, "Permission denied")
        return (real_write if args else real_read)(self, *args)

    monkeypatch.setattr(Path, "write_bytes", lambda self, data: denied(self, data))
    monkeypatch.setattr(Path, "read_bytes", lambda self: denied(self))
    monkeypatch.setattr(preflight, "https_health", lambda *a, **k: (_ for _ in ()).throw(
        http.client.BadStatusLine("\x00\x00")))
    failed = {c.name: c.detail for c in site_checks(site, 29555, None) if not c.ok}
    assert any(n.startswith("state-dir") and "cannot be written by this account" in d for n, d in failed.items()), failed
    assert any(n.startswith("site key") and "cannot be read by this account" in d for n, d in failed.items()), failed
    assert any("consortium server" in n and "answers TLS but not HTTPS" in d for n, d in failed.items()), failed
    assert not any(n.startswith("model-dir") for n in failed)


def test_only_a_refused_activation_is_exit_3_any_other_failure_to_connect_is_a_restart():
    """Flower exits 305 for every failure to connect at start: exit 3 (the operator must register the key) only when
    the SuperLink refused the node's activation (its error 2004); a proxy answering 404 or a server erring past the
    retries is exit 4, which the service manager restarts (the messages as flwr 1.41 gives them)."""
    from client.supernode import refused_activation

    assert refused_activation("Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to "
                              "activate SuperNode.\nThe SuperNode could not establish a connection to the SuperLink.")
    for other in ("Failed to initialize the connection to the SuperLink.\nClient error '404 Not Found' for url "
                  "'https://127.0.0.1:9443/api/v0/fleet/activate-node'",
                  "Failed to initialize the connection to the SuperLink.\nServer error '500 Internal Server Error'"):
        assert not refused_activation(other)


def test_a_second_site_start_on_the_same_site_is_refused_naming_the_one_running(consortium, tmp_path):
    """Two `oncofed site start` of one site (a manual start beside the systemd unit): the second stops at preflight
    naming the first's pid, instead of reaching the server, whose refusal of a second activation of the same key
    reads as an unregistered key. The lock is the state directory's, held for the first SuperNode's life."""
    import subprocess
    import sys

    (tmp_path / "data").mkdir()
    site = init_site(tmp_path / "s", "S", consortium / "public", str(tmp_path / "data"), ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    first = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from client.supernode import claim_site\n"
        "from privacy.site_config import SiteConfig\n"
        f"held, check = claim_site(SiteConfig.load({str(tmp_path / 's' / 'site.json')!r}))\n"
        "print(check.ok, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "True"
        second = subprocess.run([sys.executable, "-m", "oncofed", "site", "start", str(tmp_path / "s"), "--port",
                                 str(_free_port())], capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr
    assert f"another `oncofed site start` of this site is running (pid {first.pid})" in second.stderr
    assert Path(site.state_dir, "supernode.lock").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_certificate_expired_at_the_sites_clock_names_the_clock_and_the_renewal(tmp_path):
    """A server certificate that expired (or a site clock far ahead) failed the reachability check with "not from the
    CA or does not name the host": the wrong fix. It now names the site's time, the clock fix and the renewal."""
    import ssl
    import threading

    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=500)  # the server certificate lasts 397 days
    init_consortium(tmp_path / "op", "t", "127.0.0.1:8443", now=old)
    op = tmp_path / "op"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(op / "server/server.crt", op / "server/server.key")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve_one():
            conn, _ = listener.accept()
            try:
                ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

        threading.Thread(target=serve_one, daemon=True).start()
        check = check_reachable(f"127.0.0.1:{port}", op / "ca/ca.crt", "consortium server")
    assert not check.ok and "certificate has expired" in check.detail
    assert "this machine's time" in check.detail and "renew the server's certificate" in check.detail
    assert "not from the CA" not in check.detail


def test_a_state_dir_edited_away_from_the_sites_ledger_fails_preflight_instead_of_starting_a_new_one(consortium,
                                                                                                    tmp_path):
    """site.json's state-dir edited by hand (a typo, a move half done) named a directory without the ledger; preflight
    said `writable` and the first round started a new ledger from zero: the site's whole budget again. Preflight now
    fails naming the directory the ledger is in; set back, it passes (and a site that never trained may move)."""
    import subprocess
    import sys

    from privacy.ledger import PrivacyLedger

    (tmp_path / "data").mkdir()
    site = init_site(tmp_path / "s", "S", consortium / "public", str(tmp_path / "data"),
                     ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))

    def start(site_dir=tmp_path / "s") -> str:
        r = subprocess.run([sys.executable, "-m", "oncofed", "site", "start", str(site_dir), "--port",
                            str(_free_port())], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2  # the consortium server is not running here
        return next(line for line in r.stderr.splitlines() if "privacy ledger" in line)

    site_json = tmp_path / "s" / "site.json"
    settings = json.loads(site_json.read_text())
    settings["state-dir"] = str(tmp_path / "s" / "moved")
    site_json.write_text(json.dumps(settings))
    assert "[ok  ]" in start()  # no ledger anywhere yet: a site that never trained may choose its state-dir
    settings["state-dir"] = site.state_dir
    site_json.write_text(json.dumps(settings))
    assert "[ok  ]" in start()
    PrivacyLedger(Path(site.state_dir) / "privacy-ledger.json", 8.0, 1e-5)  # the site trains: its ledger exists
    settings["state-dir"] = str(tmp_path / "s" / "stat")
    site_json.write_text(json.dumps(settings))
    line = start()
    assert "[FAIL]" in line and f"this site trained with the ledger in {Path(site.state_dir).resolve()}" in line
    assert not (tmp_path / "s" / "stat" / "privacy-ledger.json").exists()
    # the other half of a move: the files moved, site.json not edited
    settings["state-dir"] = site.state_dir
    site_json.write_text(json.dumps(settings))
    assert "[ok  ]" in start()  # started with its ledger there: recorded
    moved = tmp_path / "elsewhere"
    Path(site.state_dir).rename(moved)
    line = start()
    assert "[FAIL]" in line and "missing, but it was there when this site last started" in line, line
    settings["state-dir"] = str(moved)
    site_json.write_text(json.dumps(settings))
    assert "[ok  ]" in start()  # site.json follows the move: the ledger is found
    # another site (of other data: a second ledger over the same data is refused, tests/test_ledger_index.py): started
    # before its first round (no ledger yet), trained since, then its state directory moved
    (tmp_path / "data2").mkdir()
    other = init_site(tmp_path / "s2", "S2", consortium / "public", str(tmp_path / "data2"),
                      ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    assert "[ok  ]" in start(tmp_path / "s2")  # no ledger yet
    PrivacyLedger(Path(other.state_dir) / "privacy-ledger.json", 8.0, 1e-5)
    Path(other.state_dir).rename(tmp_path / "s2-state-moved")
    line = start(tmp_path / "s2")
    assert "[FAIL]" in line and "its directory was there when this site last started" in line, line


def test_site_start_shows_what_the_site_has_spent_and_warns_of_a_damaged_ledger(consortium, tmp_path):
    """What a site's IT team sees before its SuperNode starts: the epsilon its ledger recorded against its budget; a
    ledger that no longer reads is a warning (the site refuses every round until it is restored, and still receives
    models, so the SuperNode starts) instead of a silent start."""
    from client.supernode import ledger_check
    from privacy.ledger import PrivacyLedger

    site = init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    assert "none yet" in ledger_check(tmp_path / "s", site).detail
    ledger = PrivacyLedger(Path(site.state_dir) / "privacy-ledger.json", 8.0, 1e-5)
    ticket = ledger.begin_round("d", "run-1", 1, 1.0, 0.3, 5, padding_tail=0.0)
    ledger.commit_round(ticket, 5)
    ledger.begin_round("d", "run-1", 2, 1.0, 0.3, 5, padding_tail=0.0)  # a crash mid-round
    check = ledger_check(tmp_path / "s", site)
    assert check.ok and "of the budget 8 spent" in check.detail and "1 round(s) begun" in check.detail
    ledger.path.write_text(ledger.path.read_text()[:-10])
    check = ledger_check(tmp_path / "s", site)
    assert check.ok and check.warning and "unreadable" in check.detail and "restore it from backup" in check.detail


def test_site_start_reports_the_budget_left_and_warns_when_less_than_one_default_run_is_left(consortium, tmp_path):
    """At the defaults (budget 8, run epsilon 8) the first run spent 7.93 of the site's lifetime 8 and every later run
    was refused in every round, and nothing warned. The start's preflight reports the budget left, in runs at the
    consortium's default epsilon, and warns (it does not refuse) when less than one such run is left."""
    from client.supernode import ledger_check
    from privacy.ledger import PrivacyLedger

    site = init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    check = ledger_check(tmp_path / "s", site)
    assert check.ok and not check.warning and "epsilon 8 left: 1 more run(s) at the consortium's default epsilon 8" \
        in check.detail, check.detail
    ledger = PrivacyLedger(Path(site.state_dir) / "privacy-ledger.json", 8.0, 1e-5)
    ledger.commit_round(ledger.begin_round("d", "run-1", 1, 1.0, 0.3, 5, padding_tail=0.0), 5)  # epsilon 5.2: less than 4 left
    check = ledger_check(tmp_path / "s", site)
    assert check.ok and check.warning, check.detail
    assert "less than the 8 one run at the consortium's default settings spends" in check.detail, check.detail
    assert "refuses every new run" in check.detail and "whole lifetime" in check.detail, check.detail


def test_a_site_without_the_consortiums_signing_key_fails_preflight_naming_the_key_and_the_bundle(consortium, tmp_path):
    """Without signing-public-key no delivered model can be checked against the consortium's signature: a real site
    does not start so (a simulated one may: `oncofed simulate` marks its site.json)."""
    from client.supernode import site_checks

    site = init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    assert [c.ok for c in site_checks(site, 29555, None) if c.name.startswith("model-signing")] == [True]
    keyless = site.model_copy(update={"signing_public_key": ""})
    (check,) = [c for c in site_checks(keyless, 29555, None) if c.name.startswith("model-signing")]
    assert not check.ok and "signing-public-key is not set" in check.detail and "public/ bundle" in check.detail
    simulated = keyless.model_copy(update={"simulated": True})
    (check,) = [c for c in site_checks(simulated, 29555, None) if c.name.startswith("model-signing")]
    assert check.ok and check.warning


def test_a_runtime_port_another_process_holds_names_it_and_a_free_port(consortium, tmp_path):
    """Two sites on one host both start on 9094: the second's preflight said "another process holds it (an OncoFed
    server already running?)". It names the holder (pid and command line, as the server's preflight does) and the fix,
    `--port` with a port free now."""
    from client.supernode import site_checks

    site = init_site(tmp_path / "s", "S", consortium / "public", "", ca_fingerprint=fingerprint(consortium / "ca/ca.crt"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        [check] = [c for c in site_checks(site, port, None) if c.name.startswith("local runtime port")]
    assert not check.ok
    own = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()  # this process's command, as ps shows it
    assert f"held by pid {os.getpid()} ({own}" in check.detail, check.detail
    assert "`--port " in check.detail and "systemd unit" in check.detail, check.detail


def test_a_server_port_held_by_a_process_not_a_consortiums_names_its_command_line_or_how_to_find_it(monkeypatch):
    """The server's preflight had a port holder of its own: a stranger was "pid N (python)" (its program's name only)
    and one this account cannot see "another process", where the site's named the command line and `sudo ss`. One
    holder for both sides now (privacy.preflight.port_holder): the site's wording, the server's consortium names."""
    import privacy.preflight
    from server.deploy import check_port_held

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _, holder = check_port_held("127.0.0.1", port, "metrics (--metrics-port) address")
        own = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()  # this process's command, as ps shows it
        assert holder.text.startswith(f"pid {os.getpid()} ({own}") and holder.root is None, holder
        monkeypatch.setattr(privacy.preflight, "listening_pids", lambda port: [])  # as another user's process is
        _, holder = check_port_held("127.0.0.1", port, "metrics (--metrics-port) address")
    assert holder.text == f"another account's process (`sudo ss -ltnp 'sport = :{port}'` names it)", holder
