"""LLaMA-Adapter's adaption-prompt attention and a per-sample (dynamic) prompt generator.

``AdaptionPromptAttention`` is a causal self-attention block whose queries also attend, through a
*separate* softmax scaled by a zero-initialised gate, to a few learnable prompt tokens:

    out = o_proj( softmax(q kᵀ·s + causal/padding) v  +  g · softmax(q pkᵀ·s) pv )
    pk, pv = k_proj(prompt), v_proj(prompt)              (the layer's own projections, no RoPE)

computed by one call of the fused op ``fastbridge.ops.gated_attention`` (the prompt is shared by the
batch through a stride-0 broadcast, never copied; GQA k/v are never repeated). ``g = tanh(gate)`` with
one gate per head (the official LLaMA-Adapter) or ``g = gate`` with one scalar (PEFT's
``AdaptionPromptConfig``); either way the gate starts at 0, so a freshly added adapter leaves the
layer's output unchanged.

``DynamicPromptGenerator`` turns a per-sample embedding (visual features, image-tag embeddings, ...)
into per-sample prompts (B, P, hidden): the multimodal LLaMA-Adapter adds such projected visual
features to the learned prompt (``prompt_add=``), "dynamic soft prompts" (LION-style, prompts generated
per input from image tags) replace it (``prompt=``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _stats
from .. import reference as ref
from ..ops import gated_attention
from ..ops.gated_attention import _kernel_unavailable

STATS_NAME = "fastbridge.AdaptionPromptAttention"  # fastbridge.stats(): this module's calls

__all__ = ["AdaptionPromptAttention", "DynamicPromptGenerator", "rotate_half", "apply_rotary"]

GATES = ("head", "scalar")
GATE_FNS = ("tanh", "identity")
POOLS = ("mean", "tokens", "attention")


def _fail(owner: str, arg: str, expected: str, got) -> None:
    raise ValueError(f"{owner}: argument '{arg}' must be {expected}, got {got}")


def _shape(t: Tensor) -> tuple:
    return tuple(int(s) for s in t.shape)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the Hugging Face LLaMA layout: x (B, H, L, D), cos / sin (B or 1, L, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class AdaptionPromptAttention(nn.Module):
    """Causal self-attention with LLaMA-Adapter's zero-init gated adaption prompt, one fused op.

    Args:
        hidden_size: model width.
        num_heads: query heads H.
        prompt_len: prompt tokens P (LLaMA-Adapter: 10 per adapted layer, in the top 30 layers).
        num_kv_heads: key/value heads (GQA / MQA); defaults to ``num_heads``.
        head_dim: defaults to ``hidden_size // num_heads``.
        gate: ``"head"`` — one gate per head, shape (H,) (official LLaMA-Adapter) — or ``"scalar"`` — one
            gate, shape (1,) (PEFT).
        gate_fn: ``"tanh"`` (official) or ``"identity"`` (PEFT).
        bias: biases on the q/k/v/o projections.
        rope_theta: base of the rotary embedding applied to queries and keys (never to the prompt keys)
            when ``forward`` gets no ``position_embeddings``; ``None`` = no rotary embedding.
        causal: causal self-attention (bottom-right aligned, so KV-cache decoding is right).
        scale: softmax scale, default ``head_dim ** -0.5``.
        layer_idx: this layer's index in a Hugging Face ``Cache`` passed as ``past_key_values``.

    Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear``), ``adaption_prompt`` (1, P,
    hidden) ~ N(0, 1) (as the official code's ``nn.Embedding`` and PEFT) and ``adaption_gate`` (H,) or (1,),
    zeros. Names follow PEFT, so a PEFT AdaptionPrompt state dict (``adaption_prompt`` / ``adaption_gate``)
    loads into the ``gate="scalar", gate_fn="identity"`` variant (``AdaptionPromptAttention.peft_style``).
    ``from_attention`` reuses (and by default freezes) an existing attention's projections.

    ``fused`` (True) runs ``fastbridge.ops.gated_attention``; False (``fastbridge.unpatch``) runs the plain
    eager composition (repeated k/v, two softmaxes), the code LLaMA-Adapter implementations run today.
    Parameters may stay fp32 while activations run in bf16/fp16: the prompt is cast to the activations'
    dtype before the (shared) projections.
    """

    _fastbridge_stats_name = STATS_NAME

    def __init__(self, hidden_size: int, num_heads: int, prompt_len: int = 10, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, gate: str = "head", gate_fn: str = "tanh", bias: bool = False,
                 rope_theta: Optional[float] = 10000.0, causal: bool = True, scale: Optional[float] = None,
                 layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        owner = "AdaptionPromptAttention"
        for arg, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("prompt_len", prompt_len)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail(owner, arg, "a positive int", repr(val))
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads:
            _fail(owner, "num_kv_heads", f"a positive int dividing num_heads = {num_heads}", repr(num_kv_heads))
        if head_dim is None:
            if hidden_size % num_heads:
                _fail(owner, "head_dim", f"given when hidden_size ({hidden_size}) is not a multiple of num_heads "
                                         f"({num_heads})", "None")
            head_dim = hidden_size // num_heads
        if not isinstance(head_dim, int) or head_dim < 1 or (rope_theta is not None and head_dim % 2):
            _fail(owner, "head_dim", "a positive int (even with a rotary embedding)", repr(head_dim))
        if gate not in GATES:
            _fail(owner, "gate", f"one of {GATES}", repr(gate))
        if gate_fn not in GATE_FNS:
            _fail(owner, "gate_fn", f"one of {GATE_FNS}", repr(gate_fn))
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
            _fail(owner, "scale", "None or a positive float", repr(scale))
        if rope_theta is not None and (not isinstance(rope_theta, (int, float)) or rope_theta <= 0):
            _fail(owner, "rope_theta", "None or a positive float", repr(rope_theta))
        fk = dict(device=device, dtype=dtype)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.prompt_len, self.gate_kind, self.gate_fn, self.causal = prompt_len, gate, gate_fn, bool(causal)
        self.scale = float(head_dim ** -0.5 if scale is None else scale)
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **fk)
        self._init_adapter(rope_theta, fk)

    def _init_adapter(self, rope_theta, fk) -> None:
        self.adaption_prompt = nn.Parameter(torch.empty(1, self.prompt_len, self.hidden_size, **fk).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(self.num_heads if self.gate_kind == "head" else 1, **fk))
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.fused = True

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def peft_style(cls, hidden_size: int, num_heads: int, prompt_len: int = 10, **kw) -> "AdaptionPromptAttention":
        """PEFT's AdaptionPromptConfig semantics: one scalar gate (shape (1,)), no tanh."""
        kw.setdefault("gate", "scalar")
        kw.setdefault("gate_fn", "identity")
        return cls(hidden_size, num_heads, prompt_len, **kw)

    @classmethod
    def from_attention(cls, attn: nn.Module, prompt_len: int = 10, *, gate: str = "head", gate_fn: str = "tanh",
                       freeze: bool = True, rope_theta: Optional[float] = None) -> "AdaptionPromptAttention":
        """Build the block around an existing attention's q/k/v/o projections (shared, not copied).

        ``attn`` needs ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear``) and a ``config`` with
        ``num_attention_heads`` (and ``num_key_value_heads``), like transformers' LlamaAttention /
        MistralAttention. ``freeze=True`` sets ``requires_grad=False`` on those projections (LLaMA-Adapter
        trains only the prompts and gates). The rotary base is read from the config unless given.
        """
        owner = "AdaptionPromptAttention.from_attention"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                _fail(owner, "attn", f"an attention module with nn.Linear '{name}'", type(attn).__name__)
        cfg = getattr(attn, "config", None)
        H = getattr(cfg, "num_attention_heads", None) or getattr(attn, "num_heads", None)
        if not H:
            _fail(owner, "attn", "an attention module with config.num_attention_heads", type(attn).__name__)
        Hkv = getattr(cfg, "num_key_value_heads", None) or H
        D = getattr(attn, "head_dim", None) or attn.q_proj.out_features // H
        hidden = attn.q_proj.in_features
        if rope_theta is None:
            rp = getattr(cfg, "rope_parameters", None) or {}
            rope_theta = rp.get("rope_theta", None) if isinstance(rp, dict) else None
            rope_theta = rope_theta or getattr(cfg, "rope_theta", None) or 10000.0
        w = attn.q_proj.weight
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if gate not in GATES:
            _fail(owner, "gate", f"one of {GATES}", repr(gate))
        if gate_fn not in GATE_FNS:
            _fail(owner, "gate_fn", f"one of {GATE_FNS}", repr(gate_fn))
        if not isinstance(prompt_len, int) or prompt_len < 1:
            _fail(owner, "prompt_len", "a positive int", repr(prompt_len))
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden, H, Hkv, D
        self.prompt_len, self.gate_kind, self.gate_fn, self.causal = prompt_len, gate, gate_fn, True
        self.scale = float(getattr(attn, "scaling", D ** -0.5))
        self.layer_idx = getattr(attn, "layer_idx", 0) or 0
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        if freeze:
            for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                lin.requires_grad_(False)
        self._init_adapter(rope_theta, dict(device=w.device, dtype=w.dtype if w.is_floating_point() else None))
        return self

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, prompt_len={self.prompt_len}, gate={self.gate_kind}, "
                f"gate_fn={self.gate_fn}, rope_theta={self.rope_theta}, causal={self.causal}, fused={self.fused}")

    # ----------------------------------------------------------------------------------------- helpers
    def _heads(self, x: Tensor, n: int) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, n, self.head_dim).transpose(1, 2)

    def project_prompt(self, prompt: Tensor) -> tuple[Tensor, Tensor]:
        """prompt (Bp, P, hidden) -> prefix keys / values (Bp, Hkv, P, D): k_proj / v_proj, no RoPE."""
        return self._heads(self.k_proj(prompt), self.num_kv_heads), self._heads(self.v_proj(prompt), self.num_kv_heads)

    def _rope(self, L: int, past: int, position_ids: Optional[Tensor], device, dtype):
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=device).unsqueeze(0)
        # computed in fp32 at each call (not a buffer: module.to(bf16) would round the frequencies)
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                              / self.head_dim))
        freqs = position_ids.to(device=device, dtype=torch.float32)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _prompt(self, B: int, dtype: torch.dtype, prompt: Optional[Tensor], prompt_add: Optional[Tensor]) -> Tensor:
        owner = "AdaptionPromptAttention.forward"
        if prompt is None:
            prompt = self.adaption_prompt
        elif not isinstance(prompt, Tensor) or prompt.dim() != 3 or prompt.shape[0] not in (1, B) \
                or prompt.shape[2] != self.hidden_size or prompt.shape[1] < 1:
            _fail(owner, "prompt", f"a tensor of shape (1 or B, P, hidden) = (1 or {B}, P >= 1, {self.hidden_size})",
                  _shape(prompt) if isinstance(prompt, Tensor) else type(prompt).__name__)
        if prompt_add is not None:
            P = prompt.shape[1]
            if not isinstance(prompt_add, Tensor) or prompt_add.dim() != 3 or prompt_add.shape[0] not in (1, B) \
                    or tuple(prompt_add.shape[1:]) != (P, self.hidden_size):
                _fail(owner, "prompt_add",
                      f"a tensor of shape (1 or B, P, hidden) = (1 or {B}, {P}, {self.hidden_size})",
                      _shape(prompt_add) if isinstance(prompt_add, Tensor) else type(prompt_add).__name__)
            prompt = prompt.to(dtype) + prompt_add.to(dtype)
        return prompt.to(dtype)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: Tensor, *, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
                past_key_values=None, prompt: Optional[Tensor] = None, prompt_add: Optional[Tensor] = None) -> Tensor:
        """hidden_states (B, L, hidden) -> (B, L, hidden).

        attention_mask: optional (B, Lk) padding mask over all keys (past + current, Hugging Face's 2D
            ``attention_mask``), bool or 0/1, True / 1 = attend. Prompt tokens are always visible.
        position_ids: (B or 1, L) positions for the built-in RoPE (default: past length + arange(L)).
        position_embeddings: (cos, sin), each (B or 1, L, head_dim), e.g. from transformers' rotary
            embedding; applied to queries and keys (not to the prompt). Overrides the built-in RoPE.
        past_key_values: a transformers ``Cache`` (e.g. ``DynamicCache``); this layer's keys / values are
            appended with ``update(k, v, layer_idx)`` and attention runs over the whole cache.
        prompt: (1 or B, P', hidden) replaces the learned prompt (dynamic soft prompts, one per sample).
        prompt_add: (1 or B, P, hidden) added to the prompt (multimodal LLaMA-Adapter: projected visual
            features), giving one prompt per sample.
        """
        owner = "AdaptionPromptAttention.forward"
        x = hidden_states
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            _fail(owner, "hidden_states", f"a tensor of shape (B, L, {self.hidden_size})",
                  _shape(x) if isinstance(x, Tensor) else type(x).__name__)
        B, L, _ = x.shape
        q = self._heads(self.q_proj(x), self.num_heads)
        k = self._heads(self.k_proj(x), self.num_kv_heads)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if position_embeddings is None and self.rope_theta is not None:
            past = 0
            if past_key_values is not None and hasattr(past_key_values, "get_seq_length"):
                past = int(past_key_values.get_seq_length(self.layer_idx))
            position_embeddings = self._rope(L, past, position_ids, x.device, q.dtype)
        if position_embeddings is not None:
            if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
                _fail(owner, "position_embeddings", "a (cos, sin) pair", type(position_embeddings).__name__)
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            if not hasattr(past_key_values, "update"):
                _fail(owner, "past_key_values", "a transformers Cache with update(k, v, layer_idx)",
                      type(past_key_values).__name__)
            k, v = past_key_values.update(k, v, self.layer_idx)
        Lk = k.shape[2]
        kpm = None
        if attention_mask is not None:
            m = attention_mask
            if not isinstance(m, Tensor) or tuple(m.shape) != (B, Lk) or m.is_floating_point() or m.is_complex():
                _fail(owner, "attention_mask", f"a bool or 0/1 integer tensor of shape (B, Lk) = ({B}, {Lk})",
                      f"{_shape(m)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__)
            kpm = m.to(device=x.device, dtype=torch.bool)
        pk, pv = self.project_prompt(self._prompt(B, x.dtype, prompt, prompt_add))
        pk, pv = pk.to(q.dtype), pv.to(q.dtype)
        if self.fused:
            _stats.record_op(STATS_NAME, lambda: _kernel_unavailable(q, (k, v, pk, pv, self.adaption_gate)))
            out = gated_attention(q, k, v, pk, pv, self.adaption_gate, causal=self.causal, scale=self.scale,
                                  gate_fn=self.gate_fn, key_padding_mask=kpm)
        else:
            _stats.record(STATS_NAME, "fallback", "fused=False (fastbridge.unpatch): the eager composition")
            out = self._eager(q, k, v, pk, pv, kpm)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

    def _eager(self, q, k, v, pk, pv, kpm) -> Tensor:
        """LLaMA-Adapter as written today: repeated k/v and prompt copies, two softmaxes, gate on top."""
        B, H, Lq, _ = q.shape
        Lk, rep = k.shape[2], H // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        pk = pk.expand(B, -1, -1, -1).repeat_interleave(rep, dim=1)
        pv = pv.expand(B, -1, -1, -1).repeat_interleave(rep, dim=1)
        visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
        if self.causal:
            visible = torch.ones_like(visible).tril(Lk - Lq)
        visible = visible.view(1, 1, Lq, Lk)
        if kpm is not None:
            visible = visible & kpm.view(B, 1, 1, Lk)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) * visible.any(-1, keepdim=True)
        main = p @ v
        pp = F.softmax((q @ pk.transpose(-1, -2)) * self.scale, dim=-1, dtype=torch.float32).to(q.dtype)
        g = ref.gate_values(self.adaption_gate, self.gate_fn, H, self.adaption_gate.dtype)
        return main + g.to(q.dtype).view(1, H, 1, 1) * (pp @ pv)


