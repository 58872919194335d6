"""The engine worker process (``RobustMedSAMLib.worker``): the wire codec, request/reply round trips equal to
in-process results bit for bit (tiny model), latest-wins prefetching, cancel, a killed worker, unload, and a
client side that never imports torch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from RobustMedSAMLib.prompt_files import ObjectPrompts
from RobustMedSAMLib.prompts import Prediction, Prompt
from RobustMedSAMLib.worker.client import WorkerClient
from RobustMedSAMLib.worker.requests import EngineError, WorkerDied
from RobustMedSAMLib.worker.inprocess import InProcessClient
from RobustMedSAMLib.worker.connection import EngineConnection, ModelSpec
from RobustMedSAMLib.worker.protocol import FrameReader, ProtocolError, frame_bytes
from RobustMedSAMLib.worker.service import EngineService

REPO = Path(__file__).resolve().parents[1]
SHAPE = (10, 40, 48)
#: seeded weights have no real object ends: propagate through every slice (micro-sam's rule, no IoU floor)
FULL_RUN = {"iou_threshold": 0.0, "stop_rule": "micro-sam"}


def ct_like(shape=SHAPE, seed=0):
    """A CT-like int16 volume: noise around -100 HU and a bright ellipsoid that narrows towards its ends."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    blob = ((k - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((j - 20) / 12) ** 2 + ((i - 24) / 15) ** 2 < 1
    return (rng.normal(-100, 30, shape) + 400 * blob).astype(np.int16), blob


def connection(client):
    conn = EngineConnection(client, ModelSpec("tiny", precision="fp32"))  # as the in-process reference
    conn.debounce = 0.0
    conn.set_volume(ct_like()[0], np.diag([-0.8, -0.8, 2.5, 1.0]), key="ct")
    return conn


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    conn = connection(WorkerClient(log_dir=tmp_path_factory.mktemp("worker")))
    assert conn.wait(conn.load(), 120).ok
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def local():
    from RobustMedSAMLib.models import seeded_model

    conn = connection(InProcessClient(EngineService(seeded_model("tiny", seed=0))))
    assert conn.wait(conn.load()).ok
    return conn


# ------------------------------------------------------------------------------------------- codec
def test_protocol_carries_every_type_and_refuses_the_rest():
    from RobustMedSAMLib.propagation import PropagationResult, SliceRecord, StopReason

    masks = np.zeros((3, 5, 7), bool)
    masks[1, 1:4, 2:6] = True
    records = {1: SliceRecord(1, "seed"), 2: SliceRecord(2, "extrapolated", 0.5, float("nan"), 1)}
    stops = {"lower": StopReason("volume_bound", 0), "upper": StopReason("iou_below_threshold", 2, 0.1)}
    result = PropagationResult(masks, records, stops,
                               (1, 2), (1,), (), (2,), {"slice_range": (0, 2), "projection": {"use_box": True}})
    message = {"id": 7, "kind": "x", "fields": {
        "result": result, "prompt": Prompt(points=[[1.5, 2.0]], labels=[0], box=[0, 0, 4, 4]),
        "objects": [ObjectPrompts("liver", (1.0, 0.5, 0.0), {3: Prompt(box=[1, 1, 3, 3])}, (2, 4))],
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3), "strided": np.arange(20.0)[::3],
        "empty": np.zeros((0, 4), np.float32), "scalar": np.float32(0.25), "pairs": [(1, masks[1])],
        "$weird": 1, "nested": {"a": [None, True, 2, "x"]}}}
    data = frame_bytes(message)
    reader = FrameReader()
    got = []
    for n in range(0, len(data), 7):  # arrives in small pieces
        got += reader.feed(data[n:n + 7])
    assert len(got) == 1 and not reader.in_frame
    out = got[0]["fields"]
    r = out["result"]
    np.testing.assert_array_equal(r.masks, masks)
    assert r.masks.dtype == bool and r.slices[2].interslice_iou != r.slices[2].interslice_iou  # NaN kept
    assert r.slices[2].from_index == 1 and r.stops["upper"] == StopReason("iou_below_threshold", 2, 0.1)
    assert r.z_range == (1, 2) and r.options["slice_range"] == (0, 2)
    np.testing.assert_array_equal(out["prompt"].labels, [0])
    assert out["objects"][0].slices[3].box.tolist() == [1, 1, 3, 3] and out["objects"][0].slice_range == (2, 4)
    assert out["big_endian"].tolist() == [[0, 1, 2], [3, 4, 5]] and out["strided"].tolist() == [0, 3, 6, 9, 12, 15, 18]
    assert out["empty"].shape == (0, 4) and out["scalar"] == 0.25 and out["$weird"] == 1
    assert out["pairs"][0][0] == 1 and out["pairs"][0][1].tolist() == masks[1].tolist()
    # two frames in one read, and one frame split anywhere
    assert len(FrameReader().feed(data + data)) == 2
    with pytest.raises(ProtocolError, match="cannot be sent"):
        frame_bytes({"f": object()})
    with pytest.raises(ProtocolError, match="cannot be sent"):
        frame_bytes({"f": np.array(["text"])})
    with pytest.raises(ProtocolError, match="corrupt"):
        FrameReader().feed(b"XXXX" + data[4:])
    forged = data.replace(b'"PropagationResult"', b'"os.system"  \x20\x20\x20\x20\x20\x20')
    (refused,) = FrameReader().feed(forged)  # no such type is built: the message is refused, the stream goes on
    assert refused.id == 7 and "unknown type 'os.system'" in refused.error


