"""Training and evaluation of one bridge: data → (LM warm-up) → bridge training → captions / VQA scores.

``run(config)`` is what ``fastbridge train`` and ``fastbridge demo`` call. It writes into
``config.out_dir``: ``metrics.json`` (config, versions, before / after scores, step times, peak memory,
loss history), ``loss.png``, ``bridge.safetensors`` (only the trainable bridge, ``save_trainable``),
``trainer_state.json`` + ``optimizer.safetensors`` (resume), ``base.safetensors`` (the frozen base of a
random-init model after its text-only warm-up, the stand-in for a pretrained checkpoint) and the
tokenizer. ``compare(config)`` trains the eager and the fastbridge model from the same seed and base.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import BRIDGES, SIZES, BridgeModel, ModelSize, build_model

logger = logging.getLogger("fastbridge")

__all__ = ["TrainConfig", "Example", "run", "compare", "evaluate", "greedy_decode", "caption_loss"]

TASKS = ("caption", "vqa")
MIN_TIMED_STEPS = 20  # compare() reports a speed-up only from at least this many timed steps per run
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5


@dataclass
class TrainConfig:
    """Everything a run depends on (saved into metrics.json; ``fastbridge train --help`` lists them)."""
    bridge: str = "llama-adapter"
    size: str = "tiny"
    out_dir: str = "fastbridge-run"
    data_dir: Optional[str] = None       # synthetic set root (made if missing); default under out_dir/..
    coco_captions: Optional[str] = None  # COCO captions instead of synthetic data: the Karpathy split file
    coco_images: Optional[str] = None    # (train + val splits) or an official captions_train*.json, with
    coco_val_captions: Optional[str] = None  # the official captions_val*.json here
    coco_val_images: Optional[str] = None    # default: coco_images
    n_train: int = 2000
    n_val: int = 100
    tasks: tuple = TASKS
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_lm_steps: int = 3000  # text-only LM training of a random-init base (0: none)
    warmup_vision_steps: int = 600  # contrastive image-caption training of a random-init vision encoder
    lm_lr: float = 3e-3
    seed: int = 0
    patched: bool = True         # fastbridge.patch (fused kernels) or unpatch (eager)
    device: str = "auto"
    dtype: str = "auto"          # fp32 | bf16 | fp16 | auto (bf16 autocast on CUDA, fp32 on CPU)
    pretrained: Optional[str] = None
    resume: bool = False
    save_every: int = 200                # checkpoint every N steps (0: only at the end / on interruption)
    stop_at: Optional[int] = None        # stop (checkpointed) before `steps`; resume later with resume=True
    eval_batch_size: int = 64
    max_new_tokens: int = 20
    log_every: int = 100
    progress: bool = True

    def __post_init__(self):
        if self.bridge not in BRIDGES:
            raise ValueError(f"TrainConfig: bridge must be one of {BRIDGES}, got {self.bridge!r}")
        if self.size not in SIZES:
            raise ValueError(f"TrainConfig: size must be one of {tuple(SIZES)}, got {self.size!r}")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"TrainConfig: tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        for name in ("steps", "batch_size", "n_train", "n_val", "eval_batch_size", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {v!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"TrainConfig: dtype must be one of auto, fp32, bf16, fp16, got {self.dtype!r}")
        if (self.coco_captions is None) != (self.coco_images is None):
            raise ValueError("TrainConfig: coco_captions and coco_images go together (annotations JSON and image dir)")
        if self.coco_val_captions is not None and self.coco_captions is None:
            raise ValueError("TrainConfig: coco_val_captions needs coco_captions / coco_images (the training split)")
        for name in ("coco_captions", "coco_val_captions"):
            v = getattr(self, name)
            if v is not None and not Path(v).is_file():
                raise ValueError(f"TrainConfig: {name}: no such file: {v}")
        for name in ("coco_images", "coco_val_images"):
            v = getattr(self, name)
            if v is not None and not Path(v).is_dir():
                raise ValueError(f"TrainConfig: {name}: no such directory: {v}")
        if self.pretrained is not None:
            problem = pretrained_problem(self.bridge, self.pretrained)
            if problem:
                raise ValueError(f"TrainConfig: pretrained: {problem}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"TrainConfig: save_every must be an int >= 0, got {self.save_every!r}")
        resolve_device(self.device)  # a clear error now, not after the data is made
        self.tasks = tuple(self.tasks)
        if self.coco_captions is not None and "vqa" in self.tasks:
            self.tasks = tuple(t for t in self.tasks if t != "vqa")  # COCO captions carry no questions


@dataclass
class Example:
    image: int          # row of the image table
    prompt: str
    target: str


# ------------------------------------------------------------------------------------------------ plumbing
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"TrainConfig: device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig: device {name!r} asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"TrainConfig: device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"TrainConfig: device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


def pretrained_problem(bridge: str, path: str) -> Optional[str]:
    """Why ``path`` is not a local checkpoint directory build_model can load for ``bridge`` (None: it is)."""
    root = Path(path)
    if not root.is_dir():
        return f"no such directory: {path} (a local checkpoint directory; hub names are not downloaded)"
    if bridge in ("qformer", "adapter", "flamingo"):  # one transformers model directory
        need = [root / "config.json"]
    else:  # LLaMA-based bridges: vision/ and lm/ subfolders
        need = [root / "vision" / "config.json", root / "lm" / "config.json"]
    missing = [str(p.relative_to(root)) for p in need if not p.is_file()]
    if missing:
        return f"{path} has no {', '.join(missing)} (the {bridge} bridge loads a save_pretrained directory" + \
            (")" if bridge in ("qformer", "adapter", "flamingo") else " with vision/ and lm/ subfolders)")
    if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)"
    return None


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pixel_tensor(images, image_size: int) -> Tensor:
    """PIL images -> (N, 3, S, S) uint8 (a quarter of float32's memory; ``model_pixels`` normalises a batch)."""
    import numpy as np
    from PIL import Image

    out = torch.empty(len(images), 3, image_size, image_size, dtype=torch.uint8)
    for i, im in enumerate(images):
        im = im.convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        out[i] = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    return out


def model_pixels(pixels: Tensor, rows, device) -> Tensor:
    """Rows of a uint8 pixel table -> the model's input on ``device``: float32 in [-1, 1]."""
    x = pixels[rows].to(device, non_blocking=True).float()
    return (x / 255.0 - IMAGE_MEAN) / IMAGE_STD


# Text layout, shared by the LM warm-up and the bridge: [bos] <context> . <task text> [eos]. In the warm-up
# the context is another caption of the same scene (text only); with the bridge it is the image (visual
# tokens after [bos], or adaption prompts). So the frozen LM knows how to read a description from its
# context -- what a pretrained LM brings -- and the bridge learns to describe the image to it.
CONTEXT_SEP = "."
CAPTION_PROMPT = CONTEXT_SEP


def vqa_prompt(question: str) -> str:
    return f"{CONTEXT_SEP} question: {question} answer:"


# ------------------------------------------------------------------------------------------------ data
@dataclass
class SplitData:
    pixels: Tensor                                   # (N, 3, S, S) uint8, every image of the split
    image_ids: list
    captions: dict = field(default_factory=dict)     # image_id -> [refs]
    questions: list = field(default_factory=list)    # dicts: question_id, image (row), question, answers, type


def load_data(cfg: TrainConfig, size: ModelSize):
    """(train, val) SplitData: synthetic (made if missing) or COCO captions from disk."""
    from .. import data as fbdata

    import datasets

    if not cfg.progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    # the files are local: datasets' "Downloading data" / "Generating split" bars say nothing useful
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _load_data(cfg, size, fbdata)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _load_data(cfg: TrainConfig, size: ModelSize, fbdata):
    if cfg.coco_captions is not None:
        if cfg.coco_val_captions is None:  # Karpathy split file: its train (+ restval) and val splits
            train = fbdata.load_coco_captions(cfg.coco_captions, cfg.coco_images, split="train")
            val = fbdata.load_coco_captions(cfg.coco_captions, cfg.coco_images, split="val")
        else:  # official files, one split each
            train = fbdata.load_coco_captions(cfg.coco_captions, cfg.coco_images)
            val = fbdata.load_coco_captions(cfg.coco_val_captions, cfg.coco_val_images or cfg.coco_images)
        train = train.select(range(min(cfg.n_train, len(train))))
        val = val.select(range(min(cfg.n_val, len(val))))
        splits = {"train": (train, None), "validation": (val, None)}
    else:
        root = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.out_dir).parent / \
            f"fastbridge-synthetic-{cfg.n_train}-{cfg.n_val}-{size.image_size}"
        fbdata.make_synthetic(root, n_train=cfg.n_train, n_val=cfg.n_val, n_test=0, image_size=size.image_size,
                              seed=0, progress=cfg.progress)
        dd = fbdata.load_synthetic(root, cache_dir=str(root) + "-hf-cache")
        splits = {k: (fbdata.caption_view(dd[k]), fbdata.vqa_view(dd[k]) if "vqa" in cfg.tasks else None)
                  for k in ("train", "validation")}
    out = {}
    for name, (caps, vqa) in splits.items():
        row = {iid: i for i, iid in enumerate(caps["image_id"])}
        sd = SplitData(pixels=pixel_tensor(caps["image"], size.image_size), image_ids=list(caps["image_id"]),
                       captions=dict(zip(caps["image_id"], caps["captions"])))
        if vqa is not None:
            cols = vqa.remove_columns([c for c in vqa.column_names if c == "image"])
            for q in cols:
                sd.questions.append(dict(question_id=q["question_id"], image=row[q["image_id"]],
                                         question=q["question"], answers=list(q["answers"]),
                                         answer=q["multiple_choice_answer"], answer_type=q["answer_type"]))
        out[name] = sd
    return out["train"], out["validation"]


