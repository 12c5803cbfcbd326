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


import asyncio
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

import orjson

from client.predict import Predictor, format_predictions, tables_to_raw
from client.serve_queue import ModelQueue, QueueFull
from privacy.audit import AuditLog
from shared_models.files import write_json_atomic

ROLES = {"clinician": {"predict", "read"}, "admin": {"predict", "read", "manage"}}
TOKENS_FILE = "serve-tokens.json"


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
        if self._cache is None or self._cache[:2] != (st.st_mtime, st.st_size):
            self._cache = (st.st_mtime, st.st_size, json.loads(self.path.read_text())["tokens"])
        return self._cache[2]

    def list(self) -> list[dict]:
        """Name, role and creation time of each token (never the hash)."""
        return [{k: t.get(k) for k in ("name", "role", "created")} for t in self._read()]

    def add(self, name: str, role: str, replace: bool = False) -> str:
        if role not in ROLES:
            raise ValueError(f"--role {role!r}: one of {', '.join(ROLES)}")
        if not replace and any(t["name"] == name for t in self._read()):
            raise ValueError(f"a token named {name!r} exists; pass --replace to revoke it and issue a new one, "
                             "or choose another --name")
        tokens = [t for t in self._read() if t["name"] != name]
        token = "ofd_" + secrets.token_urlsafe(32)
        tokens.append({"name": name, "role": role, "sha256": hashlib.sha256(token.encode()).hexdigest(),
                       "created": time.time()})
        write_json_atomic(self.path, {"format": "oncofed-serve-tokens/1", "tokens": tokens})
        self.path.chmod(0o600)
        return token

    def revoke(self, name: str) -> bool:
        tokens = self._read()
        kept = [t for t in tokens if t["name"] != name]
        write_json_atomic(self.path, {"format": "oncofed-serve-tokens/1", "tokens": kept})
        return len(kept) < len(tokens)

    def lookup(self, token: str) -> dict | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        found = None
        for t in self._read():
            if hmac.compare_digest(t["sha256"], digest):
                found = t
        return found


