"""Consortium provisioning with `cryptography`: the operator's CA, server certificate and model-signing
key, and each site's node-authentication key with its trust anchors.

    oncofed consortium init DIR --name NAME --address HOST:PORT
      DIR/ca/ca.key, ca.crt             EC P-384 CA (5 years), signs the server certificate
      DIR/server/server.key, server.crt EC P-384, 397 days, SANs: HOST, localhost, 127.0.0.1 (the SuperLink's
                                        own launcher connects over loopback), serverAuth
      DIR/signing/signing.key, .pub     Ed25519 model-signing key pair
      DIR/public/                       what every site receives: ca.crt, signing.pub, consortium.json
      DIR/consortium.json               the operator's record (fingerprints, validity, public address, the
                                        SuperLink's loopback control address)
      DIR/proxy/nginx.conf              (server/proxy.py) the TLS proxy exposing only the Fleet API
    oncofed site init DIR --name NAME --consortium PUBLIC_DIR [--data PATH] [--budget EPS]
      DIR/keys/site.key, site.key.pub   ECDSA P-384 in OpenSSH format (what Flower's node authentication
                                        accepts; ed25519 and RSA are refused by Flower)
      DIR/trust/ca.crt, signing.pub     trust anchors, checked against the bundle's fingerprints
      DIR/site.json                     the site's settings (data, model store, state, budget, min count)

Private keys are created with mode 0600 from their first byte. Nothing is overwritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy import MAX_BUDGET
from privacy.signing import generate_signing_key, write_private
from shared_models.files import sha256_file

CA_DAYS, SERVER_DAYS = 5 * 365, 397
FORMAT = "oncofed-consortium/1"


class ProvisioningError(ValueError):
    """Bad provisioning input: names the setting or file and the fix."""


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProvisioningError(f"--address {address!r}: write HOST:PORT, e.g. fl.consortium.example:443")
    return host.strip("[]"), int(port)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fresh_dir(path: Path, what: str) -> None:
    if path.exists() and any(path.iterdir()):
        raise ProvisioningError(f"{path} already holds files; {what} never overwrites keys: choose an empty directory")
    path.mkdir(parents=True, exist_ok=True)


def init_consortium(root: str | Path, name: str, address: str, now: dt.datetime | None = None,
                    internal_port: int = 9092) -> dict:
    """`address` is where sites reach the TLS proxy; the SuperLink itself listens on 127.0.0.1:internal_port."""
    root = Path(root).resolve()
    host, port = parse_address(address)
    if not 0 < internal_port < 65536 or (internal_port == port and host in ("127.0.0.1", "localhost")):
        raise ProvisioningError(f"--internal-port {internal_port}: the SuperLink's loopback port must be a free port "
                                f"other than the public one ({port})")
    _fresh_dir(root, "consortium init")
    now = now or dt.datetime.now(dt.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{name} OncoFed CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    write_private(root / "ca" / "ca.key", _pem_private(ca_key))
    (root / "ca" / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(ec.SECP384R1())
    sans = list(dict.fromkeys([host, "localhost", "127.0.0.1"]))
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                                            x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    write_private(root / "server" / "server.key", _pem_private(server_key))
    (root / "server" / "server.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))

    generate_signing_key(root / "signing" / "signing.key", root / "signing" / "signing.pub")

    public = root / "public"
    public.mkdir()
    shutil.copy(root / "ca" / "ca.crt", public / "ca.crt")
    shutil.copy(root / "signing" / "signing.pub", public / "signing.pub")
    record = {"format": FORMAT, "name": name, "address": f"{host}:{port}", "created": now.isoformat(),
              "ca_sha256": sha256_file(public / "ca.crt"), "signing_pub_sha256": sha256_file(public / "signing.pub"),
              "ca_not_after": (now + dt.timedelta(days=CA_DAYS)).isoformat(),
              "server_not_after": (now + dt.timedelta(days=SERVER_DAYS)).isoformat(),
              "server_sans": sans, "sites": [],
              "control-address": f"127.0.0.1:{internal_port}"}
    (public / "consortium.json").write_text(json.dumps(record, indent=1) + "\n")
    (root / "consortium.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def init_site(root: str | Path, name: str, consortium_public: str | Path, data_path: str = "",
              budget: float = 8.0, min_count: int = 5) -> dict:
    root, bundle = Path(root).resolve(), Path(consortium_public)
    try:
        record = json.loads((bundle / "consortium.json").read_text())
    except (OSError, ValueError) as e:
        raise ProvisioningError(f"--consortium {bundle}: no readable consortium.json ({e}); pass the public/ "
                                "directory the operator's `oncofed consortium init` wrote") from None
    for file, key in (("ca.crt", "ca_sha256"), ("signing.pub", "signing_pub_sha256")):
        if not (bundle / file).exists() or sha256_file(bundle / file) != record.get(key):
            raise ProvisioningError(f"{bundle / file}: missing or its SHA-256 differs from consortium.json's {key}: "
                                    "the bundle was altered in transit; ask the operator for it again and compare "
                                    "the fingerprints out of band")
    if not 0 < budget <= MAX_BUDGET:
        raise ProvisioningError(f"--budget {budget:g}: the site's privacy budget (epsilon) must be positive and at "
                                f"most {MAX_BUDGET:g}, the largest the site's privacy accounting verifies")
    _fresh_dir(root, "site init")

    key = ec.generate_private_key(ec.SECP384R1())
    write_private(root / "keys" / "site.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (root / "keys" / "site.key.pub").write_bytes(public + f" {name}\n".encode())

    (root / "trust").mkdir()
    shutil.copy(bundle / "ca.crt", root / "trust" / "ca.crt")
    shutil.copy(bundle / "signing.pub", root / "trust" / "signing.pub")
    settings = {"format": "oncofed-site/1", "site-name": name, "consortium": record["name"],
                "superlink": record["address"], "data-path": data_path, "state-dir": str(root / "state"),
                "model-dir": str(root / "models"), "privacy-budget": float(budget), "min-count": int(min_count),
                "require-secagg": True, "signing-public-key": str(root / "trust" / "signing.pub"),
                "root-certificates": str(root / "trust" / "ca.crt"),
                "auth-supernode-private-key": str(root / "keys" / "site.key"),
                "public-key-sha256": hashlib.sha256(public).hexdigest()}
    (root / "site.json").write_text(json.dumps(settings, indent=1) + "\n")
    return settings
