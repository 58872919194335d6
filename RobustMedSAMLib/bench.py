"""Benchmark: ``robustmedsam bench`` or ``python -m RobustMedSAMLib.bench`` (``--help`` for options).

Everything runs on seeded full-size ViT-B weights (``seeded.py``; ``--quick``: the tiny test configuration)
and the same seeded input, and prints a Markdown table ready for the README (``--json`` keeps every raw
number). Measured in one process, with warm-up runs and medians over ``--repeats`` runs:

* **Encoder**: seconds per 1024 x 1024 slice of our encoder (fast path) and of segment_anything's eager
  ``ImageEncoderViT`` holding the same weights, timed alternately (so machine load affects both alike),
  their ratio, and the max abs difference of their embeddings and early (first global block) features.
  The reference is timed twice: in this process, which carries our engine's process-wide glibc allocator
  settings (``allocator.py``), and as segment_anything runs on its own, in a worker process with the default
  allocator that waits while this one runs (``--reference-worker``); the speed-up is against the latter.
* **GEMM rate and FLOP floor**: the fp32 GEMM rate of this machine on transformer-like shapes (ViT-B's
  ``4096 x 768 x 3072`` MLP, ``4096 x 3072 x 768``, ``4096 x 768 x 2304`` qkv; median of samples taken
  before and between the encoder runs) and our encoder time divided by ``encoder FLOPs / GEMM rate``. Encoder FLOPs (multiply-add = 2 FLOPs), with N = (S/p)^2 tokens of
  width C, depth L, G global blocks, windows of w x w (T = w^2 tokens, n_w windows after padding):

  - patch embedding ``2 N C (3 p^2)``; neck ``2 N C 256 + 2 N 256 256 9``;
  - per block: qkv, projection and MLP (ratio 4) ``2 N (3C^2 + C^2 + 8C^2) = 24 N C^2``;
  - global attention ``4 N^2 C`` (q k^T and attn v over all heads) + rel-pos ``2 N (H + W) C``;
  - windowed attention ``4 n_w T^2 C`` + rel-pos ``4 n_w T w C``.

  ViT-B at 1024 x 1024: 0.94 TFLOP. Softmax, LayerNorm, GELU and copies are not counted (they are the
  overhead the ratio shows).
* **Prompt -> mask**: a box prompt on an already encoded slice (cached encoding, robust decoder) through
  :class:`~RobustMedSAMLib.predictor.Predictor`, milliseconds.
* **Propagation**: ``propagate`` over ``--slices`` slices (seed masks on the slices just outside them, so
  every slice in between is predicted), against that many encoder passes.
* **Peak resident memory** of each part, each measured in a fresh subprocess after its set-up (Linux:
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss`` of the
  subprocess, set-up included). The process baseline (Python, PyTorch, weights) is shown separately.
* **GPU** rows (only with CUDA): encoder time fp32 and under :func:`~RobustMedSAMLib.acceleration.autocast`,
  batched encoding, and peak CUDA memory.

Absolute numbers need an otherwise idle machine; the ratios within one run are robust to moderate load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .measure import (GEMM_SHAPES, QUICK_GEMM_SHAPES, PeakMemory, counted_flops, encoder_flops, gemm_rate,
                      median_time, stats)

PARTS = ("encoder-reference", "encoder-fast", "decoder", "propagation")


# ----------------------------------------------------------------------------------------------------------
# set-up shared by the parts
# ----------------------------------------------------------------------------------------------------------

def _model_name(quick: bool) -> str:
    return "tiny" if quick else "robustmedsam"


def _encoder_kwargs(arch) -> Dict[str, Any]:
    """The ``ImageEncoderViT`` arguments of ``modeling.model.build_model``."""
    return dict(depth=arch.depth, embed_dim=arch.embed_dim, img_size=arch.image_size, mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.num_heads,
                patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
                global_attn_indexes=arch.global_attn_indexes, window_size=arch.window_size,
                out_chans=arch.prompt_dim)


def _seeded_encoder(kind: str, arch, seed: int = 0):
    """segment_anything's ``ImageEncoderViT`` ("reference") or ours ("fast"), seeded like the full model."""
    from segment_anything.modeling import ImageEncoderViT

    from .modeling.image_encoder import ImageEncoder
    from .seeded import seed_module

    enc = (ImageEncoderViT if kind == "reference" else ImageEncoder)(**_encoder_kwargs(arch))
    seed_module(enc, seed, prefix="image_encoder.")
    return enc.eval()


