"""Evaluation of vision-language bridges: COCO caption metrics and VQA accuracy, offline.

* :func:`caption_metrics` -- BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when it can run)
  computed by pycocoevalcap itself, as the COCO caption evaluation does. Needs the optional
  ``pycocoevalcap`` dependency (``pip install "fastbridge[eval]"``), imported only when called,
  and Java for the official tokenizer and METEOR (without Java: a pure-Python tokenizer, no
  METEOR).
* :func:`vqa_accuracy` / :func:`normalize_answer` -- the official VQA accuracy and answer
  normalisation, pure Python.
"""
from .captions import (
    COCO_METRIC_NAMES,
    DEFAULT_METRICS,
    METRICS,
    CaptionScores,
    JavaInfo,
    caption_metrics,
    java_available,
    java_info,
    python_ptb_tokenize,
)
from .vqa import normalize_answer, vqa_accuracy

__all__ = [
    "caption_metrics", "CaptionScores", "METRICS", "DEFAULT_METRICS", "COCO_METRIC_NAMES",
    "java_available", "java_info", "JavaInfo", "python_ptb_tokenize",
    "vqa_accuracy", "normalize_answer",
]
