"""The benchmark: FLOP formula, and a smoke run of ``robustmedsam bench --quick`` (tiny model; no timing
assertions -- the performance goals are read from the real benchmark's output)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from RobustMedSAMLib import bench, measure
from RobustMedSAMLib.cli import main as cli_main
from RobustMedSAMLib.modeling import TINY, VIT_B


def test_encoder_flops_formula():
    f = measure.encoder_flops(VIT_B)
    n, c = 64 * 64, 768
    assert f["linear"] == 12 * 24 * n * c * c
    assert f["global_attention"] == 4 * (4 * n * n * c + 2 * n * 128 * c)
    assert f["window_attention"] == 8 * (4 * 25 * 196 ** 2 * c + 4 * 25 * 196 * 14 * c)  # 64 -> 5 x 5 windows of 14
    assert 0.93e12 < f["total"] < 0.95e12  # REFERENCE.md: about 0.94 TFLOP per slice
    assert measure.encoder_flops(VIT_B, batch=2)["total"] == 2 * f["total"]
    tiny = measure.encoder_flops(TINY)
    assert tiny["window_attention"] == 2 * 4 * 16 * 16 ** 2 * 64 + 2 * 4 * 16 * 16 * 4 * 64  # 16 windows of 4 x 4


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        code = cli_main(["bench", "--quick", "--repeats", "1", "--slices", "2", "--threads", "1", "--json", str(out)])
    return code, buf.getvalue(), json.loads(out.read_text())


def test_bench_quick_smoke(quick_run):
    code, table, res = quick_run
    assert code == 0
    assert table.startswith("Benchmark (tiny test model") and "| encoder speed-up (same run): " in table
    assert res["config"]["quick"] and res["config"]["slices"] == 2
    enc = res["encoder"]
    assert enc["path"] == "fast"
    assert enc["max_abs_diff_embeddings"] <= 1e-4 and enc["max_abs_diff_early"] <= 1e-4
    assert len(enc["ours"]["runs"]) == 1 and enc["speedup"] > 0 and enc["speedup_same_process"] > 0
    # the reference timed in its own process (default allocator) as well as in this one
    assert len(enc["reference_default"]["runs"]) == len(enc["reference"]["runs"]) == 1
    assert enc["speedup"] == pytest.approx(enc["reference_default"]["median"] / enc["ours"]["median"])
    assert res["gemm"]["flops_per_s"] > 1e8 and len(enc["gemm_samples"]) == 2
    assert res["flops"]["total"] == measure.encoder_flops(TINY)["total"]
    assert res["flops"]["ours_vs_floor"] == pytest.approx(enc["ours"]["median"] / res["flops"]["floor_seconds"])
    assert res["decoder"]["encoder_calls"] == 1 and res["decoder"]["median"] > 0
    assert res["decoder"]["flops"] > 0 and "prompt -> mask FLOPs" in table
    prop = res["propagation"]
    # the consistency stop rule (default) also encodes a seed slice it compares with when no prompt did
    assert 1 <= prop["predicted"] <= 2 and prop["predicted"] <= prop["encoder_calls"] <= prop["predicted"] + 2
    assert res["gpu"] is None or "encoder_fp32" in res["gpu"]


def test_bench_bf16_rows_side_by_side(quick_run):
    """Where the CPU computes bf16 natively (auto), the same run has bf16 rows; noise figures for every timing."""
    from RobustMedSAMLib.precision import native_bf16

    _, table, res = quick_run
    assert res["config"]["bf16_rows"] == bool(native_bf16())
    enc = res["encoder"]
    for key in ("ours", "reference", "reference_default"):
        assert enc[key]["min"] <= enc[key]["median"] <= enc[key]["max"]
    assert "after" in res["gemm"] and "[" in table  # GEMM rate measured after the run; min-max shown
    if not res["config"]["bf16_rows"]:
        pytest.skip("this CPU has no native bf16: bf16 rows are left out by default")
    assert enc["path_bf16"] == "fast-bf16" and len(enc["ours_bf16"]["runs"]) == 1
    assert enc["bf16_vs_fp32"] == pytest.approx(enc["ours_bf16"]["median"] / enc["ours"]["median"])
    assert 1e-5 < enc["bf16_rel_diff_embeddings"] < 0.02  # bf16 ran (it differs), and agrees to ~0.3 %
    assert res["gemm_bf16"]["flops_per_s"] > 0 and "after" in res["gemm_bf16"] and len(enc["gemm_bf16_samples"]) == 2
    fb = res["flops_bf16"]
    assert fb["executed"] > fb["total"] == res["flops"]["total"]
    assert res["decoder_bf16"]["encoder_calls"] == 1 and res["propagation_bf16"]["predicted"] >= 1
    for row in ("encoder, ours bf16 (fast-bf16 path)", "encoder bf16 / float32", "bf16 GEMM rate", "bf16 FLOP floor",
                "prompt -> mask, bf16 model", "propagation, bf16", "peak RSS bf16"):
        assert row in table, row


def test_bench_memory_parts(quick_run):
    _, table, res = quick_run
    mem = res["memory"]
    assert set(mem) == set(bench.PARTS) | set(bench.BF16_PARTS if res["config"]["bf16_rows"] else ())
    for part, m in mem.items():
        assert m["part"] == part
        if m["peak_bytes"] is not None and m["baseline_bytes"] is not None:
            assert m["peak_bytes"] >= m["baseline_bytes"] > 50 * 2**20
        if m["import_bytes"] is not None:  # torch alone takes well over 50 MB; building the model adds more
            assert m["baseline_bytes"] >= m["import_bytes"] > 50 * 2**20
    assert "peak RSS: encoder reference / ours" in table
    assert mem["propagation"]["cache_bytes"] > 0 and mem["encoder-fast"]["cache_bytes"] == 0
    assert "without its cached encodings" in table and "of which importing torch" in table


def test_counted_flops_of_a_convolution_and_a_product():
    import torch

    conv = torch.nn.Conv2d(4, 6, kernel_size=3, padding=1)
    x = torch.zeros(2, 4, 10, 12)
    assert measure.counted_flops(lambda: conv(x)) == 2 * 2 * 6 * 4 * 9 * 10 * 12
    a, b = torch.zeros(5, 7), torch.zeros(7, 3)
    assert measure.counted_flops(lambda: a @ b) == 2 * 5 * 7 * 3


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "RobustMedSAMLib.bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--slices" in proc.stdout and "--quick" in proc.stdout


def test_bad_arguments():
    with pytest.raises(ValueError):
        bench.run_benchmark(quick=True, slices=0)
    with pytest.raises(ValueError):
        bench.run_part("nonsense", True, 1)
    with pytest.raises(ValueError):
        bench.run_benchmark(quick=True, bf16="sometimes")
