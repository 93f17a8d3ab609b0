"""Tokenizers: a small common interface and a character-level tokenizer.

What it implements
- ``Tokenizer``: the abstract interface every llmlab tokenizer follows: ``encode(str) -> list[int]``,
  ``decode(list[int]) -> str``, ``vocab_size``, and a JSON round trip (``to_dict`` / ``save`` /
  ``load_tokenizer``). JSON, never pickle, so a tokenizer ships next to safetensors weights.
- ``CharTokenizer``: one token per character, as in Karpathy's char-rnn and nanoGPT's
  ``shakespeare_char`` example. The vocabulary is the sorted set of characters of a text, so the
  same text gives the same ids on every machine. A character outside the vocabulary raises a
  ``ValueError`` naming it, unless the tokenizer was built with an explicit ``unk`` character,
  which then stands in for every unknown character.

Byte-level BPE lives in ``llmlab.bpe`` and WordPiece in ``llmlab.wordpiece``; both subclass
``Tokenizer`` and load through ``load_tokenizer``. A subclass that sets ``kind`` is registered under
it when its class is defined, so ``tokenizer_from_dict`` finds it (and calls its ``from_dict``)
without importing the subclasses' modules, which import this one. What it leaves out: chat templates.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmlab.shapes import check_int


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses implement ``encode``, ``decode``, ``vocab_size`` and ``to_dict``."""

    #: name stored under "type" in the JSON form; ``load_tokenizer`` dispatches on it
    kind: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that names its own ``kind``; a kind belongs to one class (a redefinition
        of that class, as when its module is reloaded, replaces it)."""
        super().__init_subclass__(**kwargs)
        kind = vars(cls).get("kind")
        if not kind:
            return
        known = _KINDS.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"kind {kind!r} already names {known.__module__}.{known.__qualname__}; "
                            f"give {cls.__qualname__} a kind of its own")
        _KINDS[kind] = cls

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        """Inverse of ``to_dict``; every registered kind implements it."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_dict")

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct token ids: every id is in [0, vocab_size)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """str -> list of token ids."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """list of token ids -> str."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable description with a "type" key; ``tokenizer_from_dict`` inverts it."""

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as UTF-8 JSON to ``path``; return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return path


_KINDS: dict[str, type[Tokenizer]] = {}  # "type" in the JSON form -> the Tokenizer subclass that reads it


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """Return ``ids`` as a list of ints, raising on anything that is not an id in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"ids must be an iterable of integers, got {type(ids).__name__}")
    out = [int(i) if hasattr(i, "__index__") else i for i in ids]
    for i in out:
        check_int("token id", i, minimum=0)
        if i >= vocab_size:
            raise ValueError(f"token id must be < vocab_size={vocab_size}, got {i}")
    return out


class CharTokenizer(Tokenizer):
    """One id per character; ids follow the sorted order of the characters.

    >>> tok = CharTokenizer.from_text("hello world")
    >>> tok.encode("hold")
    [3, 5, 4, 1]
    >>> tok.decode([3, 5, 4, 1])
    'hold'
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], unk: str | None = None) -> None:
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        if not chars:
            raise ValueError("chars must hold at least one character, got an empty vocabulary")
        if unk is not None and unk not in chars:
            raise ValueError(f"unk must be one of the vocabulary characters, got {unk!r}")
        self.chars = chars  # id -> character
        self.unk = unk  # the character unknown characters map to; None means unknown characters raise
        self.stoi = {c: i for i, c in enumerate(chars)}  # character -> id

    @classmethod
    def from_text(cls, text: str, unk: str | None = None) -> CharTokenizer:
        """Vocabulary = sorted distinct characters of ``text`` (plus ``unk`` if given and absent)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        chars = set(text)
        if unk is not None:
            chars.add(unk)
        return cls(sorted(chars), unk=unk)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        if self.unk is not None:
            unk_id = stoi[self.unk]
            return [stoi.get(c, unk_id) for c in text]
        missing = sorted({c for c in text if c not in stoi})
        raise ValueError(
            f"text contains {len(missing)} character(s) outside the vocabulary: {''.join(missing)!r} "
            f"(build the tokenizer with unk=... to map unknown characters to one token)"
        )

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in _check_ids(ids, self.vocab_size))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": "".join(self.chars), "unk": self.unk}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        return cls(list(data["chars"]), unk=data.get("unk"))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk!r})"


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from ``Tokenizer.to_dict()`` output."""
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict, got {type(data).__name__}")
    kind = data.get("type")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"data['type'] must be one of {', '.join(map(repr, _KINDS))}, got {kind!r}")
    return cls.from_dict(data)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved with ``Tokenizer.save``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path must be an existing tokenizer JSON file, got {str(path)!r}")
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
