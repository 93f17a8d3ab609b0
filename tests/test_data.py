"""llmlab.data: the generated corpus is deterministic, large and fast to make; splits and batches
follow nanoGPT's conventions (first 90% train, y = x shifted by one) and are reproducible; the
optional Tiny Shakespeare loader uses its cache and fails clearly offline (no real network)."""

import hashlib
import time

import pytest
import torch

from llmlab.data import (
    corpus_stats,
    generate_corpus,
    get_batch,
    load_text,
    load_tiny_shakespeare,
    plural,
    train_val_split,
)
from llmlab.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus()


def test_corpus_is_at_least_a_megabyte_and_fast():
    start = time.perf_counter()
    text = generate_corpus(1_000_000, seed=3)
    assert time.perf_counter() - start < 5.0
    assert len(text.encode("utf-8")) >= 1_000_000


def test_corpus_is_deterministic_and_seeded(corpus):
    assert generate_corpus() == corpus
    assert generate_corpus(50_000, seed=1) != generate_corpus(50_000, seed=2)
    # A shorter request is a prefix of the same stream of stories.
    assert corpus.startswith(generate_corpus(10_000))


def test_corpus_fingerprint_is_stable_across_machines(corpus):
    # Pinned so that a change of word lists or of Python's random module is noticed: the shipped
    # checkpoint and its recorded validation loss depend on this exact text.
    assert hashlib.sha256(corpus.encode("utf-8")).hexdigest()[:16] == CORPUS_SHA256_PREFIX


def test_corpus_looks_like_english_stories(corpus):
    stats = corpus_stats(corpus)
    assert stats["num_stories"] > 1000
    assert 30 <= stats["num_distinct_chars"] <= 80
    assert stats["num_words"] > 150_000
    assert corpus.endswith("\n\n")
    assert "Once upon a time" in corpus and ",\" said" in corpus
    assert all(c.isascii() for c in set(corpus))


def test_plural_covers_every_noun_the_generators_pluralize():
    from llmlab import data, peft_domain

    expected = {"ball": "balls", "box": "boxes", "dish": "dishes", "peach": "peaches", "potato": "potatoes",
                "tomato": "tomatoes", "berry": "berries", "toy": "toys", "bus": "buses"}
    assert {w: plural(w) for w in expected} == expected
    for word in data._OBJECTS + peft_domain._MAINS:  # the stories' objects and the recipes' ingredients
        assert plural(word).startswith(word[:-1]) and plural(word).endswith("s"), word


def test_load_text(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hi there\n", encoding="utf-8")
    assert load_text(path) == "hi there\n"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text(tmp_path / "missing.txt")


def test_tiny_shakespeare_uses_cache_without_network(tmp_path):
    (tmp_path / "tinyshakespeare.txt").write_text("First Citizen:\n", encoding="utf-8")
    text = load_tiny_shakespeare(cache_dir=tmp_path, url="http://127.0.0.1:9/unreachable")
    assert text == "First Citizen:\n"


def test_tiny_shakespeare_offline_message(tmp_path):
    with pytest.raises(ConnectionError, match="offline"):
        load_tiny_shakespeare(cache_dir=tmp_path, url="http://127.0.0.1:9/unreachable", timeout=2.0)
    assert not (tmp_path / "tinyshakespeare.txt").exists()


def test_train_val_split_is_by_position():
    ids = list(range(1000))
    train, val = train_val_split(ids)
    assert train.dtype == torch.long and len(train) == 900 and len(val) == 100
    assert train.tolist() == ids[:900] and val.tolist() == ids[900:]
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(ids, val_fraction=1.0)
    with pytest.raises(ValueError, match="long enough"):
        train_val_split([1], val_fraction=0.5)


def test_get_batch_shapes_shift_and_determinism(corpus):
    tok = CharTokenizer.from_text(corpus)
    data = torch.tensor(tok.encode(corpus[:20_000]))
    x, y = get_batch(data, 6, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 32) and x.dtype == torch.long
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, y2 = get_batch(data, 6, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # every window is a real stretch of the data
    start = int((data.unfold(0, 32, 1) == x[0]).all(dim=1).nonzero()[0])
    assert torch.equal(y[0], data[start + 1 : start + 33])


def test_get_batch_errors():
    data = torch.arange(10)
    with pytest.raises(ValueError, match="block_size=10"):
        get_batch(data, 2, 10)
    with pytest.raises(ValueError, match="data must have 1 dimensions"):
        get_batch(data[None], 2, 4)
    with pytest.raises(TypeError, match="batch_size"):
        get_batch(data, 2.0, 4)


CORPUS_SHA256_PREFIX = "29e9895e54e4e21c"
