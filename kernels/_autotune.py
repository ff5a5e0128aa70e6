"""Launch configurations: per-arch default tables and a small, bounded, opt-in autotune.

Two layers on top of the configuration functions (gated_attention.fwd_config / bwd_config):

Tables. ``kernels/tuned/sm<arch>.json`` (shipped with the package; written on a GPU by
``benchmarks/sweep_tiles.py run --write-table``) maps a kernel and head-dim tile to the configuration that won
the sweep there, e.g. ``{"fwd": {"128": [128, 64, 8, 2]}, "dkdv": {"64": [64, 64, 8, 2]}}``, for 2-byte inputs.
An entry replaces the built-in default of that arch (and joins the autotune's candidates). The launchers read it,
so ``python -m fastbridge.sm90_check`` -- which compiles what the launchers launch -- compiles the table's
entries too: tests/test_sm90_compile.py fails a table entry that spills or overflows shared memory. Entries of the
wrong form (not four positive integers, warps not 4 or 8) are ignored. No table ships yet: none has been
measured (there was no GPU).

Autotune. ``FASTBRIDGE_AUTOTUNE=1`` (off by default; CUDA only, never under the Triton interpreter, never
while a CUDA graph is being captured) times the candidates of a kernel -- the default first and at most
MAX_CANDIDATES in all -- on the call's own tensors the first time a key is seen, and keeps the fastest. Key:
(kernel, arch, dtype, head dim, shape bucket = powers of two of the lengths, causal, padding mask). Winners are
kept in memory and on disk, ``$FASTBRIDGE_CACHE_DIR`` (default ``~/.cache/fastbridge``)
``/autotune/sm<arch>-triton<version>.json``, so a process pays for each key once per machine. Only kernels whose
launch is idempotent are tuned (the forward, and the separate-dQ backward's dkdv and dq: they overwrite their
outputs); the atomic-dQ path accumulates and always runs its default.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import torch
import triton

ENV = "FASTBRIDGE_AUTOTUNE"
MAX_CANDIDATES = 4  # the default and at most three alternatives per kernel and key
_TABLE_DIR = Path(__file__).resolve().parent / "tuned"

_lock = threading.Lock()
_winners: dict[Path, dict[str, list[int]]] = {}
_forced: int | None = None  # forcing(i): the i-th candidate everywhere (sm90_check compiles each of them)


def cache_root() -> Path:
    return Path(os.environ.get("FASTBRIDGE_CACHE_DIR") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastbridge")


def cache_file(arch: int) -> Path:
    return cache_root() / "autotune" / f"sm{arch}-triton{triton.__version__}.json"


def enabled(device: torch.device) -> bool:
    """True when FASTBRIDGE_AUTOTUNE=1, the device is CUDA and the Triton interpreter is off."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    value = os.environ.get(ENV, "0").strip().lower()
    if value not in ("", "0", "1", "off", "on", "false", "true"):
        raise ValueError(f"{ENV}: expected 0 or 1, got {value!r}")
    return value in ("1", "on", "true")


def shape_bucket(n: int) -> int:
    """Lengths are tuned per power of two (at least 16)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


@contextlib.contextmanager
def forcing(index: int):
    """Every tuned launch takes its ``index``-th candidate (the default if it has fewer): lets
    fastbridge.sm90_check record and compile each candidate a launch can take."""
    global _forced
    prev, _forced = _forced, index
    try:
        yield
    finally:
        _forced = prev


def table(arch: int) -> dict:
    """The shipped per-arch default table (empty when none exists)."""
    path = _TABLE_DIR / f"sm{arch}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _well_formed(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 4 and all(isinstance(v, int) and v > 0 for v in entry)
            and all(v & (v - 1) == 0 for v in entry[:2]) and entry[2] in (4, 8) and entry[3] <= 4)


def table_pick(kernel: str, arch: int, D: int, default: tuple) -> tuple:
    """The table's (BLOCK_M, BLOCK_N, num_warps, num_stages) for (kernel, head-dim tile D) on ``arch``, else
    ``default``."""
    entry = table(arch).get(kernel, {}).get(str(D))
    return tuple(entry) if _well_formed(entry) else tuple(default)


def _load(path: Path) -> dict:
    if path not in _winners:
        try:
            _winners[path] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            _winners[path] = {}
    return _winners[path]


def _save(path: Path, winners: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(winners, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache directory: the winner is kept for this process only
        pass


def key_string(kernel: str, arch: int, dtype: torch.dtype, D: int, **shape) -> str:
    parts = [kernel, f"sm{arch}", str(dtype).removeprefix("torch."), f"D{D}"]
    parts += [f"{k}={v}" for k, v in sorted(shape.items())]
    return "|".join(parts)


def select(kernel: str, arch: int, dtype: torch.dtype, D: int, candidates: list[tuple], run, device,
           **shape) -> tuple:
    """The configuration to launch ``kernel`` with. ``candidates``: the default (or the table's pick) first, at
    most MAX_CANDIDATES, each compile-checked; ``run(cfg)`` launches the kernel with ``cfg`` on the call's
    tensors (idempotent). ``shape``: the key's bucketed lengths and flags."""
    candidates = list(dict.fromkeys(tuple(c) for c in candidates))[:MAX_CANDIDATES]
    if _forced is not None:
        return candidates[_forced] if _forced < len(candidates) else candidates[0]
    if len(candidates) == 1 or not enabled(device):
        return candidates[0]
    key = key_string(kernel, arch, dtype, D, **shape)
    path = cache_file(arch)
    with _lock:
        hit = _load(path).get(key)
    if hit is not None and tuple(hit) in candidates:
        return tuple(hit)
    if torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture: the default until tuned
        return candidates[0]
    from triton.testing import do_bench

    times = []
    for cfg in candidates:
        try:
            times.append(do_bench(lambda: run(cfg), warmup=5, rep=25))
        except triton.runtime.errors.OutOfResources:  # cannot happen for checked candidates; never pick it
            times.append(float("inf"))
    best = candidates[min(range(len(candidates)), key=times.__getitem__)]
    with _lock:
        winners = _load(path)
        winners[key] = list(best)
        _save(path, winners)
    return best
