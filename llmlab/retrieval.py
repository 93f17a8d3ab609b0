"""Retrieval for retrieval-augmented generation (RAG): BM25, dense search, fusion, chunking.

What it implements
- ``BM25``: Okapi BM25 (Robertson and Zaragoza 2009) from scratch over a fixed tokenizer. Two
  variants: ``"lucene"`` (bm25s' default: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term
  weight tf / (tf + k1 (1 - b + b |d| / avgdl))) and ``"okapi"`` (rank-bm25's ``BM25Okapi``:
  idf = ln((N - df + 0.5) / (df + 0.5)), negative idf replaced by 0.25 x the mean idf, term weight
  multiplied by k1 + 1). BM25 is a scoring function; the inverted index is how engines avoid
  scoring every document, and this class scores every document (a corpus of a few hundred).
- ``exact_search``: top-k by inner product (cosine for unit vectors), equal to faiss
  ``IndexFlatIP``; approximate indexes (HNSW, IVF) are used from faiss in notebook 19.
- ``reciprocal_rank_fusion``: hybrid retrieval by RRF, score(d) = sum_r 1 / (k + rank_r(d))
  (Cormack et al. 2009), rank starting at 1.
- Chunkers: ``chunk_fixed`` (words with overlap), ``split_sentences``, ``chunk_sentences``
  (pack whole sentences), ``chunk_recursive`` (LangChain's recursive character splitter idea:
  split on the coarsest separator that makes pieces fit, then merge neighbours).
- ``sentence_window``: match single sentences, hand the generator the sentence plus its
  neighbours (LlamaIndex's sentence-window retrieval idea).
- ``compress_context``: extractive context compression: keep the sentences most similar to the
  query, in their original order.
- ``recall_at_k``, ``mrr``: retrieval metrics over ranked document ids.
- ``info_nce_loss`` and ``fine_tune``: contrastive fine-tuning of a ``SentenceEncoder`` with
  in-batch negatives (InfoNCE, van den Oord et al. 2018; the MultipleNegativesRankingLoss of
  sentence-transformers and DPR, Karpukhin et al. 2020).
- ``load_corpus``: the committed corpus (docstrings of torch.nn / torch.optim, built by
  scripts/rag_build_corpus.py) and its hand-written question set with train/test split.

``load_minilm`` (from ``llmlab.encoder``) gives the real all-MiniLM-L6-v2 sentence encoder.

What it leaves out: inverted-index storage, product quantization, cross-encoder rerankers (no
offline reranker weights), query rewriting and generation (notebook 19 reports whether the
answer string reaches the prompt instead).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.encoder import SentenceEncoder, load_minilm
from llmlab.shapes import check_float, check_int

__all__ = [
    "BM25", "chunk_fixed", "chunk_recursive", "chunk_sentences", "compress_context", "exact_search",
    "fine_tune", "info_nce_loss", "load_corpus", "load_embeddings", "load_minilm", "mrr", "recall_at_k",
    "reciprocal_rank_fusion", "sentence_window", "simple_tokenize", "split_sentences", "text_digest",
    "text_sets",
]  # fmt: skip

CORPUS_DIR = Path(__file__).resolve().parent / "corpora"
CHUNKINGS = ((16, 0), (32, 0), (64, 0), (32, 16))  # (words per chunk, overlap) embedded in advance
_WORD = re.compile(r"\w+")


def simple_tokenize(text: str) -> list[str]:
    """Lower-cased runs of word characters: the tokenizer BM25 uses by default.

    >>> simple_tokenize("Layer-Norm, eps=1e-5")
    ['layer', 'norm', 'eps', '1e', '5']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


def _check_documents(documents: Sequence[str]) -> list[str]:
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
    if len(documents) == 0:
        raise ValueError("documents must not be empty (an empty corpus has nothing to retrieve)")
    return list(documents)


