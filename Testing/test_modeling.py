"""Model structure (official key names/shapes), decoder semantics, batching and BatchNorm modes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from RobustMedSAMLib.modeling import TINY, VIT_B, build_model
from RobustMedSAMLib.modeling.model import ImageEncoding
from RobustMedSAMLib.modeling.robust_blocks import FeatureBlock, FGMBlock, SampleBatchNorm2d, Selector, TokenBlock
from RobustMedSAMLib.seeded import seed_module, seeded_array


@pytest.fixture(scope="module")
def vit_b_state():
    return build_model(VIT_B).state_dict()


def _groups(state):
    out = {}
    for k, v in state.items():
        g = k.split(".")[0]
        n, e = out.get(g, (0, 0))
        out[g] = (n + 1, e + v.numel())
    return out


def test_vit_b_robust_state_dict_matches_published_layout(vit_b_state):
    # Counts from the official RobustSAM model (shared/REFERENCE.md 1.4): 403 tensors.
    g = _groups(vit_b_state)
    assert g["image_encoder"] == (177, 89_670_912)
    assert g["prompt_encoder"][0] == 17
    assert g["mask_decoder"] == (209, 63_506_187)
    assert len(vit_b_state) == 403
    shapes = {
        "mask_decoder.custom_robust_token.weight": (4, 256),
        "mask_decoder.custom_token_block.mlp.0.weight": (64, 64),
        "mask_decoder.custom_token_block.mlp.2.weight": (256, 64),
        "mask_decoder.robust_mlp.layers.2.weight": (32, 256),
        "mask_decoder.fourier_first_layer_features.dnc_block_combined.SEMBlock.maxpool_conv.0.BN.running_mean": (768,),
        "mask_decoder.fourier_first_layer_features.dnc_block_combined.SEMBlock.maxpool_conv.0.selector.fc.0.weight":
            (768, 12288),
        "mask_decoder.fourier_first_layer_features.fgm_block.conv_layer.weight": (1536, 1536, 1, 1),
        "mask_decoder.fourier_first_layer_features.conv_layer.weight": (768, 1536, 3, 3),
        "mask_decoder.fourier_first_layer_features.upsample_layer.0.weight": (768, 256, 2, 2),
        "mask_decoder.fourier_last_layer_features.upsample_layer.3.weight": (256, 32, 2, 2),
        "mask_decoder.fourier_mask_features.downsample_layer.0.weight": (64, 32, 3, 3),
        "mask_decoder.fourier_mask_features.dnc_block_combined.channel_attention.excitation.0.weight": (4, 64),
    }
    for key, shape in shapes.items():
        assert tuple(vit_b_state[key].shape) == shape, key


def test_added_module_parameter_counts():
    dec = build_model(VIT_B).mask_decoder
    # state-dict element counts (parameters + BatchNorm buffers) per added module, from the official model
    params = {name: sum(t.numel() for t in getattr(dec, name).state_dict().values()) for name in
              ["custom_robust_token", "custom_token_block", "robust_mlp", "fourier_first_layer_features",
               "fourier_last_layer_features", "fourier_mask_features"]}
    assert params == {"custom_robust_token": 1_024, "custom_token_block": 20_800, "robust_mlp": 139_808,
                      "fourier_first_layer_features": 53_051_009, "fourier_last_layer_features": 6_106_177,
                      "fourier_mask_features": 129_029}


def test_plain_sam_keys_equal_segment_anything():
    from segment_anything import sam_model_registry

    ours = build_model(dataclasses.replace(VIT_B, robust_decoder=False)).state_dict()
    ref = sam_model_registry["vit_b"]().state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.fixture(scope="module")
def tiny():
    model = build_model(TINY)
    seed_module(model, 3)
    return model


def _encoding(model, seed=5):
    x = torch.from_numpy(seeded_array("input.image", (1, 3, 256, 256), seed)) * 30
    with torch.no_grad():
        return model.encode(x)


PROMPTS = [
    dict(points=(torch.tensor([[[100.0, 120.0]]]), torch.tensor([[1]]))),
    dict(points=(torch.tensor([[[40.0, 50.0], [200.0, 90.0]]]), torch.tensor([[1, 0]]))),
    dict(boxes=torch.tensor([[30.0, 40.0, 180.0, 200.0]])),
    dict(boxes=torch.tensor([[10.0, 20.0, 90.0, 100.0]]),
         points=(torch.tensor([[[50.0, 60.0]]]), torch.tensor([[1]]))),
]


@pytest.mark.parametrize("robust", [True, False])
@pytest.mark.parametrize("multimask", [True, False])
def test_batched_prompts_equal_one_at_a_time(tiny, robust, multimask):
    enc = _encoding(tiny)
    boxes = torch.tensor([[30.0, 40.0, 180.0, 200.0], [10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 255.0, 255.0]])
    with torch.no_grad():
        batched = tiny.decode(enc, boxes=boxes, multimask_output=multimask, robust=robust)
        singles = [tiny.decode(enc, boxes=boxes[i:i + 1], multimask_output=multimask, robust=robust)
                   for i in range(3)]
    c = 3 if multimask else 1
    assert batched.masks.shape == (3, c, 64, 64) and batched.iou.shape == (3, c)
    for i, s in enumerate(singles):
        torch.testing.assert_close(batched.masks[i:i + 1], s.masks, atol=1e-4, rtol=0)
        torch.testing.assert_close(batched.iou[i:i + 1], s.iou, atol=1e-5, rtol=0)
    # different prompts give different masks: the test would catch a broadcast of prompt 0
    assert (batched.masks[0] - batched.masks[1]).abs().max() > 1e-2


def test_robust_and_sam_paths_differ_and_single_mask_is_token_zero(tiny):
    enc = _encoding(tiny)
    with torch.no_grad():
        r1 = tiny.decode(enc, **PROMPTS[2], multimask_output=False, robust=True)
        r3 = tiny.decode(enc, **PROMPTS[2], multimask_output=True, robust=True)
        s1 = tiny.decode(enc, **PROMPTS[2], multimask_output=False, robust=False)
    assert (r1.masks - s1.masks).abs().max() > 1e-2
    assert not torch.allclose(r3.masks[:, :1], r1.masks)  # multimask = tokens 1..3, not token 0
    # The robust hypernetwork for token i is robust_mlp(token_block(token_i)): reproduce token 0 by hand.
    dec = tiny.mask_decoder
    with torch.no_grad():
        out = tiny.decode(enc, **PROMPTS[2], multimask_output=False, robust=True, return_features=True)
        hyper = dec.robust_mlp(dec.custom_token_block(out.tokens[:, 0]))
        manual = (hyper[:, None] @ out.mask_features.flatten(2)).view_as(r1.masks)
    torch.testing.assert_close(manual, r1.masks, atol=1e-4, rtol=0)


def test_token_block_equals_official_reshape_formula():
    block = TokenBlock(num_chunks=4, chunk_dim=64)
    seed_module(block, 1)
    token = torch.from_numpy(seeded_array("t", (1, 256), 2)) * 3
    norm = torch.nn.InstanceNorm1d(4)  # the official layer, fed a (1, 256) tensor
    with torch.no_grad(), pytest.warns(UserWarning):
        x = norm(norm(token)).view(4, -1)
        official = block.mlp(x)[0]
        ours = block(token)[0]
    torch.testing.assert_close(ours, official)


def test_fgm_block_with_identity_conv_is_identity():
    block = FGMBlock(3)
    with torch.no_grad():
        block.conv_layer.weight.copy_(torch.eye(6).view(6, 6, 1, 1))
        block.conv_layer.bias.zero_()
        x = torch.randn(2, 6, 16, 16)
        torch.testing.assert_close(block(x), x, atol=1e-5, rtol=0)
        block.conv_layer.weight.mul_(2.0)
        torch.testing.assert_close(block(x), 2 * x, atol=1e-5, rtol=0)


def test_batchnorm_modes():
    bn = SampleBatchNorm2d(4)
    seed_module(bn, 0)
    x = torch.randn(3, 4, 8, 8) * 2 + 1
    bn.eval()
    with torch.no_grad():
        running = bn(x)
        torch.testing.assert_close(running, torch.nn.functional.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
        bn.mode = "per_sample"
        per_sample = bn(x)
        # per-sample statistics: each sample equals a batch-of-one training-mode BatchNorm
        ref = torch.nn.BatchNorm2d(4)
        ref.load_state_dict(bn.state_dict())
        ref.train()
        for b in range(3):
            torch.testing.assert_close(per_sample[b:b + 1], ref(x[b:b + 1]), atol=1e-5, rtol=0)
    assert (running - per_sample).abs().max() > 0.1


def test_training_batchnorm_updates_like_sequential_official_calls():
    bn = SampleBatchNorm2d(4)
    seed_module(bn, 0)
    ref = torch.nn.BatchNorm2d(4)
    ref.load_state_dict(bn.state_dict())
    bn.train()
    ref.train()
    x = torch.randn(3, 4, 8, 8)
    out = bn(x)
    ref_out = torch.cat([ref(x[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_model_batchnorm_mode_changes_robust_output_only(tiny):
    enc = _encoding(tiny)
    with torch.no_grad():
        tiny.set_batchnorm_mode("running")
        a = tiny.encode(torch.from_numpy(seeded_array("input.image", (1, 3, 256, 256), 5)) * 30)
        ra = tiny.decode(a, **PROMPTS[2], robust=True).masks
        sa = tiny.decode(a, **PROMPTS[2], robust=False).masks
        tiny.set_batchnorm_mode("per_sample")
        b = tiny.encode(torch.from_numpy(seeded_array("input.image", (1, 3, 256, 256), 5)) * 30)
        rb = tiny.decode(b, **PROMPTS[2], robust=True).masks
        sb = tiny.decode(b, **PROMPTS[2], robust=False).masks
        tiny.set_batchnorm_mode("running")
    assert (ra - rb).abs().max() > 1e-3
    torch.testing.assert_close(sa, sb)
    assert enc.features is not None


def test_encoder_early_features_are_first_global_block_output(tiny):
    x = torch.from_numpy(seeded_array("input.image", (1, 3, 256, 256), 1))
    captured = {}
    handle = tiny.image_encoder.blocks[TINY.global_attn_indexes[0]].register_forward_hook(
        lambda m, i, o: captured.setdefault("out", o))
    try:
        with torch.no_grad():
            emb, early = tiny.image_encoder(x)
    finally:
        handle.remove()
    assert early.shape == (1, 16, 16, TINY.embed_dim) and emb.shape == (1, TINY.prompt_dim, 16, 16)
    torch.testing.assert_close(early, captured["out"])


def test_decoder_accepts_one_image_per_prompt(tiny):
    x = torch.from_numpy(np.stack([seeded_array("input.image", (3, 256, 256), s) for s in (1, 2)])) * 30
    boxes = torch.tensor([[30.0, 40.0, 180.0, 200.0], [10.0, 20.0, 90.0, 100.0]])
    with torch.no_grad():
        both = tiny.encode(x)
        out = tiny.decode(both, boxes=boxes, robust=True)
        for i in range(2):
            single = ImageEncoding(both.embeddings[i:i + 1], both.early[i:i + 1], both.features[i:i + 1])
            torch.testing.assert_close(out.masks[i:i + 1], tiny.decode(single, boxes=boxes[i:i + 1]).masks,
                                       atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="does not match prompt batch"):
        tiny.decode(both, boxes=torch.zeros(3, 4) + 10)


@pytest.mark.parametrize("shape", [(2, 16, 16, 24), (1, 16, 10, 14)])
def test_selector_mix_equals_upsampled_attention(shape):
    """The block-broadcast mix (4 | H, W) and the fallback equal RobustSAM's nearest-upsampled attention."""
    sel = Selector(shape[1])
    seed_module(sel, 3)
    gen = torch.Generator().manual_seed(0)
    x, a, b = (torch.randn(*shape, generator=gen) for _ in range(3))
    att1, att2 = sel(x)
    assert att1.shape == shape and torch.allclose(att1 + att2, torch.ones(shape))
    assert torch.equal(sel.mix(x, a, b), a * att1 + b * att2)
    a.requires_grad_(True)
    sel.mix(x, a, b).sum().backward()  # differentiable (training uses it)
    assert torch.equal(a.grad, att1.detach())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("robust", [True, False])
def test_projected_mask_features_equal_projecting_the_full_features(k, robust):
    """The folded last conv (tap GEMM + shifted adds) equals ``hyper @ forward(x)`` per pixel."""
    block = FeatureBlock(8, 64, "downsample")
    seed_module(block, 4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 12, 20, generator=gen)
    hyper = torch.randn(2, k, 8, generator=gen)
    with torch.no_grad():
        full = torch.einsum("bkc,bchw->bkhw", hyper, block(x, robust=robust))
        folded = block.projected(x, hyper, robust=robust)
    assert folded.shape == (2, k, 12, 20)
    torch.testing.assert_close(folded, full, atol=1e-5, rtol=1e-5)
    assert full.abs().max() > 0.1 and full[:, :, 0].abs().max() > 0.1  # border pixels are not all zero
