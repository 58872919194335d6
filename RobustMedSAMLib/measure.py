"""Measuring tools of the benchmark (``bench.py``): FLOP counts, the machine's GEMM rate, timing and peak
resident memory. Model-independent; nothing here builds a model.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

GEMM_SHAPES = ((4096, 768, 3072), (4096, 3072, 768), (4096, 768, 2304))
QUICK_GEMM_SHAPES = ((256, 128, 512),)


def encoder_flops(arch, batch: int = 1) -> Dict[str, float]:
    """FLOPs of one encoder forward of ``batch`` images by part (formula in ``bench.py``'s docstring)."""
    side = arch.image_size // arch.patch_size
    n, c, p = side * side, arch.embed_dim, arch.patch_size
    w = arch.window_size
    nw = math.ceil(side / w) ** 2 if w > 0 else 0
    t = w * w
    n_global = len(arch.global_attn_indexes)
    n_window = arch.depth - n_global
    out = {
        "patch_embed": 2.0 * n * c * 3 * p * p,
        "linear": arch.depth * 24.0 * n * c * c,
        "global_attention": n_global * (4.0 * n * n * c + 2.0 * n * 2 * side * c),
        "window_attention": n_window * (4.0 * nw * t * t * c + 4.0 * nw * t * w * c),
        "neck": 2.0 * n * c * arch.prompt_dim + 2.0 * n * arch.prompt_dim * arch.prompt_dim * 9,
    }
    out = {k: v * batch for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def encoder_flops_bf16(arch, batch: int = 1) -> Dict[str, float]:
    """FLOPs the encoder's bf16 path executes (``modeling/encoder_bf16.py``): the linear layers twice (split
    weights ``W_hi + W_lo``), attention on extended queries/keys of ``hd + h + w`` columns (padded to 32)
    instead of ``hd``; patch embedding, rel-pos terms and neck as in :func:`encoder_flops`."""
    from .modeling.encoder_bf16 import augmented_width

    f = dict(encoder_flops(arch, batch))
    side = arch.image_size // arch.patch_size
    hd = arch.embed_dim // arch.num_heads
    w = arch.window_size
    n, c = side * side, arch.embed_dim
    n_global = len(arch.global_attn_indexes)
    n_window = arch.depth - n_global
    nw = math.ceil(side / w) ** 2 if w > 0 else 0
    f["linear"] *= 2
    f["global_attention"] = batch * n_global * (4.0 * n * n * c * augmented_width(hd, side, side) / hd
                                                + 2.0 * n * 2 * side * c)
    f["window_attention"] = batch * n_window * (4.0 * nw * (w * w) ** 2 * c * augmented_width(hd, w, w) / hd
                                                + 4.0 * nw * w * w * w * c)
    f["total"] = sum(v for k, v in f.items() if k != "total")
    return f


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] = lambda: None
                 ) -> List[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def gemm_rate(shapes: Sequence = GEMM_SHAPES, repeats: int = 5, dtype: torch.dtype = torch.float32
              ) -> Dict[str, Any]:
    """GEMM rate in FLOP/s of ``dtype`` (float32 or bfloat16): total FLOPs / total median time over ``shapes``
    (M, K, N), as the encoder's linear layers run them (``addmm`` into a preallocated output)."""
    gen = torch.Generator().manual_seed(0)
    total_flops = total_time = 0.0
    per_shape = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen).to(dtype)
        b = torch.randn(n, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        times = median_time(lambda: torch.addmm(bias, a, b.t(), out=out), max(3, repeats), warmup=2)
        med = statistics.median(times)
        per_shape[f"{m}x{k}x{n}"] = 2.0 * m * k * n / med
        total_flops += 2.0 * m * k * n
        total_time += med
    return {"flops_per_s": total_flops / total_time, "per_shape": per_shape}


class PeakMemory:
    """Peak resident memory of this process since :meth:`reset` (Linux) or since start (elsewhere)."""

    def __init__(self) -> None:
        self.resettable = False

    @staticmethod
    def _status(field_name: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def current(self) -> Optional[int]:
        return self._status("VmRSS")

    def reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        return self.resettable

    def peak(self) -> Optional[int]:
        hwm = self._status("VmHWM")
        if hwm is not None:
            return hwm
        try:
            import resource
        except ImportError:  # Windows
            return None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def counted_flops(fn: Callable[[], Any]) -> Optional[float]:
    """FLOPs of the matrix products and convolutions ``fn`` runs (``torch.utils.flop_counter``; FFTs and
    element-wise work are not counted, so ``flops / GEMM rate`` is a lower bound on the time)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # PyTorch < 2.1
        return None
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def stats(times: List[float]) -> Dict[str, Any]:
    """Median, min, max and every run of a list of timings (the max shows how noisy the run was)."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times}
