"""Preflight checks before a server or a site starts: each names the file or setting and the fix.

Used by `oncofed server start`, `oncofed site start` and `oncofed run`: the process refuses to start
(exit 2) with every failed check listed, rather than failing later inside Flower with a stack trace.
"""

from __future__ import annotations

import datetime as dt
import errno
import http.client
import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.site_config import host_port, replace_key_command

RENEW_DAYS = 30  # a certificate expiring sooner is reported (not refused)
CERT_NOT_YET_VALID, CERT_HAS_EXPIRED = 9, 10  # OpenSSL's X509_V_ERR_ codes, as ssl.SSLCertVerificationError.verify_code


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but the operator should act soon

    def line(self) -> str:
        mark = "ok  " if self.ok and not self.warning else ("warn" if self.ok else "FAIL")
        return f"  [{mark}] {self.name}: {self.detail}"


class PreflightError(RuntimeError):
    def __init__(self, what: str, checks: list[Check]):
        self.checks = checks
        failed = [c for c in checks if not c.ok]
        super().__init__(f"{what}: {len(failed)} preflight check{'s' if len(failed) > 1 else ''} failed; nothing "
                         "was started\n" + "\n".join(c.line() for c in checks))


def report(what: str, checks: list[Check]) -> str:
    """Raise PreflightError if any check failed; otherwise the printable report."""
    if any(not c.ok for c in checks):
        raise PreflightError(what, checks)
    return f"{what}: preflight passed\n" + "\n".join(c.line() for c in checks)


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def check_ca(path: Path, now: dt.datetime | None = None) -> Check:
    name = f"CA certificate {path}"
    try:
        cert = _load_cert(path)
    except (OSError, ValueError) as e:
        return Check(name, False, f"unreadable ({e}); copy ca.crt from the consortium's public/ bundle again")
    return _validity(name, cert, now or dt.datetime.now(dt.timezone.utc), "the consortium must issue a new CA "
                     "(`oncofed consortium init`) and every site must receive it")


def _validity(name: str, cert: x509.Certificate, now: dt.datetime, fix: str) -> Check:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        return Check(name, False, f"not valid before {start:%Y-%m-%d %H:%M} UTC: check this machine's clock")
    if now > end:
        return Check(name, False, f"expired on {end:%Y-%m-%d} (this machine's time: {now:%Y-%m-%d %H:%M} UTC; if "
                     f"that is wrong, set the clock); {fix}")
    days = (end - now).days
    if days < RENEW_DAYS:
        return Check(name, True, f"valid until {end:%Y-%m-%d}, only {days} days left; {fix}", warning=True)
    return Check(name, True, f"valid until {end:%Y-%m-%d} ({days} days)")


def _san_matches(cert: x509.Certificate, host: str) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in sans.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in [d.lower() for d in sans.get_values_for_type(x509.DNSName)]


def check_server_certificate(cert_path: Path, key_path: Path, ca_path: Path, hosts: list[str],
                             now: dt.datetime | None = None) -> list[Check]:
    """The server certificate: valid now, issued by the CA, SANs cover every host, matches its key."""
    name = f"server certificate {cert_path}"
    try:
        cert, ca = _load_cert(cert_path), _load_cert(ca_path)
    except (OSError, ValueError) as e:
        return [Check(name, False, f"unreadable ({e}); the files `oncofed consortium init` wrote are needed")]
    fix = "issue a new server certificate from the consortium CA (a new `oncofed consortium init` for now)"
    checks = [_validity(name, cert, now or dt.datetime.now(dt.timezone.utc), fix)]
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        checks.append(Check(f"{name} issuer", True, f"signed by the consortium CA {ca_path.name}"))
    except (InvalidSignature, TypeError, ValueError):
        checks.append(Check(f"{name} issuer", False, f"not signed by {ca_path}: the sites trust that CA only, so "
                            f"they would refuse this server; {fix}"))
    missing = [h for h in hosts if not _san_matches(cert, h)]
    checks.append(Check(f"{name} names", not missing,
                        f"covers {', '.join(hosts)}" if not missing else
                        f"has no subjectAltName for {', '.join(missing)}: sites connecting to that name refuse the "
                        f"connection; {fix} with --address naming it"))
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        same = key.public_key().public_numbers() == cert.public_key().public_numbers()
        checks.append(Check(f"server key {key_path}", same, "matches the certificate" if same else
                            "does not match the certificate: restore the key written with it"))
    except (OSError, ValueError, TypeError) as e:
        checks.append(Check(f"server key {key_path}", False, f"unreadable ({e})"))
    return checks


