"""fastbridge.patch on Flamingo-style gated cross-attention: Llama 3.2 Vision (mllama) and IDEFICS (tiny, random init).

Each test runs the same model unpatched, then patched (one fused gated_cross_attention call per cross-attention
layer, the stats say so), and compares logits, the loss, the gradient of every parameter and greedy generation
(mllama: cross-attention K/V from the cache on decoding steps). Batches are padded, hold several images per
sample (mllama: images of 1 and 2 tiles) and text rows that see no image; gates are non-zero. The integration
tests run the reference backend (fast on CPU); one test runs the Triton kernels (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbridge  # noqa: E402
from fastbridge import FastbridgeFallbackWarning  # noqa: E402
from fastbridge.integrations import flamingo  # noqa: E402

from conftest import needs_interpreter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


# ------------------------------------------------------------------------------------------- models
def build_mllama(impl="sdpa", seed=0):
    cfg = transformers.MllamaConfig(
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                           intermediate_size=32, vision_output_dim=32, intermediate_layers_indices=[0], image_size=16,
                           patch_size=8, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, cross_attention_layers=[1],
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=63)
    cfg._attn_implementation = impl
    cfg.text_config._attn_implementation = impl
    cfg.vision_config._attn_implementation = impl
    torch.manual_seed(seed)
    model = transformers.MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gate" in n:  # zero at init: the cross-attention would not matter
                p.uniform_(-1.0, 1.0)
    return model


def mllama_batch(seed=1):
    """B=2, 2 images x up to 2 tiles (5 tokens each), left padding, text rows before any image."""
    g = torch.Generator().manual_seed(seed)
    B, L, I, T = 2, 7, 2, 2
    ids = torch.randint(3, 60, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :2] = 0
    cam = torch.zeros(B, L, I, T, dtype=torch.long)
    cam[0, 2:, 0, :2] = 1      # sample 0: image 0 (2 tiles) from token 2 on, image 1 (1 tile) from token 5 on
    cam[0, 5:, 1, :1] = 1
    cam[1, 3:, 0, :1] = 1      # sample 1: one image of one tile, second image slot empty
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(B, I, T, 3, 16, 16, generator=g),
                aspect_ratio_ids=torch.tensor([[2, 1], [1, 0]]),
                aspect_ratio_mask=torch.tensor([[[1, 1], [1, 0]], [[1, 0], [0, 0]]]), cross_attention_mask=cam,
                labels=ids.masked_fill(am == 0, -100))


def build_idefics(alpha_type="float", impl="sdpa", seed=0):
    cfg = transformers.IdeficsConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        cross_layer_interval=1, alpha_type=alpha_type, alpha_initializer="ones", qk_layer_norms=True,
        max_position_embeddings=64, freeze_text_layers=False, freeze_vision_layers=False,
        vision_config=dict(embed_dim=16, image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32),
        perceiver_config=dict(use_resampler=False))
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    model = transformers.IdeficsForVisionText2Text(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "alpha" in n:
                p.uniform_(-1.0, 1.0)
    return model


def idefics_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    B, L, N = 2, 7, 2
    ids = torch.randint(3, 60, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :2] = 0
    iam = torch.zeros(B, L, N, dtype=torch.long)
    iam[0, 2:, 0] = 1
    iam[0, 5:, 1] = 1
    iam[1, 3:, 0] = 1
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(B, N, 3, 16, 16, generator=g),
                image_attention_mask=iam, labels=ids.masked_fill(am == 0, -100))


def run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def generate(model, inputs, n=5):
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        return model.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=0)


def check_parity(model, inputs, kind, n_layers):
    """Patched == unpatched: logits, loss, every gradient, greedy generation; unpatch restores bit for bit."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits0, loss0, grads0 = run(model, inputs)
    gen0 = generate(model, inputs)
    flamingo.stats.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastbridgeFallbackWarning)  # the fused path, no fallback
        fastbridge.patch(model)
        assert model.fastbridge_report.counts[kind] == n_layers
        fastbridge.reset_stats()
        logits1, loss1, grads1 = run(model, inputs)
        assert flamingo.stats == {f"{kind} fused": n_layers}
        s = fastbridge.stats(model)[kind]  # the project-wide record: the reference backend ran, no fallback
        assert (s.fused, s.reference, s.fallbacks) == (0, n_layers, 0)
        gen1 = generate(model, inputs)
    torch.testing.assert_close(logits1, logits0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss1, loss0, atol=2e-6, rtol=1e-6)
    assert sorted(grads1) == sorted(grads0) and len(grads0) > 20
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=2e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
    assert torch.equal(gen1, gen0)
    assert flamingo.stats[f"{kind} fused"] > n_layers  # decoding steps ran fused too
    fastbridge.unpatch(model)
    assert all(type(m).__module__.startswith("transformers") for m in model.modules() if "CrossAttention" in
               type(m).__name__)
    logits2, loss2, grads2 = run(model, inputs)
    assert torch.equal(logits2, logits0) and torch.equal(loss2, loss0)
    assert all(torch.equal(grads2[n], grads0[n]) for n in grads0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mllama_parity(impl):
    with fastbridge.use_backend("reference"):
        check_parity(build_mllama(impl), mllama_batch(), flamingo.MLLAMA, 1)


@pytest.mark.parametrize("alpha_type", ["float", "vector"])
def test_idefics_parity(alpha_type):
    with fastbridge.use_backend("reference"):
        check_parity(build_idefics(alpha_type), idefics_batch(), flamingo.IDEFICS, 2)


def test_mllama_training_mode_and_frozen_base():
    """Flamingo training: everything frozen but the cross-attention layers, train mode (dropout 0)."""
    model = build_mllama().train()
    for n, p in model.named_parameters():
        p.requires_grad_("layers.1." in n)
    inputs = mllama_batch(seed=3)
    with fastbridge.use_backend("reference"):
        _, loss0, grads0 = run(model, inputs)
        fastbridge.patch(model)
        _, loss1, grads1 = run(model, inputs)
    fastbridge.unpatch(model)
    torch.testing.assert_close(loss1, loss0, atol=2e-6, rtol=1e-6)
    assert sorted(grads1) == sorted(grads0) and any("cross_attn_attn_gate" in n for n in grads0)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=2e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mllama_half_precision(dtype):
    """A model in bf16 / fp16 (gate folded in the model's dtype): the same logits and gate gradients within
    the dtype's rounding."""
    model = build_mllama().to(dtype)
    inputs = mllama_batch()
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with fastbridge.use_backend("reference"):
        logits0, loss0, grads0 = run(model, inputs)
        fastbridge.patch(model)
        logits1, loss1, grads1 = run(model, inputs)
    fastbridge.unpatch(model)
    assert logits1.dtype == logits0.dtype == dtype
    torch.testing.assert_close(logits1.float(), logits0.float(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(loss1.float(), loss0.float(), atol=0.02, rtol=0.02)
    for n in grads0:
        if "gate" in n:
            torch.testing.assert_close(grads1[n].float(), grads0[n].float(), atol=0.05, rtol=0.05,
                                       msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("which", ["mllama", "idefics"])
def test_autocast_bf16(which):
    """fp32 model under torch.autocast(bf16): the per-head RMSNorms hand fp32 q / k next to a bf16 v; the
    attention runs in bf16 as transformers' does, the residual stream stays fp32."""
    model, inputs = (build_mllama(), mllama_batch()) if which == "mllama" else (build_idefics(), idefics_batch())
    model.train()
    with fastbridge.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        logits0, loss0, grads0 = run(model, inputs)
        fastbridge.patch(model)
        flamingo.stats.clear()
        logits1, loss1, grads1 = run(model, inputs)
    fastbridge.unpatch(model)
    assert sum(flamingo.stats.values()) == sum(v for k, v in flamingo.stats.items() if k.endswith("fused")) > 0
    assert logits1.dtype == logits0.dtype
    torch.testing.assert_close(logits1.float(), logits0.float(), atol=0.02, rtol=0.02)
    torch.testing.assert_close(loss1, loss0, atol=0.01, rtol=0.01)
    for n in grads0:
        if "gate" in n or "alpha" in n:
            torch.testing.assert_close(grads1[n], grads0[n], atol=0.02, rtol=0.05, msg=lambda s, n=n: f"{n}: {s}")


# ------------------------------------------------------------------------------------------ the masks
def test_plan_from_mask_is_exact():
    """The structured plan reproduces the dense mask: segments merge where possible, split where needed."""
    mn = torch.finfo(torch.float32).min
    B, Lq, seg, S = 2, 6, 5, 4
    g = torch.Generator().manual_seed(0)
    vis = torch.rand(B, Lq, S, generator=g) < 0.5
    vis[0, 0] = False                                   # a row that sees nothing: all keys, as softmax does
    vis[1, 0] = torch.tensor([True, False, True, False])
    dense = torch.where(vis.repeat_interleave(seg, -1), 0.0, mn)[:, None]
    plan = flamingo._derive_plan(dense, B)
    assert plan.segment_len % seg == 0 and plan.lk == S * seg
    expanded = plan.visibility.repeat_interleave(plan.segment_len, -1)
    expect = vis.repeat_interleave(seg, -1)
    expect |= ~expect.any(-1, keepdim=True)           # blind rows (row [0, 0], and any the draw made)
    assert expect[0, 0].all() and torch.equal(expanded, expect)
    # a per-key mask (no structure) still runs fused, with segments of one key
    per_key = torch.rand(B, Lq, 13, generator=g) < 0.5
    per_key[0, 0, :2] = torch.tensor([True, False])
    plan = flamingo._derive_plan(torch.where(per_key, 0.0, mn)[:, None], B)
    assert plan.segment_len == 1 and torch.equal(plan.visibility, per_key | ~per_key.any(-1, keepdim=True))
    # all visible: no mask at all
    plan = flamingo._derive_plan(torch.zeros(1, 1, Lq, 10), B)
    assert plan.visibility is None
    # a bias is not a visibility mask
    assert isinstance(flamingo._derive_plan(torch.randn(B, 1, Lq, 10), B), str)
    assert isinstance(flamingo._derive_plan(torch.full((B, 1, Lq, 10), float("-inf")), B), str)


def test_mask_plan_cached_once_per_tensor(monkeypatch):
    calls = []
    real = flamingo._derive_plan
    monkeypatch.setattr(flamingo, "_derive_plan", lambda m, B: calls.append(1) or real(m, B))
    mask = torch.zeros(2, 1, 3, 10)
    mask[..., 5:] = torch.finfo(torch.float32).min
    p1 = flamingo._mask_plan(mask, 2, 3)
    p2 = flamingo._mask_plan(mask, 2, 3)
    assert p1 is p2 and len(calls) == 1
    mask[..., 5:] = 0.0          # modified in place: derived again
    assert flamingo._mask_plan(mask, 2, 3).visibility is None and len(calls) == 2


def test_fallback_warns_once_and_matches():
    """A dense mask the op does not express (a bias) runs transformers' forward, announced once."""
    model = build_mllama()
    layer = model.model.language_model.layers[1]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 32, generator=g)
    states = torch.randn(2, 10, 32, generator=g)
    bias = torch.randn(2, 1, 4, 10, generator=g)
    kw = dict(cross_attention_states=states, cross_attention_mask=bias, attention_mask=None,
              full_text_row_masked_out_mask=None)
    with torch.no_grad():
        ref = layer(h, **kw)
        fastbridge.patch(model)
        flamingo._warned.clear()
        flamingo.stats.clear()
        fastbridge.reset_stats()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out = layer(h, **kw)
            out2 = layer(h, **kw)
    fastbridge.unpatch(model)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    fb = [w for w in rec if issubclass(w.category, FastbridgeFallbackWarning)]
    assert len(fb) == 1 and "a bias" in str(fb[0].message)
    assert sum(v for k, v in flamingo.stats.items() if "fallback" in k) == 2
    s = fastbridge.stats(integrations=[flamingo.MLLAMA])[flamingo.MLLAMA]
    assert s.fallbacks == 2 and s.fused == s.reference == 0 and "a bias" in next(iter(s.fallback))


def test_output_attentions_falls_back():
    model = build_mllama("eager")
    inputs = {k: v for k, v in mllama_batch().items() if k != "labels"}
    with torch.no_grad(), fastbridge.use_backend("reference"):
        ref = model(**inputs, output_attentions=True)
        fastbridge.patch(model)
        flamingo._warned.clear()
        with pytest.warns(FastbridgeFallbackWarning, match="output_attentions"):
            out = model(**inputs, output_attentions=True)
        # transformers keeps its (now inactive) capturing hooks on the attention modules: fused again after
        assert model.model.language_model.layers[1].cross_attn._forward_hooks
        flamingo.stats.clear()
        again = model(**inputs)
        assert flamingo.stats == {f"{flamingo.MLLAMA} fused": 1}
    fastbridge.unpatch(model)
    torch.testing.assert_close(again.logits, ref.logits)
    assert len(out.attentions) == len(ref.attentions) == 3
    torch.testing.assert_close(out.attentions[1], ref.attentions[1])
    torch.testing.assert_close(out.logits, ref.logits)


def test_instance_forward_is_left_alone_and_said():
    """A layer with an instance-level forward (accelerate's hooks) would shadow the class swap: not patched,
    not reported as patched, and a one-time warning says so."""
    model = build_mllama()
    layer = model.model.language_model.layers[1]
    layer.forward = layer.forward  # what accelerate's add_hook_to_module does (bound to the original)
    flamingo._warned.clear()
    with pytest.warns(FastbridgeFallbackWarning, match="instance-level forward"):
        fastbridge.patch(model)
    assert not model.fastbridge_report.counts and type(layer).__module__.startswith("transformers")


# --------------------------------------------------------------------------------------- persistence
def test_pickle_deepcopy_and_fresh_process_lookup():
    model = build_mllama()
    inputs = {k: v for k, v in mllama_batch().items() if k != "labels"}
    with fastbridge.use_backend("reference"), torch.no_grad():
        fastbridge.patch(model)
        ref = model(**inputs).logits
        twin = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        # as in a fresh process: the fused class is rebuilt by name (module __getattr__) when unpickled
        fused_name = type(model.model.language_model.layers[1]).__name__
        flamingo.__dict__.pop(fused_name)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (twin, loaded):
            assert type(m.model.language_model.layers[1]).__name__ == fused_name
            assert torch.equal(m(**inputs).logits, ref)
        fastbridge.unpatch(loaded)
        assert type(loaded.model.language_model.layers[1]) is \
            transformers.models.mllama.modeling_mllama.MllamaCrossAttentionDecoderLayer


# -------------------------------------------------------------------------------------------- kernel
@needs_interpreter
@pytest.mark.parametrize("which", ["mllama", "idefics"])
def test_kernel_matches_reference(which):
    """The Triton kernels (interpreter) inside the patched model (mllama: GQA, tiles) against the reference."""
    model, inputs = (build_mllama(), mllama_batch()) if which == "mllama" else (build_idefics(), idefics_batch())
    model.train()
    fastbridge.patch(model)
    with fastbridge.use_backend("kernel"):
        logits_k, loss_k, grads_k = run(model, inputs)
    with fastbridge.use_backend("reference"):
        logits_r, loss_r, grads_r = run(model, inputs)
    fastbridge.unpatch(model)
    torch.testing.assert_close(logits_k, logits_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss_k, loss_r, atol=1e-4, rtol=1e-4)
    for n in grads_r:
        torch.testing.assert_close(grads_k[n], grads_r[n], atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")


# ----------------------------------------------------------------------------------- compile, checkpointing
def _layer_call(model, inputs):
    """A patched cross-attention layer and the arguments the model calls it with."""
    layer = next(m for m in model.modules() if type(m).__name__.startswith("Fused"))
    seen = {}
    h = layer.register_forward_pre_hook(lambda mod, a, kw: seen.setdefault("call", (a, kw)) and None,
                                        with_kwargs=True)
    with torch.no_grad():
        model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
    h.remove()
    return layer, seen["call"]


@pytest.mark.parametrize("which", ["mllama", "idefics"])
def test_fused_layer_compiles_without_graph_breaks(which):
    """torch.compile(fullgraph=True) traces the patched layer: no data-dependent Python branch on the mask."""
    model, inputs = (build_mllama(), mllama_batch()) if which == "mllama" else (build_idefics(), idefics_batch())
    with fastbridge.use_backend("reference"):
        fastbridge.patch(model)
        layer, (args, kwargs) = _layer_call(model, inputs)
        with torch.no_grad():
            expect = layer(*args, **kwargs)
            got = torch.compile(layer.forward, fullgraph=True, backend="eager")(*args, **kwargs)
    fastbridge.unpatch(model)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)


def test_compiled_plan_checks_the_mask():
    """The compiled path cannot fall back: a mask that is not segment-structured at the config's segment
    length raises (torch._assert_async) instead of computing something else."""
    mn = torch.finfo(torch.float32).min
    layer = torch.nn.Module()
    setattr(layer, flamingo._SEGMENT_HINT, 5)
    vis = torch.tensor([[[True, False]] * 3])                          # (1, 3, 2 segments)
    good = torch.where(vis.repeat_interleave(5, -1), 0.0, mn)[:, None]
    plan = flamingo._compiled_plan(layer, good, 1, 3, 10)
    assert plan.segment_len == 5 and torch.equal(plan.visibility, vis)
    bad = good.clone()
    bad[0, 0, 1, 7] = 0.0                                                # one key of a hidden segment visible
    with pytest.raises(RuntimeError):
        flamingo._compiled_plan(layer, bad, 1, 3, 10)


def test_gradient_checkpointing_parity():
    model = build_mllama().train()
    model.gradient_checkpointing_enable()
    inputs = mllama_batch(seed=4)
    with fastbridge.use_backend("reference"):
        _, loss0, grads0 = run(model, inputs)
        fastbridge.patch(model)
        calls = []
        hook = model.model.language_model.layers[1].cross_attn.q_proj.register_forward_hook(
            lambda *a: calls.append(1))
        flamingo.stats.clear()
        _, loss1, grads1 = run(model, inputs)
        hook.remove()
    fastbridge.unpatch(model)
    assert len(calls) == 2  # forward + recomputation
    assert set(flamingo.stats) == {f"{flamingo.MLLAMA} fused"}
    torch.testing.assert_close(loss1, loss0, atol=2e-6, rtol=1e-6)
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], atol=2e-5, rtol=1e-4, msg=lambda s, n=n: f"{n}: {s}")
