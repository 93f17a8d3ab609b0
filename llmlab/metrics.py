"""Evaluation metrics, each equal to the tool people report with.

What it implements
- Language-model metrics: ``sequence_nll`` / ``text_nll`` give the summed next-token negative
  log-likelihood of a text under an ``llmlab.LLM`` (sliding windows as in the transformers
  perplexity guide), and ``NLLResult`` turns it into perplexity (exp of the mean token NLL),
  bits per byte and bits per character. Perplexity is per *token*, so it depends on the
  tokenizer; bits per byte do not (Gao et al. 2020, The Pile).
- BLEU (Papineni et al. 2002) as sacreBLEU 2.x computes it (Post 2018): the mteval-v13a
  tokenization, clipped n-gram counts up to 4 against several references, the brevity penalty
  with the closest reference length, corpus statistics summed before the geometric mean, and
  smoothing "exp" (NIST: the k-th zero precision becomes 1 / (2^k * total)). ``corpus_bleu`` uses
  sacreBLEU's ``corpus_bleu`` defaults, ``sentence_bleu`` its ``sentence_bleu`` defaults
  (effective order on). chrF (Popovic 2015): character n-grams 1..6 without whitespace, F-beta
  with beta = 2, precision and recall averaged over the orders that occur, as sacreBLEU's CHRF.
- ROUGE-N, ROUGE-L and ROUGE-Lsum (Lin 2004) as Google's ``rouge-score`` 0.1.2: lower-cased
  alphanumeric tokens, optional Porter stemming of tokens longer than 3 characters (the stemmer
  itself is NLTK's, the one rouge-score uses), F1 of n-gram overlap or of the longest common
  subsequence; Lsum splits on newlines and counts the union LCS of each reference sentence.
- SQuAD exact match and token F1 (Rajpurkar et al. 2016): lower-case, drop punctuation and the
  articles a/an/the, collapse whitespace; the best score over the gold answers.
- pass@k (Chen et al. 2021, Codex): the unbiased estimator 1 - C(n-c, k) / C(n, k) from n samples
  with c correct, computed as a stable product, and the biased plug-in 1 - (1 - c/n)^k it replaces.
- Multiple choice by log-likelihood as lm-evaluation-harness scores MMLU-style tasks: the summed
  log-probability of each option's tokens after the context; ``acc`` takes the argmax of the sum,
  ``acc_norm`` of the sum divided by the option's length in characters.
- ``calibration_bins`` / expected calibration error (Guo et al. 2017) and word n-gram overlap for
  contamination checks (GPT-3, Brown et al. 2020, used 13-grams).

What it leaves out: tokenizers other than 13a for BLEU, chrF++ word n-grams, ROUGE bootstrap
confidence intervals, executing generated code for pass@k.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmlab.shapes import check_int

# ----------------------------------------------------------------------------------------------
# Argument checks shared by the text metrics


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_str_list(name: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(value).__name__}")
    for i, v in enumerate(value):
        _check_str(f"{name}[{i}]", v)
    return list(value)


def _check_answers(name: str, value: object) -> list[str]:
    """A gold answer or a non-empty list of gold answers -> list of str."""
    answers = [value] if isinstance(value, str) else _check_str_list(name, value)
    if not answers:
        raise ValueError(f"{name} must hold at least one reference answer, got an empty list")
    return answers


def _check_streams(hypotheses: object, references: object) -> tuple[list[str], list[list[str]]]:
    """sacrebleu's layout: hypotheses (N,) and references = reference streams, each (N,)."""
    hyps = _check_str_list("hypotheses", hypotheses)
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError(f"references must be a list of reference streams (lists of str), "
                        f"got {type(references).__name__}")
    if not references:
        raise ValueError("references must hold at least one reference stream, got an empty list")
    streams = [_check_str_list(f"references[{j}]", s) for j, s in enumerate(references)]
    for j, s in enumerate(streams):
        if len(s) != len(hyps):
            raise ValueError(f"references[{j}] must have one segment per hypothesis "
                             f"({len(hyps)}), got {len(s)}")
    return hyps, streams


# ----------------------------------------------------------------------------------------------
# BLEU and chrF (sacreBLEU)

