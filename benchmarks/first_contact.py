#!/usr/bin/env python3
"""First GPU contact: the decisive evidence in one device call, and the end-to-end steps in a second one.

    python benchmarks/first_contact.py stamp                                 # here, before the calls
    python benchmarks/first_contact.py run --stages first  --out "$OUT"      # call 1: <= 8 min, <= 8 files
    python benchmarks/first_contact.py run --stages second --out "$OUT"      # call 2: <= 5 min, <= 8 files
    python benchmarks/first_contact.py run --stages first --dry-run          # the CPU rehearsal (CI: tests/)
    python benchmarks/first_contact.py check DIR                             # the files a call brings back
    python benchmarks/first_contact.py unpack FILES_AT [--results DIR]       # into benchmarks/results
    (also: python -m fastbridge bench --first-contact [run options]; bash benchmarks/run_gpu.sh with
    STAGES=first / STAGES=second)

Stages of call 1 ("first"), each a child process with its own time budget, all under one deadline
(--deadline, default 450 s; the device allows 600 s per command). A stage past its budget gets SIGINT
(then SIGTERM, SIGKILL): what it measured so far is already on disk, because every stage writes as it goes.
  info         versions, `fastbridge info`, nvidia-smi                           -> info.txt
  build        the C++/CUDA extension (JIT, the device's arch only), in the background from the start;
               each compile instance's time from ninja's log                      -> first_summary.json
  correctness  every fused op (CORRECTNESS below: adapter, gated attention incl. split-K decode and both
               dQ modes, Q-Former incl. dropout, gated cross-attention when the op exists) against the
               float64 reference, outputs and every gradient, bf16 / fp16 / fp32 on CUDA, one worker
               process per dtype (Triton compiles in parallel); one JSON line per case -> correctness.jsonl
  ceilings     copy bandwidth, bf16 / tf32 matmul                                 -> <device>.json
  bench-*      the headline benchmarks at realistic shapes, every provider in the same run (BENCH below):
               gated attention LLaMA-7B layer, adapter d=4096 r=64 N=16k, Q-Former B=64 Lk=257; the
               torch.compile providers last (their compile time is the most expensive)   -> <device>.json
Call 2 ("second"): build (cached when the machine is still warm), e2e (PEFT LLaMA-Adapter training step:
LLaMA-7B-shaped 4-layer slice and Llama-3.2-3B-shaped 28 layers with adapter_len=100, PEFT unpatched vs
fastbridge-patched vs PEFT LoRA r=32, tokens/s and peak memory), qformer-step (BLIP-2 Q-Former training
step, patched vs unpatched), sweep (benchmarks/sweep_tiles.py run, one kernel at a time) -> sweep_results.json.
Files of a call (at most 8, checked at the end): <stage>_summary.json (plan, per-stage status / seconds,
versions, git sha, date, the file check), <stage>.log (every child's output, prefixed), and the stage files
above. The results JSON is the format of benchmarks/results (shared/design/BENCHMARKS.md), measured with
benchmarks/_harness.py through the benchmark modules' own case runners (test_bench_*.py ``_run``).

--dry-run runs every stage's plumbing on CPU (Triton interpreter, tiny shapes, fp32, short timing budgets,
no torch.compile providers, the sweep's no-GPU exit) and checks the files, so an import error, a bad path or
a missing variable shows up before a device minute is spent; its numbers are CPU smoke numbers, never claims.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# The device tool's rules for what comes back from $OUT (/work/.library/device/README.md, "Limits").
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
MAX_DEPTH = 2  # folders below $OUT: $OUT/a/b/file comes back, $OUT/a/b/c/file does not
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")

DTYPES = ("bf16", "fp16", "fp32")
# Call 1 ends by ~480 s (the deadline, then at most GRACE_S + 10 s of cut-off); call 2 must fit what is left of
# the 15 device minutes after the machine's start (~1-2 min) and call 1: about 4 minutes.
DEFAULT_DEADLINE = {"first": 450.0, "second": 230.0}
DRY_RUN_SLACK = 4.0  # the rehearsal's budgets: a slow CPU must not cut a stage whose plumbing is being checked
GRACE_S = 20.0  # after SIGINT: pytest / the stage writes what it has; then SIGTERM, SIGKILL


# =========================================================================================== plans
@dataclass
class Stage:
    name: str
    budget_s: float                # on the GPU; the dry run uses the same limits
    args: list = field(default_factory=list)  # extra arguments of `_stage NAME`
    background: bool = False       # started, not waited for (build); joined by `wait_for`
    wait_for: tuple = ()           # stages that must have ended first
    workers: tuple = ()            # one child per item (correctness: per dtype), run in parallel


PLANS = {
    "first": [
        Stage("build", 150, background=True),  # first: it compiles while info and correctness run
        Stage("info", 45),
        Stage("correctness", 180, workers=DTYPES),
        Stage("ceilings", 30, wait_for=("build",)),
        Stage("bench-ga", 60),
        Stage("bench-adapter", 35),
        Stage("bench-qformer", 35),
        Stage("bench-compile", 110),
    ],
    "second": [
        Stage("build", 90, background=True),  # cached when the machine is still warm from call 1
        Stage("info", 20),
        Stage("e2e", 100, wait_for=("build",)),
        Stage("qformer-step", 35),
        Stage("sweep", 120),
    ],
}
STAGE_FILES = {"info": "info.txt", "correctness": "correctness.jsonl", "sweep": "sweep_results.json"}


# ======================================================================================= file rules
def check_files(out: Path) -> dict:
    """The device tool's limits on what comes back, and the schema of every JSON file there."""
    problems, files, total = [], [], 0
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        for part in rel.parts:
            if not NAME_RE.match(part):
                problems.append(f"{rel}: name {part!r} has characters other than letters, digits, '.', '_', '-'")
        if p.is_symlink():
            problems.append(f"{rel}: a link does not come back")
            continue
        if p.is_dir():
            continue
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders down")
        size = p.stat().st_size
        total += size
        if size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {size} bytes > {MAX_FILE_BYTES}")
        files.append(str(rel))
        try:
            _check_schema(p)
        except ValueError as e:
            problems.append(f"{rel}: {e}")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}: {', '.join(files)}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total} bytes in all > {MAX_TOTAL_BYTES}")
    return {"files": files, "bytes": total, "problems": problems}


SUMMARY_KEYS = ("plan", "dry_run", "started", "git_sha", "deadline_s", "stages")
STAGE_KEYS = ("name", "status", "seconds", "budget_s")
STATUSES = ("ok", "failed", "cut", "skipped", "running", "pending")
CORRECTNESS_KEYS = ("op", "case", "dtype", "device", "status", "seconds")


def _check_schema(path: Path) -> None:
    """Raise ValueError when a file of ours does not have the shape its readers expect."""
    _bench_imports()
    import _harness as H

    if path.name.endswith("_summary.json"):
        doc = json.loads(path.read_text())
        for k in SUMMARY_KEYS:
            if k not in doc:
                raise ValueError(f"summary: missing {k!r}")
        for s in doc["stages"]:
            for k in STAGE_KEYS:
                if k not in s:
                    raise ValueError(f"summary: stage {s.get('name')!r} lacks {k!r}")
            if s["status"] not in STATUSES:
                raise ValueError(f"summary: stage {s['name']!r} has status {s['status']!r}")
    elif path.suffix == ".jsonl":
        for i, line in enumerate(path.read_text().splitlines()):
            rec = json.loads(line)
            for k in CORRECTNESS_KEYS:
                if k not in rec:
                    raise ValueError(f"line {i + 1}: missing {k!r}")
    elif path.name == "sweep_results.json":
        doc = json.loads(path.read_text())
        if not isinstance(doc.get("runs"), list):
            raise ValueError("sweep results: expected {'runs': [...]}")
    elif path.suffix == ".json":
        H.validate_results(json.loads(path.read_text()), str(path.name))


