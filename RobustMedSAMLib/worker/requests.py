"""Requests to the engine and their outcome, the same for the worker and the in-process client (no torch).

A :class:`Request` is pending until its reply; ``on_progress(request)`` and ``on_done(request)`` (once, whatever
the outcome) run in the thread that polls the client, i.e. Slicer's GUI thread. :class:`BaseClient` turns the
engine's reply messages (``progress``, then one reply with ``status`` ok / error / cancelled / dropped) into
request updates.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Dict, Optional

from .protocol import UndecodableMessage

PENDING, OK, ERROR, CANCELLED, DROPPED = "pending", "ok", "error", "cancelled", "dropped"


class EngineError(RuntimeError):
    """A request failed in the engine. ``kind`` is the engine's exception type, ``details`` its traceback."""

    def __init__(self, message: str, kind: str = "EngineError", details: str = "") -> None:
        super().__init__(message)
        self.kind, self.details = kind, details


class WorkerDied(EngineError):
    """The worker process ended while requests were pending; the next request starts a new one."""


class RequestCancelled(EngineError):
    """The request was cancelled (or, for a prefetch, superseded by a newer one)."""


class Request:
    """One request. ``status`` is pending until the reply; ``done``/``total``/``message`` follow progress.

    Callbacks (called from :meth:`WorkerClient.poll`, i.e. the GUI thread): ``on_progress(request)``,
    ``on_done(request)`` once, whatever the outcome.
    """

    def __init__(self, client, rid: int, kind: str, fields: Dict[str, Any], on_progress=None, on_done=None) -> None:
        self.client, self.id, self.kind, self.fields = client, rid, kind, fields
        self.on_progress, self.on_done = on_progress, on_done
        self.status = PENDING
        self.result: Any = None
        self.error: Optional[EngineError] = None
        self.done, self.total, self.message = 0.0, None, ""
        self.started_at = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.status != PENDING

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def fraction(self) -> Optional[float]:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def cancel(self) -> None:
        """Ask the engine to stop this request (no effect once finished)."""
        if not self.finished:
            self.client.cancel(self)

    def value(self) -> Any:
        """The result; raises the request's error (or :class:`RequestCancelled`)."""
        if self.status == OK:
            return self.result
        if self.status == PENDING:
            raise RuntimeError(f"request {self.kind!r} has not finished")
        if getattr(self.error, "original", None) is not None:
            raise self.error.original  # in-process: the engine's own exception
        raise self.error or RequestCancelled(f"{self.kind} was {self.status}", self.status)

    def __repr__(self) -> str:
        return f"<Request {self.id} {self.kind} {self.status}>"

    # -- called by the client ------------------------------------------------------------------------
    def _progress(self, done, total, message) -> None:
        self.done, self.total, self.message = done, total, message or self.message
        if self.on_progress is not None:
            _call(self.on_progress, self)

    def _finish(self, status: str, result: Any = None, error: Optional[EngineError] = None) -> None:
        if self.finished:
            return
        self.status, self.result, self.error = status, result, error
        if status in (CANCELLED, DROPPED) and error is None:
            self.error = RequestCancelled(f"{self.kind} was {status}", status)
        if self.on_done is not None:
            _call(self.on_done, self)


def _call(callback, request: Request) -> None:
    """Run a request's callback; a failing one is logged and does not stop the other replies."""
    try:
        callback(request)
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).exception("RobustMedSAM: the callback of %s failed", request)


def _error_from(reply: Dict[str, Any]) -> EngineError:
    e = reply.get("error") or {}
    return EngineError(e.get("message", "the engine failed"), e.get("type", "EngineError"), e.get("traceback", ""))


class BaseClient:
    """What both clients share: request ids, the pending table, and reply dispatch."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: Dict[int, Request] = {}
        self.generation = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, kind: str, fields: Optional[Dict[str, Any]] = None, on_progress: Optional[Callable] = None,
               on_done: Optional[Callable] = None) -> Request:
        raise NotImplementedError

    def call(self, kind: str, timeout: Optional[float] = None, **fields) -> Any:
        """Submit, wait and return the result (raises the engine's error)."""
        return self.wait(self.submit(kind, fields), timeout).value()

    def wait(self, request: Request, timeout: Optional[float] = None) -> Request:
        raise NotImplementedError

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, UndecodableMessage):
            request = self._pending.pop(message.id, None)
            if request is not None:
                request._finish(ERROR, error=EngineError(f"the engine's answer to {request.kind!r} could not be read: "
                                                         f"{message.error}", "ProtocolError"))
            return
        if not isinstance(message, dict):
            return
        request = self._pending.get(message.get("id"))
        if request is None:
            return
        if message.get("type") == "progress":
            request._progress(message.get("done", 0.0), message.get("total"), message.get("message", ""))
            return
        del self._pending[request.id]
        status = message.get("status")
        if status == OK:
            request._finish(OK, message.get("result"))
        elif status in (CANCELLED, DROPPED):
            request._finish(status)
        else:
            request._finish(ERROR, error=_error_from(message))
