"""Whole-process check of ``robustmedsam segment --precision bf16`` against ``--precision fp32``.

Writes a seeded full-size RobustMedSAM-layout checkpoint (ViT-B + robust decoder, ``seeded.py``) and a seeded
image, then runs the command line in fresh processes, alternating float32 and bf16 (so machine load hits both
alike), and reports the wall time of each whole process (Python start, imports, model load included), their
ratio and the IoU of the two masks. One more run with ``--precision auto`` shows what auto picks here.

    python scripts/bf16_segment_check.py [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(folder: Path):
    import torch
    from PIL import Image

    from RobustMedSAMLib.modeling import VIT_B, build_model
    from RobustMedSAMLib.seeded import seeded_image, seeded_state_dict

    ckpt = folder / "robustmedsam_seeded.pth"
    shapes = {k: tuple(v.shape) for k, v in build_model(VIT_B).state_dict().items()}
    torch.save(seeded_state_dict(shapes, seed=1), ckpt)
    image = folder / "slice.png"
    Image.fromarray(seeded_image((512, 512), 5)).save(image)
    return ckpt, image


def _segment(ckpt: Path, image: Path, out: Path, precision: str, env) -> tuple:
    cmd = [sys.executable, "-m", "RobustMedSAMLib.cli", "segment", str(image), "--model", "robustmedsam",
           "--checkpoint", str(ckpt), "--box", "100", "120", "380", "400", "-o", str(out), "--precision", precision]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, proc.stderr.strip()


def main(argv=None) -> int:
    import numpy as np
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternated fp32/bf16 pairs (default 3)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt, image = _setup(folder)
        env = dict(os.environ, ROBUSTMEDSAM_CACHE=str(folder / "cache"),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        _segment(ckpt, image, folder / "warm.png", "fp32", env)  # file cache warm for both
        times = {"fp32": [], "bf16": []}
        cpu = {"fp32": [], "bf16": []}
        for r in range(args.rounds):
            for precision in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                seconds, used, _ = _segment(ckpt, image, folder / f"{precision}.png", precision, env)
                times[precision].append(seconds)
                cpu[precision].append(used)
                print(f"round {r + 1}: {precision} {seconds:.2f} s (CPU {used:.2f} s, 1-min load "
                      f"{os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        _, _, auto_note = _segment(ckpt, image, folder / "auto.png", "auto", env)
        masks = {k: np.asarray(Image.open(folder / f"{k}.png")) > 0 for k in ("fp32", "bf16", "auto")}
    inter = int((masks["fp32"] & masks["bf16"]).sum())
    union = int((masks["fp32"] | masks["bf16"]).sum())
    differ = float((masks["fp32"] != masks["bf16"]).mean())
    res = {"times": times, "cpu": cpu, "median": {k: statistics.median(v) for k, v in times.items()},
           "cpu_median": {k: statistics.median(v) for k, v in cpu.items()},
           "iou": inter / union if union else 1.0, "pixels_differing": differ,
           "mask_pixels_fp32": int(masks["fp32"].sum()),
           "auto_equals_bf16": bool(np.array_equal(masks["auto"], masks["bf16"])), "auto_note": auto_note,
           "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    res["ratio"] = res["median"]["bf16"] / res["median"]["fp32"]
    note = auto_note.splitlines()[-1] if auto_note else "no note"
    print(f"whole process, medians of {args.rounds}: fp32 {res['median']['fp32']:.2f} s "
          f"[{min(times['fp32']):.2f}-{max(times['fp32']):.2f}], bf16 {res['median']['bf16']:.2f} s "
          f"[{min(times['bf16']):.2f}-{max(times['bf16']):.2f}] -> {res['ratio']:.2f}x (CPU time "
          f"{res['cpu_median']['fp32']:.1f} vs {res['cpu_median']['bf16']:.1f} s); mask IoU {res['iou']:.4f} "
          f"({differ * 100:.3f} % of pixels differ, {res['mask_pixels_fp32']} mask pixels); "
          f"auto: {'bf16' if res['auto_equals_bf16'] else 'not bf16'} ({note})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
