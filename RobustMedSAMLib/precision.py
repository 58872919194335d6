"""Numerical precision of a model on this machine: ``fp32``, or ``bf16`` where it is measured to pay.

``precision`` (``load_model(..., precision=)``, ``--precision`` on the command line):

* ``fp32``: float32 everywhere (on CUDA: no autocast).
* ``bf16``: on the CPU the encoder's transformer blocks and the robust decoder's convolutions compute in
  bfloat16 on cached bf16 weights (``modeling/bf16.py``, ``modeling/encoder_bf16.py``); LayerNorm, softmax and
  batch/instance-norm statistics, the Fourier transforms, the residual stream and every output stay float32.
  On CUDA: the encoder runs under bf16 autocast (``acceleration.py``).
* ``auto``: ``bf16`` only where all of these hold, else ``fp32`` (the choice and its reason are logged and kept
  as ``LoadedModel.precision`` / ``LoadedModel.precision_reason``):

  1. the model has a measured agreement gate that holds (:data:`GATES`; models without one keep fp32);
  2. the CPU reports native bf16 (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm): without it PyTorch emulates
     bf16 and runs about 12x slower than float32;
  3. a quick probe (bf16 vs float32 GEMM rate on transformer shapes, ~0.2 s, cached per CPU model, bf16 flags,
     PyTorch version, thread count and the settings that cap oneDNN's instructions (:func:`probe_key`) in
     ``<cache dir>/precision-probe.json``) shows a gain of at least :data:`MIN_GEMM_GAIN`.

  On CUDA ``auto`` keeps what the engine always did: autocast in bf16 where the GPU computes it natively
  (compute capability 8.0 or later, ``acceleration.cuda_native_bf16``), else fp16.
* ``None`` (the library default): ``fp32`` on the CPU and CUDA autocast as ``auto`` on a GPU, i.e. exactly the
  behaviour before precision was selectable.

The command-line default is :data:`DEFAULT` (``auto``) for the segmentation commands; ``evaluate`` defaults to
``fp32`` (its numbers are compared with published ones).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT = "auto"
MIN_GEMM_GAIN = 1.5  # bf16 GEMM rate / float32 GEMM rate needed for auto to pick bf16
PROBE_SHAPES = ((1024, 768, 3072), (1024, 3072, 768))  # ViT-B MLP shapes, a quarter of a slice's tokens
PROBE_FILE = "precision-probe.json"


# ---------------------------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class Gate:
    """A measured agreement gate of bf16 against float32 for one model.

    Attributes:
        measure: what was compared (bf16 vs float32 outputs of the same model and inputs).
        limit: the largest acceptable value of that measure.
        value: the value measured (None: not measured; the gate then does not hold).
        evidence: where it is measured (a test re-measures it on every run, or a documented evaluation).
    """

    measure: str
    limit: float
    value: Optional[float]
    evidence: str

    @property
    def holds(self) -> bool:
        return self.value is not None and self.value <= self.limit


_PARITY = "fraction of mask pixels differing, bf16 vs fp32, worst parity case"
_TEST = "Testing/test_precision.py (re-measured on every run; seeded weights and inputs of Testing/data/parity)"

# One line per model: Gate(measure, limit, measured value, evidence). A model without a line keeps fp32 under
# auto. Measured 2026-12-03 on an Intel Xeon with AMX-BF16, torch 2.14.1 (robust path: the ViT-B end-to-end
# case in per-sample BatchNorm mode; the decoder-only cases reached 0.0027; SAM path: the end-to-end case).
GATES: Dict[str, Gate] = {
    "robustmedsam": Gate(f"{_PARITY} (ViT-B, robust decoder path)", 0.005, 0.0041, _TEST),
    "robustsam": Gate(f"{_PARITY} (ViT-B, robust decoder path)", 0.005, 0.0041, _TEST),
    "medsam": Gate(f"{_PARITY} (ViT-B, SAM decoder path)", 0.005, 0.0009, _TEST),
    "sam-vit-b": Gate(f"{_PARITY} (ViT-B, SAM decoder path)", 0.005, 0.0009, _TEST),
    "tiny": Gate(f"{_PARITY} (tiny test model, both paths)", 0.005, 0.0023, _TEST),
    # LiteMedSAM has no bf16 path of its own; under CPU bf16 autocast its encoder took 0.61-0.69x the fp32 time,
    # but the lumbar column's one-box propagation stopped 2 slices earlier (Dice 0.743 -> 0.636): the gate fails
    "litemedsam": Gate("largest change of a structure's 3D Dice (oracle, one box, three boxes), field evaluation "
                       "on the sample chest CT, encoder under bf16 autocast vs float32", 0.01, 0.107,
                       "scripts/litemedsam_bf16_gate.py (2026-12-03, Intel Xeon with AMX-BF16, torch 2.14.1)"),
}


def gate_for(model: Optional[str]) -> Optional[Gate]:
    """The gate of the named model configuration (None for unnamed checkpoints and ungated models)."""
    return GATES.get(model) if model else None


# ---------------------------------------------------------------------------------------- the CPU
def _proc_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def native_bf16() -> str:
    """Which native bf16 instructions the CPU reports: ``"AMX-BF16"``, ``"AVX512-BF16"``, ``"Arm BF16"`` or
    ``""`` (none: bf16 would be emulated)."""
    caps = {}
    get_caps = getattr(torch.cpu, "get_capabilities", None)
    if get_caps is not None:
        try:
            caps = dict(get_caps())
        except Exception:  # noqa: BLE001 - older/unusual builds: fall through to the other sources
            caps = {}
    if not caps:
        for name, fn in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
            try:
                caps[name] = bool(getattr(torch.cpu, fn)())
            except Exception:  # noqa: BLE001
                pass
    info = _proc_cpuinfo()
    flags = set(re.findall(r"\b(amx_bf16|avx512_bf16)\b", info))
    if caps.get("amx_bf16") or "amx_bf16" in flags:
        return "AMX-BF16"
    if caps.get("avx512_bf16") or "avx512_bf16" in flags:
        return "AVX512-BF16"
    if platform.machine().lower() in ("aarch64", "arm64"):
        if re.search(r"^Features\s*:.*\bbf16\b", info, re.M):
            return "Arm BF16"
        if sys.platform == "darwin":
            try:
                out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                     text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                out = ""
            if out == "1":
                return "Arm BF16"
    return ""


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _proc_cpuinfo(), re.M)
    return (m.group(1).strip() if m else "") or platform.processor() or platform.machine() or "unknown CPU"


# Environment variables that change which kernels compute bf16 GEMMs: with ONEDNN_MAX_CPU_ISA=AVX2 oneDNN emulates
# bf16 on a CPU with AMX (measured here: bf16 GEMMs 32 against 333 GFLOP/s float32, 0.1x instead of 4x)
DISPATCH_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
PROBE_VERSION = 1  # bump when PROBE_SHAPES or measure_gemm_gain change: older cached entries are then ignored


def probe_key() -> str:
    """What the cached probe depends on: CPU model, its native bf16 instructions, PyTorch, threads, oneDNN's use
    and the environment variables that cap its instruction set (:data:`DISPATCH_ENV`), the probe's version."""
    env = ",".join(f"{name}={os.environ[name]}" for name in DISPATCH_ENV if os.environ.get(name, "").strip())
    mkldnn = "on" if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else "off"
    return (f"{cpu_model()}|bf16={native_bf16() or 'none'}|torch {torch.__version__}|threads {torch.get_num_threads()}"
            f"|onednn {mkldnn}{'|' + env if env else ''}|probe v{PROBE_VERSION}")


