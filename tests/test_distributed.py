"""DDP and FSDP2 with fastbridge: 2 processes on CPU (gloo), one spawn per model.

Each case trains a tiny random-init model for STEPS SGD steps in two processes, each on its half of a
global batch -- once under DistributedDataParallel, once under FSDP2 (``fully_shard`` per block, then
the root) -- and compares the per-step losses (the mean of the two ranks' losses) and every updated
trainable parameter with one process training the *unpatched* model on the whole batch (fp32
tolerances of tests/conftest.py). The models:

  (a) a PEFT LLaMA-Adapter model (``peft.AdaptionPromptConfig`` on a LlamaForCausalLM), fastbridge.patch;
  (b) BLIP-2 (Blip2ForConditionalGeneration; Q-Former, query tokens and projection trained),
      fastbridge.patch, FSDP2 with ``fully_shard`` on every Q-Former layer (the batched K/V projection
      then runs per layer, fastbridge/integrations/qformer.py);
  (c) a ViT with fastbridge.add_adapters (only the adapters trained).

Loss means are over equal numbers of elements on both ranks, so the mean of the rank losses is the loss
of the whole batch and DDP's / FSDP's averaged gradients are its gradients. Rendezvous through a file
(no fixed port); the workers inherit the environment (TRITON_INTERPRET, FASTBRIDGE_BACKEND).
"""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import fastbridge  # noqa: E402

from conftest import assert_close  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::fastbridge.FastbridgeFallbackWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")

WORLD, STEPS, TIMEOUT_S = 2, 2, 300


# ------------------------------------------------------------------------------------------- models
def _g(seed):
    return torch.Generator().manual_seed(seed)


def peft_llama(patched):
    """(a) LlamaForCausalLM with PEFT adaption prompts in its top 2 layers; gates non-zero."""
    import peft

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                             peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for i, (n, p) in enumerate((n, p) for n, p in pm.named_parameters() if n.endswith("adaption_gate")):
            p.fill_(0.5 + 0.25 * i)
    if patched:
        fastbridge.patch(pm)
    return pm


def peft_batch():
    """4 sequences: left- and right-padded ones alternate, so both halves hold the same number of labels."""
    B, L = 2 * WORLD, 7
    ids = torch.randint(3, 128, (B, L), generator=_g(1))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0::2, :2] = 0   # left padding (fully masked query rows)
    mask[1::2, -2:] = 0  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def peft_blocks(pm):
    return list(pm.base_model.model.model.layers)


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QFORMER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2, vocab_size=99,
               encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0, attention_probs_dropout_prob=0.0,
               hidden_dropout_prob=0.0)
OPT = dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
           max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2,
           dropout=0.0, attention_dropout=0.0)
IMAGE_TOKEN, N_QUERY = 98, 5


def blip2(patched):
    """(b) BLIP-2, BLIP-2's training setup: vision encoder and language model frozen."""
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT,
                                   num_query_tokens=N_QUERY, image_token_index=IMAGE_TOKEN)
    model = transformers.Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():  # zeros at init: the Q-Former's LayerNorm of equal rows makes gradients explode
        model.query_tokens.normal_(generator=_g(5))
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("qformer.", "query_tokens", "language_projection.")))
    if patched:
        fastbridge.patch(model)
    return model


def blip2_batch():
    B = 2 * WORLD
    ids = torch.cat([torch.full((B, N_QUERY), IMAGE_TOKEN), torch.randint(3, 90, (B, 7), generator=_g(2))], 1)
    return dict(pixel_values=torch.randn(B, 3, 32, 32, generator=_g(1)), input_ids=ids, labels=ids)


def blip2_blocks(model):
    return list(model.qformer.encoder.layer)  # per-layer sharding of the Q-Former


def vit(patched):
    """(c) ViT with a bottleneck adapter after each block's FFN (fastbridge.add_adapters: the rest frozen).
    fastbridge's adapters are fused already; ``patched=False`` switches them to the eager composition."""
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VISION), add_pooling_layer=False)
    fastbridge.add_adapters(model, r=8)
    if not patched:
        fastbridge.unpatch(model)
    return model


