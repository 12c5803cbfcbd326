"""`oncofed serve --site-config site.json`: the global model as a local REST service at the site.

    POST /v1/predict          JSON patients, features grouped by modality (any modality may be missing)
    POST /v1/predict/file     multipart upload of site-layout tables (one file per modality, CSV/TSV/Parquet)
    GET  /v1/model            the active model: version, run, round, SHA-256, signature, metrics, epsilon
    GET  /v1/models           installed versions          (admin)
    POST /v1/models/activate  {"version": "v0002"}        (admin; "rollback": the previous version)
    GET  /metrics             Prometheus                  (monitoring or admin)
    GET  /health, GET / (the web page)

Access: bearer tokens with a role (clinician: predict and read; admin: also model management and /metrics;
monitoring: /metrics only, for a Prometheus scraper), stored as SHA-256 hashes in STATE_DIR/serve-tokens.json
(`oncofed serve token add`). Every prediction is appended to the site's hash-chained audit log with a salted hash
of the patient id, the model version and the time, never feature values; refused tokens are audited too
(FailedLogins). Only requests whose Host is a name the service answers to are served (TrustedHosts: DNS
rebinding). A newly delivered (or activated) model is picked up without a restart: the store's ACTIVE file is
watched (every ACTIVE_WATCH_S, and before each request batch) and a new version loads in the background. A site
with no model yet serves too: /health and predictions answer 503 "waiting for the first model" until one is installed.
"""


import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from client.model_store import NoModelInstalled
from client.predict import Predictor, format_predictions
from client.serve_queue import ExplanationLane, ModelQueue
from client.serve_routes import model_routes, offline_docs, operations_routes, prediction_routes
from client.site import MIN_NORMALISATION_PATIENTS
from privacy.audit import AUDIT_FILE, AuditError, AuditLog
from privacy.site_config import SiteConfig
from shared_models.files import atomic_file, held_lock
from shared_models.site_data import NORMALIZER_FILE

# /metrics counts the predictions per class: around one request, that is the patient's predicted type. So it
# takes a token of a role that may see every prediction's class anyway (admin), or of one that may do
# nothing else (monitoring, for a Prometheus scraper's bearer_token_file), never a clinician's.
ROLES = {"clinician": {"predict", "read"}, "admin": {"predict", "read", "manage", "monitor"}, "monitoring": {"monitor"}}
TOKENS_FILE = "serve-tokens.json"
EXPLAIN_QUEUE_BODIES = 4  # waiting explanation requests hold at most this many maximal bodies' bytes
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the names of this machine a Host header may carry
FAILED_LOGIN_WINDOW_S = 60.0
# how often the service looks at the model store's ACTIVE file without a request (one stat): a delivered model was
# loaded only when a request came, and that request and /health still answered with the old one
# (docs/hospital-guide.md promises the new one within 2 s: this, plus a load's ~0.3 s)
ACTIVE_WATCH_S = 1.0

log = logging.getLogger(__name__)


class AuditUnwritable(Exception):
    """The audit log cannot take an entry: what needs one is not done, and the answer (503) names the file and
    the fix."""

    def __init__(self, path: Path, error: Exception):
        if isinstance(error, AuditError):  # a broken chain: its message names the file and what to do
            message = str(error)
        else:
            message = (f"the audit log {path} cannot be written ({getattr(error, 'strerror', None) or error}): "
                       f"free space on its disk (or let the service's account write to {path.parent}); nothing "
                       "that needs an audit entry is done until it can be written")
        super().__init__(message)


def host_name(value: str) -> str:
    """A host name or address as a Host header carries it (lower case, an IPv6 address in brackets); ValueError
    for anything else (a port, a scheme, a path)."""
    name = value.strip().lower()
    try:
        address = ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", name):
            raise ValueError(f"{value!r}: a host name or address, without scheme or port (the name your TLS proxy "
                             "forwards in the Host header, e.g. oncofed.hospital.example)") from None
        return name
    return f"[{address}]" if address.version == 6 else str(address)


