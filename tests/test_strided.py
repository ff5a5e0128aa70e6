"""How the Triton kernels take tensors (kernels/_strided.py): one Strided argument per tensor, never loose strides.

- the host side: strided() / strided_rows() carry the right strides (0 for a batch-broadcast prompt) and refuse
  what the kernels cannot address, naming the shape and strides;
- the @triton.jit helpers, run by the interpreter on odd layouts (HF's (B, L, H, D) transposed, a sliced
  feature dim, packed-GQA rows, unmasked rows) against torch indexing, every unwritten element poisoned;
- every kernel in kernels/ names each tensor once: no parameter is a loose stride integer.
"""
from __future__ import annotations

import re

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface

from fastbridge.kernels import _strided as S
from fastbridge.kernels import adapter_block, gated_attention, gated_cross_attention
from fastbridge.kernels._strided import (load_cols, load_rows, load_tile, row_base, store_cols, store_rows,
                                         store_tile)


def test_strided_carries_batch_head_row_strides_and_broadcasts_the_batch():
    t = torch.randn(3, 7, 5, 16).transpose(1, 2)  # HF layout (B, L, H, D) seen as (B, H, L, D)
    a = S.strided(t)
    assert a.ptr is t and a.strides == (7 * 5 * 16, 16, 5 * 16)
    assert S.strided(t[:1], broadcast_batch=True).strides == (0, 16, 80)
    m = torch.randn(10, 24)[:, :20]
    assert S.strided_rows(m).strides == (24,)


@pytest.mark.parametrize("bad, call, msg", [
    (lambda: torch.randn(2, 3, 4, 8).transpose(-1, -2), S.strided, "unit last stride"),
    (lambda: torch.randn(2, 3, 8), S.strided, r"\(batch, head, row, feature\).*\(2, 3, 8\)"),
    (lambda: torch.randn(8, 4).t(), S.strided_rows, "unit last stride"),
    (lambda: torch.randn(2, 3, 4), S.strided_rows, r"\(rows, features\).*\(2, 3, 4\)"),
])
def test_strided_refuses_what_the_kernels_cannot_address(bad, call, msg):
    with pytest.raises(ValueError, match=msg):
        call(bad())


def test_a_size_one_feature_dim_needs_no_unit_stride():
    assert S.strided_rows(torch.randn(1, 5).t()).strides == (1,)  # (5, 1) with strides (1, 5): addressable


@triton.jit
def _copy_tiles_kernel(SRC, DST, H, GROUP, L, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PACK: tl.constexpr,
                       ROW_MASK: tl.constexpr):
    """DST[b, h] = SRC[b, h // GROUP] tile by tile (PACK: the GROUP heads' rows in one tile, as pack-GQA does).
    ROW_MASK=False: only whole, in-bounds row tiles are copied (the launcher picks L a multiple of BLOCK_R)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if PACK:
        Hkv = H // GROUP
        b64 = (pid // Hkv).to(tl.int64)
        hk = pid % Hkv
        r = tl.arange(0, BLOCK_R)
        h64 = (hk * GROUP + r // L).to(tl.int64)
        offs = r % L
        mask = r < GROUP * L
        x = load_tile(SRC, b64, (hk + 0 * r).to(tl.int64), offs, mask, offs_d, mask_d, PACK=True)
        store_tile(DST, b64, h64, offs, mask, offs_d, mask_d, x, PACK=True)
    else:
        b64 = (pid // H).to(tl.int64)
        h64 = (pid % H).to(tl.int64)
        hk64 = h64 // GROUP
        for r0 in range(0, L, BLOCK_R):
            offs = r0 + tl.arange(0, BLOCK_R)
            mask = offs < L
            x = load_tile(SRC, b64, hk64, offs, mask, offs_d, mask_d, ROW_MASK)
            store_tile(DST, b64, h64, offs, mask, offs_d, mask_d, x)


@pytest.mark.parametrize("pack, row_mask, L", [(False, True, 13), (False, False, 16), (True, True, 3)])
def test_tile_helpers_address_odd_layouts_like_torch_indexing(pack, row_mask, L):
    B, H, GROUP, D = 2, 6, 3, 20
    src = torch.randn(B, L, H // GROUP, 32).transpose(1, 2)[..., :D]  # HF layout, a sliced feature dim
    root = torch.full((B, L, H, 24), float("nan"))
    dst = root.transpose(1, 2)[..., :D]
    grid = (B * (H // GROUP),) if pack else (B * H,)
    _copy_tiles_kernel[grid](S.strided(src), S.strided(dst), H, GROUP, L, D, BLOCK_R=16 if pack else 8,
                             BLOCK_D=32, PACK=pack, ROW_MASK=row_mask)
    torch.testing.assert_close(dst, src.repeat_interleave(GROUP, dim=1), rtol=0, atol=0)
    assert root[..., D:].isnan().all()  # nothing written past the feature dim


@triton.jit
def _scale_rows_kernel(SRC, DST, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BASE: tl.constexpr):
    """DST = 2·SRC, BLOCK_D columns at a time: load_rows / store_rows, or (BASE) row_base + load_cols / store_cols."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < N
    src_rows = row_base(SRC, offs_m)
    dst_rows = row_base(DST, offs_m)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if BASE:
            store_cols(dst_rows, mask_m, offs_d, mask_d, 2.0 * load_cols(src_rows, mask_m, offs_d, mask_d))
        else:
            store_rows(DST, offs_m, mask_m, offs_d, mask_d, 2.0 * load_rows(SRC, offs_m, mask_m, offs_d, mask_d))


@pytest.mark.parametrize("base", [False, True])
def test_row_helpers_address_a_strided_matrix(base):
    N, D = 11, 9
    src = torch.randn(N, 16)[:, 3:3 + D]
    root = torch.full((N, 13), float("nan"))
    dst = root[:, :D]
    _scale_rows_kernel[(triton.cdiv(N, 8),)](S.strided_rows(src), S.strided_rows(dst), N, D, BLOCK_M=8, BLOCK_D=4,
                                             BASE=base)
    torch.testing.assert_close(dst, 2 * src, rtol=0, atol=0)
    assert root[:, D:].isnan().all()


# A loose stride parameter: the old spelling (sqb, skn, spvh, sdkn, sdob, ...) or stride_*.
_LOOSE_STRIDE = re.compile(r"^(s[a-z]{1,3}[bhmn]|stride_\w*)$")


@pytest.mark.parametrize("module", [gated_attention, gated_cross_attention, adapter_block])
def test_every_kernel_names_each_tensor_once_with_no_loose_strides(module):
    kernels = [v for v in vars(module).values() if isinstance(v, KernelInterface) and v.__name__.endswith("_kernel")]
    assert kernels, module.__name__
    for k in kernels:
        loose = [a for a in k.arg_names if _LOOSE_STRIDE.match(a)]
        assert not loose, f"{module.__name__}.{k.__name__} takes loose strides {loose}: pass the tensor as Strided"
