"""Small JSON prediction requests parsed and checked in a child process, off the service's GIL.

Under 16 connections of single-patient requests, the service's event loop was its bottleneck: it ran at
~0.73 of a core while ~0.6 of the machine's two cores stood idle, and parsing and checking a request
against the input contract (client/prediction_input.py, ~270 us alone, about twice that under load)
was over half of its samples. Threads do not help: they share the GIL with the loop and the model's
thread. `InputProcess` sends each body to one child process over a socket pair and awaits its answer
on the event loop; the child parses it and runs the contract (`parse_request`, `checked_json`: the same
code, the same messages) and sends back the checked patients (ids, raw matrix, notes, warnings), the
refusal, or the request's top_k when it asks for explanations (which go whole to the explanation lane).

The child holds no model: it checks with the schema and the normalisation of the model the service
chose for the request (`ContractModel`), sent to it before the first request that uses them. Requests
are answered in the order they are sent. A child that dies or does not answer within ANSWER_WITHIN_S
is stopped; the requests in flight get `InputProcessError` (the service answers 503 with Retry-After)
and the next request starts a new child. A body that crashes the child crashes only the child. The child
is a crash boundary, not a security boundary: it runs as the service's user (as the explanation child
does), and the service unpickles its answers.

Framing: 4-byte big-endian length, then a pickle (protocol 5) of a tuple. To the child: ("model",
schema JSON, mean, scale) or ("check", id, body). From it: (id, "ok", (patients, top_k, checked or None)),
(id, "refused", (problems, status)) or (id, "failed", message).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import signal
import socket
import struct

from client.explain_process import answer_value, answered

FRAME = struct.Struct("!I")
ANSWER_WITHIN_S = 30.0  # an INLINE_BYTES body is checked in milliseconds; a child this late is hung
MAX_IN_FLIGHT = 256  # requests sent and not answered (at most 16 MB of bodies): beyond, 503 at once


class InputProcessError(RuntimeError):
    pass


class InputProcess:
    """`await check(lm, body)` -> (patients, top_k, CheckedPatients or None when top_k > 0), or raises
    PredictionInputError (refused) or InputProcessError (the child failed; the request may be retried).

    The child's socket stays with this object; the event loop that calls `check` gets a connection over a
    duplicate of it, and a call from another loop replaces that connection (uvicorn runs one loop; a test
    client runs one per request). One loop at a time: this object is not thread-safe."""

    def __init__(self, limits):
        self._limits = limits.model_dump()
        self._proc = self._sock = None  # the child and our end of its socket pair
        self._loop = self._conn = self._writer = self._reading = None  # the connection on one event loop
        self._ready = None  # the task that makes that connection: concurrent requests await the same one
        self._broken = False  # the child's end closed: start another before sending
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._sent = None  # (lm, normalizer) whose schema and statistics the child holds

    async def check(self, lm, body: bytes):
        loop = asyncio.get_running_loop()
        if len(self._pending) >= MAX_IN_FLIGHT:  # a stalled child: bodies would pile up in the socket's buffer
            raise InputProcessError(f"{len(self._pending)} requests wait for the input-check process (at most "
                                    f"{MAX_IN_FLIGHT}); retry")
        for _ in range(3):  # a child that ends while connecting is replaced once or twice, then the request fails
            if self._proc is None or self._broken or not self._proc.is_alive():
                self._spawn()
            if self._loop is not loop or (self._ready.done() and self._writer is None):  # none yet, or it failed
                self._disconnect()
                self._loop, self._ready = loop, loop.create_task(self._connect(self._sock))
            ready = self._ready
            await asyncio.shield(ready)  # done after the first request: no suspension; a cancelled request
            if ready is self._ready and self._writer is not None:  # leaves the connection to the others
                break
        else:
            raise InputProcessError("the input-check process could not be started; retry")
        if self._sent is None or self._sent[0] is not lm or self._sent[1] is not lm.normalizer:
            norm = lm.normalizer
            self._send(("model", lm.schema.canonical_json(), norm.arrays()))
            self._sent = (lm, norm)
        rid = self._next = self._next + 1
        fut = self._pending[rid] = loop.create_future()
        self._send(("check", rid, body))
        try:
            status, value = await asyncio.wait_for(fut, ANSWER_WITHIN_S)
        except asyncio.TimeoutError:
            self.stop()
            raise InputProcessError(f"the input-check process did not answer within {ANSWER_WITHIN_S:g} s and "
                                    "was stopped; retry (a new one starts with the next request)") from None
        finally:
            self._pending.pop(rid, None)
        return answer_value(status, value, InputProcessError)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    async def start(self) -> None:
        """A new child, connected on the running loop (the service's startup: its imports overlap the
        service's; otherwise `check` starts one when there is none or it ended)."""
        self._spawn()
        loop = asyncio.get_running_loop()
        self._loop, self._ready = loop, loop.create_task(self._connect(self._sock))
        await asyncio.shield(self._ready)

    def _spawn(self) -> None:
        self.stop()
        try:
            ours, theirs = socket.socketpair()
        except OSError as e:  # e.g. out of file descriptors
            raise InputProcessError(f"the input-check process could not be started ({e}); retry") from None
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and a loaded model
        proc = ctx.Process(target=_serve, args=(theirs, self._limits), daemon=True, name="oncofed-input-check")
        try:
            proc.start()
        except OSError as e:  # file descriptors, memory: nothing is kept, the next request tries again
            ours.close()
            raise InputProcessError(f"the input-check process could not be started ({e}); retry") from None
        finally:
            theirs.close()
        self._proc, self._sock, self._broken = proc, ours, False

    async def _connect(self, sock: socket.socket) -> None:
        """A connection over a duplicate of `sock`; on failure none (the requests waiting on it try again)."""
        try:
            conn = self._conn = sock.dup()
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:  # out of file descriptors, or closed by a replacement meanwhile
            return
        if self._ready is not asyncio.current_task():  # replaced meanwhile (the child ended): not ours to keep
            writer.close()
            return
        self._writer, self._reading = writer, self._loop.create_task(self._read(reader))

    def _send(self, msg: tuple) -> None:
        data = pickle.dumps(msg, protocol=5)
        self._writer.write(FRAME.pack(len(data)) + data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                rid, status, value = pickle.loads(await reader.readexactly(n))
                fut = self._pending.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result((status, value))
        except Exception:  # noqa: BLE001 - the child ended, or its stream is no longer frames: replace it
            if self._reading is not asyncio.current_task():  # a connection left behind: not the current child's
                return
            self._broken = True
            self._fail_pending("the input-check process ended; retry (a new one starts with the next request)")

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                try:
                    fut.set_exception(InputProcessError(why))
                except RuntimeError:  # its loop is closed: nobody awaits it
                    pass

    def _disconnect(self) -> None:
        """Leave the current loop's connection: closed through its loop if that still runs, else its socket."""
        if self._writer is not None and not self._loop.is_closed():
            self._reading.cancel()
            self._writer.close()
        elif self._conn is not None:
            self._conn.close()
        self._fail_pending("the input-check connection was closed; retry")
        self._loop = self._conn = self._writer = self._reading = self._ready = None

    def stop(self) -> None:
        self._disconnect()
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()  # it keeps no state; a hung (or stopped) child ends at once
            self._proc.join(5)  # reaped: no zombie
        self._proc = self._sock = self._sent = None


def _serve(sock: socket.socket, limits: dict) -> None:
    """The child: answers each request in turn until the service closes its end."""
    from client.prediction_input import ContractModel, checked_json, parse_request
    from privacy.site_config import ServeSettings
    from shared_models.schema import FeatureSchema
    from shared_models.site_data import Normalizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the service, which then stops this child
    settings = ServeSettings.model_validate(limits)
    stream = sock.makefile("rb")
    model = None
    while True:
        head = stream.read(FRAME.size)
        if len(head) < FRAME.size:
            return
        msg = pickle.loads(stream.read(FRAME.unpack(head)[0]))
        if msg[0] == "model":
            schema = FeatureSchema.model_validate_json(msg[1])
            model = ContractModel(schema, Normalizer.from_arrays(schema, msg[2]))
            continue
        _, rid, body = msg

        def work():
            patients, top_k = parse_request(body, settings)
            return len(patients), top_k, None if top_k else checked_json(model, patients, settings)

        data = pickle.dumps((rid, *answered(work, "the input check failed")), protocol=5)
        sock.sendall(FRAME.pack(len(data)) + data)
