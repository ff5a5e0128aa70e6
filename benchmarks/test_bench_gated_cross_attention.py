"""gated_cross_attention benchmarks: Flamingo-style gated cross-attention at Llama 3.2 Vision and IDEFICS shapes.

One cross-attention call as the model's layer makes it, from the q / k / v projections (HF layout: (B, L, heads,
D) viewed as (B, heads, L, D), non-contiguous) to the gated output (B, Lq, H·D) that o_proj reads:
  mllama   MllamaTextCrossAttention + the layer's ``cross_attn_attn_gate.tanh()`` (o_proj has no bias, so the
           gate commutes with it): H = 32, Hkv = 8, D = 128, images x 1601-token tiles. Visibility from
           transformers' own _prepare_cross_attention_mask: a text token sees every tile of the image whose
           <|image|> token came last before it; padding tiles (image 2 of 4-tile cases has 2 real tiles) never;
           the 4 tokens before the first image see nothing -- and mllama then makes them attend to every key
           (its mask row becomes 0), so fastbridge gets those rows as all-visible: the same math.
  idefics  IdeficsGatedCrossAttentionLayer of IDEFICS-9B (hidden 4096, 32 heads, D = 128, no GQA; 64 perceiver
           latents per image) + tanh(alpha_cross_attn): a token sees the last image before it; tokens before the
           first image see nothing and IDEFICS zeroes their output (fastbridge: exactly 0 by definition).
Providers (CUDA only; skipped with the reason elsewhere):
  fastbridge  fastbridge.ops.gated_cross_attention(q, k, v, visibility, segment_len, gate) (backend "kernel"),
              transposed to (B, Lq, H·D).
  sdpa        transformers' sdpa_attention_forward with the dense additive (B, 1, Lq, Lk) mask the models build
              today (repeat_kv for mllama's GQA: a mask keeps SDPA's GQA path off), then the row zeroing (IDEFICS)
              and the gate: what transformers runs by default.
  eager       the model's own eager_attention_forward (modeling_mllama / modeling_idefics), same mask and gate.
The dense mask is built once per shape outside the timed region (the models build it once per forward for all
layers); its bytes count in sdpa's / eager's peak memory, not fastbridge's (which never has one).
Modes: fwd, fwd_bwd (gradients for q, k, v and the gate). dtype bf16 (``--fb-dtypes``).
``tflops`` counts the useful FLOPs: 4·H·D per visible (query, key) pair forward, 12 forward + backward (the
backward's recomputation is not credited; the dense baselines do Lq·Lk pairs of work for the same result);
``gbps`` the bytes no implementation can avoid (q, k, v, out, lse forward; + dout, dq, dk, dv, and q, k, v, out,
lse read again in the backward). Floors and predictions: benchmarks/notes/gated_cross_attention.md, printed by

    python benchmarks/test_bench_gated_cross_attention.py
"""
from __future__ import annotations

import gc
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch

OP = "gated_cross_attention"
MODES = ("fwd", "fwd_bwd")
CUDA_PROVIDERS = ("fastbridge", "sdpa", "eager")
GATE_VALUE = 0.3  # tanh(0.3): the models initialise the gate at 0; any value times the same

# model: (H, Hkv, D, tokens per segment)
MODELS = {"mllama": (32, 8, 128, 1601), "idefics": (32, 32, 128, 64)}
# (model, B, Lq, images, tiles per image)
MLLAMA_SHAPES = [("mllama", 1, lq, n, t) for lq in (512, 1024, 2048) for n in (1, 2) for t in (1, 4)]
IDEFICS_SHAPES = [("idefics", 8, lq, n, 1) for lq in (512, 2048) for n in (1, 4)]
QUICK_SHAPES = [("mllama", 1, 1024, 2, 4), ("idefics", 8, 2048, 4, 1)]
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# H100 SXM5 datasheet (benchmarks/floors.py holds the same numbers for the other ops)
HBM_TBPS = 3.35
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7}


