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
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from client.predict import PredictionInputError, Predictor, format_predictions, tables_to_raw
from privacy.audit import AuditLog
from shared_models.files import write_json_atomic

ROLES = {"clinician": {"predict", "read"}, "admin": {"predict", "read", "manage"}}
MAX_PATIENTS = 1000
MAX_BODY_BYTES = 50 * 1024 * 1024
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

    def add(self, name: str, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"--role {role!r}: one of {', '.join(ROLES)}")
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


class Batcher:
    """Dynamic batching: concurrent requests are scored together by one worker thread.

    A request waits at most for the batch in flight; the worker takes whatever has queued (up to
    `max_patients`), runs the model once, writes the batch's audit entries with one fsync, and hands
    each request its rows. Requests with explanations (integrated gradients) are scored apart.
    """

    def __init__(self, predictor: Predictor, on_batch, max_patients: int = 256):
        import queue

        self.predictor, self.on_batch, self.max_patients = predictor, on_batch, max_patients
        self.queue: "queue.Queue" = queue.Queue()
        self.committing: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="oncofed-batcher").start()
        threading.Thread(target=self._commit, daemon=True, name="oncofed-audit").start()

    def _commit(self) -> None:
        """Audit entries are durable before their requests are answered; the model does not wait for the disk."""
        import queue

        while True:
            batches = [self.committing.get()]
            while True:
                try:
                    batches.append(self.committing.get_nowait())
                except queue.Empty:
                    break
            done = [(it, o) for group in batches for it, o in group]
            try:
                self.on_batch([(it[3], o) for it, o in done])
                for it, o in done:
                    _answer(it[4], it[5], o)
            except Exception as e:  # noqa: BLE001 - no answer without its audit entry
                for it, _ in done:
                    _answer(it[4], it[5], None, e)

    async def submit(self, ids: list[str], raw: np.ndarray, top_k: int, who: dict, lm,
                     timeout: float = 120.0) -> tuple[str, list[dict]]:
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((ids, raw, top_k, who, loop, fut, lm))
        return await asyncio.wait_for(fut, timeout)

    def _run(self) -> None:
        import queue

        while True:
            items = [self.queue.get()]
            n = len(items[0][0])
            while n < self.max_patients:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
                n += len(item[0])
            by_k: dict[tuple, list] = {}
            for it in items:  # one model call per model and top_k (0: no explanations)
                by_k.setdefault((id(it[6]), it[2]), []).append(it)
            groups = list(by_k.values())
            for group in groups:
                try:
                    raw = np.concatenate([it[1] for it in group]) if len(group) > 1 else group[0][1]
                    lm, result = self.predictor.predict(raw, top_k=group[0][2], lm=group[0][6])
                    rows = format_predictions(lm, [i for it in group for i in it[0]], result, group[0][2])
                    out, start = [], 0
                    for it in group:
                        out.append((lm.version, rows[start:start + len(it[0])]))
                        start += len(it[0])
                    self.committing.put(list(zip(group, out)))
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    for it in group:
                        _answer(it[4], it[5], None, e)


def _resolve(fut, value, error) -> None:
    if fut.done():  # e.g. the request timed out
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _answer(loop, fut, value, error=None) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, fut, value, error)
    except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
        pass


