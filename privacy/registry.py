"""The operator's register of sites allowed to connect: `oncofed consortium add-site / list-sites /
remove-site`, wrapping `flwr supernode register / ls / unregister` against the consortium's SuperLink.

Flower's node authentication admits a SuperNode whose public key was registered; the operator's
consortium.json remembers which site each key (and node id) belongs to, and every change goes to
the operator's hash-chained audit log (`CONSORTIUM/audit.jsonl`). The flwr CLI runs with its own
FLWR_HOME under the consortium directory (`flwr/config.toml`: the SuperLink address and CA).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from privacy.audit import AUDIT_FILE, AuditLog
from privacy.pki import ProvisioningError, fingerprint, read_consortium
from privacy.site_config import replace_key_command
from shared_models.files import held_lock, read_json_file, write_json_atomic
from shared_models.flower_tools import QUIET_ENV, flower_tool

CONNECTION = "consortium"


def _record(root: Path) -> dict:
    return read_consortium(root / "consortium.json")


def _save(root: Path, record: dict) -> None:
    write_json_atomic(root / "consortium.json", record)


def flwr_home(root: Path, record: dict | None = None) -> Path:
    """The operator's flwr CLI configuration: one connection to the consortium's SuperLink over TLS (`record`: its
    consortium.json as the caller read it, else read here)."""
    record, home = _record(root) if record is None else record, root / "flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{control_address(record)}"\n'
        f'root-certificates = "{(root / "ca" / "ca.crt").resolve()}"\n')
    return home


def control_address(record: dict) -> str:
    """The SuperLink's own port on the server machine (Control API); sites use the proxy's public address."""
    return record.get("control-address") or record["address"]


def control_address_setting(root: Path) -> str:
    """Where the SuperLink's port is set: the one place the operator changes it (everything reads it from there)."""
    return f'"control-address" in {Path(root) / "consortium.json"} (`oncofed consortium init --internal-port`)'


def foreign_superlink(root: Path) -> str:
    """Why the server at this consortium's control-address is not its SuperLink ("" when that is not known): a TLS
    server whose certificate this consortium's CA did not sign, another consortium's SuperLink on the same port of
    this machine. Flower's own error then says only that the SuperLink is unavailable."""
    from privacy.preflight import foreign_tls_server

    address, ca = control_address(_record(root)), Path(root) / "ca" / "ca.crt"
    if not foreign_tls_server(address, ca):
        return ""
    return (f"the server at {address} is not this consortium's SuperLink (its certificate is not from {ca}): another "
            f"consortium's server on this machine holds the port; each needs a port of its own: set "
            f"{control_address_setting(root)} to a free port (`oncofed server preflight {root}` suggests one), then "
            f"start this consortium's server")


