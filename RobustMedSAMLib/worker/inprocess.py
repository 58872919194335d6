"""The worker client's interface without a worker: the engine's handlers in this process (batch mode, tests).

Requests still pass through the wire codec (``roundtrip``), so what works here is what the worker carries.
"""
from __future__ import annotations

import traceback
from collections import deque
from typing import Any, Deque, Dict, Optional

from .requests import CANCELLED, ERROR, OK, BaseClient, Request
from .protocol import decode_body, frame_bytes


class InProcessClient(BaseClient):
    """The :class:`WorkerClient` interface over an :class:`~.service.EngineService` in this process.

    ``submit`` runs the request at once (in the calling thread; progress callbacks are called as it goes) but,
    like the worker, calls ``on_done`` from :meth:`poll`/:meth:`wait` only. Fields and results pass through
    the wire codec (``roundtrip``).
    """

    def __init__(self, service=None, roundtrip: bool = True) -> None:
        super().__init__()
        if service is None:
            from .service import EngineService

            service = EngineService()
        self.service = service
        self.roundtrip = roundtrip
        self.generation = 1
        self._replies: Deque[Dict[str, Any]] = deque()

    alive = True

    def _through_wire(self, value):
        if not self.roundtrip:
            return value
        data = frame_bytes(value)
        header_length = int.from_bytes(data[4:12], "little")
        return decode_body(bytearray(data[20:]), header_length)

    def submit(self, kind, fields=None, on_progress=None, on_done=None) -> Request:
        from .server import CANCELLATIONS
        from .service import JobContext

        request = Request(self, next(self._ids), kind, dict(fields or {}), on_progress, on_done)
        self._pending[request.id] = request
        ctx = JobContext(lambda d, t=None, m="": request._progress(float(d), t, m),  # live: same thread
                         lambda: getattr(request, "_cancel_asked", False))
        try:
            result = self.service.handle(kind, self._through_wire(request.fields), ctx)
            reply = {"type": "reply", "id": request.id, "status": OK, "result": result}
        except Exception as exc:  # noqa: BLE001 - reported through the request, as the worker does
            status = CANCELLED if type(exc).__name__ in CANCELLATIONS else ERROR
            reply = {"type": "reply", "id": request.id, "status": status,
                     "error": {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__,
                               "traceback": traceback.format_exc()}}
            request._original = exc
        self._replies.append(self._through_wire(reply))
        return request

    def _dispatch(self, message: Dict[str, Any]) -> None:
        request = self._pending.get(message.get("id"))
        super()._dispatch(message)
        if request is not None and request.error is not None and getattr(request, "_original", None) is not None:
            request.error.original = request._original

    def cancel(self, request: Request) -> None:
        request._cancel_asked = True

    def poll(self, budget: float = 0.01, chunk: int = 0) -> int:
        while self._replies:
            self._dispatch(self._replies.popleft())
        return self.pending

    def wait(self, request: Request, timeout: Optional[float] = None) -> Request:
        self.poll()
        return request

    def unload(self, timeout: float = 0.0) -> bool:
        self.service.close()
        self.service.loaded = None
        self.service.load_key = None
        return True

    def close(self) -> None:
        self.poll()
