"""Byte-level byte-pair encoding (BPE), the tokenizer of GPT-2, GPT-4 and LLaMA-3.

What it implements
- ``BPETokenizer``: text -> UTF-8 bytes -> regex pre-tokens ("chunks") -> merges, as in GPT-2
  (Radford et al. 2019, section 2.2) on top of BPE for subwords (Sennrich et al. 2016). The base
  vocabulary is the 256 byte values, so every string has an encoding: there is no unknown token.
  The regex split (``GPT2_SPLIT_PATTERN``, ``GPT4_SPLIT_PATTERN``, needing the ``regex`` package
  for ``\\p{L}`` and possessive quantifiers) keeps merges inside words, numbers and punctuation
  runs; no merge crosses a chunk boundary.
- Training (``BPETokenizer.train``): repeatedly merge the most frequent adjacent pair of ids,
  counted over the distinct chunks weighted by their frequency. Ties between equally frequent
  pairs go to the pair whose byte strings ``(vocab[a], vocab[b])`` compare greatest (a tuple of
  ``bytes``), so training is deterministic. Two trainers give the identical merge list: a plain
  one that recounts every pair after each merge (the textbook loop) and a fast one that updates
  the pair counts only in the chunks that contain the merged pair, with a heap of pair counts.
- Encoding (``encode``, ``encode_ordinary``, ``encode_iterable``): in each chunk, merge the pair
  with the lowest merge rank until no learned pair is left (the order tiktoken and minbpe use);
  encodings of chunks are cached, since natural text repeats its words. Special tokens follow
  tiktoken's rules: a special token in the text is encoded as its id only when allowed
  (``allowed_special``), otherwise ``encode`` raises a ``ValueError`` naming it; where special
  tokens overlap, the longest match wins.
- ``BPETokenizer.from_tiktoken``: load a production vocabulary given as tiktoken ranks (token bytes
  -> id), recovering each token's merge by running BPE on its bytes with the lower ranks only
  (as minbpe's ``recover_merges``). GPT-4's ``cl100k_base`` loaded this way encodes exactly as
  tiktoken does (tests/test_bpe.py). Ids are the tiktoken ranks, so single bytes are not at ids
  0-255 there (``byte_ids`` maps a byte value to its id).
- JSON save / load (``to_dict``, ``llmlab.tokenizer.load_tokenizer``), never pickle.

What it leaves out: GPT-2's byte-to-unicode display table (tokens are shown as ``bytes`` here),
BPE dropout, and the Rust speed of tiktoken (``benchmarks/bench_tokenizer.py`` measures the gap).
The split pattern runs on the ``regex`` module's Unicode tables, which can be newer than tiktoken's:
a code point assigned in a recent Unicode version (a letter here, unassigned there) can be split
differently; text in characters both tables know is encoded token for token as tiktoken does.

Reference implementations followed: Karpathy's minbpe (``RegexTokenizer``, ``GPT4Tokenizer``)
and OpenAI's tiktoken (``src/lib.rs``: ``byte_pair_encode``, special-token handling).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import regex

from llmlab.shapes import check_int
from llmlab.tokenizer import Tokenizer, _check_ids

#: GPT-2's pre-tokenization regex (openai/gpt-2 src/encoder.py; tiktoken's r50k_base).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: GPT-4's pre-tokenization regex (tiktoken's cl100k_base): case-insensitive contractions, numbers
#: in groups of at most 3 digits, a single leading non-letter glued to a word, newlines kept apart.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

_INF = float("inf")
_LETTER = regex.compile(r"\p{L}")


def _check_text(text: object, name: str = "text") -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` in ``ids`` (left to right) by ``new_id``."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class _Greatest:
    """Heap key that inverts the order of its value, so a min-heap pops the greatest value first."""

    __slots__ = ("value",)

    def __init__(self, value: tuple[bytes, bytes]) -> None:
        self.value = value

    def __lt__(self, other: _Greatest) -> bool:
        return self.value > other.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Greatest) and self.value == other.value


# ----------------------------------------------------------------------------------------------
# Training


def _chunk_counts(text: str, pattern: str, special_tokens: Iterable[str]) -> Counter:
    """Distinct pre-token chunks (as tuples of byte values) -> frequency; text split at specials first."""
    compiled = regex.compile(pattern)
    specials = sorted(special_tokens, key=len, reverse=True)
    pieces = regex.split("|".join(regex.escape(s) for s in specials), text) if specials else [text]
    counts: Counter = Counter()
    for piece in pieces:
        counts.update(compiled.findall(piece))
    return Counter({tuple(chunk.encode("utf-8")): n for chunk, n in counts.items()})


def _best_pair(stats: dict[tuple[int, int], int], vocab: dict[int, bytes]) -> tuple[int, int]:
    """Most frequent pair; ties go to the greatest (vocab[a], vocab[b]), then to the smaller ids."""
    return max(stats, key=lambda p: (stats[p], vocab[p[0]], vocab[p[1]], -p[0], -p[1]))


def _train_plain(words: list[list[int]], freqs: list[int], num_merges: int, vocab: dict[int, bytes]):
    """The teaching loop: after every merge, count all pairs again. Yields (pair, new_id)."""
    for k in range(num_merges):
        stats: dict[tuple[int, int], int] = {}
        for w, f in zip(words, freqs, strict=True):
            for pair in zip(w, w[1:], strict=False):
                stats[pair] = stats.get(pair, 0) + f
        if not stats:
            return
        pair = _best_pair(stats, vocab)
        new_id = 256 + k
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        for i, w in enumerate(words):
            if len(w) > 1:
                words[i] = _merge(w, pair, new_id)
        yield pair, new_id


def _word_pairs(w: list[int]) -> Counter:
    return Counter(zip(w, w[1:], strict=False))


def _train_fast(words: list[list[int]], freqs: list[int], num_merges: int, vocab: dict[int, bytes]):
    """Incremental counts: pair -> count, pair -> words containing it, and a lazy max-heap of
    (count, bytes) entries; a merge only revisits the words that contain the merged pair."""
    stats: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for i, (w, f) in enumerate(zip(words, freqs, strict=True)):
        for pair, n in _word_pairs(w).items():
            stats[pair] = stats.get(pair, 0) + n * f
            where.setdefault(pair, set()).add(i)
    heap = [(-c, _Greatest((vocab[p[0]], vocab[p[1]])), p) for p, c in stats.items()]
    heapq.heapify(heap)
    for k in range(num_merges):
        while heap and stats.get(heap[0][2], 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale entry: the pair's count changed since it was pushed
        if not heap:
            return
        pair = heapq.heappop(heap)[2]
        new_id = 256 + k
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        changed: set[tuple[int, int]] = set()
        for i in where.pop(pair, ()):
            w, f = words[i], freqs[i]
            old, new_w = _word_pairs(w), _merge(w, pair, new_id)
            new = _word_pairs(new_w)
            words[i] = new_w
            for p in old.keys() | new.keys():
                d = new.get(p, 0) - old.get(p, 0)
                if d:
                    stats[p] = stats.get(p, 0) + d * f
                    changed.add(p)
                if p not in new and p != pair:
                    where.get(p, set()).discard(i)
                elif p in new:
                    where.setdefault(p, set()).add(i)
        stats.pop(pair, None)
        for p in changed:
            c = stats.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, _Greatest((vocab[p[0]], vocab[p[1]])), p))
            else:
                stats.pop(p, None)
        yield pair, new_id


TRAINERS = {"plain": _train_plain, "fast": _train_fast}


# ----------------------------------------------------------------------------------------------
# The tokenizer


class BPETokenizer(Tokenizer):
    """Byte-level BPE with a regex pre-tokenizer and special tokens (GPT-2 / GPT-4 style).

    >>> tok = BPETokenizer.train("low lower lowest " * 20, vocab_size=260)
    >>> tok.decode(tok.encode("lowest")) == "lowest"
    True
    """

    kind = "bpe"

    def __init__(
        self,
        merges: dict[tuple[int, int], int] | Iterable[tuple[tuple[int, int], int]] = (),
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: dict[str, int] | None = None,
        byte_ids: Iterable[int] | None = None,
        cache_size: int = 1_000_000,
    ) -> None:
        merges = dict(merges)
        self.byte_ids = list(range(256)) if byte_ids is None else [int(i) for i in byte_ids]
        if len(self.byte_ids) != 256 or len(set(self.byte_ids)) != 256:
            raise ValueError(f"byte_ids must hold 256 distinct ids, got {len(self.byte_ids)} "
                             f"({len(set(self.byte_ids))} distinct)")
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
        self.pattern = pattern
        self._compiled = regex.compile(pattern)
        self.vocab: dict[int, bytes] = {i: bytes([b]) for b, i in enumerate(self.byte_ids)}
        self.merges: dict[tuple[int, int], int] = {}
        for (a, b), new_id in merges.items():  # in merge order
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merges must only use ids defined before them, got ({a}, {b}) -> {new_id}")
            if new_id in self.vocab:
                raise ValueError(f"merges must create new ids, got id {new_id} twice")
            self.merges[(a, b)] = new_id
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        self.special_tokens: dict[str, int] = {}
        for name, i in (special_tokens or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"special_tokens keys must be non-empty strings, got {name!r}")
            check_int(f"special_tokens[{name!r}]", i, minimum=0)
            if i in self.vocab or i in self.special_tokens.values():
                raise ValueError(f"special_tokens[{name!r}] must be an unused id, got {i}")
            self.special_tokens[name] = i
        self.inverse_special = {i: s for s, i in self.special_tokens.items()}
        self.cache_size = check_int("cache_size", cache_size, minimum=0)  # chunks remembered; 0 = no cache
        self._cache: dict[str, list[int]] = {}

    # --- training -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str = GPT4_SPLIT_PATTERN,
        special_tokens: Iterable[str] = (),
        trainer: str = "fast",
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256`` merges from ``text``; special tokens get the ids after them.

        ``trainer``: "fast" (incremental pair counts) or "plain" (recount after every merge); both
        return the same merges. Raises if the text has fewer distinct pairs to merge than asked.
        """
        _check_text(text)
        check_int("vocab_size", vocab_size, minimum=256)
        if trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {sorted(TRAINERS)}, got {trainer!r}")
        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special_tokens must be non-empty strings, got {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special_tokens must not repeat a name, got {specials}")
        counts = _chunk_counts(text, pattern, specials)
        words = [list(c) for c in counts]
        freqs = list(counts.values())
        vocab = {i: bytes([i]) for i in range(256)}
        merges = dict(TRAINERS[trainer](words, freqs, vocab_size - 256, vocab))
        if len(merges) < vocab_size - 256:
            raise ValueError(
                f"vocab_size must be at most {256 + len(merges)} for this text (256 bytes + "
                f"{len(merges)} possible merges), got {vocab_size}"
            )
        special_ids = {s: vocab_size + k for k, s in enumerate(specials)}
        return cls(merges, pattern=pattern, special_tokens=special_ids)

    # --- production vocabularies ----------------------------------------------------------------

    @classmethod
    def from_tiktoken(
        cls, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int] | None = None
    ) -> BPETokenizer:
        """Load tiktoken ranks (token bytes -> id), e.g. ``tiktoken.get_encoding(...)._mergeable_ranks``.

        Each multi-byte token's merge is recovered by byte-pair encoding its bytes with the ranks
        below its own: the two parts left at the end are the pair it was merged from.
        """
        if not isinstance(mergeable_ranks, dict):
            raise TypeError(f"mergeable_ranks must be a dict of bytes -> int, got {type(mergeable_ranks).__name__}")
        byte_ids = []
        for b in range(256):
            if bytes([b]) not in mergeable_ranks:
                raise ValueError(f"mergeable_ranks must contain every single byte, missing {bytes([b])!r}")
            byte_ids.append(mergeable_ranks[bytes([b])])
        merges = {}
        for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
            if len(token) == 1:
                continue
            parts = _rank_bpe(mergeable_ranks, token, max_rank=rank)
            if len(parts) != 2:
                raise ValueError(f"mergeable_ranks cannot be produced by merges: token {token!r} (rank {rank}) "
                                 f"splits into {len(parts)} parts with the lower ranks")
            merges[(mergeable_ranks[parts[0]], mergeable_ranks[parts[1]])] = rank
        return cls(merges, pattern=pattern, special_tokens=special_tokens, byte_ids=byte_ids)

    # --- sizes ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (tiktoken's ``n_vocab``); ids without a token may exist."""
        return max(max(self.vocab), max(self.special_tokens.values(), default=-1)) + 1

    # --- encoding -------------------------------------------------------------------------------

    def _encode_chunk(self, chunk: str) -> list[int]:
        """BPE inside one pre-token: merge the lowest-ranked learned pair until none is left."""
        cached = self._cache.get(chunk)
        if cached is not None:
            return cached
        byte_ids, merges = self.byte_ids, self.merges
        ids = [byte_ids[b] for b in chunk.encode("utf-8")]
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:], strict=False), key=lambda p: merges.get(p, _INF))
            if pair not in merges:
                break
            ids = _merge(ids, pair, merges[pair])
        if len(self._cache) < self.cache_size:
            self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` treating special-token strings as ordinary text."""
        _check_text(text)
        out: list[int] = []
        for chunk in self._compiled.findall(text):
            out.extend(self._encode_chunk(chunk))
        return out

    def _allowed(self, allowed_special: str | Iterable[str]) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all' or a set of special-token names, got {allowed_special!r}")
        allowed = set(allowed_special)
        unknown = sorted(allowed - set(self.special_tokens))
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens {unknown}; "
                             f"known: {sorted(self.special_tokens)}")
        return allowed

    def _check_disallowed(self, text: str, allowed: set[str]) -> None:
        disallowed = sorted((s for s in self.special_tokens if s not in allowed), key=len, reverse=True)
        found = regex.search("|".join(regex.escape(s) for s in disallowed), text) if disallowed else None
        if found:  # the first one in the text, as tiktoken reports it
            s = found.group()
            raise ValueError(
                f"text contains the special token {s!r}, which is not in allowed_special; pass "
                f"allowed_special={{{s!r}}} (or 'all') to encode it as id {self.special_tokens[s]}, "
                f"or use encode_ordinary to encode it as text"
            )

    def encode(self, text: str, allowed_special: str | Iterable[str] = frozenset()) -> list[int]:
        """Encode ``text``; special tokens named in ``allowed_special`` (a set, or "all") become their ids.

        A special token that appears in the text but is not allowed raises a ``ValueError`` (as
        tiktoken's default ``disallowed_special="all"``). Overlapping special tokens: longest wins.
        """
        _check_text(text)
        allowed = self._allowed(allowed_special)
        self._check_disallowed(text, allowed)
        if not allowed:
            return self.encode_ordinary(text)
        specials = sorted(allowed, key=len, reverse=True)  # alternation tries the longest first
        splitter = "(" + "|".join(regex.escape(s) for s in specials) + ")"
        out: list[int] = []
        for k, piece in enumerate(regex.split(splitter, text)):
            if k % 2:
                out.append(self.special_tokens[piece])
            elif piece:
                out.extend(self.encode_ordinary(piece))
        return out

    def encode_iterable(
        self, lines: Iterable[str], allowed_special: str | Iterable[str] = frozenset()
    ) -> Iterator[int]:
        """Stream the ids of ``"".join(lines)`` (e.g. an open text file), holding only a short buffer.

        The buffer is cut where the pre-tokenization cannot change with later text: after a chunk
        that ends in a letter followed by whitespace, or ends in a newline followed by a letter
        (true for the GPT-2 and GPT-4 patterns), and never inside a possible special token. A
        line with no such place stays in the buffer until one comes.
        """
        allowed = self._allowed(allowed_special)
        longest = max((len(s) for s in self.special_tokens), default=1)
        buffer = ""
        for k, line in enumerate(lines):
            buffer += _check_text(line, name=f"lines[{k}]")
            cut = self._safe_cut(buffer, limit=len(buffer) - longest + 1)
            if cut > 0:
                yield from self.encode(buffer[:cut], allowed_special=allowed)
                buffer = buffer[cut:]
        if buffer:
            yield from self.encode(buffer, allowed_special=allowed)

    def _safe_cut(self, text: str, limit: int) -> int:
        """The last chunk boundary c <= limit (< len(text)) after which later text cannot change the
        chunks before c; 0 when there is none."""
        best = 0
        for m in self._compiled.finditer(text):
            c = m.end()
            if c > limit or c >= len(text):
                break
            prev, nxt = text[c - 1], text[c]
            if (_LETTER.match(prev) and nxt.isspace()) or (prev == "\n" and _LETTER.match(nxt)):
                best = c
        return best

    # --- decoding -------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """ids -> the concatenated token bytes (may end inside a UTF-8 character)."""
        ids = _check_ids(ids, self.vocab_size)
        parts = []
        for i in ids:
            if i in self.vocab:
                parts.append(self.vocab[i])
            elif i in self.inverse_special:
                parts.append(self.inverse_special[i].encode("utf-8"))
            else:
                raise ValueError(f"ids must be ids of tokens; id {i} has no token in this vocabulary")
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; invalid UTF-8 (a sequence cut inside a character) becomes U+FFFD, as tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "pattern": self.pattern,
            "byte_ids": None if self.byte_ids == list(range(256)) else self.byte_ids,
            "merges": [[a, b, i] for (a, b), i in self.merges.items()],
            "special_tokens": dict(self.special_tokens),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BPETokenizer:
        """Inverse of ``to_dict``."""
        missing = [k for k in ("pattern", "merges", "special_tokens") if k not in data]
        if missing:
            raise ValueError(f"data of type 'bpe' must have the keys pattern, merges, special_tokens; "
                             f"missing {missing}")
        merges = {(int(a), int(b)): int(i) for a, b, i in data["merges"]}
        return cls(merges, pattern=data["pattern"], special_tokens=data["special_tokens"],
                   byte_ids=data.get("byte_ids"))

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)})")


def _rank_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken-style BPE of ``token``'s bytes using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]
