"""``fastbridge bench``: run the benchmark suite, then write its table and plots.

Runs ``pytest <repo>/benchmarks --benchmark-only [args]`` in a subprocess (the suite merges its records
into ``<results dir>/<device-slug>.json`` and prints a compact table of what this run measured, see
benchmarks/conftest.py), then ``benchmarks/plot.py`` on the results (``results.md`` with every record,
PNG plots) into ``<results dir>/plots``. Results dir: ``--fb-results-dir DIR``, else
``$FASTBRIDGE_BENCH_OUT``, else ``~/.cache/fastbridge/bench`` (``fastbridge bench --help``).
The benchmarks live in the source repository, not in the installed package:
set FASTBRIDGE_BENCHMARKS_DIR to use another checkout's benchmarks/ folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# pytest via -c (sys.path[0] is then '' = the working directory): drop that entry so running from the
# repository root never makes the top-level kernels/ folder importable as a module named `kernels`.
_PYTEST = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; import pytest; "
           "sys.exit(pytest.main(sys.argv[1:]))")


BENCH_DESCRIPTION = """\
Run fastbridge's benchmark suite (pytest on the repository's benchmarks/ folder, --benchmark-only),
print one compact table of the results this run measured, and write PNG plots.

Every argument is passed to pytest, so pytest's own options work, for example:
  -k EXPR                 only the benchmarks whose names match EXPR (e.g. -k "qformer and fwd")
  -x, -q, -v              as in pytest
and the suite's options (benchmarks/conftest.py):
  --fb-quick              the CUDA grid at one size only (a smoke run)
  --fb-results-dir DIR    where results go (default: $FASTBRIDGE_BENCH_OUT, else
                          ~/.cache/fastbridge/bench, or $XDG_CACHE_HOME/fastbridge/bench)
  --fb-no-write           measure and print, write nothing
  --fb-dtypes LIST        CUDA dtypes, e.g. bf16,fp16 (default bf16); --fb-cpu-dtypes for CPU (fp32)
  --fb-cpu-threads N      torch.set_num_threads (CPU timings are steadier with 1 on a busy machine)
  --fb-warmup-ms MS, --fb-rep-ms MS   time budgets per measurement
"""
BENCH_EPILOG = """\
Output: DIR/<device>.json (results merged across runs: a rerun replaces the cases it measured and
keeps the rest), DIR/plots/*.png and DIR/plots/results.md. The printed table shows only the cases this
run measured; the plots cover every result in the file. Examples:
  fastbridge bench --fb-quick
  fastbridge bench -k adapter_block --fb-results-dir ./bench-out
"""


class BenchmarksNotFound(RuntimeError):
    pass


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder (next to the fastbridge package of a source checkout)."""
    env = os.environ.get("FASTBRIDGE_BENCHMARKS_DIR")
    candidates = [Path(env).expanduser()] if env else []
    import fastbridge

    candidates.append(Path(fastbridge.__file__).resolve().parent.parent / "benchmarks")
    for c in candidates:
        if (c / "conftest.py").is_file() and (c / "_harness.py").is_file():
            return c.resolve()
    raise BenchmarksNotFound(
        "fastbridge bench: the benchmark suite was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). It ships with the source repository, not with the installed package: clone the repository and "
        "install it editable (pip install -e '.[test]'), or point FASTBRIDGE_BENCHMARKS_DIR at its benchmarks/ folder.")


def default_results_dir() -> Path:
    """$FASTBRIDGE_BENCH_OUT, else $XDG_CACHE_HOME/fastbridge/bench, else ~/.cache/fastbridge/bench
    (the same rule as benchmarks/plot.py's default_results_dir, which the suite uses)."""
    env = os.environ.get("FASTBRIDGE_BENCH_OUT")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(cache) / "fastbridge" / "bench").resolve()


def _results_dir(args: list[str], bdir: Path) -> Path:
    for i, a in enumerate(args):
        if a == "--fb-results-dir" and i + 1 < len(args):
            return Path(args[i + 1]).expanduser().resolve()
        if a.startswith("--fb-results-dir="):
            return Path(a.split("=", 1)[1]).expanduser().resolve()
    return default_results_dir()


def run_bench(args: list[str]) -> int:
    """Run the suite with extra pytest ``args``, then the table / plots; returns pytest's exit code."""
    args = list(args or [])
    try:
        bdir = benchmarks_dir()
    except BenchmarksNotFound as e:
        print(str(e), file=sys.stderr)
        return 2
    if "--first-contact" in args:
        return run_first_contact([a for a in args if a != "--first-contact"], bdir)
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        print("fastbridge bench: pytest-benchmark is not installed (pip install pytest-benchmark, or "
              "pip install -e '.[test]')", file=sys.stderr)
        return 2
    if args[:1] == ["--"]:
        args = args[1:]
    out = _results_dir(args, bdir)
    if not any(a.startswith("--fb-results-dir") for a in args):
        args = ["--fb-results-dir", str(out), *args]
    if not any(a.startswith("--benchmark-") and a != "--benchmark-only" for a in args):
        args = ["--benchmark-quiet", *args]  # pytest-benchmark's wide table: our compact one instead
    cmd = [sys.executable, "-c", _PYTEST, str(bdir), "--benchmark-only", *args]
    print("fastbridge bench: " + " ".join(["pytest", str(bdir), "--benchmark-only", *args]), flush=True)
    rc = subprocess.call(cmd)
    if "--fb-no-write" in args:
        return rc
    results = sorted(out.glob("*.json"))
    if not results:
        print(f"fastbridge bench: no results in {out} (nothing ran?)", file=sys.stderr)
        return rc or 1
    print(f"fastbridge bench: plots and the full table of every record in {out} (this run's and earlier "
          f"ones) go to {out / 'plots'}", flush=True)
    plot_rc = subprocess.call([sys.executable, str(bdir / "plot.py"), *map(str, results), "--out", str(out / "plots"),
                               "--quiet"])
    if plot_rc != 0:
        print(f"fastbridge bench: plot.py exited with {plot_rc} (see above)", file=sys.stderr)
    return rc


def run_first_contact(args: list[str], bdir: Path) -> int:
    """``fastbridge bench --first-contact [options]``: benchmarks/first_contact.py run (the prepared first
    GPU contact; ``--stages second`` for the second device call, ``--dry-run`` for the CPU rehearsal)."""
    cmd = [sys.executable, str(bdir / "first_contact.py"), "run", *args]
    print("fastbridge bench --first-contact: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)