# mteval-v13a: these ASCII punctuation/symbol characters become separate tokens
_13A_SYMBOLS = re.compile(r"([{|}~\[\\\]^_`!\"#$%&()*+:;<=>?@/])")
_13A_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([.,])")  # split . , unless a digit precedes
_13A_PERIOD_COMMA_BEFORE = re.compile(r"([.,])([^0-9])")  # ... or unless a digit follows
_13A_DASH = re.compile(r"([0-9])(-)")  # a dash after a digit is split off


def tokenize_13a(line: str) -> str:
    """The mteval-v13a tokenization sacreBLEU uses by default (tokens joined by single spaces).

    >>> tokenize_13a("Hello, world! It costs $3.50.")
    'Hello , world ! It costs $ 3.50 .'
    """
    line = _check_str("line", line)
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            line = line.replace(entity, char)
    line = f" {line} "
    line = _13A_SYMBOLS.sub(r" \1 ", line)
    line = _13A_PERIOD_COMMA_AFTER.sub(r"\1 \2 ", line)
    line = _13A_PERIOD_COMMA_BEFORE.sub(r" \1 \2", line)
    line = _13A_DASH.sub(r"\1 \2 ", line)
    return " ".join(line.split())


def _word_ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _bleu_stats(hyp: str, refs: list[str], max_n: int) -> list[int]:
    """[hyp_len, ref_len, matches_1..max_n, totals_1..max_n] of one segment."""
    h = tokenize_13a(hyp).split()
    ref_tokens = [tokenize_13a(r).split() for r in refs]
    ref_counts: Counter = Counter()
    for r in ref_tokens:  # clip each n-gram by its largest count in any one reference
        for g, c in _word_ngrams(r, max_n).items():
            ref_counts[g] = max(ref_counts[g], c)
    # closest reference length; ties go to the shorter reference
    ref_len = min((abs(len(r) - len(h)), len(r)) for r in ref_tokens)[1]
    matches, totals = [0] * max_n, [0] * max_n
    for g, c in _word_ngrams(h, max_n).items():
        totals[len(g) - 1] += c
        matches[len(g) - 1] += min(c, ref_counts[g])
    return [len(h), ref_len, *matches, *totals]


def _bleu_from_stats(stats: list[int], max_n: int, effective_order: bool) -> float:
    """BLEU in [0, 100] from summed statistics, with sacreBLEU's "exp" smoothing."""
    hyp_len, ref_len = stats[0], stats[1]
    matches, totals = stats[2:2 + max_n], stats[2 + max_n:]
    if not any(matches):
        return 0.0
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    # an order with no n-grams at all keeps log(0) (score 0) unless effective order drops it
    log_p, order, zeros = [-math.inf] * max_n, max_n, 0
    for n in range(max_n):
        if totals[n] == 0:
            break
        if effective_order:
            order = n + 1
        if matches[n] == 0:  # NIST smoothing: 1/2, 1/4, ... of one match
            zeros += 1
            log_p[n] = math.log(100.0 / (2**zeros * totals[n]))
        else:
            log_p[n] = math.log(100.0 * matches[n] / totals[n])
    mean_log = sum(log_p[:order]) / order
    return 0.0 if mean_log == -math.inf else bp * math.exp(mean_log)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                effective_order: bool = False) -> float:
    """Corpus BLEU in [0, 100], equal to ``sacrebleu.corpus_bleu(hypotheses, references).score``.

    references: a list of reference streams, each holding one reference per hypothesis
    (sacreBLEU's layout). Statistics are summed over segments before the geometric mean.

    >>> round(corpus_bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]), 2)
    53.73
    """
    hyps, streams = _check_streams(hypotheses, references)
    max_n = check_int("max_n", max_n, minimum=1)
    total = [0] * (2 + 2 * max_n)
    for i, hyp in enumerate(hyps):
        seg = _bleu_stats(hyp, [s[i] for s in streams], max_n)
        total = [a + b for a, b in zip(total, seg, strict=True)]
    return _bleu_from_stats(total, max_n, effective_order)


def sentence_bleu(hypothesis: str, references: Sequence[str], max_n: int = 4) -> float:
    """Sentence BLEU, equal to ``sacrebleu.sentence_bleu(hypothesis, references).score``
    (effective order on, "exp" smoothing)."""
    hyp = _check_str("hypothesis", hypothesis)
    refs = _check_answers("references", references)
    return corpus_bleu([hyp], [[r] for r in refs], max_n=max_n, effective_order=True)


