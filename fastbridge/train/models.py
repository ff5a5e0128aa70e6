"""Vision–language models with a chosen bridge, built from real transformers classes.

Every model here takes images and a right-padded token batch and returns next-token logits over the
text positions, so one training loop, one loss and one greedy decoder serve all bridges:

============== ======================================================== ====================================
bridge          model (transformers classes)                             trained (everything else frozen)
============== ======================================================== ====================================
qformer         ``Blip2ForConditionalGeneration`` (ViT + Q-Former + LLaMA) Q-Former, query tokens, projection
mlp             ``CLIPVisionModel`` → MLP projector → ``LlamaForCausalLM`` the projector (LLaVA / MAPL)
adapter         ``BlipForConditionalGeneration`` + bottleneck adapters   the adapters (BLIP adapter study)
llama-adapter   ``CLIPVisionModel`` + ``LlamaForCausalLM`` with fastbridge prompts, gates, visual projection
                ``AdaptionPromptAttention`` in the top layers            (multimodal LLaMA-Adapter)
dynamic-prompt  as llama-adapter, prompts generated per image             the prompt generator, gates (LION)
flamingo        ``MllamaForConditionalGeneration`` (Llama 3.2 Vision):   the gated cross-attention layers
                the LLaMA's layers with tanh-gated cross-attention       (tanh gates from zero) and the
                decoder layers interleaved (zero-init gates)             vision → LM projection (Flamingo)
============== ======================================================== ====================================

``fastbridge.patch(model)`` fuses what fastbridge has kernels for (Q-Former attention, adapter blocks,
gated adaption-prompt attention, Flamingo gated cross-attention); ``fastbridge.unpatch(model)`` runs the
same parameters through the plain eager code, which is what ``--compare`` trains against. The ``mlp`` bridge has nothing to fuse.

Sizes: ``SIZES`` holds random-init configurations ("test" for CI, "tiny" for a 2-core CPU, "small" and "base" for a
GPU). ``pretrained=`` loads a local transformers checkpoint of the matching class instead (no hub
access is attempted by fastbridge: pass a directory).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["BRIDGES", "SIZES", "ModelSize", "BridgeModel", "build_model", "build_language_model"]

BRIDGES = ("qformer", "mlp", "adapter", "llama-adapter", "dynamic-prompt", "flamingo")


@dataclass(frozen=True)
class ModelSize:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    qformer_hidden: int
    qformer_layers: int
    num_query_tokens: int
    prompt_len: int         # llama-adapter / dynamic-prompt prompt tokens per adapted layer
    adapter_layers: int     # how many top LM layers get adaption prompts
    adapter_r: int          # bottleneck width of the adapter bridge


SIZES = {
    # CI / tests: seconds on a CPU, even with the Triton interpreter.
    "test": ModelSize(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, vision_heads=2,
                      lm_hidden=64, lm_layers=2, lm_heads=4, lm_kv_heads=2, qformer_hidden=64, qformer_layers=2,
                      num_query_tokens=4, prompt_len=3, adapter_layers=1, adapter_r=8),
    # A 2-core CPU trains this in a few minutes.
    "tiny": ModelSize(image_size=64, patch_size=16, vision_hidden=96, vision_layers=2, vision_heads=4,
                      lm_hidden=128, lm_layers=2, lm_heads=4, lm_kv_heads=2, qformer_hidden=96, qformer_layers=2,
                      num_query_tokens=8, prompt_len=8, adapter_layers=2, adapter_r=32),
    "small": ModelSize(image_size=96, patch_size=16, vision_hidden=256, vision_layers=4, vision_heads=4,
                       lm_hidden=512, lm_layers=4, lm_heads=8, lm_kv_heads=4, qformer_hidden=256, qformer_layers=4,
                       num_query_tokens=16, prompt_len=10, adapter_layers=4, adapter_r=64),
    # LLaMA-7B / BLIP-2 head geometry (head dim 128 / 64), few layers: a GPU-sized training step.
    "base": ModelSize(image_size=224, patch_size=14, vision_hidden=768, vision_layers=6, vision_heads=12,
                      lm_hidden=2048, lm_layers=8, lm_heads=16, lm_kv_heads=8, qformer_hidden=768, qformer_layers=6,
                      num_query_tokens=32, prompt_len=10, adapter_layers=8, adapter_r=64),
}


def _fail(arg: str, expected: str, got) -> None:
    raise ValueError(f"fastbridge.train.build_model: {arg} must be {expected}, got {got}")


# ------------------------------------------------------------------------------------------------ configs
def _llama_config(s: ModelSize, vocab: int, pad: int, bos: int, eos: int, max_pos: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=s.lm_hidden, intermediate_size=s.lm_hidden * 2 + s.lm_hidden // 2,
                       num_hidden_layers=s.lm_layers, num_attention_heads=s.lm_heads,
                       num_key_value_heads=s.lm_kv_heads, max_position_embeddings=max_pos,
                       pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)


def build_language_model(tokenizer, size="tiny", *, seed: int = 0):
    """The random-init LlamaForCausalLM every LLaMA-based bridge (qformer, mlp, llama-adapter,
    dynamic-prompt) of this size uses; warm it up and ``save_pretrained`` it to get a base checkpoint."""
    from transformers import LlamaForCausalLM

    s = _size(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(_llama_config(s, len(tokenizer), int(tokenizer.pad_token_id),
                                              int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), 512))


def _size(size) -> ModelSize:
    if isinstance(size, str):
        if size not in SIZES:
            _fail("size", f"one of {tuple(SIZES)} or a ModelSize", repr(size))
        return SIZES[size]
    if not isinstance(size, ModelSize):
        _fail("size", f"one of {tuple(SIZES)} or a ModelSize", type(size).__name__)
    return size


def _vision_kwargs(s: ModelSize) -> dict:
    # initializer_range: BLIP / BLIP-2 vision configs default to 1e-10 (meant for loading checkpoints), which
    # leaves a random-init encoder nearly constant
    return dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_hidden * 4, num_hidden_layers=s.vision_layers,
                num_attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch_size,
                initializer_range=0.02)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _insert_prefix(embeds: Tensor, mask: Tensor, prefix: Tensor) -> tuple[Tensor, Tensor]:
    """[bos] + P visual tokens + the rest of the text. The logits at positions P.. then line up with the
    text: position P (the last visual token) predicts text token 1, and so on."""
    prefix = prefix.to(embeds.dtype)
    embeds = torch.cat([embeds[:, :1], prefix, embeds[:, 1:]], dim=1)
    mask = torch.cat([mask[:, :1], mask.new_ones(prefix.shape[:2]), mask[:, 1:]], dim=1)
    return embeds, mask


def _load_lm(lm: nn.Module, path: str) -> None:
    """Load a LlamaForCausalLM checkpoint directory (save_pretrained) into ``lm``, strictly."""
    from transformers import LlamaForCausalLM

    src = LlamaForCausalLM.from_pretrained(path)
    try:
        lm.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"fastbridge.train.build_model: base_lm {path!r} does not fit this model size / "
                         f"tokenizer: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------------ base class
class BridgeModel(nn.Module):
    """A vision–language model: ``forward(pixel_values, input_ids, attention_mask) -> logits``.

    ``input_ids`` (B, L) is right-padded text (``attention_mask`` 1 = token); the logits (B, L, V) at
    position i predict token i + 1. ``language_model`` is the (frozen) causal LM; ``lm_loss`` trains it
    alone on text (the warm-up that stands in for a pretrained LM when the model is random-init).
    """

    bridge: str = ""

    def __init__(self, size: ModelSize, tokenizer) -> None:
        super().__init__()
        self.size = size
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)

    # subclasses: language_model (a module taking input_ids/attention_mask and returning .logits)
    @property
    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def freeze_for_bridge(self) -> None:
        """Freeze everything but the bridge (what the study trains)."""
        raise NotImplementedError

    @property
    def vision_tower(self) -> nn.Module:
        """The (frozen) image encoder: ``vision_tower(pixel_values=...).last_hidden_state``."""
        raise NotImplementedError

    def lm_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask).logits

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def image_state(self, pixel_values: Tensor):
        """What the text side needs from the images (computed once per batch, reused while decoding)."""
        raise NotImplementedError

    def text_logits(self, state, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_logits(self.image_state(pixel_values), input_ids, attention_mask)


# ------------------------------------------------------------------------------------------------ qformer
class QFormerBridge(BridgeModel):
    """BLIP-2: frozen ViT → trained Q-Former (learned queries cross-attend the image) → projection →
    soft visual tokens in front of the frozen LLaMA's text (``Blip2ForConditionalGeneration``)."""

    bridge = "qformer"

    def __init__(self, size: ModelSize, tokenizer, pretrained: Optional[str] = None,
                 base_lm: Optional[str] = None) -> None:
        super().__init__(size, tokenizer)
        from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig

        if pretrained:
            self.model = Blip2ForConditionalGeneration.from_pretrained(pretrained)
        else:
            s = size
            cfg = Blip2Config(
                vision_config=Blip2VisionConfig(**_vision_kwargs(s)).to_dict(),
                qformer_config=Blip2QFormerConfig(
                    hidden_size=s.qformer_hidden, num_hidden_layers=s.qformer_layers,
                    num_attention_heads=max(1, s.qformer_hidden // 64) if s.qformer_hidden >= 256 else 4,
                    intermediate_size=s.qformer_hidden * 4, encoder_hidden_size=s.vision_hidden,
                    # no dropout: eager and fused training then follow the same curve step for step (the
                    # fused op's dropout draws from its own Philox stream, not torch's)
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    vocab_size=len(tokenizer), pad_token_id=self.pad_token_id).to_dict(),
                text_config=_llama_config(s, len(tokenizer), self.pad_token_id, self.bos_token_id, self.eos_token_id,
                                          512).to_dict(),
                num_query_tokens=s.num_query_tokens)
            self.model = Blip2ForConditionalGeneration(cfg)
            if base_lm is not None:
                _load_lm(self.model.language_model, base_lm)
        self.num_query_tokens = int(self.model.config.num_query_tokens)

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_model

    def freeze_for_bridge(self) -> None:
        _freeze(self.model.vision_model)
        _freeze(self.model.language_model)
        for p in (*self.model.qformer.parameters(), self.model.query_tokens,
                  *self.model.language_projection.parameters()):
            p.requires_grad_(True)

    def image_state(self, pixel_values):
        # Blip2ForConditionalGeneration.get_image_features: ViT -> Q-Former -> language_projection
        return self.model.get_image_features(pixel_values, return_dict=True).pooler_output

    def text_logits(self, state, input_ids, attention_mask):
        # what Blip2ForConditionalGeneration.forward does with <image> placeholders, without re-running the
        # vision side at every decoding step
        embeds, mask = _insert_prefix(self.model.get_input_embeddings()(input_ids), attention_mask, state)
        return self.model.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, state.shape[1]:]


