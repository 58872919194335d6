"""The CUDA path against the CPU's float32 results (skipped without a GPU; run them with
``scripts/gpu_check.sh`` on a GPU machine, see the README's Speed section).

Checked on seeded weights (the tiny model and full-size ViT-B) through the engine's own entry points:

* float32 on CUDA (``precision="fp32"``: no autocast) against the CPU: masks within the bf16 gate's 0.5 %;
* the default CUDA path (``auto``: autocast in bf16 where supported, else fp16; pinned host memory) against
  the CPU, and that autocast really ran. The tolerance is what a CPU stand-in for it measured on the ViT-B
  parity case (plain bf16 autocast of the reference encoder: 1.3 % of the robust path's mask pixels, 0.2 % of
  the SAM path's), with some room; the figures are printed (``-s``) for the README;
* pinned memory for host -> device copies; batched encoding equal to one at a time;
* the propagation's lookahead batches (4 slices per encoder call ahead in the propagation direction);
* out-of-memory recovery with real CUDA out-of-memory errors (a per-process memory cap): a batch that does
  not fit is halved, and an image that alone does not fit is encoded on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from RobustMedSAMLib import acceleration as acc  # noqa: E402
from RobustMedSAMLib.models import seeded_model  # noqa: E402
from RobustMedSAMLib.predictor import Predictor  # noqa: E402
from RobustMedSAMLib.prompts import Prompt  # noqa: E402
from RobustMedSAMLib.seeded import seeded_array, seeded_image  # noqa: E402

GATE = 0.005  # the bf16 gates' limit (fraction of mask pixels differing)
AUTOCAST_LIMIT = {"robust": 0.03, "sam": 0.01}


def _differ(a, b) -> float:
    return float((np.asarray(a) != np.asarray(b)).mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


CASES = {"tiny": ((301, 397, 3), [60, 50, 300, 240]), "robustmedsam": ((300, 400, 3), [80, 60, 320, 250])}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(name, image, prompt, CPU float32 prediction and encoding) for the tiny model and seeded ViT-B."""
    name = request.param
    shape, box = CASES[name]
    image = seeded_image(shape, 0)
    prompt = Prompt(box=box)
    cpu = Predictor(seeded_model(name, device="cpu", precision="fp32"))
    return name, image, prompt, cpu.predict(prompt, image=image), cpu.encode(image)


def _on_cuda_and_cpu(case, loaded, robust):
    """Encode and predict ``case`` with ``loaded`` (on CUDA); returns (CUDA encoding, CUDA prediction, CPU
    float32 prediction of the same decoder path)."""
    name, image, prompt, cpu_pred, _ = case
    pred = Predictor(loaded, robust=robust)
    enc = pred.encode(image)
    cpu = Predictor(seeded_model(name, device="cpu", precision="fp32"), robust=robust)
    reference = cpu.predict(prompt, image=image) if not robust else cpu_pred
    return enc, pred.predict(prompt, image=image), reference


@pytest.mark.parametrize("robust", [True, False], ids=["robust", "sam"])
def test_cuda_float32_matches_the_cpu(case, robust):
    name, cpu_enc = case[0], case[4]
    loaded = seeded_model(name, device="cuda", precision="fp32")
    assert loaded.precision == "fp32" and acc.model_autocast(loaded.model) == (False, None)
    enc, got, reference = _on_cuda_and_cpu(case, loaded, robust)
    rel = _rel(enc.embeddings, cpu_enc.embeddings)
    print(f"{name} CUDA fp32 vs CPU ({'robust' if robust else 'SAM'} path): embeddings {rel:.1e}, "
          f"mask pixels differing {_differ(got.mask, reference.mask):.5f}")
    assert rel < 5e-3  # cuDNN convolutions may use TF32 (PyTorch's default for cuDNN)
    assert _differ(got.mask, reference.mask) <= GATE


@pytest.mark.parametrize("robust", [True, False], ids=["robust", "sam"])
def test_cuda_autocast_matches_the_cpu(case, robust):
    name, image, cpu_enc = case[0], case[1], case[4]
    loaded = seeded_model(name, device="cuda", precision="auto")
    expected = "bf16" if acc.cuda_native_bf16("cuda") else "fp16"
    assert loaded.precision == expected and "autocast" in loaded.precision_reason
    enc, got, reference = _on_cuda_and_cpu(case, loaded, robust)
    fp32 = Predictor(seeded_model(name, device="cuda", precision="fp32"), robust=robust).encode(image)
    assert _rel(enc.embeddings, fp32.embeddings) > 1e-4  # autocast really ran
    assert enc.embeddings.dtype == torch.float32 and enc.embeddings.is_cuda
    differ = _differ(got.mask, reference.mask)
    print(f"{name} CUDA autocast {expected} vs CPU fp32 ({'robust' if robust else 'SAM'} path): embeddings "
          f"{_rel(enc.embeddings, cpu_enc.embeddings):.1e}, mask pixels differing {differ:.5f}")
    assert differ <= AUTOCAST_LIMIT["robust" if robust else "sam"]


