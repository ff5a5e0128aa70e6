"""transformers integration: the "fastbridge" attention implementation and fastbridge.patch for BLIP-2 /
InstructBLIP Q-Formers. Parity of logits, loss and every gradient with the unpatched model on tiny
random models (padded InstructBLIP instructions, so the padding mask matters), what patch changes and
what unpatch restores, the batched key / value projections, the SDPA routing of cases the kernels do
not serve (causal LLM attention, GQA), the query-batch-1 broadcast (Granite Speech calls the Q-Former
that way). Everything on CPU (the C++ kernel); the same tests run the CUDA kernels where a GPU is present.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastbridge  # noqa: E402
from fastbridge.integrations import qformer as QF  # noqa: E402
from fastbridge.integrations import transformers as FT  # noqa: E402
from fastbridge.ops.qformer_cross_attention import ensure_loaded  # noqa: E402

from conftest import HAS_CUDA, assert_close  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
# 4 layers, cross-attention every 2nd (layers 0 and 2: two cross-attention layers to batch), head dim 32
QFORMER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2, vocab_size=99,
               encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0, attention_probs_dropout_prob=0.0,
               hidden_dropout_prob=0.0)
OPT = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
           max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
           dropout=0.0, attention_dropout=0.0)
IMAGE_TOKEN, N_QUERY, B = 98, 5, 3


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ensure_loaded()


@pytest.fixture(autouse=True)
def _kernel_backend():
    with fastbridge.use_backend("kernel"):  # the kernels run, or the test fails (no silent fallback)
        yield


def _g(seed):
    return torch.Generator().manual_seed(seed)


def blip2(device):
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT,
                                   num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN)
    model = transformers.Blip2ForConditionalGeneration(cfg).to(device)
    ids = torch.cat([torch.full((B, N_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (B, 7), generator=_g(2))], 1)
    inputs = dict(pixel_values=torch.randn(B, 3, 32, 32, generator=_g(1)), input_ids=ids, labels=ids)
    return model, {k: v.to(device) for k, v in inputs.items()}


def instructblip(device):
    torch.manual_seed(0)
    cfg = transformers.InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER, text_config=OPT,
                                          num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN)
    model = transformers.InstructBlipForConditionalGeneration(cfg).to(device)
    ids = torch.cat([torch.full((B, N_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (B, 7), generator=_g(2))], 1)
    qmask = torch.ones(B, 9, dtype=torch.long)
    qmask[0, 4:] = 0  # padded instructions: the Q-Former's self-attention mask matters
    qmask[1, 7:] = 0
    inputs = dict(pixel_values=torch.randn(B, 3, 32, 32, generator=_g(1)), input_ids=ids, labels=ids,
                  qformer_input_ids=torch.randint(3, 90, (B, 9), generator=_g(3)), qformer_attention_mask=qmask)
    return model, {k: v.to(device) for k, v in inputs.items()}


MODELS = {"blip2": blip2, "instructblip": instructblip}


def train_step(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_step(a, b, what):
    (la, lossa, ga), (lb, lossb, gb) = a, b
    assert_close(la, lb, torch.float32, f"{what}: logits")
    assert_close(lossa, lossb, torch.float32, f"{what}: loss")
    assert set(ga) == set(gb), f"{what}: gradients of different parameters"
    for n in gb:
        assert_close(ga[n], gb[n], torch.float32, f"{what}: grad {n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(MODELS))
def test_patched_model_matches_unpatched(family, device):
    model, inputs = MODELS[family](device)
    model.train()  # dropout probabilities are 0 in these configs: training mode, deterministic
    expected = train_step(model, inputs)
    keys = list(model.state_dict())
    fastbridge.patch(model)
    assert model.config.qformer_config._attn_implementation == "fastbridge"
    assert model.config.vision_config._attn_implementation != "fastbridge"
    assert model.config.text_config._attn_implementation != "fastbridge"
    assert list(model.state_dict()) == keys
    calls = []
    orig = QF._KVBatch.compute
    try:
        QF._KVBatch.compute = lambda self, x: (calls.append(x.shape), orig(self, x))[1]
        got = train_step(model, inputs)
    finally:
        QF._KVBatch.compute = orig
    assert len(calls) == 1, "the cross-attention K/V projections were not batched"
    assert_same_step(got, expected, f"{family} patched")
    with torch.no_grad():  # eval / inference too
        model.eval()
        assert_close(model(**inputs).logits, expected[0], torch.float32, "eval logits")
        model.train()
    fastbridge.unpatch(model)
    assert model.config.qformer_config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not hasattr(model.qformer, QF._KV) and not model.qformer.encoder._forward_pre_hooks
    assert_same_step(train_step(model, inputs), expected, f"{family} unpatched")


def test_patch_is_idempotent_and_reported():
    model, inputs = blip2("cpu")
    fastbridge.patch(model)
    fastbridge.patch(model)
    assert model.fastbridge_report.counts["transformers.QFormer"] == 1
    assert len(model.qformer.encoder._forward_pre_hooks) == 1
    fastbridge.unpatch(model)
    assert model.config.qformer_config._attn_implementation == "sdpa"


def test_gradient_checkpointing_projects_per_layer():
    model, inputs = blip2("cpu")
    model.train()
    expected = train_step(model, inputs)
    enable = getattr(model.qformer, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.x
        model.qformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert QF._checkpointing(model.qformer.encoder)
    fastbridge.patch(model)
    calls = []
    orig = QF._KVBatch.compute
    try:
        QF._KVBatch.compute = lambda self, x: (calls.append(1), orig(self, x))[1]
        got = train_step(model, inputs)
    finally:
        QF._KVBatch.compute = orig
    assert calls == [], "K/V batching must be off under gradient checkpointing"
    assert_same_step(got, expected, "checkpointed")


def test_batch_kv_option_off():
    model, inputs = blip2("cpu")
    fastbridge.patch(model, qformer_batch_kv=False)
    assert not hasattr(model.qformer, QF._KV)
    assert model.config.qformer_config._attn_implementation == "fastbridge"
    fastbridge.unpatch(model)


@pytest.mark.parametrize("device", DEVICES)
def test_query_batch_one_broadcast(device):
    """Granite Speech calls a Blip2QFormerModel with one query batch for B feature sequences."""
    torch.manual_seed(0)
    qf = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**QFORMER)).to(device).train()
    queries = torch.randn(1, N_QUERY, 64, device=device, requires_grad=True)
    feats = torch.randn(4, 23, 32, device=device, requires_grad=True)

    def step():
        out = qf(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state
        assert out.shape == (4, N_QUERY, 64)
        grads = torch.autograd.grad(out.square().sum(), [queries, feats, *qf.parameters()], allow_unused=True)
        return out.detach(), grads

    y0, g0 = step()
    fastbridge.patch(qf)
    y1, g1 = step()
    fastbridge.unpatch(qf)
    assert_close(y1, y0, torch.float32, "out")
    for a, e in zip(g1, g0):
        if e is not None:
            assert_close(a, e, torch.float32, "grad")


def test_attention_dropout_in_training_only():
    model, inputs = blip2("cpu")
    model.config.qformer_config.attention_probs_dropout_prob = 0.5
    for m in model.qformer.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    fastbridge.patch(model)
    qf_in = dict(pixel_values=inputs["pixel_values"])
    with torch.no_grad():
        model.eval()
        a = model.get_image_features(**qf_in, return_dict=True).qformer_outputs.last_hidden_state
        b = model.get_image_features(**qf_in, return_dict=True).qformer_outputs.last_hidden_state
        model.train()
        torch.manual_seed(1)
        c = model.get_image_features(**qf_in, return_dict=True).qformer_outputs.last_hidden_state
        torch.manual_seed(1)
        d = model.get_image_features(**qf_in, return_dict=True).qformer_outputs.last_hidden_state
        torch.manual_seed(2)
        e = model.get_image_features(**qf_in, return_dict=True).qformer_outputs.last_hidden_state
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(c, e) and not torch.equal(a, c)


# ------------------------------------------------------------------------------ the attention function
class _Module(torch.nn.Module):
    def __init__(self, causal=False, groups=1):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def _sdpa(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kw)[0]


@pytest.mark.parametrize("mask_kind", ["none", "key", "general", "additive"])
def test_attention_function_matches_sdpa(mask_kind):
    g = _g(4)
    q, k, v = torch.randn(2, 3, 6, 16, generator=g), torch.randn(2, 3, 11, 16, generator=g), torch.randn(2, 3, 11, 16, generator=g)
    mask = None
    if mask_kind == "key":  # how transformers builds a padding mask: query dimension broadcast (stride 0)
        mask = torch.rand(2, 1, 1, 11, generator=g) > 0.3
        mask[..., 0] = True
        mask = mask.expand(2, 1, 6, 11)
    elif mask_kind == "general":
        mask = torch.rand(2, 1, 6, 11, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 6, 11, generator=g)
    module = _Module()
    assert FT.fallback_reason(module, q, k, v, mask) is None
    out, weights = FT.fastbridge_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (2, 6, 3, 16) and out.is_contiguous()
    assert_close(out, _sdpa(module, q, k, v, mask, scaling=0.3), torch.float32, mask_kind)


def test_causal_and_gqa_go_to_sdpa():
    g = _g(5)
    q, k, v = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 4, 7, 16, generator=g)
    causal = _Module(causal=True)
    assert "causal" in FT.fallback_reason(causal, q, k, v, None)
    out, _ = FT.fastbridge_attention_forward(causal, q, k, v, None)
    assert torch.equal(out, _sdpa(causal, q, k, v, None))
    gqa = _Module(groups=2)
    k2, v2 = k[:, :2], v[:, :2]
    assert "grouped-query" in FT.fallback_reason(gqa, q, k2, v2, None)
    out, _ = FT.fastbridge_attention_forward(gqa, q, k2, v2, None)
    assert torch.equal(out, _sdpa(gqa, q, k2, v2, None))


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert FT.is_registered()
    assert AttentionInterface._global_mapping["fastbridge"] is FT.fastbridge_attention_forward
    assert "fastbridge" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_whole_causal_lm_with_fastbridge_attention_equals_sdpa():
    """attn_implementation="fastbridge" on a causal LLM: every call routed to SDPA, masks built by the
    registered mask function (padding included), the same logits."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=99, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 90, (2, 9), generator=_g(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("fastbridge")
        got = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, ref)


