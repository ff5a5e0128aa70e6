"""save_trainable / load_trainable: only the trained bridge, in a safetensors file."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

FORMAT = "fastbridge.trainable"
# Tests only: a file path. Set, every atomic write creates that file once its temporary file is written and
# then sleeps instead of finishing, so a test can kill the process in the middle of a checkpoint write.
_TEST_PAUSE_ENV = "FASTBRIDGE_TEST_PAUSE_IN_WRITE"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` writes a temporary file next to it, which then replaces
    ``path`` in one ``os.replace``. A crash or kill at any moment leaves either the previous file or the
    new one, never a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        marker = os.environ.get(_TEST_PAUSE_ENV)
        if marker:
            Path(marker).write_text(str(tmp))
            time.sleep(3600)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad, keyed by their names in model.named_parameters()."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write only the parameters with requires_grad to a safetensors file; returns {name: numel}.

    The write is atomic (a temporary file, then os.replace): an interrupted save leaves the previous file.
    """
    from safetensors.torch import save_file

    from . import __version__

    state = trainable_state(model)
    if not state:
        raise ValueError("fastbridge.save_trainable: 'model' has no parameter with requires_grad=True")
    tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, "fastbridge": __version__}))
    return {n: t.numel() for n, t in tensors.items()}


def load_trainable(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a save_trainable file into ``model`` in place (strict about names and shapes)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"fastbridge.load_trainable: no file at 'path' = {path!r}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"fastbridge.load_trainable: {path!r} was not written by fastbridge.save_trainable "
                             f"(metadata format {meta.get('format')!r}, expected {FORMAT!r})")
        saved = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(model.named_parameters())
    trainable = trainable_state(model)
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    mismatched = [f"{k}: file {tuple(saved[k].shape)} vs model {tuple(params[k].shape)}"
                  for k in saved if k in params and saved[k].shape != params[k].shape]
    problems = []
    if missing:
        problems.append(f"trainable parameters missing from the file: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"names in the file that the model does not have: {unexpected[:8]}"
                        f"{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"shape mismatches: {mismatched[:8]}")
    if problems:
        raise ValueError(f"fastbridge.load_trainable({path!r}): " + "; ".join(problems))
    with torch.no_grad():
        for k, t in saved.items():
            params[k].copy_(t.to(device=params[k].device, dtype=params[k].dtype))
    return model
