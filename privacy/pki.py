"""Consortium provisioning with `cryptography`: the operator's CA, server certificate and model-signing
key, and each site's node-authentication key with its trust anchors.

    oncofed consortium init DIR --name NAME --address HOST:PORT
      DIR/ca/ca.key, ca.crt             EC P-384 CA (5 years), signs the server certificate
      DIR/server/server.key, server.crt EC P-384, 397 days, SANs: HOST, localhost, 127.0.0.1 (the SuperLink's
                                        own launcher connects over loopback), serverAuth
      DIR/signing/signing.key, .pub     Ed25519 model-signing key pair
      DIR/public/                       what every site receives: ca.crt, signing.pub, schema.json and
                                        consortium.json, the manifest: every file's SHA-256, signed by the CA
      DIR/consortium.json               the operator's record (fingerprints, validity, public address, the
                                        SuperLink's loopback control address)
      DIR/proxy/nginx.conf              (server/proxy.py) the TLS proxy exposing only the Fleet API
    oncofed site init DIR --name NAME --consortium PUBLIC_DIR --ca-fingerprint SHA256 [--data PATH] [--budget EPS]
                      [--state-dir ANOTHER_SITES_STATE | --allow-second-ledger]
      DIR/keys/site.key, site.key.pub   ECDSA P-384 in OpenSSH format (what Flower's node authentication
                                        accepts; ed25519 and RSA are refused by Flower)
      DIR/trust/ca.crt, signing.pub,    trust anchors and the consortium's schema, accepted only if ca.crt has
                schema.json             the fingerprint the operator read out, the manifest verifies with
                                        that CA and every file has the manifest's SHA-256
      DIR/site.json                     the site's settings (data, model store, state, budget, min count):
                                        privacy/site_config.py
      refused while another site of this machine whose privacy ledger still exists reads the same --data
      (privacy/ledger_index.py): --state-dir keeps that site's state directory and ledger, so the spend carries over

Why a fingerprint read out of band: a bundle is self-consistent whoever made it, so only a value that
did not travel with it can tell the consortium's from an attacker's. One value is enough because the
CA signs the manifest, which pins every other file by hash. Every fingerprint OncoFed prints is
`fingerprint()`: the full SHA-256 of the file, as `sha256sum FILE` prints it.

Private keys are created with mode 0600 from their first byte. Nothing is overwritten.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator

from privacy import MAX_BUDGET, SITE_BUDGET
from privacy.ledger_index import LedgerIndex, LedgerIndexError, OtherLedger
from privacy.signing import generate_signing_key, write_private
from privacy.site_config import FILE_FORMAT, HOST_PORT, SiteConfig, SiteConfigError, host_port
from shared_models.files import read_json_file, sha256_file
from shared_models.flower_tools import SUPERLINK_INTERNAL_PORT
from shared_models.limits import MIN_COUNT
from shared_models.run_config import PrivacySection

CA_DAYS, SERVER_DAYS = 5 * 365, 397
FORMAT = "oncofed-consortium/1"
MANIFEST_SIGNATURE = "ca_signature"  # the manifest's field holding the CA's signature of the rest
BUNDLE_FILES = (("ca.crt", "ca_sha256"), ("signing.pub", "signing_pub_sha256"), ("schema.json", "schema_sha256"))


class ProvisioningError(ValueError):
    """Bad provisioning input: names the setting or file and the fix."""


def fingerprint(source: bytes | str | Path) -> str:
    """The one fingerprint format of OncoFed: the full SHA-256 of a file's bytes as 64 lowercase hex digits,
    exactly what `sha256sum FILE` prints (so anyone can check it with standard tools)."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    return sha256_file(source)


def normalise_fingerprint(text: str) -> str:
    """A fingerprint as typed after a phone call: case, spaces, colons and a `sha256:` prefix do not matter."""
    t = text.strip().lower()
    t = t.removeprefix("sha256:").removeprefix("sha256")
    return "".join(ch for ch in t if ch not in " :-\t")


