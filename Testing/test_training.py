"""The decoder trainer: input checks, a CPU smoke run, adapters, embedding cache, exact resume and DDP."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from Training import datasets as D
from Training import train_decoder as T
from Training.synthetic import write_folder, write_medsegbench_npz

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "Training" / "train_decoder.py"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return write_medsegbench_npz(tmp_path_factory.mktemp("data") / "shapes_48.npz", counts=(8, 2, 2), size=48)


def _args(npz_path, out, *extra):
    return ["--seeded-tiny", "--npz", str(npz_path), "--train-size", "48", "--batch-size", "2", "--lr", "1e-3",
            "--no-progress", "--output", str(out), *[str(e) for e in extra]]


def _train(npz_path, out, *extra) -> T.TrainResult:
    return T.train(T.parse_args(_args(npz_path, out, *extra)))


def _log(path: Path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------------------------ checks before training
@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model (i.e. to go past the input checks) fails the test."""
    def refuse(cfg):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(T, "load_start_model", refuse)


def test_bad_inputs_are_reported_before_training(tmp_path, npz, no_model):
    out = tmp_path / "out"
    empty = tmp_path / "empty.npz"
    np.savez(empty, train_images=np.zeros((2, 8, 8), np.uint8), train_label=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(D.DatasetError, match="empty"):
        _train(empty, out)
    nokeys = tmp_path / "nokeys.npz"
    np.savez(nokeys, images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(D.DatasetError, match="missing key.*keys found: images"):
        _train(nokeys, out)
    images, masks = write_folder(tmp_path / "f", n=2, size=32)
    (masks / "case1.png").rename(masks / "other.png")
    with pytest.raises(D.DatasetError, match="case1.png"):
        T.train(T.parse_args(["--seeded-tiny", "--images", str(images), "--masks", str(masks), "--output", str(out)]))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(T.TrainingError, match="not writable"):
        _train(npz, blocker / "out")
    with pytest.raises(T.TrainingError, match="is a file"):
        _train(npz, blocker)
    with pytest.raises(T.TrainingError, match="no training_state.pt"):
        _train(npz, tmp_path / "fresh", "--resume")
    with pytest.raises(T.TrainingError, match="cache-embeddings"):
        _train(npz, out, "--adapters", "--cache-embeddings")
    with pytest.raises(T.TrainingError, match="--model NAME"):
        T.train(T.parse_args(["--npz", str(npz), "--output", str(out)]))
    (out / "model.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _train(npz, out)
    assert (out / "model.safetensors").read_bytes() == b"old"  # never overwritten without --overwrite


def test_cli_exit_code_and_message(tmp_path, capsys):
    code = T.main(["--seeded-tiny", "--npz", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "o")])
    assert code == 2 and "missing.npz: MedSegBench file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ smoke run
def test_cpu_smoke_run_loss_decreases_and_output_loads(tmp_path, npz):
    from RobustMedSAMLib.cli import main as cli_main
    from RobustMedSAMLib.models import load_model, seeded_model
    from RobustMedSAMLib.predictor import Predictor
    from RobustMedSAMLib.prompts import Prompt

    result = _train(npz, tmp_path / "run", "--epochs", "8")  # 8 samples / batch 2 -> 32 steps
    rows = [r for r in _log(tmp_path / "run" / "log.csv") if r["phase"] == "train"]
    assert len(rows) == result.global_step == 32
    total = [float(r["total"]) for r in rows]
    focal = [float(r["focal"]) for r in rows]
    dice = [float(r["dice"]) for r in rows]
    assert np.mean(total[-4:]) < 0.2 * np.mean(total[:4])
    assert np.mean(focal[-8:]) < np.mean(focal[:8]) and np.mean(dice[-8:]) < np.mean(dice[:8])

    loaded = load_model(checkpoint=result.model_path)
    assert loaded.config.preprocessing.style == "sam" and loaded.config.robust
    meta = loaded.metadata
    assert meta["base_checkpoint"] == "seeded-tiny(seed=0)" and meta["steps"] == "32"
    base = seeded_model("tiny", seed=0).model.state_dict()
    trained = loaded.model.state_dict()
    assert all(torch.equal(trained[k], base[k]) for k in base if not k.startswith("mask_decoder."))
    assert not torch.equal(trained["mask_decoder.custom_robust_token.weight"],
                           base["mask_decoder.custom_robust_token.weight"])
    image = (np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)
    pred = Predictor(loaded).predict(Prompt(box=np.array([5.0, 5.0, 30.0, 30.0])), image=image)
    assert pred.mask.shape == (40, 40)
    assert cli_main(["inspect", str(result.model_path), "--no-sha256"]) == 0


def test_adapters_trained_saved_separately_and_loaded(tmp_path, npz):
    from RobustMedSAMLib.models import load_model, seeded_model
    from Training.adapters import add_adapters, adapter_state_dict, load_adapters

    # freshly added adapters do not change the model (zero-initialised output layer)
    tiny = seeded_model("tiny", seed=0).model
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        before = tiny.image_encoder(x)[0]
        n = add_adapters(tiny, 0.25)
        after = tiny.image_encoder(x)[0]
    # (hooked blocks may take the encoder's reference path instead of its fast path: equal up to ~1e-6)
    assert n > 0 and torch.allclose(before, after, atol=1e-4)

    result = _train(npz, tmp_path / "ad", "--epochs", "1", "--adapters")
    assert result.adapter_path and result.adapter_path.is_file()
    saved = load_file(str(result.adapter_path))
    assert saved and all(".space_adapter." in k or ".mlp_adapter." in k for k in saved)
    model_keys = load_file(str(result.model_path)).keys()
    assert not any("adapter" in k for k in model_keys)  # the full model keeps the official layout
    loaded = load_model(checkpoint=result.model_path)
    base = seeded_model("tiny", seed=0).model.state_dict()
    assert all(torch.equal(loaded.model.state_dict()[k], base[k]) for k in base if k.startswith("image_encoder."))
    meta = load_adapters(loaded.model, result.adapter_path)
    assert meta["ratio"] == "0.25"
    got = adapter_state_dict(loaded.model)
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in saved if k.endswith("fc2.weight"))  # adapters were trained
    with torch.no_grad():
        assert float((loaded.model.image_encoder(x)[0] - before).abs().max()) > 1e-3


def test_cached_embeddings_equal_uncached_run(tmp_path, npz, monkeypatch):
    from RobustMedSAMLib.modeling.image_encoder import ImageEncoder

    calls = []
    original = ImageEncoder.forward

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(ImageEncoder, "forward", counting)
    four = write_medsegbench_npz(tmp_path / "four.npz", counts=(4, 1, 1), size=48)
    # batch 1: an encoding does not depend on which images share its batch, so the runs are bit-identical
    plain = _train(four, tmp_path / "plain", "--epochs", "2", "--fixed-views", "--batch-size", "1")
    uncached_calls = sum(calls)
    calls.clear()
    cached = _train(four, tmp_path / "cached", "--epochs", "2", "--cache-embeddings", "--batch-size", "1")
    assert sum(calls) == uncached_calls // 2  # the second epoch reads every encoding from memory
    a, b = load_file(str(plain.model_path)), load_file(str(cached.model_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ exact resume
def test_killed_run_resumes_to_the_same_state(tmp_path, npz):
    six = tmp_path / "six.npz"
    write_medsegbench_npz(six, counts=(6, 1, 1), size=48)
    extra = ["--epochs", "2", "--checkpoint-every", "2"]  # 3 steps per epoch; states at steps 2, 3, 4
    full = _train(six, tmp_path / "full", *extra)
    stopped = subprocess.run([sys.executable, str(SCRIPT), *_args(six, tmp_path / "stop", *extra,
                                                                  "--stop-after-steps", "5")],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert stopped.returncode == T.EXIT_STOPPED, stopped.stderr[-2000:]
    assert not (tmp_path / "stop" / "model.safetensors").exists()
    state = torch.load(tmp_path / "stop" / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 4)  # mid-epoch
    assert len(_log(tmp_path / "stop" / "log.csv")) == 5
    with pytest.raises(T.TrainingError, match="lr"):
        _train(six, tmp_path / "stop", *extra, "--resume", "--lr", "2e-3")
    resumed = _train(six, tmp_path / "stop", *extra, "--resume")
    assert resumed.global_step == full.global_step == 6
    a, b = load_file(str(full.model_path)), load_file(str(resumed.model_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert _log(tmp_path / "full" / "log.csv") == _log(tmp_path / "stop" / "log.csv")
    sa = torch.load(tmp_path / "full" / "training_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "stop" / "training_state.pt", weights_only=True)
    exp_avg = [s["state"] for s in (sa["optimizer"], sb["optimizer"])]
    assert all(torch.equal(exp_avg[0][k]["exp_avg_sq"], exp_avg[1][k]["exp_avg_sq"]) for k in exp_avg[0])


# ------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(tmp_path):
    from RobustMedSAMLib.models import seeded_model

    four = write_medsegbench_npz(tmp_path / "four.npz", counts=(4, 1, 1), size=48)
    common = ["--seeded-tiny", "--npz", str(four), "--train-size", "48", "--lr", "1e-3", "--no-progress",
              "--epochs", "1", "--save-grads"]
    # global batch 2 = one process x 2 samples = two processes x 1 sample; 2 steps
    single = T.train(T.parse_args(common + ["--batch-size", "2", "--output", str(tmp_path / "single")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT),
           *common, "--batch-size", "1", "--output", str(tmp_path / "ddp")]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    g1 = load_file(str(tmp_path / "single" / T.GRADS_FILE))
    g2 = load_file(str(tmp_path / "ddp" / T.GRADS_FILE))
    assert g1.keys() == g2.keys() and len(g1) > 100
    scale = max(float(g.abs().max()) for g in g1.values())
    for k in g1:  # all-reduced gradients of the global batch, up to float32 batch-composition noise (~2e-3)
        err = float((g1[k] - g2[k]).norm())
        assert err <= 5e-3 * float(g1[k].norm()) + 1e-6 * scale * g1[k].numel() ** 0.5, (k, err)
    m1 = load_file(str(single.model_path))
    m2 = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    base = seeded_model("tiny", seed=0).model.state_dict()
    bn = [k for k in m1 if ".BN.running_" in k or ".BN.num_batches_tracked" in k]
    assert len(bn) == 9
    for k in bn:  # running statistics: as one process over the global batch, in the same order
        if k.endswith("num_batches_tracked"):
            assert int(m1[k]) == int(m2[k]) == 4  # 2 steps x 2 samples
        else:
            assert not torch.equal(m1[k], base[k])
            assert torch.allclose(m1[k].double(), m2[k].double(), rtol=1e-5, atol=1e-6), k
    for k in m1:  # Adam's first steps move each weight by about lr * sign(grad): near-zero grads may flip
        assert torch.allclose(m1[k].double(), m2[k].double(), atol=2 * 2e-3), k
    l1, l2 = _log(tmp_path / "single" / "log.csv"), _log(tmp_path / "ddp" / "log.csv")
    assert len(l1) == len(l2) == 2
    for r1, r2 in zip(l1, l2):  # step 2's loss depends on the parameters after step 1
        for key in ("total", "focal", "dice", "token", "feature", "grad_norm"):
            assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-3), key


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_uses_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, native, expected):
    """``--amp auto`` on a GPU that only emulates bf16 (Volta, Turing: torch.cuda.is_bf16_supported() still
    says True) must train in fp16, not emulated bf16; the CPU trains in float32 unless asked."""
    from RobustMedSAMLib import acceleration
    from Training.train_model import amp_dtype_for

    monkeypatch.setattr(acceleration, "cuda_native_bf16", lambda device: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype_for("auto", torch.device("cuda")) == expected
    assert amp_dtype_for("auto", torch.device("cpu")) is None
    assert amp_dtype_for("bf16", torch.device("cpu")) == torch.bfloat16
    assert amp_dtype_for("fp16", torch.device("cuda")) == torch.float16
    assert amp_dtype_for("off", torch.device("cuda")) is None
