"""``fastbridge train`` and ``fastbridge demo``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

from .models import BRIDGES, SIZES

__all__ = ["add_train_arguments", "add_demo_arguments", "train_main", "demo_main", "summary_table", "demo_markdown",
           "demo_plan"]

DEMO_BRIDGES = ("llama-adapter", "qformer")   # the demo's default: one bridge of each kernel family
SHOWN = (("BLEU-4", "caption", "BLEU-4"), ("METEOR", "caption", "METEOR"), ("ROUGE-L", "caption", "ROUGE-L"),
         ("CIDEr", "caption", "CIDEr"), ("VQA acc", "vqa", "accuracy"))


def _int_at_least(lowest: int, what: str):
    """An argparse type: an integer >= ``lowest``, else one clear line naming what was expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if v < lowest:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _tasks(text: str) -> tuple:
    from .loop import TASKS

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(TASKS)}, got {text!r}")
    return tasks


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=tuple(SIZES), default=None,
                   help="model size (default: tiny on CPU, small on CUDA)")
    p.add_argument("--out", default=None, help="output folder (metrics.json, PNGs, checkpoints)")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (created if missing)")
    p.add_argument("--coco-captions", default=None,
                   help="train on COCO captions: the Karpathy dataset_coco.json (its train/val splits) or an official "
                        "captions_train*.json (then also --coco-val-captions)")
    p.add_argument("--coco-images", default=None, help="COCO image folder for --coco-captions")
    p.add_argument("--coco-val-captions", default=None, help="official captions_val*.json (validation)")
    p.add_argument("--coco-val-images", default=None, help="image folder for --coco-val-captions")
    p.add_argument("--n-train", type=_positive_int, default=None, help="training images")
    p.add_argument("--n-val", type=_positive_int, default=None, help="validation images (scored)")
    p.add_argument("--steps", type=_positive_int, default=None, help="bridge training steps")
    p.add_argument("--warmup-lm-steps", type=_nonneg_int, default=None,
                   help="text-only LM steps that stand in for a pretrained LM (random-init models)")
    p.add_argument("--warmup-vision-steps", type=_nonneg_int, default=None,
                   help="contrastive image-caption steps that stand in for a pretrained vision encoder")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_positive_float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if torch sees a GPU, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--tasks", type=_tasks, default=("caption", "vqa"), help="comma list of caption, vqa")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="details: each caption metric, PTBTokenizer output, per-phase messages (DEBUG log)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bridge", choices=BRIDGES, default="llama-adapter")
    _common(p)
    p.add_argument("--pretrained", default=None,
                   help="local checkpoint directory, checked before any work (qformer / adapter / flamingo: a "
                        "save_pretrained directory with a tokenizer; mlp / llama-adapter / dynamic-prompt: vision/ "
                        "and lm/ subfolders)")
    p.add_argument("--eager", action="store_true", help="train unpatched (fastbridge.unpatch): the eager baseline")
    p.add_argument("--compare", action="store_true", help="train eager and fastbridge from the same seed and compare")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors (same settings): bridge, optimizer, step, losses")
    p.add_argument("--save-every", type=_nonneg_int, default=200,
                   help="checkpoint every N steps (default 200; 0: only at the end). Ctrl-C / SIGTERM also "
                        "checkpoint; continue with --resume")


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bridge", default=",".join(DEMO_BRIDGES),
                   help=f"comma list of bridges or 'all' (default: {','.join(DEMO_BRIDGES)})")
    _common(p)
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also train the eager baseline and report the speed-up (default: on with CUDA)")


def _defaults(size: str) -> dict:
    if size == "test":  # CI: checks the whole pipeline runs, learns nothing
        return dict(n_train=16, n_val=6, steps=4, warmup_lm_steps=4, warmup_vision_steps=2, batch_size=4, lr=3e-3)
    if size == "tiny":  # a 2-core CPU: the demo's two bridges in about 6 minutes
        return dict(n_train=2000, n_val=100, steps=1500, warmup_lm_steps=3000, warmup_vision_steps=600,
                    batch_size=32, lr=3e-3)
    if size == "small":
        return dict(n_train=8000, n_val=500, steps=3000, warmup_lm_steps=4000, warmup_vision_steps=1500,
                    batch_size=64, lr=1e-3)
    return dict(n_train=20000, n_val=1000, steps=4000, warmup_lm_steps=6000, warmup_vision_steps=3000,
                batch_size=64, lr=5e-4)


