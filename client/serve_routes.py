"""The site service's HTTP routes, grouped by purpose: predictions and explanations, the model and its
versions, operations (health, metrics, limits, the page) and the offline API docs.

Each group is a function that adds its routes to the app; they share the service's state (`client.serve.Site`)
and its token check (`role(permission)`, a FastAPI dependency), both passed in.
"""

import asyncio
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from client.explain_process import ExplainProcessError
from client.input_process import InputProcessError
from client.serve_queue import ANSWER_TIMEOUT_S, QueueFull
from shared_models.site_data import TABLE_SUFFIXES
from privacy.site_config import INLINE_BYTES

# A request this small, with at most this many patients (counted unparsed), is parsed and checked by the
# input-check process (client/input_process.py), or with `serve.input-check = "inline"` on the event loop
# (~0.3-1 ms for 1-3 patients: a thread hop costs a single-patient request more than its parsing). Anything
# larger goes to a parsing thread, so no body holds the loop or the input-check process (a body of INLINE_BYTES
# holding 1,000 empty patients takes ~30 ms to check). INLINE_BYTES: privacy.site_config, whose input-check setting
# it bounds.
INLINE_PATIENTS = 4

if TYPE_CHECKING:
    from client.serve import Site


def _encode(body: dict) -> bytes:
    """JSON of an answer with orjson (~5x faster than json.dumps on the event loop)."""
    return orjson.dumps(body)


