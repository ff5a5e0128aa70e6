"""COCO captions and VQAv2 from their standard files on disk, as the task rows of ``fastbridge.data.schema``.

Nothing is downloaded: point the loaders at files you have. Image files are checked to exist up front
(one directory listing per folder, no image is opened); they are decoded lazily by ``datasets``.

    load_coco_captions("dataset_coco.json", "coco/", split="train")           # Karpathy split file
    load_coco_captions("annotations/captions_val2014.json", "coco/val2014")   # official COCO file
    load_vqav2("v2_OpenEnded_mscoco_val2014_questions.json",
               "v2_mscoco_val2014_annotations.json", "coco/val2014")
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

from .schema import caption_features, require_datasets, vqa_features

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def _read_json(fn: str, arg: str, value):
    """The parsed json of file ``value`` (a path), or ``value`` itself when it is already a dict."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{fn}: {arg} must be a path to a json file (or its parsed dict), got {type(value).__name__}")
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{fn}: {arg} file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn}: {arg} file {str(path)!r} is not valid json ({e})") from e


def _check_dir(fn: str, arg: str, value) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{fn}: {arg} must be a path to a directory, got {type(value).__name__}")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{fn}: {arg} {str(path)!r} is not a directory")
    return path.resolve()


class _Files:
    """Existence checks by listing each directory once (fast for 100k-image folders)."""

    def __init__(self):
        self._listing: dict = {}

    def exists(self, path: Path) -> bool:
        parent = path.parent
        if parent not in self._listing:
            try:
                self._listing[parent] = set(os.listdir(parent))
            except (FileNotFoundError, NotADirectoryError):
                self._listing[parent] = set()
        return path.name in self._listing[parent]


def _missing_error(fn: str, missing: list, total: int, hint: str) -> FileNotFoundError:
    shown = ", ".join(repr(str(p)) for p in missing[:3])
    return FileNotFoundError(f"{fn}: {len(missing)} of {total} images are missing under images_dir (e.g. {shown}); "
                             f"{hint}")


def _dataset(features, columns: dict):
    datasets = require_datasets("coco")
    return datasets.Dataset.from_dict(columns, features=features)


def load_coco_captions(annotations, images_dir, *, split: str | None = None):
    """COCO captions as a datasets.Dataset of caption rows (image, image_id, captions).

    ``annotations``: the Karpathy split file (``dataset_coco.json``; ``split`` in train | restval | val |
    test picks one split, "train" including restval as usual) or an official COCO captions file
    (``captions_<subset>.json``; ``split`` must be None, the file is one split). ``images_dir``: the
    folder holding the images -- for the Karpathy file either the COCO root (with ``train2014/`` and
    ``val2014/``, the entries' ``filepath``) or one flat folder. Images without captions are left out.
    """
    fn = "load_coco_captions"
    data = _read_json(fn, "annotations", annotations)
    root = _check_dir(fn, "images_dir", images_dir)
    if split is not None and not isinstance(split, str):
        raise ValueError(f"{fn}: split must be a str or None, got {type(split).__name__}")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{fn}: annotations is neither a Karpathy split file (dataset_coco.json: "
                         "{'images': [{'filename', 'split', 'sentences', ...}]}) nor an official COCO captions file "
                         "(captions_*.json: {'images': [...], 'annotations': [{'image_id', 'caption'}]})")
    files = _Files()
    paths, ids, caps, missing = [], [], [], []
    if "annotations" in data:  # official COCO
        if split is not None:
            raise ValueError(f"{fn}: split={split!r} applies only to the Karpathy split file; an official COCO "
                             "captions file is already one split (pass split=None)")
        by_image: dict = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
        known = {img["id"] for img in images}
        stray = [i for i in by_image if i not in known]
        if stray:
            raise ValueError(f"{fn}: annotations has captions for image_id(s) {stray[:3]} that are not in its "
                             "'images' list")
        for img in images:
            if not by_image.get(img["id"]):
                continue
            path = root / img["file_name"]
            if not files.exists(path):
                missing.append(path)
            paths.append(str(path))
            ids.append(int(img["id"]))
            caps.append(by_image[img["id"]])
        hint = "images_dir must be the folder holding the file_name entries (e.g. coco/val2014)"
    elif all(isinstance(img, dict) and "sentences" in img for img in images):  # Karpathy
        wanted = None
        if split is not None:
            aliases = {"train": {"train", "restval"}, "restval": {"restval"}, "val": {"val"}, "validation": {"val"},
                       "test": {"test"}}
            if split not in aliases:
                raise ValueError(f"{fn}: split must be one of {KARPATHY_SPLITS} (or None for all), got {split!r}")
            wanted = aliases[split]
        for img in images:
            if wanted is not None and img.get("split") not in wanted:
                continue
            captions = [s["raw"].strip() if "raw" in s else " ".join(s["tokens"]) for s in img["sentences"]]
            if not captions:
                continue
            candidates = ([root / img["filepath"] / img["filename"]] if img.get("filepath") else []) + \
                [root / img["filename"]]
            path = next((c for c in candidates if files.exists(c)), None)
            if path is None:
                missing.append(candidates[0])
                path = candidates[0]
            paths.append(str(path))
            ids.append(int(img["cocoid"] if "cocoid" in img else img["imgid"]))
            caps.append(captions)
        if not paths:
            raise ValueError(f"{fn}: annotations has no images with captions"
                             + (f" in split {split!r}" if split is not None else ""))
        hint = ("images_dir must be the COCO root holding the entries' filepath folders (train2014/, val2014/) "
                "or the one folder holding all the files")
    else:
        raise ValueError(f"{fn}: annotations has an 'images' list but neither 'annotations' (official COCO "
                         "captions) nor 'sentences' in every image (Karpathy split file)")
    if missing:
        raise _missing_error(fn, missing, len(paths), hint)
    return _dataset(caption_features(), {"image": paths, "image_id": ids, "captions": caps})


