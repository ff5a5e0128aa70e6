"""kernels/_autotune.py: opt-in, CUDA-only, bounded autotune with winners cached on disk; per-arch tables whose
entries must be compile-checked candidates (kernel review, item 10). CPU only: the timer is stood in."""
from __future__ import annotations

import json

import pytest
import torch
import triton.testing

from fastbridge.kernels import _autotune as A
from fastbridge.kernels import gated_attention as GA

CUDA = torch.device("cuda", 0)


def test_off_by_default_never_on_cpu_or_under_the_interpreter(monkeypatch):
    monkeypatch.delenv(A.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not A.enabled(CUDA)
    monkeypatch.setenv(A.ENV, "1")
    assert A.enabled(CUDA) and not A.enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not A.enabled(CUDA)
    monkeypatch.setenv(A.ENV, "maybe")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="FASTBRIDGE_AUTOTUNE: expected 0 or 1, got 'maybe'"):
        A.enabled(CUDA)


def test_select_times_once_caches_on_disk_and_is_bounded(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(A.ENV, "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(A, "_winners", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    speed = {(1,): 3.0, (2,): 1.0, (3,): 2.0, (4,): 0.5, (5,): 0.1}
    timed = []

    def bench(fn, warmup, rep):
        fn()
        return speed[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", bench)
    cands = [(1,), (2,), (3,), (4,), (5,)]  # more than MAX_CANDIDATES: (5,) is never tried
    pick = A.select("fwd", 90, torch.bfloat16, 128, cands, timed.append, CUDA, Lq=4096)
    assert pick == (4,) and timed == [(1,), (2,), (3,), (4,)]
    saved = json.loads(A.cache_file(90).read_text())
    assert saved == {"fwd|sm90|bfloat16|D128|Lq=4096": [4]}
    assert A.cache_file(90).parent == tmp_path / "autotune"
    # cached: in memory, then (a new process) from disk, without timing again
    assert A.select("fwd", 90, torch.bfloat16, 128, cands, timed.append, CUDA, Lq=4096) == (4,)
    monkeypatch.setattr(A, "_winners", {})
    assert A.select("fwd", 90, torch.bfloat16, 128, cands, timed.append, CUDA, Lq=4096) == (4,)
    assert len(timed) == 4
    # another bucket is tuned on its own
    A.select("fwd", 90, torch.bfloat16, 128, cands, timed.append, CUDA, Lq=8192)
    assert len(timed) == 8
    # off: the first candidate, no timing
    monkeypatch.setenv(A.ENV, "0")
    assert A.select("dq", 90, torch.bfloat16, 128, cands, timed.append, CUDA, Lq=4096) == (1,)
    assert len(timed) == 8


def test_forcing_picks_each_candidate_for_the_compile_check():
    cands = [(1,), (2,)]
    with A.forcing(1):
        assert A.select("fwd", 90, torch.float16, 64, cands, None, torch.device("cpu")) == (2,)
    with A.forcing(3):  # fewer candidates: the default
        assert A.select("fwd", 90, torch.float16, 64, cands, None, torch.device("cpu")) == (1,)
    assert A.select("fwd", 90, torch.float16, 64, cands, None, torch.device("cpu")) == (1,)


def test_tables_replace_the_default_of_their_arch(monkeypatch, tmp_path):
    monkeypatch.setattr(A, "_TABLE_DIR", tmp_path)
    default = GA.bwd_config(128, 90)["dq"]
    assert GA.tune_candidates("dq", 128, 90)[0] == default  # no table: the built-in default first
    (tmp_path / "sm90.json").write_text(json.dumps({"dq": {"128": [128, 32, 8, 3]}, "fwd": {"128": [256, 256, 1, 1]},
                                                    "dkdv": {"128": [48, 64, 8, 2]}}))
    cands = GA.tune_candidates("dq", 128, 90)
    assert cands[0] == (128, 32, 8, 3) and default in cands and len(cands) <= A.MAX_CANDIDATES
    assert GA.tune_candidates("dq", 128, 80)[0] == GA.bwd_config(128, 80)["dq"]  # another arch: its own table
    # malformed entries (1 warp; a non-power-of-two tile) are ignored
    assert GA.tune_candidates("fwd", 128, 90, 2, 4096)[0] == GA.fwd_config(128, 4096, 90)
    assert GA.tune_candidates("dkdv", 128, 90)[0] == GA.bwd_config(128, 90)["dkdv"]
    # the launch takes the table's entry without FASTBRIDGE_AUTOTUNE
    assert A.select("dq", 90, torch.bfloat16, 128, cands, None, torch.device("cpu")) == (128, 32, 8, 3)


def test_candidates_are_bounded_and_untuned_cases_keep_the_default():
    for (kernel, hopper, D), alts in GA.TUNE_ALTERNATIVES.items():
        cands = GA.tune_candidates(kernel, D, 90 if hopper else 80, 2, 4096)
        assert 1 < len(cands) <= A.MAX_CANDIDATES and len(set(cands)) == len(cands)
    assert GA.tune_candidates("fwd", 128, 90, 2, 1) == [GA.fwd_config(128, 1, 90)]  # decode
    assert GA.tune_candidates("dkdv", 128, 90, 4) == [GA.bwd_config(128, 90, 4)["dkdv"]]  # fp32
    assert GA.tune_candidates("dq", 256, 90) == [GA.bwd_config(256, 90)["dq"]]
