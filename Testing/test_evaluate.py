"""`robustmedsam evaluate`: Dice tables (CSV, Markdown) and plot for several models on small data."""
from __future__ import annotations

import builtins
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from RobustMedSAMLib.checkpoints import save_checkpoint
from RobustMedSAMLib.cli import main as cli_main
from RobustMedSAMLib.models import load_model, seeded_model
from Training import evaluate as E
from Training.synthetic import write_medsegbench_npz


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    npz = write_medsegbench_npz(root / "shapes_48.npz", counts=(1, 1, 2), size=48, seed=5)
    ckpts = {}
    for label, seed in (("SAM", 1), ("RobustMedSAM", 2)):
        ckpts[label] = save_checkpoint(seeded_model("tiny", seed=seed).model.state_dict(),
                                       root / f"{label.lower()}.safetensors", {"preprocessing": "sam"})
    return root, npz, ckpts


def _read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dice_score_and_column_order():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b[:2, :] = True
    assert E.dice_score(a, b) == pytest.approx(2 * 4 / (4 + 8))
    assert E.dice_score(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    assert E.order_models(["mine", "RobustMedSAM", "SAM", "robustsam", "MedSAM"]) == [
        "SAM", "MedSAM", "robustsam", "RobustMedSAM", "mine"]


def test_evaluate_command_writes_tables_and_plot(setup, capsys):
    root, npz, ckpts = setup
    out = root / "out"
    argv = ["evaluate", "--checkpoint", f"RobustMedSAM={ckpts['RobustMedSAM']}", "--seeded-tiny",
            "--checkpoint", f"SAM={ckpts['SAM']}", "--npz", str(npz), "--max-images", "1", "--no-progress",
            "--output", str(out)]
    assert cli_main(argv) == 0
    assert "dice.png" in capsys.readouterr().out
    wide = _read_csv(out / "dice.csv")
    assert list(wide[0]) == ["dataset", "prompt", "corruption", "SAM", "RobustMedSAM", "tiny (seeded)"]
    assert len(wide) == 2 * 13 and {r["prompt"] for r in wide} == {"box", "points"}
    assert [r["corruption"] for r in wide[:13]][0] == "clear" and len({r["corruption"] for r in wide}) == 13
    per_image = _read_csv(out / "dice_per_image.csv")
    assert len(per_image) == 13 * 2 * 3
    md = (out / "dice.md").read_text()
    assert "| corruption | SAM | RobustMedSAM | tiny (seeded) |" in md and "**mean degraded**" in md
    assert "## box prompt" in md and "## points prompt" in md and "shapes_48/test" in md
    from PIL import Image

    with Image.open(out / "dice.png") as im:
        assert im.format == "PNG" and im.size[0] > 300

    # one value recomputed by hand through the Predictor: clean image, box prompt, the SAM column
    from RobustMedSAMLib.predictor import Predictor
    from Training.datasets import MedSegBenchSource, largest_object
    from RobustMedSAMLib.preprocess import as_rgb

    src = MedSegBenchSource(npz, "test")
    index = src.candidates()[0]
    item = src.item(index)
    target = largest_object(item.label)
    prompt = E.eval_prompts(target, index, 0, 3, 0)["box"]
    pred = Predictor(load_model(checkpoint=ckpts["SAM"])).predict(prompt, image=as_rgb(item.image))
    row = next(r for r in per_image if r["model"] == "SAM" and r["prompt"] == "box" and r["corruption"] == "clear")
    assert float(row["dice"]) == pytest.approx(E.dice_score(pred.mask, target), abs=1e-6)
    # the table is the mean over images, and the run is reproducible
    assert cli_main(argv) == 2  # outputs exist: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--overwrite"]) == 0
    assert _read_csv(out / "dice.csv") == wide


def test_without_matplotlib_the_plot_is_skipped(setup, monkeypatch, capsys):
    root, npz, ckpts = setup
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = root / "noplot"
    code = E.main(["--seeded-tiny", "--npz", str(npz), "--max-images", "1", "--corruptions", "clear",
                   "gaussian_noise", "--prompts", "points", "--no-progress", "--output", str(out)])
    assert code == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (out / "dice.md").is_file() and not (out / "dice.png").exists()
    rows = _read_csv(out / "dice.csv")
    assert [r["corruption"] for r in rows] == ["clear", "gaussian_noise"] and list(rows[0])[-1] == "tiny (seeded)"


def test_evaluate_errors(setup, tmp_path, capsys):
    root, npz, _ = setup
    assert E.main(["--npz", str(npz), "--output", str(tmp_path / "o")]) == 2
    assert "at least one model" in capsys.readouterr().err
    assert E.main(["--seeded-tiny", "--npz", str(tmp_path / "none.npz"), "--output", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert E.main(["--seeded-tiny", "--npz", str(npz), "--corruptions", "fog", "--output", str(tmp_path / "o")]) == 2
    assert "unknown corruption" in capsys.readouterr().err


def test_checkpoint_with_adapters_is_evaluated_with_them(tmp_path):
    from Training.adapters import add_adapters, has_adapters, save_adapters

    model = seeded_model("tiny", seed=3).model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model)
    with torch.no_grad():
        model.image_encoder.blocks[0].mlp_adapter.fc2.weight.fill_(0.01)
    save_adapters(model, tmp_path / "adapters.safetensors")
    path = save_checkpoint(base, tmp_path / "model.safetensors", {"preprocessing": "sam",
                                                                    "adapters": "adapters.safetensors"})
    args = E.build_parser().parse_args(["--checkpoint", str(path), "--output", str(tmp_path / "o")])
    [m] = E.load_models(args)
    assert m.label == "model" and has_adapters(m.loaded.model)
    assert float(m.loaded.model.image_encoder.blocks[0].mlp_adapter.fc2.weight[0, 0].detach()) == pytest.approx(0.01)