# ========================================================================================= parent
def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


STAMP = HERE / "device_stamp.json"  # git-ignored; written here by `stamp`, carried with the device calls


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_state() -> dict:
    """{sha, dirty, diff_sha256, source}: from git, else from the stamp (the device's copy of the working tree
    has no .git: `first_contact.py stamp` records the state here and the call carries the file)."""
    sha = _git("rev-parse", "HEAD")
    if sha:
        status = _git("status", "--porcelain", "--untracked-files=no") or ""
        diff = _git("diff", "HEAD") or ""
        import hashlib

        return {"sha": sha.strip(), "dirty": bool(status.strip()),
                "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None, "source": "git"}
    if STAMP.is_file():
        with contextlib.suppress(ValueError):
            return dict(json.loads(STAMP.read_text()), source=f"stamp {STAMP.name}")
    return {"sha": None, "dirty": None, "diff_sha256": None, "source": "none (no .git, no stamp)"}


def _git_sha() -> Optional[str]:
    return git_state()["sha"]


class Runner:
    """Runs a plan's stages as child processes, tees their output into <plan>.log, keeps <plan>_summary.json."""

    def __init__(self, plan: str, out: Path, dry_run: bool, deadline_s: float, only: Optional[list]):
        self.plan, self.out, self.dry_run = plan, out, dry_run
        self.deadline_s = deadline_s
        self.t0 = time.monotonic()
        self.scratch = Path(tempfile.mkdtemp(prefix="fastbridge-fc-"))
        self.log_path = out / f"{plan}.log"
        self.summary_path = out / f"{plan}_summary.json"
        self.log_lock = threading.Lock()
        self.stages = [s for s in PLANS[plan] if not only or s.name in only]
        self.status = {s.name: {"name": s.name, "status": "pending", "seconds": 0.0, "budget_s": s.budget_s}
                       for s in self.stages}
        self.procs: dict[str, list] = {}
        self.until: dict[str, float] = {}  # monotonic time at which each running stage is cut
        git = git_state()
        self.doc = {"plan": plan, "dry_run": dry_run, "started": _utc(), "git_sha": git["sha"], "git": git,
                    "deadline_s": deadline_s, "argv": sys.argv[1:], "python": sys.version.split()[0],
                    "stages": list(self.status.values())}
        self.env = self._child_env()

    # ------------------------------------------------------------------ environment of the children
    def _child_env(self) -> dict:
        """This checkout's fastbridge first on the path (a link in a scratch folder: never the repository
        root, whose kernels/ folder must not become a top-level module), unbuffered output."""
        link_dir = self.scratch / "path"
        link_dir.mkdir()
        (link_dir / "fastbridge").symlink_to(REPO / "fastbridge", target_is_directory=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(link_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                if p])
        env["PYTHONUNBUFFERED"] = "1"
        env["FASTBRIDGE_FC_SCRATCH"] = str(self.scratch)
        env.pop("FASTBRIDGE_POISON", None)  # set per stage (correctness only: poison would skew timings)
        if self.dry_run:
            env["TRITON_INTERPRET"] = "1"  # the kernels run in the interpreter (correctness stage)
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, stage: str, line: str) -> None:
        text = f"[{self.elapsed():6.1f}s {stage}] {line.rstrip()}\n"
        with self.log_lock:
            with open(self.log_path, "a") as f:
                f.write(text)
            sys.stdout.write(text)
            sys.stdout.flush()

    def write_summary(self) -> None:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        self.doc["stages"] = list(self.status.values())
        tmp = self.summary_path.with_name(self.summary_path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1) + "\n")
        tmp.replace(self.summary_path)

    # --------------------------------------------------------------------------------- children
    def _spawn(self, stage: Stage, tag: str, extra: list) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_stage", stage.name, "--out", str(self.out),
               "--until", str(time.time() + self._limit(stage)), *extra]
        if self.dry_run:
            cmd.append("--dry-run")
        env = dict(self.env)
        if stage.name == "correctness":
            env["FASTBRIDGE_POISON"] = "1"
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        threading.Thread(target=self._pump, args=(proc, tag), daemon=True).start()
        return proc

    def _pump(self, proc: subprocess.Popen, tag: str) -> None:
        for line in proc.stdout:
            self.log(tag, line)

    def _limit(self, stage: Stage) -> float:
        budget = stage.budget_s * (DRY_RUN_SLACK if self.dry_run else 1.0)
        return max(0.0, min(budget, self.deadline_s - self.elapsed() - 5.0))

    def start(self, stage: Stage) -> bool:
        limit = self._limit(stage)
        st = self.status[stage.name]
        if limit < 8.0:
            st.update(status="skipped", note=f"deadline ({self.deadline_s:.0f} s) reached")
            self.log("run", f"skipped {stage.name}: deadline reached")
            self.write_summary()
            return False
        st.update(status="running", started_at_s=round(self.elapsed(), 1), limit_s=round(limit, 1))
        if stage.workers:
            workers = ("fp32",) if self.dry_run and stage.name == "correctness" else stage.workers
            self.procs[stage.name] = [self._spawn(stage, f"{stage.name}:{w}", ["--worker", w, *stage.args])
                                      for w in workers]
        else:
            self.procs[stage.name] = [self._spawn(stage, stage.name, list(stage.args))]
        self.until[stage.name] = time.monotonic() + limit
        self.write_summary()
        return True

    def finish(self, stage: Stage) -> None:
        """Wait for a started stage until its limit; past it SIGINT, then SIGTERM, then SIGKILL."""
        procs = self.procs.get(stage.name)
        st = self.status[stage.name]
        if not procs or st["status"] != "running":
            return
        until = self.until[stage.name]
        cut = False
        for p in procs:
            try:
                p.wait(timeout=max(0.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                cut = True
        if cut:
            self.log("run", f"{stage.name}: past its {st['limit_s']} s: SIGINT")
            for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                alive = [p for p in procs if p.poll() is None]
                if not alive:
                    break
                for p in alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, sig)
                t_end = time.monotonic() + wait
                for p in alive:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=max(0.1, t_end - time.monotonic()))
        rcs = [p.returncode for p in procs]
        st["seconds"] = round(self.elapsed() - st["started_at_s"], 1)
        st["rc"] = rcs if len(rcs) > 1 else rcs[0]
        if cut:
            st["status"] = "cut"
        elif all(rc == 0 for rc in rcs):
            st["status"] = "ok"
        else:
            st["status"] = "failed"
        # what a stage reports for the summary (build timings, counts, ...): <stage>.json, or one per worker
        reports = {}
        for w in stage.workers or (None,):
            f = self.scratch / (f"{stage.name}-{w}.json" if w else f"{stage.name}.json")
            if f.is_file():
                with contextlib.suppress(ValueError):
                    reports[w] = json.loads(f.read_text())
        if stage.workers and reports:
            line = "; ".join(f"{w}: {r.get('line', '')}" for w, r in reports.items())
            st["report"] = {"workers": reports, "line": line}
        elif reports:
            st["report"] = reports[None]
        self.log("run", f"{stage.name}: {st['status']} (rc {st['rc']}) in {st['seconds']} s")
        self.write_summary()

    def stop_all(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGINT)

    # -------------------------------------------------------------------------------------- run
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        # $OUT is empty on the device; a local rerun into the same folder starts this plan's files afresh
        # (a results JSON is merged into, never cleared)
        for name in (self.log_path.name, self.summary_path.name,
                     *(STAGE_FILES[s.name] for s in self.stages if s.name in STAGE_FILES)):
            (self.out / name).unlink(missing_ok=True)
        self.log("run", f"plan {self.plan}{' (dry run)' if self.dry_run else ''}: "
                        f"{', '.join(s.name for s in self.stages)}; deadline {self.deadline_s:.0f} s; out {self.out}")
        self.write_summary()
        background = []
        try:
            for stage in self.stages:
                for dep in stage.wait_for:
                    dep_stage = next((s for s in self.stages if s.name == dep), None)
                    if dep_stage is not None:
                        self.finish(dep_stage)
                if not self.start(stage):
                    continue
                if stage.background:
                    background.append(stage)
                else:
                    self.finish(stage)
            for stage in background:
                self.finish(stage)
        except KeyboardInterrupt:
            self.log("run", "interrupted: stopping the stages")
            self.stop_all()
            for stage in self.stages:
                if self.status[stage.name]["status"] == "running":
                    self.status[stage.name]["status"] = "cut"
        finally:
            self.doc["files"] = check_files(self.out)
            self.write_summary()
            # the summary itself is now written: check again so its own presence is counted
            self.doc["files"] = check_files(self.out)
            self.write_summary()
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.print_table()
        bad = [s for s in self.status.values() if s["status"] in ("failed", "cut")]
        return 1 if bad or self.doc["files"]["problems"] else 0

    def print_table(self) -> None:
        lines = [f"first_contact {self.plan}{' DRY RUN (CPU plumbing, no claims)' if self.dry_run else ''}: "
                 f"{self.elapsed():.0f} s"]
        for s in self.status.values():
            rep = s.get("report") or {}
            note = rep.get("line") or s.get("note") or ""
            lines.append(f"  {s['name']:14s} {s['status']:8s} {s['seconds']:6.1f} s / {s['budget_s']:.0f}  {note}")
        lines += headline(self.out)
        f = self.doc["files"]
        lines.append(f"  files: {len(f['files'])} ({f['bytes'] / 1e6:.2f} MB): {', '.join(f['files'])}")
        for p in f["problems"]:
            lines.append(f"  FILE PROBLEM: {p}")
        text = "\n".join(lines)
        with self.log_lock:
            with open(self.log_path, "a") as fh:
                fh.write(text + "\n")
        print(text, flush=True)