def check_private_key(path: Path, what: str) -> Check:
    """A private key exists and is readable by its owner only."""
    name = f"{what} {path}"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        return Check(name, False, f"missing ({e.strerror})")
    if mode & 0o077:
        return Check(name, False, f"mode {mode:04o} lets others read it: run `chmod 600 {path}` (and consider the "
                     "key compromised if others could log in here)")
    return Check(name, True, f"mode {mode:04o}")


def _new_key(path: Path) -> str:
    # not `oncofed site init` again: it wants an empty directory, and a new one starts an empty privacy ledger,
    # so the site's spent budget would be forgotten
    return (f"make a new key in place, keeping the site directory (its privacy ledger holds the budget already "
            f"spent): {replace_key_command(path)}; send the new .pub to the operator, read them the fingerprint it "
            "printed, and set site.json's public-key-sha256 to it")


def check_site_key(path: Path) -> Check:
    """The site's node-authentication key: owner-only, OpenSSH ECDSA P-384 (what Flower accepts)."""
    c = check_private_key(path, "site key")
    if not c.ok:
        return c
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except OSError as e:  # e.g. root-owned 0600 after `sudo oncofed site init`, the service running as its own user
        return Check(c.name, False, f"cannot be read by this account ({e.strerror}): give the account that runs the "
                     f"site the key (`chown` it to that account, keeping mode 0600)")
    except (ValueError, TypeError) as e:
        return Check(c.name, False, f"not an unencrypted OpenSSH private key ({e}); {_new_key(path)}")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        return Check(c.name, False, f"Flower's node authentication accepts ECDSA P-384 keys only; {_new_key(path)}")
    return Check(c.name, True, f"{c.detail}, ECDSA P-384")


def check_port_free(host: str, port: int, what: str) -> Check:
    name = f"{what} {host_port(host, port)}"
    if not 0 < int(port) < 65536:
        return Check(name, False, f"port {port} is not a TCP port (1-65535); choose one in that range")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):  # a port below 1024 without the privilege to bind it
                return Check(name, False, f"cannot listen there ({e.strerror}): ports below 1024 need root or "
                             "CAP_NET_BIND_SERVICE; choose a port of 1024 or above, or grant the service that capability")
            if e.errno == errno.EADDRNOTAVAIL:
                return Check(name, False, f"cannot listen there ({e.strerror}): {host} is not an address of this "
                             "machine; use one of its addresses, or 0.0.0.0 for all")
            return Check(name, False, f"cannot listen there ({e.strerror}): another process holds it (an OncoFed "
                         "server already running?) or the address is not this machine's")
    return Check(name, True, "free")


def port_in_use(check: Check) -> bool:
    """Whether check_port_free's `check` failed because another process listens on the port (its detail carries the
    bind's strerror)."""
    return not check.ok and os.strerror(errno.EADDRINUSE) in check.detail


def listening_pids(port: int) -> list[int]:
    """Pids of the processes listening on TCP `port` on this machine (those this account can see: another user's are
    not listed without root)."""
    import psutil

    try:
        return [k.pid for k in psutil.net_connections(kind="tcp")
                if k.status == psutil.CONN_LISTEN and k.laddr and k.laddr.port == port and k.pid]
    except (psutil.Error, OSError):
        return []


@dataclass(frozen=True)
class Holder:
    """Who listens on a port: `text` names it; `root` is its consortium's directory when it is part of an OncoFed
    server (its SuperLink, its proxy, or the `oncofed server start` itself, serving /metrics)."""
    text: str
    pid: int | None = None
    root: Path | None = None


