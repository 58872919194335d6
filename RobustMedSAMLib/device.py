"""Device choice: CUDA when available, otherwise CPU; never fails because a GPU is missing."""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

log = logging.getLogger(__name__)


def select_device(requested: Optional[Union[str, torch.device]] = None) -> torch.device:
    """``None``/"auto" -> ``cuda`` if available else ``cpu``; "cuda" without a GPU falls back to CPU with a
    warning; "mps" is used only when asked for and available."""
    if isinstance(requested, torch.device):
        return requested
    name = (requested or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if torch.cuda.is_available():
            dev = torch.device(name)
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"{name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
            return dev
        log.warning("CUDA requested but not available (no GPU or a CPU-only PyTorch); using the CPU")
        return torch.device("cpu")
    if name == "mps":
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        log.warning("MPS requested but not available; using the CPU")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
