"""The benchmark's Markdown table (``bench.py`` measures; this formats ``run_benchmark``'s result).

Every timing is shown as its median with the run's spread ``[min-max]`` (how noisy the machine was), and
the GEMM rates as sampled before / between / after the runs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple


def _gb(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _t(st: Dict[str, Any], scale: float = 1.0, fmt: str = ".2f") -> str:
    """``median [min-max]`` of a :func:`~RobustMedSAMLib.measure.stats` dict (times ``scale``)."""
    lo, hi = st["min"] * scale, st.get("max", st["min"]) * scale
    return f"{st['median'] * scale:{fmt}} [{lo:{fmt}}-{hi:{fmt}}]"


def _rate(samples) -> str:
    return " / ".join(f"{s / 1e9:.0f}" for s in samples)


def format_table(res: Dict[str, Any]) -> str:
    """A Markdown table of the main figures."""
    c, e, f, g = res["config"], res["encoder"], res["flops"], res["gemm"]
    d, p = res["decoder"], res["propagation"]
    bf = c.get("bf16_rows") and "ours_bf16" in e
    size = "tiny test model" if c["quick"] else "ViT-B, 1024 x 1024"
    rows: List[Tuple[str, str]] = [
        ("encoder, segment_anything eager, own process (s / slice)", _t(e["reference_default"])),
        ("encoder, segment_anything eager, in our process (s / slice)", _t(e["reference"])),
        (f"encoder, ours ({e['path']} path) (s / slice)", _t(e["ours"])),
    ]
    if bf:
        rows.append((f"encoder, ours bf16 ({e['path_bf16']} path) (s / slice)", _t(e["ours_bf16"])))
        rows.append(("encoder bf16 / float32 (same run, medians)",
                     f"{e['bf16_vs_fp32']:.2f}x (CPU time {e['ours_bf16_cpu']['median']:.1f} vs "
                     f"{e['ours_cpu']['median']:.1f} s)"))
        rows.append(("bf16 vs float32 encoder outputs: relative difference embeddings / early features",
                     f"{e['bf16_rel_diff_embeddings']:.1e} / {e['bf16_rel_diff_early']:.1e}"))
    rows += [
        ("encoder speed-up (same run): vs segment_anything on its own / in our process",
         f"{e['speedup']:.2f}x / {e['speedup_same_process']:.2f}x (CPU time "
         f"{e['reference_default_cpu']['median']:.1f} / {e['reference_cpu']['median']:.1f} s vs "
         f"{e['ours_cpu']['median']:.1f} s)"),
        ("max abs difference: embeddings / early features",
         f"{e['max_abs_diff_embeddings']:.1e} / {e['max_abs_diff_early']:.1e}"),
        ("fp32 GEMM rate (transformer shapes; median, GFLOP/s)", f"{g['flops_per_s'] / 1e9:.0f}"),
        ("fp32 GEMM rate sampled: first, between runs, last (GFLOP/s)",
         _rate([g.get("before", g["flops_per_s"])] + e["gemm_samples"] + ([g["after"]] if "after" in g else []))),
    ]
    if bf:
        gb = res["gemm_bf16"]
        rows.append(("bf16 GEMM rate (same shapes; median, GFLOP/s) / fp32",
                     f"{gb['flops_per_s'] / 1e9:.0f} ({gb['flops_per_s'] / g['flops_per_s']:.1f}x)"))
        rows.append(("bf16 GEMM rate sampled: first, around the encoder runs, last (GFLOP/s)",
                     _rate([gb["before"]] + e["gemm_bf16_samples"] + ([gb["after"]] if "after" in gb else []))))
    rows += [
        ("encoder FLOPs -> fp32 FLOP floor", f"{f['total'] / 1e9:.4g} GFLOP -> {f['floor_seconds']:.3g} s"),
        ("encoder time / FLOP floor: ours / segment_anything on its own",
         f"{f['ours_vs_floor']:.2f}x / {f['reference_vs_floor']:.2f}x"),
    ]
    if bf:
        fb = res["flops_bf16"]
        rows.append(("bf16 FLOP floor: model FLOPs / executed (split weights, extended attention) at the bf16 rate",
                     f"{fb['floor_seconds']:.3g} s / {fb['executed'] / 1e9:.4g} GFLOP -> "
                     f"{fb['executed_floor_seconds']:.3g} s; ours bf16 / model floor {fb['ours_vs_floor']:.2f}x"))
    rows.append(("prompt -> mask on a cached slice (robust decoder; ms)", _t(d, 1e3, ".0f")))
    if bf:
        rows.append(("prompt -> mask, bf16 model (ms)", _t(res["decoder_bf16"], 1e3, ".0f")))
    if d.get("flops"):
        floor_ms = d["flops"] / g["flops_per_s"] * 1e3
        rows.append(("prompt -> mask FLOPs (convolutions, GEMMs) -> FLOP floor; time / floor",
                     f"{d['flops'] / 1e9:.1f} GFLOP -> {floor_ms:.0f} ms; {d['median'] * 1e3 / floor_ms:.2f}x"))
    if e.get("robust_features"):
        rows.append(("robust decoder image features, once per slice (s)", _t(e["robust_features"])))
        if bf and e.get("robust_features_bf16"):
            rows.append(("robust decoder image features, bf16 (s)", _t(e["robust_features_bf16"])))
    rows.append((f"propagation over {p['slices']} slices ({p['encoder_calls']} encoded)",
                 f"{p['seconds']:.1f} s = {p['vs_encoder']:.2f}x encoder time"
                 f" ({p['vs_encoder_and_features']:.2f}x encoder + features)"))
    if bf:
        pb = res["propagation_bf16"]
        rows.append((f"propagation, bf16 ({pb['encoder_calls']} encoded)",
                     f"{pb['seconds']:.1f} s = {pb['seconds'] / p['seconds']:.2f}x float32"
                     f" ({pb['vs_encoder_and_features']:.2f}x bf16 encoder + features)"))
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
        if "propagation-bf16" in mem:
            mb = mem["propagation-bf16"]
            rows.append(("peak RSS bf16: encoder / propagation (bf16 weight copies included)",
                         f"{_gb(mem['encoder-bf16']['peak_bytes'])} / {_gb(mb['peak_bytes'])}"
                         f" (model loaded: {_gb(mb['baseline_bytes'])})"))
    gpu = res.get("gpu")
    if gpu:
        rows.append((f"GPU encoder fp32 / autocast {gpu.get('autocast', '')} ({gpu['device']}; ms)",
                     f"{_t(gpu['encoder_fp32'], 1e3, '.0f')} / {_t(gpu['encoder_autocast'], 1e3, '.0f')}"))
        rows.append(("GPU encoding per slice (engine: pinned memory, autocast): batches of 4 / one at a time; "
                     "peak CUDA memory fp32 / autocast",
                     f"{gpu['encode_batched_4_per_slice'] * 1e3:.0f} / "
                     f"{gpu.get('encode_single_per_slice', float('nan')) * 1e3:.0f} ms; "
                     f"{_gb(gpu['peak_fp32_bytes'])} / {_gb(gpu['peak_autocast_bytes'])}"))
        if gpu.get("decoder"):
            gp = gpu["propagation"]
            rows.append(("GPU prompt -> mask (ms); propagation (lookahead batches)",
                         f"{_t(gpu['decoder'], 1e3, '.0f')}; {gp['seconds']:.2f} s over {gp['slices']} slices "
                         f"({gp['encoder_calls']} encoded)"))
    load = ""
    if c.get("load_before") is not None:
        load = f"; 1-min load {c['load_before'][0]:.2f} before, {c.get('load_after', [float('nan')])[0]:.2f} after"
    head = (f"Benchmark ({size}; {c.get('cpu_model', c['machine'])}, native bf16: {c.get('native_bf16', '?')}; "
            f"torch {c['torch']}, {c['threads']} threads, {c['cpus']} CPUs; {c.get('date', '')}; "
            f"medians [min-max] of {c['repeats']} runs{load})")
    lines = [head, "", "| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)