# ------------------------------------------------------------------------------------------------ LLaMA-based
class _PromptContext:
    """What the adapted attention layers read during one forward: per-sample prompts and the padding mask."""

    def __init__(self) -> None:
        self.prompt: Optional[Tensor] = None
        self.prompt_add: Optional[Tensor] = None
        self.key_padding_mask: Optional[Tensor] = None


class _HFAdaptedAttention(nn.Module):
    """Puts a fastbridge ``AdaptionPromptAttention`` where transformers' LlamaDecoderLayer expects its
    ``self_attn``: same call signature, ``(output, None)`` back. The HF 4D mask is not used: the model
    passes the (B, L) padding mask through the context (causal + key padding is exactly what HF builds
    from it), and the rotary embedding comes in as ``position_embeddings``."""

    def __init__(self, attn: nn.Module, prompt_len: int, ctx: _PromptContext) -> None:
        super().__init__()
        from ..modules import AdaptionPromptAttention

        self.inner = AdaptionPromptAttention.from_attention(attn, prompt_len, gate="head", gate_fn="tanh")
        self.layer_idx = self.inner.layer_idx
        self._ctx = [ctx]  # a list: not a submodule, not in the state dict

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                position_embeddings=None, **kwargs):
        ctx = self._ctx[0]
        out = self.inner(hidden_states, attention_mask=ctx.key_padding_mask, position_embeddings=position_embeddings,
                         past_key_values=past_key_values, prompt=ctx.prompt, prompt_add=ctx.prompt_add)
        return out, None