def patient_hash(site_salt: str, patient_id: str) -> str:
    return hmac.new(site_salt.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def _site_salt(state_dir: Path) -> str:
    salt_file = state_dir / "patient-id-salt"
    if not salt_file.exists():
        fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
    return salt_file.read_text().strip()


def prediction_entry(salt: str, who: str, version: str, rows: list[dict], via: str) -> tuple[str, dict]:
    """The audit entry of one answered request: who, which model, salted patient hashes, the classes."""
    return ("prediction", {"token": who, "via": via, "model_version": version, "patients": len(rows),
                           "patient_sha": [patient_hash(salt, r["id"]) for r in rows],
                           "predicted": [r["predicted"] for r in rows]})


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("oncofed_serve_requests", "requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("oncofed_serve_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.predictions = Counter("oncofed_serve_predictions", "predictions per class", ["predicted"], registry=r)
        self.errors = Counter("oncofed_serve_errors", "requests refused or failed", ["endpoint", "reason"], registry=r)


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

    def __init__(self, settings: dict, audit_predictions: bool, max_body_bytes: int | None):
        from client.prediction_input import ServeSettings

        self.limits = ServeSettings.from_site(settings)
        if max_body_bytes is not None:
            self.limits = self.limits.model_copy(update={"max_body_mb": max_body_bytes / (1024 * 1024)})
        self.max_body_bytes = int(self.limits.max_body_mb * 1024 * 1024)
        self.state_dir = Path(settings["state-dir"])
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.predictor = Predictor(settings["model-dir"], self.state_dir / "normalizer.json",
                                   settings.get("signing-public-key") or None, on_fallback=self._fell_back)
        self.tokens = TokenStore(self.state_dir / TOKENS_FILE)
        self.salt = _site_salt(self.state_dir)
        self.audit_predictions = audit_predictions
        self.metrics = Metrics()
        self.predictions = ModelQueue("model", self.predictor, format_predictions, self._commit,
                                      capacity=self.limits.queue_patients, window_s=self.limits.batch_window_ms / 1000)
        # explanations: their own thread at a lower CPU priority, so that they use what predictions leave
        self.explanations = ModelQueue("explain", self.predictor, format_predictions, self._commit, max_patients=64,
                                       capacity=self.limits.explain_queue_patients, nice=10)

    def _fell_back(self, entry: dict) -> None:
        self.audit.append("model_fallback", **entry)

    def _commit(self, done: list) -> None:
        for _, _, rows in done:
            for r in rows:
                self.metrics.predictions.labels(r["predicted"]).inc()
        if self.audit_predictions:
            self.audit.append_many([prediction_entry(self.salt, job.who["name"], version, rows, job.extra["via"])
                                    for job, version, rows in done])

    def current(self):
        """The model to score this request with (a newly activated version is picked up here)."""
        from fastapi import HTTPException

        try:
            self.predictor.refresh()
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


def _encode(body: dict) -> bytes:
    """JSON of an answer with orjson (~5x faster than json.dumps on the event loop)."""
    return orjson.dumps(body)


def _prediction_routes(app, site: Site, role) -> None:
    """POST /v1/predict and /v1/predict/file: parse and check off the event loop, then queue for the model."""
    from anyio import CapacityLimiter, to_thread
    from fastapi import Depends, HTTPException, Request, UploadFile
    from fastapi.responses import JSONResponse, Response

    from client.prediction_input import (DecompressedBudget, PredictionInputError, checked_json, checked_tables,
                                         parse_json, store_upload)

    parsing = CapacityLimiter(2)  # request parsing never occupies more threads than the machine has cores

    def refused(e: PredictionInputError, endpoint: str):
        site.metrics.errors.labels(endpoint, "too_large" if e.status == 413 else "invalid_input").inc()
        return JSONResponse({"detail": e.problems}, status_code=e.status)

    async def answer(checked, top_k: int, who: dict, lm, endpoint: str, via: str):
        queue = site.explanations if top_k else site.predictions
        try:
            version, rows = await queue.submit(checked.ids, checked.raw, top_k, who, lm, {"via": via})
        except QueueFull as e:
            site.metrics.errors.labels(endpoint, "queue_full").inc()
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})
        except asyncio.TimeoutError:
            site.metrics.errors.labels(endpoint, "timeout").inc()
            raise HTTPException(503, "the model did not answer within 120 s (overloaded?); retry later") from None
        for row, note in zip(rows, checked.notes):
            row.update(note)
            confidence = row["probabilities"][row["predicted"]]
            if confidence < site.limits.low_confidence:
                row["warnings"] = row["warnings"] + [{"code": "low_confidence", "msg": f"the most likely class has "
                                                      f"probability {confidence:.0%} (below "
                                                      f"{site.limits.low_confidence:.0%}): no confident answer"}]
        body = {"model_version": version, "calibrated": lm.calibration is not None, "warnings": checked.warnings,
                "degraded": site.predictor.degraded, "predictions": rows}
        if len(rows) <= 8:
            return Response(_encode(body), media_type="application/json")
        # a large answer is encoded off the event loop, which keeps answering /health meanwhile
        encoded = await to_thread.run_sync(lambda: _encode(body), limiter=parsing)
        return Response(encoded, media_type="application/json")

    def via(request: Request) -> str:
        return "page" if request.headers.get("x-oncofed-client") == "page" else "api"

    @app.post("/v1/predict")
    async def predict(request: Request, who: dict = Depends(role("predict"))):
        """{"patients": [{"id": ..., "modalities": {MODALITY: {FEATURE: value or null}}}], "top_k": 5}"""
        lm = site.current()  # parsed and scored with this one model, even if another is activated meanwhile
        body = await request.body()

        def parse():
            data = parse_json(body, site.limits)
            patients = data.get("patients") if isinstance(data, dict) else None
            top_k = data.get("top_k", 5) if isinstance(data, dict) else 5
            if not isinstance(patients, list) or not patients:
                raise PredictionInputError([{"loc": "body.patients", "code": "no_patients",
                                             "msg": "a non-empty list of patients is required"}])
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= 50:
                raise PredictionInputError([{"loc": "body.top_k", "code": "bad_top_k", "msg": "an integer from 0 to 50"}])
            return checked_json(lm, patients, site.limits), top_k

        try:
            checked, top_k = await to_thread.run_sync(parse, limiter=parsing)
        except PredictionInputError as e:
            return refused(e, "/v1/predict")
        return await answer(checked, top_k, who, lm, "/v1/predict", via(request))

    @app.post("/v1/predict/file")
    async def predict_file(request: Request, files: list[UploadFile], top_k: int = 5,
                           who: dict = Depends(role("predict"))):
        lm = site.current()
        top_k = min(max(top_k, 0), 50)

        def parse():
            budget = DecompressedBudget(site.limits)
            with tempfile.TemporaryDirectory() as tmp:
                for f in files:
                    name = Path(f.filename or "").name
                    if not name or name.startswith("."):
                        raise PredictionInputError([{"loc": "files", "code": "no_name", "msg": "each file needs a "
                                                     "name: MODALITY.csv / .tsv / .parquet (optionally .gz)"}])
                    f.file.seek(0)
                    store_upload(iter(lambda: f.file.read(1 << 20), b""), Path(tmp) / name, budget,
                                 site.limits.max_patients)
                return checked_tables(lm, Path(tmp), site.limits)

        try:
            checked = await to_thread.run_sync(parse, limiter=parsing)
        except PredictionInputError as e:  # InputTooLarge too (413)
            return refused(e, "/v1/predict/file")
        return await answer(checked, top_k, who, lm, "/v1/predict/file", via(request))


