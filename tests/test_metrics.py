"""llmlab.metrics against sacrebleu 2.6.0, rouge-score 0.1.2, hand-checked SQuAD cases, the exact
pass@k combinatorics, and the model's own loss."""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from llmlab import metrics
from llmlab.tokenizer import CharTokenizer
from tests.models import tiny_llmlab

_WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "runs", "running", "quickly", "to",
          "park", "studies", "studied", "3.50", "U.S.", "well-known", "it's", "$5", "(yes)", "1-2")
_PUNCT = ("", "", "", ",", ".", "!", "?", ";", ":", '"', "&quot;", "&amp;")


def _sentence(rng: random.Random, lo: int = 0, hi: int = 14) -> str:
    words = [rng.choice(_WORDS) + rng.choice(_PUNCT) for _ in range(rng.randint(lo, hi))]
    return " ".join(words)


def _related(rng: random.Random, ref: str) -> str:
    """A hypothesis that shares some n-grams with ``ref``: words dropped, swapped, replaced."""
    words = ref.split()
    out = [w if rng.random() < 0.7 else rng.choice(_WORDS) for w in words if rng.random() < 0.85]
    if len(out) > 2 and rng.random() < 0.5:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return " ".join(out)


def _corpus(seed: int, n_seg: int, n_refs: int):
    rng = random.Random(seed)
    refs = [[_sentence(rng, 1) for _ in range(n_seg)] for _ in range(n_refs)]
    hyps = [_related(rng, refs[0][i]) if rng.random() < 0.8 else _sentence(rng) for i in range(n_seg)]
    return hyps, refs


# ----------------------------------------------------------------------------------------------
# BLEU and chrF vs sacrebleu


def test_tokenize_13a_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    ref = Tokenizer13a()
    rng = random.Random(0)
    lines = [_sentence(rng) for _ in range(200)] + [
        "It costs $3.50, i.e. 3,000.5 dollars-ish.", "a-\nb\nc <skipped> d", "x&lt;y&gt;z &amp; q",
        "1990-2000 {braces} [brackets] back\\slash ~tilde^ `tick`", "",
    ]
    assert sacrebleu.__version__ == "2.6.0"
    for line in lines:
        assert metrics.tokenize_13a(line) == ref(line), line


@pytest.mark.parametrize("seed,n_seg,n_refs", [(0, 1, 1), (1, 5, 1), (2, 20, 2), (3, 40, 3), (4, 3, 4)])
def test_corpus_bleu_and_chrf_equal_sacrebleu(seed, n_seg, n_refs):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = _corpus(seed, n_seg, n_refs)
    assert metrics.corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score,
                                                            rel=1e-9, abs=1e-9)
    eff = sacrebleu.corpus_bleu(hyps, refs, use_effective_order=True).score
    assert metrics.corpus_bleu(hyps, refs, effective_order=True) == pytest.approx(eff, rel=1e-9, abs=1e-9)
    assert metrics.corpus_chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score,
                                                            rel=1e-9, abs=1e-9)


def test_sentence_bleu_and_chrf_equal_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(5)
    scores = []
    for _ in range(150):
        refs = [_sentence(rng, 1) for _ in range(rng.randint(1, 3))]
        hyp = _related(rng, refs[0]) if rng.random() < 0.8 else _sentence(rng)
        want = sacrebleu.sentence_bleu(hyp, refs).score
        assert metrics.sentence_bleu(hyp, refs) == pytest.approx(want, rel=1e-9, abs=1e-9), (hyp, refs)
        assert metrics.sentence_chrf(hyp, refs) == pytest.approx(sacrebleu.sentence_chrf(hyp, refs).score,
                                                                 rel=1e-9, abs=1e-9), (hyp, refs)
        scores.append(want)
    assert len({round(x, 6) for x in scores}) > 50  # the inputs cover many different scores


def test_bleu_extremes_and_brevity_penalty():
    assert metrics.corpus_bleu(["a b c d e"], [["a b c d e"]]) == pytest.approx(100.0)
    assert metrics.corpus_bleu(["x y z w"], [["a b c d"]]) == 0.0
    # a correct but half-length hypothesis: all precisions 1, BP = exp(1 - 8/4)
    assert metrics.corpus_bleu(["a b c d"], [["a b c d e f g h"]]) == pytest.approx(100 * math.exp(-1))


# ----------------------------------------------------------------------------------------------
# ROUGE vs rouge-score


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_equals_rouge_score(use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    kinds = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=use_stemmer)
    rng = random.Random(7 + use_stemmer)
    cases = [("", "the cat"), ("the cat", ""), ("The CATS were running!", "the cat was running"),
             ("a b\nc d\n\ne", "c d e\na b")]
    for _ in range(80):
        ref = "\n".join(_sentence(rng, 1) for _ in range(rng.randint(1, 3)))
        pred = "\n".join(_related(rng, s) for s in ref.split("\n")[::-1]) if rng.random() < 0.8 \
            else _sentence(rng)
        cases.append((pred, ref))
    for pred, ref in cases:
        want = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for kind in kinds:
            got = metrics.rouge(pred, ref, kind=kind, use_stemmer=use_stemmer)
            assert got == pytest.approx(want[kind].fmeasure, rel=1e-12, abs=1e-12), (kind, pred, ref)