class BM25:
    """BM25 scores of every document for a query.

    >>> bm = BM25(["the cat sat", "the dog ran far", "a cat and a dog"])
    >>> [round(s, 3) for s in bm.scores("cat").tolist()]
    [0.212, 0.0, 0.169]
    """

    def __init__(
        self,
        documents: Sequence[str],
        k1: float = 1.5,
        b: float = 0.75,
        variant: str = "lucene",
        tokenizer: Callable[[str], list[str]] = simple_tokenize,
    ) -> None:
        documents = _check_documents(documents)
        self.k1 = check_float("k1", k1, low=0.0)
        self.b = check_float("b", b, low=0.0, high=1.0)
        if variant not in ("lucene", "okapi"):
            raise ValueError(f"variant must be 'lucene' or 'okapi', got {variant!r}")
        self.variant, self.tokenizer = variant, tokenizer
        self.tf = [Counter(tokenizer(d)) for d in documents]  # term counts per document
        self.doc_len = np.array([sum(c.values()) for c in self.tf], dtype=np.float64)  # (N,)
        self.avgdl = float(self.doc_len.mean())
        df = Counter(t for c in self.tf for t in c)  # documents containing each term
        self.idf = self._idf(df, len(documents))

    def _idf(self, df: Counter, n: int) -> dict[str, float]:
        if self.variant == "lucene":
            return {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        idf = {t: math.log((n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        floor = 0.25 * sum(idf.values()) / len(idf)  # rank-bm25's epsilon x average idf
        return {t: (v if v >= 0 else floor) for t, v in idf.items()}

    def scores(self, query: str) -> np.ndarray:
        """query -> (N,) float64 scores: sum over query tokens of idf x saturated term frequency."""
        norm = self.k1 * (1 - self.b + self.b * self.doc_len / max(self.avgdl, 1e-12))  # (N,)
        out = np.zeros(len(self.tf))
        for t in self.tokenizer(query):
            if t not in self.idf:
                continue
            tf = np.array([c.get(t, 0) for c in self.tf], dtype=np.float64)  # (N,)
            w = tf / (tf + norm)
            out += self.idf[t] * (w * (self.k1 + 1) if self.variant == "okapi" else w)
        return out

    def search(self, query: str, k: int) -> list[int]:
        """Ids of the k best documents, best first (ties broken by lower id)."""
        k = _check_k(k, len(self.tf))
        s = self.scores(query)
        return sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]


def _check_k(k: int, n: int) -> int:
    k = check_int("k", k, minimum=1)
    if k > n:
        raise ValueError(f"k must be <= the number of documents {n}, got {k}")
    return k


def exact_search(queries: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force maximum inner product: queries (Q, C), index (N, C) -> scores, ids (Q, k).

    >>> s, i = exact_search(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), k=1)
    >>> i.tolist()
    [[1], [0]]
    """
    if queries.dim() != 2 or index.dim() != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(
            f"queries and index must have shapes (Q, C) and (N, C), got {tuple(queries.shape)} "
            f"and {tuple(index.shape)}"
        )
    if index.shape[0] == 0:
        raise ValueError("index must not be empty (an empty corpus has nothing to retrieve)")
    k = _check_k(k, index.shape[0])
    return torch.topk(queries @ index.T, k, dim=1)  # (Q, N) similarities -> top k


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60) -> list[int]:
    """Fuse ranked id lists: score(d) = sum over lists of 1 / (k + rank), rank from 1.

    >>> reciprocal_rank_fusion([[1, 2, 3], [3, 1, 2]])
    [1, 3, 2]
    """
    if len(rankings) == 0:
        raise ValueError("rankings must hold at least one ranked list")
    k = check_int("k", k, minimum=0)
    score: dict[int, float] = {}
    for ranking in rankings:
        for r, d in enumerate(ranking, start=1):
            score[d] = score.get(d, 0.0) + 1.0 / (k + r)
    return sorted(score, key=lambda d: (-score[d], d))


def chunk_fixed(text: str, size: int, overlap: int = 0) -> list[str]:
    """Windows of ``size`` words, each starting ``size - overlap`` words after the previous one.

    >>> chunk_fixed("a b c d e", size=2, overlap=1)
    ['a b', 'b c', 'c d', 'd e']
    """
    size = check_int("size", size, minimum=1)
    overlap = check_int("overlap", overlap, minimum=0)
    if overlap >= size:
        raise ValueError(f"overlap must be < size {size}, got {overlap}")
    words = text.split()
    step = size - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [" ".join(words[s : s + size]) for s in starts if words[s : s + size]]


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\\(\"'])|\n+")


def split_sentences(text: str) -> list[str]:
    """Split at a newline or at '.', '!' or '?' followed by space and a capital, digit or quote.

    >>> split_sentences("One. Two words here.\\nThree e.g. four.")
    ['One.', 'Two words here.', 'Three e.g. four.']
    """
    return [s.strip() for s in _SENT.split(text) if s.strip()]


def chunk_sentences(text: str, max_words: int) -> list[str]:
    """Pack whole sentences into chunks of at most ``max_words`` words (a longer sentence stays whole)."""
    max_words = check_int("max_words", max_words, minimum=1)
    chunks, cur = [], []
    for s in split_sentences(text):
        if cur and len(" ".join(cur + [s]).split()) > max_words:
            chunks.append(" ".join(cur))
            cur = []
        cur.append(s)
    return chunks + ([" ".join(cur)] if cur else [])


def chunk_recursive(text: str, max_words: int, separators: Sequence[str] = ("\n\n", "\n", ". ", " ")) -> list[str]:
    """Split on the first separator that occurs, recurse into pieces still too long, merge small
    neighbours up to ``max_words`` words.

    >>> chunk_recursive("a b. c d e f.\\ng h", max_words=3)
    ['a b.', 'c d e', 'f. g h']
    """
    max_words = check_int("max_words", max_words, minimum=1)
    if len(text.split()) <= max_words:
        return [text.strip()] if text.strip() else []
    sep = next((s for s in separators if s in text), None)
    if sep is None:
        return chunk_fixed(text, max_words)
    rest = [s for s in separators if s != sep]
    parts = [p + (sep.strip() if sep.strip() and i < text.count(sep) else "")
             for i, p in enumerate(text.split(sep))]
    pieces = [q for p in parts for q in chunk_recursive(p, max_words, rest)]
    merged: list[str] = []
    for p in pieces:
        if merged and len((merged[-1] + " " + p).split()) <= max_words:
            merged[-1] = merged[-1] + " " + p
        else:
            merged.append(p)
    return merged


def sentence_window(sentences: Sequence[str], hit: int, window: int = 1) -> str:
    """The matched sentence with up to ``window`` sentences either side, joined by spaces."""
    if not 0 <= hit < len(sentences):
        raise ValueError(f"hit must index sentences (0..{len(sentences) - 1}), got {hit}")
    window = check_int("window", window, minimum=0)
    return " ".join(sentences[max(0, hit - window) : hit + window + 1])


def compress_context(query: torch.Tensor, sentence_embeddings: torch.Tensor, sentences: Sequence[str],
                     keep: int) -> list[str]:
    """Keep the ``keep`` sentences with the highest similarity to the query, in original order.

    query (C,), sentence_embeddings (S, C) unit vectors, one row per sentence.
    """
    if sentence_embeddings.shape[0] != len(sentences):
        raise ValueError(
            f"sentence_embeddings must have one row per sentence ({len(sentences)}), "
            f"got {sentence_embeddings.shape[0]}"
        )
    keep = min(check_int("keep", keep, minimum=1), len(sentences))
    best = torch.topk(sentence_embeddings @ query, keep).indices.sort().values  # (keep,)
    return [sentences[i] for i in best.tolist()]


def recall_at_k(ranked: Sequence[Sequence[int]], gold: Sequence[set[int]], k: int) -> float:
    """Fraction of queries with at least one gold id among the first k ranked ids."""
    if len(ranked) != len(gold) or not ranked:
        raise ValueError(f"ranked and gold must be non-empty and of equal length, got {len(ranked)} and {len(gold)}")
    k = check_int("k", k, minimum=1)
    return sum(bool(set(r[:k]) & g) for r, g in zip(ranked, gold, strict=True)) / len(ranked)


def mrr(ranked: Sequence[Sequence[int]], gold: Sequence[set[int]]) -> float:
    """Mean reciprocal rank of the first gold id (0 for a query whose list has none)."""
    if len(ranked) != len(gold) or not ranked:
        raise ValueError(f"ranked and gold must be non-empty and of equal length, got {len(ranked)} and {len(gold)}")
    total = 0.0
    for r, g in zip(ranked, gold, strict=True):
        total += next((1.0 / (i + 1) for i, d in enumerate(r) if d in g), 0.0)
    return total / len(ranked)


def info_nce_loss(q: torch.Tensor, d: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE with in-batch negatives: q, d (B, C) unit vectors, row i of d is the positive of q_i.

    loss = mean_i -log softmax_j(q_i . d_j / tau)[i]; every other passage in the batch is a negative.
    """
    if q.shape != d.shape or q.dim() != 2:
        raise ValueError(f"q and d must both have shape (B, C), got {tuple(q.shape)} and {tuple(d.shape)}")
    temperature = check_float("temperature", temperature, low=0.0, low_open=True)
    logits = q @ d.T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def fine_tune(encoder: SentenceEncoder, queries: Sequence[str], passages: Sequence[str], steps: int,
              batch_size: int = 16, lr: float = 2e-5, temperature: float = 0.05, seed: int = 0) -> list[float]:
    """Contrastive fine-tuning in place with AdamW; returns the loss of every step.

    Each step draws ``batch_size`` distinct (query, passage) pairs; a passage repeated in a batch
    would be a false negative, so pairs are drawn with distinct passages where possible.
    """
    if len(queries) != len(passages) or len(queries) < 2:
        raise ValueError(f"queries and passages must be equal-length lists of >= 2, got {len(queries)} "
                         f"and {len(passages)}")
    steps = check_int("steps", steps, minimum=1)
    batch_size = min(check_int("batch_size", batch_size, minimum=2), len(queries))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=lr)
    encoder.train()
    losses = []
    for _ in range(steps):
        batch, seen = [], set()
        for i in torch.randperm(len(queries), generator=gen).tolist():
            if passages[i] not in seen:
                batch.append(i)
                seen.add(passages[i])
            if len(batch) == batch_size:
                break
        loss = info_nce_loss(encoder([queries[i] for i in batch]), encoder([passages[i] for i in batch]),
                             temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    encoder.eval()
    return losses


def load_corpus(name: str = "torch_docs") -> tuple[list[dict], list[dict]]:
    """The committed corpus and questions: documents [{id, text}], questions [{id, split, question,
    gold, answer}]; checks that every gold id exists and every answer occurs in each gold document.

    >>> docs, questions = load_corpus()
    >>> len(questions) >= 60
    True
    """
    path = CORPUS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"name must be a corpus in llmlab/corpora, got {name!r}")
    docs = json.loads(path.read_text(encoding="utf-8"))["documents"]
    questions = json.loads((CORPUS_DIR / f"{name}_questions.json").read_text(encoding="utf-8"))["questions"]
    text = {d["id"]: d["text"] for d in docs}
    for q in questions:
        for g in q["gold"]:
            if g not in text or q["answer"] not in text[g]:
                raise ValueError(f"question {q['id']}: answer {q['answer']!r} is not in gold document {g!r}")
    return docs, questions


def text_sets(docs: Sequence[dict], questions: Sequence[dict]) -> dict[str, list[str]]:
    """The texts scripts/rag_embed.py embeds: name -> texts, in document order.

    "doc" (whole documents), "question", "sentence" (``split_sentences`` of each document) and
    "chunk{size}o{overlap}" (``chunk_fixed`` of each document) for every pair in ``CHUNKINGS``.
    """
    texts = [d["text"] for d in docs]
    sets = {"doc": texts, "question": [q["question"] for q in questions],
            "sentence": [s for t in texts for s in split_sentences(t)]}
    for size, overlap in CHUNKINGS:
        sets[f"chunk{size}o{overlap}"] = [c for t in texts for c in chunk_fixed(t, size, overlap)]
    return sets


def text_digest(texts: Sequence[str]) -> str:
    """SHA-256 of the texts joined by NUL: identifies exactly which texts a stored matrix embeds."""
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def load_embeddings(name: str = "torch_docs") -> dict[str, torch.Tensor]:
    """The committed all-MiniLM-L6-v2 embeddings of ``text_sets`` (float32, (rows, 384) each; keys
    ending in "_cls" hold [CLS] pooling); raises if a stored digest differs from the texts that
    ``text_sets`` gives now, so a stale file cannot be used silently."""
    from safetensors import safe_open

    path = CORPUS_DIR / f"{name}_embeddings.safetensors"
    if not path.is_file():
        raise ValueError(f"name must have embeddings in llmlab/corpora (run scripts/rag_embed.py), got {name!r}")
    sets = text_sets(*load_corpus(name))
    out = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for key in f.keys():
            texts = sets[key.removesuffix("_cls")]
            if meta[key] != text_digest(texts):
                raise ValueError(f"embeddings {key!r} are stale: rerun scripts/rag_embed.py")
            out[key] = f.get_tensor(key).float()
    return out