def _model_routes(app, site: Site, role) -> None:
    """The active model (read) and model management (admin)."""
    from fastapi import Depends, HTTPException
    from pydantic import BaseModel

    class Activate(BaseModel):
        version: str | None = None
        rollback: bool = False

    @app.get("/v1/model")
    def model_info(who: dict = Depends(role("read"))):
        lm = site.current()
        p = lm.package
        return {"version": lm.version, "run": p.get("run"), "round": p.get("round"),
                "weights_sha256": p.get("weights_sha256"), "arrays_sha256": p.get("arrays_sha256"),
                "signature": lm.signature, "metrics": p.get("metrics", {}), "site_epsilon": p.get("site_epsilon", {}),
                "delta": p.get("delta"), "schema_hash": p.get("schema_hash"), "classes": lm.schema.classes,
                "class_names": class_names(lm.schema),
                "calibration": lm.calibration and {k: lm.calibration[k] for k in (
                    "temperature", "heldout", "n_fit", "n_heldout", "fitted")},
                "degraded": site.predictor.degraded,
                "modalities": [{"name": m.name, "features": len(m.features), "description": m.description}
                               for m in lm.schema.modalities]}

    @app.get("/v1/models")
    def models(who: dict = Depends(role("manage"))):
        store = site.predictor.store
        return {"active": store.active(), "versions": [
            {"version": v, **{k: store.package(v).get(k) for k in ("run", "round", "installed", "arrays_sha256")}}
            for v in store.versions()]}

    @app.post("/v1/models/activate")
    def activate(body: Activate, who: dict = Depends(role("manage"))):
        predictor = site.predictor
        store = predictor.store
        versions, active = store.versions(), store.active()
        if body.rollback:
            older = [v for v in versions if active is None or v < active]
            if not older:
                raise HTTPException(409, f"nothing to roll back to: {active} is the oldest installed version")
            target = older[-1]
        elif body.version in versions:
            target = body.version
        else:
            raise HTTPException(404, f"version {body.version!r} not installed; installed: {', '.join(versions)}")
        try:
            predictor._load(target)  # verify before switching: a bad package never becomes active
        except Exception as e:  # noqa: BLE001
            raise HTTPException(409, f"{target} does not verify: {e}") from None
        store.activate(target)
        predictor.refresh()
        site.audit.append("model_activated", version=target, previous=active, token=who["name"])
        return {"active": target, "previous": active}