def vit_batch():
    B = 2 * WORLD
    return dict(pixel_values=torch.randn(B, 3, 32, 32, generator=_g(1)),
                target=torch.randn(B, 17, 32, generator=_g(3)))


def vit_blocks(model):
    layers = getattr(model, "layers", None)  # transformers 5.x; model.encoder.layer before
    return list(layers if layers is not None else model.encoder.layer)


def lm_loss(model, inputs):
    return model(**inputs).loss


def vit_loss(model, inputs):
    inputs = dict(inputs)
    target = inputs.pop("target")
    return torch.nn.functional.mse_loss(model(**inputs).last_hidden_state, target)


# case -> (build(patched), global batch, blocks sharded one by one under FSDP2, loss, SGD learning rate)
CASES = {
    "peft_llama_adapter": (peft_llama, peft_batch, peft_blocks, lm_loss, 0.5),
    "blip2_qformer": (blip2, blip2_batch, blip2_blocks, lm_loss, 0.2),
    "vit_adapters": (vit, vit_batch, vit_blocks, vit_loss, 2.0),
}


# ------------------------------------------------------------------------------------------- training
def _half(inputs, rank):
    n = next(iter(inputs.values())).shape[0] // WORLD
    return {k: v[rank * n:(rank + 1) * n] for k, v in inputs.items()}


def _full(t):
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def train(model, inputs, loss_fn, lr, wrapped=None):
    """STEPS SGD steps; the losses and the trainable parameters afterwards (gathered if sharded)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    net = wrapped if wrapped is not None else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net, inputs)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    params = dict(model.named_parameters())
    return torch.stack(losses), {n: _full(params[n]) for n in names}


def _worker(rank, case, init_file, out_dir):
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP

        from fastbridge.integrations import peft as fb_peft

        build, batch, blocks, loss_fn, lr = CASES[case]
        inputs = _half(batch(), rank)
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fb_peft.stats.clear()
            model = build(patched=True)
            out["ddp"] = train(model, inputs, loss_fn, lr, wrapped=DDP(model))
            model = build(patched=True)
            for block in blocks(model):
                fully_shard(block)
            fully_shard(model)
            out["fsdp2"] = train(model, inputs, loss_fn, lr)
            out["peft_stats"] = dict(fb_peft.stats)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        # both ranks are done with every collective before either tears gloo down (a rank that destroys the
        # group while its peer's gloo threads still talk to it aborts the peer: "terminate called ...")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(case, tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_worker, args=(case, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{case}: the {WORLD} processes did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_and_fsdp2_equal_one_process(case, tmp_path):
    build, batch, _, loss_fn, lr = CASES[case]
    # one process, the unpatched model (eager PyTorch / PEFT), the whole batch
    ref_losses, ref_params = train(build(patched=False), batch(), loss_fn, lr)
    init = {n: p.detach() for n, p in build(patched=False).named_parameters() if p.requires_grad}
    moved = max((ref_params[n] - init[n]).abs().max().item() for n in init)
    assert moved > 1e-3, f"{case}: the reference hardly trains (max update {moved:.1e}): the test would be vacuous"

    ranks = run_distributed(case, tmp_path)
    for mode in ("ddp", "fsdp2"):
        losses = torch.stack([r[mode][0] for r in ranks]).mean(0)  # equal halves: the whole batch's loss
        assert_close(losses, ref_losses, torch.float32, f"{case} {mode}: losses per step")
        for rank, r in enumerate(ranks):
            params = r[mode][1]
            assert set(params) == set(ref_params), f"{case} {mode}: different trainable parameters"
            for n in ref_params:
                assert_close(params[n], ref_params[n], torch.float32, f"{case} {mode} rank {rank}: {n}")

    if case == "peft_llama_adapter":
        # The fused path ran (not PEFT's forward, which parity alone would not tell apart): 2 adapted
        # layers x STEPS forwards x (DDP, FSDP2) on each rank, on every supported transformers version.
        for r in ranks:
            assert r["peft_stats"] == {"fused": 2 * STEPS * 2}, r["peft_stats"]
