"""The precision choice (``auto`` with the CPU check and the probe forced both ways, gates, CUDA rules, the
cached probe) and the pieces of the CPU bf16 path (split weights, extended attention, bf16 convolutions,
weight copies that follow parameter changes), on the tiny model."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from RobustMedSAMLib import precision as P
from RobustMedSAMLib.modeling import bf16, encoder_bf16
from RobustMedSAMLib.models import seeded_model
from RobustMedSAMLib.seeded import seeded_array, seeded_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _never():
    raise AssertionError("the probe must not run here")


def _gain(g):
    return lambda: {"fp32": 1e11, "bf16": g * 1e11, "gain": g}


# ------------------------------------------------------------------------------------------- choice
def test_auto_keeps_fp32_on_a_cpu_without_native_bf16():
    choice = P.choose_precision("auto", "tiny", "cpu", probe_fn=_never, native_fn=lambda: "")
    assert choice.precision == "fp32" and "natively" in choice.reason


@pytest.mark.parametrize("gain, expected", [(6.0, "bf16"), (1.2, "fp32")])
def test_auto_with_native_bf16_follows_the_probe(gain, expected):
    choice = P.choose_precision("auto", "tiny", "cpu", probe_fn=_gain(gain), native_fn=lambda: "AMX-BF16")
    assert choice.precision == expected and f"{gain:.1f}x" in choice.reason


@pytest.mark.parametrize("model", [None, "my-finetuned-checkpoint"])
def test_auto_keeps_fp32_for_models_without_a_measured_gate(model):
    choice = P.choose_precision("auto", model, "cpu", probe_fn=_never, native_fn=lambda: "AMX-BF16")
    assert choice.precision == "fp32" and "no measured bf16 agreement gate" in choice.reason


def test_auto_keeps_fp32_where_a_gate_does_not_hold(monkeypatch):
    monkeypatch.setitem(P.GATES, "tiny", P.Gate("mask pixels differing", 0.005, 0.02, "test"))
    choice = P.choose_precision("auto", "tiny", "cpu", probe_fn=_never, native_fn=lambda: "AMX-BF16")
    assert choice.precision == "fp32" and "does not hold" in choice.reason
    monkeypatch.setitem(P.GATES, "tiny", P.Gate("mask pixels differing", 0.005, None, "not measured yet"))
    assert P.choose_precision("auto", "tiny", "cpu", _never, lambda: "AMX-BF16").precision == "fp32"


def test_adding_a_measured_gate_is_one_line(monkeypatch):
    """A model gets bf16 under auto as soon as its measured gate is in the table (e.g. LiteMedSAM's field
    evaluation: per-structure Dice change <= 0.01)."""
    native = lambda: "AVX512-BF16"  # noqa: E731
    assert P.choose_precision("auto", "litemedsam", "cpu", _never, native).precision == "fp32"
    monkeypatch.setitem(P.GATES, "litemedsam", P.Gate("max per-structure Dice change, sample CT", 0.01, 0.004,
                                                      "field evaluation"))
    assert P.choose_precision("auto", "litemedsam", "cpu", _gain(3.0), native).precision == "bf16"


def test_forced_and_default_precisions(caplog):
    assert P.choose_precision("fp32", "tiny", "cpu", _never, lambda: "AMX-BF16").precision == "fp32"
    assert P.choose_precision(None, "tiny", "cpu", _never, lambda: "AMX-BF16").precision == "fp32"
    with caplog.at_level(logging.WARNING, logger="RobustMedSAMLib.precision"):
        forced = P.choose_precision("bf16", None, "cpu", _never, lambda: "")
    assert forced.precision == "bf16" and "slower" in caplog.text
    for bad in ("half", "fp16", "int8"):
        with pytest.raises(ValueError, match="unknown precision"):
            P.choose_precision(bad, "tiny", "cpu")
    assert P.check("BFloat16") == "bf16" and P.check("float32") == "fp32"


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_cuda_rules(monkeypatch, bf16_supported):
    """On CUDA, auto and the library default keep the engine's autocast (bf16 where supported, else fp16)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0) if bf16_supported else (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # also where only emulated
    amp = "bf16" if bf16_supported else "fp16"
    assert P.choose_precision("auto", None, "cuda", _never).precision == amp
    assert P.choose_precision(None, None, "cuda:0", _never).precision == amp
    assert P.choose_precision("fp32", "tiny", "cuda", _never).precision == "fp32"
    if bf16_supported:
        assert P.choose_precision("bf16", None, "cuda", _never).precision == "bf16"
    else:
        with pytest.raises(ValueError, match="does not support bfloat16"):
            P.choose_precision("bf16", None, "cuda", _never)