def training_examples(split: SplitData, tasks: Sequence[str]) -> list[Example]:
    ex = []
    if "caption" in tasks:
        row = {iid: i for i, iid in enumerate(split.image_ids)}
        for iid, refs in split.captions.items():
            ex += [Example(row[iid], CAPTION_PROMPT, c) for c in refs]
    if "vqa" in tasks:
        ex += [Example(q["image"], vqa_prompt(q["question"]), q["answer"]) for q in split.questions]
    return ex


def warmup_texts(split: SplitData, tasks: Sequence[str], seed: int) -> list[str]:
    """Text-only documents for the LM warm-up: a caption as context, then another caption of the same
    scene or a question about it with its answer (no image anywhere)."""
    rng = random.Random(seed)
    row_caps = {i: split.captions[iid] for i, iid in enumerate(split.image_ids)}
    docs = []
    if "caption" in tasks:
        for refs in row_caps.values():
            for j, c in enumerate(refs):
                docs.append(f"{refs[(j + 1 + rng.randrange(len(refs) - 1)) % len(refs)] if len(refs) > 1 else c} "
                            f"{CAPTION_PROMPT} {c}")
    if "vqa" in tasks:
        for q in split.questions:
            docs.append(f"{rng.choice(row_caps[q['image']])} {vqa_prompt(q['question'])} {q['answer']}")
    return docs