# ------------------------------------------------------------------------------------ round trips
def _same_prediction(a: Prediction, b: Prediction):
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.iou, b.iou)
    np.testing.assert_array_equal(a.low_res_logits, b.low_res_logits)


def _same_propagation(a, b):
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.slices == b.slices and a.stops == b.stops and a.z_range == b.z_range and a.predicted == b.predicted


def test_worker_round_trips_equal_in_process_results_bit_for_bit(worker, local):
    box = Prompt(box=[10, 8, 38, 32])
    for conn_a, conn_b in ((worker, local),):
        a = conn_a.call("predict", "ct", axis=0, index=5, prompt=box, multimask=True, mapping="auto")
        b = conn_b.call("predict", "ct", axis=0, index=5, prompt=box, multimask=True, mapping="auto")
        assert a.masks.shape == (3, 40, 48)
        _same_prediction(a, b)
        one = conn_a.call("predict", "ct", axis=1, index=20, prompt=Prompt(points=[[24, 5]]), mapping=[0, 600])
        _same_prediction(one, conn_b.call("predict", "ct", axis=1, index=20, prompt=Prompt(points=[[24, 5]]),
                                          mapping=[0, 600]))
        seed = {5: a.mask}
        opts = dict(FULL_RUN, projection="mask")
        pa = conn_a.call("propagate", "ct", axis=0, seeds=seed, options=opts)
        pb = conn_b.call("propagate", "ct", axis=0, seeds=seed, options=opts)
        assert len(pa.slices) >= 3
        _same_propagation(pa, pb)
        edit = np.zeros((40, 48), bool)
        edit[12:26, 16:34] = True
        ra = conn_a.call("repropagate", "ct", axis=0, previous=pa, changes=[(7, edit)], options=opts)
        rb = conn_b.call("repropagate", "ct", axis=0, previous=pb, changes=[(7, edit)], options=opts)
        _same_propagation(ra, rb)
        assert 7 in ra.seeds
        objects = [ObjectPrompts("blob", None, {5: box}),
                   ObjectPrompts("corner", (0.1, 0.2, 0.3), {5: Prompt(box=[0, 0, 9, 9])})]
        va = conn_a.call("segment_volume", "ct", axis=0, objects=objects, options=FULL_RUN)
        vb = conn_b.call("segment_volume", "ct", axis=0, objects=objects, options=FULL_RUN)
        assert [o.name for o in va.objects] == ["blob", "corner"] and va.objects[1].color == (0.1, 0.2, 0.3)
        for oa, ob in zip(va.objects, vb.objects):
            np.testing.assert_array_equal(oa.mask, ob.mask)
            _same_propagation(oa.propagation, ob.propagation)
            assert oa.seeds.keys() == ob.seeds.keys()
        assert va.report() == vb.report()
        truth = {"blob": ct_like()[1]}
        rows_a = conn_a.call("robustness", "ct", axis=0, objects=objects[:1], reference=truth,
                             corruptions=["gaussian_noise"], options=FULL_RUN)
        rows_b = conn_b.call("robustness", "ct", axis=0, objects=objects[:1], reference=truth,
                             corruptions=["gaussian_noise"], options=FULL_RUN)
        assert rows_a == rows_b and [r.corruption for r in rows_a] == ["clear", "gaussian_noise"]
        assert rows_a[0].dice_vs_reference > 0


