"""The worker process: requests in on standard input, replies and progress out on a private copy of
standard output (``python -m RobustMedSAMLib.worker``).

Threads (in the worker; its GIL is its own): a reader thread parses frames as they arrive, answers
``cancel`` at once and queues the rest; one job thread runs the queued requests through an
:class:`~.service.EngineService`, one at a time (the model is not shared between threads); one writer
thread sends what the other two queue, so neither ever waits for the client to read (a reply's arrays
must not change once returned). Scheduling:

* ``predict`` runs before the prefetches queued ahead of it (they move behind it) but after every other
  request sent before it (the ``load`` or ``set_volume`` it needs): a click is never stuck behind prefetches;
* ``prefetch`` is latest-wins: a new one drops every prefetch not yet started (reply status "dropped"), so
  scrolling through 50 slices queues at most one encode;
* every other request runs in arrival order; ``cancel`` ends the target if it is running (its handler sees
  ``cancelled()``) or drops it if it is still queued;
* ``unload`` cancels the running request and every queued one, replies and exits: the process ends and its
  memory goes back to the operating system;
* ``journal`` is answered at once: the last 200 requests with their status and when (worker clock) each
  was received, started and ended -- how long a click waited, and for what.

Messages out: ``{"type": "progress", "id", "done", "total", "message"}`` (at most every 50 ms per request,
and the last one always) and ``{"type": "reply", "id", "status": ok|error|cancelled|dropped, "result" |
"error"}``; ``error`` is ``{"type", "message", "traceback"}``. The worker exits when its input closes (the
Slicer process went away), so it never outlives its client.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, Deque, Dict, Optional

from .protocol import FrameReader, ProtocolError, UndecodableMessage, encode_frame
from .service import EngineService, JobContext

PROGRESS_INTERVAL = 0.05
CANCELLATIONS = ("PropagationCancelled", "DownloadCancelled", "TaskCancelled")


class _Job:
    def __init__(self, message: Dict[str, Any]) -> None:
        self.id = message.get("id")
        self.kind = message.get("kind", "")
        self.fields = message.get("fields") or {}
        self.cancelled = threading.Event()
        self.record = {"id": self.id, "kind": self.kind, "status": "queued", "received": time.monotonic(),
                       "started": None, "ended": None}


class WorkerServer:
    """Serve requests read from ``read_fd`` with ``service``, writing frames to ``write_fd``."""

    def __init__(self, service: EngineService, read_fd: int, write_fd: int) -> None:
        self.service = service
        self.read_fd, self.write_fd = read_fd, write_fd
        self._queue: Deque[_Job] = deque()
        self._cond = threading.Condition()
        self._outgoing: "queue.Queue[Optional[list]]" = queue.Queue()
        self._writer: Optional[threading.Thread] = None
        self._running: Optional[_Job] = None
        self._closing = False
        self.journal: Deque[Dict[str, Any]] = deque(maxlen=200)

    # -- output --------------------------------------------------------------------------------------
    def send(self, message: Dict[str, Any]) -> None:
        """Queue ``message`` for the writer thread (encoded here, so an unsendable value fails here). Never
        waits for the pipe: the reader thread must keep draining the client's requests even while the client
        is not reading (on Windows its writes block until they are read)."""
        self._outgoing.put(encode_frame(message))

    def _write_loop(self) -> None:
        while True:
            pieces = self._outgoing.get()
            if pieces is None:
                return
            try:
                for view in pieces:
                    while len(view):
                        view = view[os.write(self.write_fd, view):]
            except OSError as e:  # the client is gone (EPIPE); its input ends too, and the worker with it
                print(f"RobustMedSAM worker: output failed ({e}); dropping replies", file=sys.stderr)
                while self._outgoing.get() is not None:
                    pass
                return

    def _finish_output(self, timeout: float = 10.0) -> None:
        """Let the writer send what is queued (the ``unload`` reply) before the process ends."""
        self._outgoing.put(None)
        if self._writer is not None:
            self._writer.join(timeout)

    def reply(self, job: _Job, status: str, result: Any = None, error: Optional[dict] = None) -> None:
        job.record["status"], job.record["ended"] = status, time.monotonic()
        message = {"type": "reply", "id": job.id, "kind": job.kind, "status": status}
        if status == "ok":
            message["result"] = result
        if error is not None:
            message["error"] = error
        try:
            self.send(message)
        except Exception as e:  # noqa: BLE001 - a result the protocol cannot carry: report it, keep serving
            self.send({"type": "reply", "id": job.id, "kind": job.kind, "status": "error",
                       "error": {"type": type(e).__name__, "message": f"the result could not be sent: {e}",
                                 "traceback": traceback.format_exc()}})

    # -- input ---------------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = os.read(self.read_fd, 1 << 20)
                if not data:
                    break
                for message in reader.feed(data):
                    self._accept(message)
        except Exception as e:  # noqa: BLE001 - whatever breaks the input, the worker must not hang
            print(f"RobustMedSAM worker: input stream failed ({type(e).__name__}: {e}); exiting", file=sys.stderr)
        with self._cond:  # the client is gone: stop after the running job notices
            self._closing = True
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()

    def _accept(self, message: Any) -> None:
        if isinstance(message, UndecodableMessage) or not isinstance(message, dict):
            bad = isinstance(message, UndecodableMessage)
            error = message.error if bad else f"a request must be a map, got {message!r:.80}"
            rid = message.id if bad else None
            if rid is None:  # not even its id could be read: the stream is not to be trusted
                raise ProtocolError(f"unreadable request: {error}")
            with self._cond:
                self.reply(_Job({"id": rid, "kind": "?"}), "error",
                           error={"type": "ProtocolError", "message": f"the request could not be read: {error}",
                                  "traceback": ""})
            return
        kind = message.get("kind")
        with self._cond:
            if kind == "cancel":
                fields = message.get("fields")
                target = fields.get("target") if isinstance(fields, dict) else None
                if self._running is not None and self._running.id == target:
                    self._running.cancelled.set()
                for job in [j for j in self._queue if j.id == target]:
                    self._queue.remove(job)
                    self.reply(job, "cancelled")
                return
            job = _Job(message)
            if kind == "journal":
                self.reply(job, "ok", [dict(r) for r in self.journal])
                return
            self.journal.append(job.record)
            if kind == "unload":  # the worker is to end: what runs stops at its next check, the rest never starts
                if self._running is not None:
                    self._running.cancelled.set()
                while self._queue:
                    self.reply(self._queue.popleft(), "cancelled")
            if kind == "prefetch":
                for old in [j for j in self._queue if j.kind == "prefetch"]:
                    self._queue.remove(old)
                    self.reply(old, "dropped")
            if kind == "predict":  # ahead of prefetches, never ahead of what it needs (load, set_volume...)
                waiting = [j for j in self._queue if j.kind == "prefetch"]
                for old in waiting:
                    self._queue.remove(old)
                self._queue.append(job)
                self._queue.extend(waiting)
            else:
                self._queue.append(job)
            self._cond.notify_all()

    # -- jobs ----------------------------------------------------------------------------------------
    def _run_job(self, job: _Job) -> bool:
        """Run one job; False when the worker should exit afterwards."""
        last = [0.0]

        def progress(done, total=None, text=""):
            now = time.monotonic()
            if now - last[0] >= PROGRESS_INTERVAL or (total is not None and done >= total):
                last[0] = now
                self.send({"type": "progress", "id": job.id, "done": float(done),
                           "total": None if total is None else float(total), "message": str(text)})

        job.record["started"] = time.monotonic()
        if job.kind == "unload":
            self.reply(job, "ok", {"pid": os.getpid()})
            return False
        ctx = JobContext(progress, job.cancelled.is_set)
        try:
            result = self.service.handle(job.kind, job.fields, ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the client
            if type(exc).__name__ in CANCELLATIONS or job.cancelled.is_set():
                self.reply(job, "cancelled")
            else:
                self.reply(job, "error", error={"type": type(exc).__name__, "message": str(exc) or type(exc).__name__,
                                                "traceback": traceback.format_exc()})
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                return False
            return True
        if job.cancelled.is_set() and job.kind not in ("prefetch",):
            self.reply(job, "cancelled")
        else:
            self.reply(job, "ok", result)
        return True

    def serve(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="robustmedsam-worker-output", daemon=True)
        self._writer.start()
        threading.Thread(target=self._read_loop, name="robustmedsam-worker-input", daemon=True).start()
        try:
            self._serve()
        finally:
            self._finish_output()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing and not self._queue:
                    return
                if self._closing:  # the client is gone: nothing left to answer
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                keep_going = self._run_job(job)
            finally:
                with self._cond:
                    self._running = None
            if not keep_going:
                return


def main() -> int:
    """Worker entry point: the protocol uses private duplicates of stdin and stdout; fd 1 becomes stderr and
    fd 0 the null device, so a library that prints cannot corrupt the stream and one that reads standard
    input gets end-of-file instead of request bytes."""
    out_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    read_fd = os.dup(0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(os.devnull)
    if os.name == "nt":  # binary pipes on Windows
        import msvcrt

        msvcrt.setmode(read_fd, os.O_BINARY)
        msvcrt.setmode(out_fd, os.O_BINARY)
    service = EngineService()
    server = WorkerServer(service, read_fd, out_fd)
    try:
        server.serve()
    finally:
        try:
            service.close()
        finally:
            os.close(out_fd)
    return 0
