"""fastbridge.add_adapters / remove_adapters on tiny random-init Hugging Face models (CPU, no downloads).

Families: BLIP, BLIP-2 (OPT / T5 language models), ViT, CLIP, LLaMA. Adapters run through the
reference backend, except one test that runs the Triton kernels (CPU only under TRITON_INTERPRET=1,
which must be set before Python starts).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fastbridge  # noqa: E402
from fastbridge.integrations.adapters import AdapterReport, add_adapters, remove_adapters  # noqa: E402
from fastbridge.modules import BottleneckAdapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

R = 8  # bottleneck width used throughout (the "blip" preset's r = 64 is wider than these tiny models)
LAYERS = 2
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=2)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=99,
               encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0)
OPT = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
           vocab_size=99, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
           eos_token_id=2)
T5 = dict(model_type="t5", d_model=32, d_ff=64, d_kv=8, num_layers=LAYERS, num_heads=4, vocab_size=99,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=99, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
IMAGE_TOKEN, N_QUERY = 98, 4


def _pixels(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _ids(batch=2, length=7):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(2))


def _blip2_inputs():
    ids = torch.cat([torch.full((2, N_QUERY), IMAGE_TOKEN), _ids()], dim=1)
    return dict(pixel_values=_pixels(), input_ids=ids)


def _blip2_config(text_config):
    return transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text_config,
                                    num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN)


# family -> (build model, inputs, output tensor of the model output, {part: expected adapters by default})
FAMILIES = {
    "blip": (lambda: transformers.BlipForConditionalGeneration(transformers.BlipConfig(vision_config=VISION,
                                                                                      text_config=TEXT)),
             lambda: dict(pixel_values=_pixels(), input_ids=_ids()), lambda o: o.logits,
             {"vision": LAYERS, "text": LAYERS}),
    "blip_model": (lambda: transformers.BlipModel(transformers.BlipConfig(vision_config=VISION, text_config=TEXT)),
                   lambda: dict(pixel_values=_pixels(), input_ids=_ids()), lambda o: o.logits_per_image,
                   {"vision": LAYERS, "text": LAYERS}),
    "blip2_opt": (lambda: transformers.Blip2ForConditionalGeneration(_blip2_config(OPT)), _blip2_inputs,
                  lambda o: o.logits, {"vision": LAYERS, "qformer": LAYERS}),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**VISION)),
            lambda: dict(pixel_values=_pixels()), lambda o: o.last_hidden_state, {"vision": LAYERS}),
    "clip_vision": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
                    lambda: dict(pixel_values=_pixels()), lambda o: o.pooler_output, {"vision": LAYERS}),
    "clip": (lambda: transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT)),
             lambda: dict(pixel_values=_pixels(), input_ids=_ids()), lambda o: o.logits_per_image,
             {"vision": LAYERS}),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)),
              lambda: dict(input_ids=_ids()), lambda o: o.logits, {"language_model": LAYERS}),
}


def build(family):
    torch.manual_seed(0)
    make, inputs, out, parts = FAMILIES[family]
    return make().eval(), inputs(), out, parts


def run(model, inputs, out, grad=False):
    with torch.set_grad_enabled(grad):
        return out(model(**inputs))


def adapters_of(model):
    return [m for m in model.modules() if isinstance(m, BottleneckAdapter)]


def n_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.fixture(autouse=True)
def reference_backend():
    with fastbridge.use_backend("reference"):
        yield


# ---------------------------------------------------------------- per family: insert, identity, freeze
@pytest.mark.parametrize("family", list(FAMILIES))
def test_insert_identity_freeze_report(family):
    model, inputs, out, parts = build(family)
    # torch.no_grad on both sides: frozen weights may route some CPU ops through other kernels
    # (last-bit differences in T5 / SDPA); the adapters themselves must change nothing.
    before = run(model, inputs, out)
    report = add_adapters(model, r=R, verbose=False)

    assert isinstance(report, AdapterReport)
    assert report.parts == parts
    assert report.num_adapters == len(report.paths) == sum(parts.values()) == len(adapters_of(model))
    names = dict(model.named_modules())
    for path in report.paths:
        assert isinstance(names[path], BottleneckAdapter) and names[path].r == R
        assert names[path].down.weight.dtype == torch.float32

    assert torch.equal(run(model, inputs, out), before)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    adapter_params = sum(p.numel() for a in adapters_of(model) for p in a.parameters())
    assert report.adapter_params == report.trainable_params == adapter_params == n_params(model, True)
    assert report.total_params == n_params(model)
    assert report.trainable_pct == pytest.approx(100 * adapter_params / n_params(model))
    s = str(report)
    assert f"trainable params: {adapter_params:,}" in s and f"all params: {n_params(model):,}" in s
    assert "trainable%" in s and "\n" not in s


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backward_reaches_every_adapter(family):
    model, inputs, out, _ = build(family)
    report = add_adapters(model, r=R, verbose=False)
    ads = adapters_of(model)
    with torch.no_grad():  # up is zero-initialised (so d/d down = 0): perturb it first
        for a in ads:
            a.up.weight.normal_(std=0.1)
    y = run(model, inputs, out, grad=True)
    y.float().pow(2).mean().backward()
    assert len(ads) == report.num_adapters
    for a in ads:
        for lin in (a.down, a.up):
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter." not in n)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remove_restores_model(family):
    model, inputs, out, _ = build(family)
    names, keys, text = [n for n, _ in model.named_parameters()], list(model.state_dict()), repr(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = run(model, inputs, out)

    report = add_adapters(model, r=R, verbose=False)
    # Base parameter names / state-dict keys unchanged; adapters only add keys.
    new_keys = list(model.state_dict())
    assert [k for k in new_keys if ".adapter." not in k] == keys
    assert len(new_keys) - len(keys) == 4 * report.num_adapters  # down/up weight+bias
    with torch.no_grad():
        for a in adapters_of(model):
            a.up.weight.normal_(std=0.1)
    assert not torch.equal(run(model, inputs, out), before)

    assert remove_adapters(model) is model
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
    assert repr(model) == text
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not adapters_of(model)
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(run(model, inputs, out), before)
    # ... and adapters can go in again.
    assert add_adapters(model, r=R, verbose=False).num_adapters == report.num_adapters


# --------------------------------------------------------------------------------------- targets
def test_targets_select_parts():
    model, *_ = build("blip")
    rep = add_adapters(model, r=R, targets="vision", verbose=False)
    assert rep.parts == {"vision": LAYERS} and all(p.startswith("vision_model.") for p in rep.paths)

    model, *_ = build("clip")
    assert add_adapters(model, r=R, targets={"text"}, verbose=False).parts == {"text": LAYERS}
    model, *_ = build("clip")
    assert add_adapters(model, r=R, targets="all", verbose=False).parts == {"vision": LAYERS, "text": LAYERS}
    # CLIPTextModel alone: holds no vision tower, so the default is what it has.
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT))
    assert add_adapters(text, r=R, verbose=False).parts == {"text": LAYERS}


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_blip2_language_model_only_when_asked(lm):
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(_blip2_config(OPT if lm == "opt" else T5)).eval()
    inputs = _blip2_inputs()
    if lm == "t5":
        inputs["decoder_input_ids"] = _ids(length=3)
    before = run(model, inputs, lambda o: o.logits)
    rep = add_adapters(model, r=R, targets=("vision", "qformer", "language_model"), verbose=False)
    n_lm = LAYERS if lm == "opt" else 2 * LAYERS  # T5: encoder + decoder blocks
    assert rep.parts == {"vision": LAYERS, "qformer": LAYERS, "language_model": n_lm}
    assert all(p.startswith(("vision_model.", "qformer.", "language_model.")) for p in rep.paths)
    assert torch.equal(run(model, inputs, lambda o: o.logits), before)


def test_qformer_text_ffn_adapted_too():
    torch.manual_seed(0)
    qf = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER, use_qformer_text_input=True))
    rep = add_adapters(qf, r=R, verbose=False)
    assert rep.parts == {"qformer": 2 * LAYERS}  # output_query and output in every layer
    assert sum(p.endswith("output_query.dense.adapter") for p in rep.paths) == LAYERS


def test_bad_targets():
    model, *_ = build("vit")
    with pytest.raises(ValueError, match="qformer"):
        add_adapters(model, r=R, targets="qformer", verbose=False)
    with pytest.raises(ValueError, match="targets"):
        add_adapters(model, r=R, targets={"encoder"}, verbose=False)
    assert not adapters_of(model)


# ----------------------------------------------------------------------- twice, errors, options
def test_second_call_raises_and_changes_nothing():
    model, *_ = build("blip")
    add_adapters(model, r=R, targets="vision", verbose=False)
    state = repr(model)
    with pytest.raises(RuntimeError, match="already carry"):
        add_adapters(model, r=R, verbose=False)  # the default targets include vision again
    assert repr(model) == state
    # Other parts may be added later; remove_adapters removes both and un-freezes everything.
    rep = add_adapters(model, r=R, targets="text", verbose=False)
    assert rep.parts == {"text": LAYERS} and len(adapters_of(model)) == 2 * LAYERS
    assert rep.trainable_params == sum(p.numel() for a in adapters_of(model) for p in a.parameters())
    remove_adapters(model)
    assert not adapters_of(model) and all(p.requires_grad for p in model.parameters())


def test_unsupported_models():
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**{k: v for k, v in TEXT.items() if k != "sep_token_id"}))
    with pytest.raises(ValueError, match=r"BertModel is not a supported model.*Blip2ForConditionalGeneration"):
        add_adapters(bert, verbose=False)
    with pytest.raises(ValueError, match="Sequential is not a supported model"):
        add_adapters(nn.Sequential(nn.Linear(4, 4)), verbose=False)
    with pytest.raises(TypeError):
        add_adapters("not a model", verbose=False)
    assert all(p.requires_grad for p in bert.parameters())


def test_presets_and_options():
    model, *_ = build("vit")
    rep = add_adapters(model, preset="houlsby", verbose=False)  # r = d // 16
    a = adapters_of(model)[0]
    assert (a.r, a.activation, a.ln) == (32 // 16, "silu", None)
    remove_adapters(model)
    add_adapters(model, preset="pfeiffer", reduction_factor=4, layer_norm=True, gate=True, scale=0.5,
                 activation="gelu_tanh", verbose=False)
    a = adapters_of(model)[0]
    assert (a.r, a.activation, a.scale) == (8, "gelu_tanh", 0.5)
    assert a.ln is not None and a.gate is not None and a.gate.requires_grad
    remove_adapters(model)
    with pytest.raises(ValueError, match="not both"):
        add_adapters(model, r=4, reduction_factor=4, verbose=False)
    with pytest.raises(ValueError, match="preset"):
        add_adapters(model, preset="lora", verbose=False)
    with pytest.raises(TypeError):
        add_adapters(model, r=4, not_an_option=1, verbose=False)
    assert not adapters_of(model)  # a bad argument leaves the model untouched
    assert all(p.requires_grad for p in model.parameters())
    # freeze=False keeps the base trainable; the top-level alias works; verbose prints the summary.
    rep = fastbridge.add_adapters(model, r=R, freeze=False, verbose=False)
    assert rep.trainable_params == rep.total_params == n_params(model)
    assert rep.num_adapters == LAYERS


def test_verbose_prints_summary(capsys):
    model, *_ = build("vit")
    report = add_adapters(model, r=R)  # quiet by default: the report is returned (and logged at INFO)
    assert capsys.readouterr().out == ""
    assert "fastbridge.add_adapters: 2 adapters (vision x2) || trainable params:" in str(report)
    remove_adapters(model)
    add_adapters(model, r=R, verbose=True)
    assert capsys.readouterr().out.count("fastbridge.add_adapters: 2 adapters (vision x2) || trainable params:") == 1


def test_half_model_keeps_fp32_adapters_and_identity():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16).eval()
    inputs = dict(input_ids=_ids())
    before = run(model, inputs, lambda o: o.logits)
    add_adapters(model, r=R, verbose=False)
    assert all(p.dtype == torch.float32 for a in adapters_of(model) for p in a.parameters())
    after = run(model, inputs, lambda o: o.logits)
    assert after.dtype == torch.bfloat16 and torch.equal(after, before)


def test_state_dict_roundtrip_and_deepcopy():
    model, inputs, out, _ = build("vit")
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, r=R, verbose=False)
    # The frozen base checkpoint loads as-is; only adapter keys are missing.
    res = model.load_state_dict(base_sd, strict=False)
    assert not res.unexpected_keys and res.missing_keys and all(".adapter." in k for k in res.missing_keys)
    # A deep copy carries its own adapters (the hook finds the copy's adapter, not the original's).
    clone = copy.deepcopy(model)
    y = run(model, inputs, out)
    with torch.no_grad():
        for a in adapters_of(clone):
            a.up.weight.normal_(std=0.1)
    assert torch.equal(run(model, inputs, out), y)
    assert not torch.equal(run(clone, inputs, out), y)
    remove_adapters(clone)
    assert torch.equal(run(clone, inputs, out), y)
    # The adapters' weights round-trip through a state dict.
    sd = model.state_dict()
    other, *_ = build("vit")
    add_adapters(other, r=R, verbose=False)
    other.load_state_dict(sd)
    assert torch.equal(run(other, inputs, out), y)


# ------------------------------------------------------------------------- Triton (interpreter)
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on CPU only with TRITON_INTERPRET=1 set before Python starts")
def test_kernel_backend_matches_reference():
    model, inputs, out, _ = build("vit")
    add_adapters(model, r=R, verbose=False)
    ads = adapters_of(model)
    with torch.no_grad():
        for a in ads:
            a.up.weight.normal_(std=0.1)
            a.up.bias.normal_(std=0.1)
    results = {}
    for backend in ("reference", "kernel"):
        model.zero_grad(set_to_none=True)
        with fastbridge.use_backend(backend):
            y = run(model, inputs, out, grad=True)
            y.float().pow(2).mean().backward()
        results[backend] = (y.detach(), [p.grad.clone() for a in ads for p in a.parameters()])
    (y_ref, g_ref), (y_k, g_k) = results["reference"], results["kernel"]
    torch.testing.assert_close(y_k, y_ref, atol=1e-4, rtol=1e-4)
    assert len(g_k) == len(g_ref) == 4 * len(ads)
    for gk, gr in zip(g_k, g_ref):
        torch.testing.assert_close(gk, gr, atol=1e-4, rtol=1e-4)


def test_unpatch_right_after_add_adapters_switches_them_to_eager():
    """fastbridge.unpatch without a patch call first: the adapters add_adapters inserted (fused from the
    start) go to the eager composition, as the README says; patch fuses them again."""
    model = transformers.ViTModel(transformers.ViTConfig(**VISION)).eval()
    add_adapters(model, r=R)
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert adapters and all(a.fused for a in adapters)
    fastbridge.unpatch(model)
    assert all(not a.fused for a in adapters)
    fastbridge.patch(model)
    assert all(a.fused for a in adapters)
    fastbridge.unpatch(model)
    assert all(not a.fused for a in adapters)
