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
* **bf16** rows (``--bf16 auto``: where the CPU computes bf16 natively; ``on`` / ``off``), side by side in the
  same run from a second seeded model with ``precision="bf16"`` (``precision.py``): its encoder timed in the
  same alternation as the float32 ones, their ratio and relative output difference, the bf16 GEMM rate
  (sampled before and after the encoder runs) and bf16 FLOP floors (the model's FLOPs, and the FLOPs the
  bf16 path executes: split weights double the linear layers, extended queries/keys widen attention,
  ``measure.encoder_flops_bf16``), the image features, prompt -> mask, propagation and peak memory.
* **Noise**: every timing is reported as median [min-max]; the GEMM rates are measured first, between the
  encoder runs and last, and the 1-minute load average before and after the run is recorded.
* **GPU** rows (only with CUDA): encoder time fp32 and under :func:`~RobustMedSAMLib.acceleration.autocast`,
  batched encoding, and peak CUDA memory.

Absolute numbers need an otherwise idle machine; the ratios within one run are robust to moderate load.

The shared seeded set-up is in ``bench_setup.py``, the reference worker in ``bench_reference.py``, the memory
parts in ``bench_memory.py``, the table in ``bench_table.py`` and the measuring tools in ``measure.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .bench_reference import ReferenceWorker, serve_reference
from .bench_setup import box_prompt, encoder_kwargs, model_name, run_propagation, seeded_input, seeded_volume
from .bench_table import format_table
from .measure import (GEMM_SHAPES, QUICK_GEMM_SHAPES, counted_flops, encoder_flops, encoder_flops_bf16, gemm_rate,
                      median_time, stats)

from .bench_memory import BF16_PARTS, PARTS, measure_memory, run_part  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------------

