"""Peak resident memory parts of the benchmark (``bench.py``), each run in a fresh subprocess
(``python -m RobustMedSAMLib.bench --part NAME``) so that one part's heap does not inflate another's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from .bench_setup import box_prompt, model_name, run_propagation, seeded_encoder, seeded_input, seeded_volume
from .measure import PeakMemory

PARTS = ("encoder-reference", "encoder-fast", "decoder", "propagation")
BF16_PARTS = ("encoder-bf16", "propagation-bf16")


def run_part(part: str, quick: bool, slices: int) -> Dict[str, Any]:
    """Set up ``part``, reset the peak, run it once; returns baseline/peak resident bytes."""
    from .models import seeded_model
    from .predictor import Predictor

    mem = PeakMemory()
    imported = mem.current()  # torch and the engine imported, nothing built yet (the CUDA builds map more)
    name = model_name(quick)
    if part in ("encoder-reference", "encoder-fast", "encoder-bf16"):
        from .models import get_config

        arch = get_config(name).architecture
        enc = seeded_encoder("reference" if part == "encoder-reference" else "fast", arch)
        x = seeded_input(arch)
        if part != "encoder-reference":  # as the engine runs it (load_model tunes the allocator); the reference not
            from .allocator import tune_cpu_allocator

            tune_cpu_allocator()
        if part == "encoder-bf16":  # bf16 weight copies made here, before the peak is reset: counted in baseline
            enc.set_precision("bf16")
            with torch.inference_mode():
                enc(x)

        def job():
            with torch.inference_mode():
                enc(x)
    elif part in ("decoder", "propagation", "propagation-bf16"):
        loaded = seeded_model(name, precision="bf16" if part.endswith("bf16") else None)
        predictor = Predictor(loaded)
        side = max(loaded.config.architecture.image_size // 2, 64)
        if part == "decoder":
            image = seeded_volume(1, side)[0]
            predictor.set_image(image)
            prompt = box_prompt(side)

            def job():
                for _ in range(5):
                    predictor.predict(prompt)
        else:
            def job():
                run_propagation(predictor, slices, side)
    else:
        raise ValueError(f"unknown part {part!r}; one of {PARTS + BF16_PARTS}")
    baseline = mem.current()
    exact = mem.reset()
    job()
    cached = predictor.cache.bytes if part in ("decoder", "propagation", "propagation-bf16") else 0
    return {"part": part, "import_bytes": imported, "baseline_bytes": baseline, "peak_bytes": mem.peak(),
            "peak_since_reset": exact, "cache_bytes": cached}


def measure_memory(quick: bool, slices: int, log: Callable[[str], None], bf16: bool = False) -> Dict[str, Any]:
    out = {}
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for part in PARTS + (BF16_PARTS if bf16 else ()):
        log(f"memory: {part} (fresh subprocess)")
        cmd = [sys.executable, "-m", "RobustMedSAMLib.bench", "--part", part, "--slices", str(slices),
               "--threads", str(torch.get_num_threads())]
        if quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory part {part} failed:\n{proc.stderr[-2000:]}")
        out[part] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out