def patient_hash(site_salt: str, patient_id: str) -> str:
    return hmac.new(site_salt.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def create_app(settings: dict, *, audit_predictions: bool = True, threads: int = 1,
               max_body_bytes: int = MAX_BODY_BYTES):
    from fastapi import Depends, FastAPI, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from pydantic import BaseModel

    import torch

    torch.set_num_threads(threads)  # the batcher is the only thread running the model
    state_dir = Path(settings["state-dir"])
    predictor = Predictor(settings["model-dir"], state_dir / "normalizer.json",
                          settings.get("signing-public-key") or None)
    tokens = TokenStore(state_dir / TOKENS_FILE)
    audit = AuditLog(state_dir / "audit.jsonl")
    salt_file = state_dir / "patient-id-salt"
    if not salt_file.exists():
        fd = os.open(salt_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(16))
    salt = salt_file.read_text().strip()

    registry = CollectorRegistry()
    requests = Counter("oncofed_serve_requests", "requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("oncofed_serve_latency_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    predictions = Counter("oncofed_serve_predictions", "predictions per class", ["predicted"], registry=registry)
    errors = Counter("oncofed_serve_errors", "requests refused or failed", ["endpoint", "reason"], registry=registry)

    app = FastAPI(title="OncoFed site prediction service", version="1")
    # a fixed metrics label: paths are client-chosen
    app.add_middleware(BodyLimit, limit=max_body_bytes, on_refused=lambda: errors.labels("any", "too_large").inc())

    class Activate(BaseModel):
        version: str | None = None
        rollback: bool = False

    def role(permission: str):
        async def check(request: Request) -> dict:
            header = request.headers.get("authorization", "")
            if not header.lower().startswith("bearer "):
                errors.labels(request.url.path, "unauthenticated").inc()
                raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>' (tokens come "
                                    "from `oncofed serve token add`)", headers={"WWW-Authenticate": "Bearer"})
            entry = tokens.lookup(header[7:].strip())
            if entry is None:
                errors.labels(request.url.path, "unauthenticated").inc()
                raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
            if permission not in ROLES[entry["role"]]:
                errors.labels(request.url.path, "forbidden").inc()
                raise HTTPException(403, f"role {entry['role']!r} may not {permission}")
            return entry
        return check

    @app.middleware("http")
    async def request_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("route").path if request.scope.get("route") else "other"
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    def current():
        try:
            predictor.refresh()
        except Exception as e:  # noqa: BLE001 - a broken new package must not take the service down
            if predictor.current is None:
                raise HTTPException(503, f"no usable model: {e}") from None
        return predictor.current

    def audit_batch(done: list[tuple[dict, tuple[str, list[dict]]]]) -> None:
        for _, (_, rows) in done:
            for r in rows:
                predictions.labels(r["predicted"]).inc()
        if audit_predictions:
            audit.append_many([("prediction", {
                "token": who["name"], "model_version": version, "patients": len(rows),
                "patient_sha": [patient_hash(salt, r["id"]) for r in rows],
                "predicted": [r["predicted"] for r in rows]}) for who, (version, rows) in done])

    batcher = Batcher(predictor, audit_batch)

    def check_rows(n: int, endpoint: str) -> None:
        if n > MAX_PATIENTS:
            errors.labels(endpoint, "too_many_rows").inc()
            raise HTTPException(413, f"{n} patients in one request; at most {MAX_PATIENTS}")

    async def respond(ids: list[str], raw: np.ndarray, top_k: int, who: dict, endpoint: str, lm) -> dict:
        import asyncio

        check_rows(len(ids), endpoint)
        try:
            version, rows = await batcher.submit(ids, raw, top_k, who, lm)
        except asyncio.TimeoutError:
            errors.labels(endpoint, "timeout").inc()
            raise HTTPException(503, "the model did not answer within 120 s (overloaded?); retry later") from None
        return {"model_version": version, "predictions": rows}

    def unprocessable(e: PredictionInputError, endpoint: str):
        errors.labels(endpoint, "invalid_input").inc()
        return HTTPException(422, e.problems)

    @app.post("/v1/predict")
    async def predict(request: Request, who: dict = Depends(role("predict"))):
        """{"patients": [{"id": ..., "modalities": {MODALITY: {FEATURE: value or null}}}], "top_k": 5}"""
        lm = current()  # parsed and scored with this one model, even if another is activated meanwhile
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise unprocessable(PredictionInputError([{"loc": "body", "msg": f"not JSON ({e})"}]), "/v1/predict")
        patients = body.get("patients") if isinstance(body, dict) else None
        top_k = body.get("top_k", 5) if isinstance(body, dict) else 5
        if not isinstance(patients, list) or not patients:
            raise unprocessable(PredictionInputError([{"loc": "body.patients", "msg": "a non-empty list of "
                                                       "patients is required"}]), "/v1/predict")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= 50:
            raise unprocessable(PredictionInputError([{"loc": "body.top_k", "msg": "an integer from 0 to 50"}]),
                                "/v1/predict")
        check_rows(len(patients), "/v1/predict")
        try:
            ids, raw = predictor.raw_from_json(patients, lm)
        except PredictionInputError as e:
            raise unprocessable(e, "/v1/predict") from None
        return await respond(ids, raw, top_k, who, "/v1/predict", lm)

    @app.post("/v1/predict/file")
    async def predict_file(files: list[UploadFile], top_k: int = 5, who: dict = Depends(role("predict"))):
        lm = current()
        with tempfile.TemporaryDirectory() as tmp:
            for f in files:
                name = Path(f.filename or "").name
                if not name or name.startswith("."):
                    raise unprocessable(PredictionInputError([{"loc": "files", "msg": "each file needs a name: "
                                                               "MODALITY.csv / .tsv / .parquet"}]), "/v1/predict/file")
                (Path(tmp) / name).write_bytes(await f.read())
            try:
                ids, raw = tables_to_raw(lm.schema, Path(tmp))
            except PredictionInputError as e:
                raise unprocessable(e, "/v1/predict/file") from None
            except (ValueError, OSError) as e:
                raise unprocessable(PredictionInputError([{"loc": "files", "msg": str(e)}]), "/v1/predict/file") from None
        return await respond(ids, raw, min(max(top_k, 0), 50), who, "/v1/predict/file", lm)

    @app.get("/v1/model")
    def model_info(who: dict = Depends(role("read"))):
        lm = current()
        p = lm.package
        return {"version": lm.version, "run": p.get("run"), "round": p.get("round"),
                "weights_sha256": p.get("weights_sha256"), "arrays_sha256": p.get("arrays_sha256"),
                "signature": lm.signature, "metrics": p.get("metrics", {}), "site_epsilon": p.get("site_epsilon", {}),
                "delta": p.get("delta"), "schema_hash": p.get("schema_hash"), "classes": lm.schema.classes,
                "modalities": [{"name": m.name, "features": len(m.features)} for m in lm.schema.modalities]}

    @app.get("/v1/models")
    def models(who: dict = Depends(role("manage"))):
        store = predictor.store
        return {"active": store.active(), "versions": [
            {"version": v, **{k: store.package(v).get(k) for k in ("run", "round", "installed", "arrays_sha256")}}
            for v in store.versions()]}

    @app.post("/v1/models/activate")
    def activate(body: Activate, who: dict = Depends(role("manage"))):
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
        audit.append("model_activated", version=target, previous=active, token=who["name"])
        return {"active": target, "previous": active}

    @app.get("/health")
    def health():
        ok = predictor.current is not None
        return JSONResponse({"status": "ok" if ok else "no model", "model_version": ok and predictor.current.version},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return (Path(__file__).parent / "web" / "index.html").read_text()

    app.state.predictor = predictor
    import gc

    gc.freeze()  # the loaded model, schema and libraries: never rescanned by the collector (shorter pauses)
    return app


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
