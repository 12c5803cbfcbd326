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

from privacy.pki import ProvisioningError, init_consortium, init_site
from privacy.signing import load_private, load_public, sign, verify


@pytest.fixture()
def consortium(tmp_path):
    init_consortium(tmp_path / "op", "TCGA consortium", "fl.example.org:443")
    return tmp_path / "op"


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
    settings = init_site(tmp_path / "site", "C0", consortium / "public", data_path="/data/C0", budget=4.0)
    key = load_ssh_private_key((tmp_path / "site" / "keys" / "site.key").read_bytes(), None)  # as flower-supernode
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    pub_line = (tmp_path / "site" / "keys" / "site.key.pub").read_text()
    assert pub_line.startswith("ecdsa-sha2-nistp384 ") and pub_line.rstrip().endswith(" C0")
    assert load_ssh_public_key(pub_line.encode()).public_numbers() == key.public_key().public_numbers()
    assert os.stat(tmp_path / "site" / "keys" / "site.key").st_mode & 0o777 == 0o600
    saved = json.loads((tmp_path / "site" / "site.json").read_text())
    assert saved == settings and saved["privacy-budget"] == 4.0 and saved["superlink"] == "fl.example.org:443"
    assert (tmp_path / "site" / "trust" / "signing.pub").read_bytes() == (consortium / "public" / "signing.pub").read_bytes()


def test_an_altered_bundle_is_refused(consortium, tmp_path):
    bundle = consortium / "public"
    other = tmp_path / "other"
    init_consortium(other, "someone else", "evil.example.org:443")
    (bundle / "signing.pub").write_bytes((other / "public" / "signing.pub").read_bytes())
    with pytest.raises(ProvisioningError, match="signing.pub: missing or its SHA-256 differs"):
        init_site(tmp_path / "site", "C0", bundle)
    assert not (tmp_path / "site").exists()


def test_nothing_is_overwritten_and_bad_settings_are_named(consortium, tmp_path):
    with pytest.raises(ProvisioningError, match="already holds files"):
        init_consortium(consortium, "again", "fl.example.org:443")
    with pytest.raises(ProvisioningError, match="--address 'fl.example.org': write HOST:PORT"):
        init_consortium(tmp_path / "x", "c", "fl.example.org")
    with pytest.raises(ProvisioningError, match="--budget -1"):
        init_site(tmp_path / "s", "C0", consortium / "public", budget=-1)
    with pytest.raises(ProvisioningError, match="--budget 500: .* at most 100"):
        init_site(tmp_path / "s", "C0", consortium / "public", budget=500)
    with pytest.raises(ProvisioningError, match="no readable consortium.json"):
        init_site(tmp_path / "s", "C0", tmp_path)


def test_the_commands_print_the_fingerprints_to_compare(tmp_path):
    from typer.testing import CliRunner

    from oncofed.cli import app

    res = CliRunner().invoke(app, ["consortium", "init", str(tmp_path / "op"), "--name", "c", "--address",
                                   "10.0.0.5:8443"])
    assert res.exit_code == 0 and "CA fingerprint" in res.output
    res = CliRunner().invoke(app, ["site", "init", str(tmp_path / "s"), "--name", "C1", "--consortium",
                                   str(tmp_path / "op" / "public")])
    assert res.exit_code == 0 and "site.key.pub" in res.output
    bad = CliRunner().invoke(app, ["consortium", "init", str(tmp_path / "op"), "--name", "c", "--address", "h:1"])
    assert bad.exit_code == 2 and "already holds files" in bad.output
