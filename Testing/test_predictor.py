"""Slice predictor: cache behaviour (bounded bytes, hits, fp16, disk), prompt handling, batching."""
from __future__ import annotations

import numpy as np
import pytest

from RobustMedSAMLib.predictor import EncodingCache, Predictor
from RobustMedSAMLib.prompts import Prompt, PromptError
from RobustMedSAMLib.seeded import seeded_image

IMG = seeded_image((120, 200), 0)
PROMPTS = [Prompt(box=[20, 30, 90, 100]), Prompt(points=[[50, 60]]), Prompt(box=[10, 10, 60, 50]),
           Prompt(points=[[50, 60], [150, 20]], labels=[1, 0]), Prompt(points=[[120, 70]], box=[100, 40, 180, 110])]


def test_cache_hits_avoid_reencoding(tiny_model):
    p = Predictor(tiny_model)
    for _ in range(3):
        p.predict(PROMPTS[0], image=IMG)
    assert p.encoder_calls == 1 and p.cache.hits >= 2
    p.predict(PROMPTS[0], image=IMG, context="axis=1")  # another context (e.g. slice axis) is another entry
    p.predict(PROMPTS[0], image=IMG[::-1].copy())  # other content
    assert p.encoder_calls == 3


def test_cache_is_bounded_in_bytes_lru(tiny_model):
    probe = Predictor(tiny_model)
    probe.encode(IMG)
    entry = probe.cache.bytes
    p = Predictor(tiny_model, EncodingCache(max_bytes=int(2.5 * entry)))
    images = [seeded_image((120, 200), s) for s in range(4)]
    for img in images[:3]:
        p.encode(img)
    assert len(p.cache) == 2 and p.cache.bytes <= p.cache.max_bytes
    p.encode(images[2])  # most recent: a hit
    assert p.encoder_calls == 3
    p.encode(images[0])  # evicted first (least recently used): re-encoded
    assert p.encoder_calls == 4
    fp16 = Predictor(tiny_model, EncodingCache(fp16=True))
    fp16.encode(IMG)
    assert fp16.cache.bytes == entry // 2


def test_fp16_storage_changes_masks_on_under_0_1_percent_of_pixels(tiny_model):
    full = Predictor(tiny_model)
    half = Predictor(tiny_model, EncodingCache(fp16=True))
    changed = total = 0
    for s in range(3):
        img = seeded_image((240, 320), 10 + s)
        for prompt in PROMPTS:
            a = full.predict(prompt, image=img).mask
            half.predict(prompt, image=img)  # first call encodes; the second reads the float16 copy
            b = half.predict(prompt, image=img).mask
            changed += int((a != b).sum())
            total += a.size
    assert half.cache.hits >= 15
    assert changed / total < 1e-3


def test_disk_cache_survives_a_new_session(tiny_model, tmp_path):
    first = Predictor(tiny_model, EncodingCache(disk_dir=tmp_path / "cache"))
    a = first.predict(PROMPTS[4], image=IMG)
    second = Predictor(tiny_model, EncodingCache(disk_dir=tmp_path / "cache"))
    b = second.predict(PROMPTS[4], image=IMG)
    assert second.encoder_calls == 0 and second.cache.disk_hits == 1
    np.testing.assert_array_equal(a.logits, b.logits)
    (next((tmp_path / "cache").glob("*.safetensors"))).write_bytes(b"garbage")
    third = Predictor(tiny_model, EncodingCache(disk_dir=tmp_path / "cache"))
    third.predict(PROMPTS[4], image=IMG)  # a damaged cache file is re-encoded, not an error
    assert third.encoder_calls == 1


def test_prefetch_encodes_in_background_once(tiny_model):
    p = Predictor(tiny_model)
    future = p.prefetch(IMG)
    assert p.prefetch(IMG) is future or future.done()
    future.result(timeout=60)
    p.predict(PROMPTS[0], image=IMG)
    assert p.encoder_calls == 1
    assert p.prefetch(IMG).done()
    p.close()


@pytest.mark.parametrize("multimask", [False, True])
def test_batch_equals_single_calls(tiny_model, multimask):
    p = Predictor(tiny_model)
    batch = p.predict_batch(PROMPTS + PROMPTS[:2], multimask=multimask, image=IMG)
    for prompt, b in zip(PROMPTS + PROMPTS[:2], batch):
        s = p.predict(prompt, multimask=multimask, image=IMG)
        assert b.masks.shape == (3 if multimask else 1, 120, 200)
        np.testing.assert_allclose(b.logits, s.logits, atol=1e-4)
        np.testing.assert_allclose(b.iou, s.iou, atol=1e-5)
    assert not np.allclose(batch[0].logits, batch[2].logits)


