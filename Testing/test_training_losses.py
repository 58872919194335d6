"""Loss terms against hand-computed values, and which branch of the decoder receives gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from Training import losses as L


pytestmark = pytest.mark.usefixtures("one_thread")


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_loss_hand_computed():
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    # pixel 1: ce = log 2, p_t = 0.5; pixel 2: ce = log(1 + e^2), p_t = 1 - sigmoid(2); alpha is a constant 0.25
    ce1, ce2 = math.log(2.0), math.log(1.0 + math.exp(2.0))
    f1 = 0.25 * (1 - 0.5) ** 2 * ce1
    f2 = 0.25 * (1 - (1 - _sig(2.0))) ** 2 * ce2
    assert L.focal_loss(logits, target).item() == pytest.approx((f1 + f2) / 2, rel=1e-6)
    assert (f1 + f2) / 2 == pytest.approx(0.2279206, abs=1e-7)


def test_dice_loss_hand_computed_per_sample_mean():
    logits = torch.tensor([[0.0, 2.0], [-3.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = [[0.5, _sig(2.0)], [_sig(-3.0), _sig(3.0)]]
    d0 = 1 - (2 * 0.5 + 1e-6) / (sum(p[0]) + 1 + 1e-6)
    d1 = 1 - (2 * p[1][1] + 1e-6) / (sum(p[1]) + 1 + 1e-6)
    assert L.dice_loss(logits, target).item() == pytest.approx((d0 + d1) / 2, rel=1e-6)
    assert d0 == pytest.approx(0.579973, abs=1e-6)


def test_robust_objective_weights_and_terms():
    logits = torch.tensor([[[[0.0, 2.0]]]])
    target = torch.tensor([[[1.0, 0.0]]])
    deg_tok, clean_tok = torch.zeros(1, 4, 8), torch.ones(1, 4, 8, requires_grad=True)
    deg_feat, clean_feat = torch.zeros(1, 2, 3, 3), torch.full((1, 2, 3, 3), 2.0, requires_grad=True)
    terms = L.robust_objective(logits, target, deg_tok, clean_tok, deg_feat, clean_feat)
    assert terms["token"].item() == pytest.approx(1.0)
    assert terms["feature"].item() == pytest.approx(4.0)
    expected = 20 * 0.2279206 + 1 * 0.579973 + 2 * 1.0 + 100 * 4.0
    assert terms["total"].item() == pytest.approx(expected, abs=1e-4)
    terms["total"].backward()
    assert clean_tok.grad is not None and clean_tok.grad.abs().sum() > 0  # the official code does not detach
    clean_tok.grad = None
    deg_tok.requires_grad_(True)
    custom = L.robust_objective(logits, target, deg_tok, clean_tok, deg_feat, clean_feat,
                                L.LossWeights(0, 0, 1, 0), detach_clean=True)
    assert custom["total"].item() == pytest.approx(1.0)
    custom["total"].backward()
    assert clean_tok.grad is None and deg_tok.grad.abs().sum() > 0


def test_min_dice_iou_loss_hand_computed():
    logits = torch.tensor([[[[0.0, 2.0]], [[10.0, -10.0]]]])  # (B=1, C=2, 1, 2)
    iou_pred = torch.tensor([[0.5, 0.5]])
    target = torch.tensor([[[1.0, 0.0]]])
    p0 = [0.5, _sig(2.0)]
    dice0 = 1 - 2 * 0.5 / (p0[0] ** 2 + p0[1] ** 2 + 1.0)
    p1 = [_sig(10.0), _sig(-10.0)]
    dice1 = 1 - 2 * p1[0] / (p1[0] ** 2 + p1[1] ** 2 + 1.0)
    out = L.min_dice_iou_loss(logits, iou_pred, target)
    assert out["mask"].item() == pytest.approx(min(dice0, dice1), abs=1e-6)
    assert dice0 == pytest.approx(0.506369, abs=1e-6)
    # true IoU: mask 0 predicts only the wrong pixel (0 % IoU), mask 1 is exact (100 %)
    assert out["iou"].item() == pytest.approx(((0.5 - 0.0) ** 2 + (0.5 - 1.0) ** 2) / 2, abs=1e-6)
    assert out["total"].item() == pytest.approx(out["mask"].item() + out["iou"].item())


def test_corrective_points_from_error_regions():
    target = np.zeros((6, 6), bool)
    target[1:4, 1:4] = True
    pred = target.copy()
    pred[2, 2] = False  # one false negative
    pred[5, 5] = True  # one false positive
    pts, labels = L.corrective_points(pred, target, np.random.default_rng(0))
    assert labels.tolist() == [1, 0]
    assert pts.tolist() == [[2.0, 2.0], [5.0, 5.0]]  # (x, y)
    # no errors: positive from the object, negative from the background
    pts, labels = L.corrective_points(target, target, np.random.default_rng(1))
    assert target[int(pts[0, 1]), int(pts[0, 0])] and not target[int(pts[1, 1]), int(pts[1, 0])]
    # nothing outside the object: the negative point becomes padding
    full = np.ones((3, 3), bool)
    _, labels = L.corrective_points(full, full, np.random.default_rng(2))
    assert labels.tolist() == [1, -1]


def _batch(tiny, b=2, size=48):
    from Training.synthetic import shape_sample
    from Training.datasets import largest_object, sample_points
    from RobustMedSAMLib.preprocess import prepare_image

    rng = np.random.default_rng(0)
    imgs, masks, pts = [], [], []
    for i in range(b):
        image, label = shape_sample(size, 0, i)
        x, frame = prepare_image(image, tiny.config.preprocessing)
        target = largest_object(label)
        imgs.append(x[0])
        masks.append(torch.from_numpy(target.astype(np.float32)))
        pts.append(torch.as_tensor(frame.points_to_model(sample_points(target, 3, rng)), dtype=torch.float32))
    return frame, {"clean": torch.stack(imgs), "degraded": torch.stack(imgs) + 0.3, "mask": torch.stack(masks),
                   "points": torch.stack(pts), "point_labels": torch.ones(b, 3, dtype=torch.int64),
                   "box": torch.tensor([[4.0, 4.0, 200.0, 200.0]] * b), "index": torch.arange(b)}


@pytest.mark.parametrize("detach", [False, True])
def test_gradients_reach_both_branches_like_the_official_code(detach):
    from RobustMedSAMLib.models import seeded_model
    from Training import train_decoder as T

    tiny = seeded_model("tiny", seed=0)
    cfg = T.TrainConfig(seeded_tiny=True, detach_clean=detach, train_size=48)
    params = T.select_trainable(tiny.model, cfg)
    tiny.model.mask_decoder.train()
    frame, batch = _batch(tiny)
    step = T.TrainStep(tiny.model, cfg, frame)
    terms = step({}, batch, "points", False, 0)
    terms["total"].backward()
    dec = tiny.model.mask_decoder
    assert dec.custom_robust_token.weight.grad.abs().sum() > 0  # robust path (degraded branch)
    assert dec.fourier_first_layer_features.dnc_block_combined.SEMBlock.maxpool_conv[0].conv1.weight.grad is not None
    if detach:
        assert not dec.mask_tokens.weight.requires_grad  # only the clean branch reads them: frozen
    else:
        assert dec.mask_tokens.weight.grad.abs().sum() > 0  # clean branch (SAM path) through the MSE terms
    assert not any(p.requires_grad for p in dec.output_hypernetworks_mlps.parameters())
    assert not any(p.requires_grad for p in dec.iou_prediction_head.parameters())
    assert all(p.grad is None for p in tiny.model.image_encoder.parameters())
    assert all(p.grad is None for p in tiny.model.prompt_encoder.parameters())
    assert all(p.grad is not None for p in params)  # every trainable parameter is reached (DDP needs it)


def test_iterative_objective_reaches_iou_head_and_adds_points():
    from RobustMedSAMLib.models import seeded_model
    from Training import train_decoder as T

    tiny = seeded_model("tiny", seed=0)
    cfg = T.TrainConfig(seeded_tiny=True, objective="iterative", sub_iterations=3, train_size=48)
    params = T.select_trainable(tiny.model, cfg)
    tiny.model.mask_decoder.train()
    frame, batch = _batch(tiny)
    step = T.TrainStep(tiny.model, cfg, frame)
    seen = []
    orig = step.decode

    def spy(emb, early, points, boxes, robust, **kw):
        seen.append(None if points is None else points[0].shape[1])
        return orig(emb, early, points, boxes, robust, **kw)

    step.decode = spy
    terms = step({}, batch, "box", True, 0)
    terms["total"].backward()
    # sub-iteration 0: box only; clean branch; then 2 corrective points per refinement
    assert seen == [None, None, 2, 4]
    assert tiny.model.mask_decoder.iou_prediction_head.layers[0].weight.grad is not None
    assert all(p.grad is not None for p in params)
    assert terms["total"].item() == pytest.approx(
        terms["mask"].item() + terms["iou"].item() + 2 * terms["token"].item() + 100 * terms["feature"].item(),
        rel=1e-5)
