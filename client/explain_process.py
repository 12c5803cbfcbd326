"""Explanations in a process of their own, at the lowest CPU priority.

Integrated gradients cost ~30 forward passes per patient. In the service's process they share the GIL
with the prediction path (event loop, parsing, model thread, audit thread) however low their thread's
priority. Here they run in a child process under Linux's SCHED_IDLE: it gets only CPU time that no
normal process wants, and it holds no lock the service needs. The service sends the normalised rows,
the target classes and the model version; the child loads that version from the store itself (verified
as the service verifies it: the same `Predictor`), computes the attributions and sends them back. The
probabilities, calibration and answer stay the service's.

A child that dies is started again for the next explanation; the explanation in flight gets the error.
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import numpy as np


class ExplainProcessError(RuntimeError):
    pass


class ExplainProcess:
    """`attributions(lm, x, target)`, the signature of client.predict.integrated_gradients, computed in a
    child process started on first use."""

    def __init__(self, model_dir: str | Path, normalizer_path: str | Path, signing_public_key: str | Path | None = None,
                 calibration_path: str | Path | None = None):
        self._args = (str(model_dir), str(normalizer_path), str(signing_public_key) if signing_public_key else None,
                      str(calibration_path) if calibration_path else None)
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def __call__(self, lm, x, target) -> np.ndarray:
        with self._lock:  # one explanation batch at a time (the service has one explanation thread)
            self._start()
            try:
                self._conn.send((lm.version, x.numpy(), target.numpy()))
                ok, value = self._conn.recv()
            except (EOFError, OSError) as e:
                self._stop()
                raise ExplainProcessError(f"the explanation process ended ({type(e).__name__}); it starts again "
                                          "with the next explanation") from None
        if not ok:
            raise ExplainProcessError(value)
        return value

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


def _serve(conn, model_dir: str, normalizer_path: str, signing_public_key: str | None,
           calibration_path: str | None) -> None:
    from client.serve_queue import run_in_background

    run_in_background()  # inherited from the explanation thread that started it; set again to say so
    import torch

    from client.predict import Predictor, integrated_gradients

    torch.set_num_threads(1)
    predictor = Predictor(model_dir, normalizer_path, signing_public_key, calibration_path=calibration_path,
                          load_active=False)
    models: dict = {}
    while True:
        try:
            version, x, target = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if version not in models:
                models.clear()  # the version the service serves now: one at a time
                models[version] = predictor._load(version)
            out = integrated_gradients(models[version], torch.from_numpy(x), torch.from_numpy(target))
            conn.send((True, out))
        except Exception as e:  # noqa: BLE001 - the service answers the request with it
            conn.send((False, f"explanation failed in the explanation process: {type(e).__name__}: {e}"))
