"""Exercise checkers for notebook 19 Retrieval-augmented generation: the BM25 score (Lucene variant,
bm25s' default) and reciprocal rank fusion."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_bm25_scores", "check_rrf"]

_WORDS = ("adam", "bias", "decay", "dropout", "layer", "linear", "norm", "relu", "scale", "weight")


def _bm25_scores_reference(query: list[str], documents: list[list[str]], k1: float, b: float) -> list[float]:
    from llmlab.retrieval import BM25

    # the documents are already tokenized: join with spaces, split on spaces
    bm = BM25([" ".join(d) for d in documents], k1=k1, b=b, variant="lucene", tokenizer=str.split)
    return [float(s) for s in bm.scores(" ".join(query))]  # (N,)


def _bm25_cases(g: torch.Generator, trials: int) -> list[tuple[list[str], list[list[str]], float, float]]:
    """A small corpus of tokenized documents of different lengths over a 10-word vocabulary, and a
    query of distinct words, at least one of them repeated inside some document."""
    cases = []
    for _ in range(trials):
        n = _randint(g, 3, 8)
        docs = [[_WORDS[_randint(g, 0, 9)] for _ in range(_randint(g, 2, 12))] for _ in range(n)]
        docs[0] = docs[0][:1] * 2 + docs[0][1:]  # the first document repeats a word: tf >= 2, df counts it once
        seen = sorted({t for d in docs for t in d})
        query = [docs[0][0]] + [seen[_randint(g, 0, len(seen) - 1)] for _ in range(_randint(g, 0, 2))]
        if _randint(g, 0, 1):
            query.append("optimizer")  # a word no document has: it adds nothing
        k1 = round(0.5 + 1.5 * float(torch.rand(1, generator=g)), 2)  # 0.5 .. 2.0
        b = round(0.3 + 0.7 * float(torch.rand(1, generator=g)), 2)  # 0.3 .. 1.0
        cases.append((list(dict.fromkeys(query)), docs, k1, b))
    return cases


def _as_floats(out: object) -> object:
    """Accept a numpy array or a tensor of scores as well as a list."""
    return out.tolist() if hasattr(out, "tolist") and not isinstance(out, list) else out


def check_bm25_scores(fn: Callable[[list[str], list[list[str]], float, float], list[float]], trials: int = 5,
                      seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(query, documents, k1, b) -> the BM25 score of every document (a list of N floats): query is a
    list of distinct words, documents a list of N tokenized documents (lists of words). Lucene's
    variant, bm25s' default: sum over query words t of
    ln(1 + (N - n_t + 0.5) / (n_t + 0.5)) * tf / (tf + k1 (1 - b + b |d| / avgdl)), where n_t is the
    number of documents containing t, tf its count in d and avgdl the mean document length."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")
    return _run("bm25_scores", lambda *args: _as_floats(fn(*args)), _bm25_scores_reference,
                _bm25_cases(_generator(seed), trials),
                "idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)) with n_t the documents containing t; term "
                "weight tf / (tf + k1 (1 - b + b |d| / avgdl))", MISTAKES["bm25_scores"], rtol=1e-6,
                atol=1e-9, verbose=verbose)


def _lucene_idf(n: int, n_t: int) -> float:
    return math.log(1 + (n - n_t + 0.5) / (n_t + 0.5))


def _saturated(tf: int, k1: float, b: float, length: int, avgdl: float) -> float:
    return tf / (tf + k1 * (1 - b + b * length / avgdl))


def _doc_freq(t: str, docs: list[list[str]]) -> int:
    return sum(t in d for d in docs)


def _bm25(query, docs, k1, b, idf=_lucene_idf, weight=_saturated, df=_doc_freq) -> list[float]:
    """BM25 with swappable parts, to write the mistakes."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    return [sum(idf(n, df(t, docs)) * weight(d.count(t), k1, b, len(d), avgdl) for t in query if df(t, docs))
            for d in docs]


def _rrf_reference(rankings: list[list[int]], k: int) -> list[int]:
    from llmlab.retrieval import reciprocal_rank_fusion

    return reciprocal_rank_fusion(rankings, k=k)