def _input(arch, device=None) -> torch.Tensor:
    from .preprocess import Preprocessing, prepare_image
    from .seeded import seeded_image

    side = max(arch.image_size // 2, 64)
    x, _ = prepare_image(seeded_image((side, side, 3), seed=3), Preprocessing("sam", arch.image_size), device)
    return x


def _ellipse(shape, frac: float = 0.25) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (frac * h)) ** 2 + ((xx - w / 2) / (frac * w)) ** 2 <= 1.0


def _volume(slices: int, side: int) -> np.ndarray:
    from .seeded import seeded_image

    return np.stack([seeded_image((side, side), seed=100 + z) for z in range(slices)])


def _box_prompt(side: int):
    from .prompts import Prompt

    return Prompt(box=[side * 0.25, side * 0.3, side * 0.7, side * 0.75])


def _run_propagation(predictor, slices: int, side: int):
    """Propagate through ``slices`` slices between two seed slices; returns (seconds, result)."""
    from .propagation import propagate
    from .volume_segmentation import VolumeSegmenter

    volume = _volume(slices + 2, side)
    segmenter = VolumeSegmenter(predictor, volume, axis=0)
    seed = _ellipse((side, side))
    t0 = time.perf_counter()
    result = propagate(segmenter, {0: seed, slices + 1: seed}, iou_threshold=0.0)
    return time.perf_counter() - t0, result


# ----------------------------------------------------------------------------------------------------------
# memory parts (each in a fresh subprocess)
# ----------------------------------------------------------------------------------------------------------

def run_part(part: str, quick: bool, slices: int) -> Dict[str, Any]:
    """Set up ``part``, reset the peak, run it once; returns baseline/peak resident bytes."""
    from .models import seeded_model
    from .predictor import Predictor

    mem = PeakMemory()
    imported = mem.current()  # torch and the engine imported, nothing built yet (the CUDA builds map more)
    name = _model_name(quick)
    if part in ("encoder-reference", "encoder-fast"):
        from .models import get_config

        arch = get_config(name).architecture
        enc = _seeded_encoder("reference" if part == "encoder-reference" else "fast", arch)
        x = _input(arch)
        if part == "encoder-fast":  # as the engine runs it (load_model tunes the allocator); the reference not
            from .allocator import tune_cpu_allocator

            tune_cpu_allocator()

        def job():
            with torch.inference_mode():
                enc(x)
    elif part in ("decoder", "propagation"):
        loaded = seeded_model(name)
        predictor = Predictor(loaded)
        side = max(loaded.config.architecture.image_size // 2, 64)
        if part == "decoder":
            image = _volume(1, side)[0]
            predictor.set_image(image)
            prompt = _box_prompt(side)

            def job():
                for _ in range(5):
                    predictor.predict(prompt)
        else:
            def job():
                _run_propagation(predictor, slices, side)
    else:
        raise ValueError(f"unknown part {part!r}; one of {PARTS}")
    baseline = mem.current()
    exact = mem.reset()
    job()
    cached = predictor.cache.bytes if part in ("decoder", "propagation") else 0
    return {"part": part, "import_bytes": imported, "baseline_bytes": baseline, "peak_bytes": mem.peak(),
            "peak_since_reset": exact, "cache_bytes": cached}


def measure_memory(quick: bool, slices: int, log: Callable[[str], None]) -> Dict[str, Any]:
    out = {}
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for part in PARTS:
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


# ----------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------

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

    arch = get_config(_model_name(quick)).architecture
    enc = _seeded_encoder("reference", arch)
    x = _input(arch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            enc(x)
        print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}), flush=True)


