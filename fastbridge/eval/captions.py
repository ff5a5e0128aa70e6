"""Caption metrics computed by pycocoevalcap itself: the official COCO caption evaluation, offline.

:func:`caption_metrics` runs the same pipeline as ``pycocoevalcap.eval.COCOEvalCap``: Stanford
PTBTokenizer (Java; the ``stanford-corenlp-3.4.1.jar`` shipped inside pycocoevalcap, same flags,
same punctuation removal) and then pycocoevalcap's own scorers -- ``Bleu(4)``, ``Meteor`` (Java,
``meteor-1.5.jar``), ``Rouge`` (ROUGE-L) and ``Cider`` (the COCO "CIDEr", i.e. CIDEr-D: clipped
n-gram counts and a Gaussian length penalty) -- so corpus-level numbers equal what COCOEvalCap
reports (the tests check this). SPICE runs only when it can: Java 8..11 and the Stanford CoreNLP
3.6.0 jars that ``pycocoevalcap.spice.get_stanford_models`` downloads; fastbridge never downloads
anything, so otherwise SPICE is reported as skipped, with the reason.

Numbers are pycocoevalcap's raw values: BLEU, METEOR, ROUGE-L and SPICE in 0..1, CIDEr in 0..10
(typically 0..1.5). Papers usually print them multiplied by 100 (e.g. "CIDEr 117.3").

CIDEr's idf weights come from the references of the images being evaluated, so score the whole
split in one call: a subset scores differently, and a single image always gets CIDEr 0.

Without Java (no ``java`` on PATH, ``java -version`` fails, ``java=False`` or the environment
variable ``FASTBRIDGE_JAVA=0``), METEOR and SPICE are skipped with the reason, captions are
tokenized by a pure-Python imitation of PTBTokenizer (lower case, punctuation split off and the
same punctuation list dropped), and BLEU, ROUGE-L and CIDEr are still computed by pycocoevalcap's
pure-Python scorers. ``CaptionScores.tokenizer`` says which tokenizer was used ("ptb" or
"python"); numbers from the "python" path are close to, but not guaranteed equal to, the
official ones.

Differences from COCOEvalCap, all where COCOEvalCap would misbehave: every line-break character
(not only ``"\\n"``) is replaced by a space before tokenization (PTBTokenizer splits lines on
``"\\r"``, form feeds, U+2028..., which would shift captions onto the wrong images); the temporary
file goes to the system temp dir instead of pycocoevalcap's package folder (which may be
read-only); the JVM is told to use UTF-8 (``-Dfile.encoding=UTF-8``, the default in UTF-8
locales anyway); ``|||`` is removed from references as pycocoevalcap removes it from predictions
(it is METEOR's field separator); the METEOR JVM is shut down after each call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from ._common import check_same_ids

__all__ = [
    "CaptionScores", "caption_metrics", "java_available", "java_info", "JavaInfo",
    "METRICS", "DEFAULT_METRICS", "COCO_METRIC_NAMES", "python_ptb_tokenize",
]

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
DEFAULT_METRICS = METRICS[:-1]
#: fastbridge metric name -> the key pycocoevalcap's COCOEvalCap.eval uses.
COCO_METRIC_NAMES = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
                     "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr", "SPICE": "SPICE"}
_ALIASES = {k.lower(): (k,) for k in METRICS}
_ALIASES.update({v.lower(): (k,) for k, v in COCO_METRIC_NAMES.items()})
_ALIASES.update({"bleu": METRICS[:4], "rouge": ("ROUGE-L",), "rouge_l": ("ROUGE-L",)})

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS (imported from there when scoring; this copy
# only serves python_ptb_tokenize when pycocoevalcap is absent). Note "-LRB-" etc. never match the
# lower-cased tokens PTBTokenizer produces, so "-lrb-" survives in the official pipeline too.
_PTB_PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
# Every character str.splitlines() breaks on; PTBTokenizer -preserveLines breaks on several of them.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_FALSY = {"0", "false", "no", "off", ""}

_logger = logging.getLogger("fastbridge")
_announced: set[str] = set()


def _pycocoevalcap_dir() -> str:
    try:
        import pycocoevalcap.bleu.bleu  # noqa: F401  (the package itself is a namespace package)
    except ImportError as e:
        raise ImportError('caption metrics need pycocoevalcap: pip install "fastbridge[eval]" '
                          '(or pip install pycocoevalcap)') from e
    import pycocoevalcap

    return os.path.abspath(list(pycocoevalcap.__path__)[0])


# ---------------------------------------------------------------------------------------------
# Java
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JavaInfo:
    """What ``java -version`` said (probed once per process)."""

    available: bool
    path: str | None = None
    version: str | None = None  # e.g. "17.0.15" or "1.8.0_392"
    major: int | None = None  # 17, 11, 8 (for "1.8")
    reason: str | None = None  # why it is not available


def _parse_java_major(version: str) -> int | None:
    m = re.match(r"(\d+)(?:\.(\d+))?", version)
    if not m:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8.0_292" -> 8
        major = int(m.group(2))
    return major


@functools.lru_cache(maxsize=None)
def _probe_java() -> JavaInfo:
    path = shutil.which("java")
    if path is None:
        return JavaInfo(False, reason="no `java` executable on PATH")
    try:
        p = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return JavaInfo(False, path=path, reason=f"`{path} -version` could not run: {e}")
    out = (p.stderr or "") + (p.stdout or "")
    if p.returncode != 0:
        last = out.strip().splitlines()[-1] if out.strip() else "no output"
        return JavaInfo(False, path=path, reason=f"`{path} -version` exited with {p.returncode}: {last}")
    m = re.search(r'version "([^"]+)"', out)
    version = m.group(1) if m else None
    return JavaInfo(True, path=path, version=version,
                    major=_parse_java_major(version) if version else None)


def _java_disabled_reason(java: bool | None) -> str | None:
    if java is False:
        return "disabled by java=False"
    env = os.environ.get("FASTBRIDGE_JAVA")
    if java is None and env is not None and env.strip().lower() in _FALSY:
        return f"disabled by FASTBRIDGE_JAVA={env}"
    return None


def java_info() -> JavaInfo:
    """Java as caption_metrics sees it: probed once (``shutil.which`` + ``java -version``), and
    reported unavailable while the environment variable ``FASTBRIDGE_JAVA=0``."""
    reason = _java_disabled_reason(None)
    if reason:
        return JavaInfo(False, reason=reason)
    return _probe_java()


def java_available() -> bool:
    """Whether caption_metrics can use Java (PTBTokenizer, METEOR) by default."""
    return java_info().available


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------
def _json_key(k: Any) -> Any:
    return k if isinstance(k, (str, int, float, bool)) or k is None else str(k)


def _json_value(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {_json_key(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclasses.dataclass
class CaptionScores:
    """Result of :func:`caption_metrics`.

    Attributes:
        scores: metric name ("BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE") ->
            corpus-level score, as pycocoevalcap computes it (fractions; CIDEr 0..10). Only the
            metrics that were computed appear.
        per_image: metric name -> {image id -> that image's score}.
        skipped: metric name -> why it was not computed.
        tokenizer: "ptb" (Stanford PTBTokenizer, as COCOEvalCap) or "python" (the fallback).
        n_images: number of images scored.
        java: the Java version used, or None.
        seconds: wall time of each stage ("tokenize", "BLEU" (all four), "METEOR", ...).
        notes: anything else worth knowing about these numbers.
    """

    scores: dict[str, float]
    per_image: dict[str, dict]
    skipped: dict[str, str]
    tokenizer: str
    n_images: int = 0
    java: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __getitem__(self, metric: str) -> float:
        return self.scores[metric]

    def __contains__(self, metric: object) -> bool:
        return metric in self.scores

    def to_dict(self, per_image: bool = True) -> dict:
        """JSON-ready dict (non-finite numbers become None, non-JSON ids become str)."""
        d = {"scores": self.scores, "skipped": self.skipped, "tokenizer": self.tokenizer,
             "n_images": self.n_images, "java": self.java, "seconds": self.seconds, "notes": self.notes}
        if per_image:
            d["per_image"] = self.per_image
        return _json_value(d)

    def __str__(self) -> str:
        parts = [f"{k} {v:.4f}" for k, v in self.scores.items()]
        s = " | ".join(parts) + f"  ({self.n_images} images, {self.tokenizer} tokenizer)"
        if self.skipped:
            s += "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return s


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
def _ptb_punctuations() -> list[str]:
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
    except ImportError:
        return list(_PTB_PUNCTUATIONS)
    return list(PUNCTUATIONS)


def _ptb_tokenize(sentences: list[str], java_path: str, log: Callable[[str], Any]) -> list[str]:
    """pycocoevalcap's PTBTokenizer.tokenize on a flat list of sentences, one JVM run."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    if not os.path.exists(jar):
        raise RuntimeError(f"{jar} is missing from the pycocoevalcap install")
    text = "\n".join(_LINE_BREAKS.sub(" ", s) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="fastbridge-ptb-") as d:
        path = os.path.join(d, "sentences.txt")
        with open(path, "wb") as f:
            f.write(text.encode("utf-8"))
        cmd = [java_path, "-Dfile.encoding=UTF-8", "-cp", jar, _PTB_CLASS, "-preserveLines", "-lowerCase", path]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=d)
    err = p.stderr.decode("utf-8", "replace").strip()
    if p.returncode != 0:
        raise RuntimeError(f"PTBTokenizer exited with {p.returncode}: {err[-2000:] or 'no output'}")
    for line in err.splitlines():  # "PTBTokenizer tokenized N tokens at X tokens per second."
        log(line.strip())
    lines = p.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) < len(sentences) or any(x.strip() for x in lines[len(sentences):]):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    punct = _ptb_punctuations()
    # pycocoevalcap's post-processing, verbatim.
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines[:len(sentences)]]


