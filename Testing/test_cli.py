"""The command line end to end: real files in, real files out, clear errors without tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from RobustMedSAMLib import checkpoints as ck
from RobustMedSAMLib.cli import main
from RobustMedSAMLib.models import seeded_model
from RobustMedSAMLib.seeded import seeded_image, seeded_state_dict
from RobustMedSAMLib.volume_io import read_volume
from RobustMedSAMLib.segmentation_io import read_segmentation

REPO_EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_robust.pth"
    torch.save(seeded_model("tiny").model.state_dict(), path)
    return path


@pytest.fixture
def image_files(tmp_path):
    rgb = seeded_image((150, 220, 3), 3)
    files = {"rgb.png": Image.fromarray(rgb), "grey.png": Image.fromarray(rgb[:, :, 0]),
             "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
             "grey16.png": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 250),
             "photo.jpg": Image.fromarray(rgb), "scan.tif": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 9)}
    for name, im in files.items():
        im.save(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("name", ["rgb.png", "grey.png", "rgba.png", "grey16.png", "photo.jpg", "scan.tif"])
def test_segment_2d_formats(tiny_ckpt, image_files, name, capsys):
    out = image_files / f"{name}.mask.png"
    prob = image_files / f"{name}.prob.npy"
    rc = main(["segment", str(image_files / name), "--checkpoint", str(tiny_ckpt), "--box", "20", "30", "150", "120",
               "--point", "80", "70", "--negative-point", "10", "10", "--output", str(out),
               "--probabilities", str(prob)])
    assert rc == 0, capsys.readouterr().err
    mask = np.asarray(Image.open(out))
    p = np.load(prob)
    assert mask.shape == (150, 220) and p.shape == (150, 220) and p.dtype == np.float32
    assert set(np.unique(mask)) <= {0, 255}
    assert ((p > 0.5) == (mask > 0)).mean() > 0.999  # probabilities are the mask's sigmoid(logits)
    assert "predicted IoU" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    ([], "no prompt given"),
    (["--box", "50", "50", "20", "80"], "empty or inverted"),
    (["--box", "10", "10", "10", "80"], "empty or inverted"),
    (["--point", "500", "10"], "outside the image"),
    (["--box", "300", "10", "400", "50"], "outside the image"),
])
def test_segment_bad_prompts_exit_cleanly(tiny_ckpt, image_files, args, message, capsys):
    out = image_files / "never.png"
    rc = main(["segment", str(image_files / "rgb.png"), "--checkpoint", str(tiny_ckpt), "--output", str(out)] + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_segment_bad_image_and_missing_weights(tmp_path, image_files, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    assert main(["segment", str(bad), "--model", "sam-vit-b", "--point", "1", "1", "-o", str(tmp_path / "m.png")]) == 2
    assert "not a readable image" in capsys.readouterr().err
    # offline: the message says exactly what to download and where
    rc = main(["segment", str(image_files / "rgb.png"), "--model", "robustmedsam", "--offline", "--point", "5", "5",
               "-o", str(tmp_path / "m.png")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "https://github.com/jli2556/RobustMedSAM/releases/download/v1.0.0/robustmedsam_best.pth" in err
    assert "robustmedsam_best.pth" in err and "--checkpoint" in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = __import__("pathlib").Path(sys.executable).parent / "robustmedsam"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "RobustMedSAMLib.cli"]
    run = subprocess.run(cmd + ["inspect", str(tmp_path / "nope.pth")], capture_output=True, text=True)
    assert run.returncode == 2 and "checkpoint not found" in run.stderr and "Traceback" not in run.stderr


def test_segment_volume_sample_ct_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "chest.seg.nrrd"
    report = tmp_path / "report.json"
    rc = main(["segment-volume", "sample:chest-ct", "--prompts", str(REPO_EXAMPLES / "chest_ct_prompts.json"),
               "--checkpoint", str(tiny_ckpt), "--output", str(out), "--report", str(report), "--iou-threshold", "0.2"])
    assert rc == 0, capsys.readouterr().err
    seg = read_segmentation(out, overlap="last")  # random weights: the two objects may overlap
    ct = read_volume(__import__("RobustMedSAMLib.samples", fromlist=["x"]).sample_path("chest-ct"))
    np.testing.assert_allclose(seg.ijk_to_lps, ct.ijk_to_lps)
    assert [s.name for s in seg.segments] == ["right lung", "left lung"]
    rep = json.loads(report.read_text())
    assert [o["name"] for o in rep["objects"]] == ["right lung", "left lung"]
    import slicerio

    raw = slicerio.read_segmentation(str(out))
    for n, name in enumerate(["right lung", "left lung"]):  # every object intact, overlaps kept in layers
        mask = slicerio.segment_mask(raw, slicerio.segment_from_name(raw, name))
        assert rep["objects"][n]["voxels"] == int(mask.sum())
    assert {"lower", "upper"} <= set(rep["objects"][0]["stops"])
    # the seed slice is encoded once and shared: at most one encoding per slice reached
    assert rep["encoded_slices"] <= 34


@pytest.mark.parametrize("window, message", [("40,abc", "LEVEL,WIDTH"), ("40,400,2", "LEVEL,WIDTH"),
                                             ("40,-5", "width > 0"), ("lungs-ish", "unknown window preset")])
def test_segment_volume_bad_window_is_a_clear_error(tmp_path, capsys, window, message):
    rc = main(["segment-volume", "sample:chest-ct", "--prompts", str(REPO_EXAMPLES / "chest_ct_prompts.json"),
               "--model", "robustmedsam", "--offline", "--window", window, "--output", str(tmp_path / "o.seg.nrrd")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err


def test_segment_volume_errors_before_loading_a_model(tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"objects": [{"name": "x", "slices": [{"index": 99, "box": [1, 1, 5, 5]}]}]}))
    rc = main(["segment-volume", "sample:chest-ct", "--prompts", str(prompts), "--model", "robustmedsam",
               "--offline", "--output", str(tmp_path / "o.seg.nrrd")])
    err = capsys.readouterr().err
    assert rc == 2 and "99" in err and "Traceback" not in err
    rc = main(["segment-volume", "sample:chest-ct", "--prompts", str(prompts), "--model", "robustmedsam",
               "--output", str(tmp_path / "missing_dir" / "o.seg.nrrd")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing_dir").exists()


def test_fuse_and_inspect_commands(tiny_ckpt, tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save(seeded_model("tiny", seed=4, robust_decoder=False).model.state_dict(), plain)
    out = tmp_path / "fused.safetensors"
    assert main(["fuse", "--encoder", str(plain), "--decoder", str(tiny_ckpt), "--output", str(out)]) == 0
    assert main(["fuse", "--encoder", str(plain), "--decoder", str(tiny_ckpt), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["encoder_source"] == "plain.pth" and info["decoder"].startswith("robust")


@pytest.mark.slow
def test_full_size_vit_b_checkpoint_loads_fuses_and_segments(tmp_path, capsys):
    """Seeded ViT-B checkpoints in the official layouts: a MedSAM-like plain SAM file and a DDP-saved
    RobustSAM-like file (``module.`` prefix) -> fuse -> segment through the CLI."""
    from RobustMedSAMLib.modeling import VIT_B, build_model

    shapes = {k: tuple(v.shape) for k, v in build_model(VIT_B).state_dict().items()}
    robust = seeded_state_dict(shapes, seed=1)
    medsam_like = tmp_path / "medsam_vit_b.pth"
    torch.save({k: v for k, v in seeded_state_dict(shapes, seed=2).items()
                if not k.startswith("mask_decoder.") or k in build_model(
                    __import__("dataclasses").replace(VIT_B, robust_decoder=False)).state_dict()}, medsam_like)
    robust_like = tmp_path / "robustsam_checkpoint_b.pth"
    torch.save({f"module.{k}": v for k, v in robust.items()}, robust_like)
    del robust
    assert ck.detect_architecture(ck.read_checkpoint(medsam_like)[0]).robust_decoder is False
    fused = tmp_path / "robustmedsam_fused.safetensors"
    assert main(["fuse", "--encoder", str(medsam_like), "--decoder", str(robust_like), "-o", str(fused)]) == 0
    image = tmp_path / "slice.png"
    Image.fromarray(seeded_image((200, 300), 5)).save(image)
    out = tmp_path / "mask.png"
    assert main(["segment", str(image), "--checkpoint", str(fused), "--box", "40", "30", "200", "150",
                 "-o", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (200, 300)
    assert "predicted IoU" in capsys.readouterr().out