class DynamicPromptGenerator(nn.Module):
    """Per-sample prompts (B, P, hidden) from a per-sample embedding, through a projection.

    Multimodal LLaMA-Adapter projects global visual features and adds them to every adapted layer's
    learned prompt; dynamic soft prompts (LION-style: prompts generated per input from image-tag
    embeddings) use the generated tokens as the prompt. Pass the result to
    ``AdaptionPromptAttention(..., prompt_add=...)`` or ``(..., prompt=...)`` respectively; one generator can
    feed every adapted layer.

    Args:
        embed_dim: E, the embedding width (e.g. the CLIP image embedding, a tag-embedding width).
        hidden_size: the width of the prompts (the language model's hidden size).
        prompt_len: P, prompt tokens per sample.
        pool: how the input becomes P tokens:
            ``"mean"`` — a (B, E) vector, or the mean of (B, T, E) tokens (respecting ``mask``), projected to
            P·hidden and split into P tokens (global image embedding -> P prompt tokens);
            ``"tokens"`` — one prompt token per input token (T must equal P), projected token-wise;
            ``"attention"`` — P learned queries attend over the T tokens (single-head, ``mask``-aware)
            and each of the P results is projected.
        mlp_hidden: None — one ``nn.Linear`` projection; an int — Linear → activation → Linear.
        activation: the MLP activation (gelu, gelu_tanh, relu, silu).
        layer_norm: a LayerNorm on the generated prompt tokens (as the multimodal LLaMA-Adapter's
            ``visual_proj_norm``).
        zero_init: zero the last projection, so generated prompts start at 0 (with ``prompt_add`` the layer
            starts from its learned prompt alone).

    ``forward(embeddings, mask=None)``: embeddings (B, E) or (B, T, E); mask (B, T) bool / 0-1, True = a
    real token (pool "mean" / "attention"; "tokens" refuses a mask): padded positions influence no prompt,
    whatever they hold, and a sample with no real token pools to the zero vector. Returns (B, P, hidden) in
    the embeddings' dtype.
    """

    def __init__(self, embed_dim: int, hidden_size: int, prompt_len: int, *, pool: str = "mean",
                 mlp_hidden: Optional[int] = None, activation: str = "gelu", layer_norm: bool = False,
                 zero_init: bool = False, device=None, dtype=None):
        super().__init__()
        owner = "DynamicPromptGenerator"
        for arg, val in (("embed_dim", embed_dim), ("hidden_size", hidden_size), ("prompt_len", prompt_len)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail(owner, arg, "a positive int", repr(val))
        if pool not in POOLS:
            _fail(owner, "pool", f"one of {POOLS}", repr(pool))
        if mlp_hidden is not None and (not isinstance(mlp_hidden, int) or mlp_hidden < 1):
            _fail(owner, "mlp_hidden", "None or a positive int", repr(mlp_hidden))
        if activation not in ref.ACTIVATIONS:
            _fail(owner, "activation", f"one of {ref.ACTIVATIONS}", repr(activation))
        fk = dict(device=device, dtype=dtype)
        self.embed_dim, self.hidden_size, self.prompt_len, self.pool = embed_dim, hidden_size, prompt_len, pool
        self.activation = activation
        # pooled inputs make all P tokens from one vector; token-wise inputs project each token alone
        out = hidden_size * prompt_len if pool == "mean" else hidden_size
        self.queries = nn.Parameter(torch.randn(prompt_len, embed_dim, **fk) * embed_dim ** -0.5) \
            if pool == "attention" else None
        if mlp_hidden is None:
            self.fc1, self.fc2 = None, nn.Linear(embed_dim, out, **fk)
        else:
            self.fc1, self.fc2 = nn.Linear(embed_dim, mlp_hidden, **fk), nn.Linear(mlp_hidden, out, **fk)
        self.norm = nn.LayerNorm(hidden_size, **fk) if layer_norm else None
        if zero_init:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, hidden_size={self.hidden_size}, prompt_len={self.prompt_len}, "
                f"pool={self.pool}, mlp={self.fc1 is not None}, layer_norm={self.norm is not None}")

    def _project(self, h: Tensor) -> Tensor:
        if self.fc1 is not None:
            h = ref.apply_activation(self.fc1(h), self.activation)
        return self.fc2(h)

    def forward(self, embeddings: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        owner = "DynamicPromptGenerator.forward"
        e = embeddings
        if not isinstance(e, Tensor) or e.dim() not in (2, 3) or e.shape[-1] != self.embed_dim \
                or not e.is_floating_point():
            _fail(owner, "embeddings", f"a float tensor of shape (B, {self.embed_dim}) or (B, T, {self.embed_dim})",
                  f"{_shape(e)} {e.dtype}" if isinstance(e, Tensor) else type(e).__name__)
        B, out_dtype = e.shape[0], e.dtype
        e = e.to(self.fc2.weight.dtype)  # parameters may stay fp32 while features arrive in half precision
        if mask is not None:
            if e.dim() != 3 or not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(e.shape[:2]) \
                    or mask.is_floating_point():
                _fail(owner, "mask", "a bool / 0-1 tensor of shape (B, T) for (B, T, E) embeddings",
                      _shape(mask) if isinstance(mask, Tensor) else type(mask).__name__)
            mask = mask.to(device=e.device, dtype=torch.bool)
        if e.dim() == 2 and self.pool != "mean":
            _fail(owner, "embeddings", f"(B, T, {self.embed_dim}) token embeddings with pool={self.pool!r} "
                                       "((B, E) vectors need pool='mean')", _shape(e))
        if mask is not None and self.pool == "tokens":
            _fail(owner, "mask", "None with pool='tokens' (each of the T = P tokens becomes a prompt token, and a "
                                 "prompt has no padding: pass only real tokens, or use pool='mean' / 'attention')",
                  "a mask")
        if mask is not None:  # padded positions are zeroed, so no value there (NaN included) reaches a prompt
            e = e.masked_fill(~mask.unsqueeze(-1), 0.0)
        if self.pool == "mean":
            if e.dim() == 3:
                if mask is None:
                    e = e.mean(dim=1)
                else:  # a sample with no real token pools to 0
                    e = e.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(e.dtype)
            h = self._project(e).view(B, self.prompt_len, self.hidden_size)
        elif self.pool == "tokens":
            if e.shape[1] != self.prompt_len:
                _fail(owner, "embeddings", f"T = prompt_len = {self.prompt_len} tokens with pool='tokens'",
                      f"T = {e.shape[1]}")
            h = self._project(e)
        else:  # attention pooling: P learned queries over the real tokens; a sample with none pools to 0
            scores = torch.einsum("pe,bte->bpt", self.queries.to(e.dtype), e).float() / math.sqrt(self.embed_dim)
            visible = None if mask is None else mask.unsqueeze(1)
            h = self._project(ref._masked_softmax(scores, visible).to(e.dtype) @ e)
        if self.norm is not None:
            h = self.norm(h)
        return h.to(out_dtype)