def test_stemming_changes_rouge():
    # "cats ran" vs "cat ran": unigram overlap 1 of 2 without stemming, 2 of 2 with it
    assert metrics.rouge("cats ran", "cat ran", "rouge1") == pytest.approx(0.5)
    assert metrics.rouge("cats ran", "cat ran", "rouge1", use_stemmer=True) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# SQuAD EM / F1: hand-checked cases


@pytest.mark.parametrize("pred,gold,em,f1", [
    ("Denver Broncos", "Denver Broncos", 1.0, 1.0),
    ("the Denver Broncos!", "Denver Broncos", 1.0, 1.0),       # article and punctuation dropped
    ("Denver", "Denver Broncos", 0.0, 2 / 3),                  # P=1, R=1/2
    ("in Denver in 1999", "Denver, 1999", 0.0, 2 * (2 / 4) * 1 / (2 / 4 + 1)),  # P=1/2, R=1
    ("Broncos Denver", "Denver Broncos", 0.0, 1.0),            # F1 ignores order, EM does not
    ("a an the", "the", 1.0, 1.0),                             # both normalize to empty
    ("", "Denver", 0.0, 0.0),
    ("cat cat", "cat", 0.0, 2 * 0.5 * 1 / 1.5),                # counts are clipped: P=1/2, R=1
    ("Paris", ["London", "paris."], 1.0, 1.0),                 # best over gold answers
])
def test_exact_match_and_token_f1_hand_checked(pred, gold, em, f1):
    assert metrics.exact_match(pred, gold) == em
    assert metrics.token_f1(pred, gold) == pytest.approx(f1)


def test_squad_normalization_keeps_words_containing_articles():
    assert metrics.normalize_answer("Theater, an Anthem; A--B") == "theater anthem ab"


# ----------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_equals_combinatorics_and_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
                if n <= 6:  # enumerate every k-subset of n samples of which the first c pass
                    subsets = list(itertools.combinations(range(n), k))
                    frac = sum(any(i < c for i in s) for s in subsets) / len(subsets)
                    assert metrics.pass_at_k(n, c, k) == pytest.approx(frac, abs=1e-12)
    assert metrics.pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))


def test_pass_at_k_is_unbiased_and_the_plug_in_is_not():
    # E over c ~ Binomial(n, p) of the estimator vs the true pass@k = 1 - (1-p)^k
    n, k = 20, 5
    for p in (0.05, 0.2, 0.5):
        weights = [math.comb(n, c) * p**c * (1 - p) ** (n - c) for c in range(n + 1)]
        unbiased = sum(w * metrics.pass_at_k(n, c, k) for c, w in enumerate(weights))
        biased = sum(w * metrics.pass_at_k_biased(n, c, k) for c, w in enumerate(weights))
        truth = 1 - (1 - p) ** k
        assert unbiased == pytest.approx(truth, abs=1e-12)
        assert biased < truth - 1e-3  # Jensen: 1 - (1 - x)^k is concave in x


# ----------------------------------------------------------------------------------------------
# Perplexity and multiple choice on a tiny model


def test_sequence_nll_equals_model_loss_and_sliding_windows():
    model = tiny_llmlab(0)
    block = model.config.block_size
    ids = torch.randint(0, 64, (1, block), generator=torch.Generator().manual_seed(0))
    nll = metrics.sequence_nll(model, ids[0])
    with torch.no_grad():
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    torch.testing.assert_close(nll.mean(), loss, rtol=1e-5, atol=1e-6)
    long = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(1))
    for max_length, stride in ((16, 16), (16, 5), (8, 1)):
        got = metrics.sequence_nll(model, long, max_length=max_length, stride=stride)
        assert got.shape == (99,)
        if stride == 1:  # every token predicted from exactly the max_length-1 tokens before it
            for t in (3, 40, 99):
                window = long[max(0, t - max_length + 1): t + 1][None]
                with torch.no_grad():
                    lp = F.log_softmax(model(window).logits[0, -2], -1)
                torch.testing.assert_close(got[t - 1], -lp[long[t]], rtol=1e-5, atol=1e-5)


def test_text_nll_units():
    model = tiny_llmlab(0)
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,é")
    text = ("the café is open. " * 4)[:64]  # longer than the model's 32-token window
    r = metrics.text_nll(model, tok, text)
    assert r.num_tokens == r.num_chars == len(text) - 1
    assert r.num_bytes == r.num_chars + text[1:].count("é")  # é is two UTF-8 bytes
    assert r.perplexity == pytest.approx(math.exp(r.total_nats / r.num_tokens))
    assert r.bits_per_character == pytest.approx(r.total_nats / math.log(2) / r.num_chars)
    assert r.bits_per_byte < r.bits_per_character


