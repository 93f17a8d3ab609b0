"""llmlab.tokenizer: the character tokenizer round-trips text, has a deterministic sorted vocabulary,
refuses unknown characters unless given an unk token, and survives a JSON round trip."""

import json

import pytest

from llmlab.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, tokenizer_from_dict


def test_vocabulary_is_sorted_distinct_characters():
    tok = CharTokenizer.from_text("banana band")
    assert tok.chars == sorted(set("banana band"))
    assert tok.vocab_size == len(set("banana band"))
    assert isinstance(tok, Tokenizer)


def test_same_text_gives_same_ids_whatever_the_order_seen():
    a = CharTokenizer.from_text("abc xyz")
    b = CharTokenizer.from_text("zyx cba")
    assert a.encode("cab y") == b.encode("cab y")


def test_encode_decode_round_trip():
    text = 'Once upon a time, "Hi!" said Tom.\nThe end.'
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_unknown_character_raises_naming_it():
    tok = CharTokenizer.from_text("hello")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("hez")


def test_unk_policy_maps_unknown_characters():
    tok = CharTokenizer.from_text("hello", unk="?")
    assert tok.vocab_size == len(set("hello?"))
    assert tok.decode(tok.encode("hez!")) == "he??"


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(ValueError, match="vocab_size=2"):
        tok.decode([0, 2])
    with pytest.raises(TypeError, match="ids"):
        tok.decode("ab")


def test_bad_arguments():
    with pytest.raises(TypeError, match="text must be a str"):
        CharTokenizer.from_text(b"abc")
    with pytest.raises(ValueError, match="repeat"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="unk"):
        CharTokenizer(["a", "b"], unk="c")
    with pytest.raises(ValueError, match="type"):
        tokenizer_from_dict({"type": "bpe"})


def test_json_round_trip(tmp_path):
    tok = CharTokenizer.from_text("Hello, world!\n", unk="?")
    path = tok.save(tmp_path / "tok.json")
    assert json.loads(path.read_text(encoding="utf-8"))["type"] == "char"
    back = load_tokenizer(path)
    assert isinstance(back, CharTokenizer)
    assert back.chars == tok.chars and back.unk == tok.unk
    assert back.encode("world?") == tok.encode("world?")
    with pytest.raises(FileNotFoundError, match="path"):
        load_tokenizer(tmp_path / "missing.json")