def test_model_autocast_follows_the_precision():
    from RobustMedSAMLib.acceleration import model_autocast

    model = seeded_model("tiny").model
    assert model_autocast(model) == (False, None)  # set to fp32 by seeded_model
    model.precision = "bf16"
    assert model_autocast(model) == (True, torch.bfloat16)
    model.precision = "fp16"
    assert model_autocast(model) == (True, torch.float16)
    model.precision = None  # a model never set up (build_model): the engine's default autocast
    assert model_autocast(model) == (True, None)
    assert model_autocast(object()) == (True, None)


# -------------------------------------------------------------------------------------------- probe
def test_probe_is_measured_once_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return {"fp32": 1e11, "bf16": 4e11, "gain": 4.0}

    first = P.probe(measure=measure)
    second = P.probe(measure=measure)
    assert len(calls) == 1 and first["gain"] == second["gain"] == 4.0
    assert first["cached"] is False and second["cached"] is True
    saved = json.loads((tmp_path / P.PROBE_FILE).read_text())["entries"]
    assert list(saved) == [P.probe_key()] and "torch" in P.probe_key() and "bf16=" in P.probe_key()
    monkeypatch.setattr(P, "probe_key", lambda: "another CPU|bf16=none|torch 0|threads 1")  # another machine
    P.probe(measure=measure)
    assert len(calls) == 2 and len(json.loads((tmp_path / P.PROBE_FILE).read_text())["entries"]) == 2
    (tmp_path / P.PROBE_FILE).write_text("{not json")  # a damaged file is measured again
    assert P.probe(measure=measure)["cached"] is False and len(calls) == 3


@pytest.mark.parametrize("entry", [{"fp32": 1e11, "bf16": 4e11, "gain": "fast"}, {"fp32": 1e11, "bf16": 4e11,
                                   "gain": None}, {"fp32": 1e11, "bf16": 4e11, "gain": float("nan")}, {"gain": 4.0},
                                   [4.0], "4x"], ids=["text", "null", "nan", "no-rates", "list", "string"])
def test_a_damaged_probe_entry_is_measured_again(tmp_path, monkeypatch, entry):
    """A cached entry that is not finite positive numbers neither crashes the choice nor picks bf16."""
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE", str(tmp_path))
    (tmp_path / P.PROBE_FILE).write_text(json.dumps({"version": 1, "entries": {P.probe_key(): entry}}))
    measured = P.probe(measure=lambda: {"fp32": 1e11, "bf16": 1.1e11, "gain": 1.1})
    assert measured["cached"] is False and measured["gain"] == 1.1
    assert P.probe(measure=_never)["gain"] == 1.1  # the good measurement replaced the damaged entry
    choice = P.choose_precision("auto", "tiny", "cpu", probe_fn=P.probe, native_fn=lambda: "AMX-BF16")
    assert choice.precision == "fp32"
    nan = P.choose_precision("auto", "tiny", "cpu", probe_fn=_gain(float("nan")), native_fn=lambda: "AMX-BF16")
    assert nan.precision == "fp32"


