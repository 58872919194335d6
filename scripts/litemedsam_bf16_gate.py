"""LiteMedSAM's bf16 agreement gate: the field evaluation on the sample chest CT (axial) with the TinyViT
encoder under CPU bf16 autocast, against float32, and the encoder time of both (same process, alternated).

Prints, per structure, the 3D Dice of the oracle, the one-box and the three-box run in both precisions and the
largest change; the gate (``precision.GATES["litemedsam"]``) allows 0.01.

    python scripts/litemedsam_bf16_gate.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAIN = ["right lung", "left lung", "thoracic vertebral column", "lumbar vertebral column"]


def main() -> int:
    import torch

    from RobustMedSAMLib.field_evaluation import field_evaluation
    from RobustMedSAMLib.models import load_model
    from RobustMedSAMLib.predictor import Predictor
    from RobustMedSAMLib.samples import sample_path
    from RobustMedSAMLib.segmentation_io import read_segmentation
    from RobustMedSAMLib.volume_io import read_volume

    volume = read_volume(sample_path("chest-ct"))
    reference = read_segmentation(sample_path("chest-ct-segmentation"), reference=volume)
    loaded = load_model("litemedsam", precision="fp32")
    plain = loaded.model.encode

    def autocast_encode(images, robust=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            encoding = plain(images, robust)
        encoding.embeddings = encoding.embeddings.float()
        return encoding

    x = torch.randn(1, 3, 256, 256)
    times = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        plain(x), autocast_encode(x)
        for _ in range(5):
            for mode, fn in (("fp32", plain), ("bf16", autocast_encode)):
                start = time.perf_counter()
                fn(x)
                times[mode].append(time.perf_counter() - start)
    dice = {}
    for mode, fn in (("fp32", plain), ("bf16", autocast_encode)):
        loaded.model.encode = fn
        ev = field_evaluation(volume, reference, Predictor(loaded), segments=MAIN, axis="axial")
        dice[mode] = {s.name: (s.oracle.dice, s.one_box.dice, s.three_boxes.dice) for s in ev.segments}
    fp32, bf16 = (statistics.median(times[m]) for m in ("fp32", "bf16"))
    print(f"encoder median: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s ({bf16 / fp32:.2f}x)")
    worst = 0.0
    for name in MAIN:
        a, b = dice["fp32"][name], dice["bf16"][name]
        change = max(abs(x - y) for x, y in zip(a, b))
        worst = max(worst, change)
        print(f"{name:27s} oracle/one box/three boxes fp32 {a[0]:.3f} {a[1]:.3f} {a[2]:.3f}  "
              f"bf16 {b[0]:.3f} {b[1]:.3f} {b[2]:.3f}  largest change {change:.4f}")
    print(f"largest Dice change {worst:.4f} (gate: <= 0.01) -> {'holds' if worst <= 0.01 else 'fails'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