class LlamaBridge(BridgeModel):
    """CLIP ViT (frozen) + LLaMA (frozen) with one of three bridges:

    * ``mlp`` — LLaVA / MAPL: an MLP maps every image token to the LM width; they go in front of the text.
    * ``llama-adapter`` — multimodal LLaMA-Adapter: learned adaption prompts in the top layers' attention,
      zero-init per-head tanh gates, plus the projected global image feature added to every prompt.
    * ``dynamic-prompt`` — LION-style dynamic soft prompts: the prompts themselves are generated from the
      image tokens (attention pooling), one set per sample; gates as in LLaMA-Adapter.
    """

    def __init__(self, bridge: str, size: ModelSize, tokenizer, pretrained: Optional[str] = None,
                 base_lm: Optional[str] = None) -> None:
        super().__init__(size, tokenizer)
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

        from ..modules import DynamicPromptGenerator

        self.bridge = bridge
        s = size
        if pretrained:  # a directory with vision/ and lm/ subfolders
            import os

            self.vision = CLIPVisionModel.from_pretrained(os.path.join(pretrained, "vision"))
            self.lm = LlamaForCausalLM.from_pretrained(os.path.join(pretrained, "lm"))
        else:
            self.vision = CLIPVisionModel(CLIPVisionConfig(**_vision_kwargs(s)))
            self.lm = LlamaForCausalLM(_llama_config(s, len(tokenizer), self.pad_token_id, self.bos_token_id,
                                                     self.eos_token_id, 512))
            if base_lm is not None:
                _load_lm(self.lm, base_lm)
        ev, hl = self.vision.config.hidden_size, self.lm.config.hidden_size
        self.ctx = _PromptContext()
        self.projector = self.prompt_generator = None
        if bridge == "mlp":
            self.projector = nn.Sequential(nn.Linear(ev, hl), nn.GELU(), nn.Linear(hl, hl))
        else:
            layers = self.lm.model.layers
            n = min(s.adapter_layers, len(layers))
            for layer in layers[len(layers) - n:]:
                layer.self_attn = _HFAdaptedAttention(layer.self_attn, s.prompt_len, self.ctx)
            if bridge == "llama-adapter":  # global feature → P tokens, added to each layer's prompt
                self.prompt_generator = DynamicPromptGenerator(ev, hl, s.prompt_len, pool="mean", layer_norm=True)
            else:  # LION-style: P prompts attention-pooled from the image tokens, replacing the learned ones
                self.prompt_generator = DynamicPromptGenerator(ev, hl, s.prompt_len, pool="attention", mlp_hidden=hl,
                                                               layer_norm=True)

    @property
    def language_model(self) -> nn.Module:
        return self.lm

    @property
    def vision_tower(self) -> nn.Module:
        return self.vision

    def _adapted(self):
        return [m.inner for m in self.lm.modules() if isinstance(m, _HFAdaptedAttention)]

    def freeze_for_bridge(self) -> None:
        _freeze(self.vision)
        _freeze(self.lm)
        for module in (self.projector, self.prompt_generator):
            if module is not None:
                module.requires_grad_(True)
        for attn in self._adapted():
            # the learned prompt is replaced by the generated one in dynamic-prompt mode
            attn.adaption_prompt.requires_grad_(self.bridge == "llama-adapter")
            attn.adaption_gate.requires_grad_(True)

    def lm_logits(self, input_ids, attention_mask):
        # text only: the adapted layers see their learned prompts (zero gates before training)
        return self._lm_with_prompts(input_ids, attention_mask)

    def _lm_with_prompts(self, input_ids, attention_mask, prompt=None, prompt_add=None) -> Tensor:
        """The LM's logits with the adapted layers reading these prompts and the (B, L) padding mask."""
        self.ctx.prompt, self.ctx.prompt_add = prompt, prompt_add
        self.ctx.key_padding_mask = attention_mask.bool()
        try:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.ctx.prompt = self.ctx.prompt_add = self.ctx.key_padding_mask = None

    def image_state(self, pixel_values):
        feats = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, Ev)
        return self.projector(feats) if self.bridge == "mlp" else self.prompt_generator(feats)

    def text_logits(self, state, input_ids, attention_mask):
        if self.bridge == "mlp":
            embeds, mask = _insert_prefix(self.lm.get_input_embeddings()(input_ids), attention_mask, state)
            return self.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, state.shape[1]:]
        if self.bridge == "llama-adapter":  # the projected image feature is added to each layer's prompt
            return self._lm_with_prompts(input_ids, attention_mask, prompt_add=state)
        return self._lm_with_prompts(input_ids, attention_mask, prompt=state)  # dynamic: the prompts themselves