def _char_ngrams(text: str, max_n: int) -> list[Counter]:
    s = "".join(text.split())  # chrF ignores whitespace
    return [Counter(s[i:i + n] for i in range(len(s) - n + 1)) for n in range(1, max_n + 1)]


def _chrf_f(stats: list[int], beta: float) -> float:
    """chrF from [hyp, ref, match] counts per order: P and R averaged over orders present."""
    b2, precisions, recalls = beta * beta, [], []
    for i in range(0, len(stats), 3):
        n_hyp, n_ref, n_match = stats[i:i + 3]
        if n_hyp > 0 and n_ref > 0:
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 100 * (1 + b2) * p * r / (b2 * p + r) if p + r else 0.0


def _chrf_segment(hyp: str, refs: list[str], max_n: int, beta: float) -> list[int]:
    """Statistics of the reference that gives the best segment-level chrF (first on ties)."""
    h = _char_ngrams(hyp, max_n)
    best, best_f = None, -1.0
    for ref in refs:
        stats = []
        for hc, rc in zip(h, _char_ngrams(ref, max_n), strict=True):
            match = sum(min(c, rc[g]) for g, c in hc.items() if g in rc)
            stats += [sum(hc.values()) if rc else 0, sum(rc.values()), match]
        f = _chrf_f(stats, beta)
        if f > best_f:
            best, best_f = stats, f
    return best


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 6,
                beta: float = 2.0) -> float:
    """chrF in [0, 100], equal to ``sacrebleu.corpus_chrf(hypotheses, references).score``.

    >>> round(corpus_chrf(["the cat sat on the mat"], [["the cat sat on a mat"]]), 2)
    72.08
    """
    hyps, streams = _check_streams(hypotheses, references)
    max_n = check_int("max_n", max_n, minimum=1)
    total = [0] * (3 * max_n)
    for i, hyp in enumerate(hyps):
        seg = _chrf_segment(hyp, [s[i] for s in streams], max_n, beta)
        total = [a + b for a, b in zip(total, seg, strict=True)]
    return _chrf_f(total, beta)


def sentence_chrf(hypothesis: str, references: Sequence[str]) -> float:
    """Sentence chrF, equal to ``sacrebleu.sentence_chrf(hypothesis, references).score``."""
    refs = _check_answers("references", references)
    return corpus_chrf([_check_str("hypothesis", hypothesis)], [[r] for r in refs])


# ----------------------------------------------------------------------------------------------
# ROUGE (rouge-score)