def test_pinned_host_to_device_copies(monkeypatch):
    pinned = []
    original = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        pinned.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    x = torch.from_numpy(seeded_array("input.image", (2, 3, 64, 64), 1))
    y = acc._to_device(x, torch.device("cuda"))
    torch.cuda.synchronize()
    assert y.is_cuda and torch.equal(y.cpu(), x) and pinned == [(2, 3, 64, 64)]
    model = seeded_model("tiny", device="cuda").model
    acc.encode_batched(model, [x[0], x[1]], batch_size=2)
    assert pinned[-1] == (2, 3, 64, 64)  # the engine's batches go through pinned memory too


def _images(n, side=256):
    return [torch.from_numpy(seeded_array("input.image", (3, side, side), s)) * 40 for s in range(n)]


def test_batches_equal_one_at_a_time_on_cuda():
    model = seeded_model("tiny", device="cuda", precision="fp32").model
    images = _images(5)
    log = acc.BatchLog()
    batched = acc.encode_batched(model, images, batch_size=4, report=log)
    single = [acc.encode_batched(model, [im], batch_size=1)[0] for im in images]
    assert log.batch_sizes == [4, 1] and log.device.type == "cuda" and not log.cpu_fallback
    for b, s in zip(batched, single):
        for field in ("embeddings", "early", "features"):
            torch.testing.assert_close(getattr(b, field), getattr(s, field), atol=1e-3, rtol=1e-3)


def test_propagation_lookahead_batches_on_cuda():
    from RobustMedSAMLib.bench_setup import run_propagation as _run_propagation

    side, slices = 128, 8
    results, batches = {}, {}
    for device in ("cpu", "cuda"):
        pred = Predictor(seeded_model("tiny", device=device, precision="fp32"))
        sizes = []
        inner = pred._encode_many

        def record(images, keys, batch_size, inner=inner, sizes=sizes):
            sizes.append(len(images))
            return inner(images, keys, batch_size)

        pred._encode_many = record
        _, results[device] = _run_propagation(pred, slices, side)
        batches[device] = sizes
    print(f"propagation encoder batches: cpu {batches['cpu']}, cuda {batches['cuda']}")
    assert max(batches["cpu"]) == 1 and max(batches["cuda"]) > 1  # lookahead of 4 on the GPU only
    assert sum(batches["cuda"]) >= len(results["cuda"].predicted)
    assert _differ(results["cuda"].masks, results["cpu"].masks) <= GATE


@pytest.fixture
def memory_cap():
    """Set a per-process CUDA memory cap in bytes (real out-of-memory errors above it); undone afterwards."""
    total = torch.cuda.get_device_properties(0).total_memory

    def cap(nbytes: float) -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(nbytes) / total))

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_real_out_of_memory_halves_then_falls_back_to_the_cpu(memory_cap):
    loaded = seeded_model("robustmedsam", device="cuda", precision="fp32")
    model = loaded.model
    images = _images(8, 1024)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    expected = acc.encode_batched(model, images[:2], batch_size=1)
    per_image = torch.cuda.max_memory_allocated() - base
    assert per_image > 0
    # room for about 2.5 images: a batch of 8 and of 4 run out of memory, batches of 2 fit
    memory_cap(base + 2.5 * per_image + (64 << 20))
    log = acc.BatchLog()
    got = acc.encode_batched(model, images, batch_size=8, report=log)
    print(f"memory cap {(base + 2.5 * per_image) / 2**30:.2f} GiB: batches {log.batch_sizes}, retries {log.retries}")
    assert log.retries >= 2 and max(log.batch_sizes) <= 2 and sum(log.batch_sizes) == 8 and not log.cpu_fallback
    for g, e in zip(got[:2], expected):
        torch.testing.assert_close(g.embeddings, e.embeddings, atol=1e-3, rtol=1e-3)
    # room for less than one image: the model moves to the CPU and the CPU's results come back
    memory_cap(base + 0.3 * per_image)
    log = acc.BatchLog()
    got = acc.encode_batched(model, images[:2], batch_size=2, report=log)
    assert log.cpu_fallback and log.device.type == "cpu" and model.device.type == "cpu"
    with torch.inference_mode():
        cpu = [model.encode(im[None]) for im in images[:2]]
    for g, c in zip(got, cpu):
        assert g.embeddings.device.type == "cpu"
        torch.testing.assert_close(g.embeddings, c.embeddings, atol=1e-4, rtol=1e-4)
