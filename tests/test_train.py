"""The end-to-end pipeline (fastbridge.train): models per bridge, what each trains, eager vs fastbridge
agreement, label alignment, decoding, checkpoint / resume, and the test-sized `fastbridge demo` itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("pycocoevalcap")

import fastbridge  # noqa: E402
from fastbridge.train import loop  # noqa: E402
from fastbridge.train.models import BRIDGES, SIZES, build_model  # noqa: E402

from conftest import assert_close  # noqa: E402

# What each bridge trains (the study's choice); everything else must be frozen.
TRAINED = {
    "qformer": ("model.qformer.", "model.query_tokens", "model.language_projection."),
    "mlp": ("projector.",),
    "adapter": (".adapter.",),
    "llama-adapter": ("adaption_prompt", "adaption_gate", "prompt_generator."),
    "dynamic-prompt": ("adaption_gate", "prompt_generator."),
    # the "test" size has one cross-attention layer, at index 0 of Mllama's layer list
    "flamingo": ("language_model.layers.0.", "multi_modal_projector."),
}


@pytest.fixture(scope="module")
def tokenizer():
    from fastbridge.data import build_tokenizer

    texts = ["a small red circle on the left", "two blue squares", "question: what color is the circle? answer: red",
             "how many shapes are there? 2", "is there a green triangle? yes no"]
    return build_tokenizer(texts)


def _batch(tok, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = SIZES["test"].image_size
    px = torch.randn(B, 3, size, size, generator=g)
    ex = [loop.Example(0, loop.CAPTION_PROMPT, "a small red circle on the left"),
          loop.Example(0, loop.vqa_prompt("what color is the circle?"), "red"),
          loop.Example(0, loop.CAPTION_PROMPT, "two blue squares")][:B]
    ids, mask, labels = loop.encode_batch(tok, ex, "cpu")
    return px, ids, mask, labels


@pytest.mark.parametrize("bridge", BRIDGES)
def test_bridge_trains_only_the_bridge(bridge, tokenizer):
    m = build_model(bridge, tokenizer, size="test", seed=0)
    m.freeze_for_bridge()
    trainable = [n for n, _ in m.trainable_parameters()]
    assert trainable, f"{bridge}: nothing trainable"
    for n in trainable:
        assert any(k in n for k in TRAINED[bridge]), f"{bridge}: {n} should be frozen"
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    assert frozen, f"{bridge}: nothing frozen"
    for n in frozen:
        if bridge == "dynamic-prompt" and "adaption_prompt" in n:
            continue  # replaced by the generated prompt: frozen on purpose
        assert not any(k in n for k in TRAINED[bridge]), f"{bridge}: {n} should be trained"
    px, ids, mask, labels = _batch(tokenizer)
    logits = m(px, ids, mask)
    assert logits.shape == (*ids.shape, len(tokenizer))
    loss = loop.caption_loss(logits, labels)
    loss.backward()
    got = [n for n, p in m.trainable_parameters() if p.grad is not None]
    assert got, f"{bridge}: no gradient reached the bridge"
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("bridge", BRIDGES)
def test_fastbridge_matches_eager(bridge, tokenizer):
    """fastbridge.patch (fused kernels / C++ op) vs fastbridge.unpatch (eager): same logits, same bridge
    gradients, on a model whose gates / adapters are non-zero (a trained-looking bridge)."""
    m = build_model(bridge, tokenizer, size="test", seed=1)
    m.freeze_for_bridge()
    with torch.no_grad():
        for n, p in m.trainable_parameters():
            if "gate" in n or ".adapter.up" in n:
                p.normal_(0, 0.5)
    px, ids, mask, labels = _batch(tokenizer)
    results = {}
    for name, fn in (("eager", fastbridge.unpatch), ("fastbridge", fastbridge.patch)):
        fn(m)
        m.zero_grad(set_to_none=True)
        logits = m(px, ids, mask)
        loop.caption_loss(logits, labels).backward()
        results[name] = (logits.detach(), {n: p.grad.clone() for n, p in m.trainable_parameters()})
    if bridge != "mlp":
        assert m.fastbridge_report.counts, f"{bridge}: fastbridge.patch found nothing to fuse"
    (le, ge), (lf, gf) = results["eager"], results["fastbridge"]
    assert_close(lf, le, torch.float32, f"{bridge} logits")
    for n in ge:
        assert_close(gf[n], ge[n], torch.float32, f"{bridge} d{n}")


def test_labels_line_up_with_logits(tokenizer):
    ex = [loop.Example(0, loop.vqa_prompt("what color is the circle?"), "red"),
          loop.Example(0, loop.CAPTION_PROMPT, "two blue squares")]
    ids, mask, labels = loop.encode_batch(tokenizer, ex, "cpu")
    assert ids[:, 0].eq(tokenizer.bos_token_id).all()
    for i, e in enumerate(ex):
        n = int(mask[i].sum())
        tgt = tokenizer.encode(e.target, add_special_tokens=False) + [tokenizer.eos_token_id]
        sup = labels[i][labels[i] != -100].tolist()
        assert sup == tgt  # only the answer / caption and eos are supervised
        pos = (labels[i] != -100).nonzero().flatten()
        assert (ids[i, pos + 1] == labels[i, pos]).all()  # position p predicts token p + 1
        assert ids[i, n:].eq(tokenizer.pad_token_id).all()


def test_batches_resume_exactly():
    full = list(loop._batches(23, 4, seed=3, start_step=0, steps=13))
    tail = list(loop._batches(23, 4, seed=3, start_step=7, steps=13))
    assert full[7:] == tail
    assert [s for s, _ in full] == list(range(13))


def test_greedy_decode_stops_at_eos(tokenizer):
    class Fixed(torch.nn.Module):
        """Emits 'red' then eos whatever the input: checks batching by prompt length and eos handling."""

        def image_state(self, px):
            return px.shape[0]

        def text_logits(self, state, ids, mask):
            V = len(tokenizer)
            out = torch.zeros(ids.shape[0], ids.shape[1], V)
            red = tokenizer.convert_tokens_to_ids("red")
            nxt = tokenizer.eos_token_id if (ids[0, -1] == red) else red
            out[:, -1, nxt] = 1.0
            return out

    px = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    got = loop.greedy_decode(Fixed(), tokenizer, px, [0, 1, 0], ["", "question: what color is the circle? answer:", ""],
                             max_new_tokens=5, batch_size=2, device=torch.device("cpu"))
    assert got == ["red", "red", "red"]


def _cli(args, cwd, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "fastbridge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_demo_test_sized_end_to_end(tmp_path):
    """The README's main command at test size: data through datasets, scores through pycocoevalcap, plots,
    eager vs fastbridge comparison, only the bridge checkpointed."""
    out = tmp_path / "demo"
    repo = Path(__file__).resolve().parents[1]  # run from the repository root: this checkout's fastbridge
    r = _cli(["demo", "--size", "test", "--bridge", "llama-adapter,qformer", "--compare", "--no-progress",
              "--out", str(out)], repo)
    assert r.returncode == 0, r.stderr[-4000:]
    # it says what it will do before doing it, and says each thing once
    assert r.stdout.startswith("fastbridge demo: 2 bridge(s) (llama-adapter, qformer), size test"), r.stdout[:500]
    assert "Rough total:" in r.stdout.split("\n| bridge")[0]
    assert "caption_metrics: BLEU-1" not in r.stderr and "PTBTokenizer tokenized" not in r.stderr
    assert r.stderr.count("fastbridge.patch:") == 2, r.stderr  # one report per bridge (fastbridge run)
    demo_md = (out / "demo.md").read_text()
    assert "How to read it" in demo_md and "**Device:**" in demo_md and "torch " in demo_md
    summary = json.loads((out / "demo.json").read_text())
    assert [row["bridge"] for row in summary["rows"]] == ["llama-adapter", "qformer"]
    for row in summary["rows"]:
        cap = row["after"]["caption"]
        for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
            assert k in cap and 0.0 <= cap[k] <= 10.0
        assert "accuracy" in row["after"]["vqa"]
    for b, c in summary["comparisons"].items():
        # same seed, same base, same batches: fused and eager training follow the same curve
        assert c["loss_max_abs_diff"] < 1e-3, (b, c)
        assert c["patch"], f"{b}: nothing was fused in the fastbridge run"
    for f in ("loss.png", "demo.md", "llama-adapter/compare.png", "qformer/fastbridge/loss.png",
              "qformer/fastbridge/bridge.safetensors"):
        assert (out / f).exists(), f
    from safetensors.torch import load_file

    saved = load_file(str(out / "qformer" / "fastbridge" / "bridge.safetensors"))
    assert saved and all(any(k in n for k in TRAINED["qformer"]) for n in saved)
    assert "| llama-adapter |" in r.stdout and "→" in r.stdout


def test_flamingo_train_test_sized(tmp_path):
    """`fastbridge train --bridge flamingo --size test --compare`: the LLaMA base warmed up, Mllama's gated
    cross-attention layers (tanh gates from zero) trained eager and fused from the same seed, both scored."""
    out = tmp_path / "flamingo"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's fastbridge
    r = _cli(["train", "--bridge", "flamingo", "--size", "test", "--compare", "--no-progress", "--out", str(out)],
             tmp_path, {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-4000:]
    c = json.loads((out / "compare.json").read_text())["comparison"]
    assert c["patch"] == {"transformers.MllamaCrossAttention": 1}
    assert c["loss_max_abs_diff"] < 1e-3, c
    m = json.loads((out / "fastbridge" / "metrics.json").read_text())
    assert "CIDEr" in m["after"]["caption"] and "accuracy" in m["after"]["vqa"]
    assert m["before"]["caption"] is not None and len(m["losses"]) == 4
    from safetensors.torch import load_file

    saved = load_file(str(out / "fastbridge" / "bridge.safetensors"))
    assert saved and all(any(k in n for k in TRAINED["flamingo"]) for n in saved)
    assert any(n.endswith("cross_attn_attn_gate") for n in saved)


def test_train_resume_matches_uninterrupted(tmp_path):
    data = tmp_path / "data"
    base = dict(bridge="mlp", size="test", n_train=12, n_val=4, batch_size=4, warmup_lm_steps=2, progress=False,
                data_dir=str(data), tasks=("caption",))
    a = loop.run(loop.TrainConfig(out_dir=str(tmp_path / "a"), steps=6, **base), eval_before=False)
    loop.run(loop.TrainConfig(out_dir=str(tmp_path / "b"), steps=6, stop_at=3, **base), eval_before=False)
    b = loop.run(loop.TrainConfig(out_dir=str(tmp_path / "b"), steps=6, resume=True, **base), eval_before=False)
    assert b["resumed_from_step"] == 3
    assert len(b["losses"]) == 6  # the whole run: the first 3 losses come from the checkpoint
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5, abs=1e-6)
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert len(saved["losses"]) == 6 and len(saved["step_times"] if "step_times" in saved else b["losses"]) == 6
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "bridge.safetensors")), load_file(str(tmp_path / "b" / "bridge.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="resume: lr"):
        loop.run(loop.TrainConfig(out_dir=str(tmp_path / "b"), steps=6, resume=True, **{**base, "lr": 1.0}))


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="bridge must be one of"):
        loop.TrainConfig(bridge="lora")
    with pytest.raises(ValueError, match="steps must be"):
        loop.TrainConfig(steps=-1)
    with pytest.raises(ValueError, match="tasks must be"):
        loop.TrainConfig(tasks=("segmentation",))
    with pytest.raises(ValueError, match="size must be"):
        build_model("mlp", None, size="huge")


def test_train_on_coco_karpathy_files(tmp_path):
    """The same pipeline on COCO captions on disk (Karpathy split file): train split to train, val to score."""
    from PIL import Image

    images = []
    for cocoid, split in ((1, "train"), (2, "restval"), (3, "train"), (4, "val"), (5, "val"), (6, "test")):
        name = f"COCO_val2014_{cocoid:012d}.jpg"
        (tmp_path / "coco" / "val2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * cocoid, 30, 200)).save(tmp_path / "coco" / "val2014" / name, format="JPEG")
        images.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": cocoid,
                       "sentences": [{"raw": f"A photo of thing number {cocoid}."}, {"raw": "a plain picture"}]})
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"images": images, "dataset": "coco"}))
    cfg = loop.TrainConfig(bridge="mlp", size="test", out_dir=str(tmp_path / "run"), coco_captions=str(ann),
                           coco_images=str(tmp_path / "coco"), steps=2, batch_size=2, warmup_lm_steps=2,
                           warmup_vision_steps=1, progress=False)
    assert cfg.tasks == ("caption",)  # COCO captions carry no questions
    m = loop.run(cfg)
    assert sorted(m["after"]["caption"]) and "vqa" not in m["after"]
    assert {e["image_id"] for e in m["after"]["examples"]} == {4, 5}  # the val split is what gets scored


@pytest.mark.parametrize("bridge", ["qformer", "mlp", "flamingo"])
def test_train_from_local_pretrained_checkpoint(bridge, tokenizer, tmp_path):
    """--pretrained DIR: a local transformers checkpoint (here a saved random one) replaces the random-init
    base and its warm-up; the bridge trains on top."""
    src = build_model(bridge, tokenizer, size="test", seed=5)
    ckpt = tmp_path / "ckpt"
    if bridge in ("qformer", "flamingo"):
        src.model.save_pretrained(ckpt)
    else:
        src.vision.save_pretrained(ckpt / "vision")
        src.lm.save_pretrained(ckpt / "lm")
    tokenizer.save_pretrained(ckpt)
    cfg = loop.TrainConfig(bridge=bridge, size="test", out_dir=str(tmp_path / "run"), pretrained=str(ckpt), steps=2,
                           n_train=8, n_val=3, batch_size=4, data_dir=str(tmp_path / "data"), tasks=("caption",),
                           progress=False)
    p = loop.prepare(cfg)
    loaded = dict(p["model"].named_parameters())
    for n, w in src.named_parameters():
        if not any(k in n for k in TRAINED[bridge]):  # the frozen base comes from the checkpoint
            torch.testing.assert_close(loaded[n].detach(), w.detach(), rtol=0, atol=0, msg=n)
    assert not list(tmp_path.glob("base-*")), "a pretrained base needs no warm-up"
    m = loop.run(cfg, prepared=p, eval_before=False)
    assert len(m["losses"]) == 2


# ------------------------------------------------------------------------------------- CLI: bad input
@pytest.mark.parametrize("args, fragment", [
    (["--steps", "-3"], "argument --steps: must be a positive integer, got -3"),
    (["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--tasks", "caption,vqq"], "argument --tasks: must be a comma list of caption, vqa, got 'caption,vqq'"),
    (["--coco-captions", "/no/such/captions.json", "--coco-images", "."], "argument --coco-captions: no such file"),
    (["--pretrained", "/no/such/dir"], "argument --pretrained: no such directory: /no/such/dir"),
    (["--save-every", "-1"], "argument --save-every: must be an integer >= 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
@pytest.mark.parametrize("cmd", ["train", "demo"])
def test_cli_bad_input_is_one_line_exit_2(cmd, args, fragment, tmp_path, capsys, monkeypatch):
    from fastbridge.cli import main

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if cmd == "demo" and args[0] in ("--pretrained", "--save-every"):
        pytest.skip("not a demo option")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([cmd, "--size", "test", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir()), "nothing may be made before the check"


def test_pretrained_dir_is_checked_for_its_files(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match=r"has no config.json"):
        loop.TrainConfig(bridge="qformer", pretrained=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=r"has no vision/config.json, lm/config.json"):
        loop.TrainConfig(bridge="mlp", pretrained=str(tmp_path / "ckpt"))


# ------------------------------------------------------------------------------ checkpoints / signals
_KILL_SCRIPT = """
import sys, os, torch
from pathlib import Path
from torch import nn
from fastbridge.train import loop
out = Path(sys.argv[1])
torch.manual_seed(0)
model = nn.Linear(8, 4)
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
cfg = loop.TrainConfig(bridge="mlp", size="test", out_dir=str(out), steps=10)
def step():
    model(torch.randn(2, 8)).sum().backward(); opt.step(); opt.zero_grad()
