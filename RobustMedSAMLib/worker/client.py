"""Talking to the engine worker without ever waiting for it (numpy only; torch is never imported here).

:class:`WorkerClient` starts ``python -m RobustMedSAMLib.worker`` (Slicer passes its ``PythonSlicer``),
sends requests down the worker's standard input and reads frames from its standard output. :meth:`poll`
never blocks: it writes what the pipe takes, reads what has arrived (within a time budget) and calls the
requests' callbacks; the Slicer side calls it from a Qt timer while requests are pending. :meth:`wait` is the
blocking form for scripts and tests. When the worker dies (killed, out of memory, crashed), every pending
request fails with :class:`WorkerDied`, naming the exit code and the last lines of the worker's log; the
next request starts a fresh worker (:attr:`generation` counts the starts).

:class:`~.inprocess.InProcessClient` has the same interface without a process (batch mode, tests).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Optional

from .protocol import FrameReader, ProtocolError, UndecodableMessage, encode_frame
from .requests import ERROR, BaseClient, Request, WorkerDied

ENGINE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the RobustMedSAMLib package
LOG_DAYS = 7  # worker logs older than this are deleted when a worker starts


# ------------------------------------------------------------------------------------------- pipes
class _Pipe:
    """Non-blocking reads of the worker's output and writes to its input (POSIX; Windows peeks the pipe)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.windows = os.name == "nt"
        if not self.windows:
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)

    def read(self, limit: int) -> Optional[bytes]:
        """Up to ``limit`` bytes that have arrived; None when nothing is there, b"" at end of stream."""
        if self.windows:
            import _winapi
            import msvcrt

            try:
                available = _winapi.PeekNamedPipe(msvcrt.get_osfhandle(self.read_fd), 0)[0]
            except (BrokenPipeError, OSError):
                return b""
            if not available:
                return None
            return os.read(self.read_fd, min(available, limit))
        try:
            return os.read(self.read_fd, limit)
        except BlockingIOError:
            return None

    def write(self, view: memoryview) -> int:
        """Write what the pipe takes now; returns the number of bytes written. On Windows the write blocks
        until the worker has read it (anonymous pipes have no non-blocking mode before Python 3.12); the
        worker's reader thread never waits for anything else, so that is the time the bytes take to cross,
        plus the worker's start-up when it is just starting. It may still write less than asked (the C
        runtime caps one write at INT_MAX bytes)."""
        if self.windows:
            return os.write(self.write_fd, view)
        try:
            return os.write(self.write_fd, view)
        except BlockingIOError:
            return 0

    def wait_readable(self, timeout: float) -> None:
        if self.windows:
            time.sleep(min(timeout, 0.01))
            return
        import select

        select.select([self.read_fd], [], [], timeout)