def test_worker_errors_are_messages_and_it_keeps_serving(worker):
    with pytest.raises(EngineError, match="was not sent to this engine process"):
        worker.client.call("predict", volume="nope", axis=0, index=0, prompt=Prompt(box=[0, 0, 4, 4]))
    with pytest.raises(EngineError, match="outside the image"):
        worker.call("predict", "ct", axis=0, index=3, prompt=Prompt(points=[[500, 3]]))
    with pytest.raises(EngineError, match="unknown request"):
        worker.client.call("format_disk")
    assert worker.call("predict", "ct", axis=0, index=3, prompt=Prompt(box=[10, 8, 38, 32])).masks.shape == (1, 40, 48)


def test_worker_scrolling_through_slices_then_clicking_waits_for_at_most_one_encode(worker):
    """50 prefetches in a burst (scrolling with debounce off, the worst case), then a click on the last
    slice: superseded prefetches are dropped unstarted, so the click waits for at most the one encode that
    was already running (worker journal), plus its own."""
    conn = worker
    conn.call("clear_cache")
    requests = [conn.request("prefetch", "ct", axis=1, index=n % 40, mapping="auto") for n in range(50)]
    click = conn.request("predict", "ct", axis=1, index=9, prompt=Prompt(box=[5, 2, 40, 8]), mapping="auto")
    conn.wait(click, 60)
    for r in requests:
        conn.wait(r, 60)
    journal = {e["id"]: e for e in conn.client.call("journal")}
    p = journal[click.id]
    ran = [journal[r.id] for r in requests if journal[r.id]["status"] == "ok"]
    waited_for = [e for e in ran if e["started"] < p["started"] and e["ended"] > p["received"]]
    assert len(waited_for) <= 1, waited_for
    assert sum(r.status == "dropped" for r in requests) >= 45  # latest wins
    assert all(r.status in ("ok", "dropped") for r in requests)


def test_debounced_prefetch_sends_only_where_the_view_rests(local):
    conn = local
    conn.debounce = 0.05
    sent = []
    submit = conn.client.submit
    conn.client.submit = lambda kind, fields=None, *a, **k: (sent.append((kind, dict(fields or {}))),
                                                               submit(kind, fields, *a, **k))[1]
    try:
        for n in range(30):
            conn.prefetch("ct", 0, n % 10)
            conn.poll()
        time.sleep(0.06)
        conn.poll()
    finally:
        conn.client.submit = submit
        conn.debounce = 0.0
    prefetches = [f for kind, f in sent if kind == "prefetch"]
    assert [f["index"] for f in prefetches] == [29 % 10]


def test_worker_cancel_stops_a_propagation_and_the_next_request_works(worker):
    worker.call("clear_cache")
    run = worker.request("propagate", "ct", axis=1, seeds={20: ct_like()[1][:, 20]}, options=FULL_RUN)
    while run.done < 2 and not run.finished:
        worker.poll(0.01)
        time.sleep(0.005)
    run.cancel()
    worker.wait(run, 60)
    assert run.status == "cancelled"
    assert worker.call("status")["loaded"]


# ----------------------------------------------------------------------------------- crash, unload
def test_worker_unload_returns_its_memory_and_the_next_request_starts_a_new_one(tmp_path):
    conn = connection(WorkerClient(log_dir=tmp_path))
    assert conn.wait(conn.load(), 120).ok
    conn.call("predict", "ct", axis=0, index=5, prompt=Prompt(box=[10, 8, 38, 32]))
    status = conn.call("status")
    pid, generation = conn.client.pid, conn.client.generation
    assert status["rss_bytes"] > 100e6  # torch and the model
    conn.unload()
    assert not conn.client.alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process is gone (reaped): all of its memory is back with the system
    again = conn.call("predict", "ct", axis=0, index=5, prompt=Prompt(box=[10, 8, 38, 32]))
    assert again.masks.any() and conn.client.generation == generation + 1 and conn.client.pid != pid
    conn.close()


