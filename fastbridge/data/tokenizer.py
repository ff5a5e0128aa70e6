"""A word-level Hugging Face tokenizer built from a corpus (e.g. the synthetic set's texts).

Lower-cased (after NFKC), split on whitespace and punctuation ("circle." -> "circle", "."), one id per
word; ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the extra tokens, then the words by
descending frequency (ties alphabetical). Encoding adds ``<bos> ... <eos>`` (pass
``add_special_tokens=False`` to get the bare words); decoding joins words with single spaces and
attaches punctuation to the word before it ("a red circle."). A ``transformers.PreTrainedTokenizerFast``:
``save_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` round-trip offline.
"""
from __future__ import annotations

import collections
from typing import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def _normalizer():
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def word_counts(texts: Iterable[str]) -> collections.Counter:
    """How often each word (as the tokenizer splits it) occurs in ``texts``."""
    norm, pre = _normalizer(), _pre_tokenizer()
    counts: collections.Counter = collections.Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"build_tokenizer: texts must yield str, item {i} is {type(text).__name__}")
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return counts


def build_tokenizer(texts: Iterable[str], *, min_freq: int = 1, extra_tokens: Iterable[str] = ()):
    """A ``transformers.PreTrainedTokenizerFast`` (WordLevel) whose vocabulary is the words of ``texts``
    seen at least ``min_freq`` times.

    ``extra_tokens`` (e.g. "<image>") become additional special tokens: never split or lower-cased,
    dropped by ``decode(..., skip_special_tokens=True)``. pad/bos/eos/unk are set on the tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, str):
        raise ValueError("build_tokenizer: texts must be an iterable of str (e.g. a list of captions), got one str")
    if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
        raise ValueError(f"build_tokenizer: min_freq must be an int >= 1, got {min_freq!r}")
    if isinstance(extra_tokens, str):
        raise ValueError(f"build_tokenizer: extra_tokens must be an iterable of str, got the str {extra_tokens!r}")
    extra = []
    for t in extra_tokens:
        if not isinstance(t, str) or not t or any(c.isspace() for c in t):
            raise ValueError(f"build_tokenizer: extra_tokens must be non-empty str without whitespace, got {t!r}")
        if t not in SPECIAL_TOKENS and t not in extra:
            extra.append(t)

    counts = word_counts(texts)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(extra))}
    for word, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n >= min_freq and word not in vocab:
            vocab[word] = len(vocab)
    if len(vocab) == len(SPECIAL_TOKENS) + len(extra):
        raise ValueError(f"build_tokenizer: texts gave no word seen at least min_freq={min_freq} times")

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    # WordPiece decoding joins with spaces and, with cleanup, glues " ." / " ," / " ?" / " !" / " 's" back on
    # (no vocabulary word starts with "##": punctuation is split one character at a time); the Replace
    # steps do the same for ":" and ";".
    tok.decoder = decoders.Sequence([decoders.WordPiece(prefix="##", cleanup=True),
                                     decoders.Replace(" :", ":"), decoders.Replace(" ;", ";")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + tuple(extra)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens=extra, clean_up_tokenization_spaces=False)