def headline(out: Path, limit: int = 40) -> list[str]:
    """One line per measured case: every provider's p50 (and peak memory), fastbridge's speed-up over each."""
    rows = []
    for path in sorted(out.glob("*.json")):
        if path.name.endswith("_summary.json") or path.name == STAGE_FILES["sweep"]:
            continue
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        groups: dict = {}
        for r in doc.get("records", []):
            key = (r["op"], r["dtype"], r["mode"], json.dumps(r["shape"], sort_keys=True))
            groups.setdefault(key, []).append(r)
        rows.append(f"  results {path.name} ({doc.get('device')}): p50 ms [peak MiB] (xN: its time / fastbridge's)")
        for (op, dt, mode, shape), recs in groups.items():
            ours = next((r for r in recs if r["provider"] == "fastbridge"), None)
            cells = []
            for r in sorted(recs, key=lambda r: r["ms"]["p50"]):
                cell = f"{r['provider']} {r['ms']['p50']:.4g}"
                if r.get("peak_mb") is not None:
                    cell += f" [{r['peak_mb']:.0f}]"
                if ours is not None and r is not ours:
                    cell += f" (x{r['ms']['p50'] / ours['ms']['p50']:.2f})"
                cells.append(cell)
            rows.append(f"    {op} {dt} {mode} {' '.join(f'{k}={v}' for k, v in json.loads(shape).items())}: "
                        + ", ".join(cells))
    if len(rows) > limit:
        rows = rows[:limit] + [f"    ... {len(rows) - limit} more lines in the results JSON"]
    return rows


# ================================================================================ stage: helpers
def _stage_report(name: str, doc: dict) -> None:
    """What a stage hands the parent for the summary (a file in the scratch folder, never in $OUT)."""
    scratch = os.environ.get("FASTBRIDGE_FC_SCRATCH")
    if scratch:
        Path(scratch, f"{name}.json").write_text(json.dumps(doc))


def _bench_imports():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))


# =================================================================================== stage: info
INFO_PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "numpy", "pytest",
                 "pytest-benchmark", "datasets")


def stage_info(a) -> int:
    import importlib.metadata as md
    import platform

    lines = [f"date         {_utc()}", f"git          {git_state()}", f"dry run      {a.dry_run}"]
    from fastbridge.cli import info_lines

    lines += info_lines()
    vers = []
    for n in INFO_PACKAGES:
        try:
            vers.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            vers.append(f"{n} MISSING")
    lines.append(f"packages     python {platform.python_version()}, " + ", ".join(vers))
    lines.append(f"cpus         {os.cpu_count()}")
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        lines += ["", "$ nvidia-smi", r.stdout + r.stderr]
        r = subprocess.run([smi, "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,"
                                 "temperature.gpu", "--format=csv"], capture_output=True, text=True, timeout=30)
        lines += ["$ nvidia-smi --query-gpu=...", r.stdout + r.stderr]
    else:
        lines.append("nvidia-smi   not found")
    text = "\n".join(lines) + "\n"
    (Path(a.out) / STAGE_FILES["info"]).write_text(text)
    print(text)
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    _stage_report("info", {"line": f"{dev}; torch {torch.__version__}", "device": dev, "torch": torch.__version__,
                           "cuda": torch.version.cuda, "packages": vers})
    if not a.dry_run and not torch.cuda.is_available():
        print("first_contact: no CUDA device visible to torch: the GPU stages cannot run", file=sys.stderr)
        return 2
    return 0


# ================================================================================== stage: build
def _ninja_times(build_dir: Path) -> list[dict]:
    """Per-output compile / link times from ninja's .ninja_log (start and end in ms per edge)."""
    log = build_dir / ".ninja_log"
    rows = {}
    if not log.is_file():
        return []
    for line in log.read_text().splitlines():
        if line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) >= 4 and parts[0].isdigit():
            rows[parts[3]] = {"output": parts[3], "seconds": (int(parts[1]) - int(parts[0])) / 1e3}
    return sorted(rows.values(), key=lambda r: -r["seconds"])


