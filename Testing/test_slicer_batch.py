"""The headless batch script RobustMedSAM/Scripts/segment_volume.py: its main() on slicer-core with the
slicerio chest CT and a seeded tiny checkpoint; the .seg.nrrd it writes is read back by Slicer's storage node."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover
    pytest.skip("slicer-core is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "RobustMedSAM" / "Scripts" / "segment_volume.py"


def load_script():
    spec = importlib.util.spec_from_file_location("robustmedsam_segment_volume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from RobustMedSAMLib.models import seeded_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny_robust.pth"
    torch.save(seeded_model("tiny").model.state_dict(), path)
    return path


def test_batch_script_on_chest_ct(tiny_checkpoint, tmp_path, capsys):
    from RobustMedSAMLib.samples import sample_path
    from RobustMedSAMLib.volume_io import read_volume

    script = load_script()
    out = tmp_path / "chest.seg.nrrd"
    report = tmp_path / "report.json"
    rc = script.main(["--input", "sample:chest-ct", "--prompts", str(REPO / "examples" / "chest_ct_prompts.json"),
                      "--output", str(out), "--checkpoint", str(tiny_checkpoint), "--slice-range", "18", "21",
                      "--iou-threshold", "0.0", "--report", str(report), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    # read back with Slicer's own storage node, on a fresh scene
    sys.path.insert(0, str(REPO / "RobustMedSAM"))
    from RobustMedSAMLogic import volumes
    from RobustMedSAMLogic.headless import make_headless_scene

    scene, _ = make_headless_scene()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(out))
    assert storage.ReadData(seg) == 1
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(n)).GetName()
             for n in range(segmentation.GetNumberOfSegments())]
    assert names == ["right lung", "left lung"]
    ct = read_volume(sample_path("chest-ct"))
    vol_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    vs = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    vs.SetFileName(str(sample_path("chest-ct")))
    assert vs.ReadData(vol_node)
    np.testing.assert_allclose(volumes.volume_from_node(vol_node).ijk_to_lps, ct.ijk_to_lps, atol=1e-6)
    rep = json.loads(report.read_text())["objects"]
    for n, name in enumerate(names):
        mask = volumes.segment_mask(seg, segmentation.GetNthSegmentID(n), vol_node)
        assert int(mask.sum()) == rep[n]["voxels"] > 0
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        assert slices.min() >= 18 and slices.max() <= 21  # --slice-range respected
    assert segmentation.GetSegment(segmentation.GetNthSegmentID(0)).GetColor() == pytest.approx((0.55, 0.80, 0.90))


def test_batch_script_failures_exit_non_zero_with_a_message(tiny_checkpoint, tmp_path, capsys):
    script = load_script()
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"objects": [{"name": "x", "slices": [{"index": 99, "box": [1, 1, 5, 5]}]}]}))
    rc = script.main(["--input", "sample:chest-ct", "--prompts", str(prompts), "--output", str(tmp_path / "o.seg.nrrd"),
                      "--checkpoint", str(tiny_checkpoint), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "99" in err and "Traceback" not in err
    rc = script.main(["--input", str(tmp_path / "missing.nrrd"), "--prompts", str(prompts),
                      "--output", str(tmp_path / "o.seg.nrrd"), "--quiet"])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = script.main(["--input", "sample:chest-ct", "--prompts", str(REPO / "examples" / "chest_ct_prompts.json"),
                      "--output", str(tmp_path / "o.seg.nrrd"), "--model", "robustmedsam", "--offline", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and "robustmedsam_best.pth" in err
    assert script.main(["--input", "x"]) == 2  # usage error
    assert not (tmp_path / "o.seg.nrrd").exists()


def test_usage_flag_because_slicer_reads_help_itself(capsys):
    """Inside Slicer -h/--help print Slicer's own options: --usage prints the script's, and a usage error
    says so; "--" (Slicer's ignore-the-rest, which Slicer drops) is also accepted in front. Plain Python."""
    import subprocess

    for args in (["--usage"], ["--", "--usage"], ["--help"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "--input" in r.stdout and "--usage" in r.stdout and "Slicer reads -h/--help itself" in r.stdout
    script = load_script()
    assert script.main(["--", "--usage"]) == 0 and "--prompts" in capsys.readouterr().out
    assert script.main(["--input", "ct.nrrd"]) == 2
    err = capsys.readouterr().err
    assert "required: --prompts, --output" in err and "use --usage" in err and "-- before" in err
    assert "--usage" in script.__doc__ and "-- --help" in script.__doc__
