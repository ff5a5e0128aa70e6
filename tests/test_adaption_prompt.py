"""fastbridge.modules.AdaptionPromptAttention / DynamicPromptGenerator (LLaMA-Adapter), CPU and CUDA.

The fused op runs through the default backend selection (auto: the eager reference on CPU unless
TRITON_INTERPRET=1 and the kernel is there); one test forces the Triton kernel and compares it with the
reference. The module's unfused path (``fused=False``) is the plain eager composition (repeated k/v,
two softmaxes), an implementation independent of fastbridge.reference.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fastbridge
from fastbridge.modules import AdaptionPromptAttention, DynamicPromptGenerator

from conftest import HAS_CUDA, assert_close, needs_interpreter

pytestmark = pytest.mark.filterwarnings("ignore::fastbridge.FastbridgeFallbackWarning")

HIDDEN, HEADS, KV_HEADS, P = 64, 4, 2, 4
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def make(seed=0, *, gate_value=None, device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_kv_heads", KV_HEADS)
    m = AdaptionPromptAttention(HIDDEN, HEADS, P, **kw).to(device=device, dtype=dtype)
    if gate_value is not None:
        with torch.no_grad():
            m.adaption_gate.copy_(torch.linspace(-gate_value, gate_value, m.adaption_gate.numel()) + 0.3)
    return m


def x_of(B=2, L=6, seed=1, device="cpu", dtype=torch.float32):
    return torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def padding(B=2, L=6, device="cpu"):
    m = torch.ones(B, L, dtype=torch.bool)
    m[0, :2] = False   # left padding (two fully masked query rows)
    m[1, -1] = False   # right padding
    return m.to(device)


def fwd_bwd(m, x, **kw):
    m.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    out = m(xx, **kw)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    (out * dout).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    grads["x"] = xx.grad.detach().clone()
    return out.detach(), grads


def compare_fused_eager(m, x, dtype, **kw):
    m.fused = True
    out_f, g_f = fwd_bwd(m, x, **kw)
    m.fused = False
    out_e, g_e = fwd_bwd(m, x, **kw)
    m.fused = True
    assert_close(out_f, out_e, dtype, "out")
    assert set(g_f) == set(g_e)
    for n in g_f:
        assert_close(g_f[n], g_e[n], dtype, f"d{n}")


# ------------------------------------------------------------------------------- the attention block
def test_zero_init_gate_is_plain_causal_attention():
    """A freshly added adapter (gates 0) leaves the attention's output unchanged, per-head tanh or PEFT."""
    for kw in (dict(), dict(gate="scalar", gate_fn="identity")):
        m = make(rope_theta=None, **kw)
        assert torch.count_nonzero(m.adaption_gate) == 0
        x = x_of()
        B, L, _ = x.shape
        q = m.q_proj(x).view(B, L, HEADS, -1).transpose(1, 2)
        k = m.k_proj(x).view(B, L, KV_HEADS, -1).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
        v = m.v_proj(x).view(B, L, KV_HEADS, -1).transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, 1)
        plain = m.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, -1))
        assert_close(m(x), plain, torch.float32, f"zero-gate output {kw}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ctor,opts", [
    pytest.param(dict(), dict(), id="head-tanh-gqa"),
    pytest.param(dict(gate="scalar", gate_fn="identity"), dict(pad=True), id="peft-scalar-padded"),
    pytest.param(dict(num_kv_heads=1, bias=True), dict(pad=True, add=True), id="mqa-bias-padded-multimodal"),
    pytest.param(dict(num_kv_heads=HEADS), dict(prompt=True), id="mha-dynamic-prompt"),
    pytest.param(dict(causal=False, rope_theta=None), dict(pad=True), id="noncausal-norope"),
])
def test_fused_matches_eager_composition(device, ctor, opts):
    """Outputs and every gradient (projections, prompt, gate, input) equal the eager composition."""
    m = make(gate_value=0.8, device=device, **ctor)
    x = x_of(device=device)
    kw = {}
    if opts.get("pad"):
        kw["attention_mask"] = padding(device=device)
    if opts.get("add"):
        kw["prompt_add"] = torch.randn(2, P, HIDDEN, device=device, requires_grad=True)
    if opts.get("prompt"):
        kw["prompt"] = torch.randn(2, P + 3, HIDDEN, device=device)
    compare_fused_eager(m, x, torch.float32, **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half(dtype):
    m = make(gate_value=0.8, device="cuda", dtype=dtype)
    compare_fused_eager(m, x_of(device="cuda", dtype=dtype), dtype, attention_mask=padding(device="cuda"))


def test_per_sample_prompt_only_affects_its_sample():
    m = make(gate_value=0.8)
    x = x_of()
    add = torch.zeros(2, P, HIDDEN)
    base = m(x, prompt_add=add)
    add[1] = torch.randn(P, HIDDEN)
    out = m(x, prompt_add=add)
    assert torch.equal(out[0], base[0])
    assert (out[1] - base[1]).abs().max() > 1e-3
    # a (1, P, hidden) zero addition is the learned prompt itself
    assert_close(m(x, prompt_add=torch.zeros(1, P, HIDDEN)), m(x), torch.float32, "zero prompt_add")


def test_kv_cache_decoding_matches_full_sequence():
    from transformers import DynamicCache

    m = make(gate_value=0.8)
    x = x_of(L=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    full = m(x, attention_mask=mask)
    cache = DynamicCache()
    steps = [m(x[:, :4], attention_mask=mask[:, :4], past_key_values=cache)]
    for t in range(4, 7):
        steps.append(m(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache))
    assert cache.get_seq_length(0) == 7
    assert_close(torch.cat(steps, dim=1), full, torch.float32, "cached decoding")


def test_external_position_embeddings_match_builtin_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    m = make(gate_value=0.5)
    x = x_of()
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    pos = torch.arange(3, 9).unsqueeze(0)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, position_ids=pos)
    assert_close(m(x, position_embeddings=cos_sin), m(x, position_ids=pos), torch.float32, "rope")


def _llama_attention(seed=0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      attn_implementation="sdpa")
    return cfg, LlamaAttention(cfg, layer_idx=0).eval(), LlamaRotaryEmbedding(cfg)


def test_from_attention_shares_frozen_projections_and_is_identity_at_init():
    cfg, attn, rope = _llama_attention()
    m = AdaptionPromptAttention.from_attention(attn, prompt_len=P)
    assert m.q_proj is attn.q_proj and m.o_proj is attn.o_proj
    assert not any(p.requires_grad for p in attn.parameters())
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == ["adaption_gate", "adaption_prompt"]
    assert m.adaption_gate.shape == (HEADS,) and m.rope_theta == cfg.rope_parameters["rope_theta"]
    x = x_of()
    pe = rope(x, position_ids=torch.arange(6).unsqueeze(0))
    expected, _ = attn(x, position_embeddings=pe, attention_mask=None)
    assert_close(m(x), expected, torch.float32, "from_attention, zero gate")


def test_peft_style_matches_peft_adapted_attention():
    """gate='scalar', gate_fn='identity' is PEFT's AdaptedAttention (same state-dict names)."""
    pytest.importorskip("peft")
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    cfg, attn, rope = _llama_attention()
    peft_attn = AdaptedAttention("llama", P, attn)
    with torch.no_grad():
        peft_attn.adaption_gate.fill_(0.6)
    m = AdaptionPromptAttention.from_attention(attn, prompt_len=P, gate="scalar", gate_fn="identity")
    m.load_state_dict({k: v for k, v in peft_attn.state_dict().items() if k.startswith("adaption_")}, strict=False)
    x = x_of()
    pe = rope(x, position_ids=torch.arange(6).unsqueeze(0))
    expected, _ = peft_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)
    assert_close(m(x), expected, torch.float32, "vs PEFT AdaptedAttention")
    assert AdaptionPromptAttention.peft_style(HIDDEN, HEADS).adaption_gate.shape == (1,)


