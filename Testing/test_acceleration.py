"""GPU helper logic, tested on the CPU: autocast choice, batched encoding with out-of-memory halving and CPU
fallback (fake OOM errors injected through ``encode_fn``), and the lookahead planner."""
from __future__ import annotations

import logging

import pytest
import torch

from RobustMedSAMLib import acceleration as acc
from RobustMedSAMLib.acceleration import BatchLog, LookaheadPlanner, autocast, autocast_dtype, encode_batched
from RobustMedSAMLib.seeded import seeded_array

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny-model ops: avoid OpenMP waits on a loaded machine


def _oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module")
def model():
    from RobustMedSAMLib.models import seeded_model

    return seeded_model("tiny").model


@pytest.fixture(scope="module")
def images():
    return [torch.from_numpy(seeded_array("input.image", (3, 256, 256), s)) * 40 for s in range(5)]


@pytest.fixture(scope="module")
def single(model, images):
    with torch.inference_mode():
        return [model.encode(x[None]) for x in images]


def _assert_same(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for name in ("embeddings", "early", "features"):
            a, b = getattr(g, name), getattr(e, name)
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.shape == b.shape and a.dtype == torch.float32
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_autocast_is_a_no_op_on_cpu():
    assert autocast_dtype("cpu") is None
    with autocast("cpu"):
        assert not torch.is_autocast_enabled()
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def fake_gpus(monkeypatch, *capabilities, current=0):
    """Pretend CUDA GPUs of these compute capabilities exist (``is_bf16_supported`` says True for all of them,
    as PyTorch's default does where bf16 can be emulated)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capabilities[current if i is None else i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((7, 0), torch.float16)],
                         ids=["H100", "A100", "T4", "V100"])
def test_autocast_dtype_on_cuda(monkeypatch, capability, expected):
    """bf16 only where the GPU computes it natively (Ampere on): a T4 or V100 emulates it, fp16 there."""
    fake_gpus(monkeypatch, capability, capability)
    assert autocast_dtype("cuda") is expected
    assert autocast_dtype(torch.device("cuda", 1)) is expected
    assert acc.autocast("cuda", enabled=False).__class__.__name__ == "nullcontext"


def test_autocast_dtype_asks_about_the_models_gpu(monkeypatch):
    fake_gpus(monkeypatch, (9, 0), (7, 5), current=0)
    assert autocast_dtype("cuda") is torch.bfloat16 and autocast_dtype("cuda:0") is torch.bfloat16
    assert autocast_dtype("cuda:1") is torch.float16


def test_out_of_memory_detection():
    assert acc.is_out_of_memory(_oom())
    assert acc.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not acc.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not acc.is_out_of_memory(ValueError("out of memory"))


def test_batches_match_single_encoding(model, images, single):
    log = BatchLog()
    got = encode_batched(model, images, batch_size=2, report=log)
    assert log.batch_sizes == [2, 2, 1] and log.retries == 0 and not log.cpu_fallback
    assert log.device == torch.device("cpu")
    _assert_same(got, single)
    # (1, 3, S, S) inputs are accepted too
    _assert_same(encode_batched(model, [x[None] for x in images[:2]], batch_size=8), single[:2])


def test_out_of_memory_halves_the_batch(model, images, single, caplog):
    calls = []

    def encode(m, batch, robust):
        calls.append(len(batch))
        if len(batch) > 2:
            raise _oom()
        return m.encode(batch, robust=robust)

    log = BatchLog()
    with caplog.at_level(logging.WARNING, logger="RobustMedSAMLib.acceleration"):
        got = encode_batched(model, images, batch_size=8, encode_fn=encode, report=log)
    assert calls == [5, 4, 2, 2, 1]  # all 5 (batch 8) -> OOM -> 4 -> OOM -> 2, 2, 1
    assert log.batch_sizes == [2, 2, 1] and log.retries == 2
    assert "batches of 4" in caplog.text and "batches of 2" in caplog.text
    _assert_same(got, single)


def test_halving_sequence(model, images, single):
    sizes = []

    def encode(m, batch, robust):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise _oom()
        return m.encode(batch, robust=robust)

    log = BatchLog()
    got = encode_batched(model, images[:3], batch_size=4, encode_fn=encode, report=log)
    assert sizes == [3, 2, 1, 1, 1] and log.retries == 2 and log.batch_sizes == [1, 1, 1]
    _assert_same(got, single[:3])


class _FakeGpuModel:
    """Wraps the tiny model but claims to live on a GPU until moved to the CPU."""

    def __init__(self, model):
        self.model = model
        self.device = torch.device("cuda")
        self.moves = []

    def to(self, device):
        self.moves.append(str(device))
        self.device = torch.device(device)
        return self

    def encode(self, batch, robust=None):
        return self.model.encode(batch, robust=robust)


def test_single_image_oom_falls_back_to_cpu(model, images, single, caplog):
    fake = _FakeGpuModel(model)
    seen = []

    def encode(m, batch, robust):
        seen.append((m.device.type, len(batch)))
        if m.device.type == "cuda" and (len(batch) > 1 or len(seen) > 3):
            raise _oom()
        return m.encode(batch, robust=robust)

    log = BatchLog()
    with caplog.at_level(logging.WARNING, logger="RobustMedSAMLib.acceleration"):
        got = encode_batched(fake, images[:4], batch_size=2, encode_fn=encode, report=log)
    # 2 (OOM) -> 1 ok, 1 ok, then a single image OOMs on the "GPU" -> CPU for the rest
    assert seen == [("cuda", 2), ("cuda", 1), ("cuda", 1), ("cuda", 1), ("cpu", 1), ("cpu", 1)]
    assert log.cpu_fallback and fake.moves == ["cpu"] and log.device == torch.device("cpu")
    assert "encoding on the CPU" in caplog.text and "batches of 1" in caplog.text
    _assert_same(got, single[:4])


def test_no_fallback_and_other_errors_propagate(model, images):
    fake = _FakeGpuModel(model)

    def always_oom(m, batch, robust):
        raise _oom()

    with pytest.raises(torch.cuda.OutOfMemoryError):
        encode_batched(fake, images[:2], batch_size=2, encode_fn=always_oom, cpu_fallback=False)
    assert fake.moves == []
    with pytest.raises(torch.cuda.OutOfMemoryError):  # already on the CPU: nowhere to fall back to
        encode_batched(model, images[:1], encode_fn=always_oom)

    calls = []

    def broken(m, batch, robust):
        calls.append(len(batch))
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        encode_batched(model, images, batch_size=4, encode_fn=broken)
    assert calls == [4]  # no retry
    with pytest.raises(ValueError):
        encode_batched(model, images, batch_size=0)


def test_planner_looks_ahead_in_the_direction_and_skips_cached():
    cached = {5, 7}
    p = LookaheadPlanner(num_slices=10, batch_size=3)
    assert p.plan(4, 1, cached.__contains__) == [4, 6, 8]
    assert p.plan(4, -1, cached.__contains__) == [4, 3, 2]
    assert p.plan(5, 1, cached.__contains__) == []       # the slice needed now is cached: nothing to wait for
    assert p.plan(1, -1, cached.__contains__) == [1, 0]  # volume bound
    assert p.plan(9, 1, lambda z: False) == [9]
    bounded = LookaheadPlanner(num_slices=10, batch_size=4, first=2, last=6)
    assert bounded.plan(5, 1, lambda z: False) == [5, 6]
    assert bounded.plan(3, -1, lambda z: False) == [3, 2]
    with pytest.raises(ValueError):
        bounded.plan(8, 1, lambda z: False)
    with pytest.raises(ValueError):
        p.plan(4, 2, lambda z: False)
    with pytest.raises(ValueError):
        LookaheadPlanner(num_slices=5, first=3, last=2)


def test_planner_batches_only_on_gpu():
    assert LookaheadPlanner.for_device("cpu", 10, batch_size=4).plan(0, 1, lambda z: False) == [0]
    assert LookaheadPlanner.for_device("cuda", 10, batch_size=4).plan(0, 1, lambda z: False) == [0, 1, 2, 3]


class _FakeGpuSegmentationModel:
    """A real tiny model (on the CPU) labelled as a CUDA model in bf16 autocast, until moved to the CPU."""

    def __init__(self, model):
        self.__dict__["inner"] = model
        self.__dict__["device"] = torch.device("cuda")
        self.__dict__["precision"] = "bf16"

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        self.__dict__[name] = value

    def to(self, device):
        self.__dict__["device"] = torch.device(device)
        return self


def test_cpu_fallback_of_an_autocast_model_computes_and_says_float32(images, caplog):
    """After the fallback the model computes float32 on the CPU: its precision must say so (cache keys name it),
    with a warning, and the results equal the float32 encodings."""
    from RobustMedSAMLib.models import seeded_model

    inner = seeded_model("tiny", precision="fp32").model
    fake = _FakeGpuSegmentationModel(inner)
    assert acc.model_autocast(fake) == (True, torch.bfloat16)

    def encode(m, batch, robust):
        if m.device.type == "cuda":
            raise _oom()
        return m.encode(batch, robust=robust)

    log = BatchLog()
    with caplog.at_level(logging.WARNING, logger="RobustMedSAMLib.acceleration"):
        got = encode_batched(fake, images[:2], batch_size=1, encode_fn=encode, report=log)
    assert log.cpu_fallback and fake.device.type == "cpu"
    assert fake.precision == "fp32" and acc.model_autocast(fake) == (False, None)
    assert "bf16 autocast does not apply on the CPU" in caplog.text
    assert inner.image_encoder.precision == "fp32"
    with torch.inference_mode():
        _assert_same(got, [inner.encode(x[None]) for x in images[:2]])