step()
loop.save_checkpoint(model, opt, 2, cfg, out, {"losses": [1.0, 0.5], "step_times": [0.1, 0.1]})
torch.save(model.state_dict(), out / "expected.pt")
step()
os.environ["FASTBRIDGE_TEST_PAUSE_IN_WRITE"] = sys.argv[2]  # the next write stops half way: killed there
loop.save_checkpoint(model, opt, 4, cfg, out, {"losses": [1.0, 0.5, 0.4, 0.3], "step_times": [0.1] * 4})
"""


def test_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    """A kill during a checkpoint write (SIGKILL: nothing runs after it) leaves the previous checkpoint
    whole and loadable: files are written to a temporary name and renamed over the old one."""
    import signal
    import time

    from torch import nn

    out, marker = tmp_path / "run", tmp_path / "paused"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), str(marker)], cwd=os.getcwd())
    try:
        deadline = time.time() + 600
        while not (marker.exists() and marker.read_text().endswith(".tmp")):
            assert p.poll() is None, f"the writer exited with {p.returncode} before pausing"
            assert time.time() < deadline
            time.sleep(0.2)
        assert Path(marker.read_text()).exists()  # the new checkpoint's temporary file is on disk
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    model = nn.Linear(8, 4)
    cfg = loop.TrainConfig(bridge="mlp", size="test", out_dir=str(out), steps=10)
    step, opt_state, history = loop.load_checkpoint(model, cfg, out)
    assert step == 2 and history["losses"] == [1.0, 0.5] and opt_state["state"]
    expected = torch.load(out / "expected.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    fastbridge.load_trainable(nn.Linear(8, 4), out / "bridge.safetensors")  # the bridge file is whole too


def test_sigint_checkpoints_then_resume_holds_the_whole_run(tmp_path):
    """Ctrl-C during `fastbridge train`: the step finishes, a checkpoint is written, one line says how to
    resume, exit code 130, no traceback. --resume then finishes the run, and metrics.json / loss.png hold
    all of it, with the "before" scores of the first start."""
    out = tmp_path / "run"
    args = ["train", "--bridge", "mlp", "--size", "test", "--steps", "8", "--n-train", "12", "--n-val", "4",
            "--tasks", "caption", "--no-progress", "--out", str(out), "--data-dir", str(tmp_path / "data")]
    repo = Path(__file__).resolve().parents[1]  # run from the repository root: this checkout's fastbridge
    r = _cli(args, repo, {"FASTBRIDGE_TEST_SIGINT_AT_STEP": "3"})
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "interrupted (SIGINT) at step 3/8; checkpoint saved in" in last and "--resume" in last, last
    assert (out / "checkpoint.safetensors").exists() and not (out / "metrics.json").exists()
    r2 = _cli([*args, "--resume"], repo)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_step"] == 3 and len(m["losses"]) == 8
    assert m["before"] and m["before"]["caption"] and m["after"]["caption"]
    row = next(line for line in r2.stdout.splitlines() if line.startswith("| mlp |"))
    bleu4 = row.split("|")[3].strip()  # "before → after": the before score survives the resume (not "—")
    assert " → " in bleu4 and not bleu4.startswith("—"), row
    assert (out / "loss.png").exists()


def test_demo_plan_and_markdown(tmp_path):
    from fastbridge.train.cli import demo_markdown, demo_plan

    cfgs = {b: loop.TrainConfig(bridge=b, size="tiny", out_dir=str(tmp_path / b), n_train=2000, n_val=100,
                                steps=1500, warmup_lm_steps=3000, warmup_vision_steps=600)
            for b in ("llama-adapter", "qformer")}
    lines = demo_plan(cfgs, False, "cpu")
    assert lines[0].startswith("fastbridge demo: 2 bridge(s) (llama-adapter, qformer), size tiny, on cpu")
    assert any("3,000 text-only steps" in ln for ln in lines) and any("train 1,500 steps" in ln for ln in lines)
    assert lines[-1].startswith("Rough total: about 6 min")  # the default demo: the measured 6.1 min
    assert demo_plan(cfgs, True, "cpu")[-1].startswith("Rough total: about 9 min")  # 6.1 x 9600 / 6600
    assert "not measured" in demo_plan(cfgs, False, "cuda")[-1]
    summary = json.loads((Path(__file__).resolve().parents[1] / "docs/demo/cpu-2-core/demo.json").read_text())
    md = demo_markdown(summary)
    qf = next(r for r in summary["rows"] if r["bridge"] == "qformer")
    bleu4 = f"{qf['before']['caption']['BLEU-4']:.3f} → {qf['after']['caption']['BLEU-4']:.3f}"
    versions = summary["versions"]
    for needle in ("**Device:** cpu (2 cores)", f"git {versions['git']}", f"transformers {versions['transformers']}",
                   "`a → b`", "VQA acc: the official VQA soft accuracy, in %", "step ms", bleu4):
        assert needle in md, needle


def test_ctrl_c_outside_the_training_steps_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C while data is made or a base warms up: one line, exit code 130, no traceback."""
    from fastbridge.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "prepare", interrupted)
    rc = main(["train", "--bridge", "mlp", "--size", "test", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and err.count("\n") == 1 and "interrupted (SIGINT)" in err and "Traceback" not in err, err
