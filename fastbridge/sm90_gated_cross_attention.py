"""The gated cross-attention kernels' table for ``python -m fastbridge.sm90_check`` (kernels/gated_cross_attention.py).

Kept apart from sm90_check.py: ``configs`` yields the same (name, config, kernel, signature, constexprs, num_warps,
num_stages) tuples as sm90_check's own tables, signatures in bf16 (sm90_check swaps the pointer type per --dtype);
a tensor argument's type is a Strided of types, as the kernels take it (kernels/_strided.py).
Compiled with the heaviest constexpr variant the launchers use (visibility and gate on) at each supported head dim,
for a long prefill, a 64-row tile and decode; backward: pre, dkdv (GQA group of 4), dq.
"""
from __future__ import annotations

from fastbridge.kernels._strided import Strided

_P, _F = "*bf16", "*fp32"
_T = Strided(_P, ("i32",) * 3)  # a (batch, head, row, feature) tensor argument (kernels/_strided.py)


def _i32(*names):
    return {n: "i32" for n in names}


SIGNATURES = {
    "fwd": dict(Q=_T, K=_T, V=_T, VIS="*u8", STATE="*i8", G=_F, OUT=_T, LSE=_F,
                **_i32("H", "GROUP", "Lq", "D", "S", "SEG", "n_tiles"), qk_scale="fp32"),
    "tile_state": dict(VIS="*u8", STATE="*i8", **_i32("Lq", "S", "n_tiles")),
    "fwd_split": dict(Q=_T, K=_T, V=_T, VIS="*u8", STATE="*i8", ACC_PART=_F, ML_PART=_F,
                      **_i32("H", "GROUP", "Lq", "D", "S", "SEG", "blocks_per_seg", "blocks_per_split"),
                      qk_scale="fp32"),
    "fwd_combine": dict(G=_F, ACC_PART=_F, ML_PART=_F, OUT=_T, LSE=_F, **_i32("H", "Lq", "D", "n_splits")),
    "pre": dict(OUT=_T, DO=_T, DELTA=_F, **_i32("H", "Lq", "D")),
    "dkdv": dict(Q=_T, K=_T, V=_T, DO=_T, VIS="*u8", STATE="*i8", G=_F, LSE=_F, DELTA=_F, DK=_T, DV=_T,
                 **_i32("H", "Hkv", "Lq", "D", "S", "SEG", "blocks_per_seg", "n_tiles"), qk_scale="fp32"),
    "dq": dict(Q=_T, K=_T, V=_T, DO=_T, VIS="*u8", STATE="*i8", G=_F, LSE=_F, DELTA=_F, DQ=_T, DG_PART=_F,
               **_i32("H", "GROUP", "Lq", "D", "S", "SEG", "n_tiles"), qk_scale="fp32"),
}


def configs(arch: int = 90, elem_size: int = 2):
    """Every (kernel, config) the gated_cross_attention launchers pick for ``arch`` and ``elem_size``-byte inputs
    (segments of 1601 keys: the configuration's key block is kept)."""
    from fastbridge.kernels import gated_cross_attention as K

    S = SIGNATURES
    seg = 1601
    for bm in (16, 32, 64, 128):  # every query-tile height the launchers use; DOT_PREC unused (uniform signature)
        yield ("gca_tile_state", f"BM={bm} BS=32 warps=4", K._tile_state_kernel, S["tile_state"],
               dict(BLOCK_M=bm, BLOCK_S=32, DOT_PREC="ieee"), 4, 1)
    for D in (16, 32, 64, 128, 256):
        bd = K.pow2_at_least(D)
        for Lq in (4096, 64, 1):
            bm, bn, warps, stages = K.fwd_config(D, Lq, arch, elem_size)
            bn = K.key_block(bn, seg)
            c = dict(HAS_VIS=True, HAS_GATE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC="ieee")
            yield ("gca_fwd", f"D={D} Lq={Lq} BM={bm} BN={bn} warps={warps}", K._gca_fwd_kernel, S["fwd"], c, warps,
                   stages)
        bm, bn, warps, stages = K.fwd_config(D, 1, arch, elem_size)  # decode: split-K + combine
        bn = K.key_block(bn, seg)
        c = dict(HAS_VIS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC="ieee")
        yield ("gca_fwd_split", f"D={D} BM={bm} BN={bn} warps={warps}", K._gca_fwd_split_kernel, S["fwd_split"], c,
               warps, stages)
        c = dict(HAS_GATE=True, BLOCK_M=bm, BLOCK_D=bd, DOT_PREC="ieee")
        yield ("gca_fwd_combine", f"D={D} BM={bm} warps=4", K._gca_fwd_combine_kernel, S["fwd_combine"], c, 4, 1)
        bcfg = K.bwd_config(D, arch, elem_size)
        bm, _, warps, _ = bcfg["pre"]
        yield ("gca_bwd_pre", f"D={D} BM={bm} warps={warps}", K._gca_bwd_pre_kernel, S["pre"],
               dict(BLOCK_M=bm, BLOCK_D=bd, DOT_PREC="ieee"), warps, 1)
        bm, bn, warps, stages = bcfg["dkdv"]
        bn = K.key_block(bn, seg)
        c = dict(GROUP=4, HAS_VIS=True, HAS_GATE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC="ieee")
        yield ("gca_bwd_dkdv", f"D={D} BM={bm} BN={bn} warps={warps}", K._gca_bwd_dkdv_kernel, S["dkdv"], c, warps,
               stages)
        bm, bn, warps, stages = bcfg["dq"]
        bn = K.key_block(bn, seg)
        c = dict(HAS_VIS=True, HAS_GATE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_PREC="ieee")
        yield ("gca_bwd_dq", f"D={D} BM={bm} BN={bn} warps={warps}", K._gca_bwd_dq_kernel, S["dq"], c, warps,
               stages)