def bench_encoder(loaded, repeats: int, log, gemm_shapes: Sequence = GEMM_SHAPES,
                  quick: bool = False, loaded_bf16=None) -> Dict[str, Any]:
    """Our encoder (float32, and bf16 if ``loaded_bf16`` is given) vs segment_anything's eager encoder, same
    weights and input, alternating runs; the GEMM rates are sampled between the runs too (so the FLOP floors
    are measured under the same machine load)."""
    from segment_anything.modeling import ImageEncoderViT

    arch = loaded.config.architecture
    ours = loaded.model.image_encoder
    ours_bf16 = loaded_bf16.model.image_encoder if loaded_bf16 is not None else None
    ref = ImageEncoderViT(**encoder_kwargs(arch)).eval()
    ref.load_state_dict(ours.state_dict())
    x = seeded_input(arch)
    captured = {}
    hook = ref.blocks[ours.early_block].register_forward_hook(lambda m, i, o: captured.__setitem__("early", o))
    gemm_samples = [gemm_rate(gemm_shapes, repeats=3)["flops_per_s"]]
    bf16_samples = [gemm_rate(gemm_shapes, repeats=3, dtype=torch.bfloat16)["flops_per_s"]] if ours_bf16 else []
    kinds = ("reference", "reference_default", "ours") + (("ours_bf16",) if ours_bf16 is not None else ())
    wall: Dict[str, List[float]] = {k: [] for k in kinds}
    cpu: Dict[str, List[float]] = {k: [] for k in kinds}
    outputs = {}
    worker = ReferenceWorker(quick, torch.get_num_threads())
    try:
        with torch.inference_mode():
            path = ours.path_for(x)
            path_bf16 = ours_bf16.path_for(x) if ours_bf16 is not None else None

            def run(kind):
                if kind == "reference_default":
                    return worker.run()
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "ours":
                    outputs["ours"] = ours(x)
                elif kind == "ours_bf16":
                    outputs["ours_bf16"] = ours_bf16(x)
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
            if ours_bf16 is not None:
                bf16_samples.append(gemm_rate(gemm_shapes, repeats=3, dtype=torch.bfloat16)["flops_per_s"])
    finally:
        hook.remove()
        worker.close()
    (emb_o, early_o), (emb_r, early_r) = outputs["ours"], outputs["reference"]
    res: Dict[str, Any] = {"path": path}
    if loaded.model.has_robust_decoder:  # the decoder's image-only branches: also computed once per slice
        with torch.inference_mode():
            res["robust_features"] = stats(median_time(
                lambda: loaded.model.mask_decoder.image_features(emb_o, early_o), repeats, warmup=1))
            if ours_bf16 is not None:
                emb_b, early_b = outputs["ours_bf16"]
                res["robust_features_bf16"] = stats(median_time(
                    lambda: loaded_bf16.model.mask_decoder.image_features(emb_b, early_b), repeats, warmup=1))
    else:
        res["robust_features"] = None
    ours_median = statistics.median(wall["ours"])
    for kind in kinds:
        res[kind] = stats(wall[kind])
        res[f"{kind}_cpu"] = stats(cpu[kind])
    res.update({"speedup": statistics.median(wall["reference_default"]) / ours_median,
                "speedup_same_process": statistics.median(wall["reference"]) / ours_median,
                "gemm_samples": gemm_samples,
                "max_abs_diff_embeddings": float((emb_o.double() - emb_r.double()).abs().max()),
                "max_abs_diff_early": float((early_o.double() - early_r.double()).abs().max())})
    if ours_bf16 is not None:
        emb_b, early_b = outputs["ours_bf16"]
        res.update({"path_bf16": path_bf16, "gemm_bf16_samples": bf16_samples,
                    "bf16_vs_fp32": statistics.median(wall["ours_bf16"]) / ours_median,
                    "bf16_rel_diff_embeddings": _rel(emb_b, emb_o), "bf16_rel_diff_early": _rel(early_b, early_o),
                    "bf16_max_abs_diff_embeddings": float((emb_b.double() - emb_o.double()).abs().max())})
    return res


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference ``|a - b| / |b|`` (Frobenius norms)."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_decoder(loaded, repeats: int) -> Dict[str, Any]:
    from .predictor import Predictor

    predictor = Predictor(loaded)
    side = max(loaded.config.architecture.image_size // 2, 64)
    image = seeded_volume(1, side)[0]
    predictor.set_image(image)
    prompt = box_prompt(side)
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
    seconds, result = run_propagation(predictor, slices, side)
    calls = predictor.encoder_calls
    return {"seconds": seconds, "slices": slices, "predicted": len(result.predicted), "encoder_calls": calls,
            "per_slice": seconds / max(1, len(result.predicted)),
            "vs_encoder": seconds / (max(1, calls) * encoder_seconds),
            "vs_encoder_and_features": seconds / (max(1, calls) * (encoder_seconds + features_seconds)),
            "cache_bytes": predictor.cache.bytes}


def bench_gpu(loaded, repeats: int, log, slices: int = 4) -> Optional[Dict[str, Any]]:
    """CUDA rows: encoder in float32 and under the engine's autocast (bf16 where supported, else fp16),
    batched encoding (4) against one at a time, peak CUDA memory, prompt -> mask and a propagation with the
    GPU's lookahead batches. The model is moved to the GPU and back."""
    if not torch.cuda.is_available():
        return None
    from .acceleration import autocast, encode_batched
    from .precision import choose_precision, set_precision

    model = loaded.model.to("cuda")
    amp = choose_precision("auto", None, "cuda").precision
    x = seeded_input(loaded.config.architecture)
    xc = x.cuda()
    sync = torch.cuda.synchronize
    out: Dict[str, Any] = {"device": torch.cuda.get_device_name(), "autocast": amp}
    try:
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats()
            out["encoder_fp32"] = stats(median_time(lambda: model.image_encoder(xc), repeats, 2, sync))
            out["peak_fp32_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with autocast("cuda"):
                out["encoder_autocast"] = stats(median_time(lambda: model.image_encoder(xc), repeats, 2, sync))
            out["peak_autocast_bytes"] = torch.cuda.max_memory_allocated()
        set_precision(model, amp)  # what load_model(device="cuda") sets up
        batch = [x[0]] * 4
        times = median_time(lambda: encode_batched(model, batch, 4), repeats, 1, sync)
        out["encode_batched_4_per_slice"] = statistics.median(times) / 4
        single = median_time(lambda: encode_batched(model, batch[:1], 1), repeats, 1, sync)
        out["encode_single_per_slice"] = statistics.median(single)
        out["decoder"] = bench_decoder(loaded, repeats)
        out["propagation"] = bench_propagation(loaded, slices, out["encode_single_per_slice"])
        log("gpu: done")
    finally:
        model.to("cpu")
        set_precision(model, "fp32")
    return out


def run_benchmark(quick: bool = False, slices: int = 4, repeats: int = 3, memory: bool = True,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                  bf16: str = "auto") -> Dict[str, Any]:
    """Every part of the benchmark; ``bf16``: "auto" (bf16 rows where the CPU computes bf16 natively), "on"
    or "off"."""
    from .models import seeded_model
    from .precision import native_bf16

    if slices < 1 or repeats < 1:
        raise ValueError("--slices and --repeats must be >= 1")
    if bf16 not in ("auto", "on", "off"):
        raise ValueError(f"--bf16 must be auto, on or off, got {bf16!r}")
    name = model_name(quick)
    native = native_bf16()
    with_bf16 = bf16 == "on" or (bf16 == "auto" and bool(native))
    log(f"building seeded model {name}" + (" (float32 and bf16)" if with_bf16 else ""))
    loaded = seeded_model(name, device="cpu")
    loaded_bf16 = seeded_model(name, device="cpu", precision="bf16") if with_bf16 else None
    arch = loaded.config.architecture
    res: Dict[str, Any] = {
        "config": {"model": name, "quick": quick, "slices": slices, "repeats": repeats,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "machine": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
                   "native_bf16": native or "none", "bf16_rows": with_bf16, "python": platform.python_version(),
                   "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": _load_average()}}
    shapes = QUICK_GEMM_SHAPES if quick else GEMM_SHAPES
    log("gemm rate")
    res["gemm"] = gemm_rate(shapes, repeats=max(3, repeats))
    res["gemm"]["before"] = res["gemm"]["flops_per_s"]
    if with_bf16:
        res["gemm_bf16"] = gemm_rate(shapes, repeats=max(3, repeats), dtype=torch.bfloat16)
        res["gemm_bf16"]["before"] = res["gemm_bf16"]["flops_per_s"]
    res["encoder"] = bench_encoder(loaded, repeats, log, shapes, quick, loaded_bf16)
    res["gemm"]["flops_per_s"] = statistics.median([res["gemm"]["flops_per_s"]] + res["encoder"]["gemm_samples"])
    flops = encoder_flops(arch)
    floor = flops["total"] / res["gemm"]["flops_per_s"]
    res["flops"] = {**flops, "floor_seconds": floor, "ours_vs_floor": res["encoder"]["ours"]["median"] / floor,
                    "reference_vs_floor": res["encoder"]["reference_default"]["median"] / floor}
    if with_bf16:
        g = res["gemm_bf16"]
        g["flops_per_s"] = statistics.median([g["flops_per_s"]] + res["encoder"]["gemm_bf16_samples"])
        executed = encoder_flops_bf16(arch)["total"]
        floor_bf16 = flops["total"] / g["flops_per_s"]
        res["flops_bf16"] = {"total": flops["total"], "executed": executed, "floor_seconds": floor_bf16,
                             "executed_floor_seconds": executed / g["flops_per_s"],
                             "ours_vs_floor": res["encoder"]["ours_bf16"]["median"] / floor_bf16}
    log("prompt -> mask latency")
    res["decoder"] = bench_decoder(loaded, repeats)
    if with_bf16:
        res["decoder_bf16"] = bench_decoder(loaded_bf16, repeats)
    log(f"propagation over {slices} slices")
    enc = res["encoder"]
    feats = enc["robust_features"]
    res["propagation"] = bench_propagation(loaded, slices, enc["ours"]["median"], feats["median"] if feats else 0.0)
    if with_bf16:
        feats_b = enc.get("robust_features_bf16")
        res["propagation_bf16"] = bench_propagation(loaded_bf16, slices, enc["ours_bf16"]["median"],
                                                    feats_b["median"] if feats_b else 0.0)
    res["gpu"] = bench_gpu(loaded, repeats, log, slices)
    res["memory"] = measure_memory(quick, slices, log, with_bf16) if memory else None
    log("gemm rate (after)")
    res["gemm"]["after"] = gemm_rate(shapes, repeats=max(3, repeats))["flops_per_s"]
    if with_bf16:
        res["gemm_bf16"]["after"] = gemm_rate(shapes, repeats=max(3, repeats), dtype=torch.bfloat16)["flops_per_s"]
    res["config"]["load_after"] = _load_average()
    return res


def _cpu_model() -> str:
    from .precision import cpu_model

    return cpu_model()


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustmedsam bench", description=__doc__.split("\n")[0])
    p.add_argument("--slices", type=int, default=4, help="slices to propagate through (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny model: a smoke test in seconds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 rows side by side with float32: auto (default: where the CPU computes bf16 "
                        "natively), on, off")
    p.add_argument("--part", choices=PARTS + BF16_PARTS, help=argparse.SUPPRESS)
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
        res = run_benchmark(args.quick, args.slices, args.repeats, memory=not args.no_memory, bf16=args.bf16)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the CLI, tests)
    print(format_table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
