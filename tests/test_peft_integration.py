"""fastbridge.patch on PEFT AdaptionPrompt (LLaMA-Adapter) models, llama and mistral (tiny, random init).

Each test runs the same PEFT model unpatched, then patched (one fused gated_attention call per adapted
layer), and compares outputs, losses, the gradients of every trainable parameter (adaption_prompt,
adaption_gate) and greedy generation with the KV cache. Gates are set non-zero so the prompt branch
matters; batches are padded (left and right). The fused op runs through the default backend selection
(auto); one test forces the Triton kernel (TRITON_INTERPRET=1 on CPU) against the reference.
"""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fastbridge  # noqa: E402
from fastbridge.integrations import peft as fb_peft  # noqa: E402

from conftest import HAS_CUDA, assert_close, needs_interpreter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::fastbridge.FastbridgeFallbackWarning",
                                        "ignore::FutureWarning", "ignore::UserWarning")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
ADAPTER_LEN, ADAPTER_LAYERS = 4, 2
CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}


def build(arch="llama", impl="sdpa", *, gates=True, seed=0, device="cpu", dtype=torch.float32, **overrides):
    """A tiny causal LM with PEFT adaption prompts in its top ADAPTER_LAYERS layers."""
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**dict(CFG, attn_implementation=impl, **overrides)))
    pm = peft.get_peft_model(model, peft.AdaptionPromptConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS,
                                                              task_type="CAUSAL_LM"))
    if gates:  # PEFT zero-initialises the gates: make the prompt branch matter
        with torch.no_grad():
            for i, (n, p) in enumerate((n, p) for n, p in pm.named_parameters() if n.endswith("adaption_gate")):
                p.fill_(0.5 + 0.25 * i)
    return pm.to(device=device, dtype=dtype)


def batch(B=2, L=7, device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CFG["vocab_size"], (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :2] = 0    # left padding: fully masked query rows
    mask[1, -2:] = 0   # right padding
    ids = ids.masked_fill(mask == 0, CFG["pad_token_id"])
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


def trainable(pm):
    return {n: p for n, p in pm.named_parameters() if p.requires_grad}


def run(pm, inputs):
    pm.zero_grad(set_to_none=True)
    out = pm(**inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.detach().clone() for n, p in trainable(pm).items()}


def adapted(pm):
    return [m for _, m in pm.named_modules() if type(m).__name__ == "AdaptedAttention"]


def check_parity(pm, inputs, dtype=torch.float32, *, expect_fused=True, fallback=None):
    logits0, loss0, grads0 = run(pm, inputs)
    fastbridge.patch(pm)
    fb_peft.stats.clear()
    try:
        logits1, loss1, grads1 = run(pm, inputs)
    finally:
        fastbridge.unpatch(pm)
    if expect_fused:
        assert fb_peft.stats["fused"] == ADAPTER_LAYERS, dict(fb_peft.stats)
    if fallback is not None:
        assert any(fallback in k for k in fb_peft.stats), dict(fb_peft.stats)
    assert_close(logits1, logits0, dtype, "logits")
    assert_close(loss1, loss0, dtype, "loss")
    assert set(grads1) == set(grads0) and len(grads0) == 2 * ADAPTER_LAYERS
    for n in grads0:
        assert grads0[n].abs().max() > 0, f"{n}: zero gradient (prompt branch inactive?)"
        assert_close(grads1[n], grads0[n], dtype, f"grad {n}")


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_outputs_loss_grads_match_peft(arch, device):
    """sdpa (transformers' default): every mask here is fused, left-padding rows included."""
    pm = build(arch, device=device).train()
    check_parity(pm, batch(device=device))


def test_eager_attention_and_attention_bias():
    """eager masks are additive; PEFT's o_proj on each branch adds the o_proj bias twice (kept)."""
    pm = build("llama", "eager", attention_bias=True)
    with torch.no_grad():  # transformers initialises biases to 0
        for n, p in pm.named_parameters():
            if n.endswith("_proj.bias"):
                p.normal_()
    inputs = batch()
    # left padding under eager: PEFT's forward runs (fully masked rows differ between eager and sdpa)
    check_parity(pm, inputs, expect_fused=False, fallback="fully masked")
    inputs["attention_mask"][0, :2] = 1  # right padding only: fused
    inputs["labels"][0, :2] = inputs["input_ids"][0, :2]
    check_parity(pm, inputs)


def test_no_mask_and_cached_chunks():
    """attention_mask=None (sdpa's mask-free causal path); a prefill, then a 2-token chunk (Lq < Lk: the
    bottom-right causal mask) and a 1-token step on a DynamicCache."""
    pm = build("mistral").eval()
    ids = batch()["input_ids"]
    check_parity(pm, dict(input_ids=ids, labels=ids))

    def chunks():
        pre = pm(input_ids=ids[:, :4], use_cache=True)
        two = pm(input_ids=ids[:, 4:6], past_key_values=pre.past_key_values, use_cache=True)
        one = pm(input_ids=ids[:, 6:7], past_key_values=two.past_key_values, use_cache=True)
        return pre.logits, two.logits, one.logits

    with torch.no_grad():
        ref = chunks()
        fastbridge.patch(pm)
        fb_peft.stats.clear()
        out = chunks()
        fastbridge.unpatch(pm)
    assert fb_peft.stats == {"fused": 3 * ADAPTER_LAYERS}, dict(fb_peft.stats)
    for name, a, b in zip(("prefill", "2-token chunk", "1-token step"), out, ref):
        assert_close(a, b, torch.float32, f"{name} logits")


@pytest.mark.parametrize("arch,cache", [("llama", "dynamic"), ("mistral", "dynamic"), ("llama", "static")])
def test_generate_same_tokens(arch, cache):
    """Greedy generation with the KV cache; a static cache prefills without a mask (keys cropped, as sdpa)."""
    pm = build(arch).eval()
    inputs = batch()
    inputs.pop("labels")
    inputs["attention_mask"][1] = 1  # generation uses left padding
    if cache == "static":
        inputs["attention_mask"][0] = 1
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=CFG["pad_token_id"], cache_implementation=cache)
    ref = pm.generate(**inputs, **kw)
    fastbridge.patch(pm)
    fb_peft.stats.clear()
    try:
        out = pm.generate(**inputs, **kw)
    finally:
        fastbridge.unpatch(pm)
    assert fb_peft.stats == {"fused": 3 * ADAPTER_LAYERS}, dict(fb_peft.stats)  # prefill + 2 cached steps
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        assert_close(a, b, torch.float32, f"logits of generated token {step}")