@pytest.mark.skipif(os.name == "nt", reason="a shell script as the worker's Python")
def test_worker_unload_from_the_gui_waits_at_most_its_grace_for_a_busy_worker(tmp_path):
    """"Unload model" runs in Slicer's GUI thread. A worker busy in what cannot be interrupted (one encoding,
    here a worker that never answers) is killed after ``UNLOAD_GRACE_S``; the GUI does not wait the 30 s a
    script may."""
    sys.path.insert(0, str(REPO / "RobustMedSAM"))
    from RobustMedSAMLogic.engine import UNLOAD_GRACE_S, EngineSession, ModelChoice

    python = tmp_path / "python-that-never-answers"
    python.write_text("#!/bin/sh\nexec sleep 60\n")
    python.chmod(0o755)
    engine = EngineSession(ModelChoice(model="tiny"), client=WorkerClient(str(python), log_dir=tmp_path))
    request = engine.connection.request("hello")
    process = engine.client.process
    start = time.monotonic()
    engine.unload()
    took = time.monotonic() - start
    assert took < UNLOAD_GRACE_S + 1.0, f"unload held the GUI {took:.1f} s"
    assert process.returncode == -signal.SIGKILL and not engine.client.alive
    assert request.finished and isinstance(request.error, WorkerDied)
    engine.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_worker_killed_mid_propagation_leaves_the_segment_voxel_identical(tmp_path):
    """Through the Slicer bridge on slicer-core: Propagate, the engine process is killed, one clear message,
    the segmentation untouched; Propagate again works in a fresh engine (model and volume re-sent)."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    import slicer.util

    sys.path.insert(0, str(REPO / "RobustMedSAM"))
    from RobustMedSAMLogic import segments, volumes
    from RobustMedSAMLogic.engine import EngineSession, ModelChoice
    from RobustMedSAMLogic.headless import make_headless_scene
    from RobustMedSAMLogic.propagation import PropagationOptions, bind_session, engine_runner

    scene, _ = make_headless_scene()
    array, blob = ct_like()
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    slicer.util.updateVolumeFromArray(vol, array)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("blob", "blob")
    writer = segments.SegmentWriter(segments.editor_access(scene, seg, vol), seg, vol)
    writer.replace_slice(sid, 0, 5, blob[5])  # annotation on one axial slice
    engine = EngineSession(ModelChoice(model="tiny"), client=WorkerClient(log_dir=tmp_path))
    session = bind_session(seg, sid, vol, engine_runner(engine, vol, "auto"), writer,
                           segments.PreviewSegmentation(scene, vol, seg))
    before = segments.snapshot(seg, vol)
    options = PropagationOptions(axis=0, iou_threshold=0.0, stop_rule="micro-sam")
    done = []
    request = session.start(session.plan(options), on_done=done.append)
    while request.done < 2 and not request.finished:
        engine.poll()
        time.sleep(0.005)
    os.kill(engine.client.pid, signal.SIGKILL)
    while session.running:
        engine.poll()
        time.sleep(0.005)
    assert done == [request] and isinstance(request.error, WorkerDied)
    assert "engine process stopped" in str(request.error) and "killed" in str(request.error)
    assert session.result is None and segments.same_snapshot(before, segments.snapshot(seg, vol))
    request = session.start(session.plan(options))
    engine.wait(request, 120)
    assert request.ok and engine.client.generation == 2
    session.apply()
    got = volumes.segment_mask(seg, sid, vol)
    np.testing.assert_array_equal(got[5], blob[5])
    assert len(session.last_applied.slices) > 2
    engine.close()


def test_worker_client_side_never_imports_torch():
    """The Slicer process: client, connection, codec (decoding every result type) and the bridge."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'RobustMedSAM')!r})
import numpy as np
from RobustMedSAMLib.worker import client, connection, protocol
from RobustMedSAMLib import prompts, propagation, prompt_files, volume_io, intensity, weights
from RobustMedSAMLib.worker.protocol import _dataclass, DATACLASSES
for name in DATACLASSES:
    _dataclass(name)