def _flwr(root: Path, *args: str) -> dict:
    env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home(root))}
    try:
        proc = subprocess.run([flower_tool("flwr"), "supernode", *args, CONNECTION, "--format", "json"], env=env,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:  # no flwr in this environment, or a SuperLink that hangs
        raise ProvisioningError(f"`flwr supernode {args[0]}` against {control_address(_record(root))} did not run to "
                                f"its end ({e}); is the consortium's SuperLink running there (`oncofed server "
                                "status`), and is OncoFed's environment's flwr installed?") from None
    try:
        out = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        out = {"success": False, "error-message": (proc.stdout + proc.stderr).strip()[-500:]}
    if proc.returncode != 0 or not out.get("success"):
        if why := foreign_superlink(root):
            raise ProvisioningError(f"`flwr supernode {args[0]}` refused: {why}")
        raise ProvisioningError(f"`flwr supernode {args[0]}` against {control_address(_record(root))} failed: "
                                f"{out.get('error-message', out)}; is the consortium's SuperLink running there "
                                "(`oncofed server start`)?")
    return out


_NEW_SITE_KEY = (f"in its site directory, {replace_key_command('keys/site.key')}, the last line its new "
                 "fingerprint (docs/hospital-guide.md, \"Keys\")")


def _check_site_key(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProvisioningError(f"{path}: not readable ({e.strerror}); give the site.key.pub the hospital sent "
                                "(written by `oncofed site init`)") from None
    if b"PRIVATE KEY" in data[:200]:  # never echoed: the message would copy the secret into logs and terminals
        raise ProvisioningError(
            f"{path}: this is a site's PRIVATE key, not its public key; nothing was registered. A private key must "
            f"never leave the hospital, so this one is compromised: delete every copy of it here, and have the "
            f"hospital make a new key ({_NEW_SITE_KEY}) and send only the .pub (keys/site.key.pub), never the "
            "private key")
    try:
        key = load_ssh_public_key(data.split(b" ", 2)[0] + b" " + data.split(b" ", 2)[1])
    except (ValueError, IndexError, UnsupportedAlgorithm) as e:
        what = "a certificate" if b"-----BEGIN CERTIFICATE" in data[:200] else f"not a public key ({str(e)[:80]})"
        raise ProvisioningError(f"{path}: {what}; expected the site's "
                                "OpenSSH public key (one line `ecdsa-sha2-nistp384 AAAA...`): the site.key.pub "
                                "written by `oncofed site init` and sent by the hospital") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ProvisioningError(f"{path}: a site key must be ECDSA P-384 (Flower's node authentication refuses "
                                "others); ask the site to run `oncofed site init`")
    return data


def _register_lock(root: Path):
    """One add-site or remove-site at a time: each reads consortium.json, waits on the SuperLink, then writes it back
    (two at once lost one's registration)."""
    return held_lock(root / ".register.lock", 300.0, ProvisioningError(
        f"{root}: another add-site or remove-site has held the register for 5 minutes; nothing was changed: try "
        "again when it ends"))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def add_site(root: str | Path, name: str, public_key: str | Path) -> dict:
    """Register a site's key with the SuperLink under `name`. consortium.json records the registration as pending
    before the SuperLink is asked, so a kill in between leaves a trace that the next add-site of the key completes
    (the SuperLink takes a key once: it is then found among the nodes the register does not know)."""
    root, public_key = Path(root), Path(public_key)
    data = _check_site_key(public_key)
    key = fingerprint(data)
    with _register_lock(root):
        record = _record(root)
        pending = next((s for s in record["sites"] if s.get("key_sha256") == key and s.get("pending")), None)
        if any(s["name"] == name and not s.get("removed") and s is not pending for s in record["sites"]):
            raise ProvisioningError(f"site {name!r} is already registered; remove it first to replace its key")
        # Flower refuses a key it has ever registered ("Public key already in use"), a removed site's included:
        # name who holds (or held) it, since the fix is a new key at the hospital
        for s in record["sites"]:
            if s.get("key_sha256") == key and s is not pending:
                raise ProvisioningError(f"{public_key}: this key is (or was) site {s['name']!r}'s"
                                        + (" (removed)" if s.get("removed") else "") + "; the SuperLink never takes a "
                                        f"key twice: the hospital makes a new one ({_NEW_SITE_KEY}) and sends its .pub")
        created = pending is None
        if created:
            pending = {"name": name, "key_sha256": key, "pending": _now()}
            record["sites"].append(pending)
            _save(root, record)
        pending["name"] = name
        try:
            node_id = str(_flwr(root, "register", str(public_key.resolve()))["node-id"])
        except ProvisioningError as e:
            if "already in use" not in str(e):  # the SuperLink answered no (or was not reached): nothing pending
                if created:  # an earlier, cut-short registration keeps its trace: the SuperLink may hold that key
                    record["sites"].remove(pending)
                    _save(root, record)
                raise
            node_id = _interrupted_registration(root, record)
        site = {"name": name, "node_id": node_id, "key_sha256": key, "added": _now()}
        record["sites"][record["sites"].index(pending)] = site
        _save(root, record)
        AuditLog(root / AUDIT_FILE).append("site_added", **site)
        return site


def _interrupted_registration(root: Path, record: dict) -> str:
    """The node id the SuperLink gave a key whose registration was cut short before consortium.json recorded it: the
    one registered node the register does not know (ProvisioningError if not exactly one: the operator resolves it)."""
    known = {s.get("node_id") for s in record["sites"]}
    unknown = [str(n["node-id"]) for n in _flwr(root, "ls").get("nodes", []) if str(n["node-id"]) not in known]
    if len(unknown) != 1:
        raise ProvisioningError(
            f"this key's registration was cut short (consortium.json marks it pending) and the SuperLink holds it, "
            f"but {len(unknown)} registered node(s) are unknown to the register ({', '.join(unknown) or 'none'}), so "
            "its node id cannot be told: unregister them with `flwr supernode unregister NODE_ID consortium` (FLWR_HOME="
            f"{root / 'flwr'}) and have the hospital make a new key")
    return unknown[0]


def read_register(record_file: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """(registered_names, removed_sites) of the operator's consortium.json from one read: a ServerApp's start."""
    record = read_json_file(Path(record_file), ProvisioningError, "run config site-registry must name the "
                            "consortium.json written by `oncofed consortium init`")
    try:  # only the sites are read here: a register whose other keys an edit broke still names them
        names = {str(s["node_id"]): str(s["name"]) for s in record.get("sites", []) if "node_id" in s and "name" in s}
    except (AttributeError, TypeError):
        read_consortium(Path(record_file))  # names the bad key
        raise
    return names, _removed(record)


def registered_names(record_file: str | Path) -> dict[str, str]:
    """{node id: site name} from the operator's consortium.json: the name each node's authentication key was
    registered under (`add-site`; a removed site's too, as its node id is never given again). Flower admits a
    node only with a registered key, so this name, unlike the one a site reports, is authenticated."""
    return read_register(record_file)[0]


def removed_sites(record_file: str | Path) -> dict[str, str]:
    """{node id: when it was removed} of the sites `remove-site` took out of the consortium ({} when there is no
    readable register, as in a simulation): they can no longer connect, so nothing waits for them."""
    try:
        return _removed(read_json_file(Path(record_file), ProvisioningError, ""))
    except ProvisioningError:
        return {}


def _removed(record) -> dict[str, str]:
    try:
        return {str(s["node_id"]): str(s["removed"]) for s in record.get("sites", []) if s.get("removed")
                and "node_id" in s}
    except (AttributeError, TypeError):
        return {}


def list_sites(root: str | Path) -> list[dict]:
    """Registered sites with the SuperLink's view of each (registered, online, offline...)."""
    root = Path(root)
    record = _record(root)
    nodes = {str(n["node-id"]): n for n in _flwr(root, "ls").get("nodes", [])}
    out = []
    for s in record["sites"]:
        if s.get("removed"):
            continue
        if s.get("pending"):
            out.append({**s, "status": "registration cut short: run the same add-site again"})
            continue
        node = nodes.get(s["node_id"], {})
        out.append({**s, "status": node.get("status", "unknown to the SuperLink")})
    return out


UNKNOWN_STATUS = "unknown"  # list-sites with the SuperLink not answering: the register alone says nothing of online


def register_only(root: str | Path) -> list[dict]:
    """The registered sites as consortium.json holds them, each one's status UNKNOWN_STATUS (or its cut-short
    registration): what `list-sites` shows when the SuperLink cannot be asked (the server is down)."""
    return [{**s, "status": "registration cut short: run the same add-site again" if s.get("pending") else
             UNKNOWN_STATUS} for s in _record(Path(root))["sites"] if not s.get("removed")]


def remove_site(root: str | Path, name: str) -> dict:
    """Unregister a site's key. consortium.json marks the removal first, so a kill before it is recorded leaves a
    removal the next remove-site completes (its node already unknown to the SuperLink)."""
    root = Path(root)
    with _register_lock(root):
        record = _record(root)
        site = next((s for s in record["sites"] if s["name"] == name and not s.get("removed") and not s.get("pending")),
                    None)
        if site is None:
            raise ProvisioningError(f"no registered site named {name!r}; see `oncofed consortium list-sites`")
        site["removing"] = _now()
        _save(root, record)
        try:
            _flwr(root, "unregister", site["node_id"])
        except ProvisioningError:
            if site["node_id"] in {str(n["node-id"]) for n in _flwr(root, "ls").get("nodes", [])}:
                raise  # still registered: the error stands
        site.pop("removing")
        site["removed"] = _now()
        _save(root, record)
        AuditLog(root / AUDIT_FILE).append("site_removed", name=name, node_id=site["node_id"],
                                              key_sha256=site.get("key_sha256"))
        return site