def encode_batch(tokenizer, examples: Sequence[Example], device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded [bos] prompt target [eos]; labels (-100 outside the target) aligned with the logits
    (position i predicts token i + 1)."""
    seqs, starts = [], []
    for e in examples:
        p = tokenizer.encode(e.prompt, add_special_tokens=False) if e.prompt else []
        t = tokenizer.encode(e.target, add_special_tokens=False)
        seqs.append([tokenizer.bos_token_id] + p + t + [tokenizer.eos_token_id])
        starts.append(1 + len(p))
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, st - 1:len(s) - 1] = ids[i, st:len(s)]
    return ids.to(device), mask.to(device), labels.to(device)


def caption_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def greedy_decode(model: BridgeModel, tokenizer, pixels: Tensor, rows: Sequence[int], prompts: Sequence[str], *,
                  max_new_tokens: int, batch_size: int, device, amp: Optional[torch.dtype] = None,
                  progress: Optional[str] = None) -> list[str]:
    """Greedy decoding of ``prompts[i]`` about image ``pixels[rows[i]]`` (a uint8 table), batched by prompt
    length (no padding inside a batch). Returns the decoded text. ``progress``: a bar with this label."""
    model.eval()
    enc = [[tokenizer.bos_token_id] + (tokenizer.encode(p, add_special_tokens=False) if p else []) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i]), i))
    out: list[Optional[str]] = [None] * len(enc)
    bar = _progress(None, len(enc), progress, True) if progress else None
    i = 0
    while i < len(order):
        L = len(enc[order[i]])
        group = []
        while i < len(order) and len(enc[order[i]]) == L and len(group) < batch_size:
            group.append(order[i])
            i += 1
        ids = torch.tensor([enc[g] for g in group], device=device)
        px = model_pixels(pixels, [rows[g] for g in group], device)
        done = torch.zeros(len(group), dtype=torch.bool, device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            state = model.image_state(px)
            for _ in range(max_new_tokens):
                logits = model.text_logits(state, ids, torch.ones_like(ids))[:, -1]
                nxt = logits.argmax(-1).masked_fill(done, tokenizer.pad_token_id)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == tokenizer.eos_token_id
                if bool(done.all()):
                    break
        for g, row in zip(group, ids[:, L:].tolist()):
            toks = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            toks = [t for t in toks if t != tokenizer.pad_token_id]
            out[g] = tokenizer.decode(toks, skip_special_tokens=True).strip()
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def _score_line(result: dict) -> str:
    parts = [f"{k} {v:.3f}" for k, v in (result.get("caption") or {}).items() if k in ("BLEU-4", "CIDEr")]
    if "vqa" in result:
        parts.append(f"VQA {result['vqa']['accuracy']:.1f}%")
    return ", ".join(parts)


def evaluate(model: BridgeModel, tokenizer, split: SplitData, cfg: TrainConfig, device, amp=None,
             log: Callable[[str], None] = logger.info, what: str = "") -> dict:
    """Caption metrics (pycocoevalcap) on the split's images and VQA accuracy on its questions.

    Logs one line with the main scores; each metric's details go to the "fastbridge" logger at DEBUG
    level (``--verbose``)."""
    from .. import eval as fbeval

    result: dict = {}
    t0 = time.perf_counter()
    label = f"evaluate{' ' + what if what else ''}"
    if "caption" in cfg.tasks:
        n = len(split.image_ids)
        caps = greedy_decode(model, tokenizer, split.pixels, range(n), [CAPTION_PROMPT] * n,
                             max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, device=device, amp=amp,
                             progress=f"{label}: captions" if cfg.progress else None)
        preds = dict(zip(split.image_ids, caps))
        scores = fbeval.caption_metrics(preds, split.captions)
        result["caption"] = scores.scores
        result["caption_skipped"] = dict(scores.skipped)
        result["examples"] = [{"image_id": iid, "prediction": preds[iid], "references": split.captions[iid][:2]}
                              for iid in split.image_ids[:4]]
    if "vqa" in cfg.tasks and split.questions:
        qs = split.questions
        ans = greedy_decode(model, tokenizer, split.pixels, [q["image"] for q in qs],
                            [vqa_prompt(q["question"]) for q in qs], max_new_tokens=6,
                            batch_size=cfg.eval_batch_size, device=device, amp=amp,
                            progress=f"{label}: VQA" if cfg.progress else None)
        acc = fbeval.vqa_accuracy({q["question_id"]: a for q, a in zip(qs, ans)},
                                  {q["question_id"]: q["answers"] for q in qs},
                                  answer_types={q["question_id"]: q["answer_type"] for q in qs})
        result["vqa"] = {"accuracy": acc["overall"], **{f"accuracy/{k}": v for k, v in acc["per_answer_type"].items()}}
    log(f"{label} ({cfg.bridge}, {len(split.image_ids)} images, {time.perf_counter() - t0:.0f}s): "
        f"{_score_line(result)}")
    return result


# ------------------------------------------------------------------------------------------------ training
def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(n: int, batch_size: int, seed: int, start_step: int, steps: int):
    """Index batches for steps [start_step, steps): epoch-wise permutations from one seeded generator,
    so a resumed run sees exactly the batches the uninterrupted run would have."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, n // batch_size)
    perm, epoch = None, -1
    for step in range(steps):
        e = step // per_epoch
        if e != epoch:
            perm, epoch = torch.randperm(n, generator=g), e
        if step >= start_step:
            j = (step % per_epoch) * batch_size
            yield step, perm[j:j + batch_size].tolist()


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    import sys

    from tqdm.auto import tqdm

    # written to a file or pipe, a bar redrawn ten times a second fills megabytes: twice a minute there
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, mininterval=interval)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CHECKPOINT = "checkpoint.safetensors"  # everything a resume needs, in one atomically written file


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM during training: the step finished, a checkpoint was written, then this is raised."""

    def __init__(self, step: int, steps: int, out: Path, signal_name: str) -> None:
        super().__init__(f"{signal_name} at step {step}/{steps}; checkpoint in {out}")
        self.step, self.steps, self.out, self.signal_name = step, steps, out, signal_name


_pending_signal: list[str] = []  # set by the handler while the training loop runs
# Tests only: "N" makes the training loop send itself SIGINT after step N (the real handler then runs).
_TEST_SIGNAL_ENV = "FASTBRIDGE_TEST_SIGINT_AT_STEP"


@contextlib.contextmanager
def _stop_on_signals():
    """While training: SIGINT / SIGTERM finish the current step, then the loop checkpoints and raises
    TrainingInterrupted. A second signal interrupts at once (the checkpoint files are written atomically,
    so the previous checkpoint stays loadable). Only in the main thread (where handlers can be set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _pending_signal:
            raise KeyboardInterrupt(name)
        _pending_signal.append(name)

    _pending_signal.clear()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        _pending_signal.clear()


def save_checkpoint(model: BridgeModel, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig, out: Path,
                    history: Optional[dict] = None) -> None:
    """The trainable bridge (``bridge.safetensors``, save_trainable) and, for resuming, one
    ``checkpoint.safetensors``: bridge, optimizer moments, the step, the loss / step-time history and the
    "before" scores. Each file is written atomically: a kill during a save leaves the previous checkpoint."""
    import fastbridge
    from safetensors.torch import save_file

    from ..checkpoint import atomic_write, trainable_state

    history = history or {}
    tensors = {f"bridge/{n}": p.detach().to("cpu").contiguous().clone() for n, p in trainable_state(model).items()}
    flat, meta = _flatten_optimizer(opt.state_dict())
    tensors.update({f"optimizer/{k}": v for k, v in flat.items()})
    tensors["history/losses"] = torch.tensor(history.get("losses", []), dtype=torch.float64)
    tensors["history/step_times"] = torch.tensor(history.get("step_times", []), dtype=torch.float64)
    state = {"step": step, "optimizer_meta": meta, "config": asdict(cfg), "before": history.get("before")}
    meta = {"fastbridge.trainer": json.dumps(state)}
    atomic_write(out / CHECKPOINT, lambda tmp: save_file(tensors, tmp, metadata=meta))
    fastbridge.save_trainable(model, out / "bridge.safetensors")


def load_checkpoint(model: BridgeModel, cfg: TrainConfig, out: Path) -> tuple[int, Optional[dict], dict]:
    """(step, optimizer state, history) of out/'s checkpoint, its bridge loaded into model; (0, None, {}) if
    there is none. history: "losses" and "step_times" of the steps before ``step``, "before" scores."""
    from safetensors import safe_open

    path = out / CHECKPOINT
    if not path.exists():
        if (out / "trainer_state.json").exists():  # written by fastbridge before checkpoint.safetensors
            return _load_legacy_checkpoint(model, cfg, out)
        return 0, None, {}
    with safe_open(str(path), framework="pt") as f:
        state = json.loads((f.metadata() or {})["fastbridge.trainer"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _check_resume_config(state.get("config", {}), cfg, out)
    bridge = {k[len("bridge/"):]: v for k, v in tensors.items() if k.startswith("bridge/")}
    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(bridge) != want or any(bridge[n].shape != params[n].shape for n in bridge):
        raise ValueError(f"resume: {path} holds another bridge's parameters than this model trains "
                         f"(use the same settings, or another out_dir)")
    with torch.no_grad():
        for n, t in bridge.items():
            params[n].copy_(t.to(device=params[n].device, dtype=params[n].dtype))
    flat = {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    opt_state = _unflatten_optimizer(flat, state["optimizer_meta"])
    history = {"losses": tensors["history/losses"].tolist(), "step_times": tensors["history/step_times"].tolist(),
               "before": state.get("before")}
    return int(state["step"]), opt_state, history


def _check_resume_config(saved: dict, cfg: TrainConfig, out: Path) -> None:
    for key in ("bridge", "size", "steps", "batch_size", "lr", "seed", "tasks"):
        if key in saved and saved[key] != (list(getattr(cfg, key)) if key == "tasks" else getattr(cfg, key)):
            raise ValueError(f"resume: {key} = {getattr(cfg, key)!r} differs from the checkpoint's {saved[key]!r} in "
                             f"{out} (resume with the same settings, or use another out_dir)")


def _load_legacy_checkpoint(model: BridgeModel, cfg: TrainConfig, out: Path) -> tuple[int, Optional[dict], dict]:
    """The older layout (trainer_state.json + optimizer.safetensors + bridge.safetensors): no loss history."""
    import fastbridge
    from safetensors.torch import load_file

    state = json.loads((out / "trainer_state.json").read_text())
    _check_resume_config(state.get("config", {}), cfg, out)
    fastbridge.load_trainable(model, out / "bridge.safetensors")
    opt_state = _unflatten_optimizer(load_file(str(out / "optimizer.safetensors")), state["optimizer_meta"])
    logger.warning("resume: %s is an older checkpoint without the loss history; metrics.json will hold the losses "
                   "from step %d on", out, int(state["step"]))
    return int(state["step"]), opt_state, {}


def train_bridge(model: BridgeModel, tokenizer, train: SplitData, cfg: TrainConfig, device, amp, out: Path,
                 start_step: int = 0, opt_state: Optional[dict] = None, history: Optional[dict] = None) -> dict:
    """Steps [start_step, stop_at or steps) of the bridge's training; checkpoints every save_every steps, at
    the end, and on SIGINT / SIGTERM (then raises TrainingInterrupted). ``history``: the losses / step times
    of the steps before start_step and the "before" scores (from the checkpoint), kept in every checkpoint;
    the returned losses / step times cover the whole run."""
    examples = training_examples(train, cfg.tasks)
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    model.train()
    history = dict(history or {})
    losses, times = list(history.get("losses", []))[:start_step], list(history.get("step_times", []))[:start_step]
    history.update(losses=losses, step_times=times)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    end = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    bar = _progress(_batches(len(examples), cfg.batch_size, cfg.seed, start_step, end), end - start_step,
                    f"train {cfg.bridge} ({'fastbridge' if cfg.patched else 'eager'})", cfg.progress)
    signal_at = int(os.environ.get(_TEST_SIGNAL_ENV, "0") or 0)
    with _stop_on_signals():
        for step, idx in bar:
            batch = [examples[i] for i in idx]
            ids, mask, labels = encode_batch(tokenizer, batch, device)
            px = model_pixels(train.pixels, [e.image for e in batch], device)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg.steps, cfg.lr, max(1, cfg.steps // 20))
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = caption_loss(model(px, ids, mask), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if cfg.progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            elif (step + 1) % cfg.log_every == 0:
                logger.info("step %d/%d loss %.4f", step + 1, cfg.steps, losses[-1])
            if signal_at and step + 1 == signal_at:
                import signal

                os.kill(os.getpid(), signal.SIGINT)
            if _pending_signal:
                if hasattr(bar, "close"):
                    bar.close()
                save_checkpoint(model, opt, step + 1, cfg, out, history)
                raise TrainingInterrupted(step + 1, cfg.steps, out, _pending_signal[0])
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < end:
                save_checkpoint(model, opt, step + 1, cfg, out, history)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    save_checkpoint(model, opt, end, cfg, out, history)
    return {"losses": losses, "step_times": times, "peak_mb": peak, "end": end}


def _git_state() -> Optional[str]:
    """HEAD of the checkout this code was imported from ("+dirty" with uncommitted changes), or None."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return None
    return (sha + ("+dirty" if dirty else "")) or None


_GIT = _git_state()  # read when the code is imported: commits made while a run goes on do not relabel it


def _versions() -> dict:
    import transformers

    from .. import __version__

    return {"fastbridge": __version__, "git": _GIT, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _base_dir(cfg: TrainConfig, kind: str) -> Path:
    """Where the warmed-up base of this data / size / warm-up lives, shared by runs in sibling folders."""
    import hashlib

    key = json.dumps([kind, cfg.size, cfg.n_train, cfg.data_dir, cfg.coco_captions, cfg.coco_images, list(cfg.tasks),
                      cfg.warmup_lm_steps, cfg.warmup_vision_steps, cfg.lm_lr, cfg.batch_size, cfg.seed])
    return Path(cfg.out_dir).resolve().parent / f"base-{kind}-{cfg.size}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def warmup_language_model(lm_logits: Callable[[Tensor, Tensor], Tensor], params: list, tokenizer,
                          texts: Sequence[str], cfg: TrainConfig, device, amp) -> list:
    """Text-only causal-LM training (random-init bases only): the stand-in for a pretrained LM, which the
    bridge then learns to ground in the image. Trains ``params`` only; returns the loss history."""
    opt = torch.optim.AdamW(params, lr=cfg.lm_lr, weight_decay=0.0)
    hist = []
    for step, idx in _progress(_batches(len(texts), cfg.batch_size, cfg.seed + 1, 0, cfg.warmup_lm_steps),
                               cfg.warmup_lm_steps, "LM warm-up (text only)", cfg.progress):
        # an empty prompt: every token after [bos] is supervised, i.e. plain causal-LM labels
        ids, mask, labels = encode_batch(tokenizer, [Example(0, "", texts[i]) for i in idx], device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.warmup_lm_steps, cfg.lm_lr, max(1, cfg.warmup_lm_steps // 10))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = caption_loss(lm_logits(ids, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
    return hist


def warmup_vision(vision: nn.Module, tokenizer, train: SplitData, cfg: TrainConfig, device, amp) -> list:
    """CLIP-style contrastive image–caption training of a random-init vision encoder (random-init bases
    only): the stand-in for a pretrained image encoder (CLIP / EVA ViT), which the studies keep frozen.
    The text side is a bag of words, thrown away afterwards. Returns the loss history."""
    dim = 128
    width = vision.config.hidden_size
    with torch.random.fork_rng(devices=[]):  # the same heads whatever ran before in this process
        torch.manual_seed(cfg.seed + 2)
        text = nn.EmbeddingBag(len(tokenizer), dim, mode="mean").to(device)
        head = nn.Linear(width, dim).to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = [*vision.parameters(), *text.parameters(), *head.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.lm_lr, weight_decay=0.0)
    rows = list(range(len(train.image_ids)))
    rng = random.Random(cfg.seed + 2)
    hist = []
    vision.train()
    bs = max(2, min(cfg.batch_size * 2, len(rows)))
    for step, idx in _progress(_batches(len(rows), bs, cfg.seed + 2, 0, cfg.warmup_vision_steps),
                               cfg.warmup_vision_steps, "vision warm-up (contrastive)", cfg.progress):
        caps = [rng.choice(train.captions[train.image_ids[i]]) for i in idx]
        toks = [tokenizer.encode(c, add_special_tokens=False) or [tokenizer.unk_token_id] for c in caps]
        flat = torch.tensor([t for ts in toks for t in ts], device=device)
        offsets = torch.tensor([0] + [len(t) for t in toks[:-1]], device=device).cumsum(0)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.warmup_vision_steps, cfg.lm_lr, max(1, cfg.warmup_vision_steps // 10))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            img = head(vision(pixel_values=model_pixels(train.pixels, idx, device)).last_hidden_state.mean(1))
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(text(flat, offsets).float(), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(idx), device=device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
    return hist


def prepare(cfg: TrainConfig, log: Callable[[str], None] = logger.info) -> dict:
    """Data, tokenizer and the model with its frozen base.

    A random-init base gets its language model warmed up on text alone once (``warmup_lm_steps``) and
    cached in a ``base-*`` folder next to ``out_dir``: for the LLaMA-based bridges a LlamaForCausalLM
    checkpoint (``save_pretrained``) that every such bridge of the same size and data loads, for the BLIP
    adapter bridge the text decoder's weights. The tokenizer (built from the training text) lives there too.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from ..data import build_tokenizer
    from .models import build_language_model

    size = SIZES[cfg.size]
    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg, device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, val = load_data(cfg, size)
    log(f"data: {len(train.image_ids)} train / {len(val.image_ids)} val images, {len(train.questions)} / "
        f"{len(val.questions)} questions ({time.perf_counter() - t0:.1f}s)")
    texts = warmup_texts(train, cfg.tasks, cfg.seed)
    warm_hist: list = []
    if cfg.pretrained:
        tokenizer = AutoTokenizer.from_pretrained(cfg.pretrained)
        model = build_model(cfg.bridge, tokenizer, size=size, pretrained=cfg.pretrained, seed=cfg.seed)
        return dict(size=size, device=device, amp=amp, out=out, train=train, val=val, tokenizer=tokenizer,
                    model=model.to(device), warmup_losses=warm_hist)
    kind = "blip" if cfg.bridge == "adapter" else "llama"
    base = _base_dir(cfg, kind)
    if (base / "tokenizer" / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
    else:
        tokenizer = build_tokenizer(texts)
        tokenizer.save_pretrained(base / "tokenizer")
    tokenizer.save_pretrained(out / "tokenizer")
    warm = cfg.warmup_lm_steps > 0
    hist_file = base / "warmup_losses.json"
    if kind == "llama":
        lm_dir = base / "lm"
        if warm and not (lm_dir / "config.json").exists():
            t0 = time.perf_counter()
            log(f"base: warming up the random-init LLaMA on text alone ({cfg.warmup_lm_steps:,} steps; once, "
                f"cached in {base})")
            lm = build_language_model(tokenizer, size, seed=cfg.seed).to(device).train()
            warm_hist = warmup_language_model(lambda i, m: lm(input_ids=i, attention_mask=m).logits,
                                              list(lm.parameters()), tokenizer, texts, cfg, device, amp)
            lm.save_pretrained(lm_dir)
            hist_file.write_text(json.dumps(warm_hist))
            log(f"base: LLaMA warmed up on text alone ({cfg.warmup_lm_steps} steps, loss {warm_hist[0]:.2f} -> "
                f"{warm_hist[-1]:.3f}, {time.perf_counter() - t0:.0f}s) -> {lm_dir}")
            del lm
        elif warm:
            log(f"base: warmed-up LLaMA from {lm_dir}")
        model = build_model(cfg.bridge, tokenizer, size=size, base_lm=str(lm_dir) if warm else None, seed=cfg.seed)
        model = model.to(device)
    else:
        model = build_model(cfg.bridge, tokenizer, size=size, seed=cfg.seed).to(device)
        dec = model.language_model
        names = [n for n, _ in dec.named_parameters() if ".adapter." not in n]
        base_file = base / "text_decoder.safetensors"
        if warm and base_file.exists():
            sd = load_file(str(base_file), device=str(device))
            if sorted(sd) != sorted(names):
                raise RuntimeError(f"{base_file} does not match this model; delete the folder {base}")
            dec.load_state_dict(sd, strict=False)
            log(f"base: warmed-up BLIP text decoder from {base_file}")
        elif warm:
            t0 = time.perf_counter()
            log(f"base: warming up the random-init BLIP text decoder on text alone ({cfg.warmup_lm_steps:,} steps; "
                f"once, cached in {base})")
            model.train()
            params = dict(dec.named_parameters())
            warm_hist = warmup_language_model(model.lm_logits, [params[n] for n in names], tokenizer, texts, cfg,
                                              device, amp)
            save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(base_file))
            hist_file.write_text(json.dumps(warm_hist))
            log(f"base: BLIP text decoder warmed up on text alone ({cfg.warmup_lm_steps} steps, loss "
                f"{warm_hist[0]:.2f} -> {warm_hist[-1]:.3f}, {time.perf_counter() - t0:.0f}s) -> {base_file}")
    if warm and not warm_hist and hist_file.exists():
        warm_hist = json.loads(hist_file.read_text())
    vision_hist = _prepare_vision(model, tokenizer, train, cfg, base, device, amp, log)
    return dict(size=size, device=device, amp=amp, out=out, train=train, val=val, tokenizer=tokenizer,
                model=model, warmup_losses=warm_hist, vision_warmup_losses=vision_hist)


def _prepare_vision(model: BridgeModel, tokenizer, train: SplitData, cfg: TrainConfig, base: Path, device, amp,
                    log) -> list:
    """Warm up (or load the cached warm-up of) the random-init vision encoder; see warmup_vision."""
    from safetensors.torch import load_file, save_file

    if cfg.warmup_vision_steps <= 0:
        return []
    vision = model.vision_tower
    name = type(vision).__name__
    f, hist_file = base / f"vision-{name}.safetensors", base / f"vision-{name}-losses.json"
    if f.exists():
        vision.load_state_dict(load_file(str(f), device=str(device)), strict=True)
        log(f"base: pretrained-stand-in {name} from {f}")
        return json.loads(hist_file.read_text()) if hist_file.exists() else []
    t0 = time.perf_counter()
    log(f"base: training the random-init {name} contrastively ({cfg.warmup_vision_steps:,} steps; once, cached in "
        f"{base})")
    hist = warmup_vision(vision, tokenizer, train, cfg, device, amp)
    save_file({k: v.detach().cpu().contiguous() for k, v in vision.state_dict().items()}, str(f))
    hist_file.write_text(json.dumps(hist))
    log(f"base: {name} trained contrastively on image-caption pairs ({cfg.warmup_vision_steps} steps, loss "
        f"{hist[0]:.2f} -> {hist[-1]:.3f}, {time.perf_counter() - t0:.0f}s) -> {f}")
    return hist


def run(cfg: TrainConfig, *, prepared: Optional[dict] = None, log: Callable[[str], None] = logger.info,
        eval_before: bool = True) -> dict:
    """Train cfg.bridge and evaluate it before and after. Returns (and writes) the metrics dict."""
    import fastbridge

    p = prepared if prepared is not None else prepare(cfg, log)
    device, amp, out, tokenizer = p["device"], p["amp"], p["out"], p["tokenizer"]
    model: BridgeModel = p["model"]
    _seed_all(cfg.seed)
    model.freeze_for_bridge()
    if cfg.patched:
        fastbridge.patch(model)  # logs its report (what will run) once on the "fastbridge" logger
        report = model.fastbridge_report
    else:
        fastbridge.unpatch(model)
        report = None
        log("fastbridge.unpatch: training the eager baseline")
    n_train = sum(p_.numel() for _, p_ in model.trainable_parameters())
    n_all = sum(p_.numel() for p_ in model.parameters())
    log(f"{cfg.bridge}: {n_train:,} trainable of {n_all:,} parameters ({100 * n_train / n_all:.1f}%)")

    start, opt_state, history = 0, None, {}
    if cfg.resume:
        start, opt_state, history = load_checkpoint(model, cfg, out)
        log(f"resumed from {out / CHECKPOINT} at step {start}" if start else
            f"resume: no checkpoint in {out}, starting at step 0")

    fastbridge.reset_stats()
    if start == 0:
        before = evaluate(model, tokenizer, p["val"], cfg, device, amp, log, what="before") if eval_before else None
    else:
        before = history.get("before")  # scored when the run started
    last = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    every = f"every {cfg.save_every:,} steps, " if cfg.save_every else ""
    log(f"train {cfg.bridge}: steps {start + 1:,}..{last:,} of {cfg.steps:,}, {cfg.batch_size} examples each; "
        f"checkpoints {every}at the end and on Ctrl-C")
    res = train_bridge(model, tokenizer, p["train"], cfg, device, amp, out, start, opt_state,
                       history={**history, "before": before})
    after = evaluate(model, tokenizer, p["val"], cfg, device, amp, log, what="after")
    times = res["step_times"][min(5, len(res["step_times"]) // 4):]
    step_s = _median(times)
    metrics = {
        "config": asdict(cfg), "versions": _versions(), "patch": dict(report.counts) if report else {},
        "trainable_params": n_train, "total_params": n_all,
        "before": before, "after": after,
        "losses": res["losses"], "warmup_losses": p.get("warmup_losses", []),
        "vision_warmup_losses": p.get("vision_warmup_losses", []),
        "step_ms_median": None if not times else 1e3 * step_s,
        "steps_per_s": None if not times else 1.0 / step_s,
        "samples_per_s": None if not times else cfg.batch_size / step_s,
        "timed_steps": len(times), "peak_mb": res["peak_mb"], "resumed_from_step": start, "last_step": res["end"],
        "calls": fastbridge.stats(model).as_dict(),  # what each call ran: fused / reference / fallback
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    from .plots import plot_losses

    first = res["end"] - len(res["losses"])  # 0, unless an older checkpoint had no loss history
    plot_losses({cfg.bridge: res["losses"]}, out / "loss.png", title=f"{cfg.bridge} bridge training loss",
                resumed_at=start or None, offset=first)
    return metrics


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    flat, meta = {}, {"param_groups": sd["param_groups"], "steps": {}}
    for k, st in sd["state"].items():
        for name, v in st.items():
            if name == "step":
                meta["steps"][str(k)] = float(v)
            else:
                flat[f"{k}.{name}"] = v.detach().cpu().contiguous()
    return flat, meta


def _unflatten_optimizer(flat: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in flat.items():
        k, name = key.split(".", 1)
        state.setdefault(int(k), {})[name] = v
    for k, s in meta["steps"].items():
        state.setdefault(int(k), {})["step"] = torch.tensor(s)
    return {"state": state, "param_groups": meta["param_groups"]}


def compare(cfg: TrainConfig, log: Callable[[str], None] = logger.info) -> dict:
    """Train eager (unpatched) and fastbridge (patched) from the same seed and base; compare them."""
    import copy

    prepared = prepare(cfg, log)
    base_state = copy.deepcopy(prepared["model"].state_dict())
    runs = {}
    for name, patched in (("eager", False), ("fastbridge", True)):
        sub = replace(cfg, patched=patched, out_dir=str(Path(cfg.out_dir) / name), resume=False)
        Path(sub.out_dir).mkdir(parents=True, exist_ok=True)
        model = prepared["model"]
        model.load_state_dict(base_state)
        # the model before training is the same for both (and so are its outputs): score it once
        runs[name] = run(sub, prepared={**prepared, "out": Path(sub.out_dir)}, log=log, eval_before=not runs)
    runs["fastbridge"]["before"] = runs["eager"]["before"]
    (Path(cfg.out_dir) / "fastbridge" / "metrics.json").write_text(json.dumps(runs["fastbridge"], indent=1))
    e, f = runs["eager"], runs["fastbridge"]
    diffs = [abs(a - b) for a, b in zip(e["losses"], f["losses"])]
    agreement = {
        "loss_max_abs_diff": max(diffs) if diffs else 0.0,
        "loss_final": {"eager": e["losses"][-1] if e["losses"] else None,
                       "fastbridge": f["losses"][-1] if f["losses"] else None},
        "metrics": {k: {"eager": e["after"].get(k), "fastbridge": f["after"].get(k)} for k in ("caption", "vqa")
                    if k in e["after"]},
        "step_ms_median": {"eager": e["step_ms_median"], "fastbridge": f["step_ms_median"]},
        # a speed-up from a handful of steps is noise (first-call compilation, caches): none below MIN_TIMED_STEPS
        "speedup": (e["step_ms_median"] / f["step_ms_median"])
        if min(e["timed_steps"], f["timed_steps"]) >= MIN_TIMED_STEPS else None,
        "peak_mb": {"eager": e["peak_mb"], "fastbridge": f["peak_mb"]},
        "patch": f["patch"],
    }
    result = {"config": asdict(cfg), "versions": e["versions"], "comparison": agreement}
    out = Path(cfg.out_dir)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    from .plots import plot_compare

    plot_compare(e, f, out / "compare.png", title=f"{cfg.bridge}: eager vs fastbridge")
    return result
