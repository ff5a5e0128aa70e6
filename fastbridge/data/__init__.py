"""Data for training and evaluating vision-language bridges, offline.

- ``make_synthetic`` / ``load_synthetic``: a deterministic captioning + VQA set of rendered shapes,
  written as a Hugging Face imagefolder; ``caption_view`` / ``vqa_view`` turn it into task rows.
- ``load_coco_captions`` / ``load_vqav2``: COCO captions (Karpathy or official files) and VQAv2 from
  disk, in the same row schemas (``fastbridge.data.schema``).
- ``build_tokenizer`` / ``synthetic_texts``: a word-level Hugging Face tokenizer for a corpus.

Importing this package imports neither ``datasets`` nor ``transformers``; the functions do when called.
"""
from .coco import load_coco_captions, load_vqav2
from .schema import ANSWER_TYPES, CAPTION_COLUMNS, VQA_COLUMNS, caption_features, vqa_features
from .synthetic import (
    caption_view, load_synthetic, make_synthetic, most_common_answer, read_metadata, render_example,
    synthetic_features, synthetic_texts, vqa_view,
)
from .tokenizer import build_tokenizer

__all__ = [
    "make_synthetic", "load_synthetic", "caption_view", "vqa_view", "read_metadata", "render_example",
    "synthetic_features", "synthetic_texts", "most_common_answer",
    "load_coco_captions", "load_vqav2",
    "build_tokenizer",
    "caption_features", "vqa_features", "CAPTION_COLUMNS", "VQA_COLUMNS", "ANSWER_TYPES",
]
