#!/usr/bin/env bash
# Everything fastbridge needs a GPU for, written into one folder: versions and device, the whole test
# suite on CUDA (fp32 / fp16 / bf16 kernel tests), the measured ceilings, the benchmark suite (results JSON
# merged per device) and its plots + markdown table; on request the launch-config sweep and the demo.
#
#   bash benchmarks/run_gpu.sh [RESULTS_DIR]        # default RESULTS_DIR: benchmarks/results
#
# Stages (STAGES=a,b,...; default setup,info,build,tests,bench,plot), in this order:
#   setup  make fastbridge importable on a machine without network: wheels carried in .whl/ (made here by
#          benchmarks/device_wheels.sh: datasets, pycocoevalcap, ... for the demo) are installed into
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
# BUNDLE=FILE.tar.gz packs RESULTS_DIR into FILE when the script ends, also after a failure or a timeout.
#
# On the lent H100 (device tool: 30 min of device time per session, <= 10 min per command, at most 8 files
# back from $OUT, a machine that stays warm only 30 s between calls), prepare here first:
#   bash benchmarks/device_wheels.sh                 # .whl/ (1.3 MB; git-ignored)
# then run, each call with carry [".whl"], each well under 10 minutes:
#   1. BUNDLE=$OUT/r1.tar.gz STAGES=setup,info,build,tests bash benchmarks/run_gpu.sh
#   2. BUNDLE=$OUT/r2.tar.gz STAGES=setup,bench,plot BENCH_ARGS=--fb-quick bash benchmarks/run_gpu.sh
#   3. BUNDLE=$OUT/r3.tar.gz STAGES=setup,sweep,bench,plot BENCH_K="e2e_cuda or qformer_train_step" \
#        bash benchmarks/run_gpu.sh
#   (4. the full grids in BENCH_K slices: benchmarks/notes/<op>.md; STAGES=setup,demo for the demo)
# and unpack each bundle here into benchmarks/results (`tar xzf <files_at>/rN.tar.gz -C benchmarks/results`)
# before the next call, so that call merges into the same JSON; finally `python benchmarks/readme_perf.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
STAGES=${STAGES:-setup,info,build,tests,bench,plot}
PY=${PYTHON:-python3}
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
