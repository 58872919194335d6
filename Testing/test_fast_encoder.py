"""The CPU fast path of the image encoder computes what segment_anything's eager encoder computes.

Tiny configurations (several window / padding / head layouts, both attention kernels, small chunks so every
chunking loop runs more than once) are compared with the reference path and with segment_anything's own
``ImageEncoderViT`` holding the same weights. One ViT-B comparison (module-scoped: one fast pass + one
segment_anything pass) checks embeddings, early features and the robust decoder's masks.
"""
from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch

from segment_anything.modeling import ImageEncoderViT

from RobustMedSAMLib.modeling import TINY, VIT_B, build_model
from RobustMedSAMLib.modeling import image_encoder as ie
from RobustMedSAMLib.modeling.image_encoder import FastPathOptions, ImageEncoder
from RobustMedSAMLib.seeded import seed_module, seeded_array

TOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run hundreds of microsecond-sized ops; with 2 OpenMP threads on a loaded machine each
    one can wait milliseconds for a descheduled thread. ViT-B tests keep PyTorch's thread count."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

ARCHS = {
    "tiny": TINY,                                                   # 16 x 16 grid, windows of 4: no padding
    "pad5": dataclasses.replace(TINY, window_size=5, depth=3, global_attn_indexes=(1,)),   # padded windows
    "pad3_4heads": dataclasses.replace(TINY, window_size=3, num_heads=4, global_attn_indexes=(0, 3)),
}


def _kwargs(arch, **over):
    kw = dict(depth=arch.depth, embed_dim=arch.embed_dim, img_size=arch.image_size, mlp_ratio=4,
              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=arch.num_heads,
              patch_size=arch.patch_size, qkv_bias=True, use_rel_pos=True,
              global_attn_indexes=arch.global_attn_indexes, window_size=arch.window_size, out_chans=arch.prompt_dim)
    kw.update(over)
    return kw


def _pair(arch, seed=0, **over):
    """(ours, segment_anything's) encoders with the same seeded weights."""
    ours = ImageEncoder(**_kwargs(arch, **over)).eval()
    seed_module(ours, seed, prefix="image_encoder.")
    ref = ImageEncoderViT(**_kwargs(arch, **over)).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _ref_forward(ref: ImageEncoderViT, early_block: int, x: torch.Tensor):
    got = {}
    h = ref.blocks[early_block].register_forward_hook(lambda m, i, o: got.setdefault("early", o))
    try:
        emb = ref(x)
    finally:
        h.remove()
    return emb, got["early"]