def test_dict_form_attn_implementation_switches_only_the_qformer():
    model, inputs = blip2("cpu")
    model.eval()
    with torch.no_grad():
        ref = model(**inputs).logits
        model.set_attn_implementation({"qformer_config": "fastbridge"})
        assert model.config.qformer_config._attn_implementation == "fastbridge"
        assert model.config.text_config._attn_implementation == "sdpa"
        got = model(**inputs).logits
    assert_close(got, ref, torch.float32, "logits")


# ------------------------------------------------------------------------------------------ FSDP2
# One process (world size 1, gloo): the parameters are DTensors all the same, so this is what per-layer
# fully_shard does to the batched K/V projection; tests/test_distributed.py runs 2 processes.
@pytest.fixture
def process_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("torch.distributed.fsdp")
    if dist.is_initialized():
        yield dist
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def blip2_six_layers():
    """6 Q-Former layers: cross-attention in layers 0, 2 and 4."""
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, num_hidden_layers=6),
                                   text_config=OPT, num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN)
    model = transformers.Blip2ForConditionalGeneration(cfg)
    ids = torch.cat([torch.full((B, N_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (B, 7), generator=_g(2))], 1)
    return model, dict(pixel_values=torch.randn(B, 3, 32, 32, generator=_g(1)), input_ids=ids, labels=ids)


def _full_grads(grads):
    return {n: (g.full_tensor() if hasattr(g, "full_tensor") else g) for n, g in grads.items()}


# layout -> (modules sharded before the root, batched GEMMs per forward, K/V projections in them)
FSDP_LAYOUTS = {
    "whole": (lambda m: [], 1, 6),
    "encoder": (lambda m: [m.qformer.encoder], 1, 6),
    "per-layer": (lambda m: list(m.qformer.encoder.layer), 0, 0),  # one cross-attention layer per unit
    "layer-4-only": (lambda m: [m.qformer.encoder.layer[4]], 1, 4),  # layers 0 and 2 still share a unit
    "per-layer-patched-after-fully_shard": (lambda m: list(m.qformer.encoder.layer), 0, 0),
}


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize("layout", list(FSDP_LAYOUTS))
def test_fsdp2_sharding_layouts(layout, process_group):
    """fully_shard per Q-Former layer failed ("aten.addmm.default got mixed torch.Tensor and DTensor": the
    batched K/V GEMM read the layers' weights before their FSDP units unsharded them). Every layout now
    gives the unsharded, unpatched model's logits, loss and gradients; K/V projections are batched within
    an FSDP unit and per layer across units, with a one-time notice."""
    import copy
    import warnings

    from torch.distributed.fsdp import fully_shard

    model, inputs = blip2_six_layers()
    model.train()
    expected = train_step(copy.deepcopy(model), inputs)
    patch_last = layout.endswith("patched-after-fully_shard")
    if not patch_last:
        fastbridge.patch(model)
    inner, n_batches, n_linears = FSDP_LAYOUTS[layout]
    for m in inner(model):
        fully_shard(m)
    fully_shard(model)
    if patch_last:
        fastbridge.patch(model)
    QF._warned.clear()
    calls = []
    orig = QF._KVBatch.compute
    try:
        QF._KVBatch.compute = lambda self, x: (calls.append(len(self.linears)), orig(self, x))[1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits, loss, grads = train_step(model, inputs)
            train_step(model, inputs)  # the notice is shown once
    finally:
        QF._KVBatch.compute = orig
    assert calls == [n_linears] * n_batches * 2, calls
    notices = [w for w in caught if issubclass(w.category, fastbridge.FastbridgeFallbackWarning)]
    sharded_apart = layout != "whole" and layout != "encoder"
    assert len(notices) == int(sharded_apart), [str(w.message) for w in notices]
    if sharded_apart:
        assert "sharded separately" in str(notices[0].message)
    assert_same_step((logits, loss, _full_grads(grads)), expected, f"FSDP2 {layout}")


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module", "ignore::fastbridge.FastbridgeFallbackWarning")
def test_fsdp2_per_layer_mixed_precision(process_group):
    """Per-layer fully_shard with MixedPrecisionPolicy (bf16 compute, fp32 reduction): the patched model
    matches the unpatched one under the same policy (bf16 tolerances)."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, inputs = blip2_six_layers()
    model.train()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results = []
    for patched in (False, True):
        m = copy.deepcopy(model)
        if patched:
            fastbridge.patch(m)
        for layer in m.qformer.encoder.layer:
            fully_shard(layer, mp_policy=policy)
        fully_shard(m, mp_policy=policy)
        logits, loss, grads = train_step(m, inputs)
        results.append((logits.float(), loss.float(), _full_grads(grads)))
    (le, lossE, ge), (lg, lossG, gg) = results
    assert_close(lg, le, torch.bfloat16, "bf16 logits")
    assert_close(lossG, lossE, torch.bfloat16, "bf16 loss")
    assert set(gg) == set(ge)
    for n in ge:
        if ".qformer." in f".{n}" or n.startswith("qformer."):
            assert gg[n].dtype == torch.float32, n  # sharded fp32 parameters, fp32 gradients
            assert_close(gg[n], ge[n], torch.bfloat16, f"bf16 grad {n}")
