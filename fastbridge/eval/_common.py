"""Checks shared by the caption and VQA scorers."""
from __future__ import annotations

from typing import Mapping


def describe_ids(ids: list, limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def check_same_ids(predictions: Mapping, truth: Mapping, *, truth_name: str, unit: str, no_entry: str) -> None:
    """predictions must hold exactly the ids of ``truth``: the error names the missing / extra ids."""
    missing = [k for k in truth if k not in predictions]
    if missing:
        raise ValueError(f"predictions is missing {len(missing)} {unit}(s) that {truth_name} has: "
                         f"{describe_ids(missing)}")
    extra = [k for k in predictions if k not in truth]
    if extra:
        raise ValueError(f"predictions has {len(extra)} {unit}(s) with {no_entry}: {describe_ids(extra)}")
