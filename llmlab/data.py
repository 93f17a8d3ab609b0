"""Text data for the tiny-LLM chapters: a self-generated corpus, local/online loaders, and batching.

What it implements
- ``generate_corpus``: an English-like corpus the project makes itself, so that training, tests
  and notebooks never need a download. It is produced by a small probabilistic grammar of short
  children's stories (in the spirit of TinyStories, Eldan and Li 2023, but written by rules, not by
  a language model). Each story introduces a named character (with a matching pronoun) in a place,
  then chains event sentences drawn from a dozen templates: trips with a purpose, finding and
  sharing objects, quoted dialogue with "said"/"asked", weather, counting with number words,
  feelings with "because"/"so"/"but" clauses, and simple facts ("A cat has four legs."). Stories
  end with a moral or "The end." and are separated by blank lines. The vocabulary is deliberately
  small and some phrases are very frequent ("and they played in the garden", "was very happy"),
  and phrases end where other phrases begin, so a small model learns fluent sentences quickly
  and greedy decoding falls into the repetition loops the decoding chapter studies. Only a
  ``random.Random(seed)`` and fixed word lists are used, never set or dict iteration order, so
  a seed gives the same text on every machine and Python version; one megabyte takes well under
  a second.
- ``corpus_stats``: character, word, line and story counts of a text.
- ``load_text`` (any local UTF-8 file) and ``load_tiny_shakespeare``: the optional online loader
  for the Tiny Shakespeare text of Karpathy's char-rnn, also used by nanoGPT's
  ``shakespeare_char``, cached on disk, with a clear message when offline.
- ``train_val_split`` (first 90% for training, the last 10% for validation, as nanoGPT) and
  ``get_batch``: random windows (x, y) with y the next token of every x position, reproducible
  with a ``torch.Generator``.

What it leaves out: document-level shuffling, packing with separator tokens, streaming datasets.
"""

from __future__ import annotations

import random
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llmlab.shapes import check_float, check_int, check_tensor

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_CORPUS_CHARS = 1_200_000  # a little over 1 MB: a couple of minutes of CPU training

# ----------------------------------------------------------------------------------------------
# The story grammar. Word lists are tuples (fixed order), so random.choice is reproducible.

_HE, _SHE = ("he", "his", "him"), ("she", "her", "her")
_NAMES = (
    ("Tom", _HE), ("Lily", _SHE), ("Ben", _HE), ("Mia", _SHE), ("Sam", _HE), ("Anna", _SHE),
    ("Max", _HE), ("Lucy", _SHE), ("Leo", _HE), ("Emma", _SHE), ("Jack", _HE), ("Zoe", _SHE),
    ("Tim", _HE), ("Sara", _SHE), ("Finn", _HE), ("Ella", _SHE),
)  # fmt: skip
_KINDS = ("boy", "girl")  # index 0 for "he", 1 for "she"
_ANIMALS = ("dog", "cat", "bird", "rabbit", "fox", "duck", "frog", "horse", "mouse", "bear")
_ANIMAL_SOUNDS = {"dog": "Woof", "cat": "Meow", "bird": "Tweet", "duck": "Quack", "frog": "Ribbit"}
_PLACES = (
    "the garden", "the park", "the forest", "the river", "the market", "the school", "the beach",
    "the farm", "the hill", "the lake", "the village", "the old house", "the big tree", "the town",
)  # fmt: skip
_OBJECTS = (
    "ball", "box", "book", "hat", "kite", "cake", "apple", "boat", "stone", "key", "cup", "flower",
    "toy", "shell", "map", "drum",
)  # fmt: skip
_ADJECTIVES = (
    "big", "small", "red", "blue", "green", "shiny", "old", "new", "little", "soft", "funny", "pretty",
    "yellow", "round",
)  # fmt: skip
_FEELINGS = ("happy", "sad", "scared", "excited", "tired", "proud", "angry", "surprised", "kind")
_GOOD_FEELINGS = ("happy", "excited", "proud")
_WEATHER = (
    "The sun was shining", "It was a cold morning", "It was raining", "The wind was blowing",
    "The sky was blue", "It was a warm day", "Snow was falling",
)  # fmt: skip
_ACTIVITIES = (
    "played", "ran", "sang", "danced", "laughed", "walked", "jumped", "read a book", "ate an apple",
)  # fmt: skip
_PURPOSES = (
    "play with a ball", "look for a friend", "buy some bread", "find a shiny stone", "see the ducks",
    "fly a kite", "pick some flowers", "read a book", "swim in the water", "help a friend",
)  # fmt: skip
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_FACTS = (
    "A cat has four legs.", "A bird can fly.", "Fish live in the water.", "The sun is hot.",
    "The moon comes out at night.", "Snow is cold and white.", "A week has seven days.",
    "Bees make honey.", "Trees grow from small seeds.", "Rain helps the flowers grow.",
    "A dog can run fast.", "The sea is very big.", "Frogs can jump high.", "Apples grow on trees.",
)  # fmt: skip
_MORALS = (
    "It is good to share with your friends.", "Friends help each other.", "It is good to be kind.",
    "It is good to say sorry.", "Be brave and try again.", "Always tell the truth.",
)  # fmt: skip
_SAY = ("said", "asked", "cried", "shouted", "whispered")


