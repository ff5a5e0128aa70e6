"""fastbridge.eval: COCO caption metrics through pycocoevalcap, and the official VQA accuracy.

The caption numbers are checked against pycocoevalcap's own COCOEvalCap run on the same data in
the same test (not against hard-coded values), so the test proves the official pipeline is used.
METEOR's JVM needs ~8 s to load its paraphrase table, so it runs in one test only.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fastbridge.eval import (
    COCO_METRIC_NAMES,
    CaptionScores,
    caption_metrics,
    java_available,
    normalize_answer,
    python_ptb_tokenize,
    vqa_accuracy,
)
from fastbridge.eval import captions as C

pytest.importorskip("pycocoevalcap.bleu.bleu")

HAS_JAVA = C._probe_java().available
needs_java = pytest.mark.skipif(not HAS_JAVA, reason=f"no runnable Java: {C._probe_java().reason}")

REFS = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave!",
        "a person surfing in the ocean"],
    2: ["Two giraffes standing next to each other in a field", "giraffes in the grass.",
        "Two tall giraffes, side by side."],
    3: ["A kitchen with a stove, a sink, and a refrigerator", "An empty kitchen.",
        "a small kitchen with white appliances"],
    4: ["A cat laying on a bed.", "The cat's sleeping on the bed", "a cat that is laying down on a bed"],
    5: ["A red double-decker bus on a city street.", "a bus (red) driving down the road", "A big red bus."],
}
PREDS = {1: "A man surfing a wave.", 2: "two giraffes in a field", 3: "", 4: "A cat sleeping on a bed.",
         5: "a red bus on the street"}
FAST = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]  # no JVM beyond the tokenizer


@pytest.fixture(autouse=True)
def _no_java_override(monkeypatch):
    """Tests pick the Java path themselves: ignore a FASTBRIDGE_JAVA set in the caller's environment."""
    monkeypatch.delenv("FASTBRIDGE_JAVA", raising=False)


def _meteor_children() -> list[int]:
    """Live child processes of this test process running METEOR."""
    found = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"meteor" in cmd:
            found.append(int(d))
    return found


