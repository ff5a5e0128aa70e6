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
    # left padding under eager: fully masked query rows get the mean of v (eager's uniform softmax over
    # finfo.min), not 0 as under sdpa -- fused too, the integration adds that mean for those rows
    check_parity(pm, inputs)
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


# ------------------------------------------------------------------- training stacks (current transformers / PEFT, autocast, compile, pickling, Trainer)
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_both_cache_keywords_update_the_cache_once(keyword):
    """transformers <= 5.23 passes the KV cache as past_key_values=, >= 5.24 as cache=: both are fused and
    the cache is updated exactly once per call, with PEFT's own forward's result."""
    from transformers import DynamicCache

    from fastbridge.integrations import _compat

    if keyword != _compat.cache_keyword() and _compat.cache_keyword() == "past_key_values":
        # transformers <= 5.23's own attention ignores cache= (it reads past_key_values=): no reference
        pytest.skip(f"transformers {transformers.__version__} passes the KV cache as past_key_values=")
    pm = build("llama").eval()
    layer = adapted(pm)[0]
    attn = layer.model
    model = pm.base_model.model.model
    hs = torch.randn(2, 5, CFG["hidden_size"])
    pos = torch.arange(5).unsqueeze(0).expand(2, 5)
    pe = model.rotary_emb(hs, pos)
    outs, lens = [], []
    for patched in (False, True):
        cache = DynamicCache(config=model.config)
        if patched:
            fastbridge.patch(pm)
            fb_peft.stats.clear()
        try:
            with torch.no_grad():
                out, _ = layer(hidden_states=hs, position_embeddings=pe, attention_mask=None, **{keyword: cache})
        finally:
            fastbridge.unpatch(pm)
        outs.append(out)
        lens.append(cache.get_seq_length(attn.layer_idx))
        if patched:
            assert fb_peft.stats == {"fused": 1}, dict(fb_peft.stats)
    assert lens == [5, 5]
    assert_close(outs[1], outs[0], torch.float32, f"attention output with {keyword}=")


def _spy_op_dtypes(monkeypatch):
    """Record the dtype of q that reaches the fused op (kernel or reference)."""
    import sys

    ga_mod = sys.modules["fastbridge.ops.gated_attention"]  # the module (fastbridge.ops.gated_attention is the op)
    seen = []
    real_ref, real_op = ga_mod.ref.gated_attention, ga_mod._gated_attention_op

    def ref_spy(q, *a, **kw):
        seen.append(q.dtype)
        return real_ref(q, *a, **kw)

    def op_spy(q, *a, **kw):
        seen.append(q.dtype)
        return real_op(q, *a, **kw)

    monkeypatch.setattr(ga_mod.ref, "gated_attention", ref_spy)
    monkeypatch.setattr(ga_mod, "_gated_attention_op", op_spy)
    return seen


