"""Explanation requests, answered whole away from the prediction path.

Integrated gradients cost ~30 forward passes per patient, and a large explanation request costs the
service more than its attributions: a 300-patient body takes ~40 ms to parse, ~50 ms to check against
the input contract, ~70 ms to score and ~10 ms to format (CPU time, the serve benchmark's request).
Done in the service's process, that work holds the GIL the single-patient predictions need.

`explain_request` is the whole answer to one request (parse, check, score, explain, format);
`ExplainProcess` runs it in a child process under Linux's SCHED_IDLE (it gets only CPU time no normal
process wants, and holds no lock the service needs), `InProcess` in the calling thread (`serve.explanations
= "thread"`). Either way the service only receives the bytes (or stores the uploaded tables), queues the
request, writes the audit entry from the patient ids and classes it gets back, and sends the answer:
the formatted rows arrive already encoded. The child loads the model version the service chose, verified
as the service verifies it (the same `Predictor`), and uses the service's normalisation and calibration,
sent with each request (not the files, which may have changed since the service loaded them).

A child that dies is started again for the next request; the request in flight gets the error.
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import orjson

from client.prediction_input import PredictionInputError

ANSWER_WITHIN_S = 600.0  # a child that takes longer (hung) is stopped; the service answers 503 at ANSWER_TIMEOUT_S anyway


class ExplainProcessError(RuntimeError):
    pass


def answered(work, failed: str) -> tuple[str, object]:
    """A child process's answer to one request (here and client/input_process.py): ("ok", work()), or
    ("refused", (problems, status)) for input the contract refuses, which the service answers as it answers
    its own refusals, or ("failed", message) for anything else, the message prefixed `failed`."""
    try:
        return "ok", work()
    except PredictionInputError as e:
        return "refused", (e.problems, e.status)
    except Exception as e:  # noqa: BLE001 - the service answers the request with it
        return "failed", f"{failed}: {type(e).__name__}: {e}"


def answer_value(status: str, value, error: type[Exception]):
    """What the service makes of a child's answer (`answered`): its value, or the refusal raised as
    PredictionInputError, or the failure raised as `error`."""
    if status == "refused":
        raise PredictionInputError(*value)
    if status == "failed":
        raise error(value)
    return value


def explain_request(predictor, lm, limits, kind: str, payload, top_k: int) -> dict:
    """One request, whole: `kind` "json" (payload: the /v1/predict body; its own top_k counts) or "tables"
    (payload: a directory of uploaded modality tables). Raises PredictionInputError for input the contract
    refuses. Returns the answer's parts: version, calibrated, warnings, ids, predicted, rows (JSON bytes)."""
    from client.predict import add_notes, format_predictions, refuse_weak_patterns
    from client.prediction_input import checked_json, checked_tables, parse_request

    if kind == "json":
        patients, top_k = parse_request(payload, limits)
        checked = checked_json(lm, patients, limits)
    else:
        checked = checked_tables(lm, Path(payload), limits)
    refuse_weak_patterns(lm, checked, limits)
    lm, result = predictor.predict(checked.raw, top_k=top_k, lm=lm)
    rows = add_notes(format_predictions(lm, checked.ids, result, top_k), checked.notes, lm, limits)
    return {"version": lm.version, "calibrated": lm.calibration is not None, "warnings": checked.warnings,
            "ids": checked.ids, "predicted": [r["predicted"] for r in rows], "rows": orjson.dumps(rows)}


class InProcess:
    """`request(lm, kind, payload, top_k)` in the calling thread (the service's explanation thread)."""

    def __init__(self, predictor, limits):
        self.predictor, self.limits = predictor, limits

    def request(self, lm, kind: str, payload, top_k: int) -> dict:
        return explain_request(self.predictor, lm, self.limits, kind, payload, top_k)

    def close(self) -> None:
        pass


class ExplainProcess:
    """`request(lm, kind, payload, top_k)`, answered by a child process started on first use with the model
    version `lm` names."""

    def __init__(self, model_dir: str | Path, normalizer_path: str | Path, signing_public_key: str | Path | None,
                 limits):
        self._args = (str(model_dir), str(normalizer_path), str(signing_public_key) if signing_public_key else None,
                      limits.model_dump())
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def request(self, lm, kind: str, payload, top_k: int) -> dict:
        # the service's normalisation and calibration, not whatever the files hold when the child reads them
        state = {"normalizer": lm.normalizer.arrays(), "temperature": lm.temperature, "calibration": lm.calibration}
        with self._lock:  # one request at a time (the service has one explanation thread)
            self._start()
            try:
                self._conn.send((lm.version, state, kind, payload if kind == "json" else str(payload), top_k))
                if not self._conn.poll(ANSWER_WITHIN_S):
                    self._stop()
                    raise ExplainProcessError(f"the explanation process did not answer within {ANSWER_WITHIN_S:g} s "
                                              "and was stopped; it starts again with the next explanation")
                status, value = self._conn.recv()
            except (EOFError, OSError) as e:
                self._stop()
                raise ExplainProcessError(f"the explanation process ended ({type(e).__name__}); it starts again "
                                          "with the next explanation") from None
        return answer_value(status, value, ExplainProcessError)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _start(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop()
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and a loaded model
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, *self._args), daemon=True, name="oncofed-explain")
        self._proc.start()
        child.close()

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join(5)
        self._proc = self._conn = None

    def close(self) -> None:
        with self._lock:
            self._stop()


def _serve(conn, model_dir: str, normalizer_path: str, signing_public_key: str | None, limits: dict) -> None:
    from client.serve_queue import run_in_background

    run_in_background()  # inherited from the explanation thread that started it; set again to say so
    import torch

    from client.predict import Predictor
    from privacy.site_config import ServeSettings
    from shared_models.site_data import Normalizer

    torch.set_num_threads(1)
    settings = ServeSettings.model_validate(limits)
    # normalisation and calibration come with each request (the service's); the files are read only because
    # loading a version reads them
    predictor = Predictor(model_dir, normalizer_path, signing_public_key, load_active=False)
    models: dict = {}
    while True:
        try:
            version, state, kind, payload, top_k = conn.recv()
        except (EOFError, OSError):
            return

        def work():
            key = (version, *(a.tobytes() for a in state["normalizer"].values()))
            if key not in models:
                models.clear()  # the model the service serves now: one at a time
                lm = predictor._load(version)
                lm.normalizer = Normalizer.from_arrays(lm.schema, state["normalizer"])
                models[key] = lm
            lm = models[key]  # the calibration the service serves with now, whatever this process saw before
            lm.temperature, lm.calibration = state["temperature"], state["calibration"]
            return explain_request(predictor, lm, settings, kind, payload, top_k)

        conn.send(answered(work, "explanation failed in the explanation process"))
