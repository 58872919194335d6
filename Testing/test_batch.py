"""Batch runs: folder and manifest inputs, sharding (also under a real torchrun), skip/resume, failures."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from RobustMedSAMLib import batch
from RobustMedSAMLib.cli import main
from RobustMedSAMLib.models import seeded_model
from RobustMedSAMLib.volume_io import Volume
from RobustMedSAMLib.segmentation_io import read_segmentation, write_segmentation


def _sphere_volume(path: Path, seed: int):
    rng = np.random.default_rng(seed)
    k, j, i = np.mgrid[:6, :48, :40]
    inside = ((k - 3) / 3.5) ** 2 + ((j - 24) / 12) ** 2 + ((i - 20) / 10) ** 2 < 1
    array = (rng.normal(0, 20, inside.shape) + np.where(inside, 300, -700)).astype(np.int16)
    volume = Volume(array, np.diag([0.8, 0.8, 3.0, 1.0]))
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path))
    return volume


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    (root / "volumes").mkdir()
    (root / "prompts").mkdir()
    for n in range(5):
        _sphere_volume(root / "volumes" / f"case{n}.nii.gz", n)
        prompts = {"objects": [{"name": "ball", "slices": [{"index": 3, "box": [10, 12, 31, 37]}]}]}
        if n == 4:  # a broken case: its slice index is outside the volume
            prompts["objects"][0]["slices"][0]["index"] = 40
        (root / "prompts" / f"case{n}.json").write_text(json.dumps(prompts))
    (root / "volumes" / "notes.txt").write_text("not a volume")
    ckpt = root / "tiny.pth"
    torch.save(seeded_model("tiny").model.state_dict(), ckpt)
    return root


def _args(root, out, *extra):
    return ["batch", "--volumes", str(root / "volumes"), "--prompts", str(root / "prompts"), "--output-dir",
            str(out), "--checkpoint", str(root / "tiny.pth"), "--iou-threshold", "0"] + list(extra)


def test_shards_are_disjoint_and_cover_every_case(cases_dir):
    cases = batch.cases_from_folders(cases_dir / "volumes", cases_dir / "prompts", cases_dir / "out")
    assert [c.name for c in cases] == [f"case{n}" for n in range(5)]
    parts = [batch.my_cases(cases, r, 3) for r in range(3)]
    names = sorted(c.name for p in parts for c in p)
    assert names == sorted(c.name for c in cases) and len(set(names)) == 5
    assert batch.shard_from_env("1/3") == (1, 3)
    with pytest.raises(ValueError, match="rank must be in 0..2"):
        batch.shard_from_env("3/3")


def test_folder_run_skips_done_cases_and_reports_failures(cases_dir, tmp_path, capsys):
    out = tmp_path / "out"
    log = tmp_path / "runs.csv"
    assert main(_args(cases_dir, out, "--case-log", str(log), "--shard", "0/2")) == 1  # cases 0, 2, 4 (4 fails)
    first = sorted(p.name for p in out.iterdir())
    assert first == ["case0.seg.nrrd", "case2.seg.nrrd"]
    assert main(_args(cases_dir, out, "--case-log", str(log), "--shard", "1/2")) == 0  # cases 1, 3
    rc = main(_args(cases_dir, out, "--case-log", str(log)))  # everything: the done cases are skipped
    err = capsys.readouterr()
    assert rc == 1  # case4 fails (its prompt is outside the volume) and is reported, the others are done
    done = sorted(p.name for p in out.iterdir())
    assert done == [f"case{n}.seg.nrrd" for n in range(4)] and set(first) < set(done)
    rows = [r for name in ("runs.rank0.csv", "runs.rank1.csv", "runs.csv")  # sharded runs log per rank
            for r in csv.DictReader(open(tmp_path / name))]
    assert [r["status"] for r in rows if r["case"] == "case4"] == ["failed", "failed"]
    assert [r["status"] for r in rows].count("done") == 4 and [r["status"] for r in rows].count("skipped") == 4
    assert "case4" in err.out and "40" in [r["message"] for r in rows if r["case"] == "case4"][0]
    seg = read_segmentation(out / "case0.seg.nrrd")
    assert seg.labels.shape == (6, 48, 40) and [s.name for s in seg.segments] == ["ball"]


def test_manifest_run(cases_dir, tmp_path):
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["volume", "prompts", "output", "axis"])
        for n in range(2):
            w.writerow([cases_dir / "volumes" / f"case{n}.nii.gz", cases_dir / "prompts" / f"case{n}.json",
                        f"results/case{n}.nii.gz", "k"])
    assert main(["batch", "--manifest", str(manifest), "--checkpoint", str(cases_dir / "tiny.pth")]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["case0.nii.gz", "case1.nii.gz"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,output\nx,y\n")
    with pytest.raises(ValueError, match="missing column.*prompts, volume"):
        batch.cases_from_manifest(bad)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_share_the_cases(cases_dir, tmp_path):
    out = tmp_path / "out"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
           "RobustMedSAMLib.cli"] + _args(cases_dir, out, "--case-log", str(tmp_path / "runs.csv"))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0, run.stderr  # case4 failed in one of the ranks: both ranks report it
    assert "case4" in run.stdout + run.stderr, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [f"case{n}.seg.nrrd" for n in range(4)]
    logs = sorted(p.name for p in tmp_path.glob("runs.rank*.csv"))
    assert logs == ["runs.rank0.csv", "runs.rank1.csv"]
    per_rank = [{r["case"] for r in csv.DictReader(open(tmp_path / name))} for name in logs]
    assert per_rank[0].isdisjoint(per_rank[1]) and len(per_rank[0] | per_rank[1]) == 5


def test_existing_output_is_never_half_written(cases_dir, tmp_path):
    """Outputs are written to a temporary file and renamed: a failing write leaves the old file as it was."""
    out = tmp_path / "case0.seg.nrrd"
    volume = Volume(np.zeros((6, 48, 40), np.int16), np.eye(4))
    write_segmentation(out, np.ones((6, 48, 40), np.uint8), volume)
    before = out.read_bytes()
    with pytest.raises(Exception):
        write_segmentation(out, np.ones((6, 48, 41), np.uint8), volume)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["case0.seg.nrrd"]