# --- pure-Python imitation of `PTBTokenizer -preserveLines -lowerCase` -----------------------
_ABBREVIATIONS = frozenset(
    "mr mrs ms messrs dr prof st jr sr vs etc inc ltd co corp bros mt ft ave blvd rd hwy gen gov sen rep "
    "sgt capt lt col maj cmdr adm rev hon pres jan feb mar apr jun jul aug sep sept oct nov dec "
    "e.g i.e a.m p.m dept est fig".split())
_BEFORE_NUMBER_ABBREVIATIONS = frozenset({"no", "nos", "vol", "pp", "p"})
_SPECIAL_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                  "lemme": "lem me", "gimme": "gim me", "'tis": "'t is", "'twas": "'t was", "'n'": "'n'"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = {"\u2018": "`", "\u2019": "'", "\u201a": "'", "\u201b": "`", "\u201c": '"', "\u201d": '"',
            "\u201e": '"', "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ", "\u2026": " ... ",
            "\u00a0": " "}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'d|'ll|'m)$")
_ACRONYM = re.compile(r"^(?:[a-z]\.)+[a-z]?\.?$")
_LEADING = re.compile(r'^(``|"|\(|\[|\{|\.\.\.|--|\$|#|`|\'(?![0-9]|n\'|t(?:is|was)\b))')
_TRAILING = re.compile(r'("|\)|\]|\}|\.\.\.|--|[?!]+|,|;|:|%|/|\')$')


