#!/usr/bin/env bash
# Everything fastbridge needs a GPU for. Two kinds of use:
#
# 1. THE FIRST GPU CONTACT (STAGES=first, then STAGES=second): the prepared, rehearsed device calls of
#    benchmarks/first_contact.py (its docstring lists the stages). Run them before anything else whenever a
#    GPU machine is lent. The budget (device tool, /work/.library/device/README.md, as of 2026-12):
#      15 minutes of device time per session in all -- the machine's start (1-2 min), every call, the idle
#      time between calls and the give-back all count; <= 10 minutes per command; at most 8 files back from
#      $OUT (16 MiB each, names of letters / digits / . _ -, <= 2 folders down); no network on the machine;
#      it stays warm only 30 s after a call. The image: Python 3.12, torch 2.11.0+cu130 (CUDA 13),
#      triton 3.6, transformers 5.17, peft, pytest: no wheels to carry. The device's copy of the tree has no
#      .git, so first record the git state here (git-ignored file, carried):
#        python benchmarks/first_contact.py stamp      # -> benchmarks/device_stamp.json
#    Call 1 (<= 8 min: deadline 450 s, then at most ~30 s of cut-off), device tool `run` with
#      command:   STAGES=first bash benchmarks/run_gpu.sh
#                 (= python3 benchmarks/first_contact.py run --stages first --out "$OUT")
#      carry:     ["benchmarks/device_stamp.json"]            timeout_s: 500
#      -> first_summary.json, first.log, info.txt, correctness.jsonl, <device>.json (5 files)
#    Call 2, at once (within the 30 s the machine stays warm; `status` first only if unsure: budget_left_s must
#    exceed DEADLINE + ~40 s), with
#      command:   STAGES=second DEADLINE=230 bash benchmarks/run_gpu.sh
#      carry:     ["benchmarks/device_stamp.json"]            timeout_s: 270
#      -> second_summary.json, second.log, info.txt, <device>.json, sweep_results.json (5 files)
#    then `give_back`. Every stage writes as it goes and has its own time budget (SIGINT at the end of it), so
#    a call that is cut off still returns what it measured. Here, after each call:
#      python benchmarks/first_contact.py unpack <files_at>     # merges <device>.json into benchmarks/results,
#                                                               # logs -> benchmarks/results/runs/<date>-<plan>/
#      python benchmarks/plot.py benchmarks/results/*.json --out benchmarks/results/plots
#      python benchmarks/readme_perf.py                         # README's performance section
#    and commit benchmarks/results + README.md; fix what failed; record prediction vs outcome in
#    benchmarks/notes/<op>.md. The rehearsal on CPU (also run by tests/test_first_contact.py in CI):
#      STAGES=first DRY_RUN=1 bash benchmarks/run_gpu.sh     # or: python benchmarks/first_contact.py run --dry-run
#
# 2. LATER SESSIONS (the full suite, in slices of < 10 minutes), into RESULTS_DIR:
#
#   bash benchmarks/run_gpu.sh [RESULTS_DIR]        # default RESULTS_DIR: benchmarks/results
#
# Stages (STAGES=a,b,...; default setup,info,build,tests,bench,plot), in this order:
#   setup  make fastbridge importable on a machine without network: wheels carried in .whl/ (made here by
#          benchmarks/device_wheels.sh: datasets, pycocoevalcap, ... for the demo only) are installed into
#          /tmp/fastbridge-site (PYTHONPATH), and fastbridge itself with `pip install --no-deps
#          --no-build-isolation --no-index -e .` unless it already imports from this tree; prints versions
#   info   `fastbridge info` + nvidia-smi                            -> info.txt
#   build  the C++/CUDA extension (`fastbridge build`)               -> build.log
#   tests  pytest tests/ on CUDA, at most TESTS_TIMEOUT s (480)      -> tests.log
#   bench  pytest benchmarks/ --benchmark-only, at most BENCH_TIMEOUT s (540; results so far are still
#          written) -> <device>.json (merged with what is there), bench.log.  BENCH_K="<-k expression>"
#          runs a slice, BENCH_ARGS="--fb-quick ..." adds options (benchmarks/conftest.py)
#   plot   plots/*.png + a markdown table of every results JSON in RESULTS_DIR
#   sweep  (not default) benchmarks/sweep_tiles.py run            -> sweep/ (SWEEP_ARGS: its options)
#   demo   (not default) `fastbridge demo --compare` at GPU size  -> demo/ (DEMO_BRIDGES, DEMO_ARGS)
# Every stage is cut off by DEADLINE seconds after the start (default 570: one device command may run 600).
# BUNDLE=FILE.tar.gz packs RESULTS_DIR into FILE when the script ends, also after a failure or a timeout
# (one file back instead of many: the device returns at most 8).
# With 15 device minutes per session, one session holds about one such call after its start; e.g.
#   BUNDLE=$OUT/r.tar.gz STAGES=setup,info,build,tests bash benchmarks/run_gpu.sh        (timeout_s 600)
#   BUNDLE=$OUT/r.tar.gz STAGES=setup,bench,plot BENCH_ARGS=--fb-quick bash benchmarks/run_gpu.sh
# (the demo needs `bash benchmarks/device_wheels.sh` here first and carry [".whl"]); unpack with
# `tar xzf <files_at>/r.tar.gz -C benchmarks/results`, then `python benchmarks/readme_perf.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
STAGES=${STAGES:-setup,info,build,tests,bench,plot}
PY=${PYTHON:-python3}

