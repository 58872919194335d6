"""Training losses: RobustSAM's objective and MedicoSAM's iterative-prompting objective.

RobustSAM (official ``loss.py`` + ``engine.py`` at GitHub HEAD 6f0e263), followed exactly:

* ``focal = mean(alpha * (1 - p_t)^gamma * BCE(logits, target))`` with gamma 2 and alpha 0.25 used as a
  constant factor on every pixel (the official ``FocalLoss`` with a float alpha: *not* the class-balanced
  alpha / (1 - alpha) of RetinaNet), mean over all pixels of the batch.
* ``dice = mean_b(1 - (2 sum(p t) + 1e-6) / (sum(p) + sum(t) + 1e-6))`` on sigmoid probabilities, per sample.
* ``total = 20 focal(deg, gt) + 1 dice(deg, gt) + 2 MSE(tokens_deg, tokens_clean)
  + 100 MSE(features_deg, features_clean)``: the mask terms compare the **degraded** branch (robust path)
  with the ground truth; the consistency terms compare the degraded branch's mask-token outputs and robust
  mask features with the **clean** branch's (SAM path, ``clear=True``). The clean branch is *not*
  detached in the official code, so both branches receive gradients from the MSE terms (``detach_clean``
  changes that). The official code also computes a mask loss against the clean prediction but never uses
  it; so do we (not computed). Masks are compared at the training image size after SAM's postprocessing.

MedicoSAM / micro-sam (``SamTrainer._compute_loss``): per sub-iteration, the mean over objects of the
**minimum over the 1 or 3 output masks of the Dice loss** (torch_em's formulation: squared terms in the
denominator) plus ``MSE(predicted IoU, IoU of the binarised mask)``; :func:`corrective_points` adds one
positive point from the false negatives and one negative point from the false positives.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """RobustSAM's weights (paper: alpha = 20, beta = 1, lambda_1 = 100 (features), lambda_2 = 2 (tokens))."""

    focal: float = 20.0
    dice: float = 1.0
    token: float = 2.0
    feature: float = 100.0

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """RobustSAM's focal loss (see module docstring), mean over every element."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = torch.exp(-ce)
    return (alpha * (1.0 - pt) ** gamma * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """RobustSAM's Dice loss: ``1 - soft Dice`` per sample (sigmoid probabilities), mean over the batch."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1.0 - dice).mean()


def robust_objective(degraded_logits: torch.Tensor, target: torch.Tensor,
                     degraded_tokens: Optional[torch.Tensor], clean_tokens: Optional[torch.Tensor],
                     degraded_features: Optional[torch.Tensor], clean_features: Optional[torch.Tensor],
                     weights: LossWeights = LossWeights(), detach_clean: bool = False) -> Dict[str, torch.Tensor]:
    """RobustSAM's loss terms and their weighted ``total``.

    Arguments:
        degraded_logits: ``(B, 1, H, W)`` mask logits of the degraded image (robust path) at the target size.
        target: ``(B, 1, H, W)`` or ``(B, H, W)`` ground truth in {0, 1}.
        degraded_tokens / clean_tokens: ``(B, 4, D)`` transformer outputs at the mask-token positions.
        degraded_features / clean_features: ``(B, 32, m, m)`` robust mask features.
        detach_clean: stop gradients through the clean branch (the official code does not).
    Returns:
        ``{"focal", "dice", "token", "feature", "total"}`` (unweighted terms, weighted total).
    """
    target = target.reshape(degraded_logits.shape).to(degraded_logits.dtype)
    terms = {"focal": focal_loss(degraded_logits, target), "dice": dice_loss(degraded_logits, target)}
    zero = degraded_logits.new_zeros(())
    for key, deg, clean in (("token", degraded_tokens, clean_tokens), ("feature", degraded_features, clean_features)):
        if deg is None or clean is None:
            terms[key] = zero
        else:
            terms[key] = F.mse_loss(deg.float(), (clean.detach() if detach_clean else clean).float())
    terms["total"] = (weights.focal * terms["focal"] + weights.dice * terms["dice"]
                      + weights.token * terms["token"] + weights.feature * terms["feature"])
    return terms


# ------------------------------------------------------------------------------------ iterative (MedicoSAM)
def squared_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """torch_em's Dice loss per sample: ``1 - 2 sum(p t) / max(sum(p^2) + sum(t^2), eps)``; shape ``(B,)``."""
    p, t = probs.flatten(1), target.flatten(1)
    return 1.0 - 2.0 * (p * t).sum(1) / ((p * p).sum(1) + (t * t).sum(1)).clamp(min=eps)


def true_iou(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of ``logits > 0`` (sigmoid > 0.5) with the target, per sample and mask: ``(B, C)``."""
    pred = logits > 0
    t = target.bool().unsqueeze(1)
    inter = (pred & t).flatten(2).sum(2).float()
    union = (pred | t).flatten(2).sum(2).float()
    return inter / (union + eps)


def min_dice_iou_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
                      ) -> Dict[str, torch.Tensor]:
    """One sub-iteration of micro-sam's loss.

    Arguments:
        logits: ``(B, C, H, W)`` mask logits (C = 1 or 3) at the target size; iou_pred: ``(B, C)``;
        target: ``(B, H, W)`` in {0, 1}.
    Returns:
        ``{"mask": mean_b min_c Dice loss, "iou": MSE(iou_pred, true IoU), "total": mask + iou}``.
    """
    target = target.reshape(logits.shape[0], *logits.shape[-2:]).to(logits.dtype)
    probs = torch.sigmoid(logits)
    dice = torch.stack([squared_dice_loss(probs[:, c], target) for c in range(logits.shape[1])], dim=1)
    mask = dice.min(dim=1).values.mean()
    with torch.no_grad():
        iou_true = true_iou(logits, target)
    iou = F.mse_loss(iou_pred.float(), iou_true)
    return {"mask": mask, "iou": iou, "total": mask + iou}


def corrective_points(pred: np.ndarray, target: np.ndarray, rng: np.random.Generator
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """One positive and one negative point ``(x, y)`` correcting ``pred`` (both ``(H, W)`` bool).

    Positive: a random false-negative pixel, else a random target pixel. Negative: a random false-positive
    pixel, else a random background pixel; when there is no background the second point is padding
    (label -1, ignored by the prompt encoder). Returns ``(points (2, 2), labels (2,))``.
    """
    points, labels = [], []
    for region, fallback, label in ((target & ~pred, target, 1), (pred & ~target, ~target, 0)):
        rows, cols = np.nonzero(region)
        if rows.size == 0:
            rows, cols = np.nonzero(fallback)
        if rows.size == 0:
            points.append((0.0, 0.0))
            labels.append(-1)
            continue
        k = int(rng.integers(rows.size))
        points.append((float(cols[k]), float(rows[k])))
        labels.append(label)
    return np.asarray(points, dtype=np.float64), np.asarray(labels, dtype=np.int64)