def test_patch_unpatch_toggle_fused():
    net = torch.nn.Sequential(make(gate_value=0.5))
    fastbridge.unpatch(fastbridge.patch(net))
    assert net[0].fused is False
    fastbridge.patch(net)
    assert net[0].fused is True and "0" in net.fastbridge_report.patched


def test_save_load_trainable_roundtrip(tmp_path):
    a = torch.nn.ModuleDict(dict(attn=make(gate_value=0.5), gen=DynamicPromptGenerator(16, HIDDEN, P)))
    for p in a["attn"].parameters():
        p.requires_grad_(False)
    a["attn"].adaption_prompt.requires_grad_(True)
    a["attn"].adaption_gate.requires_grad_(True)
    saved = fastbridge.save_trainable(a, tmp_path / "bridge.safetensors")
    assert "attn.adaption_prompt" in saved and "attn.adaption_gate" in saved and "gen.fc2.weight" in saved
    assert not any(k.startswith("attn.q_proj") for k in saved)
    b = torch.nn.ModuleDict(dict(attn=make(seed=5), gen=DynamicPromptGenerator(16, HIDDEN, P)))
    b["attn"].load_state_dict({k: v for k, v in a["attn"].state_dict().items() if "adaption" not in k}, strict=False)
    for p in b["attn"].parameters():
        p.requires_grad_(False)
    b["attn"].adaption_prompt.requires_grad_(True)
    b["attn"].adaption_gate.requires_grad_(True)
    fastbridge.load_trainable(b, tmp_path / "bridge.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    e = torch.randn(2, 16)
    assert torch.equal(b["attn"](x_of(), prompt_add=b["gen"](e)), a["attn"](x_of(), prompt_add=a["gen"](e)))


# ------------------------------------------------------------------------------ the prompt generator
@pytest.mark.parametrize("pool,shape", [("mean", (2, 16)), ("mean", (2, 5, 16)), ("tokens", (2, P, 16)),
                                        ("attention", (2, 5, 16))])
def test_generator_shapes_and_masking(pool, shape):
    torch.manual_seed(0)
    g = DynamicPromptGenerator(16, HIDDEN, P, pool=pool, mlp_hidden=32, layer_norm=True)
    e = torch.randn(*shape)
    out = g(e)
    assert out.shape == (2, P, HIDDEN)
    out.sum().backward()
    assert all(p.grad is not None for p in g.parameters())
    if len(shape) == 3 and pool != "tokens":  # padded tokens never change the prompts
        mask = torch.ones(shape[:2], dtype=torch.bool)
        mask[:, -2:] = False
        junk = e.clone()
        junk[:, -2:] = 100.0
        assert_close(g(junk, mask=mask), g(e[:, :-2]), torch.float32, "masked tokens")


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_generator_padding_never_reaches_a_prompt(pool):
    """Padded positions holding NaN / inf / huge values change no prompt; a sample whose every position is
    padded gets the same prompt whatever its padding holds (kernel review, item 17)."""
    torch.manual_seed(0)
    g = DynamicPromptGenerator(16, HIDDEN, P, pool=pool, mlp_hidden=32)
    e = torch.randn(3, 6, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, -2:] = False   # partly padded
    mask[2, :] = False     # nothing real
    outs = []
    for junk in (float("nan"), float("inf"), 1e4, -73.0):
        e2 = e.clone()
        e2[~mask] = junk
        out = g(e2, mask=mask)
        assert torch.isfinite(out).all(), f"padding {junk} leaked"
        outs.append(out)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    assert_close(outs[0][:1], g(e[:1, :-2]), torch.float32, "partly padded sample")
    assert_close(outs[0][1:2], g(e[1:2]), torch.float32, "unpadded sample")
    # nothing real pools to the zero vector
    assert_close(outs[0][2:], g(torch.zeros(1, 1, 16)), torch.float32, "fully padded sample")
    # gradients stay finite too (0·NaN would poison the projection's gradient)
    e2 = e.clone()
    e2[~mask] = float("nan")
    g(e2, mask=mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters())


def test_generator_tokens_pool_refuses_a_mask():
    g = DynamicPromptGenerator(16, HIDDEN, P, pool="tokens")
    with pytest.raises(ValueError, match="'mask' must be None with pool='tokens'"):
        g(torch.randn(2, P, 16), mask=torch.ones(2, P, dtype=torch.bool))


def test_generator_zero_init_starts_from_learned_prompt():
    m = make(gate_value=0.8)
    g = DynamicPromptGenerator(16, HIDDEN, P, zero_init=True)
    x = x_of()
    prompts = g(torch.randn(2, 16))
    assert torch.count_nonzero(prompts) == 0
    assert_close(m(x, prompt_add=prompts), m(x), torch.float32, "zero-init generator")


def test_generator_feeds_per_sample_prompts_fused():
    m = make(gate_value=0.8)
    g = DynamicPromptGenerator(16, HIDDEN, P, pool="attention")
    feats = torch.randn(2, 9, 16)
    compare_fused_eager(m, x_of(), torch.float32, prompt=g(feats).detach())
    # the generator is trained through the fused op
    m(x_of(), prompt_add=g(feats)).sum().backward()
    assert g.queries.grad is not None and g.fc2.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build,arg", [
    (lambda: AdaptionPromptAttention(HIDDEN, HEADS, P, num_kv_heads=3), "num_kv_heads"),
    (lambda: AdaptionPromptAttention(HIDDEN, HEADS, 0), "prompt_len"),
    (lambda: AdaptionPromptAttention(HIDDEN, HEADS, P, gate="layer"), "gate"),
    (lambda: AdaptionPromptAttention(HIDDEN, HEADS, P, gate_fn="sigmoid"), "gate_fn"),
    (lambda: AdaptionPromptAttention(HIDDEN, 5, P), "head_dim"),
    (lambda: AdaptionPromptAttention(HIDDEN, HEADS, P, scale=-1.0), "scale"),
    (lambda: DynamicPromptGenerator(16, HIDDEN, P, pool="max"), "pool"),
    (lambda: DynamicPromptGenerator(16, HIDDEN, P, activation="tanh"), "activation"),
    (lambda: AdaptionPromptAttention.from_attention(torch.nn.Linear(4, 4)), "attn"),
])
def test_bad_construction_names_argument(build, arg):
    with pytest.raises(ValueError, match=f"'{arg}'"):
        build()


