#!/usr/bin/env bash
# Wheels for the packages the lent GPU machine lacks, fetched HERE (it has no network) into .whl/
# (git-ignored), to be carried with a device call (`carry: [".whl"]`); benchmarks/run_gpu.sh's setup stage
# installs them there. The machine's image (Python 3.12, x86-64, torch 2.11.0+cu130, triton 3.6,
# transformers 5.17) already has torch, triton, transformers, peft, safetensors, pyarrow, pandas, matplotlib,
# tqdm, pytest, pytest-benchmark; it lacks what the `fastbridge demo` stage needs: datasets (+ dill,
# multiprocess) and pycocoevalcap (+ pycocotools). The first GPU contact (STAGES=first / second,
# benchmarks/first_contact.py) needs none of them: its calls carry nothing.
#
#   bash benchmarks/device_wheels.sh          # -> .whl/*.whl, a few MB
#
# The versions are the ones installed in this environment (the tested ones). pycocoevalcap's wheel is
# 100 MB, almost all of it Java (METEOR, SPICE, the PTB tokenizer jar, METEOR's paraphrase table): over
# the device's 64 MiB carry limit, and useless there (no Java on that image). So it is repacked without
# the Java parts; fastbridge.eval then uses its pure-Python tokenizer and skips METEOR / SPICE, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY_VERSION=${PY_VERSION:-3.12}
rm -rf "$DEST"
mkdir -p "$DEST"
pins=$(python3 - <<'EOF'
import importlib.metadata as m
names = ["datasets", "dill", "multiprocess", "pycocotools", "pycocoevalcap"]
have = {(d.metadata["Name"] or "").lower() for d in m.distributions()}
missing = [n for n in names if n not in have]
if missing:
    raise SystemExit(f"device_wheels.sh: not installed here: {', '.join(missing)} (pip install -e '.[test]' first)")
print(" ".join(f"{n}=={m.version(n)}" for n in names))
EOF
)
echo "device_wheels.sh: fetching $pins for CPython $PY_VERSION (manylinux x86-64)"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $pins

python3 - "$DEST" <<'EOF'
"""Repack pycocoevalcap without its Java parts (jars, METEOR data, SPICE), RECORD kept consistent."""
import base64, hashlib, sys, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
(src,) = dest.glob("pycocoevalcap-*.whl")
keep = lambda n: not (n.endswith(".jar") or "/meteor/data/" in n or "/spice/" in n)
tmp = src.with_suffix(".tmp")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist() if keep(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    rows = []
    for n in names:
        if n == record:
            continue
        data = zin.read(n)
        zout.writestr(n, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{n},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join(rows + [f"{record},,"]) + "\n")
before, after = src.stat().st_size, tmp.stat().st_size
tmp.replace(src)
print(f"device_wheels.sh: {src.name} repacked without Java: {before / 1e6:.1f} MB -> {after / 1e6:.2f} MB")
EOF
du -ch "$DEST"/*.whl | tail -1 | sed 's/^/device_wheels.sh: total /'
ls -1 "$DEST"
