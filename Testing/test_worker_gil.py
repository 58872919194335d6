"""Slicer's GIL regime in the test suite.

PythonQt runs without thread support: Slicer's main thread holds Python's GIL while it idles in Qt's event
loop, so Python runs only in short callbacks. The test reproduces that: between polls the main thread sleeps
in C *holding* the GIL (``ctypes.PyDLL(None).usleep``: PyDLL calls keep the GIL, as C++ reached from PythonQt
does), and each poll is one short Python callback, like the Qt timer of ``RobustMedSAMLogic.pump``.

Through the worker client, a model load and a propagation must finish within 1.25 x their time when the
main thread simply waits, and no poll may take longer than 20 ms. (With the engine in a Python thread of
the same process, as before, the same harness took many times longer: see the issue's note.)
"""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import pytest

from RobustMedSAMLib.worker.client import WorkerClient
from RobustMedSAMLib.worker.connection import EngineConnection, ModelSpec

IDLE_S = 0.04      # the pump's timer interval: the main thread idles in C this long between polls
MAX_POLL_S = 0.020
SLICES = 24

pytestmark = pytest.mark.skipif(os.name == "nt", reason="PyDLL(None) is POSIX")


def _volume():
    rng = np.random.default_rng(1)
    k, j, i = np.ogrid[:SLICES, :64, :64]
    blob = ((k - SLICES / 2) / SLICES) ** 2 + ((j - 32) / 18) ** 2 + ((i - 32) / 20) ** 2 < 1
    return (rng.normal(0, 40, (SLICES, 64, 64)) + 500 * blob).astype(np.int16), blob


def _slicer_like_wait(conn, request, polls):
    """Wait as Slicer's main thread does: idle in C holding the GIL, then one short Python poll."""
    usleep = ctypes.PyDLL(None).usleep
    usleep.argtypes = [ctypes.c_uint]
    while not request.finished:
        usleep(int(IDLE_S * 1e6))
        start = time.perf_counter()
        conn.poll()
        polls.append(time.perf_counter() - start)


def _run(tmp_path, slicer_like: bool):
    """(load seconds, propagation seconds, poll durations) in a fresh worker."""
    array, blob = _volume()
    # one intra-op thread: the ratio is about waiting, and a 2-core machine shared with the test process (and
    # whatever else runs) makes 2-thread OpenMP timings swing
    conn = EngineConnection(WorkerClient(log_dir=tmp_path, env={"OMP_NUM_THREADS": "1"}), ModelSpec("tiny"))
    conn.set_volume(array, np.eye(4), key="v")
    polls = []

    def finish(request):
        if slicer_like:
            _slicer_like_wait(conn, request, polls)
        else:
            conn.wait(request, 120)
        assert request.ok, request.error
        return request.result

    try:
        start = time.perf_counter()
        finish(conn.load())
        loaded = time.perf_counter()
        result = finish(conn.request("propagate", "v", axis=0, seeds={SLICES // 2: blob[SLICES // 2]}, mapping="auto",
                                     options={"iou_threshold": 0.0, "stop_rule": "micro-sam"}))
        end = time.perf_counter()
    finally:
        conn.close()
    assert len(result.slices) == SLICES  # a propagation through every slice
    return loaded - start, end - loaded, polls


def test_gil_held_by_the_main_thread_does_not_slow_the_engine(tmp_path):
    runs = {False: [], True: []}
    for n, slicer_like in enumerate((False, True) * 3):  # alternated: machine load hits both alike; best of 3
        runs[slicer_like].append(_run(tmp_path / str(n), slicer_like))
    load_ref = min(r[0] for r in runs[False])
    prop_ref = min(r[1] for r in runs[False])
    load_gil = min(r[0] for r in runs[True])
    prop_gil = min(r[1] for r in runs[True])
    polls = [p for r in runs[True] for p in r[2]]
    print(f"\nGIL regime: load {load_gil:.2f} s vs {load_ref:.2f} s waiting ({load_gil / load_ref:.2f}x), "
          f"propagation of {SLICES} slices {prop_gil:.2f} s vs {prop_ref:.2f} s ({prop_gil / prop_ref:.2f}x), {len(polls)} polls, "
          f"longest {max(polls) * 1000:.2f} ms")
    assert polls and max(polls) <= MAX_POLL_S, f"a poll took {max(polls) * 1000:.1f} ms"
    assert load_gil <= 1.25 * load_ref, (load_gil, load_ref)
    assert prop_gil <= 1.25 * prop_ref, (prop_gil, prop_ref)