def _cocoevalcap(preds, refs):
    """pycocoevalcap.eval.COCOEvalCap on the data, through a pycocotools COCO object (SPICE stubbed:
    it cannot run here, see test_spice_skipped_with_reason)."""
    COCO = pytest.importorskip("pycocotools.coco").COCO
    import pycocoevalcap.eval as ev

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    gt = COCO()
    anns = [(k, c) for k, v in refs.items() for c in v]
    gt.dataset = {"images": [{"id": k} for k in refs],
                  "annotations": [{"id": i, "image_id": k, "caption": c} for i, (k, c) in enumerate(anns)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        res = gt.loadRes([{"image_id": k, "caption": c} for k, c in preds.items()])
        e = ev.COCOEvalCap(gt, res)
        orig, ev.Spice = ev.Spice, NoSpice
        try:
            e.evaluate()
        finally:
            ev.Spice = orig
    return e


# ---------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------
@needs_java
def test_matches_cocoevalcap_including_meteor():
    msgs: list[str] = []
    ours = caption_metrics(PREDS, REFS, java=True, log=msgs.append)
    assert ours.tokenizer == "ptb" and ours.skipped == {} and ours.java
    assert list(ours.scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert any("PTBTokenizer tokenized" in m for m in msgs)  # the tokenizer's stderr goes to log
    assert _meteor_children() == [], "METEOR's JVM must be shut down after the call"

    official = _cocoevalcap(PREDS, REFS)
    for name, value in ours.scores.items():
        assert value == pytest.approx(official.eval[COCO_METRIC_NAMES[name]], rel=1e-12, abs=1e-15), name
        for img in REFS:
            assert ours.per_image[name][img] == pytest.approx(
                official.imgToEval[img][COCO_METRIC_NAMES[name]], rel=1e-12, abs=1e-15), (name, img)
    # the empty prediction scores 0 everywhere, METEOR included
    assert all(ours.per_image[m][3] == pytest.approx(0.0, abs=1e-6) for m in ours.scores)
    assert 0.0 < ours["METEOR"] < 1.0


@needs_java
def test_meteor_failure_is_skipped_not_faked(monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_mod

    monkeypatch.setattr(meteor_mod, "METEOR_JAR", "missing-meteor.jar")  # the JVM exits at once
    r = caption_metrics(PREDS, REFS, metrics=["METEOR", "BLEU-1"], log=lambda m: None)
    assert "METEOR" not in r.scores and "BLEU-1" in r.scores
    assert r.skipped["METEOR"].startswith("METEOR failed") and "missing-meteor.jar" in r.skipped["METEOR"]
    assert _meteor_children() == []


def test_perfect_predictions_beat_wrong_ones():
    perfect = {k: v[0] for k, v in REFS.items()}
    keys = list(REFS)
    wrong = {k: REFS[keys[(i + 1) % len(keys)]][0] for i, k in enumerate(keys)}  # another image's caption
    good = caption_metrics(perfect, REFS, metrics=FAST)
    bad = caption_metrics(wrong, REFS, metrics=FAST)
    assert good["BLEU-4"] > 0.99 and good["ROUGE-L"] > 0.99
    assert good["CIDEr"] > 1.0 > bad["CIDEr"]
    for m in FAST:
        assert good[m] > bad[m], m
    assert "METEOR" not in good.scores and "METEOR" not in good.skipped  # not requested


def test_no_java_path(monkeypatch):
    monkeypatch.setattr(C, "_announced", set())
    msgs: list[str] = []
    r = caption_metrics(PREDS, REFS, java=False, log=msgs.append)
    assert r.tokenizer == "python" and r.java is None
    assert "METEOR" not in r.scores and "java=False" in r.skipped["METEOR"]
    assert set(r.scores) == set(FAST)
    assert sum("Java not used" in m for m in msgs) == 1
    caption_metrics(PREDS, REFS, java=False, log=msgs.append)
    assert sum("Java not used" in m for m in msgs) == 1, "the no-Java notice is logged once"

    # FASTBRIDGE_JAVA=0 does the same
    monkeypatch.setenv("FASTBRIDGE_JAVA", "0")
    assert not java_available()
    r_env = caption_metrics(PREDS, REFS, log=msgs.append)
    assert r_env.tokenizer == "python" and "FASTBRIDGE_JAVA=0" in r_env.skipped["METEOR"]
    monkeypatch.delenv("FASTBRIDGE_JAVA")

    if HAS_JAVA:  # close to (here: equal to) the official PTB path on simple captions
        ptb = caption_metrics(PREDS, REFS, metrics=FAST, java=True)
        assert ptb.tokenizer == "ptb"
        for m in FAST:
            assert r.scores[m] == pytest.approx(ptb.scores[m], abs=1e-3), m


def test_java_missing_from_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    C._probe_java.cache_clear()
    try:
        assert not java_available()
        r = caption_metrics(PREDS, REFS, metrics=["BLEU-4", "METEOR"], spice=True, log=lambda m: None)
        assert r.tokenizer == "python" and "BLEU-4" in r.scores
        assert "no `java` executable on PATH" in r.skipped["METEOR"]
        assert "Java" in r.skipped["SPICE"]
        with pytest.raises(RuntimeError, match="Java is not available"):
            caption_metrics(PREDS, REFS, metrics=["BLEU-4"], java=True)
    finally:
        C._probe_java.cache_clear()


@needs_java
def test_python_tokenizer_matches_ptb_on_captions():
    sentences = [c for v in REFS.values() for c in v] + list(PREDS.values()) + [
        'A sign that reads "STOP".', "It's 5 p.m. at the U.S. border -- isn't it?", "Mr. Smith's dog (a pug)!",
        "a man's hat, a woman's bag; 1,000 birds: wow", "Kids' toys... everywhere", "A 3-D model/toy w/ lights"]
    official = C._ptb_tokenize(sentences, C._probe_java().path, lambda m: None)
    assert [python_ptb_tokenize(s) for s in sentences] == official


def test_line_breaks_inside_captions_do_not_shift_images():
    refs = {"a": ["a dog\ron grass", "a dog"], "b": ["a cat\u2028on a mat", "a cat"]}
    preds = {"a": "a dog\non grass", "b": "a cat on a mat"}
    r = caption_metrics(preds, refs, metrics=["BLEU-1"], log=lambda m: None)
    assert r.per_image["BLEU-1"]["a"] == pytest.approx(1.0) and r.per_image["BLEU-1"]["b"] == pytest.approx(1.0)


def test_spice_skipped_with_reason(monkeypatch):
    from pycocoevalcap.spice import get_stanford_models as gsm

    def no_download(*a, **k):
        raise AssertionError("SPICE must never trigger a download")

    monkeypatch.setattr(gsm, "urlretrieve", no_download)
    msgs: list[str] = []
    r = caption_metrics(PREDS, REFS, metrics=["CIDEr"], spice=True, log=msgs.append)
    assert "SPICE" not in r.scores and "SPICE" in r.skipped
    reason = r.skipped["SPICE"]
    info = C._probe_java()
    if info.available and info.major and info.major > 11:
        assert f"found Java {info.version}" in reason
    if not os.path.exists(os.path.join(C._pycocoevalcap_dir(), "spice", "lib", "stanford-corenlp-3.6.0.jar")):
        assert "stanford-corenlp-3.6.0.jar" in reason and "never downloads" in reason
    assert any("SPICE skipped" in m for m in msgs)
    assert caption_metrics(PREDS, REFS, metrics=["SPICE"], log=msgs.append).scores == {}


def test_empty_predictions_and_result_object():
    preds = {k: "" for k in REFS}
    r = caption_metrics(preds, REFS, metrics=FAST, log=lambda m: None)
    assert all(r[m] == pytest.approx(0.0, abs=1e-6) for m in FAST)
    assert isinstance(r, CaptionScores) and r.n_images == len(REFS)
    d = json.loads(json.dumps(r.to_dict()))
    assert set(d) >= {"scores", "per_image", "skipped", "tokenizer", "n_images"}
    assert d["per_image"]["CIDEr"]["1"] == 0.0
    assert "BLEU-4" in str(r)
    # COCOEvalCap names and "BLEU" are accepted in metrics
    r2 = caption_metrics(PREDS, REFS, metrics=["Bleu_4", "rouge_l"], java=False, log=lambda m: None)
    assert list(r2.scores) == ["BLEU-4", "ROUGE-L"]
    r3 = caption_metrics(PREDS, REFS, metrics="BLEU", java=False, log=lambda m: None)
    assert list(r3.scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    single = caption_metrics({1: "a dog"}, {1: ["a dog"]}, metrics=["CIDEr"], java=False, log=lambda m: None)
    assert single["CIDEr"] == 0.0 and any("single image" in n for n in single.notes)


@pytest.mark.parametrize("preds, refs, exc, match", [
    ({1: "a"}, {1: ["a"], 2: ["b"]}, ValueError, r"predictions is missing 1 image id.*\[2\]"),
    ({1: "a", 3: "c"}, {1: ["a"]}, ValueError, r"predictions has 1 image id.*no references.*\[3\]"),
    ({1: None}, {1: ["a"]}, TypeError, r"predictions\[1\] must be a str"),
    ({1: "a"}, {1: []}, ValueError, r"references\[1\] is empty"),
    ({1: "a"}, {1: "a dog"}, TypeError, r"references\[1\] must be a sequence"),
    ({1: "a"}, {1: ["a", 3]}, TypeError, r"references\[1\]\[1\] must be a str"),
    ({}, {}, ValueError, r"references is empty"),
    ({}, {1: ["a"]}, ValueError, r"predictions is empty"),
    (["a"], {1: ["a"]}, TypeError, r"predictions must be a mapping"),
])
def test_caption_validation(preds, refs, exc, match):
    with pytest.raises(exc, match=match):
        caption_metrics(preds, refs, java=False)


def test_unknown_metric():
    with pytest.raises(ValueError, match="metrics: unknown metric 'BLEU-5'"):
        caption_metrics(PREDS, REFS, metrics=["BLEU-5"], java=False)


def test_missing_pycocoevalcap_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
    with pytest.raises(ImportError, match=r'pip install "fastbridge\[eval\]"'):
        caption_metrics(PREDS, REFS, java=False)


def test_import_does_not_load_pycocoevalcap():
    code = ("import sys, fastbridge.eval, fastbridge.eval.captions, fastbridge.eval.vqa\n"
            "assert not [m for m in sys.modules if m.startswith('pycocoevalcap')], 'pycocoevalcap imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------
def _loo(k: int, n: int = 10) -> float:
    """Leave-one-annotator-out mean of min(1, matches/3) with k of n annotators matching."""
    return sum(min(1.0, (k - (i < k)) / 3) for i in range(n)) / n


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (10, 100.0)])
def test_vqa_soft_accuracy(k, expected):
    answers = ["dog"] * k + ["cat"] * (10 - k)
    r = vqa_accuracy({"q": "dog"}, {"q": answers})
    assert r["per_question"]["q"] == pytest.approx(expected)
    assert r["overall"] == pytest.approx(100 * _loo(k))
    assert r["n"] == 1


def test_normalize_answer():
    cases = {
        "Yes.": "yes", "Two": "2", "the dog": "dog", "A Dog": "dog", "an apple": "apple", "none": "0",
        "ten": "10", "dont": "don't", "whats": "what's", "  Red\tand\nwhite  ": "red and white",
        "1,000": "1000", "3.5": "3.5", "red, white": "red white", "hot-dog": "hot dog",
        "yes!": "yes", "left / right": "left right", "(dog)": "dog",
    }
    for raw, norm in cases.items():
        assert normalize_answer(raw) == norm, raw
    with pytest.raises(TypeError, match="normalize_answer expects a str"):
        normalize_answer(3)


def test_vqa_normalisation_in_matching():
    other = ["cat"] * 7
    answers = {
        "two": ["2"] * 3 + other,       # "two" -> "2"
        "article": ["dog"] * 3 + other,  # "the dog" -> "dog"
        "yes": ["yes"] * 3 + other,     # "Yes." -> "yes"
        "gt_punct": ["yes."] * 4 + other[:6],  # ground truth loses its punctuation when annotators disagree
    }
    preds = {"two": "two", "article": "the dog", "yes": "Yes.", "gt_punct": "yes"}
    r = vqa_accuracy(preds, answers)
    assert r["per_question"] == pytest.approx({"two": 90.0, "article": 90.0, "yes": 90.0, "gt_punct": 100.0})


def test_vqa_follows_official_quirks():
    # unanimous annotators: their answer is compared as given (official code normalises ground truth
    # only when the annotators disagree, and then only its punctuation)
    assert vqa_accuracy({"q": "dog"}, {"q": ["Dog"] * 10})["overall"] == 0.0
    assert vqa_accuracy({"q": "Dog"}, {"q": ["dog"] * 10})["overall"] == 100.0
    assert vqa_accuracy({"q": "two"}, {"q": ["two"] * 5 + ["2"] * 5})["overall"] == 100.0  # pred -> "2"
    assert vqa_accuracy({"q": "2"}, {"q": ["two"] * 5 + ["three"] * 5})["overall"] == 0.0
    # ... and the punctuation replaced by a space is not stripped again: "yes!" -> "yes " != "yes"
    assert vqa_accuracy({"q": "yes"}, {"q": ["yes!"] * 5 + ["no"] * 5})["overall"] == 0.0


def test_vqa_per_answer_type():
    answers = {1: ["yes"] * 10, 2: ["no"] * 10, 3: ["2"] * 2 + ["3"] * 8, 4: ["red"] * 10}
    preds = {1: "yes", 2: "yes", 3: "2", 4: "red"}
    types = {1: "yes/no", 2: "yes/no", 3: "number", 4: "other"}
    r = vqa_accuracy(preds, answers, answer_types=types)
    assert r["per_question"] == pytest.approx({1: 100.0, 2: 0.0, 3: 60.0, 4: 100.0})
    assert r["per_answer_type"] == pytest.approx({"yes/no": 50.0, "number": 60.0, "other": 100.0})
    assert r["overall"] == pytest.approx(65.0) and r["n"] == 4
    assert vqa_accuracy(preds, answers)["per_answer_type"] == {}


@pytest.mark.parametrize("preds, answers, kwargs, exc, match", [
    ({1: "a"}, {1: ["a"] * 10, 2: ["b"] * 10}, {}, ValueError, r"predictions is missing 1 question id.*\[2\]"),
    ({1: "a", 2: "b"}, {1: ["a"] * 10}, {}, ValueError, r"predictions has 1 question id.*\[2\]"),
    ({1: 3}, {1: ["a"] * 10}, {}, TypeError, r"predictions\[1\] must be a str"),
    ({1: "a"}, {1: []}, {}, ValueError, r"answers\[1\] is empty"),
    ({1: "a"}, {1: "a"}, {}, TypeError, r"answers\[1\] must be a sequence of str"),
    ({1: "a"}, {1: ["a", None]}, {}, TypeError, r"answers\[1\]\[1\] must be a str"),
    ({}, {}, {}, ValueError, r"answers is empty"),
    ({1: "a"}, {1: ["a"] * 10}, {"answer_types": {2: "x"}}, ValueError, r"answer_types is missing"),
])
def test_vqa_validation(preds, answers, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vqa_accuracy(preds, answers, **kwargs)


def test_vqa_warns_when_not_ten_answers():
    with pytest.warns(UserWarning, match="do not have 10 answers"):
        r = vqa_accuracy({1: "a"}, {1: ["a"]})
    assert r["overall"] == 0.0  # official formula: a lone answer has no other annotators to agree with
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vqa_accuracy({1: "a"}, {1: ["a"] * 10})
