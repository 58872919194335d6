"""Live parity of the SAM path with Meta's ``segment_anything`` 1.0 (no stored data).

segment_anything's ``Sam`` and our model are given the SAME seeded state dict (seeded into segment_anything's
model, loaded strictly into ours) and must agree on image embeddings, low-resolution logits and IoU (1e-4)
and on the binary masks at the original size. Most cases use the tiny configuration; ViT-B is used once
(module-scoped: one encoder pass per model) for the embeddings and one box.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from RobustMedSAMLib.modeling import TINY, VIT_B_SAM, build_model
from RobustMedSAMLib.preprocess import Preprocessing, prepare_image
from RobustMedSAMLib.seeded import seed_module, seeded_image

TOL = 1e-4
IMAGE_SHAPE = (301, 397, 3)
BOX = [60.0, 50.0, 300.0, 240.0]
CASES = {
    # name: (point coords, labels, box, use previous box logits as mask input, multimask)
    "points": ([[150.0, 120.0], [200.0, 160.0], [320.0, 260.0]], [1, 1, 0], False, False, False),
    "box": (None, None, True, False, False),
    "box_points": ([[150.0, 120.0], [250.0, 200.0]], [1, 0], True, False, False),
    "mask_points": ([[150.0, 120.0], [200.0, 160.0]], [1, 1], False, True, False),
    "multimask": ([[150.0, 120.0]], [1], False, False, True),
}


def _sam_tiny() -> Sam:
    """segment_anything's Sam with our TINY hyper-parameters."""
    a = TINY
    e = a.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a.depth, embed_dim=a.embed_dim, img_size=a.image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=a.num_heads, patch_size=a.patch_size,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=a.global_attn_indexes,
            window_size=a.window_size, out_chans=a.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=a.prompt_dim, image_embedding_size=(e, e),
                                     input_image_size=(a.image_size, a.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=a.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256,
            transformer=TwoWayTransformer(depth=a.decoder_depth, embedding_dim=a.prompt_dim,
                                          mlp_dim=a.decoder_mlp_dim, num_heads=a.decoder_heads)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


def _assert_binary(ours_logits_hw: torch.Tensor, ref_masks: torch.Tensor) -> None:
    ours = ours_logits_hw > 0
    assert ours.shape == ref_masks.shape
    differ = ours != ref_masks
    assert not bool((differ & (ours_logits_hw.abs() > TOL)).any()), int(differ.sum())


class Pair:
    """segment_anything model + ours with the same weights, both on one seeded image."""

    def __init__(self, sam: Sam, ours, image: np.ndarray, full_forward: bool = True) -> None:
        self.sam, self.ours, self.image, self.full_forward = sam, ours, image, full_forward
        size = ours.architecture.image_size
        self.x, self.frame = prepare_image(image, Preprocessing("sam", size))
        self.transform = ResizeLongestSide(size)
        # segment_anything 1.0's apply_image_torch takes (B, C) as (H, W) (upstream issue
        # facebookresearch/segment-anything#218, fixed in RobustSAM's copy), so apply its intended resize here.
        chw = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        target = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], size)
        self.resized = F.interpolate(chw, target, mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            self.encoding = ours.encode(self.x, robust=False)
            self.sam_embeddings = sam.image_encoder(self.x)
        self.box_logits = None

    def reference(self, record: dict, multimask: bool) -> dict:
        """segment_anything's ``Sam.forward`` (tiny), or its body on the cached embeddings (ViT-B: no re-encoding)."""
        if self.full_forward:
            return self.sam([record], multimask_output=multimask)[0]
        sam = self.sam
        points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
        sparse, dense = sam.prompt_encoder(points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs"))
        logits, iou = sam.mask_decoder(image_embeddings=self.sam_embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=multimask)
        masks = sam.postprocess_masks(logits, record["image"].shape[-2:], record["original_size"]) > sam.mask_threshold
        return {"masks": masks, "iou_predictions": iou, "low_res_logits": logits}

    def run(self, case: str):
        coords, labels, use_box, use_mask, multimask = CASES[case]
        original = self.image.shape[:2]
        record = {"image": self.resized[0], "original_size": original}
        kw = {"multimask_output": multimask, "robust": False}
        if coords is not None:
            c = np.array([coords], dtype=np.float64)
            record["point_coords"] = self.transform.apply_coords_torch(torch.tensor(c), original).float()
            record["point_labels"] = torch.tensor([labels])
            kw["points"] = (torch.as_tensor(self.frame.points_to_model(c), dtype=torch.float32),
                            torch.tensor([labels]))
        if use_box:
            b = np.array([BOX], dtype=np.float64)
            record["boxes"] = self.transform.apply_boxes_torch(torch.tensor(b), original).float()
            kw["boxes"] = torch.as_tensor(self.frame.boxes_to_model(b), dtype=torch.float32)
        if use_mask:  # a previous pass: segment_anything's logits for the box
            record["mask_inputs"] = kw["mask_logits"] = self.box_logits
        with torch.no_grad():
            ref = self.reference(record, multimask)
            out = self.ours.decode(self.encoding, **kw)
            full = self.frame.logits_to_image(out.masks)
        if case == "box":
            self.box_logits = ref["low_res_logits"]
        return ref, out, full


@pytest.fixture(scope="module")
def tiny_pair() -> Pair:
    sam = _sam_tiny()
    seed_module(sam, 0)
    ours = build_model(dataclasses.replace(TINY, robust_decoder=False))
    ours.load_state_dict(sam.state_dict(), strict=True)
    return Pair(sam, ours, seeded_image(IMAGE_SHAPE, 5))


@pytest.fixture(scope="module")
def robust_pair() -> Pair:
    """Our robust-decoder model and segment_anything's Sam loaded with its SAM keys (strict)."""
    ours = build_model(TINY)
    seed_module(ours, 1)
    sam = _sam_tiny()
    state = ours.state_dict()
    sam.load_state_dict({k: state[k] for k in sam.state_dict()}, strict=True)
    return Pair(sam, ours, seeded_image(IMAGE_SHAPE, 6))


def test_tiny_preprocessing_equals_sam_resize_and_preprocess(tiny_pair):
    assert _max_diff(tiny_pair.x, tiny_pair.sam.preprocess(tiny_pair.resized)) < 1e-5
    assert tuple(tiny_pair.resized.shape[-2:]) == tiny_pair.frame.resized_size


@pytest.mark.parametrize("pair_name", ["tiny_pair", "robust_pair"])
def test_tiny_embeddings(pair_name, request):
    pair = request.getfixturevalue(pair_name)
    assert _max_diff(pair.encoding.embeddings, pair.sam_embeddings) < TOL


@pytest.mark.parametrize("pair_name", ["tiny_pair", "robust_pair"])
def test_tiny_prompts(pair_name, request):
    pair = request.getfixturevalue(pair_name)
    for case in CASES:  # in order: "box" feeds "mask_points"
        ref, out, full = pair.run(case)
        assert out.masks.shape == ref["low_res_logits"].shape, case
        assert _max_diff(out.masks, ref["low_res_logits"]) < TOL, case
        assert _max_diff(out.iou, ref["iou_predictions"]) < TOL, case
        _assert_binary(full, ref["masks"])


def test_tiny_batched_prompts(tiny_pair):
    """Two boxes in one call (segment_anything batches prompts of one image the same way)."""
    pair = tiny_pair
    original = pair.image.shape[:2]
    boxes = np.array([BOX, [20.0, 30.0, 200.0, 280.0]])
    record = {"image": pair.resized[0], "original_size": original,
              "boxes": pair.transform.apply_boxes_torch(torch.tensor(boxes), original).float()}
    with torch.no_grad():
        ref = pair.sam([record], multimask_output=False)[0]
        out = pair.ours.decode(pair.encoding, boxes=torch.as_tensor(pair.frame.boxes_to_model(boxes),
                                                                       dtype=torch.float32))
    assert _max_diff(out.masks, ref["low_res_logits"]) < TOL
    assert _max_diff(out.iou, ref["iou_predictions"]) < TOL


@pytest.fixture(scope="module")
def vit_b_pair() -> Pair:
    sam = sam_model_registry["vit_b"]().eval()
    seed_module(sam, 0)
    ours = build_model(VIT_B_SAM)
    ours.load_state_dict(sam.state_dict(), strict=True)
    return Pair(sam, ours, seeded_image((300, 400, 3), 0), full_forward=False)


@pytest.mark.slow
def test_vit_b_embeddings_and_box(vit_b_pair):
    """ViT-B: one encoder pass per model (~20 s each on 2 CPU cores)."""
    pair = vit_b_pair
    assert _max_diff(pair.encoding.embeddings, pair.sam_embeddings) < TOL
    ref, out, full = pair.run("box")
    assert _max_diff(out.masks, ref["low_res_logits"]) < TOL
    assert _max_diff(out.iou, ref["iou_predictions"]) < TOL
    _assert_binary(full, ref["masks"])