# The first GPU contact: benchmarks/first_contact.py (its own stages, budgets and file rules).
if [ "$STAGES" = first ] || [ "$STAGES" = second ]; then
  fc_out=${OUT:-}
  [ -n "${1:-}" ] && fc_out=$1
  fc_args=(run --stages "$STAGES")
  [ -n "$fc_out" ] && fc_args+=(--out "$fc_out")
  [ -n "${DEADLINE:-}" ] && fc_args+=(--deadline "$DEADLINE")
  [ "${DRY_RUN:-0}" = 1 ] && fc_args+=(--dry-run)
  if [ -z "$fc_out" ] && [ "${DRY_RUN:-0}" != 1 ]; then
    echo "run_gpu.sh: STAGES=$STAGES writes into \$OUT (the device tool sets it) or the folder given" >&2
    exit 2
  fi
  exec "$PY" benchmarks/first_contact.py "${fc_args[@]}"
fi
mkdir -p "$RESULTS"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels must run on the GPU, not in the interpreter

if [ -n "${BUNDLE:-}" ]; then
  bundle() { tar czf "$BUNDLE" -C "$RESULTS" . && echo "run_gpu.sh: results packed into $BUNDLE"; }
  trap bundle EXIT
  trap 'exit 143' TERM INT
fi

# Runs "$@" for at most $1 seconds and never past DEADLINE (SIGINT first: pytest still writes its summary
# and results), appends its output to $2, reports a failure without stopping the other stages.
START=$SECONDS
step() {
  local limit=$1 log=$2 rc left
  shift 2
  left=$(( ${DEADLINE:-570} - (SECONDS - START) - 15 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "run_gpu.sh: skipped $(basename "$log" .log): DEADLINE=${DEADLINE:-570} s reached" >&2
    return 0
  fi
  echo "== $(date -u +%FT%TZ) (limit ${limit} s): $*" >>"$log"
  set +e
  timeout -s INT -k 30 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ]; then
    echo "run_gpu.sh: $(basename "$log" .log) stopped after ${limit} s (rc=$rc); see $log" >&2
  elif [ "$rc" -ne 0 ]; then
    echo "run_gpu.sh: $(basename "$log" .log) failed (rc=$rc); see $log" >&2
  fi
}

if has setup; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/fastbridge-site .whl/*.whl
    export PYTHONPATH=/tmp/fastbridge-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  here=$(pwd -P)
  if ! "$PY" -c "import fastbridge, os, sys; sys.exit(0 if os.path.realpath(fastbridge.__file__).startswith('$here/') else 1)" \
      2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
  fi
  "$PY" - <<'EOF'
import importlib.metadata as m, platform


def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "MISSING"


names = ["torch", "triton", "transformers", "peft", "datasets", "pycocoevalcap", "safetensors", "numpy", "pytest",
         "pytest-benchmark", "matplotlib", "fastbridge"]
print("run_gpu.sh: python", platform.python_version(), "|", ", ".join(f"{n} {version(n)}" for n in names))
EOF
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run_gpu.sh: no CUDA device visible to torch; nothing to do" >&2
  exit 2
fi
if has info; then "$PY" -m fastbridge.cli info | tee "$RESULTS/info.txt"; nvidia-smi >>"$RESULTS/info.txt" 2>&1 || true; fi
if has build; then step 300 "$RESULTS/build.log" "$PY" -m fastbridge.cli build; fi
if has tests; then
  # No FASTBRIDGE_BACKEND override: CUDA tensors take the kernels; bf16 is among the CUDA test dtypes.
  step "${TESTS_TIMEOUT:-480}" "$RESULTS/tests.log" "$PY" -m pytest tests/ -q -p no:cacheprovider -rs
fi
if has sweep; then
  mkdir -p "$RESULTS/sweep"
  # shellcheck disable=SC2086
  step "${SWEEP_TIMEOUT:-360}" "$RESULTS/sweep/sweep.log" "$PY" benchmarks/sweep_tiles.py run --out "$RESULTS/sweep" \
    ${SWEEP_ARGS:-}
fi
if has bench; then
  # shellcheck disable=SC2086
  step "${BENCH_TIMEOUT:-540}" "$RESULTS/bench.log" "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
    --fb-results-dir "$RESULTS" ${BENCH_K:+-k "$BENCH_K"} ${BENCH_ARGS:-}
fi
if has plot; then
  step 120 "$RESULTS/plot.log" "$PY" benchmarks/plot.py "$RESULTS"/*.json --out "$RESULTS/plots"
fi
if has demo; then
  # shellcheck disable=SC2086
  step "${DEMO_TIMEOUT:-540}" "$RESULTS/demo.log" "$PY" -m fastbridge.cli demo --bridge "${DEMO_BRIDGES:-all}" \
    --compare --no-progress --out "$RESULTS/demo" ${DEMO_ARGS:-}
fi
echo "run_gpu.sh: outputs in $RESULTS"