def test_an_unusable_probe_cache_costs_only_a_measurement(tmp_path, monkeypatch, caplog):
    """The cache file's place taken by a folder (unreadable and unwritable as a file): measured each time,
    a warning, no crash, no temporary files left behind."""
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE", str(tmp_path))
    (tmp_path / P.PROBE_FILE).mkdir()
    calls = []
    measure = lambda: calls.append(1) or {"fp32": 1e11, "bf16": 4e11, "gain": 4.0}  # noqa: E731
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.probe(measure=measure)["gain"] == 4.0 and P.probe(measure=measure)["cached"] is False
    assert len(calls) == 2 and "could not save the bf16 probe" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [P.PROBE_FILE]


def test_probe_key_follows_what_changes_the_bf16_kernels(tmp_path, monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 on an AMX CPU (0.1x float32 measured): a probe cached
    without it must not be reused with it, nor with another thread count or oneDNN switched off."""
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE", str(tmp_path))
    for name in P.DISPATCH_ENV:
        monkeypatch.delenv(name, raising=False)
    gains = iter([4.0, 0.1, 0.1, 3.0, 2.0])
    measure = lambda: (lambda g: {"fp32": 1e11, "bf16": g * 1e11, "gain": g})(next(gains))  # noqa: E731
    keys = [P.probe_key()]
    assert P.probe(measure=measure)["gain"] == 4.0
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    keys.append(P.probe_key())
    assert P.probe(measure=measure)["gain"] == 0.1  # measured again, not the cached 4.0
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    keys.append(P.probe_key())
    assert P.probe(measure=measure)["cached"] is False
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    keys.append(P.probe_key())
    assert P.probe(measure=measure)["cached"] is False
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        keys.append(P.probe_key())
        assert P.probe(measure=measure)["cached"] is False
    finally:
        torch.set_num_threads(before)
    assert len(set(keys)) == 5 and P.probe_key() == keys[0] and P.probe(measure=measure)["gain"] == 4.0


def test_real_probe_on_this_machine():
    native = P.native_bf16()
    if not native:
        pytest.skip("no native bf16: the probe is never run here (bf16 GEMMs would be emulated, ~12x slower)")
    rates = P.measure_gemm_gain()
    assert rates["fp32"] > 1e9 and rates["bf16"] > 1e9 and rates["gain"] == pytest.approx(rates["bf16"] / rates["fp32"])


# ---------------------------------------------------------------------------------- loading, caching
def _force_native(monkeypatch, gain=6.0):
    monkeypatch.setattr(P, "native_bf16", lambda: "AMX-BF16")
    monkeypatch.setattr(P, "probe", _gain(gain))


def test_seeded_model_auto_sets_bf16_where_it_pays(monkeypatch):
    _force_native(monkeypatch)
    loaded = seeded_model("tiny", precision="auto")
    assert loaded.precision == "bf16" and "gate of tiny holds" in loaded.precision_reason
    x = torch.zeros(1, 3, 256, 256)
    with torch.inference_mode():
        assert loaded.model.image_encoder.path_for(x) == "fast-bf16"
    assert loaded.model.image_encoder.path_for(x) == "reference"  # gradients wanted: never the bf16 path
    plain, split = P.bf16_decoder_modules(loaded.model)
    convs = [m for m in plain + split if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(m.bf16 for m in convs) and {m.bf16 for m in split if hasattr(m, "bf16")} == {"split"}
    mask_block = loaded.model.mask_decoder.fourier_mask_features  # per-prompt block: float32 (bf16 did not pay)
    assert not any(getattr(m, "bf16", False) for m in mask_block.modules())
    _force_native(monkeypatch, gain=1.1)
    assert seeded_model("tiny", precision="auto").precision == "fp32"


def test_load_model_precision(tmp_path, monkeypatch):
    from RobustMedSAMLib.models import load_model

    _force_native(monkeypatch)
    path = tmp_path / "tiny.pth"
    torch.save(seeded_model("tiny").model.state_dict(), path)
    assert load_model(checkpoint=path).precision == "fp32"  # library default: as before
    assert load_model(checkpoint=path, precision="auto").precision == "fp32"  # unnamed checkpoint: no gate
    assert load_model("tiny", path, precision="auto").precision == "bf16"  # the named, gated configuration
    assert load_model(checkpoint=path, precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        load_model("robustmedsam", precision="half", allow_download=False)  # fails before looking for weights


def test_bf16_predictions_agree_and_are_cached_apart(monkeypatch):
    from RobustMedSAMLib.predictor import EncodingCache, Predictor
    from RobustMedSAMLib.prompts import Prompt

    image = seeded_image((200, 240, 3), 2)
    prompt = Prompt(box=[40, 50, 190, 170])
    cache = EncodingCache()
    fp32 = Predictor(seeded_model("tiny", precision="fp32"), cache)
    low = Predictor(seeded_model("tiny", precision="bf16"), cache)
    assert fp32.key(image) != low.key(image)  # one cache, two precisions: never mixed up
    a, b = fp32.predict(prompt, image=image), low.predict(prompt, image=image)
    assert len(cache) == 2 and fp32.encoder_calls == low.encoder_calls == 1
    assert float((a.masks != b.masks).mean()) <= 0.005  # the gate's measure
    assert not np.array_equal(a.logits, b.logits)  # bf16 really ran


def test_fp32_cache_keys_are_unchanged():
    """float32 keys are what they were before precision existed (disk caches stay valid)."""
    from RobustMedSAMLib.predictor import Predictor, image_key

    loaded = seeded_model("tiny")
    pred = Predictor(loaded)
    image = seeded_image((64, 64), 1)
    old = image_key(image, f"{loaded.signature}|robust={pred.robust}|bn={loaded.model.batchnorm_mode}|ctx")
    assert pred.key(image, "ctx") == old


def test_switching_back_to_fp32_restores_exact_outputs():
    base = seeded_model("tiny").model
    model = seeded_model("tiny").model
    x = torch.from_numpy(seeded_array("input.image", (1, 3, 256, 256), 3)) * 2
    with torch.inference_mode():
        ref = base.encode(x)
        P.set_precision(model, "bf16")
        low = model.encode(x)
        P.set_precision(model, "fp32")
        back = model.encode(x)
    assert not torch.equal(low.embeddings, ref.embeddings)
    for name in ("embeddings", "early", "features"):
        assert torch.equal(getattr(back, name), getattr(ref, name)), name
    assert not any("_bf16_pack" in m.__dict__ or "_bf16_split" in m.__dict__ for m in model.modules())


def test_bf16_weight_copies_follow_parameter_changes():
    """A checkpoint loaded after switching to bf16 is used (the cached bf16 copies are rebuilt)."""
    model = seeded_model("tiny", precision="bf16").model
    other = seeded_model("tiny", seed=5, precision="bf16").model
    x = torch.from_numpy(seeded_array("input.image", (1, 3, 256, 256), 3)) * 2
    with torch.inference_mode():
        model.encode(x)  # builds the bf16 copies of seed 0
        model.load_state_dict(other.state_dict())
        got, expected = model.encode(x), other.encode(x)
    for name in ("embeddings", "early", "features"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_bf16_weight_copies_follow_replaced_parameters():
    """Parameters replaced by new tensors (``load_state_dict(assign=True)``, twice without a forward between)
    can land at a freed parameter's address with the same version count: the copies must still be rebuilt."""
    torch.manual_seed(0)
    for _ in range(100):
        layer = torch.nn.Linear(64, 64)
        bf16.params(layer), bf16.split_params(layer)
        for _ in range(2):
            state = {k: torch.empty_like(v).uniform_() for k, v in layer.state_dict().items()}  # version 1, as init
            layer.load_state_dict(state, assign=True)
            del state
        weight, bias = bf16.params(layer)
        assert torch.equal(weight, layer.weight.to(torch.bfloat16)) and torch.equal(bias, layer.bias.to(torch.bfloat16))
        split, _ = bf16.split_params(layer)
        assert torch.equal(split[:, :64].float() + split[:, 64:].float(), layer.weight.detach().bfloat16().float() +
                           (layer.weight.detach() - layer.weight.detach().bfloat16().float()).bfloat16().float())


# --------------------------------------------------------------------------------------- the pieces
def test_split_weights_carry_16_bits():
    layer = torch.nn.Linear(96, 40).requires_grad_(False)
    with torch.no_grad():
        layer.weight.mul_(7.3)
    stacked, bias = bf16.split_params(layer)
    assert stacked.dtype == torch.bfloat16 and stacked.shape == (40, 192)
    total = stacked[:, :96].double() + stacked[:, 96:].double()
    err_split = float((total - layer.weight.double()).abs().max() / layer.weight.abs().max())
    err_plain = float((stacked[:, :96].double() - layer.weight.double()).abs().max() / layer.weight.abs().max())
    assert err_split < 2 ** -15 < 2 ** -10 < err_plain
    x = torch.randn(33, 96).bfloat16()
    y = torch.addmm(bias, torch.cat([x, x], 1), stacked.t())
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert float((y.double() - exact).norm() / exact.norm()) < 2 ** -8  # only the output's bf16 rounding
    (hi, lo), _ = bf16.split_params(layer, stacked=False)
    assert torch.equal(hi, stacked[:, :96]) and torch.equal(lo, stacked[:, 96:])


@pytest.mark.parametrize("h, w, hd", [(4, 4, 16), (5, 3, 8), (14, 14, 64)])
def test_extended_attention_equals_the_biased_attention(h, w, hd):
    """q'.k' = scale q.k + rel_h + rel_w exactly: in float32 the extended attention is the rel-pos
    attention (here against an explicit bias mask)."""
    gen = torch.Generator().manual_seed(h * w)
    n, t, scale = 3, h * w, hd ** -0.5
    q, k, v = (torch.randn(n, t, hd, generator=gen) for _ in range(3))
    rh, rw = torch.randn(h, h, hd, generator=gen), torch.randn(w, w, hd, generator=gen)
    rel_h = torch.einsum("bhwc,hkc->bhwk", q.view(n, h, w, hd), rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", q.view(n, h, w, hd), rw)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(n, t, t)
    expected = torch.softmax(scale * q @ k.transpose(1, 2) + bias, -1) @ v
    width = encoder_bf16.augmented_width(hd, h, w)
    assert width % 32 == 0 and width >= hd + h + w
    ext = [torch.full((n, t, width), float("nan")) for _ in range(3)]  # padding must be overwritten
    for e, plain in zip(ext, (q, k, v)):
        e[..., :hd] = plain
    got = encoder_bf16.attend(*ext, rh, rw, (h, w), scale)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_bf16_convolutions():
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
    x = torch.randn(2, 8, 10, 12, generator=gen)
    for layer in (conv, up):
        with torch.inference_mode():
            exact = layer(x)
            assert torch.equal(bf16.conv(layer, x), exact)  # not marked: the layer's own forward
            errs = {}
            for mode in (True, "split"):
                bf16.set_modules([layer], mode)
                y = bf16.conv(layer, x)
                assert y.dtype == torch.float32 and y.shape == exact.shape
                errs[mode] = float((y - exact).norm() / exact.norm())
            bf16.set_modules([layer], False)
            assert torch.equal(bf16.conv(layer, x), exact) and not hasattr(layer, "bf16")
        assert errs["split"] < errs[True] < 1e-2
    x.requires_grad_(True)  # training: the bf16 path never runs under autograd
    bf16.set_modules([conv], True)
    assert torch.equal(bf16.conv(conv, x), conv(x))


def test_bf16_encoder_on_padded_windows_and_other_head_counts():
    """The bf16 fast path against the float32 fast path on the layouts of test_fast_encoder (padded windows,
    4 heads of 16): same function within bf16 accuracy."""
    import dataclasses

    from RobustMedSAMLib.modeling import TINY
    from RobustMedSAMLib.modeling.model import build_model
    from RobustMedSAMLib.seeded import seed_module

    for arch in (dataclasses.replace(TINY, window_size=5, depth=3, global_attn_indexes=(1,)),
                 dataclasses.replace(TINY, window_size=3, num_heads=4, global_attn_indexes=(0, 3))):
        enc = build_model(arch).image_encoder
        seed_module(enc, 0, prefix="image_encoder.")
        x = torch.from_numpy(seeded_array("input.image", (2, 3, 256, 256), 1)) * 2
        with torch.inference_mode():
            ref = enc(x)
            enc.set_precision("bf16")
            assert enc.path_for(x) == "fast-bf16"
            low = enc(x)
            enc.set_precision("fp32")
        for a, b in zip(low, ref):
            assert a.dtype == torch.float32
            rel = float((a - b).norm() / b.norm())
            assert 1e-5 < rel < 1e-2, rel


# ---------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("bf16cli")
    torch.save(seeded_model("tiny").model.state_dict(), root / "tiny_robust.pth")
    Image.fromarray(seeded_image((150, 220, 3), 3)).save(root / "image.png")
    return root


def _segment(root, out, *extra):
    from RobustMedSAMLib.cli import main

    return main(["segment", str(root / "image.png"), "--checkpoint", str(root / "tiny_robust.pth"),
                 "--box", "20", "30", "150", "120", "-o", str(out), *extra])


def test_cli_precision(tiny_files, capsys):
    from PIL import Image

    masks = {}
    for name, extra in (("default", ()), ("fp32", ("--precision", "fp32")), ("bf16", ("--precision", "bf16"))):
        out = tiny_files / f"{name}.png"
        assert _segment(tiny_files, out, *extra) == 0
        masks[name] = np.asarray(Image.open(out)) > 0
        err = capsys.readouterr().err
        assert ("precision: bf16 requested" in err) == (name == "bf16")
    # the default (auto) keeps an unnamed checkpoint in float32: the output is exactly the float32 one
    assert np.array_equal(masks["default"], masks["fp32"])
    # bf16 against float32: the gate's measure (on the tiny model's ~1900-pixel mask, IoU 0.96)
    assert 0 < float((masks["bf16"] != masks["fp32"]).mean()) <= 0.005
    inter, union = (masks["bf16"] & masks["fp32"]).sum(), (masks["bf16"] | masks["fp32"]).sum()
    assert inter / union >= 0.9
    with pytest.raises(SystemExit) as exit_info:
        _segment(tiny_files, tiny_files / "x.png", "--precision", "half")
    assert exit_info.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err


def test_precision_flag_on_every_model_command():
    from RobustMedSAMLib.cli import build_parser
    from Training.evaluate import build_parser as evaluate_parser

    parser = build_parser()
    common = {"segment": ["img.png", "-o", "m.png"],
              "segment-volume": ["v.nrrd", "--prompts", "p.json", "-o", "o.seg.nrrd"],
              "robustness": ["v.nrrd", "--prompts", "p.json"], "batch": ["--manifest", "m.csv"]}
    for command, args in common.items():
        assert parser.parse_args([command, *args]).precision == "auto"
        assert parser.parse_args([command, *args, "--precision", "bf16"]).precision == "bf16"
    ev = evaluate_parser()
    assert ev.parse_args(["--seeded-tiny", "-o", "out"]).precision == "fp32"  # evaluate: float32 by default
    assert ev.parse_args(["--seeded-tiny", "-o", "out", "--precision", "auto"]).precision == "auto"


def test_models_without_a_bf16_encoder_path(monkeypatch):
    """A model whose encoder has no bf16 path (another encoder class) stays float32 under auto even with a gate;
    forcing bf16 is a clear error."""
    from RobustMedSAMLib import models

    _force_native(monkeypatch)
    loaded = seeded_model("tiny")
    plain = torch.nn.Module()  # an encoder class without set_precision
    loaded.model.image_encoder = plain
    assert not P.has_bf16_path(loaded.model)
    reason = models._apply_precision(loaded.model, "auto", "tiny")
    assert loaded.model.precision == "fp32" and "no bf16 CPU path" in reason
    with pytest.raises(ValueError, match="no bf16 CPU path"):
        P.set_precision(loaded.model, "bf16")
    P.set_precision(loaded.model, "fp32")  # float32 always works