def _consortium_of(args: list[str], cwd: Path) -> tuple[str, Path] | None:
    """(what, consortium directory) of an OncoFed server's process, from its command line."""
    def after(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    if (database := after("--database")) and Path(database).name == "superlink.db":
        return "the SuperLink", (cwd / database).resolve().parent.parent
    if (prefix := after("-p")) and Path(prefix).name == "proxy":
        return "the proxy (nginx)", (cwd / prefix).resolve().parent
    if "server" in args and "start" in args[args.index("server"):]:
        rest = [a for a in args[args.index("start", args.index("server")) + 1:] if not a.startswith("-")]
        if rest:
            return "the `oncofed server start`", (cwd / rest[0]).resolve()
    return None


def _cwd(proc) -> Path:
    """A process's working directory; "/" for another user's (a root nginx's workers run as `nobody`), whose
    absolute arguments still name its consortium."""
    import psutil

    try:
        return Path(proc.cwd())
    except psutil.AccessDenied:
        return Path("/")


def port_holder(port: int) -> Holder:
    """Who listens on TCP `port` on this machine: a part of a consortium's server named by its directory, otherwise
    "pid N (its command line)", or a command that names it when this account cannot see it (another user's)."""
    import psutil

    first = None
    for pid in listening_pids(port):
        label = f"pid {pid}"
        try:
            proc = psutil.Process(pid)
            name, command = proc.name(), " ".join(proc.cmdline()) or proc.name()
            label = f"pid {pid} ({command[:160]}{'...' if len(command) > 160 else ''})"
            # nginx's workers hold the listening socket too, with no arguments ("nginx: worker process"): the
            # master that forked them (same program, its parent) has the `-p CONSORTIUM/proxy` that names whose it is
            while proc is not None:
                if found := _consortium_of(proc.cmdline(), _cwd(proc)):
                    return Holder(f"{found[0]} of the consortium at {found[1]} (pid {proc.pid})", proc.pid, found[1])
                parent = proc.parent()
                proc = parent if parent is not None and parent.name() == name else None
        except psutil.Error:
            pass
        first = first or Holder(label, pid)
    return first or Holder(f"another account's process (`sudo ss -ltnp 'sport = :{port}'` names it)")


def free_port_after(port: int, taken: set[int] = frozenset()) -> int:
    """The first port above `port` free on loopback now and not in `taken`: what an error suggests (0: none near)."""
    for candidate in range(port + 1, min(port + 1000, 65536)):
        if candidate in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
        return candidate
    return 0


def https_health(address: str, ca_path: Path, timeout: float = 5.0, path: str = "/health",
                 method: str = "GET") -> int:
    """Status code of a request over TLS verified against the consortium CA (raises OSError/SSLError)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    ctx = ssl.create_default_context(cafile=str(ca_path))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        return conn.getresponse().status
    finally:
        conn.close()


def check_reachable(address: str, ca_path: Path, what: str) -> Check:
    """TLS handshake with the name in `address`, certificate verified against the CA, and /health answers."""
    name = f"{what} https://{address}"
    try:
        status = https_health(address, ca_path)
    except ssl.SSLCertVerificationError as e:
        if e.verify_code in (CERT_NOT_YET_VALID, CERT_HAS_EXPIRED):
            # a right certificate read by a wrong clock fails the same way: say which clock to check first
            now = dt.datetime.now(dt.timezone.utc)
            return Check(name, False, f"TLS certificate refused ({e.verify_message}) at this machine's time "
                         f"{now:%Y-%m-%d %H:%M} UTC: if that time is wrong, set the clock (enable NTP: `timedatectl "
                         "set-ntp true`); if it is right, the operator must renew the server's certificate")
        return Check(name, False, f"TLS certificate refused ({e.verify_message}): the server's certificate is not "
                     f"from the CA in {ca_path} or does not name {address.rpartition(':')[0]}")
    except (OSError, ssl.SSLError) as e:
        return Check(name, False, f"unreachable ({e}); check the address, that the server is started "
                     "(`oncofed server start`) and that outbound HTTPS to it is allowed")
    except http.client.HTTPException as e:  # TLS, but not HTTPS (e.g. a gRPC port)
        return Check(name, False, f"answers TLS but not HTTPS ({type(e).__name__}); check the port: the server's "
                     "public address (the TLS proxy's), as consortium.json's address says")
    if status != 200:
        return Check(name, False, f"/health answered {status}")
    return Check(name, True, "TLS verified against the consortium CA, /health 200")


def foreign_tls_server(address: str, ca_path: Path) -> bool:
    """Whether a TLS server answers at `address` with a valid certificate the CA at `ca_path` did not sign (not one
    merely expired or not yet valid, and not a server that does not answer)."""
    try:
        https_health(address, ca_path)
    except ssl.SSLCertVerificationError as e:
        return e.verify_code not in (CERT_NOT_YET_VALID, CERT_HAS_EXPIRED)
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False
    return False


def check_signing_key(private_path: Path, trusted_public_path: Path) -> Check:
    """The model-signing key is the one whose public half the sites trust (the consortium's public/
    signing.pub, which every site copied at `site init`): checked before a run starts, because a model
    signed with any other key is refused by every site after they have spent their privacy budget on it."""
    from privacy.signing import SignatureError, load_private, load_public

    name = f"model-signing key {private_path}"
    try:
        key = load_private(private_path)
    except SignatureError as e:
        return Check(name, False, str(e))
    try:
        trusted = load_public(trusted_public_path)
    except SignatureError as e:
        return Check(name, False, f"cannot compare with the sites' trust anchor: {e}")
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if key.public_key().public_bytes(*raw) != trusted.public_bytes(*raw):
        return Check(name, False, f"is not the key the sites trust ({trusted_public_path}, which they copied at "
                     "`oncofed site init`): every site would refuse the model after training on it; use the "
                     "consortium's signing/signing.key (drop --set signing-key)")
    return Check(name, True, f"mode 0600, its public key is the sites' trust anchor {trusted_public_path.name}")
