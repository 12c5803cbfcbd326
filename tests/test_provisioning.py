"""Consortium and site provisioning: keys Flower accepts, certificates that chain, nothing overwritten."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from privacy.pki import ProvisioningError, fingerprint, init_consortium, init_site
from privacy.signing import load_private, load_public, sign, verify


@pytest.fixture()
def consortium(tmp_path):
    init_consortium(tmp_path / "op", "TCGA consortium", "fl.example.org:443")
    return tmp_path / "op"


def _read_out(consortium) -> str:
    """The CA fingerprint as the operator reads it out over the phone (from the operator's own record)."""
    return json.loads((consortium / "consortium.json").read_text())["ca_sha256"]


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_private_keys_are_owner_only(consortium):
    for key in ("ca/ca.key", "server/server.key", "signing/signing.key"):
        assert os.stat(consortium / key).st_mode & 0o777 == 0o600, key


def test_the_server_certificate_chains_to_the_ca_and_names_public_and_loopback_addresses(consortium):
    ca, server = _cert(consortium / "ca" / "ca.crt"), _cert(consortium / "server" / "server.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(hashes.SHA384()))
    assert server.issuer == ca.subject
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert 360 <= days <= 400 and (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 5 * 365 - 1


def test_the_model_signing_pair_signs_and_verifies(consortium):
    info = {"run": "r", "arrays_sha256": "ab" * 32}
    verify(sign(info, load_private(consortium / "signing" / "signing.key")),
           load_public(consortium / "public" / "signing.pub"))


def test_a_site_key_is_an_openssh_p384_key_as_flower_node_authentication_loads_it(consortium, tmp_path):
    (tmp_path / "data" / "C0").mkdir(parents=True)
    settings = init_site(tmp_path / "site", "C0", consortium / "public", data_path=str(tmp_path / "data" / "C0"),
                         budget=4.0, ca_fingerprint=_read_out(consortium))
    key = load_ssh_private_key((tmp_path / "site" / "keys" / "site.key").read_bytes(), None)  # as flower-supernode
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub_line = (tmp_path / "site" / "keys" / "site.key.pub").read_text()
    assert pub_line.startswith("ecdsa-sha2-nistp384 ") and pub_line.rstrip().endswith(" C0")
    assert load_ssh_public_key(pub_line.encode()).public_numbers() == key.public_key().public_numbers()
    assert os.stat(tmp_path / "site" / "keys" / "site.key").st_mode & 0o777 == 0o600
    saved = json.loads((tmp_path / "site" / "site.json").read_text())
    assert saved == settings.model_dump(mode="json", by_alias=True, exclude_unset=True)  # written via the model
    assert saved["format"] == "oncofed-site/1" and saved["require-secagg"] is True and saved["min-count"] == 5
    assert saved["privacy-budget"] == 4.0 and saved["superlink"] == "fl.example.org:443"
    assert saved["privacy-delta"] == 1e-5  # the site's own: a run's delta never re-prices its spend downwards
    assert (tmp_path / "site" / "trust" / "signing.pub").read_bytes() == (consortium / "public" / "signing.pub").read_bytes()


def test_an_altered_bundle_is_refused(consortium, tmp_path):
    bundle = consortium / "public"
    other = tmp_path / "other"
    init_consortium(other, "someone else", "evil.example.org:443")
    (bundle / "signing.pub").write_bytes((other / "public" / "signing.pub").read_bytes())
    with pytest.raises(ProvisioningError, match="signing.pub: missing or its SHA-256 differs"):
        init_site(tmp_path / "site", "C0", bundle, ca_fingerprint=_read_out(consortium))
    assert not (tmp_path / "site").exists()


def test_nothing_is_overwritten_and_bad_settings_are_named(consortium, tmp_path):
    with pytest.raises(ProvisioningError, match="already holds files"):
        init_consortium(consortium, "again", "fl.example.org:443")
    with pytest.raises(ProvisioningError, match="--address 'fl.example.org': write HOST:PORT"):
        init_consortium(tmp_path / "x", "c", "fl.example.org")
    with pytest.raises(ProvisioningError, match="--budget -1"):
        init_site(tmp_path / "s", "C0", consortium / "public", budget=-1, ca_fingerprint=_read_out(consortium))
    with pytest.raises(ProvisioningError, match="--budget 500: .* at most 100"):
        init_site(tmp_path / "s", "C0", consortium / "public", budget=500, ca_fingerprint=_read_out(consortium))
    with pytest.raises(ProvisioningError, match="no readable consortium.json"):
        init_site(tmp_path / "s", "C0", tmp_path, ca_fingerprint=_read_out(consortium))
    for name in ("", "a/b", " C0", "C0\n"):
        with pytest.raises(ProvisioningError, match="--name .* a site name is printable text without"):
            init_site(tmp_path / "s", name, consortium / "public", ca_fingerprint=_read_out(consortium))
    with pytest.raises(ProvisioningError, match="--data /nope: /nope is not a directory"):
        init_site(tmp_path / "s", "C0", consortium / "public", data_path="/nope", ca_fingerprint=_read_out(consortium))
    assert not (tmp_path / "s").exists()  # refused before anything is written
    # a name site.json refuses (a quote) once keys would have been made: nothing is left, and the fixed command works
    with pytest.raises(ProvisioningError, match="holds no quote.*Nothing was written"):
        init_site(tmp_path / "s", 'St "Mary"', consortium / "public", ca_fingerprint=_read_out(consortium))
    assert not (tmp_path / "s").exists()
    # an existing empty directory (a mount point, one the admin made with its owner and mode) is used as it is, and
    # emptied again after a failure
    (tmp_path / "s").mkdir()
    (tmp_path / "s").chmod(0o750)
    with pytest.raises(ProvisioningError, match="holds no quote"):
        init_site(tmp_path / "s", 'St "Mary"', consortium / "public", ca_fingerprint=_read_out(consortium))
    assert (tmp_path / "s").is_dir() and not list((tmp_path / "s").iterdir())
    assert init_site(tmp_path / "s", "St Mary", consortium / "public", ca_fingerprint=_read_out(consortium))
    assert (tmp_path / "s").stat().st_mode & 0o7777 == 0o750
    (tmp_path / "f").write_text("x")
    with pytest.raises(ProvisioningError, match="is a file, not a directory"):
        init_site(tmp_path / "f", "C0", consortium / "public", ca_fingerprint=_read_out(consortium))


def test_consortium_init_refuses_what_no_certificate_or_proxy_could_hold_and_leaves_nothing_on_failure(tmp_path,
                                                                                                     monkeypatch):
    """A name the CA's subject cannot hold, or a public port the proxy would share with the SuperLink (a DNS name:
    nginx listens on every address), is refused before anything is written; a long valid DNS host is a certificate's
    SAN (its common name holds 64 characters); a failure midway leaves nothing, so the same command works again."""
    import privacy.pki as pki

    for name in ("", "International Pan-Cancer Genomics Federated Learning Consortium"):
        with pytest.raises(ProvisioningError, match="--name .* 1 to 53 characters"):
            init_consortium(tmp_path / "a", name, "fl.example.org:443")
    with pytest.raises(ProvisioningError, match="--internal-port 9092: .* other than the public one"):
        init_consortium(tmp_path / "a", "c", "fl.example.org:9092")
    assert not (tmp_path / "a").exists()
    host = "federated-learning.pan-cancer-genomics.university-hospital.example.org"  # 70 characters
    assert host in init_consortium(tmp_path / "b", "c", f"{host}:443")["server_sans"]
    monkeypatch.setattr(pki, "generate_signing_key", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(ProvisioningError, match="No space left.*nothing was written"):
        init_consortium(tmp_path / "c", "c", "fl.example.org:443")
    assert not (tmp_path / "c").exists()


def test_a_relative_data_path_is_stored_absolute(consortium, tmp_path, monkeypatch):
    (tmp_path / "tables").mkdir()
    monkeypatch.chdir(tmp_path)  # the site will run from another directory
    settings = init_site(tmp_path / "site", "C0", consortium / "public", data_path="tables",
                         ca_fingerprint=_read_out(consortium))
    assert settings.data_path == str(tmp_path / "tables")


def test_a_self_consistent_bundle_from_someone_else_is_refused_by_the_fingerprint_read_out(consortium, tmp_path):
    """An attacker's bundle verifies against itself (its CA signed its manifest); only the fingerprint that
    did not travel with it tells it apart."""
    init_consortium(tmp_path / "evil", "TCGA consortium", "fl.example.org:443")
    with pytest.raises(ProvisioningError, match="is not the .* you were given: this bundle is not your consortium"):
        init_site(tmp_path / "site", "C0", tmp_path / "evil" / "public", ca_fingerprint=_read_out(consortium))
    assert not (tmp_path / "site").exists()
    with pytest.raises(ProvisioningError, match="64 hexadecimal digits"):
        init_site(tmp_path / "site", "C0", consortium / "public", ca_fingerprint=_read_out(consortium)[:16])
    # as typed after the call: upper case, in groups, with the prefix sha256sum users see elsewhere
    spoken = "SHA256: " + " ".join(_read_out(consortium).upper()[i:i + 4] for i in range(0, 64, 4))
    init_site(tmp_path / "site", "C0", consortium / "public", ca_fingerprint=spoken)


def test_a_bundle_whose_ca_expired_is_refused_at_site_init_naming_the_clock_and_the_current_bundle(tmp_path):
    """An old bundle (its CA expired) passed site init: the hospital generated its key and sent it for registration,
    and only `site start` said the CA had expired. site init now refuses it, writing nothing."""
    import datetime as dt

    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=6 * 365)
    init_consortium(tmp_path / "op", "old", "fl.example.org:8443", now=long_ago)
    with pytest.raises(ProvisioningError, match="not at this machine's time .* current public/ bundle"):
        init_site(tmp_path / "s", "S", tmp_path / "op" / "public", "",
                  ca_fingerprint=fingerprint(tmp_path / "op" / "ca" / "ca.crt"))
    assert not (tmp_path / "s").exists()


def test_a_manifest_re_hashed_by_someone_without_the_ca_key_is_refused(consortium, tmp_path):
    """Swap the signing key and fix the manifest's hash of it: the CA's signature of the manifest breaks."""
    init_consortium(tmp_path / "evil", "x", "fl.example.org:443")
    bundle = consortium / "public"
    (bundle / "signing.pub").write_bytes((tmp_path / "evil" / "public" / "signing.pub").read_bytes())
    manifest = json.loads((bundle / "consortium.json").read_text())
    manifest["signing_pub_sha256"] = fingerprint(bundle / "signing.pub")
    (bundle / "consortium.json").write_text(json.dumps(manifest))
    with pytest.raises(ProvisioningError, match="not signed by the consortium's CA"):
        init_site(tmp_path / "site", "C0", bundle, ca_fingerprint=_read_out(consortium))


def test_the_schema_travels_in_the_bundle_pinned_by_its_hash(consortium, tmp_path):
    from shared_models.schema import FeatureSchema

    bundle = consortium / "public"
    manifest = json.loads((bundle / "consortium.json").read_text())
    assert manifest["schema_sha256"] == fingerprint(bundle / "schema.json")
    FeatureSchema.load(bundle / "schema.json")
    settings = init_site(tmp_path / "site", "C0", bundle, ca_fingerprint=_read_out(consortium))
    assert settings.schema_sha256 == manifest["schema_sha256"] == fingerprint(settings.schema_path)
    schema = json.loads((bundle / "schema.json").read_text())
    schema["name"] = str(schema.get("name", "")) + " (edited)"
    (bundle / "schema.json").write_text(json.dumps(schema))
    with pytest.raises(ProvisioningError, match="schema.json: missing or its SHA-256 differs"):
        init_site(tmp_path / "site2", "C1", bundle, ca_fingerprint=_read_out(consortium))


def test_one_fingerprint_format_everywhere(tmp_path):
    """`consortium init`, `site init` and `add-site` print the full SHA-256 of the file, what sha256sum prints."""
    import hashlib
    import re

    from typer.testing import CliRunner

    from oncofed.cli import app

    res = CliRunner().invoke(app, ["consortium", "init", str(tmp_path / "op"), "--name", "c", "--address",
                                   "10.0.0.5:8443"])
    ca = hashlib.sha256((tmp_path / "op" / "public" / "ca.crt").read_bytes()).hexdigest()
    assert res.exit_code == 0 and f"CA fingerprint (SHA-256)          {ca}" in res.output
    res = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s"), "--name", "C1", "--consortium",
                                   str(tmp_path / "op" / "public"), "--ca-fingerprint", ca])
    key = hashlib.sha256((tmp_path / "s" / "keys" / "site.key.pub").read_bytes()).hexdigest()
    assert res.exit_code == 0 and f"fingerprint {key};" in res.output
    assert fingerprint(tmp_path / "s" / "keys" / "site.key.pub") == key  # what add-site records and prints
    assert all(len(h) == 64 for h in re.findall(r"\b[0-9a-f]{16,}\b", res.output))
    missing = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s2"), "--name", "C2", "--consortium",
                                       str(tmp_path / "op" / "public")])
    assert missing.exit_code == 2 and "--ca-fingerprint" in missing.output
    wrong = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s3"), "--name", "C3", "--consortium",
                                     str(tmp_path / "op" / "public"), "--ca-fingerprint", "ab" * 32])
    assert wrong.exit_code == 2 and "not your consortium's" in wrong.output and not (tmp_path / "s3").exists()
    bad = CliRunner().invoke(app, ["consortium", "init", str(tmp_path / "op"), "--name", "c", "--address", "h:1"])
    assert bad.exit_code == 2 and "already holds files" in bad.output