def _split_word(w: str, nxt: str | None) -> list[str]:
    """PTB-like split of one whitespace-free chunk (already lower-cased)."""
    if w in _SPECIAL_WORDS:
        return _SPECIAL_WORDS[w].split()
    head: list[str] = []
    tail: list[str] = []
    while w:
        m = _LEADING.match(w)
        if not m or m.end() == len(w):
            break
        tok = m.group(1)
        head.append("``" if tok == '"' else _BRACKETS.get(tok, tok))
        w = w[m.end():]
    while w:
        m = _TRAILING.search(w)
        if m and m.start() > 0:
            tok = m.group(1)
            if tok == ":" and re.search(r"\d:$", w) and nxt and nxt[:1].isdigit():
                break
            tail.insert(0, "''" if tok == '"' else _BRACKETS.get(tok, tok))
            w = w[:m.start()]
            continue
        if w.endswith(".") and len(w) > 1 and not w.endswith(".."):
            stem = w[:-1]
            keep = (_ACRONYM.match(w) is not None or stem in _ABBREVIATIONS
                    or (stem in _BEFORE_NUMBER_ABBREVIATIONS and tail == [] and nxt is not None
                        and nxt[:1].isdigit()))
            if not keep:
                tail.insert(0, ".")
                w = stem
                continue
        break
    if w in _BRACKETS:
        w = _BRACKETS[w]
    mid: list[str] = []
    if w:
        if w in _SPECIAL_WORDS:
            mid = _SPECIAL_WORDS[w].split()
        else:
            # internal separators: "dog,cat", "wait...what", "a--b", "a+b", "3%"; not "1,000" / "3:30"
            parts = re.split(r"(\.\.\.|--|\+|(?<!\d),|,(?!\d)|;|(?<!\d):|:(?!\d)|[?!]+|%|[()\[\]{}\"])", w)
            for part in parts:
                if not part:
                    continue
                if part in _BRACKETS:
                    mid.append(_BRACKETS[part])
                elif part == '"':
                    mid.append("''")
                else:
                    m = _CLITIC.match(part)
                    if m and m.group(1) not in ("'", "`"):
                        mid.extend([m.group(1), m.group(2)])
                    elif part.startswith("#") and len(part) > 1:
                        mid.extend(["#", part[1:]])
                    else:
                        mid.append(part)
    return head + mid + tail


