"""The training objectives as one forward, :class:`TrainStep` (the module DDP wraps).

RobustMedSAM pairs (``--objective robust``, RobustSAM ``engine.py``): the image and prompt encoders are frozen
and run under ``no_grad``; each sample runs the decoder twice, the **clean** image through the SAM path
(``clear=True``) and the **degraded** image through the robust path; the loss is ``losses.robust_objective``
(focal 20 + Dice 1 against the ground truth on the degraded branch, token MSE 2 and mask-feature MSE 100
between the branches, gradients through both branches as in the official code). The SAM path's
``output_hypernetworks_mlps`` and (except for the iterative objective) ``iou_prediction_head`` get no gradient
in the official objective; they are frozen (``train_model.select_trainable``), which changes nothing but lets
DDP run without ``find_unused_parameters``.

Iterative prompting (``--objective iterative``, MedicoSAM): the mask terms become ``losses.min_dice_iou_loss``
over ``--sub-iterations`` decodings of the degraded branch, each with one more positive point from the false
negatives and one negative point from the false positives (seeded per sample and sub-iteration); whether the
previous logits are also given as a mask prompt is drawn once per step with ``--mask-prob`` (micro-sam's
multi-GPU rule, zero logits in the first sub-iteration), so one process and ``torchrun`` agree; the
token/feature consistency terms use the first sub-iteration.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from Training import losses as L
from Training.train_config import TrainConfig

ENCODINGS = ("clean_emb", "clean_early", "deg_emb", "deg_early")


def prompt_kind(prompt: str, global_step: int) -> str:
    """The prompt of a step: ``alternate`` is points on even steps and a box on odd ones."""
    if prompt == "alternate":
        return "points" if global_step % 2 == 0 else "box"
    return prompt


class TrainStep(nn.Module):
    """One training forward: (cached) encodings -> decoder branches -> loss terms. Wrapped by DDP."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, frame) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.frame = frame
        self.weights = L.LossWeights(cfg.focal_weight, cfg.dice_weight, cfg.token_weight, cfg.feature_weight)
        self.scale_xy = torch.as_tensor(frame.scale_xy, dtype=torch.float32)

    def encodings(self, batch: Dict[str, torch.Tensor], cache: Optional[dict] = None,
                  cache_dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """Frozen encoder outputs (no gradient), from/into ``cache`` when given; {} with adapters (the
        forward encodes then, with gradient)."""
        if self.cfg.adapters:
            return {}
        indices = [int(i) for i in batch["index"]]
        device = batch["clean"].device
        if cache is not None and all(i in cache for i in indices):
            parts = [cache[i] for i in indices]
            return {k: torch.stack([p[n] for p in parts]).to(device=device, dtype=torch.float32)
                    for n, k in enumerate(ENCODINGS)}
        with torch.no_grad():  # contiguous: the same memory layout as tensors served from the cache
            clean_emb, clean_early = (t.contiguous() for t in self.model.image_encoder(batch["clean"]))
            deg_emb, deg_early = (t.contiguous() for t in self.model.image_encoder(batch["degraded"]))
        if cache is not None:
            for n, i in enumerate(indices):
                cache[i] = tuple(t[n].detach().to("cpu", cache_dtype)
                                 for t in (clean_emb, clean_early, deg_emb, deg_early))
        return {"clean_emb": clean_emb, "clean_early": clean_early, "deg_emb": deg_emb, "deg_early": deg_early}

    def encode(self, images: torch.Tensor):
        with torch.set_grad_enabled(self.cfg.adapters and torch.is_grad_enabled()):
            return self.model.image_encoder(images)

    def _prompt_embeddings(self, points, boxes, masks):
        with torch.no_grad():  # frozen prompt encoder
            return self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)

    def decode(self, emb, early, points, boxes, robust: bool, masks=None, multimask=False, features=None):
        sparse, dense = self._prompt_embeddings(points, boxes, masks)
        return self.model.mask_decoder(emb, self.model.prompt_encoder.get_dense_pe(), sparse, dense, multimask,
                                       robust=robust, image_features=features, early_features=early,
                                       return_features=True)

    def forward(self, enc: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor], kind: str,
                use_mask: bool, epoch: int) -> Dict[str, torch.Tensor]:
        if enc.get("deg_emb") is None:
            enc = dict(enc)
            enc["deg_emb"], enc["deg_early"] = self.encode(batch["degraded"])
            enc["clean_emb"], enc["clean_early"] = self.encode(batch["clean"])
        points = (batch["points"], batch["point_labels"]) if kind in ("points", "points+box") else None
        boxes = batch["box"] if kind in ("box", "points+box") else None
        target = batch["mask"]
        need_clean = self.cfg.token_weight != 0 or self.cfg.feature_weight != 0
        if self.cfg.objective == "robust":
            deg = self.decode(enc["deg_emb"], enc["deg_early"], points, boxes, robust=True)
            clean = self.decode(enc["clean_emb"], enc["clean_early"], points, boxes, robust=False) if need_clean \
                else None
            logits = self.frame.logits_to_image(deg.masks)
            return L.robust_objective(logits, target, deg.tokens, clean.tokens if clean else None,
                                      deg.mask_features, clean.mask_features if clean else None,
                                      self.weights, self.cfg.detach_clean)
        return self._iterative(enc, batch, points, boxes, target, kind, use_mask, epoch, need_clean)

    def _iterative(self, enc, batch, points, boxes, target, kind, use_mask, epoch, need_clean):
        cfg = self.cfg
        features = self.model.mask_decoder.image_features(enc["deg_emb"], enc["deg_early"], robust=True)
        b = target.shape[0]
        m = self.model.architecture.mask_size
        masks = target.new_zeros((b, 1, m, m)) if use_mask else None  # micro-sam multi-GPU: zeros first
        totals = {"mask": 0.0, "iou": 0.0}
        consistency = {"token": target.new_zeros(()), "feature": target.new_zeros(())}
        n = cfg.sub_iterations
        for s in range(n):
            multimask = s == 0 and kind == "points"
            out = self.decode(enc["deg_emb"], None, points, boxes, robust=True, masks=masks, multimask=multimask,
                              features=features)
            logits = self.frame.logits_to_image(out.masks)
            terms = L.min_dice_iou_loss(logits, out.iou, target)
            totals["mask"] = totals["mask"] + terms["mask"] / n
            totals["iou"] = totals["iou"] + terms["iou"] / n
            if s == 0 and need_clean:
                clean = self.decode(enc["clean_emb"], enc["clean_early"], points, boxes, robust=False,
                                    multimask=multimask)
                c_tokens = clean.tokens.detach() if cfg.detach_clean else clean.tokens
                c_feat = clean.mask_features.detach() if cfg.detach_clean else clean.mask_features
                consistency = {"token": nn.functional.mse_loss(out.tokens, c_tokens),
                               "feature": nn.functional.mse_loss(out.mask_features, c_feat)}
            if s < n - 1:
                with torch.no_grad():
                    best = out.iou.argmax(dim=1)
                    rows = torch.arange(b, device=best.device)
                    points = self._add_corrective_points(points, logits[rows, best], target, batch, epoch, s)
                    masks = out.masks[rows, best].unsqueeze(1).detach() if use_mask else None
        total = (totals["mask"] + totals["iou"] + self.weights.token * consistency["token"]
                 + self.weights.feature * consistency["feature"])
        return {"mask": totals["mask"], "iou": totals["iou"], "token": consistency["token"],
                "feature": consistency["feature"], "total": total}

    def _add_corrective_points(self, points, best_logits, target, batch, epoch: int, sub_iteration: int):
        """``points`` plus one positive and one negative point per sample (seeded per sample and sub-iteration)."""
        pred = (best_logits > 0).cpu().numpy()
        gt = target.bool().cpu().numpy()
        new_pts, new_lbl = [], []
        for i in range(target.shape[0]):
            rng = np.random.default_rng([self.cfg.seed, epoch, int(batch["index"][i]), 100 + sub_iteration])
            p, lab = L.corrective_points(pred[i], gt[i], rng)
            new_pts.append(p)
            new_lbl.append(lab)
        dev = target.device
        pts = torch.as_tensor(np.stack(new_pts), dtype=torch.float32, device=dev) * self.scale_xy.to(dev)
        lbl = torch.as_tensor(np.stack(new_lbl), dtype=torch.int64, device=dev)
        if points is None:
            return (pts, lbl)
        return (torch.cat([points[0], pts], 1), torch.cat([points[1], lbl], 1))