import RobustMedSAMLogic.engine, RobustMedSAMLogic.logic, RobustMedSAMLogic.interaction
import RobustMedSAMLogic.propagation, RobustMedSAMLogic.segments, RobustMedSAMLogic.markups
RobustMedSAMLogic.engine.model_names(); RobustMedSAMLogic.engine.weights_status("robustmedsam")
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "segment_anything"))
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------ review fixes
def _journal_frames_arrived(client, timeout=30.0):
    """Block until the worker has written something (without reading it)."""
    import select

    ready, _, _ = select.select([client.process.stdout.fileno()], [], [], timeout)
    assert ready, "the worker did not answer"


@pytest.mark.skipif(os.name == "nt", reason="select() on pipes is POSIX")
def test_worker_that_died_unnoticed_fails_its_requests_when_the_next_one_starts_a_new_one(tmp_path):
    """The worker dies between two polls and the GUI submits before polling again (a scroll prefetch):
    the requests of the dead worker must end (WorkerDied), and a reply it had already written must still be
    delivered -- not be forgotten with the old pipes while the GUI waits for them for ever."""
    client = WorkerClient(log_dir=tmp_path)
    answered = client.submit("journal")      # answered by the worker's reader at once
    _journal_frames_arrived(client)
    lost = client.submit("hello")             # imports torch: still running when the worker is killed
    os.kill(client.pid, signal.SIGKILL)
    client.process.wait()
    again = client.submit("journal")         # starts a fresh worker
    assert client.generation == 2
    assert answered.ok and answered.result == []
    assert lost.status == "error" and isinstance(lost.error, WorkerDied) and "killed" in str(lost.error)
    assert client.wait(again, 30).ok
    client.close()


def _raw_frame(message, buffers=(), payload=b""):
    """A frame built by hand (to forge what encode_frame would never write)."""
    import json
    import struct

    header = json.dumps({"message": message, "buffers": list(buffers)}).encode()
    return struct.pack("<4sQQ", b"RMW1", len(header), len(payload)) + header + payload