def bench_encoder(loaded, repeats: int, log, gemm_shapes: Sequence = GEMM_SHAPES,
                  quick: bool = False) -> Dict[str, Any]:
    """Our encoder vs segment_anything's eager encoder, same weights and input, alternating runs; the GEMM
    rate is sampled between the runs too (so the FLOP floor is measured under the same machine load)."""
    from segment_anything.modeling import ImageEncoderViT

    arch = loaded.config.architecture
    ours = loaded.model.image_encoder
    ref = ImageEncoderViT(**_encoder_kwargs(arch)).eval()
    ref.load_state_dict(ours.state_dict())
    x = _input(arch)
    captured = {}
    hook = ref.blocks[ours.early_block].register_forward_hook(lambda m, i, o: captured.__setitem__("early", o))
    gemm_samples = [gemm_rate(gemm_shapes, repeats=3)["flops_per_s"]]
    kinds = ("reference", "reference_default", "ours")
    wall: Dict[str, List[float]] = {k: [] for k in kinds}
    cpu: Dict[str, List[float]] = {k: [] for k in kinds}
    outputs = {}
    worker = ReferenceWorker(quick, torch.get_num_threads())
    try:
        with torch.inference_mode():
            path = ours.path_for(x)

            def run(kind):
                if kind == "reference_default":
                    return worker.run()
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "ours":
                    outputs["ours"] = ours(x)
                else:
                    outputs["reference"] = (ref(x), captured["early"])
                return time.perf_counter() - t0, time.process_time() - c0

            log("encoder: warm-up")
            for kind in kinds:
                run(kind)
            for r in range(repeats):
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                    w, c = run(kind)
                    wall[kind].append(w)
                    cpu[kind].append(c)
                    log(f"encoder {kind}: {w:.2f} s (cpu {c:.2f} s)")
                gemm_samples.append(gemm_rate(gemm_shapes, repeats=3)["flops_per_s"])
    finally:
        hook.remove()
        worker.close()
    (emb_o, early_o), (emb_r, early_r) = outputs["ours"], outputs["reference"]
    features = None
    if loaded.model.has_robust_decoder:  # the decoder's image-only branches: also computed once per slice
        with torch.inference_mode():
            features = stats(median_time(lambda: loaded.model.mask_decoder.image_features(emb_o, early_o),
                                           repeats, warmup=1))
    diff_emb = float((emb_o.double() - emb_r.double()).abs().max())
    diff_early = float((early_o.double() - early_r.double()).abs().max())
    ours_median = statistics.median(wall["ours"])
    return {"path": path, "reference": stats(wall["reference"]), "ours": stats(wall["ours"]),
            "reference_default": stats(wall["reference_default"]),
            "reference_cpu": stats(cpu["reference"]), "ours_cpu": stats(cpu["ours"]),
            "reference_default_cpu": stats(cpu["reference_default"]),
            "speedup": statistics.median(wall["reference_default"]) / ours_median,
            "speedup_same_process": statistics.median(wall["reference"]) / ours_median,
            "robust_features": features, "gemm_samples": gemm_samples,
            "max_abs_diff_embeddings": diff_emb, "max_abs_diff_early": diff_early}