def test_address_localhost_makes_the_proxy_listen_on_loopback_only(tmp_path):
    from server.proxy import listen_host, write_config

    init_consortium(tmp_path / "op", "c", "localhost:8443")
    conf = write_config(tmp_path / "op", "localhost", 8443, 9092).read_text()
    assert "listen 127.0.0.1:8443 ssl;" in conf and "0.0.0.0" not in conf
    assert listen_host("LOCALHOST") == "127.0.0.1" and listen_host("fl.example.org") == "0.0.0.0"


def _listening(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (/proc/net/tcp, state 0A)."""
    import socket
    import struct

    out = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            out.add(socket.inet_ntoa(struct.pack("<I", int(addr, 16))))
    return out


@pytest.mark.skipif(__import__("server.proxy").proxy.nginx_binary() is None, reason="needs nginx")
def test_the_proxy_of_a_localhost_consortium_is_bound_to_loopback(tmp_path):
    """The real nginx with the config `oncofed server start` writes: listening on 127.0.0.1, not 0.0.0.0."""
    import subprocess
    import time

    from server.proxy import nginx_command, write_config
    from server.processes import free_port

    port = free_port()
    init_consortium(tmp_path / "op", "c", f"localhost:{port}")
    write_config(tmp_path / "op", "localhost", port, free_port())
    proc = subprocess.Popen(nginx_command(tmp_path / "op"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not _listening(port) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert _listening(port) == {"127.0.0.1"}
    finally:
        from server.processes import stop_group

        stop_group(proc)


def test_a_consortium_is_not_created_around_a_file_that_is_no_schema(tmp_path):
    # the bundle signs the schema for good: a review created one with --schema /etc/passwd, and each site's
    # start then failed pointing at the hospital's own data
    from privacy.pki import ProvisioningError, init_consortium

    (tmp_path / "notes.txt").write_text("root:x:0:0\n")
    with pytest.raises(ProvisioningError, match=r"--schema .*notes.txt: not a feature schema"):
        init_consortium(tmp_path / "op", "X", "fl.example.org:443", schema=tmp_path / "notes.txt")
    assert not (tmp_path / "op").exists(), "no key was made"
    with pytest.raises(ProvisioningError, match="not a directory"):
        init_consortium(tmp_path / "notes.txt", "X", "fl.example.org:443")


def test_a_port_outside_tcp_is_a_failed_check_not_a_traceback():
    from privacy.preflight import check_port_free

    check = check_port_free("127.0.0.1", 99999, "metrics")
    assert not check.ok and "not a TCP port (1-65535)" in check.detail


def test_no_help_text_holds_square_brackets_which_the_cli_would_swallow_as_markup():
    """Typer renders --help with Rich, which takes "[default: x]" for a style tag and drops it with the default
    it gives; every option, argument and command says its defaults in round brackets."""
    import typer

    from oncofed.cli import app

    swallowed = []

    def walk(command, path: str) -> None:
        swallowed.extend(f"{path} {p.name}" for p in command.params if "[" in (getattr(p, "help", None) or ""))
        if "[" in (command.help or ""):
            swallowed.append(f"{path} (its description)")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")
    walk(typer.main.get_command(app), "oncofed")
    assert not swallowed, swallowed


@pytest.mark.parametrize("wrong", ["ca/ca.crt", "keys/site.key", "keys/site.key.pem"])
def test_add_site_given_a_certificate_or_a_private_key_refuses_it_naming_the_file_and_never_echoing_the_key(
        consortium, tmp_path, wrong):
    """A PEM certificate or the site's OpenSSH private key gave a traceback (cryptography's UnsupportedAlgorithm); a
    private key that left its hospital is a compromised one, and must not be copied into the operator's terminal."""
    from cryptography.hazmat.primitives import serialization
    from typer.testing import CliRunner

    from oncofed.cli import app

    init_site(tmp_path / "site", "C0", consortium / "public", ca_fingerprint=_read_out(consortium))
    key = tmp_path / "site" / "keys" / "site.key"
    (key.parent / "site.key.pem").write_bytes(load_ssh_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path = (consortium if wrong.startswith("ca") else tmp_path / "site") / wrong
    result = CliRunner().invoke(app, ["consortium", "add-site", str(consortium), "--name", "C0", "--key", str(path)])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and "Traceback" not in result.output
    if wrong.startswith("ca"):
        assert "a certificate" in result.output and "site.key.pub" in result.output
    else:
        assert "PRIVATE key" in result.output and "compromised" in result.output and "ssh-keygen" in result.output
        secret = b"".join(path.read_bytes().splitlines()[1:3]).decode()
        assert secret[:40] not in result.output.replace("\n", "")
    assert json.loads((consortium / "consortium.json").read_text())["sites"] == []


def test_an_ipv6_address_is_written_bracketed_wherever_a_port_follows_it(tmp_path):
    """`--address [::1]:9443`: consortium.json, the bundle's manifest, the site's site.json, the proxy's `listen` and
    the preflight's port check all say `[::1]:9443`, the one form HOST:PORT parsers read (`::1:9443` names no port)."""
    from typer.testing import CliRunner

    from oncofed.cli import app
    from privacy.pki import parse_address
    from privacy.site_config import SiteConfig
    from server.deploy import Consortium, port_checks

    res = CliRunner().invoke(app, ["consortium", "init", str(tmp_path / "op"), "--name", "c", "--address",
                                   "[::1]:9443"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "op" / "consortium.json").read_text())
    assert record["address"] == "[::1]:9443" and parse_address(record["address"]) == ("::1", 9443)
    assert json.loads((tmp_path / "op" / "public" / "consortium.json").read_text())["address"] == "[::1]:9443"
    assert "listen [::1]:9443 ssl;" in (tmp_path / "op" / "proxy" / "nginx.conf").read_text()
    assert [c.name for c in port_checks(Consortium.load(tmp_path / "op"))][0] == "public (proxy) address [::1]:9443"
    res = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s"), "--name", "C1", "--consortium",
                                   str(tmp_path / "op" / "public"), "--ca-fingerprint", record["ca_sha256"]])
    assert res.exit_code == 0, res.output
    assert SiteConfig.load(tmp_path / "s" / "site.json").superlink == "[::1]:9443"


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(__import__("server.proxy").proxy.nginx_binary() is None or not _ipv6_loopback(),
                    reason="needs nginx and an IPv6 loopback")
def test_a_server_at_an_ipv6_address_starts_and_answers_there(tmp_path):
    """`oncofed server start` of a consortium at `[::1]:PORT` waited for its proxy at 127.0.0.1:PORT, where nginx does
    not listen (it listens on the address given), and failed after 30 s: it waits at the address the proxy is bound to."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from privacy.preflight import https_health
    from server.processes import free_port

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    init_consortium(tmp_path / "op", "c", f"[::1]:{port}", internal_port=free_port())
    log = tmp_path / "server.out"
    with open(log, "w") as fh:
        server = subprocess.Popen([sys.executable, "-m", "oncofed", "server", "start", str(tmp_path / "op"),
                                   "--metrics-port", "0"], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "serving:" not in log.read_text() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "serving: sites connect to https://[::1]:" in log.read_text(), log.read_text()[-2000:]
        assert https_health(f"[::1]:{port}", tmp_path / "op" / "ca" / "ca.crt") == 200  # as a site's preflight asks
    finally:
        server.send_signal(signal.SIGTERM)  # stops the SuperLink, SuperExec and proxy it started, as Ctrl-C does
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
