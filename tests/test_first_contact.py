"""The first-GPU-contact command (benchmarks/first_contact.py), rehearsed on CPU before any device minute.

Both device calls run here with --dry-run (every stage's plumbing: the Triton interpreter, tiny shapes,
fp32, the benchmark modules' runners, the sweep's no-GPU exit), concurrently, and the files each would
bring back are checked against the device tool's limits (<= 8 files, names of letters / digits / . _ -,
<= 2 folders down) and their JSON schemas. The pieces that judge results (the comparison, the file
check, unpacking into benchmarks/results) are tested on inputs built to fail.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "first_contact.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import first_contact as FC  # noqa: E402


def _env():
    env = dict(os.environ)
    for k in ("TRITON_INTERPRET", "FASTBRIDGE_POISON", "FASTBRIDGE_BACKEND", "OUT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Both plans' dry runs, started together (2 cores: about the time of one)."""
    procs = {}
    t0 = time.monotonic()
    for plan in ("first", "second"):
        out = tmp_path_factory.mktemp(f"out-{plan}")
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "run", "--stages", plan, "--dry-run", "--out", str(out)],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs[plan] = (proc, out)
    res = {}
    for plan, (proc, out) in procs.items():
        log, _ = proc.communicate(timeout=900)
        res[plan] = dict(rc=proc.returncode, out=out, log=log)
    res["seconds"] = time.monotonic() - t0
    return res


def _summary(out: Path, plan: str) -> dict:
    return json.loads((out / f"{plan}_summary.json").read_text())


def _results(out: Path) -> list[dict]:
    docs = [json.loads(p.read_text()) for p in out.glob("*.json")
            if not p.name.endswith("_summary.json") and p.name != "sweep_results.json"]
    return [r for d in docs for r in d["records"]]


@pytest.mark.parametrize("plan", ["first", "second"])
def test_dry_run_every_stage_ok_and_files_fit_the_device_limits(dry_runs, plan):
    r = dry_runs[plan]
    assert r["rc"] == 0, r["log"][-4000:]
    s = _summary(r["out"], plan)
    assert s["dry_run"] is True and s["plan"] == plan
    names = [st["name"] for st in s["stages"]]
    assert names == [st.name for st in FC.PLANS[plan]]
    bad = {st["name"]: (st["status"], st.get("rc")) for st in s["stages"] if st["status"] != "ok"}
    assert not bad, (bad, r["log"][-4000:])
    assert s["files"]["problems"] == [], s["files"]
    files = sorted(p.name for p in r["out"].rglob("*") if p.is_file())
    assert 3 <= len(files) <= FC.MAX_FILES, files
    assert f"{plan}.log" in files and f"{plan}_summary.json" in files and "info.txt" in files
    assert FC.check_files(r["out"])["problems"] == []


def test_dry_run_first_correctness_and_benchmarks(dry_runs):
    out = dry_runs["first"]["out"]
    lines = [json.loads(ln) for ln in (out / "correctness.jsonl").read_text().splitlines()]
    dry_cases = [c for c in FC.CORRECTNESS if c.get("dry")]
    assert len(lines) == len(dry_cases)
    by_op = {}
    for ln in lines:
        by_op.setdefault(ln["op"], set()).add(ln["status"])
        if ln["status"] == "pass":
            assert ln["worst"] <= ln["tol"] and set(ln["checks"]) >= {"out"}
    for op in ("adapter_block", "gated_attention", "qformer_cross_attention"):
        assert by_op.get(op) == {"pass"}, (op, by_op)
    ops = {(r["op"], r["provider"]) for r in _results(out)}
    for want in [("gated_attention", "eager"), ("gated_attention", "sdpa"), ("gated_attention", "fastbridge-reference"),
                 ("gated_attention_decode", "sdpa"), ("adapter_block", "eager"),
                 ("qformer_cross_attention", "fastbridge"), ("qformer_cross_attention", "sdpa")]:
        assert want in ops, (want, sorted(ops))
    s = _summary(out, "first")
    assert s["git_sha"] and s["started"]


def test_dry_run_second_e2e_and_sweep(dry_runs):
    out = dry_runs["second"]["out"]
    provs = {r["provider"] for r in _results(out) if r["op"] == "llama_adapter_e2e_cpu_smoke"}
    assert provs == {"peft", "fastbridge-reference", "peft-lora-r32"}
    assert all(r.get("tokens_per_s", 0) > 0 for r in _results(out))
    sweep = json.loads((out / "sweep_results.json").read_text())
    assert sweep["runs"] and sweep["runs"][0]["rc"] == 2  # no GPU here: sweep_tiles.py run exits 2


# ------------------------------------------------------------------------------ the pieces that judge
def test_every_public_op_has_a_correctness_runner_and_a_rehearsed_case():
    import fastbridge.ops as ops

    cased = {c["op"] for c in FC.CORRECTNESS}
    assert set(ops.__all__) <= cased, f"ops without a first-contact correctness case: {set(ops.__all__) - cased}"
    assert cased <= set(FC.RUNNERS)
    for op in cased:
        assert any(c.get("dry") for c in FC.CORRECTNESS if c["op"] == op), f"{op}: no case runs in the rehearsal"
    ids = [(c["op"], c["case"]) for c in FC.CORRECTNESS]
    assert len(ids) == len(set(ids))


