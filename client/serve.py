"""`oncofed serve --site-config site.json`: the global model as a local REST service at the site.

    POST /v1/predict          JSON patients, features grouped by modality (any modality may be missing)
    POST /v1/predict/file     multipart upload of site-layout tables (one file per modality, CSV/TSV/Parquet)
    GET  /v1/model            the active model: version, run, round, SHA-256, signature, metrics, epsilon
    GET  /v1/models           installed versions          (admin)
    POST /v1/models/activate  {"version": "v0002"}        (admin; "rollback": the previous version)
    GET  /health, GET /metrics (Prometheus), GET / (the web page)

Access: bearer tokens with a role (clinician: predict and read; admin: also model management),
stored as SHA-256 hashes in STATE_DIR/serve-tokens.json (`oncofed serve token add`). Every
prediction is appended to the site's hash-chained audit log with a salted hash of the patient id,
the model version and the time, never feature values. A newly delivered (or activated) model is
picked up without a restart: the store's ACTIVE file is checked before each request batch.
"""


import hashlib
import hmac
import json
import os
import secrets
import time
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

from client.predict import Predictor, format_predictions
from client.serve_queue import ExplanationLane, ModelQueue
from client.serve_routes import model_routes, offline_docs, operations_routes, prediction_routes
from client.site import MIN_NORMALISATION_PATIENTS
from privacy.audit import AUDIT_FILE, AuditLog
from privacy.site_config import SiteConfig
from shared_models.files import atomic_file, held_lock
from shared_models.site_data import NORMALIZER_FILE

ROLES = {"clinician": {"predict", "read"}, "admin": {"predict", "read", "manage"}}
TOKENS_FILE = "serve-tokens.json"
EXPLAIN_QUEUE_BODIES = 4  # waiting explanation requests hold at most this many maximal bodies' bytes


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
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("oncofed_serve_requests", "requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("oncofed_serve_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.predictions = Counter("oncofed_serve_predictions", "predictions per class", ["predicted"], registry=r)
        self.errors = Counter("oncofed_serve_errors", "requests refused or failed", ["endpoint", "reason"], registry=r)
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
        self.predictor = Predictor.for_site(settings, on_fallback=self._fell_back)
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

        # small JSON prediction requests: parsed and checked in a child process (client/input_process.py)
        if self.limits.input_check == "process":
            from client.input_process import InputProcess

            self.input_check = InputProcess(self.limits)
        else:
            self.input_check = None

    def _fell_back(self, entry: dict) -> None:
        self.audit.append("model_fallback", **entry)

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
            self.audit.append_many([prediction_entry(self.salt, job.who["name"], version, ids, predicted,
                                                     job.extra["via"]) for job, version, ids, predicted in answered],
                                   head=False)
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
        except Exception as e:  # noqa: BLE001 - nothing verifies: the service answers, but refuses to guess
            if self.predictor.current is None:
                raise HTTPException(503, f"no usable model: {e}") from None
        return self.predictor.current


def _auth(site: Site):
    """Dependency factory: the bearer token's entry if its role may `permission`; failures are audited."""
    from fastapi import HTTPException, Request

    def refuse(request: Request, status: int, reason: str, detail: str, name: str | None = None):
        site.metrics.errors.labels(request.url.path, "unauthenticated" if status == 401 else "forbidden").inc()
        client = request.client.host if request.client else None
        site.audit.append("login_failed", reason=reason, path=request.url.path, client=client, token=name)
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
            if permission not in ROLES[entry["role"]]:
                refuse(request, 403, f"role {entry['role']} may not {permission}",
                       f"role {entry['role']!r} may not {permission}", entry["name"])
            return entry
        return check
    return role


def create_app(settings: SiteConfig, *, audit_predictions: bool = True, threads: int = 1,
               max_body_bytes: int | None = None):
    """The service for one site (site.json's settings): its state, the middleware, then the routes by group
    (client/serve_routes.py)."""
    import gc

    import torch
    from fastapi import FastAPI

    torch.set_num_threads(threads)  # each queue's thread runs the model on one core
    site = Site(settings, audit_predictions, max_body_bytes)
    docs = site.limits.api_docs

    @asynccontextmanager
    async def lifespan(app):
        if site.input_check is not None:
            await site.input_check.start()  # its imports overlap the service's start
        yield
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
    role = _auth(site)
    prediction_routes(app, site, role)
    model_routes(app, site, role)
    operations_routes(app, site)
    if docs:
        offline_docs(app)
    app.state.predictor = site.predictor
    app.state.site = site
    gc.freeze()  # the loaded model, schema and libraries: never rescanned by the collector (shorter pauses)
    # a request allocates thousands of short-lived objects: collect the young generation every 50,000
    # allocations instead of 700 (in three one-off pairs at 16 connections: as fast or faster, p99 as low or lower)
    gc.set_threshold(50_000, 10, 10)
    return app




def fit_normalizer(settings: SiteConfig, data_dir: Path, schema_path: Path | None = None
                   ) -> tuple[Path, int, list[str]]:
    """A new hospital: fit the normalisation on its own (unlabelled) patients, for the active model's schema.

    The tables are held to the prediction contract (the checks a training site's tables get: foreign tables,
    duplicate ids, non-numbers are refused, PredictionInputError) and need at least MIN_NORMALISATION_PATIENTS patients.
    A feature observed in fewer keeps the normalisation saved before (none: unscaled), and the returned notes
    name its modality. Nothing is written unless the fit is accepted. Returns (path, patients, notes)."""
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
    Normalizer(schema, mean, scale, (u_mean, u_scale)).save(path)
    if active is not None and (store.root / active / NORMALIZER).is_file():
        notes.append(f"the active model {active} keeps the normalisation of the run that trained it at this site and "
                     "is served with it; this fit serves models installed without one")
    return path, len(ids), notes