def _masked_option_ll(model, tok, text: str, n_option: int) -> float:
    """Summed log-likelihood of the last n_option characters of text, from the model's loss."""
    ids = torch.tensor([tok.encode(text)])  # (1, T+1)
    targets = ids[:, 1:].clone()
    targets[:, : ids.shape[1] - 1 - n_option] = -100  # loss only on the option's characters
    with torch.no_grad():
        return -float(model(ids[:, :-1], targets=targets).loss) * n_option


def test_score_choices_equals_masked_loss_and_acc_norm():
    model = tiny_llmlab(3)
    block = model.config.block_size
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .")
    context, choices = "the dog ran to ", ["park.", "a", "the old house."]
    assert len(context) + max(map(len, choices)) <= block + 1
    s = metrics.score_choices(model, tok, context, choices)
    for choice, ll in zip(choices, s.loglikelihoods, strict=True):
        assert ll == pytest.approx(_masked_option_ll(model, tok, context + choice, len(choice)), rel=1e-5)
    assert s.lengths == [len(c) for c in choices]
    per_char = [ll / n for ll, n in zip(s.loglikelihoods, s.lengths, strict=True)]
    assert s.pred == max(range(3), key=s.loglikelihoods.__getitem__)
    assert s.pred_norm == max(range(3), key=per_char.__getitem__)
    assert sum(s.probabilities()) == pytest.approx(1.0)
    assert sum(s.probabilities(normalized=True)) == pytest.approx(1.0)
    # a context longer than the model's window is cut from the left, as lm-evaluation-harness does
    long_context = "a cat sat on a mat and " * 4 + context
    long = metrics.score_choices(model, tok, long_context, choices)
    for choice, ll in zip(choices, long.loglikelihoods, strict=True):
        kept = (long_context + choice)[-(block + 1):]
        assert ll == pytest.approx(_masked_option_ll(model, tok, kept, len(choice)), rel=1e-5)


def test_calibration_bins_and_ngram_overlap():
    ece, rows = metrics.calibration_bins([0.25, 0.25, 0.25, 0.25, 1.0], [1, 0, 0, 0, 1], n_bins=4)
    assert ece == pytest.approx(0.0) and [r[2] for r in rows] == [4, 1]
    ece, _ = metrics.calibration_bins([0.95] * 10, [1] * 5 + [0] * 5)
    assert ece == pytest.approx(0.45)
    corpus = metrics.word_ngrams("one day tom went to the park to fly a kite", 3)
    assert metrics.ngram_overlap("Tom went to the park!", corpus, 3) == pytest.approx(1.0)
    assert metrics.ngram_overlap("Tom went to the lake", corpus, 3) == pytest.approx(2 / 3)
    assert metrics.ngram_overlap("too short", corpus, 3) == 0.0


# ----------------------------------------------------------------------------------------------
# Bad input names the argument


@pytest.mark.parametrize("call,exc,match", [
    (lambda: metrics.corpus_bleu(["a"], []), ValueError, "references must hold at least one"),
    (lambda: metrics.corpus_bleu(["a", "b"], [["a"]]), ValueError, r"references\[0\] must have one"),
    (lambda: metrics.corpus_bleu("a b", [["a b"]]), TypeError, "hypotheses must be a list"),
    (lambda: metrics.corpus_chrf(["a"], [["a"], ["b", "c"]]), ValueError, r"references\[1\]"),
    (lambda: metrics.sentence_bleu("a", []), ValueError, "references must hold at least one"),
    (lambda: metrics.rouge("a", "a", kind="rougeX"), ValueError, "kind must be one of"),
    (lambda: metrics.rouge(["a"], "a"), TypeError, "prediction must be a str"),
    (lambda: metrics.exact_match("a", []), ValueError, "references must hold at least one"),
    (lambda: metrics.token_f1("a", [1]), TypeError, r"references\[0\] must be a str"),
    (lambda: metrics.pass_at_k(5, 2, 6), ValueError, "k must be <= n=5"),
    (lambda: metrics.pass_at_k(5, 6, 1), ValueError, "c .* must be <= n=5"),
    (lambda: metrics.pass_at_k(0, 0, 1), ValueError, "n must be"),
    (lambda: metrics.pass_at_k_biased(3, 1, 1.5), TypeError, "k must be an integer"),
    (lambda: metrics.calibration_bins([0.5], [1, 0]), ValueError, "equal length"),
    (lambda: metrics.sequence_nll(tiny_llmlab(0), [1]), ValueError, "ids must hold at least 2"),
    (lambda: metrics.sequence_nll(tiny_llmlab(0), [1, 2, 3], 4, 5), ValueError, "stride must be <="),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_score_choices_rejects_bad_options():
    model, tok = tiny_llmlab(0), CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError, match="choices must hold at least 2"):
        metrics.score_choices(model, tok, "ab", ["c"])
    with pytest.raises(ValueError, match="choices must be non-empty"):
        metrics.score_choices(model, tok, "ab", ["c", ""])