def test_protocol_malformed_frames_are_errors_naming_the_problem_never_silent_or_a_crash():
    from RobustMedSAMLib.worker.protocol import MAX_PAYLOAD_BYTES, UndecodableMessage

    ok = {"id": 1, "kind": "x", "fields": {"a": {"$nd": 0}}}
    cases = {  # what a forged or damaged frame says -> the error it must give
        "truncated bool array": ([["|b1", [4, 4], 0, 1, True]], b"\xff" * 16),      # 16 bits in 1 byte
        "negative dimension": ([["<f4", [-1, -4], 0, 16, False]], b"\0" * 16),
        "negative offset": ([["<u1", [4], -4, 4, False]], b"\0" * 16),
        "size not of the shape": ([["<f4", [2], 0, 12, False]], b"\0" * 16),
        "object dtype": ([["|O", [1], 0, 8, False]], b"\0" * 16),
        "missing buffer": ([], b""),
    }
    for name, (buffers, payload) in cases.items():
        got = FrameReader().feed(_raw_frame(ok, buffers, payload))
        assert len(got) == 1 and isinstance(got[0], UndecodableMessage), (name, got)
        assert got[0].id == 1 and got[0].error, name
    # a value a dataclass refuses, an unknown field: the message's id is kept for the error reply
    bad_prompt = {"id": 2, "kind": "predict", "fields": {"prompt": {"$dc": "Prompt", "f": {"box": [1, 2, 3]}}}}
    unknown_field = {"id": 3, "kind": "x", "fields": {"p": {"$dc": "Prompt", "f": {"colour": 1}}}}
    reader = FrameReader()
    got = reader.feed(_raw_frame(bad_prompt) + _raw_frame(unknown_field) + frame_bytes({"id": 4}))
    assert [type(m).__name__ for m in got] == ["UndecodableMessage", "UndecodableMessage", "dict"]
    assert got[0].id == 2 and "4 numbers" in got[0].error and got[1].id == 3 and got[2] == {"id": 4}
    # the stream itself broken: no marker, or a length no message has; later feeds keep refusing
    with pytest.raises(ProtocolError, match="frame marker") as e:
        FrameReader().feed(frame_bytes({"id": 5}) + b"Warning: something printed\n" + b"x" * 40)
    assert e.value.messages == [{"id": 5}]  # what came before the break is not lost
    broken = FrameReader()
    with pytest.raises(ProtocolError, match="corrupt"):
        broken.feed(struct_prefix(MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(ProtocolError):
        broken.feed(frame_bytes({"id": 6}))


def struct_prefix(payload_length):
    import struct

    return struct.pack("<4sQQ", b"RMW1", 10, payload_length)


def test_worker_answers_an_unreadable_request_with_an_error_and_keeps_serving(tmp_path):
    """A request whose value cannot be rebuilt (here a prompt box of 3 numbers) must give an error reply for
    that request -- not kill the worker's reader thread and leave every later request unanswered."""
    from RobustMedSAMLib.worker.requests import Request

    client = WorkerClient(log_dir=tmp_path)
    client.start()
    forged = Request(client, 99, "predict", {})
    client._pending[99] = forged
    client._outbox.append(memoryview(_raw_frame(
        {"id": 99, "kind": "predict", "fields": {"prompt": {"$dc": "Prompt", "f": {"box": [1, 2, 3]}}}})))
    client.wait(forged, 30)
    assert forged.status == "error" and "could not be read" in str(forged.error) and "4 numbers" in str(forged.error)
    assert client.call("journal", timeout=30) == []  # still serving
    client.close()


@pytest.mark.skipif(os.name == "nt", reason="a shell script as the worker's Python")
def test_worker_output_corrupted_by_a_banner_gives_one_clear_message_not_an_exception_in_the_gui(tmp_path):
    """A launcher or library that prints to the worker's standard output before the protocol starts: the
    GUI's poll must not raise (it runs in a Qt timer), and every pending request fails with WorkerDied
    saying why."""
    python = tmp_path / "python-with-banner"
    python.write_text(f"#!/bin/sh\necho 'Warning: this launcher says hello'\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    client = WorkerClient(str(python), log_dir=tmp_path)
    request = client.submit("journal")
    client.wait(request, 30)
    assert isinstance(request.error, WorkerDied), request.error
    assert "output could not be read" in str(request.error) and "frame marker" in str(request.error)
    assert not client.alive and client.pending == 0


@pytest.mark.skipif(os.name == "nt", reason="a shell script as the worker's Python")
def test_worker_that_closes_its_output_but_lives_on_never_blocks_a_poll(tmp_path):
    """End of the worker's output while its process has not ended (tearing down, hung in a driver): poll()
    runs in the GUI thread and must not wait for the process; after ``exit_grace`` it is killed and the
    pending request fails with WorkerDied."""
    python = tmp_path / "python-that-hangs"
    python.write_text("#!/bin/sh\nexec >&-\nsleep 20\n")
    python.chmod(0o755)
    client = WorkerClient(str(python), log_dir=tmp_path)
    client.exit_grace = 0.5
    request = client.submit("journal")
    polls, start = [], time.monotonic()
    while not request.finished and time.monotonic() - start < 10:
        t = time.perf_counter()
        client.poll()
        polls.append(time.perf_counter() - t)
        time.sleep(0.02)
    assert max(polls) < 0.1, f"a poll waited {max(polls):.1f} s for the worker to end"
    assert isinstance(request.error, WorkerDied) and "did not end" in str(request.error)
    assert client.process is None and client.exit_code == -signal.SIGKILL


def test_worker_close_ends_the_process_and_every_pending_request(tmp_path):
    """close() (module cleanup, Slicer exit): the process is reaped (no zombie), its pipes closed, and a
    request still pending is finished (WorkerDied), not left for a poll that never comes."""
    client = WorkerClient(log_dir=tmp_path)
    request = client.submit("hello")  # imports torch: still pending
    process = client.process
    client.close()
    assert request.finished and isinstance(request.error, WorkerDied) and "closed by the client" in str(request.error)
    assert process.returncode is not None and process.stdin.closed and process.stdout.closed
    assert client.process is None and client.pending == 0


def test_worker_volume_files_are_deleted_once_the_worker_lets_go_of_them(tmp_path, monkeypatch):
    """Each volume crosses as a .npy file the worker memory-maps. On Windows such a file cannot be deleted
    while mapped, and the GUI deletes right after queueing ``drop_volume``: the deletion fails (simulated
    here: PermissionError, as Windows gives) and must be retried, not forgotten -- one leaked file the
    size of the volume per edit of the volume, in the user's cache."""
    conn = EngineConnection(WorkerClient(log_dir=tmp_path))
    conn.set_volume(np.zeros((2, 3, 4), np.int16), np.eye(4), key="a")
    first = conn._files["a"]
    conn.set_volume(np.ones((2, 3, 4), np.int16), np.eye(4), key="a")  # same key again: a new file
    assert conn._files["a"] != first and not first.exists()
    real_unlink, mapped = Path.unlink, {conn._files["a"]}

    def unlink(self, *args, **kwargs):
        if self in mapped:
            raise PermissionError(13, "The process cannot access the file because it is being used", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    second = conn._files["a"]
    conn.drop_volume("a")
    assert second.exists()       # still mapped by the worker
    conn.poll()
    assert second.exists()
    mapped.clear()               # the worker has handled drop_volume
    conn.poll()
    assert not second.exists() and not list(tmp_path.glob("volume-*"))
    conn.close()


def test_worker_a_library_reading_standard_input_cannot_take_the_requests(tmp_path):
    """Standard input carries the requests. Code in the worker that reads ``sys.stdin`` (a prompt in a
    download helper, ``input()``) must get end-of-file, not swallow request bytes and corrupt the stream.
    Simulated with a ``sitecustomize`` that makes ``hello`` read standard input first."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from RobustMedSAMLib.worker import service\n"
        "def do_hello(self, ctx):\n"
        "    import sys\n"
        "    return {'read': sys.stdin.read(100)}\n"
        "service.EngineService.do_hello = do_hello\n")
    client = WorkerClient(log_dir=tmp_path, env={"PYTHONPATH": str(site)})
    hello = client.submit("hello")
    later = [client.submit("journal") for _ in range(3)]
    assert client.wait(hello, 30).ok and hello.result == {"read": ""}, (hello.error, client.log_tail())
    assert all(client.wait(r, 30).ok for r in later)
    client.close()


def test_worker_client_keeps_what_a_short_pipe_write_left_on_the_windows_path(monkeypatch):
    """On Windows the client's writes are blocking, and one write can still take less than asked (the C
    runtime caps it): the rest must be sent next, not counted as sent. The Windows branch of the pipe runs
    here on a POSIX pipe with writes capped at 1000 bytes."""
    from RobustMedSAMLib.worker import client as client_module

    read_fd, write_fd = os.pipe()
    try:
        pipe = client_module._Pipe(read_fd, write_fd)
        pipe.windows = True
        real_write = os.write
        monkeypatch.setattr(client_module.os, "write", lambda fd, data: real_write(fd, bytes(data[:1000])))
        client = WorkerClient()
        client._pipe = pipe
        frame = frame_bytes({"id": 1, "kind": "x", "fields": {"a": np.arange(3000, dtype=np.int16)}})
        client._outbox.append(memoryview(frame))
        while client._outbox:
            client._flush()
        got = b""
        while True:
            try:
                got += os.read(read_fd, 1 << 16)
            except BlockingIOError:
                break
        assert len(got) == len(frame) and got == frame
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_worker_logs_of_two_sessions_sharing_the_log_folder_stay_apart(tmp_path):
    """Slicer puts every session's worker log in one cache folder; two Slicer sessions at once (or one
    after another) must not write into -- or truncate -- the same log, else WorkerDied quotes the wrong
    worker. Logs older than a week are deleted."""
    stale = tmp_path / "robustmedsam-worker-1.log"
    stale.write_text("a week old")
    os.utime(stale, (time.time() - 8 * 86400,) * 2)
    a, b = WorkerClient(log_dir=tmp_path), WorkerClient(log_dir=tmp_path)
    try:
        for c in (a, b):
            c.start()
            c.process.stdin.close()  # input ends: the worker exits and logs why
        for c in (a, b):
            c.process.wait(30)
        assert a.log_path != b.log_path and a.log_path.is_file() and b.log_path.is_file()
        assert not stale.exists()
    finally:
        a.close()
        b.close()