def _rrf_cases(g: torch.Generator, trials: int) -> list[tuple[list[list[int]], int]]:
    """Two rankings (say BM25's and a dense retriever's) of overlapping document subsets, drawn until
    the reference and every recognized mistake order them differently (about 1 draw in 4), so that
    each mistake shows on every input and is named."""
    cases = []
    for _ in range(max(trials, 2)):
        for _ in range(1000):
            n = _randint(g, 8, 20)
            rankings = [torch.randperm(n, generator=g)[: _randint(g, 4, n)].tolist() for _ in range(2)]
            k = _randint(g, 2, 10)  # k = 1 would make "rank from 0" the same as "no k"
            orders = {tuple(_rrf_reference(rankings, k))}
            orders.update(tuple(wrong(rankings, k)) for wrong, _ in MISTAKES["rrf"].values())
            if len(orders) == 1 + len(MISTAKES["rrf"]):
                break
        cases.append((rankings, k))
    return cases


def check_rrf(fn: Callable[[list[list[int]], int], list[int]], trials: int = 6, seed: int | None = None,
              verbose: bool = True) -> Verdict:
    """fn(rankings, k) -> the fused ranking: every id that appears in any of the ranked lists of
    document ids (best first, each may hold a different subset), ordered by the sum over the lists
    of 1 / (k + rank), rank counted from 1, highest first, ties broken by the smaller id."""
    return _run("rrf", fn, _rrf_reference, _rrf_cases(_generator(seed), trials),
                "score(d) = sum over the lists containing d of 1 / (k + rank), with rank 1 for the first "
                "id; sort by score, highest first, ties by the smaller id", MISTAKES["rrf"], verbose=verbose)


def _fuse(rankings, k, start=1, reduce=sum) -> list[int]:
    """RRF with a swappable first rank and reduction over lists, to write the mistakes."""
    parts: dict[int, list[float]] = {}
    for ranking in rankings:
        for r, d in enumerate(ranking, start=start):
            parts.setdefault(d, []).append(1.0 / (k + r))
    score = {d: reduce(v) for d, v in parts.items()}
    return sorted(score, key=lambda d: (-score[d], d))


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "bm25_scores": {
        "idf_without_one": (lambda q, docs, k1, b: _bm25(q, docs, k1, b,
                                                        idf=lambda n, n_t: math.log((n - n_t + 0.5) / (n_t + 0.5))),
                            "Lucene's idf has 1 + inside the log, ln(1 + (N - n_t + 0.5) / (n_t + 0.5)); the "
                            "original Okapi form without it goes negative for a word in more than half of "
                            "the documents"),
        "no_length_normalization": (lambda q, docs, k1, b: _bm25(q, docs, k1, b,
                                                                weight=lambda tf, k1, b, dl, avg: tf / (tf + k1)),
                                    "normalize by document length: k1 (1 - b + b |d| / avgdl) in the "
                                    "denominator, so long documents do not win by size"),
        "tf_not_saturated": (lambda q, docs, k1, b: _bm25(q, docs, k1, b, weight=lambda tf, k1, b, dl, avg: tf),
                             "term frequency saturates: tf / (tf + k1 (1 - b + b |d| / avgdl)), not the raw "
                             "count"),
        "k1_plus_one": (lambda q, docs, k1, b: _bm25(q, docs, k1, b, weight=lambda tf, k1, b, dl, avg:
                                                    (k1 + 1) * _saturated(tf, k1, b, dl, avg)),
                        "the Lucene variant (bm25s' default) drops the original's constant factor (k1 + 1): "
                        "the ranking is the same, the scores are not"),
        "df_counts_occurrences": (lambda q, docs, k1, b: _bm25(q, docs, k1, b,
                                                              df=lambda t, docs: sum(d.count(t) for d in docs)),
                                  "n_t counts the documents that contain t, not how often t occurs in the "
                                  "corpus"),
    },
    "rrf": {
        "rank_from_zero": (lambda rankings, k: _fuse(rankings, k, start=0),
                           "ranks start at 1: the top document of a list adds 1 / (k + 1) (enumerate(..., "
                           "start=1))"),
        "no_k": (lambda rankings, k: _fuse(rankings, 0),
                 "add the constant k to the rank: 1 / (k + rank); it damps the weight of the first places, "
                 "so agreement between the lists counts more than one first place"),
        "mean_over_lists": (lambda rankings, k: _fuse(rankings, k, reduce=lambda v: sum(v) / len(v)),
                            "sum the reciprocal ranks over the lists: a document found by both retrievers "
                            "should gain, not be averaged"),
    },
}