# -------------------------------------------------------------------------------------------- probe
def measure_gemm_gain() -> Dict[str, float]:
    """bf16 and float32 GEMM rates (FLOP/s) on :data:`PROBE_SHAPES`, alternated twice, best of each."""
    from .measure import gemm_rate

    best = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(2):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            rate = gemm_rate(PROBE_SHAPES, repeats=3, dtype=dtype)["flops_per_s"]
            best[name] = max(best[name], rate)
    return {"fp32": best["fp32"], "bf16": best["bf16"], "gain": best["bf16"] / best["fp32"]}


def _probe_path() -> Optional[Path]:
    from .weights import cache_dir

    try:
        return cache_dir() / PROBE_FILE
    except OSError:
        return None


def _valid(entry) -> bool:
    """A cached probe entry that can be trusted: finite positive rates and gain (else it is measured again)."""
    if not isinstance(entry, dict):
        return False
    try:
        values = [float(entry[name]) for name in ("fp32", "bf16", "gain")]
    except (KeyError, TypeError, ValueError):
        return False
    return all(math.isfinite(v) and v > 0 for v in values)


def _read_entries(path: Path) -> Dict[str, dict]:
    try:
        entries = json.loads(path.read_text()).get("entries", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return {}  # a damaged or unreadable cache file is re-measured
    return entries if isinstance(entries, dict) else {}


def _write_entries(path: Path, entries: Dict[str, dict]) -> None:
    """Replace the cache file atomically (a temporary file of its own per writer, so concurrent processes and
    threads never write into one file; the last writer wins and the others' entries are measured again)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=str(path.parent))
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "entries": entries}, f, indent=1)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:  # a read-only cache only costs a probe per process
        log.warning("could not save the bf16 probe to %s: %s", path, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def probe(use_cache: bool = True, measure: Callable[[], Dict[str, float]] = measure_gemm_gain) -> Dict[str, float]:
    """The bf16/float32 GEMM rates of this machine (``{"fp32", "bf16", "gain", ...}``), measured once and
    then read from the per-user cache (entry :func:`probe_key`). A damaged, unreadable or implausible entry
    (not finite positive numbers) is measured again; a cache that cannot be written is left alone."""
    key = probe_key()
    path = _probe_path() if use_cache else None
    entries: Dict[str, dict] = _read_entries(path) if path is not None else {}
    if _valid(entries.get(key)):
        return dict(entries[key], cached=True)
    t0 = time.perf_counter()
    result = dict(measure())
    result.update(seconds=time.perf_counter() - t0, measured=time.strftime("%Y-%m-%d %H:%M:%S"))
    log.info("bf16 probe on %s: bf16 %.0f GFLOP/s, fp32 %.0f GFLOP/s (%.1fx) in %.2f s", key,
             result["bf16"] / 1e9, result["fp32"] / 1e9, result["gain"], result["seconds"])
    if path is not None and _valid(result):
        entries = _read_entries(path)  # as fresh as possible: another process may have added its machine
        entries[key] = result
        _write_entries(path, entries)
    return dict(result, cached=False)


# ------------------------------------------------------------------------------------------- choice
@dataclass(frozen=True)
class PrecisionChoice:
    """``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA autocast only); ``requested``: what was asked
    (``"auto"``, ``"fp32"``, ``"bf16"`` or ``"default"``); ``reason``: why, in words (logged)."""

    precision: str
    requested: str
    reason: str


def check(precision: Optional[str]) -> Optional[str]:
    """Normalise a requested precision (None stays None); a clear error for anything else."""
    if precision is None:
        return None
    value = str(precision).strip().lower()
    value = {"float32": "fp32", "bfloat16": "bf16"}.get(value, value)
    if value not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    return value


def _cuda_autocast_name(device: torch.device) -> str:
    from .acceleration import autocast_dtype

    return "bf16" if autocast_dtype(device) == torch.bfloat16 else "fp16"


def choose_precision(requested: Optional[str], model: Optional[str], device,
                     probe_fn: Optional[Callable[[], Dict[str, float]]] = None,
                     native_fn: Optional[Callable[[], str]] = None) -> PrecisionChoice:
    """The precision for ``model`` (a named configuration, or None for an unnamed checkpoint) on ``device``.

    ``probe_fn`` / ``native_fn``: the probe and the CPU check (default: :func:`probe`, :func:`native_bf16`)."""
    probe_fn = probe_fn or probe
    native_fn = native_fn or native_bf16
    req = check(requested)
    dev = torch.device(device)
    if dev.type == "cuda":
        if req == "fp32":
            return PrecisionChoice("fp32", req, "float32 requested (no autocast)")
        if req == "bf16":
            if _cuda_autocast_name(dev) != "bf16":
                raise ValueError(f"this GPU ({dev}) does not support bfloat16 natively (it needs compute capability "
                                 f"8.0 or later: Ampere on); use --precision auto (float16 autocast) or fp32")
            return PrecisionChoice("bf16", req, "bf16 requested (CUDA autocast)")
        name = _cuda_autocast_name(dev)
        return PrecisionChoice(name, req or "default", f"CUDA autocast in {name}")
    if req is None:
        return PrecisionChoice("fp32", "default", "float32 (the library default)")
    if req == "fp32":
        return PrecisionChoice("fp32", req, "float32 requested")
    if dev.type != "cpu":
        if req == "bf16":
            raise ValueError(f"precision bf16 is available on the CPU and on CUDA, not on {dev.type}")
        return PrecisionChoice("fp32", req, f"float32 on {dev.type}")
    native = native_fn()
    if req == "bf16":
        if not native:
            log.warning("bf16 requested, but this CPU does not compute bf16 natively: expect it to be several "
                        "times slower than float32 (use --precision auto)")
        return PrecisionChoice("bf16", req, "bf16 requested" + ("" if native else " (CPU without native bf16)"))
    gate = gate_for(model)
    if gate is None:
        name = model or "(unnamed checkpoint)"
        return PrecisionChoice("fp32", req, f"float32: no measured bf16 agreement gate for model {name}")
    if not gate.holds:
        return PrecisionChoice("fp32", req, f"float32: the bf16 gate of {model} does not hold ({gate.measure}: "
                                            f"{gate.value} > {gate.limit})")
    if not native:
        return PrecisionChoice("fp32", req, "float32: this CPU does not compute bf16 natively")
    rates = probe_fn()
    gain = float(rates["gain"])
    if not gain >= MIN_GEMM_GAIN:  # NaN too
        return PrecisionChoice("fp32", req, f"float32: bf16 GEMMs only {gain:.1f}x float32 on this CPU "
                                            f"({native}; auto needs {MIN_GEMM_GAIN}x)")
    return PrecisionChoice("bf16", req, f"bf16: {native}, bf16 GEMMs {gain:.1f}x float32, gate of {model} holds "
                                        f"({gate.value:g} <= {gate.limit:g})")


# ------------------------------------------------------------------------------------------ applying
def set_precision(model, precision: str) -> None:
    """Set a :class:`~RobustMedSAMLib.modeling.model.SegmentationModel` to ``"fp32"``, ``"bf16"`` or
    ``"fp16"`` (``model.precision``). The CPU bf16 path (encoder blocks, robust decoder convolutions) is
    switched on only for ``"bf16"`` on a CPU model; on CUDA the value selects the encoder's autocast dtype
    (``acceleration.encode_batched``), and a model that falls back to the CPU then computes in float32."""
    from .modeling import bf16

    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    cpu_bf16 = precision == "bf16" and model.device.type == "cpu"
    if cpu_bf16 and not has_bf16_path(model):
        raise ValueError(f"{type(model.image_encoder).__name__} has no bf16 CPU path; use precision fp32")
    model.precision = precision
    if has_bf16_path(model):
        model.image_encoder.set_precision("bf16" if cpu_bf16 else "fp32")
    plain, split = bf16_decoder_modules(model)
    bf16.set_modules(plain + split, False)
    if cpu_bf16:
        bf16.set_modules(plain, True)
        bf16.set_modules(split, "split")


def has_bf16_path(model) -> bool:
    """Whether the model's image encoder has the CPU bf16 path (our ViT encoder does; another encoder class,
    e.g. a LiteMedSAM TinyViT, needs its own before auto may choose bf16 for it)."""
    return callable(getattr(getattr(model, "image_encoder", None), "set_precision", None))


def bf16_decoder_modules(model):
    """``(plain, split)``: the decoder layers that compute in bf16 on the bf16 path, with bf16 weights and with
    split weights (about 16 bits, ``modeling/bf16.py``): the convolutions of the robust decoder's image-only
    AMFG blocks (computed once per slice; 1.7 -> 0.9 s on one core). The per-prompt mask-feature block stays
    float32: at 256 x 256 with 32-64 channels bf16 made prompt -> mask slower (305 vs 260 ms). The selective
    convolutions get split weights: their branches are mixed by a softmax over the pair, where the rounding
    of the weights (the same for every pixel) became mask changes (0.9 % of the pixels of the ViT-B parity
    case with plain bf16 weights, 0.1 % with split ones)."""
    from .modeling.robust_blocks import SelectiveConv

    dec = model.mask_decoder
    if not getattr(dec, "has_robust_modules", False):
        return [], []
    blocks = (dec.fourier_first_layer_features, dec.fourier_last_layer_features)
    selective = {id(m) for block in blocks for s in block.modules() if isinstance(s, SelectiveConv)
                 for m in s.modules()}
    layers = [m for block in blocks for m in block.modules()]
    return [m for m in layers if id(m) not in selective], [m for m in layers if id(m) in selective]