def stage_build(a) -> int:
    from fastbridge import _build

    report = {"torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "with_cuda": _build.with_cuda()}
    state = _build.describe()
    print(f"extension before: {state}")
    if a.dry_run and state.startswith("not built"):
        # The rehearsal does not compile (minutes on a 2-core CI machine); CI builds it earlier (.ci/run).
        report["line"] = "dry run: extension not built here, not compiled (fastbridge build does that)"
        _stage_report("build", report)
        print(report["line"])
        return 0
    t0 = time.perf_counter()
    try:
        path = _build.build(verbose=True)
    except _build.ExtensionUnavailable as e:
        report.update(line=f"FAILED: {e}", seconds=round(time.perf_counter() - t0, 1))
        _stage_report("build", report)
        print(f"first_contact build: {e}", file=sys.stderr)
        return 1
    secs = time.perf_counter() - t0
    bdir = _build.build_dir()
    times = _ninja_times(bdir)
    for r in times:
        print(f"  {r['seconds']:7.1f} s  {r['output']}")
    kinds = "CPU + CUDA" if _build.has_cuda_kernels() else "CPU"
    slowest = f"; slowest {times[0]['output']} {times[0]['seconds']:.0f} s" if times else ""
    report.update(seconds=round(secs, 1), library=path, cuda_kernels=_build.has_cuda_kernels(), compile=times,
                  line=f"{secs:.0f} s ({kinds} kernels{slowest})")
    _stage_report("build", report)
    print(f"first_contact build: {report['line']}")
    return 0


# ============================================================================ stage: correctness
# Data-driven: one entry per (op, case); RUNNERS[op] turns a case into [(name, actual, float64 expected)].
# A new op adds a runner and its cases here. "dry": also run in the CPU rehearsal (interpreter, fp32).
# "gpu_only_dtypes": dtypes the interpreter cannot run (bf16 tl.dot is wrong in Triton 3.9's interpreter).
CORRECTNESS = [
    # adapter_block: x (*lead, d) -> x + s·up(act(down(LN?(x))))
    dict(op="adapter_block", case="ln-gelu-gate-odd", dry=True,
         shape=dict(lead=(2, 19), d=70, r=13, act="gelu", ln=True, ln_bias=True, gate=True)),
    dict(op="adapter_block", case="blip-d4096-r64", shape=dict(lead=(257,), d=4096, r=64, act="gelu")),
    dict(op="adapter_block", case="pfeiffer-ln-relu-d1408-res", shape=dict(lead=(3, 41), d=1408, r=16, act="relu",
                                                                          ln=True, ln_bias=True, residual=True)),
    dict(op="adapter_block", case="silu-d257-r200-tscale", shape=dict(lead=(33,), d=257, r=200, act="silu",
                                                                     tensor_scale=True)),
    # gated_attention: causal prefill (both dQ modes), GQA, padding, per-sample prompts, decode, split-K decode
    dict(op="gated_attention", case="gqa-causal-odd-sep", dry=True,
         shape=dict(B=2, H=4, Hkv=2, Lq=37, Lk=37, P=3, D=32, dq="separate")),
    dict(op="gated_attention", case="gqa-causal-odd-atomic", dry=True,
         shape=dict(B=2, H=4, Hkv=2, Lq=37, Lk=37, P=3, D=32, dq="atomic")),
    dict(op="gated_attention", case="llama-d128-L300-P10-sep", shape=dict(B=2, H=4, Hkv=4, Lq=300, Lk=300, P=10, D=128,
                                                                          dq="separate", gate_fn="identity")),
    dict(op="gated_attention", case="llama-d128-L300-P10-atomic", shape=dict(B=2, H=4, Hkv=4, Lq=300, Lk=300, P=10,
                                                                             D=128, dq="atomic", gate_fn="identity")),
    dict(op="gated_attention", case="mqa-pad-per-sample-d64", shape=dict(B=3, H=4, Hkv=1, Lq=45, Lk=45, P=7, D=64,
                                                                        kpm=True, per_sample=True)),
    dict(op="gated_attention", case="decode-Lq1-d64", shape=dict(B=2, H=4, Hkv=2, Lq=1, Lk=83, P=7, D=64)),
    dict(op="gated_attention", case="decode-splitK-Lk777-d128", dry=True,
         shape=dict(B=1, H=2, Hkv=1, Lq=1, Lk=777, P=5, D=128, expect_split=True)),
    dict(op="gated_attention", case="decode-splitK-Lq5-pad-d64", shape=dict(B=1, H=4, Hkv=2, Lq=5, Lk=1100, P=4, D=64,
                                                                            kpm="partial", expect_split=True)),
    # qformer_cross_attention (C++/CUDA extension): masks, query batch 1, dropout (the kernels' Philox mask)
    dict(op="qformer_cross_attention", case="blip2-Lk257-nomask", dry=True,
         shape=dict(B=3, qB=3, H=12, Lq=32, Lk=257, D=64)),
    dict(op="qformer_cross_attention", case="bool-mask-odd",
         shape=dict(B=2, qB=2, H=3, Lq=33, Lk=131, D=64, mask="bool")),
    dict(op="qformer_cross_attention", case="qbatch1-additive", shape=dict(B=3, qB=1, H=2, Lq=9, Lk=41, D=64,
                                                                          mask="additive")),
    dict(op="qformer_cross_attention", case="dropout0.1-Lk257", dry=True,
         shape=dict(B=2, qB=2, H=12, Lq=32, Lk=257, D=64, dropout=0.1)),
    dict(op="qformer_cross_attention", case="dropout0.3-bool-d32", shape=dict(B=2, qB=2, H=3, Lq=17, Lk=130, D=32,
                                                                             mask="bool", dropout=0.3)),
    # gated_cross_attention (Flamingo-style; runs once the op exists in fastbridge.ops)
    dict(op="gated_cross_attention", case="segments-visibility-gqa", dry=True,
         shape=dict(B=2, H=4, Hkv=2, Lq=19, S=3, seg=17, D=32, visibility=True)),
    dict(op="gated_cross_attention", case="no-visibility-d128", shape=dict(B=2, H=4, Hkv=4, Lq=33, S=1, seg=65, D=128)),
]


def _rnd(g, *shape, scale=1.0, shift=0.0):
    import torch

    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _grads(y, leaves: dict, dy):
    import torch

    return dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), dy)))


def run_adapter_block(s: dict, dtype, device) -> list:
    import torch

    import fastbridge
    from fastbridge import reference as R
    from fastbridge.ops import adapter_block

    g = torch.Generator().manual_seed(0)
    d, r, lead = s["d"], s["r"], tuple(s["lead"])
    base = dict(x=_rnd(g, *lead, d, shift=0.3), w_down=_rnd(g, r, d, scale=d ** -0.5), b_down=_rnd(g, r, scale=0.1),
                w_up=_rnd(g, d, r, scale=r ** -0.5), b_up=_rnd(g, d, scale=0.1))
    if s.get("ln"):
        base["ln_weight"] = _rnd(g, d, scale=0.2, shift=1.0)
        if s.get("ln_bias"):
            base["ln_bias"] = _rnd(g, d, scale=0.2)
    if s.get("gate"):
        base["gate"] = _rnd(g, 1, scale=0.5)
    if s.get("residual"):
        base["residual"] = _rnd(g, *lead, d)
    if s.get("tensor_scale"):
        base["scale"] = _rnd(g, scale=0.5, shift=1.0).reshape(())
    names = list(base)
    dy = _rnd(g, *lead, d)
    x_dt = {n: t.to(dtype) for n, t in base.items()}  # the rounded inputs both sides see

    def call(t):
        kw = {k: t[k] for k in names if k not in ("x", "w_down", "b_down", "w_up", "b_up")}
        return adapter_block(t["x"], t["w_down"], t["b_down"], t["w_up"], t["b_up"], activation=s["act"], **kw)

    leaves = {n: x_dt[n].to(device).requires_grad_(True) for n in names}
    with fastbridge.use_backend("kernel"):
        y = call(leaves)
    gk = _grads(y, leaves, dy.to(dtype).to(device))
    leaves64 = {n: x_dt[n].double().requires_grad_(True) for n in names}
    y64 = R.adapter_block(leaves64["x"], leaves64["w_down"], leaves64["b_down"], leaves64["w_up"], leaves64["b_up"],
                          activation=s["act"], **{k: leaves64[k] for k in names
                                                  if k not in ("x", "w_down", "b_down", "w_up", "b_up")})
    g64 = _grads(y64, leaves64, dy.to(dtype).double())
    return [("out", y, y64)] + [(f"d{n}", gk[n], g64[n]) for n in names]


