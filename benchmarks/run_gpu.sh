#!/usr/bin/env bash
# Everything fastbridge needs a GPU for, written into one folder (a few files): versions and device,
# the whole test suite on CUDA (fp32 / fp16 / bf16 kernel tests), the measured ceilings, the benchmark
# suite (results JSON merged per device) and its plots + markdown table.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]            # default OUT_DIR: benchmarks/results
#   STAGES=tests bash benchmarks/run_gpu.sh         # some stages only: info,build,tests,bench,plot,demo
#   (demo: `fastbridge demo --compare` at GPU size: eager vs fastbridge training of the bridges, JSON + PNGs
#    in OUT/demo; not in the default stages: it takes minutes per bridge)
#   BENCH_K="adapter_block and bf16" bash benchmarks/run_gpu.sh   # a slice of the benchmarks (-k)
#   BENCH_ARGS="--fb-quick" bash benchmarks/run_gpu.sh            # extra benchmark options
#
# Planned to finish well under 30 minutes on an H100 with --fb-quick; the full grid is split with
# BENCH_K into calls of under 10 minutes each (results merge into the same JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
STAGES=${STAGES:-info,build,tests,bench,plot}
mkdir -p "$OUT"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the kernels must run on the GPU, not in the interpreter

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run_gpu.sh: no CUDA device visible to torch; nothing to do" >&2
  exit 2
fi
if has info; then fastbridge info | tee "$OUT/info.txt"; nvidia-smi >>"$OUT/info.txt" 2>&1 || true; fi
if has build && fastbridge --help 2>/dev/null | grep -q " build"; then
  fastbridge build 2>&1 | tee "$OUT/build.log"
fi
if has tests; then
  # No FASTBRIDGE_BACKEND override: CUDA tensors take the kernels; bf16 is among the CUDA test dtypes.
  set +e
  pytest tests/ -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  set -e
  [ "$rc" -eq 0 ] || echo "run_gpu.sh: tests failed (rc=$rc); see $OUT/tests.log" >&2
fi
if has bench; then
  # shellcheck disable=SC2086
  pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --fb-results-dir "$OUT" \
    ${BENCH_K:+-k "$BENCH_K"} ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
fi
if has plot; then
  python benchmarks/plot.py "$OUT"/*.json --out "$OUT/plots"
fi
if has demo; then
  fastbridge demo --bridge "${DEMO_BRIDGES:-all}" --compare --no-progress --out "$OUT/demo" ${DEMO_ARGS:-} \
    2>&1 | tee "$OUT/demo.log"
fi
echo "run_gpu.sh: outputs in $OUT"
