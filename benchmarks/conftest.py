"""pytest configuration of the benchmark suite: ``pytest benchmarks/ --benchmark-only`` (BENCHMARKS.md).

Kept out of the normal test run: pyproject.toml's testpaths is ``tests``, so a bare ``pytest`` never
collects benchmarks/. There is deliberately no conftest.py at the repository root: that would put the
root on sys.path and expose the top-level ``kernels/`` folder as a module named ``kernels`` (it is
installed as ``fastbridge.kernels`` only; a top-level ``kernels`` shadows Hugging Face's package).

Results: every benchmark adds a Record (benchmarks/_harness.py) to a session-wide collector; at session
end they are merged into ``<results dir>/<device-slug>.json``, one file per device the records ran on
(a GPU run's CPU benchmarks go to the host CPU's file). A rerun replaces the records with the same
(op, provider, mode, dtype, shape) and keeps the others, so every op's benchmark file shares one file
per device. Results dir: ``--fb-results-dir``, else ``$FASTBRIDGE_BENCH_OUT``, else
``$XDG_CACHE_HOME/fastbridge/bench`` (``~/.cache/fastbridge/bench``): a run never leaves untracked files in
the checkout unless asked to (the committed GPU results: ``--fb-results-dir benchmarks/results``). At the
end, a compact table of the records this session measured is printed (earlier results in the file are not
shown as new).

Options (each also read from an environment variable, for ``fastbridge bench``):
  --fb-results-dir DIR     FASTBRIDGE_BENCH_OUT          where the JSON goes
  --fb-no-write            FASTBRIDGE_BENCH_NO_WRITE=1   measure and print, write no JSON
  --fb-dtypes LIST         FASTBRIDGE_BENCH_DTYPES       CUDA dtypes, comma-separated (default bf16)
  --fb-cpu-dtypes LIST     FASTBRIDGE_BENCH_CPU_DTYPES   CPU dtypes (default fp32)
  --fb-quick               FASTBRIDGE_BENCH_QUICK=1      the CUDA grid at one N only (a smoke run)
  --fb-cpu-threads N       FASTBRIDGE_BENCH_CPU_THREADS  torch.set_num_threads (default: torch's)
  --fb-warmup-ms / --fb-rep-ms                           do_bench-style time budgets per measurement

pytest-benchmark's own timing options (--benchmark-min-rounds, -max-time, -warmup, -timer) do not apply:
its table shows the samples _harness.measure took (do_bench on CUDA, perf_counter on CPU), grouped per
(op, dtype, mode, shape) so the providers of a case sit together; --benchmark-json and the
compare / histogram options work on those samples as usual.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

try:
    import pytest_benchmark  # noqa: F401 - the `benchmark` fixture and --benchmark-only
except ImportError as e:  # pragma: no cover - depends on the install
    raise pytest.UsageError("the benchmarks need pytest-benchmark: pip install pytest-benchmark "
                            "(or pip install -e '.[test]')") from e

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent


def _strip_repo_root_from_sys_path() -> None:
    """``python -m pytest`` run from the repository root puts the root on sys.path, which would make the
    top-level kernels/ folder importable as ``kernels``: remove it (fastbridge is imported from its
    installation, editable or not)."""
    keep = []
    for p in sys.path:
        try:
            resolved = Path(p or os.getcwd()).resolve()
        except OSError:
            keep.append(p)
            continue
        if resolved != _ROOT:
            keep.append(p)
    if len(keep) == len(sys.path):
        return
    saved = sys.path[:]
    sys.path[:] = keep
    importlib.invalidate_caches()
    if importlib.util.find_spec("fastbridge") is None:  # installed through a path entry of the root itself
        sys.path[:] = saved
        return
    mod = sys.modules.get("kernels")
    if mod is not None and str(getattr(mod, "__file__", "") or "").startswith(str(_ROOT / "kernels")):
        del sys.modules["kernels"]


_strip_repo_root_from_sys_path()
if str(_HERE) not in sys.path:  # e.g. --import-mode=importlib: benchmark files still `import _harness`
    sys.path.insert(0, str(_HERE))

import _harness as H  # noqa: E402

_COLLECTOR = pytest.StashKey[H.ResultsCollector]()
_WRITTEN = pytest.StashKey[list]()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def pytest_addoption(parser):
    g = parser.getgroup("fastbridge benchmarks")
    g.addoption("--fb-results-dir", default=os.environ.get("FASTBRIDGE_BENCH_OUT") or None,
                help="directory of the <device-slug>.json results (default: $FASTBRIDGE_BENCH_OUT, "
                     "else ~/.cache/fastbridge/bench; the committed GPU results are benchmarks/results)")
    g.addoption("--fb-no-write", action="store_true", default=_env_flag("FASTBRIDGE_BENCH_NO_WRITE"),
                help="do not write the JSON results")
    g.addoption("--fb-dtypes", default=os.environ.get("FASTBRIDGE_BENCH_DTYPES", "bf16"),
                help="CUDA benchmark dtypes, comma-separated among bf16,fp16,fp32 (default bf16)")
    g.addoption("--fb-cpu-dtypes", default=os.environ.get("FASTBRIDGE_BENCH_CPU_DTYPES", "fp32"),
                help="CPU benchmark dtypes, comma-separated among bf16,fp16,fp32 (default fp32)")
    g.addoption("--fb-quick", action="store_true", default=_env_flag("FASTBRIDGE_BENCH_QUICK"),
                help="CUDA grid at a single N (a quick smoke run)")
    g.addoption("--fb-cpu-threads", type=int, default=int(os.environ.get("FASTBRIDGE_BENCH_CPU_THREADS", "0")),
                help="torch.set_num_threads for the session (default 0: torch's default); CPU timings on a "
                     "busy machine are far steadier with 1")
    g.addoption("--fb-warmup-ms", type=float, default=H.DEFAULT_WARMUP_MS,
                help=f"warm-up time per measurement in ms (default {H.DEFAULT_WARMUP_MS:g})")
    g.addoption("--fb-rep-ms", type=float, default=H.DEFAULT_REP_MS,
                help=f"timed repetitions per measurement, in ms (default {H.DEFAULT_REP_MS:g})")


def pytest_configure(config):
    if config.getoption("fb_cpu_threads", 0):
        import torch

        torch.set_num_threads(config.getoption("fb_cpu_threads"))
    config.stash[_COLLECTOR] = H.ResultsCollector()
    config.stash[_WRITTEN] = []


@pytest.fixture(scope="session")
def fb_results(request) -> H.ResultsCollector:
    """The session's results collector (written at session end)."""
    return request.config.stash[_COLLECTOR]