def _image(arch, batch=1, seed=1, scale=1.0):
    s = arch.image_size
    return torch.from_numpy(seeded_array("input.image", (batch, 3, s, s), seed)) * scale


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
@pytest.mark.parametrize("chunks", ["default", "small"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_fast_path_equals_segment_anything(name, chunks, attention):
    if attention == "sdpa" and not ie.SDPA_FUSED:
        pytest.skip("attention='sdpa' needs PyTorch >= 2.2")
    arch = ARCHS[name]
    ours, ref = _pair(arch)
    if chunks == "small":  # one query row / window row per chunk, MLP chunks that do not divide the tokens
        ours.fast_options = FastPathOptions(attention=attention, chunk_bytes=1, mlp_tokens=37)
    else:
        ours.fast_options = FastPathOptions(attention=attention)
    x = _image(arch, batch=2, scale=2.0)
    with torch.no_grad():
        assert ours.path_for(x) == "fast"
        emb, early = ours(x)
        ref_emb, ref_early = _ref_forward(ref, ours.early_block, x)
        emb_slow, early_slow = ours.forward_reference(x)
    assert _max_diff(emb, ref_emb) <= TOL and _max_diff(early, ref_early) <= TOL
    # the reference path of our class is segment_anything's computation, to the bit
    assert torch.equal(emb_slow, ref_emb) and torch.equal(early_slow, ref_early)


def test_every_block_kind_is_exercised():
    """The parametrised architectures contain global blocks, unpadded windows and padded windows."""
    kinds = set()
    for arch in ARCHS.values():
        grid = arch.image_size // arch.patch_size
        for i in range(arch.depth):
            if i in arch.global_attn_indexes:
                kinds.add("global")
            else:
                kinds.add("padded" if grid % arch.window_size else "unpadded")
    assert kinds == {"global", "padded", "unpadded"}


def test_no_qkv_bias_no_rel_pos_with_padding():
    arch = ARCHS["pad5"]
    for over in ({"qkv_bias": False}, {"use_rel_pos": False}, {"qkv_bias": False, "use_rel_pos": False}):
        ours, ref = _pair(arch, **over)
        ours.fast_options = FastPathOptions(chunk_bytes=1)
        x = _image(arch, seed=4)
        with torch.no_grad():
            emb, early = ours.forward_fast(x)
            ref_emb, ref_early = _ref_forward(ref, ours.early_block, x)
        assert _max_diff(emb, ref_emb) <= TOL and _max_diff(early, ref_early) <= TOL, over


def test_batch_items_are_independent():
    arch = ARCHS["pad5"]
    ours, _ = _pair(arch)
    x = _image(arch, batch=3, seed=5)
    with torch.no_grad():
        emb, early = ours(x)
        for i in range(3):
            e1, f1 = ours(x[i:i + 1])
            assert _max_diff(emb[i:i + 1], e1) <= 1e-5 and _max_diff(early[i:i + 1], f1) <= 1e-5


def test_odd_inputs_channels_last_and_non_contiguous():
    arch = ARCHS["pad3_4heads"]
    ours, ref = _pair(arch)
    x = _image(arch, batch=2, seed=6)
    with torch.no_grad():
        ref_emb, ref_early = _ref_forward(ref, ours.early_block, x)
        variants = {
            "channels_last": x.contiguous(memory_format=torch.channels_last),
            "transposed_back": x.transpose(2, 3).contiguous().transpose(2, 3),
            "strided_batch": torch.stack([x, x], 1).flatten(0, 1)[::2],
            "column_slice": torch.cat([x, torch.zeros_like(x)], 3)[..., :arch.image_size],
        }
        for name, xv in variants.items():
            assert not xv.is_contiguous(), name
            emb, early = ours(xv)
            assert ours.path_for(xv) == "fast"
            assert _max_diff(emb, ref_emb) <= TOL and _max_diff(early, ref_early) <= TOL, name


def _poison_fast(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fast path used")
    monkeypatch.setattr(ie, "fast_block", boom)


def test_default_is_fast_on_cpu_and_switches_go_to_reference(monkeypatch):
    ours, _ = _pair(TINY)
    x = _image(TINY)
    with torch.no_grad():
        assert ours.fast_path is None and ours.path_for(x) == "fast"
        _poison_fast(monkeypatch)
        with pytest.raises(AssertionError, match="fast path used"):
            ours(x)
        ours.fast_path = False
        assert ours.path_for(x) == "reference"
        ours(x)  # no AssertionError: the reference blocks ran
        ours.fast_path = True
        assert ours.path_for(x) == "fast"
        monkeypatch.setenv(ie.ENV_SWITCH, "reference")
        assert ours.path_for(x) == "reference"
        ours(x)


def test_reference_when_gradients_hooks_or_autocast(monkeypatch):
    ours, ref = _pair(TINY)
    x = _image(TINY)
    # gradients needed (parameters require grad, grad mode on): differentiable reference path
    assert ours.path_for(x) == "reference"
    emb, early = ours(x)
    emb.sum().backward()
    assert ours.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():
        assert ours.path_for(x) == "fast"
        handle = ours.blocks[1].mlp.register_forward_hook(lambda m, i, o: o * 0)  # adapters use such hooks
        try:
            assert ours.path_for(x) == "reference"
            hooked, _ = ours(x)
        finally:
            handle.remove()
        assert _max_diff(hooked, ours(x)[0]) > 1e-3  # the hook took effect
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours.path_for(x) == "reference"
        assert ours.path_for(x.double()) == "reference"


def test_model_encode_uses_fast_path_and_parameter_names_unchanged():
    model = build_model(TINY)
    seed_module(model)
    names = [k for k in model.state_dict() if k.startswith("image_encoder.")]
    assert names == ["image_encoder." + k for k in ImageEncoderViT(**_kwargs(TINY)).state_dict()]
    x = _image(TINY)
    with torch.inference_mode():
        assert model.image_encoder.path_for(x) == "fast"
        fast = model.encode(x)
        model.image_encoder.fast_path = False
        slow = model.encode(x)
    assert _max_diff(fast.embeddings, slow.embeddings) <= TOL
    assert _max_diff(fast.features, slow.features) <= 10 * TOL


def test_options_are_validated():
    with pytest.raises(ValueError):
        FastPathOptions(attention="flash")
    with pytest.raises(ValueError):
        FastPathOptions(chunk_bytes=0)


# -------------------------------------------------------------------------------------------------------
# ViT-B: one fast pass and one segment_anything pass
# -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b_outputs():
    from RobustMedSAMLib.models import seeded_model
    from RobustMedSAMLib.preprocess import Preprocessing, prepare_image
    from RobustMedSAMLib.seeded import seeded_image

    loaded = seeded_model("robustmedsam")
    model = loaded.model
    ref = ImageEncoderViT(**_kwargs(VIT_B)).eval()
    ref.load_state_dict(model.image_encoder.state_dict())
    x, _ = prepare_image(seeded_image((300, 380, 3), seed=2), Preprocessing("sam"))
    with torch.inference_mode():
        assert model.image_encoder.path_for(x) == "fast"
        fast = model.encode(x)
        ref_emb, ref_early = _ref_forward(ref, model.image_encoder.early_block, x)
    del ref
    return model, fast, ref_emb, ref_early


@pytest.mark.slow
def test_vit_b_fast_path_matches_segment_anything(vit_b_outputs):
    _, fast, ref_emb, ref_early = vit_b_outputs
    assert _max_diff(fast.embeddings, ref_emb) <= TOL
    assert _max_diff(fast.early, ref_early) <= TOL


@pytest.mark.slow
def test_vit_b_masks_identical(vit_b_outputs):
    """Robust and SAM decoder paths give the same masks from both encodings (float32 noise can only flip
    a pixel whose logit is within 1e-4 of zero: 1 of 393,216 on this input)."""
    from RobustMedSAMLib.modeling.model import ImageEncoding

    model, fast, ref_emb, ref_early = vit_b_outputs
    boxes = torch.tensor([[200.0, 150.0, 700.0, 600.0], [100.0, 100.0, 400.0, 500.0]])
    points = (torch.tensor([[[450.0, 380.0], [300.0, 250.0]]]).repeat(2, 1, 1), torch.tensor([[1, 0], [1, 1]]))
    with torch.inference_mode():
        ref_enc = ImageEncoding(ref_emb, ref_early, model.mask_decoder.image_features(ref_emb, ref_early))
        for robust in (True, False):
            a = model.decode(fast, boxes=boxes, points=points, multimask_output=True, robust=robust).masks
            b = model.decode(ref_enc, boxes=boxes, points=points, multimask_output=True, robust=robust).masks
            assert _max_diff(a, b) < 1e-3
            # same masks: a pixel may only flip where the reference logit is float noise away from 0
            differ = (a > 0) != (b > 0)
            assert not bool((differ & (b.abs() > TOL)).any()), int(differ.sum())
            assert int(differ.sum()) <= 4