ROUGE_KINDS = ("rouge1", "rouge2", "rouge3", "rouge4", "rougeL", "rougeLsum")


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's tokenizer: lower-case, [a-z0-9]+ runs, Porter-stem tokens longer than 3 chars.

    >>> rouge_tokenize("The cats were running!", use_stemmer=True)
    ['the', 'cat', 'were', 'run']
    """
    words = re.sub(r"[^a-z0-9]+", " ", _check_str("text", text).lower()).split()
    if use_stemmer:
        from nltk.stem.porter import PorterStemmer  # rouge-score's stemmer (evaluation extra)

        stem = PorterStemmer().stem
        words = [stem(w) if len(w) > 3 else w for w in words]
    return [w for w in words if re.fullmatch(r"[a-z0-9]+", w)]


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    p, r = overlap / max(n_pred, 1), overlap / max(n_ref, 1)
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t


def _lcs_positions(ref: list[str], cand: list[str]) -> set[int]:
    """Positions in ``ref`` of one LCS with ``cand`` (the backtrack order rouge-score uses)."""
    t, i, j, out = _lcs_table(ref, cand), len(ref), len(cand), set()
    while i > 0 and j > 0:
        if ref[i - 1] == cand[j - 1]:
            out.add(i - 1)
            i, j = i - 1, j - 1
        elif t[i][j - 1] > t[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out


def _rouge_lsum(pred: str, ref: str, use_stemmer: bool) -> float:
    """Summary-level LCS: union LCS of each reference sentence with all predicted sentences."""
    ref_sents = [rouge_tokenize(s, use_stemmer) for s in ref.split("\n") if s]
    pred_sents = [rouge_tokenize(s, use_stemmer) for s in pred.split("\n") if s]
    m, n = sum(map(len, ref_sents)), sum(map(len, pred_sents))
    if not m or not n:
        return 0.0
    left_ref = Counter(w for s in ref_sents for w in s)
    left_pred = Counter(w for s in pred_sents for w in s)
    hits = 0
    for r in ref_sents:
        union = sorted(set().union(*(_lcs_positions(r, c) for c in pred_sents)))
        for w in (r[i] for i in union):  # each token counted at most as often as it occurs
            if left_ref[w] > 0 and left_pred[w] > 0:
                hits, left_ref[w], left_pred[w] = hits + 1, left_ref[w] - 1, left_pred[w] - 1
    return _f1(hits, n, m)


def rouge(prediction: str, reference: str, kind: str = "rougeL", use_stemmer: bool = False) -> float:
    """ROUGE F1 in [0, 1], equal to rouge-score's
    ``RougeScorer([kind], use_stemmer).score(reference, prediction)[kind].fmeasure``.

    kind: "rouge1".."rouge4" (n-gram overlap), "rougeL" (longest common subsequence) or
    "rougeLsum" (summary-level LCS over newline-separated sentences).

    >>> round(rouge("the cat sat on the mat", "the cat was on the mat", "rouge2"), 4)
    0.6
    """
    pred, ref = _check_str("prediction", prediction), _check_str("reference", reference)
    if kind not in ROUGE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ROUGE_KINDS)}; got {kind!r}")
    if kind == "rougeLsum":
        return _rouge_lsum(pred, ref, use_stemmer)
    p, r = rouge_tokenize(pred, use_stemmer), rouge_tokenize(ref, use_stemmer)
    if kind == "rougeL":
        if not p or not r:
            return 0.0
        return _f1(_lcs_table(r, p)[-1][-1], len(p), len(r))
    n = int(kind[5:])
    pc = Counter(tuple(p[i:i + n]) for i in range(len(p) - n + 1))
    rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
    overlap = sum(min(c, pc[g]) for g, c in rc.items())
    return _f1(overlap, sum(pc.values()), sum(rc.values()))


# ----------------------------------------------------------------------------------------------
# SQuAD exact match and token F1


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalization: lower-case, drop punctuation and a/an/the, collapse spaces.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    import string

    text = _check_str("text", text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0.

    >>> exact_match("the Eiffel tower.", ["Eiffel Tower", "Paris"])
    1.0
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _check_answers("references", references)))


def _token_f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if not pred_tokens or not gold_tokens:  # SQuAD: both empty -> 1, one empty -> 0
        return float(pred_tokens == gold_tokens)
    return _f1(common, len(pred_tokens), len(gold_tokens)) if common else 0.0


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1: bag-of-words overlap of normalized answers, best over the gold answers.

    >>> round(token_f1("in the Eiffel Tower", "Eiffel Tower"), 4)
    0.8
    """
    pred = normalize_answer(prediction).split()
    golds = _check_answers("references", references)
    return max(_token_f1_one(pred, normalize_answer(a).split()) for a in golds)


# ----------------------------------------------------------------------------------------------
# pass@k (Chen et al. 2021)


def _check_pass_args(n: object, c: object, k: object) -> tuple[int, int, int]:
    n = check_int("n", n, minimum=1)
    c = check_int("c", c, minimum=0)
    k = check_int("k", k, minimum=1)
    if c > n:
        raise ValueError(f"c (correct samples) must be <= n={n}, got {c}")
    if k > n:
        raise ValueError(f"k must be <= n={n} (the number of samples drawn), got {k}")
    return n, c, k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids huge binomials (Chen et al.
    2021, Fig. 3).

    >>> round(pass_at_k(10, 1, 1), 4), round(pass_at_k(10, 1, 5), 4)
    (0.1, 0.5)
    """
    n, c, k = _check_pass_args(n, c, k)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_biased(n: int, c: int, k: int) -> float:
    """The plug-in estimate 1 - (1 - c/n)^k that Chen et al. 2021 show underestimates pass@k.

    >>> round(pass_at_k_biased(10, 1, 5), 4)
    0.4095
    """
    n, c, k = _check_pass_args(n, c, k)
    return 1.0 - (1.0 - c / n) ** k


# ----------------------------------------------------------------------------------------------
# Perplexity, bits per byte


@dataclass(frozen=True)
class NLLResult:
    """Summed negative log-likelihood of a text and the units to normalize it by."""

    total_nats: float  # sum over scored tokens of -log p(token | prefix), natural log
    num_tokens: int  # scored tokens (every token but the first)
    num_bytes: int  # UTF-8 bytes of the scored text
    num_chars: int  # characters of the scored text

    @property
    def nll_per_token(self) -> float:
        return self.total_nats / self.num_tokens

    @property
    def perplexity(self) -> float:
        """exp(mean token NLL): depends on what a token is."""
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits over UTF-8 bytes: comparable across tokenizers."""
        return self.total_nats / math.log(2) / self.num_bytes

    @property
    def bits_per_character(self) -> float:
        return self.total_nats / math.log(2) / self.num_chars


