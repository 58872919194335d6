"""Safe checkpoint loading, architecture detection, clear errors and module-wise fusion (real files)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from RobustMedSAMLib import checkpoints as ck
from RobustMedSAMLib.models import load_model
from RobustMedSAMLib.modeling import TINY, VIT_B, build_model
from RobustMedSAMLib.seeded import seed_module

TINY_SAM = dataclasses.replace(TINY, robust_decoder=False)


def _state(arch=TINY, seed=0):
    model = build_model(arch)
    seed_module(model, seed)
    return model.state_dict()


@pytest.fixture(scope="module")
def robust_state():
    return _state(TINY, 1)


@pytest.fixture(scope="module")
def sam_state():
    return _state(TINY_SAM, 2)


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["plain", "model_wrapper", "state_dict_wrapper", "ddp_prefix",
                                    "wrapped_ddp", "safetensors", "legacy_pickle"])
def test_accepted_layouts_load_identically(tmp_path, robust_state, layout):
    path = tmp_path / "ckpt.pth"
    prefixed = {f"module.{k}": v for k, v in robust_state.items()}
    if layout == "plain":
        torch.save(robust_state, path)
    elif layout == "model_wrapper":
        torch.save({"model": robust_state, "epoch": 3, "optimizer": {"lr": 1e-4}}, path)
    elif layout == "state_dict_wrapper":
        torch.save({"state_dict": robust_state}, path)
    elif layout == "ddp_prefix":
        torch.save(prefixed, path)
    elif layout == "wrapped_ddp":
        torch.save({"model": prefixed, "epoch": 1}, path)
    elif layout == "safetensors":
        path = ck.save_checkpoint(robust_state, tmp_path / "ckpt.safetensors", {"note": "x"})
    elif layout == "legacy_pickle":
        torch.save(robust_state, path, _use_new_zipfile_serialization=False)
    state, _ = ck.read_checkpoint(path)
    assert _equal(state, robust_state)
    assert ck.detect_architecture(state) == TINY


def test_detects_vit_b_and_decoder_kind():
    assert ck.detect_architecture(build_model(VIT_B).state_dict()) == VIT_B
    sam = ck.detect_architecture(build_model(dataclasses.replace(VIT_B, robust_decoder=False)).state_dict())
    assert sam.name == "vit_b" and not sam.robust_decoder


def _fake_vit(embed_dim, depth, global_idx):
    """Shapes of a SAM ViT-L/H encoder, without allocating real weights for everything."""
    state = {k: v for k, v in build_model(TINY).state_dict().items() if not k.startswith("image_encoder.")}
    state["image_encoder.patch_embed.proj.weight"] = torch.empty(embed_dim, 3, 16, 16)
    state["image_encoder.pos_embed"] = torch.empty(1, 64, 64, embed_dim)
    head = embed_dim // 16
    for i in range(depth):
        n = 127 if i in global_idx else 27
        state[f"image_encoder.blocks.{i}.attn.rel_pos_h"] = torch.empty(n, head)
    return state


@pytest.mark.parametrize("embed_dim,depth,glob,name", [(1024, 24, (5, 11, 17, 23), "ViT-L"),
                                                       (1280, 32, (7, 15, 23, 31), "ViT-H")])
def test_vit_l_and_h_are_named_in_the_error(embed_dim, depth, glob, name):
    with pytest.raises(ck.CheckpointError, match=name + ".*ViT-B"):
        ck.detect_architecture(_fake_vit(embed_dim, depth, glob), "big.pth")


@pytest.mark.parametrize("keys,message", [
    ({"vision_encoder.patch_embed.projection.weight": torch.zeros(1)}, "Hugging Face transformers"),
    ({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(1)}, "SAM 2"),
    ({"image_encoder.layers.0.blocks.0.attn.qkv.weight": torch.zeros(1)}, "TinyViT"),
    ({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, "lacks the prompt_encoder, mask_decoder"),
])
def test_other_architectures_are_recognised(keys, message):
    with pytest.raises(ck.CheckpointError, match=message):
        ck.detect_architecture(keys, "other.pth")


def test_not_a_checkpoint_errors(tmp_path, robust_state):
    cases = {
        "empty.pth": b"",
        "page.pth": b"<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>",
        "text.pth": b"hello, this is not a checkpoint at all",
    }
    expected = {"empty.pth": "empty", "page.pth": "web page", "text.pth": "not a PyTorch"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ck.CheckpointError, match=expected[name]) as err:
            ck.read_checkpoint(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.read_checkpoint(tmp_path / "missing.pth")


def test_truncated_file_is_reported(tmp_path, robust_state):
    full = tmp_path / "full.pth"
    torch.save(robust_state, full)
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 100):
        part = tmp_path / f"cut{cut}.pth"
        part.write_bytes(data[:cut])
        with pytest.raises(ck.CheckpointError, match="truncated or corrupt.*download it again"):
            ck.read_checkpoint(part)
    st = ck.save_checkpoint(robust_state, tmp_path / "a.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.read_checkpoint(cut)


def test_pickled_code_is_refused(tmp_path, robust_state):
    path = tmp_path / "with_namespace.pth"
    torch.save({"model": robust_state, "opt": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ck.CheckpointError, match="refuses to unpickle code"):
        ck.read_checkpoint(path)


def test_missing_unexpected_and_misshaped_keys_are_listed(robust_state):
    model = build_model(TINY)
    state = dict(robust_state)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(2)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 5)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_into(model, state, "bad.pth")
    text = str(err.value)
    assert "1 missing (e.g. mask_decoder.iou_token.weight)" in text
    assert "1 unexpected (e.g. mask_decoder.extra.weight)" in text
    assert "prompt_encoder.no_mask_embed.weight: file (1, 5) vs model (1, 64)" in text


def test_fusion_takes_encoders_from_one_file_and_decoder_from_the_other(tmp_path, robust_state, sam_state):
    enc = tmp_path / "medsam_like.pth"
    dec = tmp_path / "robustsam_like.pth"
    torch.save(sam_state, enc)
    torch.save({"model": {f"module.{k}": v for k, v in robust_state.items()}}, dec)
    out = ck.fuse_checkpoints(enc, dec, tmp_path / "fused.safetensors")
    fused, meta = ck.read_checkpoint(out)
    for k, v in fused.items():
        src = sam_state if k.startswith(("image_encoder.", "prompt_encoder.")) else robust_state
        assert torch.equal(v, src[k]), k
    assert len([k for k in fused if k.startswith("mask_decoder.")]) == len(
        [k for k in robust_state if k.startswith("mask_decoder.")])
    assert meta["encoder_source"] == enc.name and meta["decoder_source"] == dec.name
    assert meta["encoder_sha256"] == ck.sha256_of(enc) and meta["decoder_sha256"] == ck.sha256_of(dec)
    assert meta["preprocessing"] == "sam" and meta["decoder"] == "robust"
    loaded = load_model(checkpoint=out)
    assert loaded.config.robust and loaded.config.preprocessing.style == "sam"
    # the reverse pair has a plain SAM decoder
    rev = ck.fuse_checkpoints(dec, enc, tmp_path / "rev.safetensors", preprocessing="medsam")
    loaded = load_model(checkpoint=rev)
    assert not loaded.config.robust and loaded.config.preprocessing.style == "medsam"


def test_fusion_refuses_mismatched_sizes(tmp_path, sam_state):
    small = tmp_path / "small.pth"
    torch.save(sam_state, small)
    big = tmp_path / "big.pth"
    torch.save(build_model(VIT_B).state_dict(), big)
    with pytest.raises(ck.CheckpointError, match="different sizes"):
        ck.fuse_checkpoints(small, big, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_reports_groups_and_problems(tmp_path, robust_state):
    path = tmp_path / "r.pth"
    torch.save(robust_state, path)
    info = ck.inspect_checkpoint(path)
    json.dumps(info)
    assert info["architecture"] == "tiny" and info["decoder"].startswith("robust")
    assert info["groups"]["mask_decoder"]["tensors"] == len([k for k in robust_state if k.startswith("mask_")])
    assert info["sha256"] == ck.sha256_of(path)
    bad = tmp_path / "decoder_only.pth"
    torch.save({k: v for k, v in robust_state.items() if k.startswith("mask_decoder.")}, bad)
    info = ck.inspect_checkpoint(bad, with_sha256=False)
    assert info["architecture"] is None and "lacks the image_encoder, prompt_encoder" in info["problem"]


def test_load_model_checks_named_model_against_file(tmp_path, sam_state):
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam_state, path)
    with pytest.raises(ck.CheckpointError, match="does not fit model 'tiny'"):
        load_model("tiny", path)


def test_preprocessing_guess_for_plain_checkpoints(tmp_path, sam_state):
    for name, style in [("medsam_vit_b.pth", "medsam"), ("sam_vit_b.pth", "sam"), ("my_model.pth", "sam")]:
        torch.save(sam_state, tmp_path / name)
        assert load_model(checkpoint=tmp_path / name).config.preprocessing.style == style
    assert load_model(checkpoint=tmp_path / "my_model.pth", preprocessing="medsam").config.preprocessing.style \
        == "medsam"