def _python_tokens(sentence: str) -> list[str]:
    s = _LINE_BREAKS.sub(" ", sentence)
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = s.lower()
    chunks = s.split()
    out: list[str] = []
    for i, w in enumerate(chunks):
        out.extend(_split_word(w, chunks[i + 1] if i + 1 < len(chunks) else None))
    return out


def python_ptb_tokenize(sentence: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's PTBTokenizer + punctuation removal, used without
    Java: lower-cases, splits off punctuation, brackets (-> "-lrb-" ...) and clitics ("is n't",
    "dog 's"), then drops pycocoevalcap's PUNCTUATIONS. Matches the Java tokenizer on ordinary
    captions; rare constructs may tokenize differently."""
    punct = set(_ptb_punctuations())
    return " ".join(t for t in _python_tokens(sentence) if t not in punct)


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(log: Callable[[str], Any]):
    """Capture whatever pycocoevalcap prints on stdout and pass it to ``log`` line by line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if line.strip():
                log(line.rstrip())


def _close_meteor(meteor: Any) -> None:
    """Shut down pycocoevalcap's Meteor JVM now (it otherwise lives until garbage collection)."""
    lock = getattr(meteor, "lock", None)
    if lock is not None and lock.locked():  # compute_score raised while holding it
        lock.release()
    p = getattr(meteor, "meteor_p", None)
    if p is None:
        return
    for stream in (p.stdin, p.stdout, p.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.close()
    with contextlib.suppress(Exception):
        p.kill()
    with contextlib.suppress(Exception):
        p.wait(timeout=30)


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {k: [r.replace("|||", "") for r in v] for k, v in gts.items()}
    meteor = Meteor()
    try:
        try:
            score, scores = meteor.compute_score(gts, res)
        except Exception as e:
            detail = ""
            p = meteor.meteor_p
            with contextlib.suppress(Exception):
                p.stdin.close()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive but not answering: stop it to read its stderr
                p.kill()
                p.wait()
            if p.stderr is not None:
                with contextlib.suppress(Exception):
                    detail = p.stderr.read().decode("utf-8", "replace").strip()[-1000:]
            raise RuntimeError(f"{type(e).__name__}: {e}" + (f"; METEOR said: {detail}" if detail else "")) from e
    finally:
        _close_meteor(meteor)
    return float(score), [float(s) for s in scores]


def _spice_blocker(pkg_dir: str, java: JavaInfo | None, java_reason: str | None) -> str | None:
    reasons = []
    if java is None or not java.available:
        reasons.append(f"SPICE needs Java, which is not available ({java_reason})")
    elif java.major is None or java.major > 11:
        reasons.append(f"SPICE needs Java 8..11 (its bundled CoreNLP/lmdbjni fail on newer JVMs); "
                       f"found Java {java.version or 'of unknown version'} at {java.path}")
    spice_dir = os.path.join(pkg_dir, "spice")
    try:
        from pycocoevalcap.spice import get_stanford_models as gsm

        lib = os.path.join(spice_dir, gsm.SPICELIB)
        needed = [f"{gsm.JAR}.jar", f"{gsm.JAR}-models.jar"]
    except ImportError:
        lib = os.path.join(spice_dir, "lib")
        needed = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    missing = [n for n in needed if not os.path.exists(os.path.join(lib, n))]
    if not os.path.exists(os.path.join(spice_dir, "spice-1.0.jar")):
        missing.insert(0, "spice-1.0.jar")
    if missing:
        reasons.append(f"SPICE needs {', '.join(missing)} in {lib}, which pycocoevalcap downloads on "
                       f"first use (pycocoevalcap.spice.get_stanford_models); fastbridge never downloads: "
                       f"run that once with network access")
    return "; ".join(reasons) or None


def _spice(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.spice.spice import Spice

    spice = Spice.__new__(Spice)  # skip __init__: it would download CoreNLP when missing
    score, scores = spice.compute_score(gts, res)  # per-image scores in sorted(id) order
    by_id = dict(zip(sorted(gts.keys()), scores))
    return float(score), [float(by_id[k]["All"]["f"]) for k in gts.keys()]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _validate(predictions: Any, references: Any) -> tuple[list, list[str], list[list[str]]]:
    if not isinstance(predictions, Mapping):
        raise TypeError(f"predictions must be a mapping image id -> caption str, got {type(predictions).__name__}")
    if not isinstance(references, Mapping):
        raise TypeError(f"references must be a mapping image id -> sequence of caption str, got "
                        f"{type(references).__name__}")
    if not references:
        raise ValueError("references is empty: nothing to evaluate")
    if not predictions:
        raise ValueError("predictions is empty: nothing to evaluate")
    check_same_ids(predictions, references, truth_name="references", unit="image id", no_entry="no references")
    ids = list(references.keys())
    preds, refs = [], []
    for k in ids:
        p = predictions[k]
        if not isinstance(p, str):
            raise TypeError(f"predictions[{k!r}] must be a str, got {type(p).__name__}")
        r = references[k]
        if isinstance(r, (str, bytes)) or not isinstance(r, Sequence):
            raise TypeError(f"references[{k!r}] must be a sequence of caption str, got {type(r).__name__}")
        if len(r) == 0:
            raise ValueError(f"references[{k!r}] is empty: each image needs at least one reference caption")
        for j, c in enumerate(r):
            if not isinstance(c, str):
                raise TypeError(f"references[{k!r}][{j}] must be a str, got {type(c).__name__}")
        preds.append(p)
        refs.append(list(r))
    return ids, preds, refs


def _resolve_metrics(metrics: Iterable[str] | None, spice: bool) -> list[str]:
    if metrics is None:
        wanted = set(DEFAULT_METRICS)
    else:
        if isinstance(metrics, str):
            metrics = [metrics]
        wanted = set()
        for m in metrics:
            if not isinstance(m, str) or m.lower() not in _ALIASES:
                raise ValueError(f"metrics: unknown metric {m!r}; choose from {', '.join(METRICS)}")
            wanted.update(_ALIASES[m.lower()])
        if not wanted:
            raise ValueError("metrics is empty")
    if spice:
        wanted.add("SPICE")
    return [m for m in METRICS if m in wanted]


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                    metrics: Iterable[str] | None = None, spice: bool = False,
                    java: bool | None = None, log: Callable[[str], Any] | None = None) -> CaptionScores:
    """Score generated captions against reference captions with pycocoevalcap (COCO caption eval).

    Args:
        predictions: image id -> generated caption (one per image; "" is allowed and scores 0).
        references: image id -> the reference captions of that image (at least one). Both
            mappings must have the same ids. Pass raw captions: they are PTB-tokenized here.
        metrics: names to compute, from "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
            "SPICE" (COCOEvalCap's names "Bleu_4", "ROUGE_L" ... and "BLEU" for all four also
            work). Default: all but SPICE.
        spice: also compute SPICE -- only possible with Java 8..11 and the CoreNLP jars already
            downloaded into pycocoevalcap; otherwise it is listed in ``skipped`` with the reason.
        java: None (default) uses Java when ``java -version`` works, unless FASTBRIDGE_JAVA=0;
            False never uses it (pure-Python tokenizer, no METEOR/SPICE); True requires it and
            raises RuntimeError when it is unavailable.
        log: callable receiving progress messages -- each metric's value, PTBTokenizer's own output
            (default: the "fastbridge" logger at DEBUG level, shown by ``--verbose``; the one-time
            "no Java" notice goes to its WARNING level).

    Returns:
        CaptionScores (``scores``, ``per_image``, ``skipped``, ``tokenizer``, ``to_dict()``).
    """
    ids, preds, refs = _validate(predictions, references)
    wanted = _resolve_metrics(metrics, spice)
    info = log if log is not None else _logger.debug
    warn = log if log is not None else _logger.warning
    pkg_dir = _pycocoevalcap_dir()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    n = len(ids)
    result = CaptionScores(scores={}, per_image={}, skipped={}, tokenizer="python", n_images=n)

    # --- Java ---------------------------------------------------------------------------------
    java_reason = _java_disabled_reason(java)
    jinfo: JavaInfo | None = None
    if java_reason is None:
        jinfo = _probe_java()
        if not jinfo.available:
            java_reason = jinfo.reason
            if java is True:
                raise RuntimeError(f"caption_metrics(java=True): Java is not available: {java_reason}")

    # --- tokenization (as COCOEvalCap: references first, then predictions, one run each) -------
    t0 = time.perf_counter()
    flat_refs = [c for r in refs for c in r]
    tok_refs = tok_preds = None
    if java_reason is None:
        try:
            info(f"caption_metrics: PTB-tokenizing {len(flat_refs)} references and {n} predictions (Java)")
            tok_refs = _ptb_tokenize(flat_refs, jinfo.path, info)
            tok_preds = _ptb_tokenize(preds, jinfo.path, info)
            result.tokenizer = "ptb"
            result.java = jinfo.version
        except Exception as e:  # a broken Java install: same treatment as no Java
            if java is True:
                raise
            java_reason = f"PTBTokenizer failed: {e}"
            jinfo = None
    if java_reason is not None:
        msg = (f"Java not used ({java_reason}): METEOR (and SPICE) skipped; captions are tokenized by "
               f"fastbridge's pure-Python PTB imitation, so BLEU/ROUGE-L/CIDEr may differ slightly "
               f"from the official COCO numbers")
        if msg not in _announced:
            _announced.add(msg)
            warn(msg)
        result.notes.append(msg)
        tok_refs = [python_ptb_tokenize(c) for c in flat_refs]
        tok_preds = [python_ptb_tokenize(p) for p in preds]
    result.seconds["tokenize"] = time.perf_counter() - t0

    gts: dict[int, list[str]] = {}
    pos = 0
    for i, r in enumerate(refs):
        gts[i] = tok_refs[pos:pos + len(r)]
        pos += len(r)
    res = {i: [tok_preds[i]] for i in range(n)}

    def record(name: str, score: float, per: Sequence) -> None:
        result.scores[name] = float(score)
        result.per_image[name] = {k: float(v) for k, v in zip(ids, per)}
        info(f"caption_metrics: {name} = {float(score):.4f}")

    def run_java_metric(name: str, scorer: Callable) -> None:
        """A metric run by a Java subprocess: a failure skips it with the reason, never a number."""
        t0 = time.perf_counter()
        try:
            with _quiet(info):
                score, per = scorer(gts, res)
        except Exception as e:
            result.skipped[name] = f"{name} failed: {type(e).__name__}: {e}"
            warn(f"caption_metrics: {result.skipped[name]}")
        else:
            result.seconds[name] = time.perf_counter() - t0
            record(name, score, per)

    # --- BLEU ---------------------------------------------------------------------------------
    bleu_names = [m for m in wanted if m.startswith("BLEU-")]
    if bleu_names:
        t0 = time.perf_counter()
        with _quiet(info):
            score, per = Bleu(4).compute_score(gts, res, verbose=0)
        result.seconds["BLEU"] = time.perf_counter() - t0
        for name in bleu_names:
            k = int(name[-1]) - 1
            record(name, score[k], per[k])

    # --- METEOR -------------------------------------------------------------------------------
    if "METEOR" in wanted:
        if java_reason is not None:
            result.skipped["METEOR"] = f"METEOR needs Java, which is not available ({java_reason})"
        else:
            run_java_metric("METEOR", _meteor)

    # --- ROUGE-L ------------------------------------------------------------------------------
    if "ROUGE-L" in wanted:
        t0 = time.perf_counter()
        with _quiet(info):
            score, per = Rouge().compute_score(gts, res)
        result.seconds["ROUGE-L"] = time.perf_counter() - t0
        record("ROUGE-L", score, per)

    # --- CIDEr --------------------------------------------------------------------------------
    if "CIDEr" in wanted:
        t0 = time.perf_counter()
        if not any(c.split() for r in gts.values() for c in r):
            # pycocoevalcap would fail on max() of an empty document-frequency table.
            score, per = 0.0, [0.0] * n
            result.notes.append("CIDEr: every reference is empty after tokenization; CIDEr is 0")
        else:
            with _quiet(info):
                score, per = Cider().compute_score(gts, res)
        if n == 1:
            result.notes.append("CIDEr is always 0 for a single image (its idf is log(1) = 0): "
                                "score the whole split in one call")
            info(f"caption_metrics: {result.notes[-1]}")
        result.seconds["CIDEr"] = time.perf_counter() - t0
        record("CIDEr", score, per)

    # --- SPICE --------------------------------------------------------------------------------
    if "SPICE" in wanted:
        blocker = _spice_blocker(pkg_dir, jinfo if java_reason is None else None, java_reason)
        if blocker is not None:
            result.skipped["SPICE"] = blocker
            warn(f"caption_metrics: SPICE skipped: {blocker}")
        else:
            run_java_metric("SPICE", _spice)

    return result