# ---------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    model: str
    b: int
    lq: int
    images: int
    tiles: int

    @property
    def h(self):
        return MODELS[self.model][0]

    @property
    def hkv(self):
        return MODELS[self.model][1]

    @property
    def d(self):
        return MODELS[self.model][2]

    @property
    def seg(self):
        return MODELS[self.model][3]

    @property
    def s(self):
        return self.images * self.tiles

    @property
    def lk(self):
        return self.s * self.seg

    @property
    def label(self) -> str:
        return f"{self.model}-B{self.b}-Lq{self.lq}-img{self.images}x{self.tiles}"

    def as_dict(self) -> dict:
        return {"model": self.model, "B": self.b, "Lq": self.lq, "images": self.images, "tiles": self.tiles,
                "H": self.h, "Hkv": self.hkv, "D": self.d, "Lk": self.lk}


def image_positions(s: Shape) -> list[int]:
    """Where each image's token sits in the text: mllama image 0 at 4, image 1 at Lq / 2; IDEFICS evenly spaced."""
    if s.model == "mllama":
        return [4, s.lq // 2][: s.images]
    return [2 + j * s.lq // s.images for j in range(s.images)]


def visibility_model(s: Shape) -> torch.Tensor:
    """bool (B, Lq, S): what the model's own mask says -- token i sees the segments (tiles) of the last image
    whose token is at or before i; mllama's padding tiles (image 2 of a 4-tile case has 2 real tiles) never.
    Rows before the first image see nothing."""
    vis = torch.zeros(s.b, s.lq, s.s, dtype=torch.bool)
    pos = image_positions(s)
    for j, p in enumerate(pos):
        end = pos[j + 1] if j + 1 < len(pos) else s.lq
        real = s.tiles if not (s.model == "mllama" and j == 1 and s.tiles == 4) else 2
        vis[:, p:end, j * s.tiles: j * s.tiles + real] = True
    return vis


def visibility_fastbridge(s: Shape) -> torch.Tensor:
    """What fastbridge gets for the same math: mllama's blind rows attend to every key (its mask row becomes 0
    in _prepare_cross_attention_mask), IDEFICS's stay blind (their output is zeroed, fastbridge's is 0)."""
    vis = visibility_model(s)
    if s.model == "mllama":
        blind = ~vis.any(-1)
        vis[blind] = True
    return vis


def visible_pairs(s: Shape) -> int:
    return int(visibility_fastbridge(s).sum()) * s.seg


def model_flops(s: Shape, mode: str, pairs: int | None = None) -> int:
    n = (visible_pairs(s) if pairs is None else pairs) * s.h * s.d
    return {"fwd": 4 * n, "fwd_bwd": 12 * n}[mode]


def min_bytes(s: Shape, mode: str, e: int) -> int:
    q = s.b * s.h * s.lq * s.d * e
    kv = 2 * s.b * s.hkv * s.lk * s.d * e
    lse = s.b * s.h * s.lq * 4
    vis = s.b * s.lq * s.s
    fwd = q + kv + vis + q + lse                   # read q, k, v, visibility; write out, lse
    bwd = 3 * q + kv + lse + vis + q + kv          # read q, out, dout, k, v, lse, visibility; write dq, dk, dv
    return {"fwd": fwd, "fwd_bwd": fwd + bwd}[mode]


def floor_rows(dtype="bf16"):
    e = ELEMENT_BYTES[dtype]
    for sh in MLLAMA_SHAPES + IDEFICS_SHAPES:
        s = Shape(*sh)
        dense = s.b * s.lq * s.lk
        for mode in MODES:
            nb, fl = min_bytes(s, mode, e), model_flops(s, mode)
            yield dict(shape=s, mode=mode, visible=visible_pairs(s) / dense, mb=nb / 1e6,
                       mem_us=nb / (HBM_TBPS * 1e12) * 1e6, flop_us=fl / (PEAK_TFLOPS[dtype] * 1e12) * 1e6,
                       dense_flop_us=model_flops(s, mode, dense) / (PEAK_TFLOPS[dtype] * 1e12) * 1e6)


def print_floors(dtype="bf16"):
    print(f"### {dtype}: floors on H100 SXM (HBM {HBM_TBPS} TB/s, {PEAK_TFLOPS[dtype]:.0f} TFLOP/s dense)\n")
    print("| shape | Lk | mode | visible pairs | floor MB | floor µs (bytes) | floor µs (visible FLOPs) | "
          "µs (dense FLOPs) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in floor_rows(dtype):
        s = r["shape"]
        print(f"| {s.label} | {s.lk} | {r['mode']} | {r['visible']:.0%} | {r['mb']:.1f} | {r['mem_us']:.1f} | "
              f"{r['flop_us']:.1f} | {r['dense_flop_us']:.1f} |")


# --------------------------------------------------------------------------------- predictions
# Written before any GPU run (benchmarks/notes/gated_cross_attention.md); rates are assumptions, not measurements.
ASSUME = dict(
    fb_fwd_tflops=(550.0, 350.0),    # executed FLOPs, high / low case (gated_attention's GA_ASSUME forward)
    fb_bwd_tflops=(320.0, 200.0),    # executed backward FLOPs (dkdv 4 + dq 3 matmuls per executed pair)
    fb_overhead_us=(10.0, 30.0),     # launches: tile-table kernels (1 fwd, 2 bwd) + attention kernels
    mem_eff_fwd_tflops=(250.0, 150.0),  # SDPA's memory-efficient backend (a float mask keeps flash off), dense
    mem_eff_bwd_tflops=(170.0, 100.0),
    hbm_tbps=2.9,                    # streaming kernels
    cublas_tflops=600.0,             # eager's dense matmuls
    eager_bytes_per_score=(24, 28),  # fwd: S bf16, ·scale, + mask, fp32 softmax, bf16 cast, read by ·v; bwd
)


def executed_pairs(s: Shape, block_m: int, block_n: int) -> int:
    """(query, key) pairs the kernels compute: whole query tiles x whole key blocks of each visible segment."""
    vis = visibility_fastbridge(s)
    n_tiles = math.ceil(s.lq / block_m)
    pad = n_tiles * block_m - s.lq
    seen = torch.nn.functional.pad(vis, (0, 0, 0, pad)).view(s.b, n_tiles, block_m, s.s).any(2)
    return int(seen.sum()) * block_m * math.ceil(s.seg / block_n) * block_n


def predict(s: Shape, mode: str, dtype: str = "bf16") -> dict:
    """Predicted ms (low, high) per provider at an H100 SXM (ASSUME), and peak GB of what the call adds."""
    a, e = ASSUME, ELEMENT_BYTES[dtype]
    hd = s.h * s.d
    fwd_ex = 4 * hd * executed_pairs(s, 128, 64)
    bwd_ex = 8 * hd * executed_pairs(s, 32, 64) + 6 * hd * executed_pairs(s, 64, 64)
    fb = []
    for i in (0, 1):
        t = fwd_ex / (a["fb_fwd_tflops"][i] * 1e12)
        if mode == "fwd_bwd":
            t += bwd_ex / (a["fb_bwd_tflops"][i] * 1e12) + 2 * s.b * s.h * s.lq * s.d * e / (a["hbm_tbps"] * 1e12)
        fb.append(max(t, min_bytes(s, mode, e) / (a["hbm_tbps"] * 1e12)) + a["fb_overhead_us"][i] * 1e-6)
    dense = s.b * s.lq * s.lk
    kv_rep = 2 * s.b * s.h * s.lk * s.d * e if s.hkv < s.h else 0   # repeat_kv copies (written, read)
    mask_reads = s.b * s.h * s.lq * s.lk * e                        # the (B, 1, Lq, Lk) bias, read per head
    sd = []
    for i in (0, 1):
        t = max(4 * hd * dense / (a["mem_eff_fwd_tflops"][i] * 1e12), mask_reads / (a["hbm_tbps"] * 1e12))
        t += 2 * kv_rep / (a["hbm_tbps"] * 1e12)
        if mode == "fwd_bwd":
            t += max(8 * hd * dense / (a["mem_eff_bwd_tflops"][i] * 1e12), mask_reads / (a["hbm_tbps"] * 1e12))
            t += 3 * kv_rep / (a["hbm_tbps"] * 1e12)
        sd.append(max(t, min_bytes(s, mode, e) / (a["hbm_tbps"] * 1e12)))
    scores = s.b * s.h * s.lq * s.lk
    ea = scores * a["eager_bytes_per_score"][0] / (a["hbm_tbps"] * 1e12) + 4 * hd * dense / (a["cublas_tflops"] * 1e12)
    if mode == "fwd_bwd":
        ea += scores * a["eager_bytes_per_score"][1] / (a["hbm_tbps"] * 1e12) + 8 * hd * dense / (
            a["cublas_tflops"] * 1e12)
    return dict(fastbridge=(fb[0] * 1e3, fb[1] * 1e3), sdpa=(sd[0] * 1e3, sd[1] * 1e3), eager=ea * 1e3,
                mask_gb=s.b * s.lq * s.lk * e / 1e9, scores_gb=scores * e / 1e9)


def print_predictions(dtype="bf16"):
    print(f"\n### Predicted times, {dtype} (ASSUME in this file; not measurements)\n")
    print("| shape | mode | fastbridge ms | sdpa ms | eager ms | vs sdpa | vs eager | dense mask GB | eager scores GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for sh in MLLAMA_SHAPES + IDEFICS_SHAPES:
        s = Shape(*sh)
        for mode in MODES:
            p = predict(s, mode, dtype)
            (f0, f1), (s0, s1), ea = p["fastbridge"], p["sdpa"], p["eager"]
            print(f"| {s.label} | {mode} | {f0:.3f}-{f1:.3f} | {s0:.3f}-{s1:.3f} | {ea:.2f} | "
                  f"{s0 / f1:.1f}-{s1 / f0:.1f}x | {ea / f1:.1f}-{ea / f0:.1f}x | {p['mask_gb']:.3f} | "
                  f"{p['scores_gb']:.2f} |")


# ------------------------------------------------------------------------------------- providers
def _module(s: Shape):
    """What transformers' attention functions read from the layer."""
    return types.SimpleNamespace(num_key_value_groups=s.h // s.hkv, is_causal=False, training=True)


def dense_mask(s: Shape, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive (B, 1, Lq, Lk) mask, row keep (B, Lq, 1)) as the model builds them."""
    vis = visibility_model(s).to(device)
    if s.model == "mllama":
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        mask, _ = _prepare_cross_attention_mask(vis[..., None].to(dtype).view(s.b, s.lq, s.images, s.tiles),
                                                num_vision_tokens=s.seg, dtype=dtype)
        return mask, torch.ones(s.b, s.lq, 1, dtype=dtype, device=device)
    dense = vis.repeat_interleave(s.seg, dim=-1)[:, None]  # IdeficsModel: invert_attention_mask
    mask = (1.0 - dense.to(dtype)) * torch.finfo(dtype).min
    return mask, vis.any(-1, keepdim=True).to(dtype)


def hf_attention(kind: str, s: Shape):
    if kind == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if s.model == "mllama":
        from transformers.models.mllama.modeling_mllama import eager_attention_forward
    else:
        from transformers.models.idefics.modeling_idefics import eager_attention_forward
    return eager_attention_forward


def provider_fn(provider: str, s: Shape, x: dict):
    """Forward callable of ``provider``: the (B, Lq, H·D) gated output from the HF-layout projections in ``x``."""
    q4, k4, v4, gate = x["q"], x["k"], x["v"], x["gate"]  # (B, L, heads, D) leaves

    def views():
        return q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)

    if provider in ("fastbridge", "fastbridge-reference"):
        from fastbridge.ops import gated_cross_attention

        vis = x["vis_fb"]

        def fb():
            q, k, v = views()
            out = gated_cross_attention(q, k, v, vis, segment_len=s.seg, gate=gate)
            return out.transpose(1, 2).reshape(s.b, s.lq, s.h * s.d)

        return fb
    attn = hf_attention(provider, s)
    mod, mask, keep = _module(s), x["mask"], x["keep"]

    def hf():
        q, k, v = views()
        out, _ = attn(mod, q, k, v, mask, scaling=s.d ** -0.5, dropout=0.0)
        out = out.reshape(s.b, s.lq, -1)
        if s.model == "idefics":  # IdeficsGatedCrossAttentionLayer: rows that see no image -> 0
            out = out * keep
        return torch.tanh(gate) * out

    return hf


# ---------------------------------------------------------------------------------------- inputs
_CACHE: dict = {}


def _inputs(s: Shape, dtype_name: str, device: str) -> dict:
    key = (s, dtype_name, device)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        from _harness import DTYPES

        dt = DTYPES[dtype_name]

        def t(*shape):
            return torch.randn(*shape, device=device, dtype=dt).requires_grad_(True)

        mask, keep = dense_mask(s, dt, device)
        _CACHE.update(key=key, q=t(s.b, s.lq, s.h, s.d), k=t(s.b, s.lk, s.hkv, s.d), v=t(s.b, s.lk, s.hkv, s.d),
                      gate=torch.full((1,), GATE_VALUE, device=device, dtype=dt).requires_grad_(True),
                      vis_fb=visibility_fastbridge(s).to(device), mask=mask, keep=keep)
    return _CACHE


@pytest.fixture(scope="module", autouse=True)
def _release_cache():
    yield
    _CACHE.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cuda_skip_reason(provider: str):
    from _harness import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None and provider == "fastbridge":
        from fastbridge import _backend

        if _backend.triton_interpret():
            reason = "TRITON_INTERPRET=1: the kernels would run in the Triton interpreter, not on the GPU"
        else:
            reason = _backend.triton_unavailable_reason(torch.device("cuda"))
    return reason


def pytest_generate_tests(metafunc):
    if "cuda_case" not in metafunc.fixturenames:
        return
    from _harness import dtype_names

    cfg = metafunc.config
    shapes = QUICK_SHAPES if cfg.getoption("fb_quick") else MLLAMA_SHAPES + IDEFICS_SHAPES
    params = []
    for dt in dtype_names(cfg, "fb_dtypes"):
        for sh in shapes:
            s = Shape(*sh)
            for p in CUDA_PROVIDERS:
                for m in MODES:
                    reason = _cuda_skip_reason(p)
                    params.append(pytest.param((dt, s, p, m), id=f"{dt}-{s.label}-{p}-{m}",
                                               marks=[pytest.mark.skip(reason=reason)] if reason else []))
    metafunc.parametrize("cuda_case", params)


def test_gated_cross_attention_cuda(fb_bench, cuda_case):
    import fastbridge

    dtype, s, provider, mode = cuda_case
    x = _inputs(s, dtype, "cuda")
    fn = provider_fn(provider, s, x)
    oom = None
    try:
        with fastbridge.use_backend("kernel" if provider == "fastbridge" else "auto"):
            fb_bench.run(op=OP, provider=provider, mode=mode, dtype=dtype, shape=s.as_dict(), fn=fn, device="cuda",
                         flops=model_flops(s, mode), nbytes=min_bytes(s, mode, ELEMENT_BYTES[dtype]),
                         grad_to_none=[x["q"], x["k"], x["v"], x["gate"]])
    except torch.OutOfMemoryError as e:
        oom = str(e).splitlines()[0]
    if oom is not None:  # outside the except block: the traceback's frames (and their tensors) are gone
        fn = None
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{provider} {mode} {s.label}: out of GPU memory: {oom}")


# -------------------------------------------------------------- guards (not benchmarks; plain pytest)
GUARD_SHAPES = [("mllama", 2, 19, 2, 2), ("idefics", 2, 23, 3, 1)]


def _agree(device: str, dtype: torch.dtype, providers, atol: float, rtol: float) -> None:
    """Every provider computes the same op as fastbridge's float64 reference: output and every gradient, at
    the benchmark's own visibility patterns (tiny segments instead of 1601 / 64 tokens)."""
    import fastbridge

    for sh in GUARD_SHAPES:
        small = dict(MODELS)
        s = Shape(*sh)
        small[s.model] = (4, 2 if s.model == "mllama" else 4, 16, 5)
        saved = dict(MODELS)
        MODELS.update(small)
        try:
            torch.manual_seed(0)
            base = dict(q=torch.randn(s.b, s.lq, s.h, s.d, dtype=torch.float64, device=device),
                        k=torch.randn(s.b, s.lk, s.hkv, s.d, dtype=torch.float64, device=device),
                        v=torch.randn(s.b, s.lk, s.hkv, s.d, dtype=torch.float64, device=device),
                        gate=torch.full((1,), GATE_VALUE, dtype=torch.float64, device=device))
            dy = torch.randn(s.b, s.lq, s.h * s.d, dtype=torch.float64, device=device)
            ref_in = {n: t.clone().requires_grad_(True) for n, t in base.items()}
            ref_x = dict(ref_in, vis_fb=visibility_fastbridge(s).to(device))
            with fastbridge.use_backend("reference"):
                ref = provider_fn("fastbridge", s, ref_x)()
            ref.backward(dy)
            for prov in providers:
                xin = {n: t.to(dtype).requires_grad_(True) for n, t in base.items()}
                mask, keep = dense_mask(s, dtype, device)
                x = dict(xin, vis_fb=visibility_fastbridge(s).to(device), mask=mask, keep=keep)
                name = "fastbridge" if prov.startswith("fastbridge") else prov
                with fastbridge.use_backend("reference" if prov == "fastbridge-reference" else "auto"):
                    y = provider_fn(name, s, x)()
                msg = f"{prov} disagrees with the reference ({s.label}, {dtype})"
                torch.testing.assert_close(y.double(), ref.detach(), atol=atol, rtol=rtol, msg=msg)
                y.backward(dy.to(dtype))
                for n in base:
                    torch.testing.assert_close(xin[n].grad.double(), ref_in[n].grad, atol=atol * 4, rtol=rtol,
                                               msg=f"{msg}: d{n}")
        finally:
            MODELS.clear()
            MODELS.update(saved)


def test_providers_agree_cpu():
    """Guard against benchmarking the wrong thing: the CPU runs of every provider (fastbridge's reference
    fallback, transformers' SDPA and eager functions with the models' masks) compute the same op.

    Not a benchmark: runs under plain ``pytest benchmarks/``, skipped by --benchmark-only."""
    _agree("cpu", torch.float32, ["fastbridge-reference", "sdpa", "eager"], atol=2e-5, rtol=1e-4)


def test_providers_agree_cuda():
    """The CUDA providers compute the same op (bf16 tolerance). Not a benchmark."""
    reason = _cuda_skip_reason("fastbridge")
    if reason:
        pytest.skip(reason)
    _agree("cuda", torch.bfloat16, list(CUDA_PROVIDERS), atol=3e-2, rtol=3e-2)


def test_visibility_patterns():
    """The benchmark's visibility: mllama's blind rows become all-visible for fastbridge, IDEFICS's stay blind;
    mllama's padding tiles are never visible."""
    s = Shape("mllama", 1, 64, 2, 4)
    vm, vf = visibility_model(s), visibility_fastbridge(s)
    assert not vm[0, :4].any() and vf[0, :4].all()
    assert not vm[..., 6:].any() and vm[0, 32:, 4:6].all() and not vm[0, 32:, :4].any()
    i = Shape("idefics", 2, 64, 4, 1)
    assert torch.equal(visibility_model(i), visibility_fastbridge(i)) and not visibility_model(i)[:, :2].any()
    assert 0 < visible_pairs(s) < s.b * s.lq * s.lk


if __name__ == "__main__":
    print_floors()
    print_predictions()
    sys.exit(0)