def bench_decoder(loaded, repeats: int) -> Dict[str, Any]:
    from .predictor import Predictor

    predictor = Predictor(loaded)
    side = max(loaded.config.architecture.image_size // 2, 64)
    image = _volume(1, side)[0]
    predictor.set_image(image)
    prompt = _box_prompt(side)
    times = median_time(lambda: predictor.predict(prompt), max(5, 3 * repeats), warmup=2)
    last = []
    flops = counted_flops(lambda: last.append(predictor.predict(prompt)))  # one more call, counted
    pred = last[0] if last else predictor.predict(prompt)
    return {**stats(times), "encoder_calls": predictor.encoder_calls, "mask_pixels": int(pred.mask.sum()),
            "flops": flops}


def bench_propagation(loaded, slices: int, encoder_seconds: float, features_seconds: float = 0.0
                      ) -> Dict[str, Any]:
    from .predictor import Predictor

    predictor = Predictor(loaded)
    side = max(loaded.config.architecture.image_size // 2, 64)
    seconds, result = _run_propagation(predictor, slices, side)
    calls = predictor.encoder_calls
    return {"seconds": seconds, "slices": slices, "predicted": len(result.predicted), "encoder_calls": calls,
            "per_slice": seconds / max(1, len(result.predicted)),
            "vs_encoder": seconds / (max(1, calls) * encoder_seconds),
            "vs_encoder_and_features": seconds / (max(1, calls) * (encoder_seconds + features_seconds)),
            "cache_bytes": predictor.cache.bytes}


def bench_gpu(loaded, repeats: int, log) -> Optional[Dict[str, Any]]:
    if not torch.cuda.is_available():
        return None
    from .acceleration import autocast, encode_batched

    model = loaded.model.to("cuda")
    x = _input(loaded.config.architecture)
    xc = x.cuda()
    sync = torch.cuda.synchronize
    out: Dict[str, Any] = {"device": torch.cuda.get_device_name()}
    with torch.inference_mode():
        torch.cuda.reset_peak_memorystats()
        out["encoder_fp32"] = stats(median_time(lambda: model.image_encoder(xc), repeats, 2, sync))
        out["peak_fp32_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memorystats()
        with autocast("cuda"):
            out["encoder_autocast"] = stats(median_time(lambda: model.image_encoder(xc), repeats, 2, sync))
        out["peak_autocast_bytes"] = torch.cuda.max_memory_allocated()
    batch = [x[0]] * 4
    times = median_time(lambda: encode_batched(model, batch, 4), repeats, 1, sync)
    out["encode_batched_4_per_slice"] = statistics.median(times) / 4
    log("gpu: done")
    model.to("cpu")
    return out


def run_benchmark(quick: bool = False, slices: int = 4, repeats: int = 3, memory: bool = True,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> Dict[str, Any]:
    from .models import seeded_model

    if slices < 1 or repeats < 1:
        raise ValueError("--slices and --repeats must be >= 1")
    name = _model_name(quick)
    log(f"building seeded model {name}")
    loaded = seeded_model(name, device="cpu")
    arch = loaded.config.architecture
    res: Dict[str, Any] = {
        "config": {"model": name, "quick": quick, "slices": slices, "repeats": repeats,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "machine": platform.processor() or platform.machine(), "python": platform.python_version()}}
    shapes = QUICK_GEMM_SHAPES if quick else GEMM_SHAPES
    log("gemm rate")
    res["gemm"] = gemm_rate(shapes, repeats=max(3, repeats))
    res["encoder"] = bench_encoder(loaded, repeats, log, shapes, quick)
    res["gemm"]["flops_per_s"] = statistics.median([res["gemm"]["flops_per_s"]] + res["encoder"]["gemm_samples"])
    flops = encoder_flops(arch)
    floor = flops["total"] / res["gemm"]["flops_per_s"]
    res["flops"] = {**flops, "floor_seconds": floor, "ours_vs_floor": res["encoder"]["ours"]["median"] / floor,
                    "reference_vs_floor": res["encoder"]["reference_default"]["median"] / floor}
    log("prompt -> mask latency")
    res["decoder"] = bench_decoder(loaded, repeats)
    log(f"propagation over {slices} slices")
    feats = res["encoder"]["robust_features"]
    res["propagation"] = bench_propagation(loaded, slices, res["encoder"]["ours"]["median"],
                                           feats["median"] if feats else 0.0)
    res["gpu"] = bench_gpu(loaded, repeats, log)
    res["memory"] = measure_memory(quick, slices, log) if memory else None
    return res


def _gb(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def format_table(res: Dict[str, Any]) -> str:
    """A Markdown table of the main figures."""
    c, e, f, g = res["config"], res["encoder"], res["flops"], res["gemm"]
    d, p = res["decoder"], res["propagation"]
    size = "tiny test model" if c["quick"] else "ViT-B, 1024 x 1024"
    rows = [
        ("encoder, segment_anything eager, own process (s / slice)", f"{e['reference_default']['median']:.2f}"),
        ("encoder, segment_anything eager, in our process (s / slice)", f"{e['reference']['median']:.2f}"),
        (f"encoder, ours ({e['path']} path) (s / slice)", f"{e['ours']['median']:.2f}"),
        ("encoder speed-up (same run): vs segment_anything on its own / in our process",
         f"{e['speedup']:.2f}x / {e['speedup_same_process']:.2f}x (CPU time "
         f"{e['reference_default_cpu']['median']:.1f} / {e['reference_cpu']['median']:.1f} s vs "
         f"{e['ours_cpu']['median']:.1f} s)"),
        ("max abs difference: embeddings / early features",
         f"{e['max_abs_diff_embeddings']:.1e} / {e['max_abs_diff_early']:.1e}"),
        ("fp32 GEMM rate (transformer shapes)", f"{g['flops_per_s'] / 1e9:.0f} GFLOP/s"),
        ("encoder FLOPs -> FLOP floor", f"{f['total'] / 1e9:.4g} GFLOP -> {f['floor_seconds']:.3g} s"),
        ("encoder time / FLOP floor: ours / segment_anything on its own", f"{f['ours_vs_floor']:.2f}x / {f['reference_vs_floor']:.2f}x"),
        ("prompt -> mask on a cached slice (robust decoder)", f"{d['median'] * 1e3:.0f} ms"),
    ]
    if d.get("flops"):
        floor_ms = d["flops"] / g["flops_per_s"] * 1e3
        rows.append(("prompt -> mask FLOPs (convolutions, GEMMs) -> FLOP floor; time / floor",
                     f"{d['flops'] / 1e9:.1f} GFLOP -> {floor_ms:.0f} ms; {d['median'] * 1e3 / floor_ms:.2f}x"))
    if e.get("robust_features"):
        rows.append(("robust decoder image features, once per slice (s)", f"{e['robust_features']['median']:.2f}"))
    rows.append((f"propagation over {p['slices']} slices ({p['encoder_calls']} encoded)",
                 f"{p['seconds']:.1f} s = {p['vs_encoder']:.2f}x encoder time"
                 f" ({p['vs_encoder_and_features']:.2f}x encoder + features)"))
    mem = res.get("memory")
    if mem:
        base = mem["encoder-fast"]["baseline_bytes"]
        rows.append(("peak RSS: encoder reference / ours",
                     f"{_gb(mem['encoder-reference']['peak_bytes'])} / {_gb(mem['encoder-fast']['peak_bytes'])}"
                     f" (before the pass: {_gb(base)})"))
        rows.append(("peak RSS: prompt -> mask / propagation (full model)",
                     f"{_gb(mem['decoder']['peak_bytes'])} / {_gb(mem['propagation']['peak_bytes'])}"
                     f" (model loaded: {_gb(mem['propagation']['baseline_bytes'])}, of which importing torch "
                     f"{c['torch']}: {_gb(mem['propagation'].get('import_bytes'))})"))
        held = mem["propagation"].get("cache_bytes") or 0
        rows.append(("peak RSS of the propagation without its cached encodings",
                     f"{_gb(mem['propagation']['peak_bytes'] - held)} ({_gb(held)} cached)"))
    gpu = res.get("gpu")
    if gpu:
        rows.append((f"GPU encoder fp32 / autocast ({gpu['device']})",
                     f"{gpu['encoder_fp32']['median'] * 1e3:.0f} / {gpu['encoder_autocast']['median'] * 1e3:.0f} ms"))
        rows.append(("GPU batched encoding (4) per slice; peak CUDA memory fp32 / autocast",
                     f"{gpu['encode_batched_4_per_slice'] * 1e3:.0f} ms; {_gb(gpu['peak_fp32_bytes'])} / "
                     f"{_gb(gpu['peak_autocast_bytes'])}"))
    head = (f"Benchmark ({size}; torch {c['torch']}, {c['threads']} threads, {c['cpus']} CPUs; "
            f"medians of {c['repeats']} runs)")
    lines = [head, "", "| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustmedsam bench", description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=4, help="slices to propagate through (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test in seconds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.part:
            print(json.dumps(run_part(args.part, args.quick, args.slices)))
            return 0
        if args.reference_worker:
            serve_reference(args.quick)
            return 0
        res = run_benchmark(args.quick, args.slices, args.repeats, memory=not args.no_memory)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the CLI, tests)
    print(format_table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
