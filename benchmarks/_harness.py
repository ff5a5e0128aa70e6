"""Shared timing / memory harness and results records of the fastbridge benchmarks (BENCHMARKS.md).

Benchmark files import it as ``from _harness import ...`` (benchmarks/conftest.py makes sure
benchmarks/ is on sys.path; the repository root never is).

Timing (``measure``), per mode, on a callable ``fn`` that runs the forward and returns the output:
  fwd      ``fn()`` with autograd recording (a training forward: the graph and the saved tensors are built).
  bwd      backward only: ``y = fn()`` once outside the timing, then ``y.backward(dy, retain_graph=True)``
           timed; every leaf's ``.grad`` is set to None before each repetition, outside the timed region
           (as Liger-Kernel's and FlashAttention's benchmarks do), so each repetition allocates fresh grads.
  fwd_bwd  ``fn().backward(dy)``, grads set to None before each repetition, outside the timed region.
CUDA: ``triton.testing.do_bench`` (L2 flushed before every repetition, CUDA events, warm-up by time);
the per-repetition samples give the p20 / p50 / p80 quantiles. CPU: ``time.perf_counter`` around each
repetition, the same warm-up / repetition budgets and quantiles.

Memory, measured once per (provider, shape, mode) after the timing warm-up calls:
  peak_mb   CUDA: ``torch.cuda.max_memory_allocated`` over one call of the mode (reset just before),
            absolute: it includes the resident inputs, parameters (and for bwd the retained graph).
            CPU: null (torch keeps no CPU allocator statistics).
  saved_mb  activation memory kept for backward: bytes a forward leaves allocated beyond its inputs,
            parameters and output. CUDA: memory_allocated after minus before one forward, minus the
            output's bytes (works for every provider, torch.compile included). CPU: the unique
            storages passed to autograd's saved-tensor pack hook, minus the inputs' and the output's.
Both in MiB (2^20 bytes), torch's convention; benchmarks/floors.py's tables use MB (10^6 bytes).
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

QUANTILES = (0.2, 0.5, 0.8)
MODES = ("fwd", "bwd", "fwd_bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCHEMA_TOP = ("device", "torch", "triton", "cuda", "fastbridge", "date", "records")
SCHEMA_RECORD = ("op", "provider", "mode", "dtype", "shape", "ms", "peak_mb")
OPTIONAL_RECORD = ("tflops", "gbps", "saved_mb")
DEFAULT_WARMUP_MS = 25.0
DEFAULT_REP_MS = 100.0

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


# ------------------------------------------------------------------------------------------ records
@dataclass
class Record:
    """One measurement: one op, provider, mode, dtype and shape (the JSON record of BENCHMARKS.md)."""

    op: str
    provider: str
    mode: str
    dtype: str
    shape: dict
    ms: dict  # {"p20", "p50", "p80"}
    peak_mb: Optional[float]
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    saved_mb: Optional[float] = None
    extra: dict = field(default_factory=dict)  # free-form, written under the record as-is

    def key(self) -> tuple:
        return record_key(self.to_json())

    def to_json(self) -> dict:
        out = {"op": self.op, "provider": self.provider, "mode": self.mode, "dtype": self.dtype,
               "shape": dict(self.shape), "ms": {k: _round(v) for k, v in self.ms.items()},
               "peak_mb": _round(self.peak_mb)}
        for name in OPTIONAL_RECORD:
            v = getattr(self, name)
            if v is not None:
                out[name] = _round(v)
        out.update(self.extra)
        return out


def _round(v, digits: int = 6):
    if v is None or not isinstance(v, float) or not math.isfinite(v):
        return v
    return float(f"{v:.{digits}g}")


def record_key(rec: dict) -> tuple:
    """(op, provider, mode, dtype, shape): a rerun replaces the record with the same key."""
    return (rec["op"], rec["provider"], rec["mode"], rec["dtype"], json.dumps(rec["shape"], sort_keys=True))


def _sort_key(rec: dict) -> tuple:
    def val(v):
        return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))

    shape = tuple((k, val(v)) for k, v in sorted(rec["shape"].items()))
    return (rec["op"], rec["dtype"], shape, MODES.index(rec["mode"]) if rec["mode"] in MODES else 99,
            rec["provider"])


def merge_records(old: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """Keep old records whose key is not in ``new``; add every new record (the last one wins)."""
    merged = {record_key(r): r for r in old}
    for r in new:
        merged[record_key(r)] = r
    return sorted(merged.values(), key=_sort_key)


def validate_results(doc: Any, where: str = "results") -> None:
    """Raise ValueError naming the first field that breaks the BENCHMARKS.md schema."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    for k in SCHEMA_TOP:
        if k not in doc:
            raise ValueError(f"{where}: missing top-level field {k!r}")
    if not isinstance(doc["records"], list):
        raise ValueError(f"{where}: 'records' must be a list")
    for i, r in enumerate(doc["records"]):
        w = f"{where}: records[{i}]"
        for k in SCHEMA_RECORD:
            if k not in r:
                raise ValueError(f"{w}: missing field {k!r}")
        if r["mode"] not in MODES:
            raise ValueError(f"{w}: mode {r['mode']!r} not in {MODES}")
        if not isinstance(r["shape"], dict):
            raise ValueError(f"{w}: 'shape' must be an object")
        if not isinstance(r["ms"], dict) or set(r["ms"]) != {"p20", "p50", "p80"}:
            raise ValueError(f"{w}: 'ms' must be {{'p20', 'p50', 'p80'}}, got {r['ms']!r}")
        if not all(isinstance(v, (int, float)) and v > 0 for v in r["ms"].values()):
            raise ValueError(f"{w}: 'ms' values must be positive numbers, got {r['ms']!r}")
        if not r["ms"]["p20"] <= r["ms"]["p50"] <= r["ms"]["p80"]:
            raise ValueError(f"{w}: quantiles out of order {r['ms']!r}")
        if r["peak_mb"] is not None and not isinstance(r["peak_mb"], (int, float)):
            raise ValueError(f"{w}: 'peak_mb' must be a number or null")
        for k in OPTIONAL_RECORD:
            if k in r and r[k] is not None and not isinstance(r[k], (int, float)):
                raise ValueError(f"{w}: {k!r} must be a number")