def _a(word: str) -> str:
    """The English indefinite article for ``word``: "an apple", "a ball"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(word: str) -> str:
    """Regular English plural, shared by the corpus generators: -es after s, x, sh, ch and o,
    consonant + y -> ies, otherwise -s.

    >>> [plural(w) for w in ("ball", "box", "peach", "potato", "berry", "toy")]
    ['balls', 'boxes', 'peaches', 'potatoes', 'berries', 'toys']
    """
    if word.endswith(("s", "x", "sh", "ch", "o")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


class _Story:
    """One story's state: its hero, a friend, a place, and a sentence list that grows."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.name, (self.he, self.his, self.him) = rng.choice(_NAMES)
        friends = [n for n in _NAMES if n[0] != self.name]
        self.friend, (self.fhe, _, _) = rng.choice(friends)
        self.animal = rng.choice(_ANIMALS)
        self.place = rng.choice(_PLACES)
        self.obj = rng.choice(_OBJECTS)
        self.adj = rng.choice(_ADJECTIVES)
        self.kind = _KINDS[0] if self.he == "he" else _KINDS[1]

    def opening(self) -> str:
        r = self.rng
        return r.choice(
            (
                f"Once upon a time, there was a little {self.kind} named {self.name}.",
                f"Once upon a time, there was a {r.choice(_ADJECTIVES)} {self.animal} named {self.name}.",
                f"One day, {self.name} went to {self.place}.",
                f"{self.name} lived in a small house near {self.place}.",
                f"There was a {self.kind} called {self.name} who liked to {r.choice(_PURPOSES)}.",
            )
        )

    def event(self) -> str:
        r, n, he, his = self.rng, self.name, self.he, self.his
        templates = (
            lambda: f"One day, {n} went to {r.choice(_PLACES)} to {r.choice(_PURPOSES)}.",
            lambda: f"{n} saw {_a(self.adj)} {self.obj} near {r.choice(_PLACES)}.",
            lambda: f"{_cap(he)} was very {r.choice(_FEELINGS)} because {he} had {_a(self.adj)} {self.obj}.",
            lambda: f"{n} and {self.friend} {r.choice(_ACTIVITIES)} in {self.place} all day.",
            lambda: f"{r.choice(_WEATHER)}, so {n} and {self.friend} played in the garden.",
            lambda: f"{n} had {r.choice(_NUMBERS)} {plural(self.obj)}, and {he} gave one to {self.friend}.",
            lambda: f"{n} wanted to {r.choice(_PURPOSES)}, but {he} was too {r.choice(_FEELINGS)}.",
            lambda: f"Then {he} saw {_a(self.animal)}. The {self.animal} was {r.choice(_FEELINGS)}.",
            lambda: f"{_cap(his)} friend {self.friend} came to {self.place} and they played together.",
            lambda: f"{_cap(he)} looked for the {self.obj} in {r.choice(_PLACES)}, but it was not there.",
            lambda: f"{n} was very happy and {he} {r.choice(_ACTIVITIES)} with {self.friend}.",
            lambda: f"{r.choice(_FACTS)} {n} knew that.",
            self.dialogue,
            self.dialogue,
            self.animal_sound,
        )
        return r.choice(templates)()

    def dialogue(self) -> str:
        r, n, f = self.rng, self.name, self.friend
        lines = (
            f'"Can we go to {r.choice(_PLACES)}?" asked {n}. "Yes, we can," said {f}.',
            f'"Look at my {self.adj} {self.obj}!" {r.choice(_SAY)} {n}.',
            f'"I am {r.choice(_FEELINGS)}," said {n}. "Why?" asked {f}.',
            f'"Do you want to play with me?" asked {n}. "Yes!" said {f}.',
            f'"Thank you, {f}," said {n}. "You are my best friend."',
            f'"Where is my {self.obj}?" asked {n}. "I do not know," said {f}.',
            f'{f} said, "Let us {r.choice(_PURPOSES)}." {n} said, "Yes, let us go!"',
        )
        return r.choice(lines)

    def animal_sound(self) -> str:
        sound = _ANIMAL_SOUNDS.get(self.animal, "Hello")
        return f'The {self.animal} said, "{sound}, {sound.lower()}!" and {self.name} laughed.'

    def ending(self) -> str:
        r, n = self.rng, self.name
        return r.choice(
            (
                f"From that day on, {n} and {self.friend} were best friends.",
                f"{n} went home and was very {r.choice(_GOOD_FEELINGS)}. The end.",
                f"{r.choice(_MORALS)} The end.",
                f"At night, {n} went to bed and dreamed about the {self.obj}.",
                f"{n} and {self.friend} were very happy. The end.",
            )
        )


