"""VQA accuracy exactly as the official VQA evaluation computes it.

Reproduces ``VQAEval.evaluate`` of the official evaluation code (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``), answer normalisation included:

* the predicted answer: ``'\\n'``/``'\\t'`` -> ``' '``, ``strip()``, then ``processPunctuation``
  followed by ``processDigitArticle`` (lower case, number words "none"/"zero".."ten" -> digits,
  articles a/an/the dropped, missing apostrophes restored: "dont" -> "don't", ...). That is
  :func:`normalize_answer`.
* the ground-truth answers: ``processPunctuation`` only, and only when the annotators did *not* all
  give the same string (``len(set(gtAnswers)) > 1``); otherwise they are compared as given. The
  official annotations are already lower-cased, with digits and without articles, which is why the
  official code does no more; pass ground truth in that form (as in the VQA v2 / OK-VQA /
  TextVQA / VizWiz annotation files).
* accuracy of a question: the mean over the leave-one-annotator-out subsets of
  ``min(1, #matches among the other answers / 3)``. With the usual 10 answers: 1 match -> 0.3,
  2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

Numbers are in percent (0..100), like the official ``accuracy`` dict; the official code also
rounds them to 2 decimals for display, which is left to the caller here.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Hashable, Mapping, Sequence

from ._common import check_same_ids, describe_ids

__all__ = ["normalize_answer", "vqa_accuracy", "process_punctuation", "process_digit_article"]

# ---------------------------------------------------------------------------------------------
# Tables of the official vqaEval.py, verbatim.
# ---------------------------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
         ",", "?", "!"]
# Verbatim, quirks included: "(?!<=\d)" is a negative *lookahead* for the text "<=" + digit (the
# author meant a lookbehind), and the official call passes re.UNICODE (== 32) positionally as the
# *count*, so at most 32 periods are removed. Both are reproduced.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official ``VQAEval.processPunctuation``."""
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``VQAEval.processDigitArticle``."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """Normalise an answer the way the official VQA evaluation normalises a predicted answer.

    ``"Yes."`` -> ``"yes"``, ``"Two"`` -> ``"2"``, ``"the dog"`` -> ``"dog"``, ``"dont"`` ->
    ``"don't"``.
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_answer expects a str, got {type(s).__name__}")
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(s))


def _question_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """Accuracy (0..1) of one question, following VQAEval.evaluate line by line."""
    res_ans = normalize_answer(pred)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):  # leave annotator i out
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res_ans)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def vqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]], *,
                 answer_types: Mapping[Hashable, str] | None = None) -> dict:
    """Official VQA accuracy of ``predictions`` against the annotators' ``answers``.

    Args:
        predictions: question id -> predicted answer (raw model output; normalised here with
            :func:`normalize_answer`, as the official code does).
        answers: question id -> the annotators' answers (10 for VQA v2), as in the annotation
            files. They are *not* fully normalised (see the module docstring): only their
            punctuation is processed, and only when they disagree -- as the official code does.
        answer_types: optional question id -> answer type ("yes/no", "number", "other") for the
            per-type breakdown.

    Returns:
        ``{"overall": float, "per_answer_type": {type: float}, "per_question": {qid: float},
        "n": int}``; accuracies in percent (0..100), unrounded.
    """
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions must be a mapping question id -> answer str, got "
                        f"{type(predictions).__name__}")
    if not isinstance(answers, Mapping):
        raise TypeError(f"answers must be a mapping question id -> sequence of answer str, got "
                        f"{type(answers).__name__}")
    if not answers:
        raise ValueError("answers is empty: nothing to evaluate")
    check_same_ids(predictions, answers, truth_name="answers", unit="question id", no_entry="no entry in answers")
    if answer_types is not None:
        if not isinstance(answer_types, Mapping):
            raise TypeError(f"answer_types must be a mapping question id -> type str, got "
                            f"{type(answer_types).__name__}")
        missing = [q for q in answers if q not in answer_types]
        if missing:
            raise ValueError(f"answer_types is missing {len(missing)} question id(s): "
                             f"{describe_ids(missing)}")

    per_question: dict = {}
    by_type: dict[str, list[float]] = {}
    unusual = 0
    for qid, gt in answers.items():
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{qid!r}] must be a str, got {type(pred).__name__}")
        if isinstance(gt, (str, bytes)) or not isinstance(gt, Sequence):
            raise TypeError(f"answers[{qid!r}] must be a sequence of str (the annotators' answers), "
                            f"got {type(gt).__name__}")
        if len(gt) == 0:
            raise ValueError(f"answers[{qid!r}] is empty: a question needs at least one answer")
        for k, a in enumerate(gt):
            if not isinstance(a, str):
                raise TypeError(f"answers[{qid!r}][{k}] must be a str, got {type(a).__name__}")
        if len(gt) != 10:
            unusual += 1
        acc = 100.0 * _question_accuracy(pred, gt)
        per_question[qid] = acc
        if answer_types is not None:
            t = answer_types[qid]
            if not isinstance(t, str):
                raise TypeError(f"answer_types[{qid!r}] must be a str, got {type(t).__name__}")
            by_type.setdefault(t, []).append(acc)
    if unusual:
        warnings.warn(f"vqa_accuracy: {unusual} question(s) do not have 10 answers; the official "
                      f"formula (leave-one-out mean of min(1, matches/3)) is applied as is, so e.g. a "
                      f"question with a single answer always scores 0", stacklevel=2)
    n = len(per_question)
    return {
        "overall": sum(per_question.values()) / n,
        "per_answer_type": {t: sum(v) / len(v) for t, v in by_type.items()},
        "per_question": per_question,
        "n": n,
    }