@pytest.fixture
def fb_bench(benchmark, fb_results, request) -> H.Bencher:
    """Measure with benchmarks/_harness.py, feed pytest-benchmark's table and record the result."""
    cfg = request.config
    return H.Bencher(benchmark, fb_results, warmup_ms=cfg.getoption("fb_warmup_ms"),
                     rep_ms=cfg.getoption("fb_rep_ms"))


def results_dir(config) -> Path:
    """--fb-results-dir, else $FASTBRIDGE_BENCH_OUT, else ~/.cache/fastbridge/bench (XDG_CACHE_HOME):
    never untracked files in the checkout unless asked (the committed GPU results: benchmarks/results)."""
    d = config.getoption("fb_results_dir")
    if d:
        return Path(d).expanduser().resolve()
    import plot

    return plot.default_results_dir().resolve()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if hasattr(config, "workerinput"):  # pytest-xdist worker: benchmarks must not run in parallel
        return
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or not len(collector) or config.getoption("fb_no_write"):
        return
    config.stash[_WRITTEN] = collector.write(results_dir(config))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    collector = config.stash.get(_COLLECTOR, None)
    if collector is None or not len(collector):
        return
    written = config.stash.get(_WRITTEN, [])
    import plot

    records = [r.to_json() for _, recs in collector._by_device.values() for r in recs]
    terminalreporter.write_sep("-", f"fastbridge: the {len(records)} benchmark records this run measured")
    for line in plot.compact_table(records).splitlines():
        terminalreporter.write_line(line)
    if config.getoption("fb_no_write"):
        terminalreporter.write_line(f"fastbridge: {len(collector)} benchmark records measured, not written "
                                    "(--fb-no-write)")
    for path, n in written:
        terminalreporter.write_line(f"fastbridge: {n} benchmark records merged into {path}")
