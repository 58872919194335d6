"""The worker's request loop (``RobustMedSAMLib.worker.server.WorkerServer``) on real pipes with a scripted
service: request order, queue jumping, output that the client does not read. No model: each handler only
records when it ran, and ``block`` waits until the test releases it."""
from __future__ import annotations

import os
import select
import threading
import time

import pytest

pytestmark = pytest.mark.skipif(os.name == "nt", reason="select() on pipes is POSIX")

from RobustMedSAMLib.worker.protocol import FrameReader, frame_bytes
from RobustMedSAMLib.worker.server import WorkerServer


class ScriptedService:
    """Records ``(kind, fields)`` as each request runs; ``block`` waits for :attr:`release`; ``big`` returns
    ``nbytes`` of data; ``predict`` and ``prefetch`` need their volume sent first (as the engine's do)."""

    def __init__(self) -> None:
        self.ran = []
        self.volumes = set()
        self.release = threading.Event()
        self.blocking = threading.Event()

    def handle(self, kind, fields, ctx):
        self.ran.append((kind, dict(fields)))
        if kind == "block":
            self.blocking.set()
            while not self.release.wait(0.01):
                if ctx.cancelled():
                    raise RuntimeError("TaskCancelled")
            return None
        if kind == "big":
            return "x" * int(fields["nbytes"])
        if kind == "set_volume":
            self.volumes.add(fields["key"])
            return None
        if kind in ("predict", "prefetch"):
            if fields["volume"] not in self.volumes:
                raise ValueError(f"volume {fields['volume']!r} was not sent (set_volume first)")
            return kind
        return None

    def close(self) -> None:
        pass


class Harness:
    """A WorkerServer serving ``ScriptedService`` in a thread over two OS pipes."""

    def __init__(self) -> None:
        self.service = ScriptedService()
        in_r, self.in_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.server = WorkerServer(self.service, in_r, out_w)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        self.reader = FrameReader()
        self.replies = {}
        self._fds = [in_r, out_w]

    def send(self, rid, kind, **fields):
        os.write(self.in_w, frame_bytes({"id": rid, "kind": kind, "fields": fields}))

    def collect(self, *ids, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not all(i in self.replies for i in ids):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.out_r], [], [], max(left, 0))
            assert ready and left > 0, f"no reply for {[i for i in ids if i not in self.replies]}"
            for message in self.reader.feed(os.read(self.out_r, 1 << 16)):
                if message.get("type") == "reply":
                    self.replies[message["id"]] = message
        return [self.replies[i] for i in ids]

    def close(self):
        self.service.release.set()
        os.close(self.out_r)  # nobody reads any more (the server's writes fail), and
        os.close(self.in_w)   # input closed: the server ends
        self.thread.join(10)
        assert not self.thread.is_alive()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def test_worker_click_never_runs_before_the_volume_or_model_it_needs(harness):
    """A prefetch is queued (the worker is busy), then the user clicks on a volume not sent yet: the
    connection sends ``set_volume`` and then ``predict``. The click may jump the prefetch, never the
    ``set_volume`` (it failed with "volume was not sent" -- or ran on the previous model after a ``load``)."""
    h = harness
    h.send(1, "block")
    assert h.service.blocking.wait(10)
    h.send(2, "prefetch", volume="v1")
    h.send(3, "set_volume", key="v2")
    h.send(4, "predict", volume="v2")
    h.send(5, "journal")
    h.collect(5)  # every request above has been accepted
    h.service.volumes.add("v1")
    h.service.release.set()
    replies = h.collect(1, 2, 3, 4)
    assert [r["status"] for r in replies] == ["ok"] * 4, replies
    assert [k for k, _ in h.service.ran] == ["block", "set_volume", "predict", "prefetch"]


def test_worker_keeps_reading_requests_while_the_client_is_not_reading_its_replies(harness):
    """The job thread is stuck writing a large reply the client has not read yet, and a prefetch replaces a
    queued one (a "dropped" reply to send). The reader thread must still take in the client's next request:
    on Windows the client's pipe writes block until the worker reads them, so a reader waiting for the
    output pipe (it wrote "dropped" while holding the queue lock) deadlocked client and worker."""
    h = harness
    h.service.volumes.add("v")
    h.send(1, "big", nbytes=4 << 20)  # far more than a pipe holds: the output stays full
    h.send(2, "block")                 # the worker is busy
    time.sleep(0.2)
    h.send(3, "prefetch", volume="v")
    h.send(4, "prefetch", volume="v")  # drops 3: a reply to send while the output pipe is full
    request = frame_bytes({"id": 5, "kind": "set_volume", "fields": {"key": "w", "pad": "p" * (1 << 20)}})
    written = threading.Event()

    def write_blocking():  # as the client's writes on Windows: they return once the worker has read them
        view = memoryview(request)
        while len(view):
            view = view[os.write(h.in_w, view):]
        written.set()

    threading.Thread(target=write_blocking, daemon=True).start()
    assert written.wait(5), "the worker stopped reading its input while its output was full"
    h.service.release.set()
    replies = h.collect(1, 2, 3, 4, 5, timeout=20)
    assert [r["status"] for r in replies] == ["ok", "ok", "dropped", "ok", "ok"]
    assert len(replies[0]["result"]) == 4 << 20


def test_worker_unload_stops_running_and_queued_work_at_once(harness):
    """Unload (the module's button; the GUI waits for the worker to end) while a long request runs and
    others wait: the running one is cancelled at its next check, the queued ones are cancelled unstarted,
    and the worker ends -- it used to run everything queued first, freezing Slicer up to the 30 s limit."""
    h = harness
    h.service.volumes.add("v")
    h.send(1, "block")
    assert h.service.blocking.wait(10)
    h.send(2, "set_volume", key="w")
    h.send(3, "prefetch", volume="v")
    start = time.monotonic()
    h.send(4, "unload")
    replies = h.collect(1, 2, 3, 4, timeout=5)
    h.thread.join(5)
    assert [r["status"] for r in replies] == ["cancelled", "cancelled", "cancelled", "ok"]
    assert not h.thread.is_alive() and time.monotonic() - start < 2
    assert [k for k, _ in h.service.ran] == ["block"]


def test_worker_survives_a_cancel_without_fields(harness):
    """A cancel whose ``fields`` is not a map names nothing to cancel: ignored, the worker keeps serving
    (its reader thread used to die on it)."""
    harness.send(1, "cancel", **{})
    os.write(harness.in_w, frame_bytes({"id": 2, "kind": "cancel", "fields": None}))
    harness.send(3, "journal")
    assert harness.collect(3)[0]["status"] == "ok"