def run_gated_attention(s: dict, dtype, device) -> list:
    import torch

    import fastbridge
    from fastbridge import reference as R
    from fastbridge.ops import gated_attention

    os.environ["FASTBRIDGE_GA_DQ"] = s.get("dq", "separate")
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, Lq, Lk, P, D = (s[k] for k in ("B", "H", "Hkv", "Lq", "Lk", "P", "D"))
    Bp = B if s.get("per_sample") else 1
    base = dict(q=_rnd(g, B, H, Lq, D), k=_rnd(g, B, Hkv, Lk, D), v=_rnd(g, B, Hkv, Lk, D),
                prefix_k=_rnd(g, Bp, Hkv, P, D), prefix_v=_rnd(g, Bp, Hkv, P, D), gate=_rnd(g, H, scale=0.7))
    kpm = None
    if s.get("kpm"):
        kpm = torch.rand(B, Lk, generator=g) > 0.3
        if s["kpm"] != "partial":
            kpm[0, :] = False  # a sample with every key padded: the main branch gives 0, not NaN
    kw = dict(causal=s.get("causal", True), gate_fn=s.get("gate_fn", "tanh"))
    if s.get("expect_split"):
        from fastbridge.kernels.gated_attention import decode_splits, device_arch, fwd_config

        dev = torch.device(device)  # the launcher's own choice (kernels/gated_attention.py, forward launcher)
        bm, bn, _, _ = fwd_config(D, Lq, device_arch(dev), torch.empty((), dtype=dtype).element_size())
        splits = decode_splits(B * H, Lq, Lk, bm, bn, dev)
        if splits <= 1:
            raise AssertionError(f"case meant for the split-K decode path takes {splits} split(s)")
    dy = _rnd(g, B, H, Lq, D)
    x_dt = {n: t.to(dtype) for n, t in base.items()}
    leaves = {n: x_dt[n].to(device).requires_grad_(True) for n in base}
    with fastbridge.use_backend("kernel"):
        y = gated_attention(*leaves.values(), key_padding_mask=None if kpm is None else kpm.to(device), **kw)
    gk = _grads(y, leaves, dy.to(dtype).to(device))
    leaves64 = {n: x_dt[n].double().requires_grad_(True) for n in base}
    y64 = R.gated_attention(*leaves64.values(), key_padding_mask=kpm, **kw)
    g64 = _grads(y64, leaves64, dy.to(dtype).double())
    return [("out", y, y64)] + [(f"d{n}", gk[n], g64[n]) for n in base]


def run_qformer_cross_attention(s: dict, dtype, device) -> list:
    import torch

    import fastbridge
    from fastbridge import reference as R
    from fastbridge.ops import qformer_cross_attention
    from fastbridge.ops.qformer_cross_attention import dropout_keep_mask, ensure_loaded, philox_rng

    ensure_loaded()  # waits for the build stage (torch's build lock) or loads the cached library
    g = torch.Generator().manual_seed(2)
    B, qB, H, Lq, Lk, D = (s[k] for k in ("B", "qB", "H", "Lq", "Lk", "D"))
    base = dict(q=_rnd(g, qB, H, Lq, D, scale=1.5), k=_rnd(g, B, H, Lk, D, scale=1.5),
                v=_rnd(g, B, H, Lk, D, scale=1.5))
    mask = None
    if s.get("mask") == "bool":
        mask = torch.rand(B, Lk, generator=g) > 0.3
        mask[0] = False  # a sample that sees no key: output 0
        mask[-1, 0] = True
    elif s.get("mask") == "additive":
        mask = _rnd(g, B, 1, 1, Lk).to(dtype)
    p = float(s.get("dropout", 0.0))
    dy = _rnd(g, B, H, Lq, D)
    x_dt = {n: t.to(dtype) for n, t in base.items()}
    leaves = {n: x_dt[n].to(device).requires_grad_(True) for n in base}
    gen = torch.Generator().manual_seed(1234)
    with fastbridge.use_backend("kernel"):
        y = qformer_cross_attention(*leaves.values(), attn_mask=None if mask is None else mask.to(device),
                                    dropout_p=p, generator=gen if p else None)
    gk = _grads(y, leaves, dy.to(dtype).to(device))
    leaves64 = {n: x_dt[n].double().requires_grad_(True) for n in base}
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    if p:
        # the kernels' own keep mask (the same Philox draw the op made from `gen`), applied to the float64
        # probabilities: out = (P o keep / (1 - p)) v  -- forward and backward must both use it
        keep = dropout_keep_mask(y, philox_rng(torch.Generator().manual_seed(1234)), Lk, p).cpu()
        frac = keep.float().mean().item()
        if abs(frac - (1 - p)) > 0.05:
            raise AssertionError(f"dropout keeps {frac:.3f} of the probabilities, expected {1 - p:.3f}")
        eye = torch.eye(Lk, dtype=torch.float64).expand(B, H, Lk, Lk)
        probs = R.qformer_cross_attention(leaves64["q"], leaves64["k"], eye, attn_mask=m64)
        y64 = (probs * keep.double() / (1.0 - p)) @ leaves64["v"]
    else:
        y64 = R.qformer_cross_attention(*leaves64.values(), attn_mask=m64)
    g64 = _grads(y64, leaves64, dy.to(dtype).double())
    return [("out", y, y64)] + [(f"d{n}", gk[n], g64[n]) for n in base]


def run_gated_cross_attention(s: dict, dtype, device) -> list:
    import torch

    import fastbridge
    import fastbridge.ops as ops
    from fastbridge import reference as R

    if not hasattr(ops, "gated_cross_attention") or not hasattr(R, "gated_cross_attention"):
        raise _Skip("fastbridge.ops.gated_cross_attention is not in this checkout")
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, Lq, S, seg, D = (s[k] for k in ("B", "H", "Hkv", "Lq", "S", "seg", "D"))
    Lk = S * seg
    base = dict(q=_rnd(g, B, H, Lq, D), k=_rnd(g, B, Hkv, Lk, D), v=_rnd(g, B, Hkv, Lk, D), gate=_rnd(g, H, scale=0.7))
    vis = None
    if s.get("visibility"):
        vis = torch.rand(B, Lq, S, generator=g) > 0.4
        vis[0, 0] = False  # a query that sees no segment: exactly 0
    dy = _rnd(g, B, H, Lq, D)
    x_dt = {n: t.to(dtype) for n, t in base.items()}
    leaves = {n: x_dt[n].to(device).requires_grad_(True) for n in base}
    with fastbridge.use_backend("kernel"):
        y = ops.gated_cross_attention(leaves["q"], leaves["k"], leaves["v"], None if vis is None else vis.to(device),
                                      segment_len=seg, gate=leaves["gate"])
    gk = _grads(y, leaves, dy.to(dtype).to(device))
    leaves64 = {n: x_dt[n].double().requires_grad_(True) for n in base}
    y64 = R.gated_cross_attention(leaves64["q"], leaves64["k"], leaves64["v"], vis, segment_len=seg,
                                  gate=leaves64["gate"])
    g64 = _grads(y64, leaves64, dy.to(dtype).double())
    return [("out", y, y64)] + [(f"d{n}", gk[n], g64[n]) for n in base]


RUNNERS: dict[str, Callable] = {
    "adapter_block": run_adapter_block,
    "gated_attention": run_gated_attention,
    "qformer_cross_attention": run_qformer_cross_attention,
    "gated_cross_attention": run_gated_cross_attention,
}


class _Skip(Exception):
    pass