def _config(args, bridge: str, out: Path):
    import torch

    from .loop import TrainConfig

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda") or str(args.device).startswith("cuda")
    size = args.size or ("small" if cuda else "tiny")
    d = _defaults(size)
    given = {k: getattr(args, k) for k in ("n_train", "n_val", "steps", "warmup_lm_steps", "warmup_vision_steps",
                                           "batch_size", "lr")
             if getattr(args, k, None) is not None}
    d.update(given)
    kw = dict(bridge=bridge, size=size, out_dir=str(out), data_dir=args.data_dir, coco_captions=args.coco_captions,
              coco_images=args.coco_images, coco_val_captions=args.coco_val_captions,
              coco_val_images=args.coco_val_images, seed=args.seed, device=args.device, dtype=args.dtype,
              tasks=tuple(args.tasks), progress=not args.no_progress, **d)
    for extra in ("pretrained", "resume", "save_every"):
        if getattr(args, extra, None) is not None:
            kw[extra] = getattr(args, extra)
    if getattr(args, "eager", False):
        kw["patched"] = False
    return TrainConfig(**kw)


def _fmt(v, pct=False):
    if v is None:
        return "—"
    return f"{v:.1f}" if pct else f"{v:.3f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown table: per bridge, untrained → trained scores, trainable parameters, step time."""
    head = ["bridge", "trainable", *(n for n, _, _ in SHOWN), "step ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["bridge"], f"{r['trainable_params']:,}"]
        for _, task, key in SHOWN:
            b = ((r.get("before") or {}).get(task) or {}).get(key)
            a = ((r.get("after") or {}).get(task) or {}).get(key)
            pct = task == "vqa"
            cells.append("—" if a is None else f"{_fmt(b, pct)} → {_fmt(a, pct)}")
        ms = r.get("step_ms_median")
        cells.append("—" if ms is None else f"{ms:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The one measured reference for the demo's time estimate: the default demo (size tiny, llama-adapter +
# qformer: LM warm-up 3,000 + vision warm-up 600 + 2 x 1,500 bridge steps) took 6.1 min on an idle 2-core
# x86_64 CPU (docs/demo/cpu-2-core/README.md). Other sizes / devices have no measurement: no estimate.
_MEASURED = {"size": "tiny", "device": "cpu", "cores": 2, "units": 3000 + 600 + 2 * 1500, "minutes": 6.1}


def demo_plan(cfgs: dict, compare: bool, device: str) -> list[str]:
    """The lines ``fastbridge demo`` prints before it starts: its phases and a rough total."""
    import os

    from .loop import _base_dir

    first = next(iter(cfgs.values()))
    cores = os.cpu_count() or 1
    runs = 2 if compare else 1
    lines = [f"fastbridge demo: {len(cfgs)} bridge(s) ({', '.join(cfgs)}), size {first.size}, on {device}"
             f"{f' ({cores} cores)' if device == 'cpu' else ''}"
             f"{', each trained eager and with fastbridge (--compare)' if compare else ''}. Phases:",
             f"  1. data: {first.n_train:,} training + {first.n_val:,} validation synthetic images (made once)"]
    units = 0
    seen = set()
    for b, cfg in cfgs.items():
        kind = "blip" if b == "adapter" else "llama"
        if kind in seen:
            continue
        seen.add(kind)
        base = _base_dir(cfg, kind)
        cached = base.exists() and any(base.glob("vision-*.safetensors"))
        what = "BLIP text decoder" if kind == "blip" else "LLaMA"
        if cached:
            lines.append(f"  2. warm-ups of the random-init {what} and vision encoder: cached in {base}, skipped")
        else:
            lines.append(f"  2. warm-up of the random-init {what}: {cfg.warmup_lm_steps:,} text-only steps, then the "
                         f"vision encoder: {cfg.warmup_vision_steps:,} contrastive steps (once; cached in {base.name})")
            units += cfg.warmup_lm_steps + cfg.warmup_vision_steps
    lines.append(f"  3. per bridge: score the untrained bridge, train {first.steps:,} steps of {first.batch_size} "
                 f"examples{' (twice: eager, fastbridge)' if compare else ''}, score the trained bridge")
    units += sum(cfg.steps for cfg in cfgs.values()) * runs
    m = _MEASURED
    if first.size == m["size"] and device == m["device"]:
        est = m["minutes"] * units / m["units"]
        lines.append(f"Rough total: about {max(1, round(est))} min (scaled from {m['minutes']} min measured for the "
                     f"default demo on an idle {m['cores']}-core CPU; a busy or smaller CPU takes longer).")
    else:
        lines.append(f"Rough total: not measured for size {first.size} on {device} (the default tiny demo took "
                     f"{m['minutes']} min on an idle 2-core CPU).")
    return lines


_SETTINGS_KEYS = ("size", "n_train", "n_val", "steps", "batch_size", "warmup_lm_steps", "warmup_vision_steps")


def demo_markdown(summary: dict) -> str:
    """demo.md: the results table of a demo.json, with what its arrows, units, device and versions mean."""
    rows = summary.get("rows", [])
    v = summary.get("versions", {})
    c = rows[0]["config"] if rows else {}
    settings = (f"size `{c.get('size')}`, {c.get('n_train', 0):,} training / {c.get('n_val', 0):,} validation "
                f"images, {c.get('steps', 0):,} bridge steps of {c.get('batch_size')} examples, LM warm-up "
                f"{c.get('warmup_lm_steps', 0):,} steps, vision warm-up {c.get('warmup_vision_steps', 0):,} steps, "
                f"tasks {', '.join(c.get('tasks', []))}") if c else "unknown"
    git = v.get("git") or "unknown"
    lines = [
        "# fastbridge demo results", "",
        f"- **Device:** {v.get('device', '?')}. **Versions:** fastbridge {v.get('fastbridge', '?')} (git {git}), "
        f"torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}, python {v.get('python', '?')} "
        f"({v.get('machine', '?')}).",
        f"- **Settings:** {settings}. **Wall clock:** {summary.get('minutes', 0):.1f} min for everything.", "",
        summary_table(rows), "",
        "How to read it:", "",
        "- `a → b`: the score with the bridge untrained (`a`, the same frozen base, the bridge at its "
        "initialisation) → after training (`b`), both on the validation images.",
        "- BLEU-4, METEOR, ROUGE-L, CIDEr: pycocoevalcap's COCO caption metrics as fractions (papers print "
        "them ×100; CIDEr can exceed 1); higher is better. METEOR needs Java.",
        "- VQA acc: the official VQA soft accuracy, in %.",
        "- trainable: parameters the bridge trains; everything else is frozen.",
        "- step ms: median wall time of one training step (forward, backward, optimizer) on this device. "
        "On a CPU the fused ops run their CPU paths, so it says nothing about GPU speed.",
        "- `—`: not measured or not available (e.g. METEOR without Java).",
    ]
    comps = summary.get("comparisons") or {}
    if comps:
        lines += ["", "Eager vs fastbridge (same seed, same base, same batches):", ""]
        for b, cmp in comps.items():
            sp = cmp.get("speedup")
            ms = cmp.get("step_ms_median", {})
            timing = (f"median step {ms.get('eager', 0):.1f} ms eager → {ms.get('fastbridge', 0):.1f} ms fastbridge "
                      f"({sp:.2f}x)" if sp else "too few steps to compare step times")
            lines.append(f"- {b}: largest loss difference at any step {cmp['loss_max_abs_diff']:.2e}; {timing}")
    return "\n".join(lines) + "\n"


def calls_line(calls: dict) -> str:
    """One line from metrics["calls"] (fastbridge.stats): what the integrations' calls ran."""
    if not calls:
        return "fastbridge calls: none recorded (nothing patched runs through fastbridge)"
    parts = []
    for name, c in calls.items():
        fb = sum(c.get("fallback", {}).values())
        parts.append(f"{name} {c.get('fused', 0)} fused / {c.get('reference', 0)} reference / {fb} fallback")
    return "fastbridge calls (fastbridge.stats): " + "; ".join(parts)


def _setup_logging(verbose: bool = False) -> None:
    log = logging.getLogger("fastbridge")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[fastbridge] %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def _resume_command(argv: list[str]) -> str:
    import shlex

    args = [a for a in argv if a != "--resume"]
    return "fastbridge " + " ".join(shlex.quote(a) for a in args) + " --resume"


def main(args, parser: argparse.ArgumentParser) -> int:
    """``fastbridge train`` / ``demo``: usage errors are one line (exit 2), an interruption one line (exit
    130 for Ctrl-C, 143 for SIGTERM), never a traceback for either."""
    import signal

    def term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, term)
    from .loop import TrainingInterrupted

    try:
        return train_main(args, parser) if args.cmd == "train" else demo_main(args, parser)
    except TrainingInterrupted as e:
        if args.cmd == "train":
            how = f"resume with: {_resume_command(sys.argv[1:])}"
        else:
            how = "`fastbridge train --resume` with that bridge's settings continues it"
        print(f"fastbridge {args.cmd}: interrupted ({e.signal_name}) at step {e.step}/{e.steps}; checkpoint saved in "
              f"{e.out}; {how}", file=sys.stderr)
        return 143 if e.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        ckpt = Path(args.out or f"fastbridge-runs/{args.bridge}") / "checkpoint.safetensors"
        if args.cmd == "train" and ckpt.exists():
            what = f"the last checkpoint ({ckpt}) is kept; resume with: {_resume_command(sys.argv[1:])}"
        else:
            what = "no training step had been checkpointed" if args.cmd == "train" else "partial results are kept"
        print(f"fastbridge {args.cmd}: interrupted ({name}) outside the training steps; {what}", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _checked_config(args, bridge: str, out: Path, parser: argparse.ArgumentParser):
    """TrainConfig from the arguments; a bad value is a usage error (one line, exit 2), found before any
    data is made."""
    import re

    try:
        return _config(args, bridge, out)
    except ValueError as e:
        msg = re.sub(r"^TrainConfig: (\w+)", lambda m: f"argument --{m.group(1).replace('_', '-')}:", str(e))
        parser.error(msg.replace("::", ":"))


def train_main(args, parser: argparse.ArgumentParser) -> int:
    from .loop import compare, run

    _setup_logging(getattr(args, "verbose", False))
    out = Path(args.out or f"fastbridge-runs/{args.bridge}")
    cfg = _checked_config(args, args.bridge, out, parser)
    if args.compare:
        res = compare(cfg)
        c = res["comparison"]
        print(json.dumps(c, indent=1))
        print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
        return 0
    m = run(cfg)
    print(summary_table([{**m, "bridge": cfg.bridge}]))
    print(calls_line(m.get("calls") or {}))
    print(f"wrote {out / 'metrics.json'}, {out / 'loss.png'}, {out / 'bridge.safetensors'}")
    return 0


def demo_main(args, parser: argparse.ArgumentParser) -> int:
    import torch

    from .loop import compare, run
    from .plots import plot_losses

    _setup_logging(getattr(args, "verbose", False))
    t0 = time.perf_counter()
    bridges = BRIDGES if args.bridge == "all" else tuple(b.strip() for b in args.bridge.split(",") if b.strip())
    bad = [b for b in bridges if b not in BRIDGES]
    if bad or not bridges:
        parser.error(f"argument --bridge: must be 'all' or a comma list of {', '.join(BRIDGES)}, got {args.bridge!r}")
    out = Path(args.out or "fastbridge-demo")
    do_compare = torch.cuda.is_available() if args.compare is None else args.compare
    rows, comparisons, curves = [], {}, {}
    cfgs = {b: _checked_config(args, b, out / b, parser) for b in bridges}  # every error before any work
    for b, cfg in cfgs.items():
        if cfg.data_dir is None:  # one data set for all bridges
            cfgs[b] = replace(cfg, data_dir=str(out / f"data-{cfg.n_train}-{cfg.n_val}-{SIZES[cfg.size].image_size}"))
    from .loop import resolve_device

    for line in demo_plan(cfgs, do_compare, resolve_device(args.device).type):
        print(line, flush=True)
    for b in bridges:
        cfg = cfgs[b]
        if do_compare:
            res = compare(cfg)
            comparisons[b] = res["comparison"]
            m = json.loads((Path(cfg.out_dir) / "fastbridge" / "metrics.json").read_text())
        else:
            m = run(cfg)
        rows.append({**m, "bridge": b})
        curves[b] = m["losses"]
    plot_losses(curves, out / "loss.png", title="bridge training loss (fastbridge)")
    table = summary_table(rows)
    summary = {"versions": rows[0]["versions"] if rows else {}, "minutes": (time.perf_counter() - t0) / 60,
               "rows": [{k: r[k] for k in ("bridge", "trainable_params", "total_params", "before", "after",
                                           "step_ms_median", "peak_mb", "config")} for r in rows],
               "comparisons": comparisons}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    (out / "demo.md").write_text(demo_markdown(summary))
    print()
    print(f"fastbridge demo on {summary['versions'].get('device', '?')}: untrained → trained "
          f"(validation set, pycocoevalcap; VQA accuracy in %)")
    print(table)
    for b, c in comparisons.items():
        sp = c.get("speedup")
        timing = (f"step {c['step_ms_median']['eager']:.1f} → {c['step_ms_median']['fastbridge']:.1f} ms ({sp:.2f}x)"
                  if sp else "too few steps to compare step times")
        print(f"{b}: eager vs fastbridge — max |loss diff| {c['loss_max_abs_diff']:.2e}, {timing}")
    print(f"wrote {out / 'demo.json'}, {out / 'demo.md'} (the table and how to read it), {out / 'loss.png'} "
          f"({summary['minutes']:.1f} min)")
    return 0