def test_compare_rejects_unwritten_wrong_and_mistyped_outputs():
    e = torch.randn(5, 7, dtype=torch.float64)
    assert FC._compare(e.float(), e, torch.float32, 1e-4, 1e-5)["ok"]
    nan = e.float().clone()
    nan[2, 3] = float("nan")
    r = FC._compare(nan, e, torch.float32, 1e-4, 1e-5)
    assert not r["ok"] and "non-finite" in r["why"]
    off = e.float().clone()
    off[0, 0] += 1e-2 * e.abs().max().item()
    assert not FC._compare(off, e, torch.float32, 1e-4, 1e-5)["ok"]
    assert not FC._compare(e.half(), e, torch.float32, 1e-4, 1e-5)["ok"]  # wrong dtype
    assert not FC._compare(e.float()[:4], e, torch.float32, 1e-4, 1e-5)["ok"]  # wrong shape


def test_correctness_stage_reports_a_wrong_kernel(tmp_path, monkeypatch):
    def wrong(shape, dtype, device):
        ref = torch.randn(4, 4, dtype=torch.float64)
        return [("out", (ref * 1.01).to(dtype), ref)]

    def broken(shape, dtype, device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(FC, "CORRECTNESS", [dict(op="wrong", case="a", dry=True, shape={}),
                                            dict(op="broken", case="b", dry=True, shape={})])
    monkeypatch.setitem(FC.RUNNERS, "wrong", wrong)
    monkeypatch.setitem(FC.RUNNERS, "broken", broken)
    monkeypatch.delenv("FASTBRIDGE_FC_SCRATCH", raising=False)
    a = argparse.Namespace(worker="fp32", dry_run=True, out=tmp_path, until=time.time() + 60)
    assert FC.stage_correctness(a) == 1
    lines = [json.loads(ln) for ln in (tmp_path / "correctness.jsonl").read_text().splitlines()]
    assert [ln["status"] for ln in lines] == ["fail", "error"]
    assert "out: rel" in lines[0]["why"] and "illegal memory access" in lines[1]["why"]


def _results_doc(provider="fastbridge", p50=1.0):
    import _harness as H

    rec = H.Record(op="adapter_block", provider=provider, mode="fwd", dtype="bf16", shape={"d": 4096},
                   ms={"p20": p50 * 0.9, "p50": p50, "p80": p50 * 1.1}, peak_mb=10.0)
    doc = dict(device="NVIDIA H100 80GB HBM3", torch="2.11.0+cu130", triton="3.6.0", cuda="13.0", fastbridge="abc",
               date="2026-12-05T00:00:00+00:00", host={"sm": "90"}, records=[rec.to_json()])
    H.validate_results(doc)
    return doc


def test_check_files_enforces_the_device_limits(tmp_path):
    (tmp_path / "ok.txt").write_text("x")
    assert FC.check_files(tmp_path)["problems"] == []
    (tmp_path / "bad name.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "nvidia-h100.json").write_text(json.dumps({"device": "x", "records": []}))  # lacks fields
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text("x")
    probs = "\n".join(FC.check_files(tmp_path)["problems"])
    assert "bad name.txt" in probs and "folders down" in probs and "missing top-level field" in probs
    assert "10 files > 8" in probs


def test_unpack_merges_into_results_and_keeps_the_logs(tmp_path):
    src, results = tmp_path / "files", tmp_path / "results"
    src.mkdir()
    results.mkdir()
    (results / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(_results_doc("eager", 2.0)))
    (src / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(_results_doc("fastbridge", 1.0)))
    summary = dict(plan="first", dry_run=False, started="2026-12-05T10:11:12+00:00", git_sha="abc", deadline_s=450,
                   stages=[])
    (src / "first_summary.json").write_text(json.dumps(summary))
    (src / "first.log").write_text("log\n")
    assert FC.main(["unpack", str(src), "--results", str(results)]) == 0
    merged = json.loads((results / "nvidia-h100-80gb-hbm3.json").read_text())
    assert {r["provider"] for r in merged["records"]} == {"eager", "fastbridge"}
    run_dir = results / "runs" / "20261205T101112Z-first"
    assert (run_dir / "first.log").read_text() == "log\n" and (run_dir / "first_summary.json").is_file()
    (src / "first_summary.json").write_text(json.dumps(dict(summary, dry_run=True)))
    assert FC.main(["unpack", str(src), "--results", str(results)]) == 2  # a rehearsal is never merged


def test_fastbridge_bench_first_contact_flag_reaches_the_script():
    r = subprocess.run([sys.executable, "-m", "fastbridge", "bench", "--first-contact", "--stages", "second", "--only",
                        "nosuch"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert "first_contact.py run --stages second --only nosuch" in r.stdout
    assert r.returncode == 2 and "--only nosuch: not stages of 'second'" in r.stderr, r.stderr


def test_git_state_falls_back_to_the_stamp_without_git(tmp_path, monkeypatch):
    """The device's copy of the tree has no .git: the sha comes from the carried stamp, never invented."""
    here = FC.git_state()
    assert here["source"] == "git" and len(here["sha"]) == 40
    monkeypatch.setattr(FC, "_git", lambda *a: None)
    monkeypatch.setattr(FC, "STAMP", tmp_path / "device_stamp.json")
    assert FC.git_state()["sha"] is None
    (tmp_path / "device_stamp.json").write_text(json.dumps({"sha": "f" * 40, "dirty": False, "diff_sha256": None}))
    st = FC.git_state()
    assert st["sha"] == "f" * 40 and st["source"].startswith("stamp")