def _subset_of(data_subtype):
    """Image folder subset of a VQAv2 data_subtype: test-dev2015 questions use test2015 images."""
    if isinstance(data_subtype, str) and data_subtype.startswith("test-dev"):
        return "test" + data_subtype[len("test-dev"):]
    return data_subtype


def load_vqav2(questions, annotations, images_dir, *, image_pattern: str = "COCO_{subset}_{image_id:012d}.jpg"):
    """VQAv2 as a datasets.Dataset of VQA rows, one per question (image, image_id, question_id, question,
    answers, multiple_choice_answer, answer_type).

    ``questions``: ``v2_OpenEnded_mscoco_<subset>_questions.json``; ``annotations``:
    ``v2_mscoco_<subset>_annotations.json`` or None for splits without answers (test, test-dev: then
    answers is [] and multiple_choice_answer / answer_type are None). ``images_dir``: the folder of the
    images, named by ``image_pattern`` ({subset} is the questions file's data_subtype, test-dev -> test).
    """
    fn = "load_vqav2"
    qdata = _read_json(fn, "questions", questions)
    if not isinstance(qdata, dict) or not isinstance(qdata.get("questions"), list):
        raise ValueError(f"{fn}: questions is not a VQAv2 questions file (expected {{'data_subtype': ..., "
                         "'questions': [{'image_id', 'question', 'question_id'}]}})")
    by_qid = None
    if annotations is not None:
        adata = _read_json(fn, "annotations", annotations)
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise ValueError(f"{fn}: annotations is not a VQAv2 annotations file (expected {{'annotations': "
                             "[{'question_id', 'image_id', 'answers', 'multiple_choice_answer', 'answer_type'}]}})")
        by_qid = {a["question_id"]: a for a in adata["annotations"]}
    root = _check_dir(fn, "images_dir", images_dir)
    if not isinstance(image_pattern, str):
        raise ValueError(f"{fn}: image_pattern must be a str, got {type(image_pattern).__name__}")
    fields = {f for _, f, _, _ in string.Formatter().parse(image_pattern) if f is not None}
    if "image_id" not in fields or not fields <= {"image_id", "subset"}:
        raise ValueError(f"{fn}: image_pattern must use {{image_id}} (and may use {{subset}}) and nothing else, "
                         f"got {image_pattern!r}")
    subset = _subset_of(qdata.get("data_subtype"))
    if "subset" in fields and not subset:
        raise ValueError(f"{fn}: image_pattern uses {{subset}} but questions has no 'data_subtype'; pass an "
                         "image_pattern without it")

    files = _Files()
    cols = {k: [] for k in ("image", "image_id", "question_id", "question", "answers", "multiple_choice_answer",
                            "answer_type")}
    missing, path_of = [], {}
    for q in qdata["questions"]:
        image_id, qid = int(q["image_id"]), int(q["question_id"])
        if image_id not in path_of:
            path = root / image_pattern.format(subset=subset, image_id=image_id)
            if not files.exists(path):
                missing.append(path)
            path_of[image_id] = str(path)
        if by_qid is not None:
            a = by_qid.get(q["question_id"])
            if a is None:
                raise ValueError(f"{fn}: annotations has no entry for question_id {qid} of questions "
                                 "(are they files of the same subset?)")
            if int(a["image_id"]) != image_id:
                raise ValueError(f"{fn}: question_id {qid} has image_id {image_id} in questions but "
                                 f"{a['image_id']} in annotations")
            answers = [x["answer"] for x in a["answers"]]
            mca, answer_type = a.get("multiple_choice_answer"), a.get("answer_type")
        else:
            answers, mca, answer_type = [], None, None
        cols["image"].append(path_of[image_id])
        cols["image_id"].append(image_id)
        cols["question_id"].append(qid)
        cols["question"].append(q["question"])
        cols["answers"].append(answers)
        cols["multiple_choice_answer"].append(mca)
        cols["answer_type"].append(answer_type)
    if missing:
        example = image_pattern.format(subset=subset, image_id=12345) if subset or "subset" not in fields else ""
        raise _missing_error(fn, missing, len(path_of), f"images_dir must hold files named by image_pattern "
                                                        f"{image_pattern!r} (e.g. {example!r})")
    return _dataset(vqa_features(), cols)