def sequence_nll(model: torch.nn.Module, ids: Sequence[int] | torch.Tensor, max_length: int | None = None,
                 stride: int | None = None, batch_size: int = 16) -> torch.Tensor:
    """Per-token NLL (nats) of ids[1:] under a causal LM whose forward returns ``.logits``.

    Windows of ``max_length`` tokens (default: the model's ``config.block_size``) advance by
    ``stride`` (default ``max_length``); each window scores only tokens no earlier window scored,
    with the rest of the window as context (the transformers perplexity guide's sliding window).
    Up to ``batch_size`` windows run in one forward pass. Returns a (N-1,) float tensor.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()  # (N,)
    if ids.numel() < 2:
        raise ValueError(f"ids must hold at least 2 tokens to score one, got {ids.numel()}")
    if max_length is None:
        max_length = model.config.block_size
    max_length = check_int("max_length", max_length, minimum=2)
    stride = check_int("stride", max_length if stride is None else stride, minimum=1)
    if stride > max_length:
        raise ValueError(f"stride must be <= max_length={max_length}, got {stride}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    windows, scored = [], 0  # (start, end, first new prediction); tokens 1..scored are covered
    for end in range(min(max_length, ids.numel()), ids.numel() + stride, stride):
        end = min(end, ids.numel())
        windows.append((max(0, end - max_length), end, scored))
        scored = end - 1
        if end == ids.numel():
            break
    device = next(model.parameters()).device
    out = torch.empty(ids.numel() - 1)  # (N-1,)
    for i in range(0, len(windows), batch_size):  # windows of equal length share a forward pass
        group = windows[i:i + batch_size]
        for length in sorted({e - s for s, e, _ in group}):
            same = [w for w in group if w[1] - w[0] == length]
            x = torch.stack([ids[s:e] for s, e, _ in same]).to(device)  # (B, T)
            with torch.no_grad():
                logp = F.log_softmax(model(x).logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            nll = -logp.gather(2, x[:, 1:, None])[..., 0].cpu()  # (B, T-1)
            for row, (s, e, first) in zip(nll, same, strict=True):
                out[first:e - 1] = row[first - s:]  # prediction j of the window is token s+j+1
    return out


def text_nll(model: torch.nn.Module, tokenizer, text: str, max_length: int | None = None,
             stride: int | None = None) -> NLLResult:
    """``sequence_nll`` of ``tokenizer.encode(text)``, with the scored text's bytes and characters."""
    ids = tokenizer.encode(_check_str("text", text))
    nll = sequence_nll(model, ids, max_length, stride)
    first = tokenizer.decode(ids[:1])  # the first token is context only
    scored = text[len(first):] if text.startswith(first) else tokenizer.decode(ids[1:])
    return NLLResult(float(nll.double().sum()), len(ids) - 1, len(scored.encode("utf-8")), len(scored))


# ----------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood (lm-evaluation-harness)


@dataclass(frozen=True)
class ChoiceScores:
    """Log-likelihoods of the options of one multiple-choice question."""

    loglikelihoods: list[float]  # sum of log p(option tokens | context) per option
    lengths: list[int]  # characters of each option (lm-evaluation-harness's acc_norm unit)

    @property
    def pred(self) -> int:
        """acc's choice: the highest summed log-likelihood."""
        return max(range(len(self.lengths)), key=lambda i: self.loglikelihoods[i])

    @property
    def pred_norm(self) -> int:
        """acc_norm's choice: the highest log-likelihood per character."""
        return max(range(len(self.lengths)), key=lambda i: self.loglikelihoods[i] / self.lengths[i])

    def probabilities(self, normalized: bool = False) -> list[float]:
        """Softmax over options of the (per-character if ``normalized``) log-likelihoods."""
        s = [ll / (n if normalized else 1) for ll, n in zip(self.loglikelihoods, self.lengths, strict=True)]
        return torch.tensor(s, dtype=torch.float64).softmax(0).tolist()