class WorkerClient(BaseClient):
    """The engine in a child process (see the module docstring).

    Arguments:
        executable: the Python to run the worker with (default ``sys.executable``; in Slicer ``PythonSlicer``).
        env: extra environment variables for the worker (``ENGINE_ROOT`` is put first on its PYTHONPATH).
        log_dir: where the worker's stderr goes (``robustmedsam-worker-<pid>-<token>-<n>.log``, the n-th
            worker of this client; logs older than a week are deleted; default: a temp folder).
    """

    def __init__(self, executable: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 log_dir: Optional[os.PathLike] = None) -> None:
        super().__init__()
        self.executable = executable or sys.executable
        self.extra_env = dict(env or {})
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="robustmedsam-worker-"))
        self.process: Optional[subprocess.Popen] = None
        self.log_path: Optional[Path] = None
        self._pipe: Optional[_Pipe] = None
        self._reader = FrameReader()
        self._outbox: Deque[memoryview] = deque()
        self.exit_code: Optional[int] = None
        self._token = uuid.uuid4().hex[:8]
        #: seconds a worker that closed its output may take to end before poll() kills it
        self.exit_grace = 5.0
        self._eof_at: Optional[float] = None

    # -- process -------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the worker unless it runs (cheap: the worker imports torch in its own time)."""
        if self.alive:
            return
        while self.process is not None:  # a worker that ended unnoticed: deliver what it wrote, fail the rest
            self.poll(budget=1.0)
        self._reset_process()
        env = dict(os.environ)
        env.update(self.extra_env)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([ENGINE_ROOT] + paths)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        self._prune_logs()
        # named by this client (pid + token): two Slicer sessions share the log folder and must not
        # truncate each other's logs
        self.log_path = self.log_dir / f"robustmedsam-worker-{os.getpid()}-{self._token}-{self.generation}.log"
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([self.executable, "-m", "RobustMedSAMLib.worker"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(self.log_dir),
                                            creationflags=flags, close_fds=True)
        self._pipe = _Pipe(self.process.stdout.fileno(), self.process.stdin.fileno())
        self.exit_code = None

    def _prune_logs(self) -> None:
        """Delete worker logs of earlier sessions older than :data:`LOG_DAYS` days."""
        cutoff = time.time() - LOG_DAYS * 86400
        for old in self.log_dir.glob("robustmedsam-worker-*.log"):
            try:
                if old.stat().st_mtime < cutoff:
                    old.unlink()
            except OSError:
                pass

    def _reset_process(self) -> None:
        self._eof_at = None
        self._reader = FrameReader()
        self._outbox.clear()
        if self.process is not None:
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        self.process, self._pipe = None, None

    def log_tail(self, lines: int = 12) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_bytes()[-20000:].decode("utf-8", "replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- requests ------------------------------------------------------------------------------------
    def submit(self, kind: str, fields: Optional[Dict[str, Any]] = None, on_progress: Optional[Callable] = None,
               on_done: Optional[Callable] = None) -> Request:
        """Queue a request for the worker (starting it if needed); returns at once."""
        self.start()
        request = Request(self, next(self._ids), kind, dict(fields or {}), on_progress, on_done)
        self._outbox.extend(encode_frame({"id": request.id, "kind": kind, "fields": request.fields}))
        self._pending[request.id] = request
        self._flush()
        return request

    def cancel(self, request: Request) -> None:
        if request.id in self._pending and self.alive:
            self._outbox.extend(encode_frame({"id": 0, "kind": "cancel", "fields": {"target": request.id}}))
            self._flush()

    def _flush(self) -> None:
        while self._outbox and self._pipe is not None:
            head = self._outbox[0]
            try:
                n = self._pipe.write(head)
            except (BrokenPipeError, OSError):
                self._outbox.clear()  # the worker is gone; poll() reports it
                return
            if n == 0:
                return
            if n < len(head):
                self._outbox[0] = head[n:]
                return
            self._outbox.popleft()

    def poll(self, budget: float = 0.01, chunk: int = 1 << 20) -> int:
        """Exchange what is ready without blocking (at most about ``budget`` seconds of reading), call the
        callbacks of requests that progressed or finished; returns how many requests are pending."""
        if self.process is None:
            return self.pending
        start = time.monotonic()
        self._flush()
        eof = False
        while True:
            data = self._pipe.read(chunk)
            if data is None:
                break
            if data == b"":
                eof = True
                break
            try:
                messages = self._reader.feed(data)
            except ProtocolError as e:  # something else wrote into the worker's output: it cannot go on
                for message in e.messages:
                    self._dispatch(message)
                self._stream_broken(str(e))
                return self.pending
            for message in messages:
                if isinstance(message, UndecodableMessage) and message.id is None:
                    self._stream_broken(message.error)
                    return self.pending
                self._dispatch(message)
            if time.monotonic() - start >= budget:
                return self.pending
        if self.process.poll() is not None:
            self._worker_ended()
        elif eof:  # its output closed but the process lives on (ending, or hung): never wait for it here
            if self._eof_at is None:
                self._eof_at = time.monotonic()
            elif time.monotonic() - self._eof_at > self.exit_grace:
                self.process.kill()
                self._worker_ended("it closed its output but did not end, and was killed")
        return self.pending

    def _stream_broken(self, why: str) -> None:
        """The worker's output cannot be read any further: stop it and fail what is pending."""
        logging.getLogger(__name__).error("RobustMedSAM: the engine process's output is unreadable: %s", why)
        if self.alive:
            self.process.kill()
        self._worker_ended(f"its output could not be read: {why}")

    def _worker_ended(self, reason: Optional[str] = None) -> None:
        code = self.process.wait()
        self.exit_code = code
        pending = list(self._pending.values())
        self._pending.clear()
        self._reset_process()
        if not pending:
            return
        why = {-9: "it was killed (SIGKILL; out of memory?)", -15: "it was terminated", -11: "it crashed (SIGSEGV)"}
        reason = reason or why.get(code, f"exit code {code}")
        tail = self.log_tail()
        message = (f"the RobustMedSAM engine process stopped ({reason}); nothing was changed, and the next action "
                   f"starts it again." + (f"\nLast lines of its log ({self.log_path}):\n{tail}" if tail else ""))
        for request in pending:
            request._finish(ERROR, error=WorkerDied(message, "WorkerDied", tail))

    def wait(self, request: Request, timeout: Optional[float] = None) -> Request:
        """Block until ``request`` finishes (or ``timeout`` seconds pass: TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.finished:
            self.poll(budget=0.05)
            if request.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{request.kind} did not finish within {timeout} s")
            if self._pipe is not None and not self._outbox:
                self._pipe.wait_readable(0.05)
            else:
                time.sleep(0.001)
        return request

    def unload(self, timeout: float = 30.0) -> bool:
        """Ask the worker to exit (its memory goes back to the system); True once it has.

        The worker cancels what runs and exits at once when idle or between slices; one encoding in flight
        cannot be interrupted, so after ``timeout`` seconds in all the process is killed (the encoding cache
        and downloads are written atomically or resumable: nothing is left half-written).
        """
        process = self.process
        if process is None or process.poll() is not None:
            if process is not None:
                self.poll()
            return True
        deadline = time.monotonic() + timeout
        try:
            self.wait(self.submit("unload"), timeout)
        except TimeoutError:
            pass
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self.process is process:
            self.poll()  # collects the end of the stream
        return True

    def close(self) -> None:
        """Stop the worker now (pending requests fail); the process is reaped, its pipes closed."""
        if self.process is None:
            return
        if self.alive:
            self.process.kill()
        self._worker_ended("it was closed by the client")