def test_multimask_best_and_refinement_with_logits(tiny_model):
    p = Predictor(tiny_model).set_image(IMG)
    pred = p.predict(PROMPTS[1], multimask=True)
    assert pred.best == int(np.argmax(pred.iou)) and pred.mask.shape == (120, 200)
    refined = p.predict(Prompt(points=[[50, 60]], logits=pred.low_res_logits[pred.best]))
    from_mask = p.predict(Prompt(points=[[50, 60]], mask=pred.mask))
    assert refined.masks.shape == (1, 120, 200) and from_mask.masks.shape == (1, 120, 200)
    assert not np.allclose(refined.logits, p.predict(PROMPTS[1]).logits)


def test_sam_path_of_robust_model_and_plain_model(tiny_model):
    robust = Predictor(tiny_model).predict(PROMPTS[0], image=IMG)
    sam = Predictor(tiny_model, robust=False).predict(PROMPTS[0], image=IMG)
    assert not np.allclose(robust.logits, sam.logits)
    from RobustMedSAMLib.models import seeded_model

    plain = seeded_model("tiny", robust_decoder=False)
    with pytest.raises(ValueError, match="RobustSAM decoder"):
        Predictor(plain, robust=True)
    assert Predictor(plain).predict(PROMPTS[0], image=IMG).masks.shape == (1, 120, 200)


@pytest.mark.parametrize("prompt,message", [
    (Prompt(), "no prompt"),
    (Prompt(points=[[200, 10]]), r"outside the image \(x in 0..199"),
    (Prompt(points=[[-1, 10]]), "outside the image"),
    (Prompt(box=[50, 50, 40, 80]), "empty or inverted"),
    (Prompt(box=[50, 50, 50, 80]), "empty or inverted"),
    (Prompt(box=[300, 10, 400, 50]), "outside the image"),
    (Prompt(points=[[5, 5]], labels=[2]), "labels must be 1"),
    (Prompt(mask=np.ones((10, 10))), "mask prompt has shape"),
])
def test_bad_prompts_are_refused_before_decoding(tiny_model, prompt, message):
    p = Predictor(tiny_model)
    with pytest.raises(PromptError, match=message):
        p.predict(prompt, image=IMG)
    assert p.encoder_calls == 0


def test_prompt_construction_errors():
    with pytest.raises(PromptError, match="2 points but 1 labels"):
        Prompt(points=[[1, 2], [3, 4]], labels=[1])
    with pytest.raises(PromptError, match="4 numbers"):
        Prompt(box=[1, 2, 3])


def test_batchnorm_mode_is_part_of_the_cache_key(tiny_model):
    p = Predictor(tiny_model)
    a = p.predict(PROMPTS[0], image=IMG)
    tiny_model.model.set_batchnorm_mode("per_sample")
    try:
        b = p.predict(PROMPTS[0], image=IMG)  # must not reuse features computed with running statistics
        assert p.encoder_calls == 2
        fresh = Predictor(tiny_model).predict(PROMPTS[0], image=IMG)
        np.testing.assert_allclose(b.logits, fresh.logits, atol=1e-5)
        assert not np.allclose(a.logits, b.logits, atol=1e-3)
    finally:
        tiny_model.model.set_batchnorm_mode("running")


def test_encode_many_batches_and_matches_single_encodings(tiny_model):
    images = [seeded_image((120, 200), s) for s in range(5)]
    batched = Predictor(tiny_model)
    assert batched.encode_many(images + images[:2], batch_size=3) == 5  # duplicates and cached ones skipped
    assert batched.encoder_calls == 5 and batched.encode_many(images) == 0
    single = Predictor(tiny_model)
    for img in images:
        a = batched.predict(PROMPTS[0], image=img)
        b = single.predict(PROMPTS[0], image=img)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    assert batched.encoder_calls == 5


def test_no_cache_entry_under_a_precision_that_changed_while_encoding(monkeypatch):
    """A CUDA out-of-memory fallback to the CPU relabels an autocast model fp32 during the encoding: what it
    returns must not be cached under the key made with the old precision, and later keys name fp32."""
    from RobustMedSAMLib import acceleration
    from RobustMedSAMLib.models import seeded_model

    loaded = seeded_model("tiny", precision="fp32")
    loaded.model.precision = "bf16"  # as labelled on a GPU (autocast); this CPU model computes float32
    p = Predictor(loaded)
    old_key = p.key(IMG)
    inner = acceleration.encode_batched

    def falls_back(model, *args, **kwargs):
        out = inner(model, *args, **kwargs)
        model.precision = "fp32"  # what _precision_after_cpu_fallback does after the move
        return out

    monkeypatch.setattr(acceleration, "encode_batched", falls_back)
    p.encode(IMG)
    assert old_key not in p.cache and len(p.cache) == 0
    monkeypatch.setattr(acceleration, "encode_batched", inner)
    assert p.key(IMG) != old_key
    p.encode(IMG)
    p.encode(IMG)
    assert p.key(IMG) in p.cache and p.encoder_calls == 2
