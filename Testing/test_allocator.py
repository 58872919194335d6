"""glibc allocator tuning: large buffers are reused instead of being unmapped and page-faulted again."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from RobustMedSAMLib import allocator

linux_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs Linux with glibc")

# Allocate, touch and free a 40 MB block (above glibc's largest dynamic mmap threshold) a few times and
# count the minor page faults of the later rounds.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from RobustMedSAMLib.allocator import tune_cpu_allocator
    tuned = tune_cpu_allocator() if sys.argv[1] == "tune" else False
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.empty(10 << 20, dtype=np.float32)
        block.fill(1.0)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"tuned": tuned, "faults": faults}))
""")


def _probe(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux_glibc
def test_tuned_allocator_reuses_large_blocks():
    default = _probe("default")
    tuned = _probe("tune")
    assert tuned["tuned"] is True and default["tuned"] is False
    # (counts are per 4 KiB page, or per 2 MiB page where transparent huge pages are on)
    # default glibc: every round maps the block afresh and faults all of it in again
    first = default["faults"][0]
    assert first > 0 and min(default["faults"][1:]) > 0.5 * first
    # tuned: the first round faults the block in, later rounds reuse the same heap memory
    assert tuned["faults"][0] > 0.5 * first
    assert max(tuned["faults"][1:]) < 0.05 * tuned["faults"][0]


@linux_glibc
def test_environment_switch_leaves_allocator_alone():
    result = _probe("tune", ROBUSTMEDSAM_MALLOC="default")
    assert result["tuned"] is False
    assert min(result["faults"][1:]) > 0.5 * result["faults"][0] > 0


def test_tune_is_idempotent_and_never_raises():
    first = allocator.tune_cpu_allocator()
    assert allocator.tune_cpu_allocator() is first
    assert first is (allocator._glibc() is not None and os.environ.get(allocator.ENV_SWITCH) != "default")