def _default_schema() -> Path:
    """The schema the project's Flower app trains on by default (`schema` in [tool.flwr.app.config], generated from
    shared_models.run_config.APP_SCHEMA): read from the constant, as a wheel installs no pyproject.toml."""
    from shared_models.run_config import APP_SCHEMA

    return Path(__file__).resolve().parents[1] / APP_SCHEMA


def _manifest_body(record: dict) -> bytes:
    body = {k: v for k, v in record.items() if k != MANIFEST_SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a server address, by the one rule a site's `superlink` is held to (site_config.HOST_PORT)."""
    m = HOST_PORT.fullmatch(address)
    if m is None:
        raise ProvisioningError(f"--address {address!r}: write HOST:PORT, e.g. fl.consortium.example:443")
    return m.group(1).strip("[]"), int(m.group(2))


class RegisteredSite(BaseModel):
    """A site's entry in the operator's consortium.json (add-site writes more keys; each is kept as written)."""
    model_config = ConfigDict(extra="allow")
    name: str
    node_id: str | None = None


class ConsortiumRecord(BaseModel):
    """The operator's consortium.json, as `consortium init` writes it: the keys every command reads, checked when
    it is read, so a hand edit (still JSON) is named, not a KeyError."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str
    address: str = Field(description="HOST:PORT the sites connect to (their site.json `superlink`)")
    control_address: str | None = Field(None, alias="control-address")
    sites: list[RegisteredSite]  # every `consortium init` writes it (empty): add-site and list-sites read it

    @field_validator("address", "control_address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None and HOST_PORT.fullmatch(v) is None:
            raise ValueError(f"{v!r} is not HOST:PORT")
        return v


CONSORTIUM_HINT = "pass the directory written by `oncofed consortium init`"


def read_consortium(path: Path, error: type[Exception] | None = None) -> dict:
    """The operator's consortium.json as written (a dict: commands write it back whole), its shape checked: a missing
    or mistyped key raises `error` naming the file, the key and the fix."""
    from pydantic import ValidationError

    error = error or ProvisioningError
    record = read_json_file(path, error, CONSORTIUM_HINT)
    try:
        ConsortiumRecord.model_validate(record)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'the file'}: {err['msg']}" for err in e.errors()[:3])
        raise error(f"{path}: {bad}. Restore the key as `oncofed consortium init` wrote it (\"address\": the "
                    "HOST:PORT the sites' site.json `superlink` names; \"sites\": a list of {\"name\": ..., \"node_id\": ...}; "
                    "`public/consortium.json` holds the name and address as first written)") from None
    return record


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _fresh_dir(path: Path, what: str) -> None:
    """`path` is a new directory (created here) or an empty one; ProvisioningError otherwise."""
    try:
        if path.exists() and not path.is_dir():
            raise ProvisioningError(f"{path} is a file, not a directory: give {what} a new or empty directory")
        if path.exists() and any(path.iterdir()):
            raise ProvisioningError(f"{path} already holds files; {what} never overwrites keys: choose an empty "
                                    "directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProvisioningError(f"{path}: {e.strerror or e}; give {what} a directory the account running it can "
                                "create and write") from None


@contextmanager
def _removed_on_failure(root: Path, existed: bool, command: str):
    """On any failure in the block (a setting refused, a full disk) what `command` wrote is removed again, so the same
    command can simply be run again: the new directory, or the files written into the existing empty one."""
    try:
        yield
    except BaseException as e:
        _remove_written(root, existed)
        if isinstance(e, OSError):
            raise ProvisioningError(f"{root}: {e.strerror or e}; nothing was written: give {command} a directory the "
                                    "account running it can create and write") from None
        raise


def _remove_written(root: Path, existed: bool) -> None:
    """Undo a failed `site init` or `consortium init`: the directory it created, or what it wrote into the empty one
    it was given."""
    if not existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in ("keys", "trust", "site.json"):
        path = root / child
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


MAX_NAME = 53  # a consortium's name: the CA's common name "NAME OncoFed CA" holds at most 64 characters


def _specific_ip(host: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not ip.is_loopback and not ip.is_unspecified


def init_consortium(root: str | Path, name: str, address: str, now: dt.datetime | None = None,
                    internal_port: int = SUPERLINK_INTERNAL_PORT, schema: str | Path | None = None) -> dict:
    """`address` is where sites reach the TLS proxy; the SuperLink itself listens on 127.0.0.1:internal_port.
    `schema` (default: the project's default schema) travels in the bundle, pinned by its hash."""
    root = Path(root).resolve()
    schema = Path(schema) if schema is not None else _default_schema()
    if not schema.is_file():
        raise ProvisioningError(f"--schema {schema}: no such file; pass the consortium's feature schema JSON")
    try:  # signed into the bundle for good: a file that is no schema would stop every site's start, later
        from shared_models.schema import FeatureSchema

        FeatureSchema.load(schema)
    except Exception as e:  # noqa: BLE001 - any reason it is not a schema
        raise ProvisioningError(f"--schema {schema}: not a feature schema ({e}); pass the consortium's feature "
                                "schema JSON (the bundle signs it, and it cannot be replaced later)") from None
    if root.exists() and not root.is_dir():
        raise ProvisioningError(f"{root}: not a directory; choose a new directory for the consortium")
    if not name.strip() or len(name) > MAX_NAME:  # the CA's subject: "NAME OncoFed CA", at most 64 characters
        raise ProvisioningError(f"--name {name!r}: give the consortium a name of 1 to {MAX_NAME} characters")
    host, port = parse_address(address)
    # the proxy listens on the public port of the host's address, or of every address (0.0.0.0) for a DNS name:
    # only a specific non-loopback IP leaves the loopback port free for the SuperLink
    if not 0 < internal_port < 65536 or (internal_port == port and not _specific_ip(host)):
        raise ProvisioningError(f"--internal-port {internal_port}: the SuperLink's loopback port must be a free port "
                                f"other than the public one ({port}), where the TLS proxy listens")
    existed = root.exists()
    _fresh_dir(root, "consortium init")
    with _removed_on_failure(root, existed, "consortium init"):
        return _write_consortium(root, name, host, port, internal_port, schema,
                                 now or dt.datetime.now(dt.timezone.utc))


def _write_consortium(root: Path, name: str, host: str, port: int, internal_port: int, schema: Path,
                      now: dt.datetime) -> dict:

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
                                            # a common name holds 64 characters; the SANs hold the host either way
                                            x509.NameAttribute(NameOID.COMMON_NAME,
                                                               host if len(host) <= 64 else "OncoFed server")]))
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
    shutil.copy(schema, public / "schema.json")
    record = {"format": FORMAT, "name": name, "address": host_port(host, port), "created": now.isoformat(),
              **{key: fingerprint(public / file) for file, key in BUNDLE_FILES},
              "ca_not_after": (now + dt.timedelta(days=CA_DAYS)).isoformat(),
              "server_not_after": (now + dt.timedelta(days=SERVER_DAYS)).isoformat(),
              "server_sans": sans, "sites": [],
              "control-address": f"127.0.0.1:{internal_port}"}
    manifest = {**record, MANIFEST_SIGNATURE: base64.b64encode(
        ca_key.sign(_manifest_body(record), ec.ECDSA(hashes.SHA384()))).decode()}
    (public / "consortium.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (root / "consortium.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def check_bundle(bundle: Path, ca_fingerprint: str) -> dict:
    """The consortium's manifest, if and only if the bundle is the one whose CA fingerprint was read out:
    ca.crt has that fingerprint, the manifest carries that CA's signature, every file has the manifest's
    SHA-256. Raises ProvisioningError naming what does not match."""
    try:
        record = json.loads((bundle / "consortium.json").read_text())
    except (OSError, ValueError) as e:
        raise ProvisioningError(f"--consortium {bundle}: no readable consortium.json ({e}); pass the public/ "
                                "directory the operator's `oncofed consortium init` wrote") from None
    expected = normalise_fingerprint(ca_fingerprint)
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ProvisioningError(f"--ca-fingerprint {ca_fingerprint!r}: write the 64 hexadecimal digits of the CA's "
                                "SHA-256 fingerprint as the operator read them out (`oncofed consortium init` "
                                "printed them)")
    ca_path = bundle / "ca.crt"
    try:
        actual = fingerprint(ca_path)
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ProvisioningError(f"{ca_path}: unreadable ({e}); ask the operator for the public/ bundle again") from None
    if actual != expected:
        raise ProvisioningError(f"{ca_path}: its fingerprint {actual} is not the {expected} you were given: this bundle "
                                "is not your consortium's (or the fingerprint was misheard); do not use it, call the "
                                "operator and compare again")
    try:
        ca.public_key().verify(base64.b64decode(record.get(MANIFEST_SIGNATURE) or ""), _manifest_body(record),
                               ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, TypeError, AttributeError):
        raise ProvisioningError(f"{bundle / 'consortium.json'}: not signed by the consortium's CA (the manifest was "
                                "altered, or written by an older `oncofed consortium init`); ask the operator for the "
                                "bundle again") from None
    for file, key in BUNDLE_FILES:
        if not (bundle / file).exists() or fingerprint(bundle / file) != record.get(key):
            raise ProvisioningError(f"{bundle / file}: missing or its SHA-256 differs from consortium.json's {key}: "
                                    "the bundle was altered in transit; ask the operator for it again")
    return record


def init_site(root: str | Path, name: str, consortium_public: str | Path, data_path: str = "",
              budget: float = SITE_BUDGET, min_count: int = MIN_COUNT, *, ca_fingerprint: str, state_dir: str = "",
              allow_second_ledger: bool = False, index: LedgerIndex | None = None) -> SiteConfig:
    """`ca_fingerprint`: the CA's SHA-256 as the operator read it out (never taken from the bundle itself).
    `state_dir`: the site's state directory (default ROOT/state); another site's, to keep its privacy ledger. Refused
    when another site of this machine (`index`, default this account's: privacy/ledger_index.py) whose ledger still
    exists reads the same data, unless that ledger is the one kept or `allow_second_ledger`."""
    root, bundle = Path(root).resolve(), Path(consortium_public)
    record = check_bundle(bundle, ca_fingerprint)
    ca = x509.load_pem_x509_certificate((bundle / "ca.crt").read_bytes())  # check_bundle read it
    now = dt.datetime.now(dt.timezone.utc)
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:  # a site with it could never connect
        raise ProvisioningError(
            f"{bundle / 'ca.crt'}: the consortium's CA is valid from {ca.not_valid_before_utc:%Y-%m-%d} to "
            f"{ca.not_valid_after_utc:%Y-%m-%d}, not at this machine's time {now:%Y-%m-%d %H:%M} UTC; nothing was "
            "written. If the clock is wrong, set it (enable NTP: `timedatectl set-ntp true`); if it is right, this is "
            "an old bundle: ask the operator for the consortium's current public/ bundle")
    if not 0 < budget <= MAX_BUDGET:
        raise ProvisioningError(f"--budget {budget:g}: the site's privacy budget (epsilon) must be positive and at "
                                f"most {MAX_BUDGET:g}, the largest the site's privacy accounting verifies")
    if not name.strip() or name != name.strip() or not name.isprintable() or any(c in name for c in "/\\"):
        raise ProvisioningError(f"--name {name!r}: a site name is printable text without '/' or '\\', not empty and "
                                "not beginning or ending with a space (it names the site in logs, keys and the "
                                "audit), e.g. \"St Mary\" or C0")
    if data_path:
        data = Path(data_path).expanduser().resolve()  # the site runs from any directory: never a relative path
        if not data.is_dir():
            raise ProvisioningError(f"--data {data_path}: {data} is not a directory; give the directory of the "
                                    "hospital's tables (one per modality, and labels), or leave --data out and set "
                                    "data-path in site.json later")
        data_path = str(data)
    from privacy.ledger import LEDGER_FILE  # here: the ledger's accounting (numpy, scipy) is not needed to import pki

    state = _kept_state(state_dir) if state_dir else root / "state"
    index = index if index is not None else LedgerIndex()
    try:
        others = index.reading(data_path, state / LEDGER_FILE)
    except LedgerIndexError as e:
        raise ProvisioningError(f"{e}. Nothing was written") from None
    if others and not allow_second_ledger:
        raise ProvisioningError(_second_ledger(data_path, others))
    existed = root.exists()
    _fresh_dir(root, "site init")  # an existing empty directory (a mount point, one the admin made) is used as it is
    with _removed_on_failure(root, existed, "site init"):
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(root / "keys" / "site.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (root / "keys" / "site.key.pub").write_bytes(public + f" {name}\n".encode())

        (root / "trust").mkdir()
        shutil.copy(bundle / "ca.crt", root / "trust" / "ca.crt")
        shutil.copy(bundle / "signing.pub", root / "trust" / "signing.pub")
        shutil.copy(bundle / "schema.json", root / "trust" / "schema.json")
        try:
            settings = SiteConfig.parse({
                "format": FILE_FORMAT, "site-name": name, "consortium": record["name"], "superlink": record["address"],
                "data-path": data_path, "state-dir": str(state), "model-dir": str(root / "models"),
                "privacy-budget": float(budget), "privacy-delta": PrivacySection.model_fields["delta"].default, "min-count": int(min_count),
                "require-secagg": True, "signing-public-key": str(root / "trust" / "signing.pub"),
                "root-certificates": str(root / "trust" / "ca.crt"),
                "auth-supernode-private-key": str(root / "keys" / "site.key"),
                "schema": str(root / "trust" / "schema.json"), "schema-sha256": record["schema_sha256"],
                "public-key-sha256": fingerprint(root / "keys" / "site.key.pub")},
                source=str(root / "site.json"))
        except SiteConfigError as e:
            raise ProvisioningError(f"{e}. Nothing was written: fix the option it comes from (--name, --data, --budget "
                                    "or --min-count) and run site init again") from None
        settings.write(root / "site.json")
        try:  # before any round: a later site init over the same data sees this one
            index.record(state / LEDGER_FILE, data_path=data_path, site_dir=root)
        except LedgerIndexError as e:
            raise ProvisioningError(f"{e}. Nothing was written") from None
    return settings


def _kept_state(state_dir: str) -> Path:
    """`--state-dir`, checked: a state directory (not a site directory) whose ledger, if it has one, reads."""
    from privacy.accounting import BudgetError
    from privacy.ledger import LEDGER_FILE, read_ledger

    state = Path(state_dir).expanduser().resolve()
    if (state / "site.json").exists():
        try:
            theirs = SiteConfig.load(state / "site.json").state_dir
        except SiteConfigError:
            theirs = "the state-dir in its site.json"
        raise ProvisioningError(f"--state-dir {state_dir}: a site directory, not a state directory; give its state "
                                f"directory ({theirs})")
    if state.exists() and not state.is_dir():
        raise ProvisioningError(f"--state-dir {state_dir}: not a directory; give the state directory whose privacy "
                                "ledger the site keeps (another site's site.json state-dir)")
    if (state / LEDGER_FILE).exists():
        try:
            read_ledger(state / LEDGER_FILE)
        except BudgetError as e:
            raise ProvisioningError(f"--state-dir {state_dir}: {e}. Nothing was written") from None
    return state


def _second_ledger(data_path: str, others: list[OtherLedger]) -> str:
    """site init's refusal of a second ledger over data another ledger of this machine reads: who, and the fixes."""
    return (f"--data {data_path}: another site of this machine reads it: {'; '.join(o.describe() for o in others)}. A "
            "new site here would start an empty privacy ledger and spend these patients' budget again. Nothing was "
            f"written. To keep that spend (a new key, directory or consortium for the same patients), run site init "
            f"again with --state-dir {others[0].state_dir}: the new site keeps that ledger (stop the other site first: "
            "one site of a state directory runs at a time). Only if that data directory now holds other patients, add "
            "--allow-second-ledger instead (a round on patients another ledger holds is still refused)")
