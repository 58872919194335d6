"""segment_anything's encoder timed on its own: a worker process with the default allocator, which the
benchmark (``bench.py``) asks for one encoder pass at a time, alternating with its own runs.

The worker is ``python -m RobustMedSAMLib.bench --reference-worker``, which calls :func:`serve_reference`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from .bench_setup import model_name, seeded_encoder, seeded_input


class ReferenceWorker:
    """segment_anything's encoder in a fresh process with the default allocator, run on request.

    Protocol (one line each way): ``run`` -> ``{"wall": s, "cpu": s}``; end of input -> exit.
    """

    def __init__(self, quick: bool, threads: int) -> None:
        from .allocator import ENV_SWITCH

        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env[ENV_SWITCH] = "default"
        cmd = [sys.executable, "-m", "RobustMedSAMLib.bench", "--reference-worker", "--threads", str(threads)]
        if quick:
            cmd.append("--quick")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._answer()  # ready

    def _answer(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference worker stopped (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> Tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["wall"], answer["cpu"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def serve_reference(quick: bool) -> None:
    """The worker side of :class:`ReferenceWorker` (stdin/stdout)."""
    from .models import get_config

    arch = get_config(model_name(quick)).architecture
    enc = seeded_encoder("reference", arch)
    x = seeded_input(arch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            enc(x)
        print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}), flush=True)