@pytest.mark.parametrize("use_cache", [False, True])
def test_autocast_runs_the_op_in_the_autocast_dtype(monkeypatch, use_cache):
    """Under torch.autocast the fused op gets the autocast dtype (not fp32 from RoPE's fp32 cos/sin) and
    never a q / v dtype mismatch (use_cache=False: HF Trainer's default and gradient checkpointing's);
    loss and gradients match unpatched PEFT under the same autocast. fp16 on CPU (the Triton interpreter
    computes fp16 right; the reference otherwise), bf16 on CUDA below."""
    pm = build("llama").train()
    inputs = batch()
    seen = _spy_op_dtypes(monkeypatch)
    with torch.autocast("cpu", dtype=torch.float16):
        pm.zero_grad(set_to_none=True)
        ref = pm(**inputs, use_cache=use_cache)
        ref.loss.backward()
        grads0 = {n: p.grad.clone() for n, p in trainable(pm).items()}
        fastbridge.patch(pm)
        fb_peft.stats.clear()
        try:
            pm.zero_grad(set_to_none=True)
            out = pm(**inputs, use_cache=use_cache)
            out.loss.backward()
        finally:
            fastbridge.unpatch(pm)
    assert fb_peft.stats == {"fused": ADAPTER_LAYERS}, dict(fb_peft.stats)
    assert seen == [torch.float16] * ADAPTER_LAYERS, seen
    assert out.logits.dtype == ref.logits.dtype
    assert_close(out.loss.float(), ref.loss.float(), torch.float16, "loss under fp16 autocast")
    for n, p in trainable(pm).items():
        assert p.grad.dtype == grads0[n].dtype == torch.float32
        assert_close(p.grad, grads0[n], torch.float16, f"grad {n} under fp16 autocast")


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 autocast of the Triton kernel: CUDA (the interpreter's bf16 dot is wrong)")
def test_autocast_bf16_cuda(monkeypatch):
    pm = build("llama", device="cuda").train()
    inputs = batch(device="cuda")
    seen = _spy_op_dtypes(monkeypatch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = pm(**inputs, use_cache=False).loss
        fastbridge.patch(pm)
        try:
            out = pm(**inputs, use_cache=False).loss
        finally:
            fastbridge.unpatch(pm)
    assert seen == [torch.bfloat16] * ADAPTER_LAYERS, seen
    assert_close(out.float(), ref.float(), torch.bfloat16, "loss under bf16 autocast")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compile_whole_patched_model_fullgraph(arch):
    """torch.compile of the whole patched model with padding masks: no graph break (fullgraph=True), the
    same loss and gradients as eager; the mask is checked on the device, not branched on."""
    import torch._dynamo

    pm = build(arch).train()
    inputs = batch()
    logits0, loss0, grads0 = run(pm, inputs)
    fastbridge.patch(pm)
    try:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(pm)(**inputs, use_cache=False)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
        pm.zero_grad(set_to_none=True)
        out = compiled(**inputs, use_cache=False)
        out.loss.backward()
    finally:
        fastbridge.unpatch(pm)
        torch._dynamo.reset()
    assert_close(out.logits.detach(), logits0, torch.float32, "compiled logits")
    assert_close(out.loss.detach(), loss0, torch.float32, "compiled loss")
    for n, p in trainable(pm).items():
        assert_close(p.grad, grads0[n], torch.float32, f"compiled grad {n}")


def test_compile_rejects_a_mask_it_cannot_express():
    """Compiled, a mask that is not causal + padding (here a custom 4D mask) raises instead of computing
    something else."""
    import torch._dynamo

    pm = build("llama").eval()
    ids = batch()["input_ids"]
    L = ids.shape[1]
    full = torch.ones(ids.shape[0], 1, L, L, dtype=torch.bool)  # bidirectional: not causal
    fastbridge.patch(pm)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(pm, backend="aot_eager")
        with pytest.raises(Exception, match="causal"), torch.no_grad():
            compiled(input_ids=ids, attention_mask=full, use_cache=False)
    finally:
        fastbridge.unpatch(pm)
        torch._dynamo.reset()


def test_torch_save_load_keeps_the_model_patched(tmp_path):
    """torch.save of a patched PEFT model, torch.load(weights_only=False): it runs, stays fused, gives the
    same outputs, and unpatch still restores PEFT's forward."""
    import copy

    pm = build("llama").eval()
    inputs = batch()
    inputs.pop("labels")
    fastbridge.patch(pm)
    with torch.no_grad():
        want = pm(**inputs).logits
    path = tmp_path / "model.pt"
    torch.save(pm, path)
    fastbridge.unpatch(pm)
    for loaded in (torch.load(path, weights_only=False), copy.deepcopy(torch.load(path, weights_only=False))):
        fb_peft.stats.clear()
        with torch.no_grad():
            got = loaded(**inputs).logits
        assert fb_peft.stats == {"fused": ADAPTER_LAYERS}, dict(fb_peft.stats)
        assert torch.equal(got, want)
        fastbridge.unpatch(loaded)
        for m in adapted(loaded):
            assert "forward" not in m.__dict__ and m.forward.__func__ is type(m).forward
        fb_peft.stats.clear()
        with torch.no_grad():
            loaded(**inputs)
        assert fb_peft.stats["fused"] == 0


def test_hf_trainer_bf16_with_gradient_checkpointing(tmp_path, monkeypatch):
    """HF Trainer(bf16=True) with gradient checkpointing (use_cache=False, autocast) on the patched model: the
    first steps run fused in bf16 (they crashed on a q / v dtype mismatch before). The reference backend
    computes the op here: the Triton interpreter's bf16 dot is wrong (bf16 kernels are tested on CUDA)."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tiny(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(3, CFG["vocab_size"], (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "labels": ids}

    pm = build("llama")
    fastbridge.patch(pm)
    seen = _spy_op_dtypes(monkeypatch)
    fb_peft.stats.clear()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, bf16=True,
                             use_cpu=True, gradient_checkpointing=True, report_to=[], logging_steps=1,
                             save_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
    with fastbridge.use_backend("reference"):
        result = Trainer(model=pm, args=args, train_dataset=Tiny()).train()
    fastbridge.unpatch(pm)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert fb_peft.stats.get("fused", 0) >= 2 * ADAPTER_LAYERS and not any(k.startswith("fallback") for k in fb_peft.stats), dict(fb_peft.stats)
    assert seen and set(seen) == {torch.bfloat16}, seen


def test_fastbridge_stats_reports_the_peft_calls():
    """fastbridge.stats(model): how many PEFT attention calls ran the fused op (kernel or reference) or
    fell back, and why."""
    pm = build("llama").eval()
    fastbridge.patch(pm)
    fastbridge.reset_stats()
    try:
        with torch.no_grad():
            pm(**batch())
        st = fastbridge.stats(pm).as_dict()
        text = str(fastbridge.stats(pm))
    finally:
        fastbridge.unpatch(pm)
    entry = st[fb_peft.NAME]
    ran = entry["fused"] + entry["reference"]
    assert ran == ADAPTER_LAYERS and not entry["fallback"], st
    assert fb_peft.NAME in text
