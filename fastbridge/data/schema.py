"""The two task schemas every loader returns, so a trainer never cares where the data came from.

caption rows: image (datasets.Image), image_id (int64), captions (list[str])
vqa rows:     image, image_id, question_id (int64), question (str), answers (list[str]; 10 for VQAv2,
              empty when the split has no annotations), multiple_choice_answer (str or None),
              answer_type ("yes/no" | "number" | "other", or None)

``datasets`` is an optional extra: it is imported only when a schema is asked for.
"""
from __future__ import annotations

CAPTION_COLUMNS = ("image", "image_id", "captions")
VQA_COLUMNS = ("image", "image_id", "question_id", "question", "answers", "multiple_choice_answer", "answer_type")
ANSWER_TYPES = ("yes/no", "number", "other")


def caption_features(*, decode: bool = True):
    """datasets.Features of a caption row (``decode=False`` keeps images as {path, bytes})."""
    from datasets import Features, Image, List, Value

    return Features({"image": Image(decode=decode), "image_id": Value("int64"), "captions": List(Value("string"))})


def vqa_features(*, decode: bool = True):
    """datasets.Features of a VQA row (one row per question)."""
    from datasets import Features, Image, List, Value

    return Features({
        "image": Image(decode=decode), "image_id": Value("int64"), "question_id": Value("int64"),
        "question": Value("string"), "answers": List(Value("string")),
        "multiple_choice_answer": Value("string"), "answer_type": Value("string"),
    })


def require_datasets(fn: str):
    """Import ``datasets`` or raise an ImportError that says which extra to install."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is installed in the dev environment
        raise ImportError(f"fastbridge.data.{fn} needs the 'datasets' package: pip install datasets") from e
    return datasets