def score_choices(model: torch.nn.Module, tokenizer, context: str, choices: Sequence[str]) -> ChoiceScores:
    """Log-likelihood of each ``choices[i]`` continuing ``context`` under ``model``.

    As lm-evaluation-harness: encode context + option as one string, the option's tokens are the
    ones after the context's tokens; the sequence is cut from the left to the model's context
    length; one padded batch of all options.
    """
    context = _check_str("context", context)
    choices = _check_str_list("choices", choices)
    if len(choices) < 2:
        raise ValueError(f"choices must hold at least 2 options, got {len(choices)}")
    if any(not c for c in choices):
        raise ValueError("choices must be non-empty strings, got an empty option")
    n_ctx = len(tokenizer.encode(context))
    seqs = [tokenizer.encode(context + c) for c in choices]
    conts = [s[n_ctx:] for s in seqs]  # option tokens
    limit = model.config.block_size + 1  # inputs are seq[:-1]
    seqs = [s[-limit:] for s in seqs]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T+1), right-padded
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    device = next(model.parameters()).device
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1].to(device)).logits.float(), dim=-1).cpu()  # (B, T, V)
    lls = []
    for i, (s, c) in enumerate(zip(seqs, conts, strict=True)):
        pos = torch.arange(len(s) - len(c) - 1, len(s) - 1)  # positions predicting the option
        lls.append(float(logp[i, pos, ids[i, pos + 1]].double().sum()))
    return ChoiceScores(lls, [len(c) for c in choices])


# ----------------------------------------------------------------------------------------------
# Calibration and contamination


def calibration_bins(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10):
    """Reliability diagram data and expected calibration error (Guo et al. 2017).

    Equal-width bins over [0, 1] (right-closed, the first also holds 0). Returns
    (ece, rows) with one row (low, high, count, mean confidence, accuracy) per non-empty bin;
    ECE = sum over bins of count/N * |accuracy - mean confidence|.

    >>> ece, rows = calibration_bins([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1], n_bins=5)
    >>> round(ece, 4), [r[2] for r in rows]
    (0.4, [2, 2])
    """
    conf = torch.as_tensor(confidences, dtype=torch.float64).flatten()  # (N,)
    hit = torch.as_tensor(correct, dtype=torch.float64).flatten()  # (N,)
    if conf.numel() == 0 or conf.numel() != hit.numel():
        raise ValueError(f"confidences and correct must be non-empty and of equal length, "
                         f"got {conf.numel()} and {hit.numel()}")
    if bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidences must lie in [0, 1]")
    n_bins = check_int("n_bins", n_bins, minimum=1)
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)  # (N,) bin of each item
    ece, rows = 0.0, []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            cnt, mc, acc = int(sel.sum()), float(conf[sel].mean()), float(hit[sel].mean())
            ece += cnt / conf.numel() * abs(acc - mc)
            rows.append((b / n_bins, (b + 1) / n_bins, cnt, mc, acc))
    return ece, rows


def word_ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    """Set of lower-cased word n-grams of ``text`` (words = runs of letters and digits).

    >>> sorted(word_ngrams("A cat. A cat!", 2))
    [('a', 'cat'), ('cat', 'a')]
    """
    n = check_int("n", n, minimum=1)
    words = re.findall(r"[a-z0-9]+", _check_str("text", text).lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(text: str, corpus_ngrams: set[tuple[str, ...]], n: int = 13) -> float:
    """Fraction of the word n-grams of ``text`` found in ``corpus_ngrams`` (0 if it has none).

    A benchmark item with a high overlap may have been seen in training (GPT-3 flagged items
    sharing any 13-gram with the training data).
    """
    grams = word_ngrams(text, n)
    return sum(g in corpus_ngrams for g in grams) / len(grams) if grams else 0.0
