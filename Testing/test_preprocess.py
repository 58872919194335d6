"""Preprocessing conventions and image <-> model-frame geometry, against segment_anything's own code."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from RobustMedSAMLib.preprocess import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, Preprocessing, as_rgb, longest_side_shape,
                                        model_frame, prepare_image)
from RobustMedSAMLib.seeded import seeded_image

SIZES = [(300, 400), (400, 300), (512, 512), (37, 1000), (1024, 1024), (1500, 900)]


@pytest.mark.parametrize("h,w", SIZES)
def test_sam_frame_matches_resize_longest_side(h, w):
    ref = ResizeLongestSide(1024)
    frame = model_frame((h, w), Preprocessing("sam"))
    assert frame.resized_size == ref.get_preprocess_shape(h, w, 1024) == longest_side_shape(h, w, 1024)
    pts = np.array([[0.0, 0.0], [w - 1, h - 1], [w / 3, h / 7]])
    np.testing.assert_allclose(frame.points_to_model(pts), ref.apply_coords(pts, (h, w)), rtol=1e-12)
    box = np.array([[1.0, 2.0, w - 3.0, h - 4.0]])
    np.testing.assert_allclose(frame.boxes_to_model(box), ref.apply_boxes(box, (h, w)), rtol=1e-12)


@pytest.mark.parametrize("h,w", [(300, 400), (1500, 900)])
def test_sam_postprocess_matches_segment_anything(h, w):
    from segment_anything.modeling import Sam

    frame = model_frame((h, w), Preprocessing("sam"))
    logits = torch.randn(2, 3, 256, 256)

    class _Enc:  # Sam.postprocess_masks only reads image_encoder.img_size
        img_size = 1024

    ref = Sam.postprocess_masks(type("S", (), {"image_encoder": _Enc()})(), logits, frame.resized_size, (h, w))
    torch.testing.assert_close(frame.logits_to_image(logits), ref)


def test_sam_image_normalisation_and_padding():
    img = seeded_image((300, 400, 3), 1)
    x, frame = prepare_image(img, Preprocessing("sam"))
    assert x.shape == (1, 3, 1024, 1024) and frame.resized_size == (768, 1024)
    assert torch.count_nonzero(x[..., 768:, :]) == 0  # bottom padding is zero after normalisation
    # undoing the normalisation gives the image resized to 768 x 1024 within uint8 rounding of a bilinear resize
    mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
    content = (x[..., :768, :] * std + mean)[0].permute(1, 2, 0).numpy()
    ref = ResizeLongestSide(1024).apply_image(img).astype(np.float64)  # PIL bilinear, as SamPredictor
    assert np.abs(content - ref).mean() < 1.0 and np.abs(content - ref).max() < 12


def test_medsam_convention():
    img = seeded_image((300, 400), 2)
    x, frame = prepare_image(img, Preprocessing("medsam"))
    assert x.shape == (1, 3, 1024, 1024) and frame.resized_size == (1024, 1024)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # min-max to [0, 1], no mean/std
    # MedSAM: box_1024 = box / [W, H, W, H] * 1024
    box = np.array([40.0, 30.0, 200.0, 250.0])
    np.testing.assert_allclose(frame.boxes_to_model(box), box / np.array([400, 300, 400, 300]) * 1024)
    logits = torch.randn(1, 1, 256, 256)
    ref = torch.nn.functional.interpolate(logits, (300, 400), mode="bilinear", align_corners=False)
    torch.testing.assert_close(frame.logits_to_image(logits), ref)


@pytest.mark.parametrize("style", ["sam", "medsam"])
@pytest.mark.parametrize("h,w", [(300, 400), (512, 256)])
def test_mask_prompt_round_trip(style, h, w):
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - h * 0.4) ** 2 / (h * 0.2) ** 2 + (xx - w * 0.6) ** 2 / (w * 0.25) ** 2 < 1
    frame = model_frame((h, w), Preprocessing(style))
    logits = frame.mask_to_logits(mask)
    assert logits.shape == (1, 1, 256, 256)
    np.testing.assert_allclose(np.unique(logits.numpy()), [-np.log(999), np.log(999)], rtol=1e-6)
    back = frame.logits_to_image(logits)[0, 0].numpy() > 0
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.95


def test_as_rgb_layouts_and_errors():
    grey = np.zeros((5, 6), np.uint8)
    assert as_rgb(grey).shape == (5, 6, 3)
    assert as_rgb(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    with pytest.raises(ValueError, match="uint8"):
        as_rgb(np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match="shape"):
        as_rgb(np.zeros((2, 5, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown preprocessing"):
        Preprocessing("clip")


def test_litemedsam_style_frame_boxes_and_area_resize():
    from RobustMedSAMLib.preprocess import Preprocessing, area_resize_uint8, area_weights, model_frame, prepare_image

    prep = Preprocessing("litemedsam", 256)
    frame = model_frame((100, 77), prep)
    assert frame.resized_size == (256, 197) and frame.mask_size == 256  # logits in the input frame
    # official: int(v * 256 / max(H, W)) of (x_min, y_min, x_max, y_max) with inclusive max indices
    np.testing.assert_array_equal(frame.boxes_to_model(np.array([10, 20, 31, 51])),
                                  [int(10 * 2.56), int(20 * 2.56), int(30 * 2.56), int(50 * 2.56)])
    np.testing.assert_allclose(frame.points_to_model(np.array([[10.0, 5.0]])), [[25.6, 12.8]])
    w = area_weights(3, 2)  # two output pixels of 1.5 input pixels each
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(area_weights(2, 4), [[1, 0], [1, 0], [0, 1], [0, 1]])  # 2x: repetition
    img = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
    np.testing.assert_array_equal(area_resize_uint8(img, (6, 8))[..., 0], np.kron(img[..., 0], np.ones((2, 2))))
    x, f = prepare_image(np.full((40, 20), 7, np.uint8), prep)
    assert x.shape == (1, 3, 256, 256) and f.resized_size == (256, 128)
    assert float(x.max()) == 0.0  # a constant image normalises to 0 (min-max with the 1e-8 floor)
    logits = torch.zeros(1, 1, 256, 256)
    logits[..., :128, :64] = 1.0
    back = f.logits_to_image(logits)
    assert tuple(back.shape) == (1, 1, 40, 20) and float(back[0, 0, :19, :9].min()) == pytest.approx(1.0)


def test_litemedsam_area_resize_rounds_a_2x_shrink_as_cv2():
    """cv2.INTER_AREA's 2 x 2 fast path (a 512 x 512 CT slice -> 256, the official recipe's commonest case)
    computes ``(a + b + c + d + 2) >> 2``: halves round up, not to even (checked against
    opencv-python-headless 4.14: block [[2, 3], [2, 3]] -> 3). Other factors keep cv2's round-half-even."""
    from RobustMedSAMLib.preprocess import area_resize_uint8

    block = np.repeat(np.array([[2, 3], [2, 3]], np.uint8)[:, :, None], 3, axis=2)
    assert area_resize_uint8(block, (1, 1)).tolist() == [[[3, 3, 3]]]
    img = np.random.default_rng(0).integers(0, 256, (512, 400, 3), dtype=np.uint8)
    blocks = img.astype(np.int64).reshape(256, 2, 200, 2, 3).sum(axis=(1, 3))
    np.testing.assert_array_equal(area_resize_uint8(img, (256, 200)), (blocks + 2) >> 2)
    # a 4 x 4 block mean of 2.5 (not the 2 x 2 path) stays round-half-even, as cv2's generic integer path
    quad = np.repeat(np.array([[2, 3, 2, 3]] * 4, np.uint8)[:, :, None], 3, axis=2)
    assert area_resize_uint8(quad, (1, 1)).tolist() == [[[2, 2, 2]]]