def _tolerances():
    """The test suite's one tolerance table (tests/conftest.py: TOL relative to max|expected|, plus ATOL)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fastbridge_tests_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TOL, mod.ATOL


def _compare(actual, expected, dtype, tol, atol) -> dict:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or actual.dtype != dtype:
        return {"ok": False,
                "why": f"shape {tuple(a.shape)} / dtype {actual.dtype}, expected {tuple(e.shape)} / {dtype}"}
    if not bool(a.isfinite().all()):
        n = int((~a.isfinite()).sum())
        return {"ok": False, "why": f"{n} non-finite values (an element never written?)"}
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    ok = err <= tol * scale + atol
    return {"ok": ok, "rel": err / max(scale, 1e-30), "max_abs": err, "scale": scale}


def stage_correctness(a) -> int:
    import torch

    dt_name = a.worker
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dt_name]
    device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run and not torch.cuda.is_available():
        print("correctness: no CUDA device", file=sys.stderr)
        return 2
    tol, atol = _tolerances()
    out = Path(a.out) / STAGE_FILES["correctness"]
    cases = [c for c in CORRECTNESS if c.get("dry") or not a.dry_run]
    counts = {"pass": 0, "fail": 0, "error": 0, "skipped": 0}
    # Q-Former cases last: they need the extension, which the build stage compiles meanwhile.
    cases.sort(key=lambda c: c["op"] == "qformer_cross_attention")
    interrupted = False
    for c in cases:
        rec = {"op": c["op"], "case": c["case"], "dtype": dt_name, "device": device, "shape": c["shape"],
               "backend": "kernel"}
        t0 = time.perf_counter()
        if interrupted or time.time() > a.until - 3:
            rec.update(status="skipped", why="stage time budget reached")
        else:
            try:
                pairs = RUNNERS[c["op"]](dict(c["shape"]), dtype, device)
                if device == "cuda":
                    torch.cuda.synchronize()
                checks = {name: _compare(act, exp, dtype, tol[dtype], atol[dtype]) for name, act, exp in pairs}
                bad = [n for n, r in checks.items() if not r["ok"]]
                worst = max((r.get("rel", float("inf")) for r in checks.values()), default=0.0)
                rec.update(status="fail" if bad else "pass", worst=worst, tol=tol[dtype],
                           checks={n: {k: (round(v, 9) if isinstance(v, float) else v) for k, v in r.items()}
                                   for n, r in checks.items()})
                if bad:
                    rec["why"] = "; ".join(f"{n}: {checks[n].get('why') or 'rel %.3e' % checks[n]['rel']}" for n in bad)
            except _Skip as e:
                rec.update(status="skipped", why=str(e))
            except KeyboardInterrupt:
                rec.update(status="skipped", why="interrupted (stage time budget)")
                interrupted = True
            except Exception as e:  # noqa: BLE001 - recorded per case; the other cases still run
                tb = traceback.format_exc().strip().splitlines()
                rec.update(status="error", why=f"{type(e).__name__}: {str(e)[:500]}", where=tb[-3:])
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        status = rec["status"]
        counts["skipped" if status == "skipped" else status] += 1
        with open(out, "a") as f:  # one line per case, appended in one write (the workers share the file)
            f.write(json.dumps(rec) + "\n")
        extra = f"worst rel {rec['worst']:.2e} (tol {rec['tol']:.0e})" if "worst" in rec else rec.get("why", "")
        print(f"{status.upper():7s} {c['op']:24s} {c['case']:30s} {dt_name} {rec['seconds']:6.2f} s  {extra}",
              flush=True)
    line = f"{counts['pass']} pass, {counts['fail']} fail, {counts['error']} error, {counts['skipped']} skipped"
    _stage_report(f"correctness-{dt_name}", dict(counts, line=line))
    print(f"correctness {dt_name}: {line}")
    return 0 if counts["fail"] == 0 and counts["error"] == 0 else 1


# ================================================================================= stage: bench-*
class _StubStats:
    def update(self, value) -> None:  # pytest-benchmark's table is not used here: the JSON is the result
        pass


class _StubBenchmark:
    """Stands for pytest-benchmark's ``benchmark`` fixture, so the benchmark modules' own case runners
    (``_run(fb_bench, case)``) measure through benchmarks/_harness.py outside pytest."""

    disabled = False

    def __init__(self) -> None:
        self.group = None
        self.extra_info: dict = {}

    def _make_stats(self, rounds):
        return _StubStats()


@dataclass
class Item:
    label: str
    run: Callable  # run(fb_bench) -> None; may raise pytest.skip.Exception


def _modes(dry: bool) -> tuple:
    return ("fwd_bwd",) if dry else ("fwd", "fwd_bwd")  # the rehearsal: one mode (it runs the forward too)


def _ga_items(dry: bool, providers=None, compile_only=False) -> list:
    import test_bench_gated_attention as GA

    if dry:
        dev, dt, (b, h, hkv, lq, lk, d, p) = "cpu", "fp32", (2, 4, 4, 64, 64, 32, 10)
        provs = providers or ("fastbridge-reference", "eager", "sdpa", "sdpa_noprompt")
    else:  # LLaMA-7B attention layer: H = 32, D = 128, P = 10, L = 2048, B = 16k tokens / L = 8
        dev, dt, (b, h, hkv, lq, lk, d, p) = "cuda", "bf16", (8, 32, 32, 2048, 2048, 128, 10)
        provs = providers or ("fastbridge", "fastbridge-atomicdq", "sdpa", "sdpa_noprompt", "eager")
    items = []
    for prov in provs:
        for mode in _modes(dry):
            if prov == "fastbridge-atomicdq" and mode == "fwd":
                continue  # its forward is fastbridge's
            c = GA.Case(dev, dt, b, h, hkv, lq, lk, d, p, prov, mode)
            items.append(Item(f"gated_attention {c.id}", lambda fb, c=c: GA._run(fb, c)))
    if not compile_only:  # decode: one query against a 4k cache, split-K on and off
        dec = (2, 4, 4, 1, 256, 32, 10) if dry else (8, 32, 32, 1, 4096, 128, 10)
        dprovs = ("fastbridge-reference", "sdpa") if dry else ("fastbridge", "fastbridge-nosplit", "sdpa", "eager")
        for prov in dprovs:
            c = GA.Case(dev, dt, *dec, prov, "fwd")
            items.append(Item(f"gated_attention {c.id}", lambda fb, c=c: GA._run(fb, c)))
    return items


def _adapter_items(dry: bool, providers=None, cfgs=("blip", "pfeiffer-ln")) -> list:
    import test_bench_adapter_block as AD

    if dry:
        dev, dt, d, r, n = "cpu", "fp32", 64, 8, 96
        provs = providers or ("fastbridge-reference", "eager")
    else:  # d = 4096 (LLaMA-7B width), r = 64, 16k tokens
        dev, dt, d, r, n = "cuda", "bf16", 4096, 64, 16384
        provs = providers or ("fastbridge", "eager")
    items = []
    for cfg in cfgs:
        for prov in provs:
            for mode in _modes(dry):
                c = AD.Case(dev, dt, cfg, d, r, n, prov, mode)
                items.append(Item(f"adapter_block {c.id}", lambda fb, c=c: AD._run(fb, c)))
    return items


def _qformer_items(dry: bool, providers=None) -> list:
    import test_bench_qformer_cross_attention as QF

    if dry:
        dev, dt, (B, Lq, Lk) = "cpu", "fp32", (2, 32, 33)
    else:  # BLIP-2 Q-Former cross-attention: B = 64, 32 queries, 257 image tokens, H = 12, D = 64, dropout 0.1
        dev, dt, (B, Lq, Lk) = "cuda", "bf16", (64, 32, 257)
    provs = providers or ("fastbridge", "sdpa", "eager")
    items = []
    for prov in provs:
        for mode in _modes(dry):
            c = QF.Case(dev, dt, B, Lq, Lk, QF.DROPOUT, prov, mode)
            items.append(Item(f"qformer_cross_attention {c.id}", lambda fb, c=c: QF._run_op(fb, c)))
    return items


def _ceiling_items(dry: bool) -> list:
    import test_bench_ceilings as CE

    if dry:
        def cuda_only(fb):
            import pytest

            pytest.skip("the ceilings are CUDA-only (copy bandwidth, cuBLAS matmul)")
        return [Item("ceilings", cuda_only)]
    return [Item("ceiling_copy 1 GiB", lambda fb: CE.test_ceiling_copy(fb, CE.COPY_BYTES[0])),
            Item("ceiling_matmul bf16 8192", lambda fb: CE.test_ceiling_matmul(fb, CE.MATMUL_N[0], "bf16")),
            Item("ceiling_matmul tf32 8192", lambda fb: CE.test_ceiling_matmul(fb, CE.MATMUL_N[0], "tf32"))]


def _compile_items(dry: bool) -> list:
    if dry:  # CPU inductor compiles take minutes on 2 cores: the compile providers are not rehearsed
        def not_rehearsed(fb):
            import pytest

            pytest.skip("dry run: torch.compile providers are not rehearsed on CPU")
        return [Item("compile providers", not_rehearsed)]
    return (_ga_items(False, ("compile",), compile_only=True) + _adapter_items(False, ("compile",), cfgs=("blip",))
            + _qformer_items(False, ("compile",)))


# ------------------------------------------------------------------------------------- e2e (call 2)
LLAMA_7B_SLICE = dict(layers=4, d=4096, h=32, hkv=32, f=11008, v=32000, p=10, b=8, l=2048)
# Llama-3.2-3B with PEFT's method-comparison settings (MetaMathQA: adaption prompt adapter_len=100 on all 28
# layers; LoRA r=32, alpha=64 on q_proj / v_proj; batch 4, max_seq_length 768, bf16).
LLAMA32_3B = dict(layers=28, d=3072, h=24, hkv=8, f=8192, v=128256, p=100, b=4, l=768)
LLAMA_TINY = dict(layers=2, d=64, h=4, hkv=2, f=172, v=256, p=100, b=2, l=64)
LORA = dict(r=32, lora_alpha=64, lora_dropout=0.0)


def _lora_step(fb, c) -> None:
    """PEFT LoRA r=32 on the same base model and batch as the adaption-prompt providers (the comparison of
    PEFT's method benchmark), measured like them (test_bench_llama_adapter_e2e._run)."""
    import gc

    import torch
    import test_bench_llama_adapter_e2e as E
    from _harness import DTYPES
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    E._drop_cache()
    s = c.step
    cfg = LlamaConfig(hidden_size=s.d, num_attention_heads=s.h, num_key_value_heads=s.hkv, intermediate_size=s.f,
                      num_hidden_layers=s.layers, vocab_size=s.v, max_position_embeddings=max(4096, s.l),
                      rms_norm_eps=1e-5, tie_word_embeddings=False, attention_dropout=0.0, use_cache=False,
                      attn_implementation=c.attn)  # the configuration of E.build_peft_llama
    torch.manual_seed(0)
    with torch.device(c.device):
        model = LlamaForCausalLM(cfg)
    model.to(DTYPES[c.dtype])
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)).train()
    inputs = E.step_inputs(c, c.device)
    if c.device == "cuda":
        fb.rep_ms = max(fb.rep_ms, E.E2E_MIN_REP_MS)
    rec = fb.run(op=c.op, provider=c.provider, mode=c.mode, dtype=c.dtype, shape=c.shape,
                 fn=lambda: model(**inputs).loss, device=c.device)
    if rec is not None:
        rec.extra["tokens_per_s"] = round(s.b * s.l / (rec.ms["p50"] / 1e3), 1)
        rec.extra["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    gc.collect()
    if c.device == "cuda":
        torch.cuda.empty_cache()


def _e2e_items(dry: bool) -> list:
    import floors as F
    import test_bench_llama_adapter_e2e as E

    if dry:
        shapes, dev, dt, provs = [LLAMA_TINY], "cpu", "fp32", ("peft", "fastbridge-reference", "peft-lora-r32")
    else:
        shapes, dev, dt, provs = [LLAMA_7B_SLICE, LLAMA32_3B], "cuda", "bf16", ("peft", "fastbridge", "peft-lora-r32")
    items = []
    for sh in shapes:
        for prov in provs:
            c = E.Case(dev, dt, "sdpa", F.LlamaStepShape(**sh), prov, "fwd_bwd")
            run = (lambda fb, c=c: _lora_step(fb, c)) if prov == "peft-lora-r32" else (lambda fb, c=c: E._run(fb, c))
            items.append(Item(f"llama_adapter_e2e {c.id}", run))
    return items


def _qformer_step_items(dry: bool) -> list:
    import test_bench_qformer_cross_attention as QF

    if dry:  # the patched path only: it exercises the whole plumbing (build, patch, forward, backward)
        cases = [QF.StepCase("cpu", "fp32", 1, 17, "fastbridge")]
    else:  # BLIP-2's Q-Former (12 layers, cross-attention every 2nd), B = 64, 257 image tokens
        cases = [QF.StepCase("cuda", dt, 64, 257, p) for dt in ("bf16", "fp32") for p in QF.STEP_PROVIDERS]
    return [Item(f"qformer_train_step {c.id}", lambda fb, c=c: QF._run_step(fb, c)) for c in cases]


BENCH_GROUPS: dict[str, Callable[[bool], list]] = {
    "ceilings": _ceiling_items,
    "bench-ga": _ga_items,
    "bench-adapter": _adapter_items,
    "bench-qformer": _qformer_items,
    "bench-compile": _compile_items,
    "e2e": _e2e_items,
    "qformer-step": _qformer_step_items,
}


DRY_SMOKE_ONLY = ("qformer-step",)


def stage_bench(a) -> int:
    """Run one group's items through the benchmark modules' runners; after every item the new records are
    merged into $OUT/<device>.json (so a cut-off keeps everything measured before it)."""
    _bench_imports()
    import warnings

    import pytest
    import _harness as H

    warnings.simplefilter("ignore")  # the harness / HF warnings would flood the log; failures are reported
    if H.git_sha()[0] is None:  # the device's copy has no .git: the results carry the stamp's sha instead
        git = git_state()
        if git["sha"]:
            H.git_sha = lambda repo=None: (git["sha"], git["dirty"])
    items = BENCH_GROUPS[a.name](a.dry_run)
    warm, rep = (1.0, 2.0) if a.dry_run else (H.DEFAULT_WARMUP_MS, H.DEFAULT_REP_MS)
    counts = {"ok": 0, "skipped": 0, "error": 0}
    notes = []
    for it in items:
        if time.time() > a.until - 2:
            counts["skipped"] += 1
            notes.append(f"{it.label}: not run (stage time budget)")
            print(f"SKIP    {it.label}: stage time budget reached", flush=True)
            continue
        collector = H.ResultsCollector()
        stub = _StubBenchmark()
        # the rehearsal of the whole-model steps: one forward + backward each (the harness's smoke-call path),
        # not a measurement -- a CPU measurement of a 12-layer Q-Former would take minutes
        stub.disabled = a.dry_run and a.name in DRY_SMOKE_ONLY
        fb = H.Bencher(stub, collector, warmup_ms=warm, rep_ms=rep)
        t0 = time.perf_counter()
        try:
            it.run(fb)
            status, why = "ok", ""
        except pytest.skip.Exception as e:
            status, why = "skipped", str(e.msg if hasattr(e, "msg") else e)
        except KeyboardInterrupt:
            print(f"CUT     {it.label}: interrupted (stage time budget)", flush=True)
            notes.append(f"{it.label}: interrupted")
            break
        except Exception as e:  # noqa: BLE001 - one failing provider must not lose the others
            status, why = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc(limit=4)
        secs = time.perf_counter() - t0
        counts[status] += 1
        written = collector.write(a.out) if len(collector) else []
        recs = [r for _, (_, rs) in collector._by_device.items() for r in rs]
        for r in recs:
            tps = r.extra.get("tokens_per_s")
            print(f"OK      {r.op} {r.provider:20s} {r.mode:7s} {r.dtype} {H.shape_label(r.shape)}: "
                  f"p50 {r.ms['p50']:.4g} ms, "
                  f"peak {r.peak_mb if r.peak_mb is None else round(r.peak_mb)} MiB"
                  f"{'' if r.tflops is None else f', {r.tflops:.1f} TFLOP/s'}"
                  f"{'' if r.gbps is None else f', {r.gbps:.0f} GB/s'}{'' if tps is None else f', {tps:.0f} tok/s'}"
                  f"  [{secs:.1f} s]", flush=True)
        if status != "ok":
            notes.append(f"{it.label}: {status}: {why}")
            print(f"{status.upper():7s} {it.label}: {why}  [{secs:.1f} s]", flush=True)
        elif not recs:
            print(f"OK      {it.label}: one smoke call, nothing recorded  [{secs:.1f} s]", flush=True)
    line = f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} error"
    _stage_report(a.name, dict(counts, line=line, notes=notes))
    print(f"{a.name}: {line}")
    return 0 if counts["error"] == 0 else 1


