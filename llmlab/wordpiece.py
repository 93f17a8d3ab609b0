"""WordPiece tokenization as BERT does it: basic pre-tokenization, then greedy longest-match-first.

What it implements
- ``basic_tokenize``: BERT's ``BasicTokenizer`` (Devlin et al. 2019; google-research/bert
  ``tokenization.py``): drop control characters and U+FFFD, map whitespace to spaces, put spaces
  around CJK ideographs so each becomes its own word, lower-case and strip accents (NFD, drop
  combining marks), then split off every punctuation character.
- ``WordPieceTokenizer``: each word is split greedily into the longest vocabulary entry from the
  left, later pieces carrying the ``##`` continuation prefix (Schuster and Nakajima 2012; Wu et
  al. 2016). A word with a piece that matches nothing, or longer than ``max_input_chars_per_word``,
  becomes the single ``[UNK]`` token: WordPiece, unlike byte-level BPE, has unknown tokens.
  ``from_vocab_file`` reads BERT's ``vocab.txt`` (one token per line, line number = id); the
  result equals Hugging Face's ``BertTokenizerFast`` ids without the [CLS]/[SEP] template
  (tests/test_wordpiece.py, on all-MiniLM-L6-v2's vocabulary).

Special tokens written in the text ("[UNK]", "[SEP]", ...) stay whole.

What it leaves out: WordPiece training (choosing merges by likelihood gain), the cased
variant's options beyond ``lowercase=False``, and [CLS]/[SEP] templates.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmlab.shapes import check_int
from llmlab.tokenizer import Tokenizer, _check_ids

# CJK Unified Ideographs blocks that BERT splits one character per token (tokenization.py _is_chinese_char).
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def is_cjk(ch: str) -> bool:
    """True for a CJK ideograph (not Japanese kana or Korean Hangul, which BERT keeps in words)."""
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)  # all non-alphanumeric ASCII counts, e.g. "$" and "^", as in BERT
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _clean(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\x00" or ch == "\ufffd" or _is_control(ch):
            continue
        if ch.isspace() or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def _strip_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    out: list[str] = []
    start_new = True
    for ch in word:
        if _is_punctuation(ch):
            out.append(ch)
            start_new = True
        else:
            if start_new:
                out.append("")
                start_new = False
            out[-1] += ch
    return out


def basic_tokenize(text: str, lowercase: bool = True, strip_accents: bool | None = None) -> list[str]:
    """BERT's basic pre-tokenization: words and single punctuation / CJK characters.

    >>> basic_tokenize("Héllo, 世界!")
    ['hello', ',', '世', '界', '!']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    strip = lowercase if strip_accents is None else strip_accents
    words = []
    for word in _clean(text).split():
        if lowercase:
            word = word.lower()
        if strip:
            word = _strip_accents(word)
        words.extend(_split_punctuation(word))
    return words


class WordPieceTokenizer(Tokenizer):
    """Greedy longest-match-first WordPiece over ``basic_tokenize`` words.

    >>> tok = WordPieceTokenizer(["[UNK]", "un", "##aff", "##able", "a"])
    >>> tok.encode("unaffable")
    [1, 2, 3]
    """

    kind = "wordpiece"

    def __init__(
        self,
        vocab: Iterable[str],
        unk_token: str = "[UNK]",
        prefix: str = "##",
        lowercase: bool = True,
        max_input_chars_per_word: int = 100,
        special_tokens: Iterable[str] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    ) -> None:
        self.tokens = list(vocab)  # id -> token
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocab must not repeat a token")
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        if unk_token not in self.token_to_id:
            raise ValueError(f"unk_token must be in the vocabulary, got {unk_token!r}")
        self.unk_token, self.prefix, self.lowercase = unk_token, prefix, lowercase
        self.max_input_chars_per_word = check_int("max_input_chars_per_word", max_input_chars_per_word, minimum=1)
        # special tokens written in the text stay whole, as BERT's never_split / HF's added tokens
        self.special_tokens = [t for t in special_tokens if t in self.token_to_id]
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(map(re.escape, by_length)) + ")") if by_length else None

    @classmethod
    def from_vocab_file(cls, path: str | Path, **kwargs: Any) -> WordPieceTokenizer:
        """BERT's vocab.txt: one token per line, the line number is the id."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path must be an existing vocab.txt, got {str(path)!r}")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls(lines, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def tokenize_word(self, word: str) -> list[str]:
        """Greedy longest match from the left; [UNK] for the whole word if a piece matches nothing."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.token_to_id:
                    break
                end -= 1
            if end == start:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """text -> WordPiece strings, e.g. ['token', '##ization']."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        pieces = self._splitter.split(text) if self._splitter else [text]
        out = []
        for k, piece in enumerate(pieces):
            if k % 2:
                out.append(piece)
            else:
                out.extend(p for w in basic_tokenize(piece, lowercase=self.lowercase) for p in self.tokenize_word(w))
        return out

    def encode(self, text: str) -> list[int]:
        return [self.token_to_id[p] for p in self.tokenize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Join pieces: "##" pieces attach to the previous one, others are separated by a space."""
        out = ""
        for i in _check_ids(ids, self.vocab_size):
            t = self.tokens[i]
            if t.startswith(self.prefix) and out:
                out += t[len(self.prefix):]
            else:
                out += (" " if out else "") + t
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "vocab": self.tokens, "unk_token": self.unk_token, "prefix": self.prefix,
                "lowercase": self.lowercase, "max_input_chars_per_word": self.max_input_chars_per_word,
                "special_tokens": self.special_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordPieceTokenizer:
        """Inverse of ``to_dict``."""
        fields = {k: v for k, v in data.items() if k not in ("type", "vocab")}
        return cls(data["vocab"], **fields)

    def __repr__(self) -> str:
        return f"WordPieceTokenizer(vocab_size={self.vocab_size}, unk_token={self.unk_token!r})"
