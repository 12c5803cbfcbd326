"""The model's work queues in the site service: bounded, batched, audited before answering.

A `ModelQueue` serves plain predictions, an `ExplanationLane` explanation requests (integrated gradients
cost ~30x a forward pass, and the lane answers each request whole elsewhere): each has its own thread, so
a 300-patient explanation never waits in front of a single-patient prediction. Each holds at most
`capacity` patients; `submit` beyond that raises `QueueFull` at once (the service answers 503 with
Retry-After) instead of letting latency grow.

Per queue, the model thread takes whatever has queued (up to `max_patients`; after waiting up to
`window_s` for more when a batching window is set), scores it in one call, and hands the batch to
the audit thread, which writes every entry of the batches waiting for it with one fsync and only
then answers their requests. The model scores the next batch while the disk commits the last one:
an answered prediction always has its durable audit entry. What a commit may defer (the audit log's
head: privacy/audit.py says why that is safe) is done by `idle()` once no batch has come for
`IDLE_S`, and at least every `MAX_DEFER_S` under continuous load, never on a request's path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

ANSWER_TIMEOUT_S = 120.0  # a request the model has not answered by then gets 503 (the service is overloaded)

IDLE_S = 0.05  # no batch for this long: the audit thread is idle
MAX_DEFER_S = 1.0  # under continuous load, deferred work still runs this often


class QueueFull(Exception):
    def __init__(self, waiting: int, capacity: int, retry_after: int):
        self.waiting, self.capacity, self.retry_after = waiting, capacity, retry_after
        super().__init__(f"{waiting} patients already wait for the model (at most {capacity}); retry in "
                         f"{retry_after} s")

    @classmethod
    def of(cls, waiting: int, capacity: int, seconds_per_patient: float) -> "QueueFull":
        """The refusal of a queue holding `waiting` patients, which it works off at `seconds_per_patient`."""
        return cls(waiting, capacity, max(1, int(np.ceil(waiting * seconds_per_patient))))


@dataclass
class Job:
    ids: list[str]
    raw: np.ndarray
    top_k: int
    who: dict
    lm: object  # the LoadedModel the raw matrix was built for
    extra: dict  # what the audit entry records besides the rows (e.g. the channel)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class ModelQueue:
    def __init__(self, name: str, predictor, format_rows, commit, *, idle=None, max_patients: int = 256,
                 capacity: int = 4096, window_s: float = 0.0):
        self.name, self.predictor, self.format_rows, self.commit = name, predictor, format_rows, commit
        self.idle = idle  # what commits deferred (e.g. AuditLog.write_head); None: nothing is deferred
        self.max_patients, self.capacity, self.window_s = max_patients, capacity, window_s
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.committing: "queue.Queue[list]" = queue.Queue()
        self._waiting = 0
        self._count_lock = threading.Lock()
        self.seconds_per_patient = 0.001  # moving estimate, for Retry-After
        self._last_jobs = 1  # requests in the last batch: how many a batching window waits for
        threading.Thread(target=self._score, daemon=True, name=f"oncofed-{name}").start()
        threading.Thread(target=self._audit, daemon=True, name=f"oncofed-{name}-audit").start()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def submit(self, ids, raw, top_k, who, lm, extra: dict, timeout: float = ANSWER_TIMEOUT_S) -> tuple[str, list[dict]]:
        n = len(ids)
        with self._count_lock:
            if self._waiting + n > self.capacity and self._waiting > 0:
                raise QueueFull.of(self._waiting, self.capacity, self.seconds_per_patient)
            self._waiting += n
        loop = asyncio.get_running_loop()
        job = Job(ids, raw, top_k, who, lm, extra, loop, loop.create_future())
        self.jobs.put(job)
        return await asyncio.wait_for(job.future, timeout)

    def _done(self, n: int) -> None:
        with self._count_lock:
            self._waiting -= n

    def _take(self) -> list[Job]:
        """The next batch: what has queued, and with a window, up to window_s more waiting for as many requests
        as the last batch held (a lone client's request never waits for company that is not coming; under
        concurrency the batch is held until the requests that came together last time are in)."""
        jobs = [self.jobs.get()]
        n = len(jobs[0].ids)
        deadline = time.perf_counter() + self.window_s
        while n < self.max_patients:
            try:
                left = deadline - time.perf_counter()
                wait = left > 0 and len(jobs) < self._last_jobs
                job = self.jobs.get(timeout=left) if wait else self.jobs.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            n += len(job.ids)
        self._last_jobs = len(jobs)
        return jobs

    def _score(self) -> None:
        while True:
            jobs = self._take()
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:  # one model call per model and top_k
                groups.setdefault((id(job.lm), job.top_k), []).append(job)
            for group in groups.values():
                n = sum(len(j.ids) for j in group)
                t0 = time.perf_counter()
                try:
                    raw = np.concatenate([j.raw for j in group]) if len(group) > 1 else group[0].raw
                    lm, result = self.predictor.predict(raw, top_k=group[0].top_k, lm=group[0].lm)
                    rows = self.format_rows(lm, [i for j in group for i in j.ids], result, group[0].top_k)
                    out, start = [], 0
                    for j in group:
                        out.append((j, lm.version, rows[start:start + len(j.ids)]))
                        start += len(j.ids)
                    self.committing.put(out)
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    for j in group:
                        _answer(j, None, e)
                finally:
                    self._done(n)
                    per = (time.perf_counter() - t0) / max(n, 1)
                    self.seconds_per_patient = 0.8 * self.seconds_per_patient + 0.2 * per

    def _audit(self) -> None:
        deferred_since = None  # when the oldest commit whose deferred work is not done yet returned
        while True:
            try:
                done = list(self.committing.get(timeout=None if deferred_since is None else IDLE_S))
            except queue.Empty:
                self._run_idle()
                deferred_since = None
                continue
            while True:
                try:
                    done += self.committing.get_nowait()
                except queue.Empty:
                    break
            try:
                self.commit(done)
                for job, version, rows in done:
                    _answer(job, (version, rows))
            except Exception as e:  # noqa: BLE001 - no answer without its audit entry
                for job, _, _ in done:
                    _answer(job, None, e)
            if self.idle is not None:
                deferred_since = deferred_since or time.monotonic()
                if time.monotonic() - deferred_since >= MAX_DEFER_S:
                    self._run_idle()
                    deferred_since = None

    def _run_idle(self) -> None:
        run_deferred(self.idle, f"{self.name} queue")


@dataclass
class Explanation:
    kind: str  # "json" or "tables" (client/explain_process.py)
    payload: object
    top_k: int
    patients: int  # an upper bound, for admission
    size: int  # bytes held while it waits
    who: dict
    lm: object
    extra: dict
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class ExplanationLane:
    """Explanation requests, each answered whole by `explainer.request(lm, kind, payload, top_k)` (a child
    process or this process: client/explain_process.py), one at a time. Holds at most `capacity` patients
    (counted by an upper bound before parsing) and `max_bytes` of waiting requests; beyond either, `submit`
    raises QueueFull. The work runs in one thread (at SCHED_IDLE with `background`, when it is done in this
    process); each answer's audit entry is made durable (`commit`) by a second thread at normal priority
    (it shares the audit log with the predictions), before the answer is sent; the deferred head is written
    (`idle`) whenever nothing is waiting."""

    def __init__(self, explainer, commit, *, idle, capacity: int, max_bytes: int, background: bool = False):
        self.explainer, self.commit, self.idle = explainer, commit, idle
        self.capacity, self.max_bytes, self.background = capacity, max_bytes, background
        self.jobs: "queue.Queue[Explanation]" = queue.Queue()
        self.done: "queue.Queue[tuple]" = queue.Queue()
        self._waiting = self._bytes = 0
        self._count_lock = threading.Lock()
        self.seconds_per_patient = 0.01  # moving estimate, for Retry-After
        threading.Thread(target=self._work, daemon=True, name="oncofed-explain").start()
        threading.Thread(target=self._commit, daemon=True, name="oncofed-explain-audit").start()

    @property
    def waiting(self) -> int:
        return self._waiting

    async def submit(self, kind: str, payload, top_k: int, patients: int, who: dict, lm, extra: dict,
                     size: int = 0, timeout: float = ANSWER_TIMEOUT_S) -> dict:
        with self._count_lock:
            if self._waiting > 0 and (self._waiting + patients > self.capacity or self._bytes + size > self.max_bytes):
                raise QueueFull.of(self._waiting, self.capacity, self.seconds_per_patient)
            self._waiting += patients
            self._bytes += size
        loop = asyncio.get_running_loop()
        job = Explanation(kind, payload, top_k, patients, size, who, lm, extra, loop, loop.create_future())
        self.jobs.put(job)
        return await asyncio.wait_for(job.future, timeout)

    def _work(self) -> None:
        if self.background:
            run_in_background()
        while True:
            job = self.jobs.get()
            t0 = time.perf_counter()
            try:
                out, error = self.explainer.request(job.lm, job.kind, job.payload, job.top_k), None
            except Exception as e:  # noqa: BLE001 - the request gets the error
                out, error = None, e
            with self._count_lock:  # done with: before its answer, which may come at once
                self._waiting -= job.patients
                self._bytes -= job.size
            self.seconds_per_patient = 0.8 * self.seconds_per_patient + 0.2 * (time.perf_counter() - t0) / job.patients
            self.done.put((job, out, error))

    def _commit(self) -> None:
        while True:
            job, out, error = self.done.get()
            if error is None:
                try:
                    self.commit(job, out)
                except Exception as e:  # noqa: BLE001 - no answer without its audit entry
                    out, error = None, e
            _answer(job, out, error)
            if self.done.empty() and self.jobs.empty() and self.idle is not None:
                run_deferred(self.idle, "explanations")


def run_deferred(idle, who: str) -> None:
    """What the audit commits deferred (`idle`, e.g. AuditLog.write_head); a failure is logged and retried at
    the next idle moment (the next commit reports a broken log)."""
    try:
        idle()
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).exception("%s: deferred audit work failed", who)


def run_in_background() -> None:
    """The calling thread (or a process's main thread) gets the CPU only when no normal thread wants it: Linux's SCHED_IDLE (a normal thread
    that wakes up preempts it at once; at nice 10 it waits for the running thread's slice), else nice 10.
    Under benchmarks/serve.py's explanation load the prediction p99 rose less with SCHED_IDLE than at
    nice 10 in each of five one-off pairs (git log -p docs/results.md)."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 10)
        except (AttributeError, OSError):
            pass


def _resolve(fut, value, error) -> None:
    if fut.done():  # e.g. the request timed out
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _answer(job, value, error=None) -> None:
    try:
        job.loop.call_soon_threadsafe(_resolve, job.future, value, error)
    except RuntimeError:  # the event loop is gone (shutdown): nobody is waiting
        pass