def _story(rng: random.Random) -> str:
    """One story: an opening, 3 to 9 events in one or two paragraphs, and an ending."""
    s = _Story(rng)
    sentences = [s.opening()] + [s.event() for _ in range(rng.randint(3, 9))] + [s.ending()]
    if len(sentences) > 6 and rng.random() < 0.5:
        cut = rng.randint(3, len(sentences) - 2)
        return " ".join(sentences[:cut]) + "\n" + " ".join(sentences[cut:])
    return " ".join(sentences)


def generate_corpus(num_chars: int = DEFAULT_CORPUS_CHARS, seed: int = 0) -> str:
    """Deterministic English-like stories: at least ``num_chars`` characters, ending after a story.

    Stories are separated by a blank line. The same (num_chars, seed) gives the same text on every
    machine (only ``random.Random(seed)`` and fixed-order word lists are used).

    >>> text = generate_corpus(2000, seed=0)
    >>> len(text) >= 2000 and text == generate_corpus(2000, seed=0)
    True
    """
    return sample_documents(_story, num_chars, seed)


def sample_documents(make_document: Callable[[random.Random], str], num_chars: int, seed: int = 0) -> str:
    """Documents ``make_document(rng)`` from one ``random.Random(seed)``, each followed by a blank line,
    until at least ``num_chars`` characters: the loop behind every generated corpus in llmlab."""
    num_chars = check_int("num_chars", num_chars, minimum=1)
    rng = random.Random(check_int("seed", seed))
    parts, total = [], 0
    while total < num_chars:
        document = make_document(rng) + "\n\n"
        parts.append(document)
        total += len(document)
    return "".join(parts)


def corpus_stats(text: str) -> dict[str, int]:
    """Counts of characters, distinct characters, words, lines and blank-line-separated stories."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return {
        "num_chars": len(text),
        "num_distinct_chars": len(set(text)),
        "num_words": len(text.split()),
        "num_lines": text.count("\n"),
        "num_stories": sum(1 for p in text.split("\n\n") if p.strip()),
    }


# ----------------------------------------------------------------------------------------------
# Loading text files


def load_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The whole text of a local file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path must be an existing text file, got {str(p)!r} (no such file)")
    return p.read_text(encoding=encoding)


def default_cache_dir() -> Path:
    """~/.cache/llmlab: where optional downloads are kept."""
    return Path.home() / ".cache" / "llmlab"


def load_tiny_shakespeare(
    cache_dir: str | Path | None = None, url: str = TINY_SHAKESPEARE_URL, timeout: float = 10.0
) -> str:
    """Tiny Shakespeare (about 1.1 M characters), read from ``cache_dir`` or downloaded once into it.

    This is the only function in llmlab that uses the network, and only when the user calls it and
    the file is not cached yet. Offline, it raises ``ConnectionError`` saying where to put the file.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tinyshakespeare.txt"
    if path.is_file():
        return load_text(path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as err:
        raise ConnectionError(
            f"could not download Tiny Shakespeare from {url} ({err}). If you are offline, download it "
            f"elsewhere and save it as {path}, or use llmlab.data.load_text(path) on any local file, "
            f"or generate_corpus() which needs no network."
        ) from err
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return text


# ----------------------------------------------------------------------------------------------
# Splitting and batching


def train_val_split(ids: Sequence[int] | torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """First (1 - val_fraction) of the ids for training, the rest for validation (no shuffling).

    Returns two int64 tensors (N_train,), (N_val,). Splitting by position, as nanoGPT does, keeps
    whole stretches of text out of training instead of leaking neighbours of training windows.

    >>> train, val = train_val_split(list(range(10)))
    >>> train.tolist(), val.tolist()
    ([0, 1, 2, 3, 4, 5, 6, 7, 8], [9])
    """
    val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
    data = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)  # (N,)
    check_tensor("ids", data, ndim=1, layout="(N,)")
    n_train = int(len(data) * (1.0 - val_fraction))
    if n_train < 1 or n_train >= len(data):
        raise ValueError(f"ids must be long enough to give both splits at val_fraction={val_fraction}, got {len(data)}")
    return data[:n_train].long(), data[n_train:].long()  # (N_train,), (N_val,)


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x = data[i : i + T], y = data[i + 1 : i + T + 1] for B random starts i.

    Returns (x, y), both (B, T) int64 on ``device``; y[b, t] is the token after x[b, t].
    The same ``generator`` state gives the same batch.

    >>> x, y = get_batch(torch.arange(100), 4, 8, torch.Generator().manual_seed(0))
    >>> x.shape, bool((y == x + 1).all())
    (torch.Size([4, 8]), True)
    """
    check_tensor("data", data, ndim=1, layout="(N,)")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    block_size = check_int("block_size", block_size, minimum=1)
    if len(data) <= block_size:
        raise ValueError(f"data must hold more than block_size={block_size} tokens, got {len(data)}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    idx = starts[:, None] + torch.arange(block_size)  # (B, T)
    x, y = data[idx], data[idx + 1]  # (B, T), (B, T)
    return x.to(device), y.to(device)