# ------------------------------------------------------------------------------------------------ BLIP adapters
class AdapterBridge(BridgeModel):
    """BLIP captioning model (ViT + BERT-style text decoder with image cross-attention), frozen, with
    fastbridge bottleneck adapters after the FFN of every vision and text block (``add_adapters``)."""

    bridge = "adapter"

    def __init__(self, size: ModelSize, tokenizer, pretrained: Optional[str] = None) -> None:
        super().__init__(size, tokenizer)
        from transformers import BlipConfig, BlipForConditionalGeneration

        from ..integrations.adapters import add_adapters

        s = size
        if pretrained:
            self.model = BlipForConditionalGeneration.from_pretrained(pretrained)
        else:
            heads = s.lm_heads
            cfg = BlipConfig(
                vision_config=dict(**_vision_kwargs(s)),
                text_config=dict(vocab_size=len(tokenizer), hidden_size=s.lm_hidden, encoder_hidden_size=s.vision_hidden,
                                 intermediate_size=s.lm_hidden * 4, num_hidden_layers=s.lm_layers,
                                 num_attention_heads=heads, max_position_embeddings=512,
                                 pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                                 eos_token_id=self.eos_token_id, sep_token_id=self.eos_token_id),
                projection_dim=s.lm_hidden)
            self.model = BlipForConditionalGeneration(cfg)
        add_adapters(self.model, s.adapter_r, preset="blip", freeze=False, verbose=False)

    @property
    def language_model(self) -> nn.Module:
        return self.model.text_decoder

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_model

    def lm_logits(self, input_ids, attention_mask):
        # the decoder's image cross-attention sees a single all-zero image token during text-only warm-up
        B = input_ids.shape[0]
        hidden = self.model.config.vision_config.hidden_size
        enc = torch.zeros(B, 1, hidden, device=input_ids.device, dtype=next(self.parameters()).dtype)
        return self.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=enc).logits

    def freeze_for_bridge(self) -> None:
        from ..modules.adapter import BottleneckAdapter

        _freeze(self.model)
        for m in self.model.modules():
            if isinstance(m, BottleneckAdapter):
                m.requires_grad_(True)

    def image_state(self, pixel_values):
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def text_logits(self, state, input_ids, attention_mask):
        # BlipForConditionalGeneration.forward's text side
        return self.model.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=state).logits


