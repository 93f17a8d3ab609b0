"""llmlab.exercises.nb19: the BM25 and reciprocal-rank-fusion checkers accept solutions written from
the formulas (not llmlab's reference) and reject each recognized mistake, naming it."""

import math
from collections import Counter

import numpy as np
import pytest

from llmlab.exercises import check_bm25_scores, check_rrf


def bm25_scores(query, documents, k1, b):
    n = len(documents)
    avgdl = sum(len(d) for d in documents) / n
    df = Counter(t for d in documents for t in set(d))  # documents containing each word
    out = []
    for d in documents:
        tf, s = Counter(d), 0.0
        for t in query:
            if df[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return out


def bm25_scores_numpy(query, documents, k1, b):
    return np.array(bm25_scores(query, documents, k1, b))


def rrf(rankings, k):
    score = {}
    for ranking in rankings:
        for rank, d in enumerate(ranking, start=1):
            score[d] = score.get(d, 0.0) + 1 / (k + rank)
    return sorted(score, key=lambda d: (-score[d], d))


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"bm25_scores": bm25_scores, "rrf": rrf}


def test_scores_may_come_back_as_an_array():
    assert check_bm25_scores(bm25_scores_numpy, seed=2, verbose=False)


def test_the_bm25_solution_equals_bm25s():
    bm25s = pytest.importorskip("bm25s")
    docs = [["adam", "weight", "decay", "adam"], ["layer", "norm", "scale"], ["dropout", "layer"],
            ["linear", "weight", "bias", "weight", "norm", "relu"]]
    for k1, b in ((1.5, 0.75), (0.9, 0.4)):
        ref = bm25s.BM25(k1=k1, b=b, method="lucene")
        ref.index(docs, show_progress=False)
        for query in (["adam", "weight"], ["layer", "norm", "bias"], ["weight"]):
            np.testing.assert_allclose(bm25_scores(query, docs, k1, b), ref.get_scores(query), rtol=1e-5)


def test_the_rrf_solution_on_the_docstring_example():
    assert rrf([[1, 2, 3], [3, 1, 2]], 60) == [1, 3, 2]


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_bm25_scores(lambda q, docs, k1, b: [1.0] * len(docs), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))")
    verdict = check_rrf(lambda rankings, k: sorted({d for r in rankings for d in r}), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("score(d) = sum over the lists containing d")


def test_a_function_that_raises_is_a_failed_verdict():
    def stub(query, documents, k1, b):
        raise NotImplementedError("write your solution here")

    verdict = check_bm25_scores(stub, seed=0, verbose=False)
    assert not verdict and "raised NotImplementedError" in verdict.message


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match="fn must be the function to check"):
        check_bm25_scores("bm25", seed=0)