def _operations_routes(app, site: Site) -> None:
    """/health, /metrics, /v1/limits and the page: no token needed."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.get("/health")
    async def health():  # on the event loop: no thread hop, answers while the workers are busy
        predictor = site.predictor
        try:
            predictor.refresh()
        except Exception:  # noqa: BLE001 - reported below
            pass
        if predictor.current is None:
            reason = predictor.failed[1] if predictor.failed else "no model"
            return JSONResponse({"status": "unhealthy", "model_version": None, "reason": reason}, status_code=503)
        if predictor.degraded:
            return {"status": "degraded", "model_version": predictor.current.version, **predictor.degraded}
        return {"status": "ok", "model_version": predictor.current.version,
                "queues": {"predictions": site.predictions.waiting, "explanations": site.explanations.waiting}}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(site.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/limits")
    def limits():
        """What the page states before an upload."""
        lim = site.limits
        return {"max_patients": lim.max_patients, "max_body_mb": lim.max_body_mb,
                "max_decompressed_mb": lim.max_decompressed_mb, "min_coverage": lim.min_coverage,
                "warn_coverage": lim.warn_coverage, "out_of_range_sd": lim.out_of_range_sd,
                "refuse_out_of_range": lim.refuse_out_of_range, "low_confidence": lim.low_confidence,
                "formats": ".csv, .tsv, .txt, .parquet, each optionally .gz"}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return (Path(__file__).parent / "web" / "index.html").read_text()


def class_names(schema) -> dict[str, str]:
    """Full names of the classes when the schema's description carries them ("CODE: name" lines) or
    the vendored TCGA table knows them; else the codes themselves."""
    from client.class_names import names_for

    return names_for(schema)


def create_app(settings: dict, *, audit_predictions: bool = True, threads: int = 1,
               max_body_bytes: int | None = None):
    """The service for one site (site.json's settings); routes are grouped by what they do."""
    import gc

    import torch
    from fastapi import FastAPI

    torch.set_num_threads(threads)  # each queue's thread runs the model on one core
    site = Site(settings, audit_predictions, max_body_bytes)
    docs = site.limits.api_docs
    app = FastAPI(title="OncoFed site prediction service", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(RequestMetrics, metrics=site.metrics)
    # the one size limit, outermost: a fixed metrics label (paths are client-chosen)
    app.add_middleware(BodyLimit, limit=site.max_body_bytes,
                       on_refused=lambda: site.metrics.errors.labels("any", "too_large").inc())
    role = _auth(site)
    _prediction_routes(app, site, role)
    _model_routes(app, site, role)
    _operations_routes(app, site)
    if docs:
        _offline_docs(app)
    app.state.predictor = site.predictor
    app.state.site = site
    gc.freeze()  # the loaded model, schema and libraries: never rescanned by the collector (shorter pauses)
    return app


def _offline_docs(app) -> None:
    """/docs with no internet: a plain list of the routes from the OpenAPI document (no CDN assets)."""
    from fastapi.responses import HTMLResponse

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def docs():
        spec = app.openapi()
        rows = "".join(f"<tr><td>{m.upper()}</td><td><code>{path}</code></td><td>{op.get('summary', '')}</td>"
                       f"<td>{(op.get('description') or '').splitlines()[0] if op.get('description') else ''}</td></tr>"
                       for path, ops in spec["paths"].items() for m, op in ops.items())
        return ("<!doctype html><meta charset=utf-8><title>OncoFed API</title><h1>OncoFed site prediction API</h1>"
                "<p>The OpenAPI document: <a href=/openapi.json>/openapi.json</a></p><table border=1 cellpadding=4>"
                f"<tr><th>method</th><th>path</th><th>summary</th><th>description</th></tr>{rows}</table>")


def fit_normalizer(settings: dict, data_dir: Path, schema_path: Path | None = None) -> tuple[Path, int]:
    """A new hospital: fit the normalisation on its own (unlabelled) patients, for the active model's schema."""
    from client.model_store import ModelStore
    from shared_models.schema import FeatureSchema
    from shared_models.site_data import Normalizer

    store = ModelStore(settings["model-dir"])
    active = store.active()
    if schema_path is None and active is None:
        raise ValueError(f"{settings['model-dir']}: no model installed; pass --schema")
    schema = FeatureSchema.load(schema_path or store.root / active / "schema.json")
    ids, raw = tables_to_raw(schema, Path(data_dir))
    path = Path(settings["state-dir"]) / "normalizer.json"
    Normalizer.fit(schema, raw).save(path)
    return path, len(ids)