def test_zero_init_gates_leave_model_unchanged():
    cfg_cls, model_cls = ARCHS["llama"]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**CFG)).eval()
    inputs = batch()
    inputs.pop("labels")
    with torch.no_grad():
        base = model(**inputs).logits
    pm = peft.get_peft_model(model, peft.AdaptionPromptConfig(adapter_len=ADAPTER_LEN, adapter_layers=ADAPTER_LAYERS,
                                                              task_type="CAUSAL_LM"))
    fastbridge.patch(pm)
    fb_peft.stats.clear()
    with torch.no_grad():
        out = pm(**inputs).logits
    assert fb_peft.stats["fused"] == ADAPTER_LAYERS
    assert_close(out, base, torch.float32, "zero-gate adapters")


# -------------------------------------------------------------------------- patch / unpatch
def test_patch_reports_is_idempotent_and_unpatch_restores():
    pm = build("llama").eval()
    inputs = batch()
    with torch.no_grad():
        before = pm(**inputs).logits
    layer_cls = type(adapted(pm)[0])
    assert fastbridge.patch(pm) is pm
    report = pm.fastbridge_report
    assert sorted(report.patched) == [f"base_model.model.model.layers.{i}.self_attn" for i in (1, 2)]
    assert set(report.patched.values()) == {fb_peft.NAME} and report.counts[fb_peft.NAME] == ADAPTER_LAYERS
    assert all("forward" in m.__dict__ for m in adapted(pm))
    fastbridge.patch(pm)  # idempotent: nothing newly patched, same forward
    assert not pm.fastbridge_report.patched and len(pm.fastbridge_report.already) == ADAPTER_LAYERS
    assert "newly patched" in str(pm.fastbridge_report)
    fastbridge.unpatch(pm)
    assert not hasattr(pm, "fastbridge_report")
    for m in adapted(pm):
        assert "forward" not in m.__dict__ and not fastbridge.patch.__globals__["is_patched"](m)
        assert m.forward.__func__ is layer_cls.forward
    with torch.no_grad():
        assert torch.equal(pm(**inputs).logits, before)  # PEFT's own forward again, bit for bit