def prediction_routes(app, site: "Site", role) -> None:
    """POST /v1/predict and /v1/predict/file: predictions are parsed and checked off the event loop, then
    queued for the model; explanation requests go whole to the explanation lane (client/explain_process.py)."""
    import shutil

    from anyio import CapacityLimiter, to_thread
    from fastapi import Depends, HTTPException, Request, UploadFile
    from fastapi.responses import JSONResponse, Response

    from client.predict import add_notes, refuse_weak_patterns
    from client.serve import AuditUnwritable
    from client.prediction_input import (DecompressedBudget, PredictionInputError, asks_explanations, check_top_k,
                                         checked_json,
                                         checked_tables, estimated_patients, parse_request, store_upload)

    parsing = CapacityLimiter(2)  # request parsing never occupies more threads than the machine has cores
    contract_errors(app, site)

    def refused(e: PredictionInputError, endpoint: str):
        site.metrics.errors.labels(endpoint, "too_large" if e.status == 413 else "invalid_input").inc()
        return JSONResponse({"detail": e.problems}, status_code=e.status)

    async def queued(endpoint: str, submit):
        """The queue's answer, or the response that says why there is none."""
        try:
            return await submit()
        except QueueFull as e:
            site.metrics.errors.labels(endpoint, "queue_full").inc()
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": str(e.retry_after)})
        except ExplainProcessError as e:  # the child died or failed: the service itself is fine
            site.metrics.errors.labels(endpoint, "explain_process").inc()
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "5"})
        except PredictionInputError as e:  # refused by the explanation lane, which parses its requests
            return refused(e, endpoint)
        except AuditUnwritable as e:  # scored, but no answer without its audit entry
            site.metrics.errors.labels(endpoint, "audit_unwritable").inc()
            return JSONResponse({"detail": str(e)}, status_code=503)
        except asyncio.TimeoutError:
            site.metrics.errors.labels(endpoint, "timeout").inc()
            raise HTTPException(503, f"the model did not answer within {ANSWER_TIMEOUT_S:g} s (overloaded?); retry later") from None

    async def answer(checked, top_k: int, who: dict, lm, endpoint: str, via: str):
        try:  # a large request's patterns are counted off the event loop (1,000 BRCA patients: ~30 ms)
            if len(checked.ids) <= INLINE_PATIENTS:
                refuse_weak_patterns(lm, checked, site.limits)
            else:
                await to_thread.run_sync(refuse_weak_patterns, lm, checked, site.limits, limiter=parsing)
        except PredictionInputError as e:
            return refused(e, endpoint)
        out = await queued(endpoint, lambda: site.predictions.submit(checked.ids, checked.raw, top_k, who, lm,
                                                                      {"via": via}))
        if isinstance(out, Response):
            return out
        version, rows = out
        add_notes(rows, checked.notes, lm, site.limits)
        body = {"model_version": version, "calibrated": lm.calibration is not None, "warnings": checked.warnings,
                "degraded": site.predictor.degraded, "predictions": rows}
        if len(rows) <= 8:
            return Response(_encode(body), media_type="application/json")
        # a large answer is encoded off the event loop, which keeps answering /health meanwhile
        encoded = await to_thread.run_sync(lambda: _encode(body), limiter=parsing)
        return Response(encoded, media_type="application/json")

    async def explained(kind: str, payload, top_k: int, patients: int, who: dict, lm, endpoint: str, via: str,
                        size: int = 0):
        out = await queued(endpoint, lambda: site.explanations.submit(kind, payload, top_k, patients, who, lm,
                                                                       {"via": via}, size))
        if isinstance(out, Response):
            return out
        head = _encode({"model_version": out["version"], "calibrated": out["calibrated"],
                        "warnings": out["warnings"], "degraded": site.predictor.degraded})
        return Response(head[:-1] + b',"predictions":' + out["rows"] + b"}", media_type="application/json")

    def via(request: Request) -> str:
        return "page" if request.headers.get("x-oncofed-client") == "page" else "api"

    @app.post("/v1/predict")
    async def predict(request: Request, who: dict = Depends(role("predict"))):
        """{"patients": [{"id": ..., "modalities": {MODALITY: {FEATURE: value or null}}}], "top_k": 5}"""
        lm = site.current()  # parsed and scored with this one model, even if another is activated meanwhile
        body = await request.body()
        if asks_explanations(body) and (patients := estimated_patients(body)):  # not parsed here: the lane does it all
            return await explained("json", body, 0, patients, who, lm, "/v1/predict", via(request), len(body))

        def check(patients):
            return checked_json(lm, patients, site.limits)

        def parse_and_check():
            patients, top_k = parse_request(body, site.limits)
            return patients, (check(patients) if not top_k else None), top_k

        small = len(body) <= INLINE_BYTES and (estimated_patients(body) or INLINE_PATIENTS + 1) <= INLINE_PATIENTS
        try:
            if not small:
                patients, checked, top_k = await to_thread.run_sync(parse_and_check, limiter=parsing)
                n = len(patients)
            elif site.input_check is not None:  # a child process (client/input_process.py): off the GIL
                n, top_k, checked = await site.input_check.check(lm, body)
            else:
                patients, top_k = parse_request(body, site.limits)
                n = len(patients)
                checked = None if top_k else check(patients)
        except PredictionInputError as e:
            return refused(e, "/v1/predict")
        except InputProcessError as e:
            site.metrics.errors.labels("/v1/predict", "input_process").inc()
            return JSONResponse({"detail": str(e)}, status_code=503, headers={"Retry-After": "1"})
        if top_k:  # top_k was not where asks_explanations looks, or the patients could not be counted unparsed
            return await explained("json", body, 0, n, who, lm, "/v1/predict", via(request), len(body))
        return await answer(checked, top_k, who, lm, "/v1/predict", via(request))

    @app.post("/v1/predict/file")
    async def predict_file(request: Request, files: list[UploadFile] | None = None, top_k: int = 5,
                           who: dict = Depends(role("predict"))):
        if not files:  # (FastAPI's own answer, "Field required", names no fix)
            return refused(PredictionInputError([{
                "loc": "files", "code": "no_files", "msg": "no table was uploaded",
                "fix": "send the tables as multipart form fields named 'files', one per table, e.g. "
                       "curl -F files=@expr.csv -F files=@labels.csv ..."}]), "/v1/predict/file")
        lm = site.current()
        try:
            check_top_k(top_k, "query.top_k")
        except PredictionInputError as e:
            return refused(e, "/v1/predict/file")

        def store(tmp: Path) -> int:
            """The uploads in `tmp`, decompressed within the limits; an upper bound on their patients."""
            budget, rows = DecompressedBudget(site.limits), 0
            modalities = {m.name for m in lm.schema.modalities}
            for f in files:
                name = Path(f.filename or "").name
                if not name or name.startswith("."):
                    raise PredictionInputError([{"loc": "files", "code": "no_name", "msg": "each file needs a "
                                                 "name: MODALITY.csv / .tsv / .parquet (optionally .gz)"}])
                f.file.seek(0)
                table = any(name == m + suffix for m in modalities for suffix in TABLE_SUFFIXES)  # as table_frames
                # reads them; any other file (a labels.csv) is ignored there: its rows count not
                n = store_upload(iter(lambda: f.file.read(1 << 20), b""), tmp / name, budget,
                                 site.limits.max_patients if table else 10**12)  # (its bytes do, within the budget)
                rows += n if table else 0  # a patient may be in one table only
            return max(rows, 1)

        tmp = Path(tempfile.mkdtemp(prefix="oncofed-upload-"))
        try:
            if top_k:  # the lane reads the stored tables itself
                patients = await to_thread.run_sync(store, tmp, limiter=parsing)
                return await explained("tables", tmp, top_k, patients, who, lm, "/v1/predict/file", via(request),
                                       sum(f.size or 0 for f in files))
            checked = await to_thread.run_sync(lambda: (store(tmp), checked_tables(lm, tmp, site.limits))[1],
                                               limiter=parsing)
        except PredictionInputError as e:  # InputTooLarge too (413)
            return refused(e, "/v1/predict/file")
        finally:  # not awaited: a cancelled request (shutdown) still removes its patients' tables
            shutil.rmtree(tmp, ignore_errors=True)
        return await answer(checked, top_k, who, lm, "/v1/predict/file", via(request))