# ---------------------------------------------------------------------------------- environment
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def device_slug(device: torch.device | str) -> str:
    """File name of a device's results: 'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc', ..."""
    device = torch.device(device)
    name = device_name(device)
    if device.type == "cuda":
        return _slug(name)
    name = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\b\d+-core\b", " ", name, flags=re.I)
    return "cpu-" + _slug(name)


def git_sha(repo: Path = REPO_ROOT) -> tuple[Optional[str], Optional[bool]]:
    """(HEAD sha, tracked files modified?) of the repository, or (None, None) outside a git checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: report None
        return None


def environment(device: torch.device | str) -> dict:
    """The top-level fields of a results file for ``device`` (everything but "records")."""
    import fastbridge

    device = torch.device(device)
    sha, dirty = git_sha()
    env = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "fastbridge": sha or f"v{fastbridge.__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fastbridge_version": fastbridge.__version__,
        "fastbridge_dirty": dirty,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["host"] = {"sm": f"{p.major}{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / 2**30, 1), "cpu": _cpu_model()}
    else:
        env["host"] = {"cpu": _cpu_model(), "torch_threads": torch.get_num_threads(),
                       "machine": platform.machine()}
    return env


# ------------------------------------------------------------------------------------- collector
class ResultsCollector:
    """Session-wide list of records, written (merged) into one JSON file per device at session end."""

    def __init__(self) -> None:
        self._by_device: dict[str, tuple[torch.device, list[Record]]] = {}

    def add(self, record: Record, device: torch.device | str) -> None:
        device = torch.device(device)
        slug = device_slug(device)
        self._by_device.setdefault(slug, (device, []))[1].append(record)

    def __len__(self) -> int:
        return sum(len(recs) for _, recs in self._by_device.values())

    def write(self, out_dir: Path | str) -> list[tuple[Path, int]]:
        """Merge-or-replace into ``out_dir/<device-slug>.json``; returns [(path, records written now)]."""
        out_dir = Path(out_dir)
        written = []
        for slug, (device, recs) in self._by_device.items():
            if not recs:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{slug}.json"
            old = []
            if path.exists():
                try:
                    doc = json.loads(path.read_text())
                    validate_results(doc, str(path))
                    old = doc["records"]
                except (ValueError, json.JSONDecodeError) as e:
                    backup = path.with_suffix(".json.bad")
                    path.replace(backup)
                    warnings.warn(f"{path}: unreadable results ({e}); moved to {backup}, starting a new file")
            new = [r.to_json() for r in recs]
            doc = dict(environment(device))
            doc["records"] = merge_records(old, new)
            validate_results(doc, str(path))
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            tmp.replace(path)
            written.append((path, len(new)))
        return written


# -------------------------------------------------------------------------------------- measure
@dataclass
class Measurement:
    times_ms: list  # per-repetition samples (ms); only the quantiles when the sampler cannot give them
    ms: dict        # {"p20", "p50", "p80"}
    peak_mb: Optional[float]
    saved_mb: Optional[float]


def quantiles(samples: Sequence[float], qs: Sequence[float] = QUANTILES) -> dict:
    """Linear-interpolation quantiles (torch.quantile's default, as triton.testing.do_bench)."""
    t = torch.tensor(list(samples), dtype=torch.float64)
    vals = torch.quantile(t, torch.tensor(list(qs), dtype=torch.float64)).tolist()
    return {f"p{round(q * 100)}": v for q, v in zip(qs, vals)}


def autograd_leaves(y: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors (inputs and parameters) whose .grad a backward of ``y`` would write."""
    leaves, seen, stack = [], set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.append(var)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def _saved_mb(fn: Callable[[], torch.Tensor], device: torch.device, leaves: Sequence[torch.Tensor]) -> float:
    if device.type == "cuda":
        gc.collect()
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        y = fn()
        _sync(device)
        after = torch.cuda.memory_allocated(device)
        out = y.untyped_storage().nbytes()
        del y
        return max(0, after - before - out) / 2**20
    inputs = {k[0] for k in map(_storage_key, leaves) if k is not None}
    saved: dict[int, int] = {}

    def pack(t):
        k = _storage_key(t)
        if k is not None and k[0] not in inputs:
            saved[k[0]] = k[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    out = _storage_key(y)
    if out is not None:
        saved.pop(out[0], None)
    del y
    return sum(saved.values()) / 2**20


def _peak_mb(call: Callable[[], Any], reset: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    reset()
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    reset()
    return peak


def _time_cuda(call, leaves, warmup_ms: float, rep_ms: float) -> tuple[list, dict]:
    from triton.testing import do_bench

    grads = list(leaves) or None
    try:
        times = do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads, return_mode="all")
        times = [float(t) for t in times]
        return times, quantiles(times)
    except (AssertionError, TypeError):  # an older Triton without return_mode="all"
        q = do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=grads, quantiles=list(QUANTILES))
        qd = {f"p{round(p * 100)}": float(v) for p, v in zip(QUANTILES, q)}
        return list(qd.values()), qd


def _time_cpu(call, reset, warmup_ms: float, rep_ms: float, min_reps: int = 5,
              max_reps: int = 10_000) -> tuple[list, dict]:
    est = []
    for _ in range(3):
        reset()
        t0 = time.perf_counter()
        call()
        est.append((time.perf_counter() - t0) * 1e3)
    est_ms = max(min(est), 1e-3)
    for _ in range(max(0, int(warmup_ms / est_ms) - 3)):
        reset()
        call()
    times = []
    for _ in range(min(max_reps, max(min_reps, int(rep_ms / est_ms)))):
        reset()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    reset()
    return times, quantiles(times)


def measure(fn: Callable[[], torch.Tensor], *, mode: str, device: torch.device | str,
            grad_to_none: Optional[Sequence[torch.Tensor]] = None, grad_output: Optional[torch.Tensor] = None,
            warmup_ms: float = DEFAULT_WARMUP_MS, rep_ms: float = DEFAULT_REP_MS) -> Measurement:
    """Time ``mode`` of ``fn`` (a forward returning one tensor) and measure its memory (module docstring).

    grad_to_none: the tensors whose .grad is reset before each repetition; default: every autograd leaf
    the output depends on. grad_output: the dy of backward; default: randn_like(output).
    """
    if mode not in MODES:
        raise ValueError(f"measure: mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    y = fn()  # first call: compiles / autotunes / allocates workspaces outside every measurement
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"measure: fn must return a tensor, got {type(y).__name__}")
    if mode != "fwd" and y.grad_fn is None:
        raise ValueError("measure: mode needs a backward but fn's output does not require grad")
    leaves = list(grad_to_none) if grad_to_none is not None else (autograd_leaves(y) if y.grad_fn else [])
    dy = grad_output if grad_output is not None else torch.randn_like(y)

    def reset() -> None:
        for t in leaves:
            t.grad = None

    kept = None
    if mode == "fwd":
        call = fn
    elif mode == "bwd":
        kept = fn()

        def call():
            kept.backward(dy, retain_graph=True)
    else:
        def call():
            fn().backward(dy)
    del y
    reset()
    call()  # warm the timed path too (the compiled backward, cuBLAS workspaces, ...)
    reset()

    saved_mb = _saved_mb(fn, device, leaves)
    peak_mb = _peak_mb(call, reset, device)
    if device.type == "cuda":
        times, q = _time_cuda(call, leaves, warmup_ms, rep_ms)
    else:
        times, q = _time_cpu(call, reset, warmup_ms, rep_ms)
    reset()
    del kept
    return Measurement(times_ms=times, ms=q, peak_mb=peak_mb, saved_mb=saved_mb)


def cuda_unavailable_reason() -> Optional[str]:
    if torch.cuda.is_available():
        return None
    return (f"CUDA benchmarks need a CUDA device: torch {torch.__version__} "
            f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'}) sees no GPU")


# ------------------------------------------------------------------------- pytest integration
def dtype_names(config, option: str) -> list[str]:
    """The dtype names of ``--fb-dtypes`` / ``--fb-cpu-dtypes`` (conftest.py), validated."""
    import pytest

    raw = str(config.getoption(option))
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if not names or any(n not in DTYPES for n in names):
        raise pytest.UsageError(f"--{option.replace('_', '-')}: expected names among {sorted(DTYPES)}, got {raw!r}")
    return names


def shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


class Bencher:
    """What a benchmark test gets from the ``fb_bench`` fixture (benchmarks/conftest.py).

    ``run(...)`` measures one (op, provider, mode, dtype, shape), feeds the per-repetition samples to
    pytest-benchmark (so its table shows the same do_bench / perf_counter distribution, grouped so the
    providers of one case sit together) and adds the Record to the session's results.
    """

    def __init__(self, benchmark, collector: ResultsCollector, warmup_ms: float = DEFAULT_WARMUP_MS,
                 rep_ms: float = DEFAULT_REP_MS) -> None:
        self.benchmark = benchmark
        self.collector = collector
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms

    def run(self, *, op: str, provider: str, mode: str, dtype: str, shape: dict,
            fn: Callable[[], torch.Tensor], device: torch.device | str, flops: Optional[float] = None,
            nbytes: Optional[float] = None, grad_to_none: Optional[Sequence[torch.Tensor]] = None
            ) -> Optional[Record]:
        """flops / nbytes: the op's model FLOPs and minimal bytes for this mode (for tflops / gbps)."""
        import pytest

        if os.environ.get("FASTBRIDGE_POISON", "0") == "1":
            pytest.skip("FASTBRIDGE_POISON=1 fills every kernel output with NaN first: timings would be "
                        "wrong (run the benchmarks apart from tests/)")
        device = torch.device(device)
        bm = self.benchmark
        bm.group = f"{op} {dtype} {mode} {shape_label(shape)}"
        if getattr(bm, "disabled", False):  # --benchmark-disable: one call as a smoke test, no record
            y = fn()
            if mode != "fwd":
                y.backward(torch.randn_like(y))
            bm._mode = "fastbridge _harness (--benchmark-disable: one smoke call)"
            return None
        m = measure(fn, mode=mode, device=device, grad_to_none=grad_to_none, warmup_ms=self.warmup_ms,
                    rep_ms=self.rep_ms)
        p50_s = m.ms["p50"] / 1e3
        rec = Record(op=op, provider=provider, mode=mode, dtype=dtype, shape=dict(shape), ms=m.ms,
                     peak_mb=m.peak_mb, saved_mb=m.saved_mb,
                     tflops=None if flops is None else flops / p50_s / 1e12,
                     gbps=None if nbytes is None else nbytes / p50_s / 1e9)
        bm.extra_info.update({k: v for k, v in rec.to_json().items() if k not in ("shape",)})
        bm.extra_info["samples"] = len(m.times_ms)
        self._feed_pytest_benchmark(m)
        self.collector.add(rec, device)
        return rec

    def _feed_pytest_benchmark(self, m: Measurement) -> None:
        bm = self.benchmark
        make = getattr(bm, "_make_stats", None)
        if make is None:  # pytest-benchmark changed its internals: keep our numbers in extra_info only
            warnings.warn("pytest-benchmark has no _make_stats: its table shows a placeholder; the JSON "
                          "results and extra_info carry the measurement")
            bm.pedantic(lambda: None, rounds=1, iterations=1)
            return
        stats = make(1)
        for t in m.times_ms:
            stats.update(t / 1e3)
        bm._mode = "fastbridge _harness (do_bench / perf_counter samples)"