def test_prompt_is_broadcast_not_repeated(monkeypatch):
    """One fused call per layer: GQA k/v with Hkv heads, the prompt (1, Hkv, P, D), PEFT's scalar gate."""
    pm = build("llama").eval()
    calls = []
    real = fb_peft.gated_attention

    def spy(q, k, v, pk, pv, gate, **kw):
        calls.append((q.shape, k.shape, pk.shape, pk.stride(), gate.shape, kw))
        return real(q, k, v, pk, pv, gate, **kw)

    monkeypatch.setattr(fb_peft, "gated_attention", spy)
    fastbridge.patch(pm)
    with torch.no_grad():
        pm(**batch(B=3, L=7))  # sample 2 unpadded
    fastbridge.unpatch(pm)
    assert len(calls) == ADAPTER_LAYERS
    for qs, ks, pks, pk_stride, gs, kw in calls:
        assert qs == (3, 4, 7, 16) and ks == (3, 2, 7, 16) and pks == (1, 2, ADAPTER_LEN, 16)
        assert gs == (1,) and kw["gate_fn"] == "identity" and kw["causal"] is True
        assert kw["key_padding_mask"].shape == (3, 7) and pk_stride[-1] == 1


def test_unsupported_masks_fall_back_with_one_warning():
    """A sliding window in effect cannot be expressed as causal + padding: PEFT's forward runs, same results."""
    pm = build("mistral", sliding_window=3)
    fb_peft._warned.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        check_parity(pm, batch(), expect_fused=False, fallback="not causal + key padding")
    msgs = [str(w.message) for w in rec if issubclass(w.category, fastbridge.FastbridgeFallbackWarning)
            and "peft.AdaptionPrompt" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert fb_peft.stats["fused"] == 0


def test_output_attentions_falls_back():
    pm = build("llama", "eager").eval()
    inputs = batch()
    inputs["attention_mask"][0] = 1
    fastbridge.patch(pm)
    fb_peft.stats.clear()
    with torch.no_grad():
        out = pm(**inputs, output_attentions=True)
    fastbridge.unpatch(pm)
    assert len(out.attentions) == CFG["num_hidden_layers"] and all(a is not None for a in out.attentions)
    assert fb_peft.stats["fused"] == 0 and any("output_attentions" in k for k in fb_peft.stats)


def test_disabled_adapter_and_reenabled_stay_patched():
    pm = build("llama").eval()
    inputs = batch()
    fastbridge.patch(pm)
    with torch.no_grad():
        fused = pm(**inputs).logits
        with pm.disable_adapter():
            fb_peft.stats.clear()
            plain = pm(**inputs).logits
            assert fb_peft.stats["fused"] == 0
        fb_peft.stats.clear()
        again = pm(**inputs).logits
    fastbridge.unpatch(pm)
    assert fb_peft.stats["fused"] == ADAPTER_LAYERS
    assert torch.equal(again, fused) and (plain - fused).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ checkpoints
def test_save_load_trainable_roundtrip(tmp_path):
    src = build("mistral", seed=0)
    path = tmp_path / "adaption.safetensors"
    saved = fastbridge.save_trainable(src, path)
    assert sorted(saved) == sorted(trainable(src)) and len(saved) == 2 * ADAPTER_LAYERS
    assert all(n.endswith(("adaption_prompt", "adaption_gate")) for n in saved)
    dst = build("mistral", seed=0, gates=False)
    with torch.no_grad():  # different bridge, same frozen base
        for p in trainable(dst).values():
            p.normal_()
    fastbridge.patch(dst)
    fastbridge.load_trainable(dst, path)
    for n, p in trainable(src).items():
        assert torch.equal(trainable(dst)[n], p), n
    inputs = batch()
    inputs.pop("labels")
    with torch.no_grad():  # the patched reloaded model computes what the unpatched source does
        assert_close(dst(**inputs).logits, src(**inputs).logits, torch.float32, "reloaded model")


# ------------------------------------------------------------------------------------ CUDA, kernel
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision(dtype):
    pm = build("llama", device="cuda", dtype=dtype).train()
    check_parity(pm, batch(device="cuda"), dtype)


@needs_interpreter
def test_kernel_matches_reference():
    pm = build("llama").train()
    inputs = batch(B=2, L=5)
    fastbridge.patch(pm)
    with fastbridge.use_backend("kernel"):
        logits_k, loss_k, grads_k = run(pm, inputs)
    with fastbridge.use_backend("reference"):
        logits_r, loss_r, grads_r = run(pm, inputs)
    fastbridge.unpatch(pm)
    torch.testing.assert_close(logits_k, logits_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_k, loss_r, atol=1e-4, rtol=1e-4)
    for n in grads_r:
        torch.testing.assert_close(grads_k[n], grads_r[n], atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