def contract_errors(app, site: "Site") -> None:
    """FastAPI's own checks of a route's parameters (`?top_k=abc`, `-F files=hello`) answered in its format
    ({"type": "int_parsing", ...}), naming no fix: they answer in the contract's, {loc, code, msg, fix}, as every
    other refusal does."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from client.prediction_input import MAX_TOP_K

    upload = "send the tables as multipart form fields named 'files', one per table, e.g. curl -F files=@expr.csv ..."

    def problem(err: dict) -> dict:
        loc = [str(x) for x in err.get("loc", ())]
        where = ".".join(loc) or "request"
        if loc[-1:] == ["top_k"] or loc[1:2] == ["top_k"]:
            return {"loc": where, "code": "bad_top_k", "msg": f"an integer from 0 to {MAX_TOP_K}",
                    "fix": f"ask for 0 (no explanation) to {MAX_TOP_K} features"}
        if loc[1:2] == ["files"]:
            return {"loc": where, "code": "not_a_file", "msg": "'files' must be uploaded files, not text", "fix": upload}
        return {"loc": where, "code": "invalid_request", "msg": str(err.get("msg", "invalid")),
                "fix": "see the request's format in the hospital guide (docs/hospital-guide.md, the prediction API)"}

    @app.exception_handler(RequestValidationError)
    async def refused(request, exc: RequestValidationError):
        route = request.scope.get("route")
        site.metrics.errors.labels(route.path if route is not None else "other", "invalid_input").inc()
        return JSONResponse({"detail": [problem(err) for err in exc.errors()]}, status_code=422)


def model_routes(app, site: "Site", role) -> None:
    """The active model (read) and model management (admin)."""
    from anyio import to_thread
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

    from client.class_names import names_for

    class Activate(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt field is refused, not ignored

        version: str | None = None
        rollback: bool = False

        @model_validator(mode="after")
        def _one_of(self) -> "Activate":
            if self.rollback == (self.version is not None):
                raise ValueError('send either {"version": "v0002"} or {"rollback": true}, not both or neither')
            return self

    @app.get("/v1/model")
    def model_info(who: dict = Depends(role("read"))):
        lm = site.current(wait=True)  # a worker thread: the version active now, not the one loaded before
        p = lm.package
        return {"version": lm.version, "run": p.get("run"), "round": p.get("round"),
                "weights_sha256": p.get("weights_sha256"), "arrays_sha256": p.get("arrays_sha256"),
                "signature": lm.signature, "metrics": p.get("metrics", {}), "site_epsilon": p.get("site_epsilon", {}),
                "site_run_epsilon": p.get("site_run_epsilon"),
                "delta": p.get("delta"), "schema_hash": p.get("schema_hash"), "classes": lm.schema.classes,
                "class_names": names_for(lm.schema),
                "calibration": lm.calibration and {k: lm.calibration.get(k) for k in (
                    "temperature", "heldout", "n_fit", "n_heldout", "fitted", "patterns", "left_out_trained", "left_out_labels",
                    "overall_not_fitted", "types")},
                "consortium_patterns": lm.consortium_patterns() or None,  # the package's: flags until calibrated
                "min_pattern_accuracy": site.limits.min_pattern_accuracy,
                "refuse_weak_pattern": site.limits.refuse_weak_pattern,
                "degraded": site.predictor.degraded,
                "modalities": [{"name": m.name, "features": len(m.features), "description": m.description}
                               for m in lm.schema.modalities]}

    @app.get("/v1/models")
    def models(who: dict = Depends(role("manage"))):
        store = site.predictor.store

        def described(v: str) -> dict:  # one damaged package must not hide the others (a rollback needs the list)
            try:
                package = store.package(v)
            except (OSError, ValueError) as e:
                return {"version": v, "unreadable": f"{store.root / v / 'package.json'}: {e}"}
            return {"version": v, **{k: package.get(k) for k in ("run", "round", "installed", "arrays_sha256")}}

        return {"active": store.active(), "versions": [described(v) for v in store.versions()]}

    @app.post("/v1/models/activate")
    async def activate(request: Request, who: dict = Depends(role("manage"))):
        # the body is read as JSON whatever its Content-Type: `curl -d '{"rollback": true}'` (form-encoded, as the
        # guide's /v1/predict example sends) got FastAPI's "Input should be a valid dictionary", naming no fix
        raw = await request.body()
        try:
            body = Activate.model_validate_json(raw or b"null")
        except ValidationError as e:
            problems = [err["msg"].removeprefix("Value error, ") + (f" ({'.'.join(map(str, err['loc']))})"
                                                                    if err["loc"] else "") for err in e.errors()]
            return JSONResponse({"detail": [{
                "loc": "body", "code": "invalid_body", "msg": "; ".join(problems),
                "fix": 'send a JSON object: {"version": "v0002"} to activate an installed version, or '
                       '{"rollback": true} for the one before the active one'}]}, status_code=422)
        return await to_thread.run_sync(_activate, body, who)

    def _activate(body: "Activate", who: dict):
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
        from client.serve import AuditUnwritable

        def record() -> None:  # after the version verified, before the switch: no switch the audit log lacks
            site.record([("model_activated", {"version": target, "previous": active, "token": who["name"]})])

        def record_failed(reason: str) -> None:
            site.record([("model_activation_failed", {"version": target, "active": active, "token": who["name"],
                                                      "reason": reason})])

        try:  # verified before switching: a bad package never becomes active
            predictor.activate(target, record=record, record_failed=record_failed)
        except AuditUnwritable as e:  # (nor a line: an append that fails leaves none)
            raise HTTPException(503, f"the audit log cannot record the switch, nothing changed: {e}") from None
        except OSError as e:  # e.g. the model directory's ACTIVE file cannot be written
            raise HTTPException(503, f"{target} cannot be activated, nothing changed: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise HTTPException(409, f"{target} cannot be activated, nothing changed: {e}") from None
        predictor.refresh()
        return {"active": target, "previous": active}


def operations_routes(app, site: "Site", role) -> None:
    """/health, /v1/limits and the page (no token: nothing in them is about a patient or a request), and /metrics
    (a monitoring or admin token: it counts the predictions per class)."""
    from fastapi import Depends
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.get("/health")
    async def health():  # on the event loop: no thread hop, answers while the workers are busy
        """Status and model version only, to anyone on the machine: why it is unhealthy (paths, versions) is in
        GET /v1/model (a token), the queues in /metrics."""
        predictor = site.predictor
        try:
            predictor.refresh(wait=False)  # a new version loads in a thread: /health answers meanwhile
        except Exception:  # noqa: BLE001 - reported below
            pass
        current = predictor.current
        # the active version refused: unhealthy for monitoring, though predictions go on from an older one
        status = 503 if current is None or predictor.degraded else 200
        said = "ok" if status == 200 else "waiting for the first model" if predictor.waiting else "unhealthy"
        return JSONResponse({"status": said, "model_version": current and current.version}, status_code=status)

    @app.get("/health/live")
    async def live():
        """The process answers: for a supervisor that restarts the service (a restart cannot repair what makes
        /health unhealthy, and predictions go on from a verified older version meanwhile)."""
        return {"status": "live"}

    @app.get("/metrics")
    def metrics(who: dict = Depends(role("monitor"))):
        return Response(generate_latest(site.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/limits")
    def limits():
        """What the page states before an upload."""
        lim = site.limits
        return {"max_patients": lim.max_patients, "max_body_mb": lim.max_body_mb,
                "max_decompressed_mb": lim.max_decompressed_mb, "min_coverage": lim.min_coverage,
                "warn_coverage": lim.warn_coverage, "out_of_range_sd": lim.out_of_range_sd,
                "refuse_out_of_range": lim.refuse_out_of_range, "low_confidence": lim.low_confidence,
                "min_pattern_accuracy": lim.min_pattern_accuracy, "refuse_weak_pattern": lim.refuse_weak_pattern,
                "formats": ".csv, .tsv, .txt, .parquet, each optionally .gz"}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return (Path(__file__).parent / "web" / "index.html").read_text()


def offline_docs(app) -> None:
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