def allowed_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The Host names `oncofed serve --host HOST --allowed-host NAME...` answers to: this machine's, the bound
    address, and the names given (a TLS proxy's)."""
    return list(dict.fromkeys([*LOCAL_HOSTS, host_name(host), *(host_name(h) for h in extra)]))


class TrustedHosts:
    """ASGI middleware: requests whose Host header names none of `hosts` are refused (400) before anything else
    runs. A page on another site whose name an attacker points at 127.0.0.1 (DNS rebinding) reaches the service
    from the clinician's browser, but with its own name as Host. (Starlette's TrustedHostMiddleware cuts the Host
    at its first ':', so '[::1]:8088' never matches.)"""

    def __init__(self, app, hosts: Sequence[str], on_refused=lambda: None):
        self.app, self.hosts, self.on_refused = app, frozenset(hosts), on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
        name = header[:header.find("]") + 1] if header.startswith("[") else header.split(":")[0]
        if name in self.hosts:
            return await self.app(scope, receive, send)
        self.on_refused()
        body = json.dumps({"detail": f"Host {header!r} is not a name this service answers to; if it is the name your "
                           "TLS proxy forwards, start it with `oncofed serve --allowed-host NAME`"}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class FailedLogins:
    """Refused requests, audited per client address and refusal (reason, path, token name) per window (a minute):
    the first at once; the others counted, and written as one entry with their `count` and `first`/`last` times
    when the window closes or with the service's next audit entry. 1,000 bad tokens in 6 s wrote and fsynced
    1,000 entries (330 KB, on the event loop); now two, and the log still counts every refusal."""

    KEY = ("client", "reason", "path", "token")

    def __init__(self, window_s: float, clock=time.monotonic):
        self.window_s, self.clock = window_s, clock
        self._windows: dict[tuple, dict] = {}  # key -> {"opened", "fields", "count", "first", "last"}
        self._lock = threading.Lock()  # refusals on the event loop, writes in the queues' threads too

    def refused(self, fields: dict) -> bool:
        """Count one refusal; True if it opens a window (write it now), else it waits in the window's count."""
        key, now = tuple(fields.get(k) for k in self.KEY), self.clock()
        with self._lock:
            w = self._windows.get(key)
            if w is not None and now - w["opened"] < self.window_s:
                w["first"] = w["first"] or _utc_now()
                w["count"], w["last"] = w["count"] + 1, _utc_now()
                return False
            if w is None or not w["count"]:  # (a closed window's count stays until it is written)
                self._windows[key] = {"opened": now, "fields": dict(fields), "count": 0, "first": None, "last": None}
            else:
                w["opened"] = now
            return True

    def due(self, everything: bool = False) -> list[dict]:
        """The counts of the windows that closed (`everything`: of all), as entries; taken out of the windows."""
        out, now = [], self.clock()
        with self._lock:
            for key, w in list(self._windows.items()):
                closed = now - w["opened"] >= self.window_s
                if w["count"] and (closed or everything):
                    out.append({**w["fields"], "count": w["count"], "first": w["first"], "last": w["last"]})
                    w["count"], w["first"] = 0, None
                if closed and not w["count"]:
                    del self._windows[key]
        return out

    def restore(self, entries: list[dict]) -> None:
        """Entries that could not be written: counted again, for a later write."""
        with self._lock:
            for e in entries:
                key = tuple(e.get(k) for k in self.KEY)
                w = self._windows.setdefault(key, {"opened": self.clock(), "fields": {k: e.get(k) for k in self.KEY},
                                                   "count": 0, "first": None, "last": None})
                at = e.get("first") or _utc_now()
                w["first"] = min(w["first"] or at, at)
                w["last"] = max(w["last"] or at, e.get("last") or at)
                w["count"] += e.get("count", 1)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware, the one size limit: a declared Content-Length over the limit is refused before
    anything is read, and the bytes actually received are counted, so a chunked body is stopped too.
    Answers 413 if nothing was sent yet; `on_refused()` is called for each refusal (metrics)."""

    def __init__(self, app, limit: int, on_refused=lambda: None):
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def _refuse(self, send, detail: str) -> None:
        self.on_refused()
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, f"request body {int(declared)} bytes exceeds {self.limit}")
        total, started = 0, False

        async def counted():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    raise BodyTooLarge()
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, f"request body exceeds {self.limit} bytes")


class TokenStore:
    """Bearer tokens, kept only as SHA-256 hashes (they are 256-bit random: no slow hash needed)."""

    def __init__(self, path: Path):
        self.path = path
        self._cache: tuple[float, int, list[dict]] | None = None

    def _read(self) -> list[dict]:
        """Re-read when the file changes (a revocation applies to the next request, no restart)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if self._cache is None or self._cache[:2] != (st.st_mtime_ns, st.st_size):
            self._cache = (st.st_mtime_ns, st.st_size, self._parse())
        return self._cache[2]

    def _parse(self) -> list[dict]:
        try:
            return list(json.loads(self.path.read_text())["tokens"])
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: not a readable token file ({e}); restore it from a backup, or move it "
                             "away and issue the tokens again (`oncofed serve token add`)") from None

    def list(self) -> list[dict]:
        """Name, role and creation time of each token (never the hash)."""
        return [{k: t.get(k) for k in ("name", "role", "created")} for t in self._read()]

    @contextmanager
    def _changing(self):
        """The tokens, read under an exclusive lock, for one change (add, revoke): two commands at once would each
        write back the list it read, and a revocation could be undone. Written 0600, atomically."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a site that never started has no state/
        with held_lock(self.path.with_name(self.path.name + ".lock"), 30.0,
                       ValueError(f"{self.path}: another token command has held it for 30 s; try again")):
            tokens = self._parse()
            yield tokens
            with atomic_file(self.path, owner_only=True) as out:
                json.dump({"format": "oncofed-serve-tokens/1", "tokens": tokens}, out, indent=1)
                out.write("\n")

    def add(self, name: str, role: str, replace: bool = False) -> str:
        if role not in ROLES:
            raise ValueError(f"--role {role!r}: one of {', '.join(ROLES)}")
        with self._changing() as tokens:
            if not replace and any(t["name"] == name for t in tokens):
                raise ValueError(f"a token named {name!r} exists; pass --replace to revoke it and issue a new one, "
                                 "or choose another --name")
            tokens[:] = [t for t in tokens if t["name"] != name]
            token = "ofd_" + secrets.token_urlsafe(32)
            tokens.append({"name": name, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest(),
                           "created": time.time()})
        return token

    def revoke(self, name: str) -> bool:
        if not any(t["name"] == name for t in self._parse()):
            return False  # nothing to change: the file is not rewritten
        with self._changing() as tokens:
            before = len(tokens)
            tokens[:] = [t for t in tokens if t["name"] != name]
            return len(tokens) < before

    def lookup(self, token: str) -> dict | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for t in self._read():
            if hmac.compare_digest(t["sha256"], digest):
                found = t
        return found


def patient_hash(site_salt: str, patient_id: str) -> str:
    # (surrogatepass: an id the input checks missed still gets its hash, never an error that fails its whole batch)
    return hmac.new(site_salt.encode(), patient_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]


def _site_salt(state_dir: Path) -> str:
    salt_file = state_dir / "patient-id-salt"
    if not salt_file.exists():
        fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
    return salt_file.read_text().strip()


def prediction_entry(salt: str, who: str, version: str, ids: list[str], predicted: list[str],
                     via: str) -> tuple[str, dict]:
    """The audit entry of one answered request: who, which model, salted patient hashes, the classes."""
    return ("prediction", {"token": who, "via": via, "model_version": version, "patients": len(ids),
                           "patient_sha": [patient_hash(salt, i) for i in ids], "predicted": list(predicted)})


class Metrics:
    """Requests, predictions and the audit log's cost. The disk's share of a commit: the commit seconds
    (write + fsync of the lines, before answering), the deferred head writes, and the fsyncs by file;
    fsyncs per commit = rate(oncofed_serve_audit_fsyncs_total) / rate(oncofed_serve_audit_commit_seconds_count)."""

    def __init__(self, audit: AuditLog):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("oncofed_serve_requests", "requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("oncofed_serve_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.predictions = Counter("oncofed_serve_predictions", "predictions per class", ["predicted"], registry=r)
        self.errors = Counter("oncofed_serve_errors", "requests refused or failed", ["endpoint", "reason"], registry=r)
        self.waiting = Gauge("oncofed_serve_queue_patients", "patients waiting, by queue", ["queue"], registry=r)
        disk = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
        self.audit_commit = Histogram("oncofed_serve_audit_commit_seconds", "audit group commit of answered batches "
                                      "(lines written and fsynced before answering)", ["queue"], registry=r,
                                      buckets=disk)
        self.audit_head = Histogram("oncofed_serve_audit_head_seconds", "audit head writes deferred to idle moments "
                                    "(off the request path)", registry=r, buckets=disk)
        r.register(_AuditFsyncs(audit))


class _AuditFsyncs:
    """Collector: the audit log's fsyncs in this process by file (log, head, directory), read at each scrape."""

    def __init__(self, audit: AuditLog):
        self.audit = audit

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("oncofed_serve_audit_fsyncs", "fsyncs by the audit log, by file", labels=["file"])
        for what, n in self.audit.fsyncs.items():
            family.add_metric([what], n)
        yield family


class RequestMetrics:
    """ASGI middleware: count and time every request by route (paths are client-chosen: routes only)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def tracked(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class Site:
    """What the routes share: the model, tokens, audit log, limits, queues and metrics."""

    def __init__(self, settings: SiteConfig, audit_predictions: bool, max_body_bytes: int | None):
        self.limits = settings.serve
        if max_body_bytes is not None:
            self.limits = self.limits.model_copy(update={"max_body_mb": max_body_bytes / (1024 * 1024)})
        self.max_body_bytes = int(self.limits.max_body_mb * 1024 * 1024)
        self.state_dir = Path(settings.state_dir)
        self.audit = AuditLog(self.state_dir / AUDIT_FILE)
        # (before the model: a fallback at load is audited through `record`)
        self.failed_logins = FailedLogins(FAILED_LOGIN_WINDOW_S)
        self.predictor = Predictor.for_site(settings, on_fallback=self._fell_back, load_active=False)
        try:
            self.predictor.refresh()
        except NoModelInstalled:  # a site before its first delivery: served from the moment one is installed
            pass
        self.tokens = TokenStore(self.state_dir / TOKENS_FILE)
        self.salt = _site_salt(self.state_dir)
        self.audit_predictions = audit_predictions
        self.metrics = Metrics(self.audit)
        self.predictions = ModelQueue("model", self.predictor, format_predictions, partial(self._commit, "model"),
                                      idle=self.write_head, capacity=self.limits.queue_patients,
                                      window_s=self.limits.batch_window_ms / 1000)
        # explanation requests: answered whole in a child process (default) or a thread, on CPU time the
        # predictions leave (client/explain_process.py)
        if self.limits.explanations == "process":
            from client.explain_process import ExplainProcess

            explainer = ExplainProcess(settings.model_dir, self.state_dir / NORMALIZER_FILE,
                                       settings.signing_public_key or None, self.limits)
        else:
            from client.explain_process import InProcess

            explainer = InProcess(self.predictor, self.limits)
        self.explanations = ExplanationLane(explainer, self._commit_explained, idle=self.write_head,
                                            capacity=self.limits.explain_queue_patients,
                                            max_bytes=EXPLAIN_QUEUE_BODIES * self.max_body_bytes,
                                            background=self.limits.explanations == "thread")

        self.metrics.waiting.labels("predictions").set_function(lambda: self.predictions.waiting)
        self.metrics.waiting.labels("explanations").set_function(lambda: self.explanations.waiting)

        # small JSON prediction requests: parsed and checked in a child process (client/input_process.py)
        if self.limits.input_check == "process":
            from client.input_process import InputProcess

            self.input_check = InputProcess(self.limits)
        else:
            self.input_check = None

    def record(self, items: list[tuple[str, dict]], *, head: bool = True, everything: bool = True) -> list[dict]:
        """Entries into the audit log, after the refusals counted since the last write (FailedLogins; `everything`
        False: only those whose window closed), all or none of them; AuditUnwritable if the log cannot take them."""
        counted = self.failed_logins.due(everything)
        if not counted and not items:
            return []
        try:
            return self.audit.append_many([("login_failed", e) for e in counted] + items, head=head)[len(counted):]
        except (AuditError, OSError) as e:
            self.failed_logins.restore(counted)
            raise AuditUnwritable(self.audit.path, e) from None

    def write_failed_logins(self, everything: bool = False) -> None:
        """The counts of the refusal windows that closed (`everything`: at shutdown, all)."""
        try:
            self.record([], everything=everything)
        except AuditUnwritable as e:
            log.warning("%s", e)

    def _fell_back(self, entry: dict) -> None:
        try:
            self.record([("model_fallback", entry)])
        except AuditUnwritable as e:  # the loader thread that falls back drops what it raises: said here
            log.warning("the fallback to %s is not in the audit log: %s", entry.get("serving"), e)
            raise

    def _commit(self, queue: str, done: list) -> None:
        """The answered batches' entries, durable before they are answered; the head follows at `write_head`."""
        self._audit_answers(queue, [(job, version, [r["id"] for r in rows], [r["predicted"] for r in rows])
                                    for job, version, rows in done])

    def _commit_explained(self, job, out: dict) -> None:
        """An explanation request's entry (client/serve_queue.py ExplanationLane), durable before its answer."""
        self._audit_answers("explain", [(job, out["version"], out["ids"], out["predicted"])])

    def _audit_answers(self, queue: str, answered: list) -> None:
        for *_, predicted in answered:
            for c in predicted:
                self.metrics.predictions.labels(c).inc()
        if self.audit_predictions:
            t0 = time.perf_counter()
            self.record([prediction_entry(self.salt, job.who["name"], version, ids, predicted, job.extra["via"])
                         for job, version, ids, predicted in answered], head=False)
            self.metrics.audit_commit.labels(queue).observe(time.perf_counter() - t0)

    def write_head(self) -> None:
        """The audit head the commits deferred: when a queue is idle, and at shutdown."""
        t0 = time.perf_counter()
        if self.audit.write_head():
            self.metrics.audit_head.observe(time.perf_counter() - t0)

    def current(self, wait: bool = False):
        """The model to score this request with (a newly activated version is picked up here). On the event loop
        (`wait` False) a new version loads in a thread and the current one answers until it is ready; a route that
        runs in a worker thread may wait for it."""
        from fastapi import HTTPException

        try:
            self.predictor.refresh(wait=wait)
        except NoModelInstalled as e:
            raise HTTPException(503, f"waiting for the first model: {e}; it is served once installed, without a "
                                "restart", headers={"Retry-After": "60"}) from None
        except Exception as e:  # noqa: BLE001 - nothing verifies: the service answers, but refuses to guess
            if self.predictor.current is None:
                raise HTTPException(503, f"no usable model: {e}") from None
        if self.predictor.current is None:  # the first model installed, loading in the background
            raise HTTPException(503, "waiting for the first model: it was installed and is being loaded; retry in a "
                                "second", headers={"Retry-After": "1"})
        return self.predictor.current


def _auth(site: Site):
    """Dependency factory: the bearer token's entry if its role may `permission`; failures are audited
    (FailedLogins: the first of a kind per client and minute at once, the rest counted)."""
    from fastapi import HTTPException, Request

    def refuse(request: Request, status: int, reason: str, detail: str, name: str | None = None):
        route = request.scope.get("route")  # its path, a fixed set (the URL's is the client's spelling)
        path = route.path if route is not None else request.url.path
        site.metrics.errors.labels(path, "unauthenticated" if status == 401 else "forbidden").inc()
        fields = {"reason": reason, "path": path, "client": request.client.host if request.client else None,
                  "token": name}
        if site.failed_logins.refused(fields):
            try:
                site.record([("login_failed", fields)])
            except AuditUnwritable as e:  # the refusal stands; its count waits for a later write
                site.failed_logins.restore([fields])
                site.metrics.errors.labels(path, "audit_unwritable").inc()
                log.warning("%s", e)
        raise HTTPException(status, detail, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    def role(permission: str):
        async def check(request: Request) -> dict:
            header = request.headers.get("authorization", "")
            if not header.lower().startswith("bearer "):
                refuse(request, 401, "no bearer token", "missing bearer token: send 'Authorization: Bearer <token>' "
                       "(tokens come from `oncofed serve token add`)")
            entry = site.tokens.lookup(header[7:].strip())
            if entry is None:
                refuse(request, 401, "unknown or revoked token", "unknown or revoked token")
            if permission not in ROLES.get(entry["role"], ()):
                refuse(request, 403, f"role {entry['role']} may not {permission}",
                       f"role {entry['role']!r} may not {permission}", entry["name"])
            return entry
        return check
    return role


def create_app(settings: SiteConfig, *, audit_predictions: bool = True, threads: int = 1,
               max_body_bytes: int | None = None, hosts: Sequence[str] | None = None):
    """The service for one site (site.json's settings): its state, the middleware, then the routes by group
    (client/serve_routes.py). `hosts`: the Host names it answers to (`allowed_hosts`, as `oncofed serve` passes
    them); None: any (in-process callers, such as the tests' client, which no browser reaches)."""
    import asyncio
    import gc

    import torch
    from anyio import to_thread
    from fastapi import FastAPI

    torch.set_num_threads(threads)  # each queue's thread runs the model on one core
    site = Site(settings, audit_predictions, max_body_bytes)
    docs = site.limits.api_docs

    @asynccontextmanager
    async def lifespan(app):
        if site.input_check is not None:
            await site.input_check.start()  # its imports overlap the service's start

        async def close_windows():  # refusals counted in a window that closed with no audit write since
            while True:
                await asyncio.sleep(site.failed_logins.window_s / 12)
                await to_thread.run_sync(site.write_failed_logins)

        async def watch_active():  # a delivered model is loaded without waiting for a request to ask
            while True:
                await asyncio.sleep(ACTIVE_WATCH_S)
                try:
                    site.predictor.refresh(wait=False)  # one stat; a new version loads in a thread
                except Exception:  # noqa: BLE001 - kept in the predictor's state, which /health reports
                    pass

        closing, watching = asyncio.create_task(close_windows()), asyncio.create_task(watch_active())
        yield
        closing.cancel()
        watching.cancel()
        site.write_failed_logins(everything=True)
        site.write_head()  # stopped: the audit head records every committed entry
        site.explanations.explainer.close()
        if site.input_check is not None:
            site.input_check.stop()

    app = FastAPI(title="OncoFed site prediction service", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None, lifespan=lifespan)
    app.add_middleware(RequestMetrics, metrics=site.metrics)
    # the one size limit, outermost: a fixed metrics label (paths are client-chosen)
    app.add_middleware(BodyLimit, limit=site.max_body_bytes,
                       on_refused=lambda: site.metrics.errors.labels("any", "too_large").inc())
    if hosts is not None:  # outermost: a foreign Host is refused before anything is read
        app.add_middleware(TrustedHosts, hosts=hosts,
                           on_refused=lambda: site.metrics.errors.labels("any", "untrusted_host").inc())
    role = _auth(site)
    prediction_routes(app, site, role)
    model_routes(app, site, role)
    operations_routes(app, site, role)
    if docs:
        offline_docs(app)
    app.state.predictor = site.predictor
    app.state.site = site
    gc.freeze()  # the loaded model, schema and libraries: never rescanned by the collector (shorter pauses)
    # a request allocates thousands of short-lived objects: collect the young generation every 50,000
    # allocations instead of 700 (in three one-off pairs at 16 connections: as fast or faster, p99 as low or lower)
    gc.set_threshold(50_000, 10, 10)
    return app




# A new hospital's normalisation is refused when the model, scored with it on the hospital's labelled patients, is
# surely (the 95% interval's upper end) this far below the accuracy its package reports on the training hospitals'
# held-out parts. Chosen with benchmarks/new_site_case_mix.py on those held-out parts (docs/results.md): cohorts of
# 5 or more types with none above 30% came within 0.03 of the package's accuracy, 1-3 types or one type at half
# the patients fell 0.15-0.78 below it.
CASE_MIX_MARGIN = 0.10
CASE_MIX_EVIDENCE = ("on the training hospitals' held-out patients, normalised on cohorts of 1 / 3 / 5 / all types, "
                     "the main job's model answered 6% / 64% / 82% / 85% correctly (docs/results.md)")


def fit_normalizer(settings: SiteConfig, data_dir: Path, schema_path: Path | None = None, unlabelled: bool = False
                   ) -> tuple[Path, int, list[str]]:
    """A new hospital: fit the normalisation on its own patients, for the active model's schema.

    The tables are held to the prediction contract (the checks a training site's tables get: foreign tables,
    duplicate ids, non-numbers are refused, PredictionInputError) and need at least MIN_NORMALISATION_PATIENTS patients.
    A feature observed in fewer keeps the normalisation saved before (none: unscaled), and the returned notes
    name its modality. The model reads each feature against the mix of cancer types a training hospital sees, so
    normalising on patients of one or a few types removes what tells them apart: with a labels table in the
    directory, the active model is scored with the new normalisation on those patients and the fit is refused
    (`case_mix`) when it answers far worse than on the training hospitals (CASE_MIX_MARGIN); without one it is
    refused (`case_mix_unchecked`) unless `unlabelled` says the patients span the types. Nothing is written unless
    the fit is accepted. Returns (path, patients, notes)."""
    import numpy as np

    from client.model_store import NORMALIZER, VERSION_SCHEMA, ModelStore
    from client.prediction_input import PredictionInputError, ServeSettings, check_frames, table_frames
    from shared_models.schema import FeatureSchema
    from shared_models.site_data import Normalizer, TableError, numeric_columns, scaled_columns

    store = ModelStore(settings.model_dir)
    active = store.active()
    if schema_path is None and active is None:
        raise ValueError(f"{settings.model_dir}: no model installed; pass --schema")
    schema = FeatureSchema.load(schema_path or store.root / active / VERSION_SCHEMA)
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data {data_dir}: not a directory of tables (one per modality, named after it)")
    frames, problems = table_frames(schema, Path(data_dir))
    errors = [p for p in problems if p.get("severity") != "warning"]
    ids, raw = [], None
    if frames:
        ids, raw, more, _ = check_frames(schema, frames, ServeSettings(max_patients=10**9))
        errors += more
    if errors:
        raise PredictionInputError(errors)
    if len(ids) < MIN_NORMALISATION_PATIENTS:
        raise PredictionInputError([{"loc": str(data_dir), "code": "too_few_patients",
                                     "msg": f"{len(ids)} patients: the normalisation needs at least {MIN_NORMALISATION_PATIENTS} to "
                                            "estimate each feature's mean and spread",
                                     "fix": "fit it on more of the hospital's patients"}])
    fitted = Normalizer.fit(schema, raw)
    path = Path(settings.state_dir) / NORMALIZER_FILE
    try:
        before = Normalizer.load(path, schema) if path.exists() else None
    except (TableError, ValueError):
        before = None  # another schema's, or unreadable: replaced
    cols = scaled_columns(schema)
    thin = cols[(~np.isnan(raw[:, cols])).sum(axis=0) < MIN_NORMALISATION_PATIENTS]
    mean, scale = fitted.mean.copy(), fitted.scale.copy()
    mean[thin], scale[thin] = (before.mean[thin], before.scale[thin]) if before is not None else (0.0, 1.0)
    layout, notes = schema.layout(), []
    for m in schema.modalities:
        sl = layout.slices[m.name]
        n = int(((thin >= sl.start) & (thin < sl.stop)).sum())
        if n:
            notes.append(f"{m.name}: {n} feature{'s' if n > 1 else ''} with fewer than {MIN_NORMALISATION_PATIENTS} patients' "
                         + ("values keep the normalisation fitted before" if before is not None
                            else "values are not scaled (no normalisation was fitted before)"))
    # the unscaled columns' spreads by the same rule: from enough patients, else the one kept before (or none)
    unscaled = numeric_columns(schema, standardized=False)
    thin_u = (~np.isnan(raw[:, unscaled])).sum(axis=0) < MIN_NORMALISATION_PATIENTS
    u_mean, u_scale = fitted.unscaled_mean.copy(), fitted.unscaled_scale.copy()
    u_mean[thin_u], u_scale[thin_u] = ((before.unscaled_mean[thin_u], before.unscaled_scale[thin_u])
                                       if before is not None else (np.nan, np.nan))
    normalizer = Normalizer(schema, mean, scale, (u_mean, u_scale))
    notes += _case_mix_notes(store, active, schema, normalizer, Path(data_dir), ids, raw, unlabelled)
    normalizer.save(path)
    if active is not None and (store.root / active / NORMALIZER).is_file():
        notes.append(f"the active model {active} keeps the normalisation of the run that trained it at this site and "
                     "is served with it; this fit serves models installed without one")
    return path, len(ids), notes


def _case_mix_notes(store, active: str | None, schema, normalizer, data_dir: Path, ids: list[str], raw,
                    unlabelled: bool) -> list[str]:
    """fit_normalizer's case-mix check: raises PredictionInputError (`case_mix`, `case_mix_unchecked`) or returns
    notes on what it measured."""
    import numpy as np
    import torch

    from client.calibration import labelled_rows, read_labels
    from client.model_store import WEIGHTS
    from client.prediction_input import PredictionInputError
    from privacy.membership import wilson_upper
    from shared_models.weights import load_weights

    try:
        read = read_labels(schema, data_dir)
    except ValueError as e:
        raise PredictionInputError([{"loc": str(data_dir), "code": "labels", "msg": str(e),
                                     "fix": "correct the labels table, or move it out of the directory and pass "
                                            "--unlabelled"}]) from None
    if read is None:
        if unlabelled:
            return ["no labels: the case mix of these patients was not checked (--unlabelled)"]
        raise PredictionInputError([{"loc": str(data_dir), "code": "case_mix_unchecked",
                                     "msg": "no labels table, so whether these patients span the cancer types the "
                                            "model tells apart cannot be checked; normalised on patients of one or "
                                            f"a few types the model loses what tells them apart ({CASE_MIX_EVIDENCE})",
                                     "fix": "add labels.csv with each patient's diagnosis (read only for this check), "
                                            "or pass --unlabelled if the patients are a general cancer hospital's mix "
                                            "of types, none of them most of the patients"}])
    rows, y = labelled_rows(schema, read[0], ids)
    package = store.package(active) if active is not None else {}
    reference = (package.get("metrics") or {}).get("accuracy")
    if not rows or reference is None:
        return ["the case mix was not checked: " + ("no patient has a label of the schema's classes" if not rows else
                                                    "no installed model reports its accuracy")]
    model = load_weights(store.root / active / WEIGHTS, schema).eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(normalizer.transform(raw[rows]))).argmax(1).numpy()
    n, right = len(y), int((predicted == y).sum())
    p, upper = right / n, wilson_upper(right, n)  # docs/results.md: the 95% (Wilson) interval's upper end
    counts = np.bincount(y)
    mix = (f"{int((counts > 0).sum())} type(s), the largest {schema.classes[int(counts.argmax())]} "
           f"{counts.max() / n:.0%} of the {n} labelled patients")
    if upper < reference - CASE_MIX_MARGIN:
        raise PredictionInputError([{
            "loc": str(data_dir), "code": "case_mix",
            "msg": f"with this normalisation model {active} answers {p:.0%} of these patients correctly against "
                   f"{reference:.0%} on the training hospitals' held-out patients; they are {mix}: normalised on "
                   f"patients of one or a few types, the model loses what tells those types apart ({CASE_MIX_EVIDENCE})",
            "fix": "fit on patients of the many types the model classifies, as a general cancer hospital sees them "
                   "(none of them most of the patients); if these are such patients, the model does not suit them"}])
    return [f"case mix: {mix}; model {active} answers {p:.0%} of them correctly with this normalisation "
            f"({reference:.0%} on the training hospitals' held-out patients)"]