# ================================================================================== stage: sweep
SWEEP_KERNELS = ("fwd", "dq", "dkdv", "pre", "dkdv_atomic", "dq_atomic")


def stage_sweep(a) -> int:
    """benchmarks/sweep_tiles.py run, one kernel per invocation (each writes its own results when it ends),
    merged into $OUT/sweep_results.json after each, so a cut-off keeps the kernels already swept."""
    scratch = Path(os.environ.get("FASTBRIDGE_FC_SCRATCH") or tempfile.mkdtemp())
    out = Path(a.out) / STAGE_FILES["sweep"]
    doc = {"runs": [], "note": "benchmarks/sweep_tiles.py run, one kernel at a time (bf16, causal, MHA, D=128)"}
    kernels = SWEEP_KERNELS[:1] if a.dry_run else SWEEP_KERNELS
    rcs = []
    for k in kernels:
        left = a.until - time.time() - 3
        if left < 20:
            print(f"sweep: {k} not run (stage time budget)")
            doc["runs"].append({"kernel": k, "status": "not run (time budget)"})
            break
        kdir = scratch / f"sweep-{k}"
        cmd = [sys.executable, str(HERE / "sweep_tiles.py"), "run", "--kernels", k, "--d", "128", "--shapes", "4096x4",
               "--max-per-kernel", "6", "--out", str(kdir)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        try:
            proc = subprocess.run(cmd, timeout=left, cwd=str(REPO))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        rcs.append(rc)
        res = kdir / "sweep_results.json"
        run = {"kernel": k, "rc": rc}
        if res.is_file():
            run["results"] = json.loads(res.read_text())
        elif a.dry_run and rc == 2:
            run["status"] = "no GPU: sweep_tiles.py run exits 2 (expected in the rehearsal)"
        doc["runs"].append(run)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(out)
    ok = all(rc == 0 for rc in rcs) or (a.dry_run and all(rc == 2 for rc in rcs))
    _stage_report("sweep", {"line": f"kernels {', '.join(r['kernel'] for r in doc['runs'])}; rc {rcs}"})
    return 0 if ok else 1


# ==================================================================================== entry points
STAGE_FUNCS = {"info": stage_info, "build": stage_build, "correctness": stage_correctness, "sweep": stage_sweep}


def _run_stage(a) -> int:
    """A child: one stage. SIGINT (the parent's cut-off) raises KeyboardInterrupt; the stage keeps what it wrote."""
    fn = STAGE_FUNCS.get(a.name) or (stage_bench if a.name in BENCH_GROUPS else None)
    if fn is None:
        print(f"first_contact: unknown stage {a.name!r}", file=sys.stderr)
        return 2
    try:
        return fn(a)
    except KeyboardInterrupt:
        print(f"first_contact: stage {a.name} interrupted", file=sys.stderr)
        return 130


def cmd_run(a) -> int:
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    if only:
        unknown = [s for s in only if s not in {st.name for st in PLANS[a.stages]}]
        if unknown:
            print(f"first_contact run: --only {','.join(unknown)}: not stages of {a.stages!r} "
                  f"({', '.join(s.name for s in PLANS[a.stages])})", file=sys.stderr)
            return 2
    out = a.out or os.environ.get("OUT")
    if a.dry_run and not out:
        out = tempfile.mkdtemp(prefix="fastbridge-fc-dry-")
    if not out:
        print("first_contact run: give --out DIR (on the device machine: --out \"$OUT\")", file=sys.stderr)
        return 2
    out = Path(out).resolve()
    deadline = a.deadline or DEFAULT_DEADLINE[a.stages] * (DRY_RUN_SLACK if a.dry_run else 1.0)
    runner = Runner(a.stages, out, a.dry_run, deadline, only)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return runner.run()


def cmd_stamp(a) -> int:
    """Record this checkout's git state for the device call (whose copy of the tree has no .git)."""
    git = git_state()
    if git["source"] != "git":
        print("first_contact stamp: not a git checkout here", file=sys.stderr)
        return 2
    git.pop("source")
    git["stamped"] = _utc()
    STAMP.write_text(json.dumps(git, indent=1) + "\n")
    print(f"first_contact stamp: {STAMP} ({git['sha'][:12]}{', dirty' if git['dirty'] else ''}); "
          f"carry [\"benchmarks/{STAMP.name}\"]")
    return 0


def cmd_check(a) -> int:
    res = check_files(Path(a.dir))
    print(json.dumps(res, indent=1))
    return 1 if res["problems"] else 0


def cmd_unpack(a) -> int:
    """Merge a call's results into benchmarks/results/<device>.json and keep its logs next to them."""
    _bench_imports()
    import _harness as H

    src, results = Path(a.files_at), Path(a.results)
    res = check_files(src)
    for p in res["problems"]:
        print(f"unpack: warning: {p}", file=sys.stderr)
    summaries = sorted(src.glob("*_summary.json"))
    stamp, plan = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "run"
    if summaries:
        doc = json.loads(summaries[0].read_text())
        plan = doc.get("plan", plan)
        stamp = re.sub(r"[^0-9TZ]", "", doc.get("started", stamp).replace("+00:00", "Z"))
        if doc.get("dry_run"):
            print("unpack: this is a dry run's output (CPU plumbing): not merged into the results", file=sys.stderr)
            return 2
    logs = results / "runs" / f"{stamp}-{plan}"
    logs.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".json" and not f.name.endswith("_summary.json") and f.name != STAGE_FILES["sweep"]:
            new = json.loads(f.read_text())
            H.validate_results(new, f.name)
            dest = results / f.name
            old = json.loads(dest.read_text())["records"] if dest.is_file() else []
            merged = dict(new, records=H.merge_records(old, new["records"]))
            H.validate_results(merged, str(dest))
            dest.write_text(json.dumps(merged, indent=1) + "\n")
            print(f"unpack: {len(new['records'])} records merged into {dest} ({len(merged['records'])} in all)")
        else:
            shutil.copy2(f, logs / f.name)
    print(f"unpack: logs and summaries in {logs}\nnext: python benchmarks/plot.py {results}/*.json --out "
          f"{results}/plots && python benchmarks/readme_perf.py && git add {results} README.md")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="first_contact.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a plan's stages (the device command)")
    r.add_argument("--stages", choices=sorted(PLANS), default="first", help="first (call 1) or second (call 2)")
    r.add_argument("--only", default=None, help="comma-separated subset of the plan's stages")
    r.add_argument("--out", default=None, help="output folder (default $OUT; a temporary folder for --dry-run)")
    r.add_argument("--dry-run", action="store_true", help="CPU rehearsal: interpreter, tiny shapes, no claims")
    r.add_argument("--deadline", type=float, default=None, help="seconds for the whole plan (default: first "
                   f"{DEFAULT_DEADLINE['first']:.0f}, second {DEFAULT_DEADLINE['second']:.0f})")
    sub.add_parser("stamp", help=f"write benchmarks/{STAMP.name} (the git state) for the device call to carry")
    c = sub.add_parser("check", help="check a folder against the device tool's limits and the JSON schemas")
    c.add_argument("dir")
    u = sub.add_parser("unpack", help="merge a call's files into benchmarks/results (+ runs/<date>-<plan>/ logs)")
    u.add_argument("files_at")
    u.add_argument("--results", default=str(HERE / "results"))
    s = sub.add_parser("_stage", help=argparse.SUPPRESS)
    s.add_argument("name")
    s.add_argument("--worker", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--until", type=float, required=True)
    s.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "_stage":
        a.out = Path(a.out)
        return _run_stage(a)
    return {"run": cmd_run, "check": cmd_check, "unpack": cmd_unpack, "stamp": cmd_stamp}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
