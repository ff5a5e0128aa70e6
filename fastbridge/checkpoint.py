"""save_trainable / load_trainable: only the trained bridge, in a safetensors file."""
from __future__ import annotations

import os

import torch
from torch import nn

FORMAT = "fastbridge.trainable"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters with requires_grad, keyed by their names in model.named_parameters()."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Write only the parameters with requires_grad to a safetensors file; returns {name: numel}."""
    from safetensors.torch import save_file

    from . import __version__

    state = trainable_state(model)
    if not state:
        raise ValueError("fastbridge.save_trainable: 'model' has no parameter with requires_grad=True")
    tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in state.items()}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "fastbridge": __version__})
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