# ------------------------------------------------------------------------------------------------ Flamingo
def _cross_layer_positions(n_lm: int, n_cross: int) -> list[int]:
    """Where the cross-attention layers go in Mllama's layer list: one before each of ``n_cross`` LLaMA layers
    spread evenly from the bottom (Flamingo interleaves them every few LM layers)."""
    before = sorted({(i * n_lm) // n_cross for i in range(n_cross)})
    return [j + k for k, j in enumerate(before)]


class _MllamaVisionTower(nn.Module):
    """The Mllama vision encoder seen as a plain ``vision(pixel_values=(B, 3, S, S)).last_hidden_state``
    encoder (one image of one tile per sample; the loop's contrastive warm-up and its cache use this)."""

    def __init__(self, vision: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.config = SimpleNamespace(hidden_size=int(vision.config.vision_output_dim))

    def forward(self, pixel_values: Tensor):
        B = pixel_values.shape[0]
        ones = torch.ones(B, 1, dtype=torch.long, device=pixel_values.device)
        out = self.vision(pixel_values=pixel_values[:, None, None], aspect_ratio_ids=ones,
                          aspect_ratio_mask=ones[:, :, None])
        h = out.last_hidden_state                                   # (B, 1 image, 1 tile, tokens, vision_output_dim)
        return type(out)(last_hidden_state=h.reshape(B, h.shape[-2], h.shape[-1]))


class FlamingoBridge(BridgeModel):
    """Flamingo / Llama 3.2 Vision: the frozen LLaMA with gated cross-attention decoder layers interleaved
    (``MllamaCrossAttentionDecoderLayer``: text queries over the image tokens, ``tanh`` gates initialised at
    zero, so the untrained model is exactly the LM) and a frozen vision encoder (``MllamaVisionModel``,
    one tile per image). Trained: the cross-attention layers and the vision → LM projection."""

    bridge = "flamingo"

    def __init__(self, size: ModelSize, tokenizer, pretrained: Optional[str] = None,
                 base_lm: Optional[str] = None) -> None:
        super().__init__(size, tokenizer)
        from transformers import MllamaConfig, MllamaForConditionalGeneration

        if pretrained:
            self.model = MllamaForConditionalGeneration.from_pretrained(pretrained)
        else:
            s = size
            llama = _llama_config(s, len(tokenizer), self.pad_token_id, self.bos_token_id, self.eos_token_id, 512)
            n_cross = max(1, min(s.adapter_layers, s.lm_layers))
            cross = _cross_layer_positions(s.lm_layers, n_cross)
            # the LLaMA's self-attention layers, exactly (same widths, RoPE, norms), plus the cross layers
            text = dict(vocab_size=len(tokenizer), hidden_size=s.lm_hidden, intermediate_size=llama.intermediate_size,
                        num_hidden_layers=s.lm_layers + n_cross, cross_attention_layers=cross,
                        num_attention_heads=s.lm_heads, num_key_value_heads=s.lm_kv_heads,
                        rms_norm_eps=llama.rms_norm_eps, rope_parameters=dict(llama.rope_parameters),
                        max_position_embeddings=512, hidden_act=llama.hidden_act, dropout=0.0, use_cache=False,
                        pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id,
                        eos_token_id=self.eos_token_id, tie_word_embeddings=False)
            vision = dict(hidden_size=s.vision_hidden, intermediate_size=s.vision_hidden * 4,
                          num_hidden_layers=s.vision_layers, num_global_layers=1,
                          attention_heads=s.vision_heads, image_size=s.image_size, patch_size=s.patch_size,
                          max_num_tiles=1, supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
                          vision_output_dim=2 * s.vision_hidden, initializer_range=0.02)
            self.model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                                     image_token_index=len(tokenizer)))
            if base_lm is not None:
                self._load_llama(base_lm)
        self.num_image_tokens = int(self.model.model.vision_model.num_patches)

    def _load_llama(self, path: str) -> None:
        """The warmed-up LlamaForCausalLM's weights into the self-attention layers, embeddings, norm and head."""
        from transformers import LlamaForCausalLM

        src = LlamaForCausalLM.from_pretrained(path).state_dict()
        text = self.model.model.language_model
        self_layers = [i for i in range(len(text.layers)) if i not in text.cross_attention_layers]
        dst = dict(self.model.named_parameters())
        done = set()
        with torch.no_grad():
            for k, w in src.items():
                if k.startswith("model.layers."):
                    j, rest = k[len("model.layers."):].split(".", 1)
                    if int(j) >= len(self_layers):
                        raise ValueError(f"fastbridge.train.build_model: base_lm {path!r} has more layers than "
                                         "this model size")
                    name = f"model.language_model.layers.{self_layers[int(j)]}.{rest}"
                elif k == "model.embed_tokens.weight":
                    name = "model.language_model.embed_tokens.weight"
                elif k == "model.norm.weight":
                    name = "model.language_model.norm.weight"
                elif k == "lm_head.weight":
                    name = "lm_head.weight"
                else:
                    raise ValueError(f"fastbridge.train.build_model: base_lm {path!r}: unexpected weight {k}")
                if name not in dst or dst[name].shape[1:] != w.shape[1:] or dst[name].shape[0] < w.shape[0]:
                    raise ValueError(f"fastbridge.train.build_model: base_lm {path!r} does not fit this model size / "
                                     f"tokenizer ({k} {tuple(w.shape)})")
                dst[name][: w.shape[0]].copy_(w)  # Mllama's embedding has 8 extra rows (image tokens)
                done.add(name)
        missing = [n for n in dst if n.startswith("model.language_model.") and n not in done
                   and ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) in self_layers]
        if missing:
            raise ValueError(f"fastbridge.train.build_model: base_lm {path!r} lacks {missing[:3]}")

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return _MllamaVisionTower(self.model.model.vision_model)

    def _cross_layers(self) -> list[nn.Module]:
        text = self.model.model.language_model
        return [text.layers[i] for i in text.cross_attention_layers]

    def freeze_for_bridge(self) -> None:
        _freeze(self.model)
        for layer in self._cross_layers():
            layer.requires_grad_(True)
        self.model.model.multi_modal_projector.requires_grad_(True)

    def lm_logits(self, input_ids, attention_mask):
        # text only: Mllama skips the cross-attention layers without vision states (= the LLaMA)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def image_state(self, pixel_values):
        # MllamaModel.forward's vision side: tokens of the one tile -> multi_modal_projector
        m = self.model.model
        feats = _MllamaVisionTower(m.vision_model)(pixel_values).last_hidden_state
        return m.multi_modal_projector(feats)                            # (B, tokens, lm_hidden)

    def text_logits(self, state, input_ids, attention_mask):
        # every text token sees the image (Mllama's cross_attention_mask: (B, L, 1 image, 1 tile) of ones)
        B, L = input_ids.shape
        cam = torch.ones(B, L, 1, 1, dtype=torch.long, device=input_ids.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, cross_attention_states=state,
                          cross_attention_mask=cam, use_cache=False).logits


