"""Background work with progress and cancel, for a GUI thread that polls it.

Model downloads, model loading and propagation run in a worker thread; they report progress through
:meth:`BackgroundTask.progress` (thread-safe) and poll :meth:`BackgroundTask.cancelled`. The GUI thread
reads :meth:`BackgroundTask.poll` from a Qt timer that runs only while a task is active, and does every
MRML change itself once the task has finished (MRML is not thread-safe).
"""
from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclass(frozen=True)
class TaskState:
    status: str
    done: float
    total: Optional[float]
    message: str
    result: Any = None
    error: Optional[BaseException] = None
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status != RUNNING

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return max(0.0, min(1.0, float(self.done) / float(self.total)))


def _is_cancellation(exc: BaseException) -> bool:
    return type(exc).__name__ in ("PropagationCancelled", "DownloadCancelled", "TaskCancelled")


class TaskCancelled(RuntimeError):
    pass


class BackgroundTask:
    """Run ``fn(task)`` in a daemon thread; ``fn`` calls ``task.progress(done, total, message)`` and checks
    ``task.cancelled()`` (or passes ``task.cancelled`` to the engine as its ``cancel`` callback)."""

    def __init__(self, fn: Callable[["BackgroundTask"], Any], name: str = "RobustMedSAM task") -> None:
        self._fn = fn
        self.name = name
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._state = TaskState(RUNNING, 0, None, "starting")
        self._thread: Optional[threading.Thread] = None
        self.started_at: Optional[float] = None

    def start(self) -> "BackgroundTask":
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self._fn(self)
        except BaseException as exc:  # noqa: BLE001 - reported to the GUI thread
            status = CANCELLED if (_is_cancellation(exc) or self._cancel.is_set()) else FAILED
            with self._lock:
                s = self._state
                self._state = TaskState(status, s.done, s.total, str(exc) or type(exc).__name__, None, exc,
                                        traceback.format_exc())
            return
        with self._lock:
            s = self._state
            status = CANCELLED if self._cancel.is_set() and result is None else DONE
            self._state = TaskState(status, s.total if s.total else s.done, s.total, "done" if status == DONE
                                    else "cancelled", result)

    # called from the worker -------------------------------------------------------------------------
    def progress(self, done: float, total: Optional[float] = None, message: str = "") -> None:
        with self._lock:
            if self._state.status == RUNNING:
                self._state = TaskState(RUNNING, done, total, message or self._state.message)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise TaskCancelled("cancelled")

    # called from the GUI thread ---------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def poll(self) -> TaskState:
        with self._lock:
            return self._state

    def wait(self, timeout: Optional[float] = None) -> TaskState:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()

    @property
    def running(self) -> bool:
        return self.poll().status == RUNNING


def run_inline(fn: Callable[[BackgroundTask], Any]) -> TaskState:
    """Run a task function in the calling thread (batch mode, tests); returns its final state."""
    task = BackgroundTask(fn)
    task._run()
    return task.poll()
