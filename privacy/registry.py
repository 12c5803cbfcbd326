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

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from privacy.audit import AuditLog
from privacy.pki import ProvisioningError, fingerprint
from shared_models.files import read_json_file, write_json_atomic

CONNECTION = "consortium"


def _record(root: Path) -> dict:
    return read_json_file(root / "consortium.json", ProvisioningError,
                          "pass the directory written by `oncofed consortium init`")


def _save(root: Path, record: dict) -> None:
    write_json_atomic(root / "consortium.json", record)


def flwr_home(root: Path) -> Path:
    """The operator's flwr CLI configuration: one connection to the consortium's SuperLink over TLS."""
    record, home = _record(root), root / "flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{control_address(record)}"\n'
        f'root-certificates = "{(root / "ca" / "ca.crt").resolve()}"\n')
    return home


def control_address(record: dict) -> str:
    """The SuperLink's own port on the server machine (Control API); sites use the proxy's public address."""
    return record.get("control-address") or record["address"]


def _flwr(root: Path, *args: str) -> dict:
    env = {**os.environ, "FLWR_HOME": str(flwr_home(root)), "FLWR_TELEMETRY_ENABLED": "0"}
    proc = subprocess.run(["flwr", "supernode", *args, CONNECTION, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=120)
    try:
        out = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        out = {"success": False, "error-message": (proc.stdout + proc.stderr).strip()[-500:]}
    if proc.returncode != 0 or not out.get("success"):
        raise ProvisioningError(f"`flwr supernode {args[0]}` against {control_address(_record(root))} failed: "
                                f"{out.get('error-message', out)}; is the consortium's SuperLink running there "
                                "(`oncofed server start`)?")
    return out


def _check_site_key(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        key = load_ssh_public_key(data.split(b" ", 2)[0] + b" " + data.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError) as e:
        raise ProvisioningError(f"{path}: not an OpenSSH public key ({e}); use the site.key.pub written by "
                                "`oncofed site init`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ProvisioningError(f"{path}: a site key must be ECDSA P-384 (Flower's node authentication refuses "
                                "others); ask the site to run `oncofed site init`")
    return data


def add_site(root: str | Path, name: str, public_key: str | Path) -> dict:
    root, public_key = Path(root), Path(public_key)
    record = _record(root)
    if any(s["name"] == name and not s.get("removed") for s in record["sites"]):
        raise ProvisioningError(f"site {name!r} is already registered; remove it first to replace its key")
    data = _check_site_key(public_key)
    # Flower refuses a key it has ever registered ("Public key already in use"), a removed site's included:
    # name who holds (or held) it, since the fix is a new key at the hospital
    for s in record["sites"]:
        if s.get("key_sha256") == fingerprint(data):
            raise ProvisioningError(f"{public_key}: this key is (or was) site {s['name']!r}'s"
                                    + (" (removed)" if s.get("removed") else "") + "; the SuperLink never takes a "
                                    "key twice: the hospital makes a new one (`ssh-keygen -t ecdsa -b 384 -N '' -f "
                                    "keys/site.key` in its site directory) and sends its .pub")
    out = _flwr(root, "register", str(public_key.resolve()))
    site = {"name": name, "node_id": str(out["node-id"]), "key_sha256": fingerprint(data),
            "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record["sites"].append(site)
    _save(root, record)
    AuditLog(root / "audit.jsonl").append("site_added", **site)
    return site


def registered_names(record_file: str | Path) -> dict[str, str]:
    """{node id: site name} from the operator's consortium.json: the name each node's authentication key was
    registered under (`add-site`; a removed site's too, as its node id is never given again). Flower admits a
    node only with a registered key, so this name, unlike the one a site reports, is authenticated."""
    record = read_json_file(Path(record_file), ProvisioningError, "run config site-registry must name the "
                            "consortium.json written by `oncofed consortium init`")
    return {str(s["node_id"]): str(s["name"]) for s in record.get("sites", []) if "node_id" in s and "name" in s}


def list_sites(root: str | Path) -> list[dict]:
    """Registered sites with the SuperLink's view of each (registered, online, offline...)."""
    root = Path(root)
    record = _record(root)
    nodes = {str(n["node-id"]): n for n in _flwr(root, "ls").get("nodes", [])}
    out = []
    for s in record["sites"]:
        if s.get("removed"):
            continue
        node = nodes.get(s["node_id"], {})
        out.append({**s, "status": node.get("status", "unknown to the SuperLink")})
    return out


def remove_site(root: str | Path, name: str) -> dict:
    root = Path(root)
    record = _record(root)
    site = next((s for s in record["sites"] if s["name"] == name and not s.get("removed")), None)
    if site is None:
        raise ProvisioningError(f"no registered site named {name!r}; see `oncofed consortium list-sites`")
    _flwr(root, "unregister", site["node_id"])
    site["removed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _save(root, record)
    AuditLog(root / "audit.jsonl").append("site_removed", name=name, node_id=site["node_id"])
    return site