# ------------------------------------------------------------------------------------------------ factory
def build_model(bridge: str, tokenizer, *, size="tiny", pretrained: Optional[str] = None,
                base_lm: Optional[str] = None, seed: int = 0) -> BridgeModel:
    """Build the vision–language model of ``bridge`` (one of BRIDGES) for ``tokenizer``'s vocabulary.

    size: a key of SIZES or a ModelSize. pretrained: a local checkpoint directory (qformer:
    Blip2ForConditionalGeneration; adapter: BlipForConditionalGeneration; flamingo:
    MllamaForConditionalGeneration; mlp / llama-adapter / dynamic-prompt: a directory with ``vision/``
    (CLIPVisionModel) and ``lm/`` (LlamaForCausalLM)).
    base_lm: a LlamaForCausalLM checkpoint directory loaded into the random-init model's language model
    (the LLaMA-based bridges, flamingo included: its self-attention layers; e.g. ``build_language_model``
    after a warm-up, saved with save_pretrained).
    The model is returned with everything trainable; call ``freeze_for_bridge()`` to train the bridge only.
    """
    if bridge not in BRIDGES:
        _fail("bridge", f"one of {BRIDGES}", repr(bridge))
    size = _size(size)
    if base_lm is not None and (bridge == "adapter" or pretrained):
        _fail("base_lm", "None for the adapter bridge (BLIP has its own text decoder) and with pretrained=", base_lm)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is None:
            _fail("tokenizer", f"a tokenizer with {attr} set", "None")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if bridge == "qformer":
            return QFormerBridge(size, tokenizer, pretrained, base_lm)
        if bridge == "adapter":
            return AdapterBridge(size, tokenizer, pretrained)
        if bridge == "flamingo":
            return FlamingoBridge(size, tokenizer, pretrained, base_lm)
        return LlamaBridge(bridge, size, tokenizer, pretrained, base_lm)