@pytest.mark.parametrize("call,arg", [
    (lambda m, x: m(x[..., :10]), "hidden_states"),
    (lambda m, x: m(x, attention_mask=torch.ones(2, 5, dtype=torch.bool)), "attention_mask"),
    (lambda m, x: m(x, attention_mask=torch.ones(2, 6)), "attention_mask"),
    (lambda m, x: m(x, prompt=torch.zeros(3, P, HIDDEN)), "prompt"),
    (lambda m, x: m(x, prompt_add=torch.zeros(2, P + 1, HIDDEN)), "prompt_add"),
    (lambda m, x: m(x, position_embeddings=torch.zeros(3)), "position_embeddings"),
    (lambda m, x: m(x, past_key_values=object()), "past_key_values"),
    (lambda m, x: DynamicPromptGenerator(16, HIDDEN, P)(torch.zeros(2, 15)), "embeddings"),
    (lambda m, x: DynamicPromptGenerator(16, HIDDEN, P, pool="tokens")(torch.zeros(2, 16)), "embeddings"),
    (lambda m, x: DynamicPromptGenerator(16, HIDDEN, P, pool="tokens")(torch.zeros(2, P + 1, 16)), "embeddings"),
    (lambda m, x: DynamicPromptGenerator(16, HIDDEN, P)(torch.zeros(2, 3, 16), mask=torch.ones(2, 4)), "mask"),
])
def test_bad_forward_input_names_argument(call, arg):
    with pytest.raises(ValueError, match=f"'{arg}'"):
        call(make(), x_of())


# ------------------------------------------------------------------------------ the Triton kernel
@needs_interpreter
def test_kernel_matches_reference():
    m = make(gate_value=0.8)
    x = x_of(B=2, L=5)
    kw = dict(attention_mask=padding(L=5), prompt_add=torch.randn(2, P, HIDDEN))
    with fastbridge.use_backend("kernel"):
        out_k, g_k = fwd_bwd(m, x, **kw)
    with fastbridge.use_backend("reference"):
        out_r, g_r = fwd_bwd(m, x, **kw)
    torch.testing.assert_close(out_k, out_r, atol=1e-4, rtol=1e-4)
    for n in g_r:
        torch.testing.assert_close(g_k[n], g_r[n], atol=1e-4, rtol=1e-4, msg=lambda s, n=n: f"d{n}: {s}")
