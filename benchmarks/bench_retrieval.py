"""Retrieval quality on the torch-docs questions and the speed of exact vs approximate vector search.

1. Quality: the 44 held-out *test* questions of ``llmlab/corpora/torch_docs_questions.json`` against
   the 142 whole documents of ``llmlab/corpora/torch_docs.json``: recall@5 and MRR of BM25
   (``llmlab.retrieval.BM25``, bm25s' Lucene variant, k1=1.5, b=0.75), dense retrieval with the real
   all-MiniLM-L6-v2 (``load_minilm``, encoded live here, exact inner-product search), hybrid
   (reciprocal rank fusion of the two top-10 lists, k=60), and the contrastively fine-tuned encoder
   (recorded result of ``scripts/rag_finetune.py``, mean and range over its 3 seeds; rerunning it
   takes about 15 minutes).
2. Speed: 100,000 synthetic unit vectors of dimension 128 (a mixture of 1,000 Gaussian clusters, so
   neighbours are meaningful), 1,000 queries drawn the same way; faiss ``IndexFlatIP`` (exact) vs
   ``IndexHNSWFlat`` (M=32, inner product) at several efSearch and ``IndexIVFFlat`` (1,024 lists) at
   several nprobe; queries per second with one thread and recall@10 against the exact top 10.
   Timings vary with the machine's load; recalls are exact counts. Each cluster holds about 100
   nearly equidistant points, a hard case for graph search: HNSW needs a large efSearch here.

    .venv/bin/python benchmarks/bench_retrieval.py

Output committed in benchmarks/results/bench_retrieval.txt.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from llmlab.notebook import load_result
from llmlab.retrieval import BM25, exact_search, load_corpus, load_minilm, mrr, recall_at_k, reciprocal_rank_fusion


def quality() -> None:
    docs, questions = load_corpus()
    ids = [d["id"] for d in docs]
    texts = [d["text"] for d in docs]
    test = [q for q in questions if q["split"] == "test"]
    gold = [{ids.index(g) for g in q["gold"]} for q in test]
    bm = BM25(texts)
    sparse = [bm.search(q["question"], 10) for q in test]
    enc = load_minilm()
    t0 = time.perf_counter()
    index = enc.encode(texts)  # (N, 384)
    qv = enc.encode([q["question"] for q in test])  # (Q, 384)
    t_enc = time.perf_counter() - t0
    dense = exact_search(qv, index, k=10)[1].tolist()
    hybrid = [reciprocal_rank_fusion([a, b])[:10] for a, b in zip(dense, sparse, strict=True)]
    print(f"\n1. retrieval quality: {len(test)} test questions, {len(docs)} documents "
          f"(encoding {len(docs) + len(test)} texts took {t_enc:.0f} s)")
    print(f"   {'method':<34}{'recall@1':>9}{'recall@5':>9}{'MRR':>8}")
    rows = {}
    for name, ranked in (("BM25 (lucene, k1=1.5, b=0.75)", sparse), ("dense all-MiniLM-L6-v2", dense),
                         ("hybrid RRF(BM25, dense), k=60", hybrid)):
        rows[name] = (recall_at_k(ranked, gold, 1), recall_at_k(ranked, gold, 5), mrr(ranked, gold))
        print(f"   {name:<34}{rows[name][0]:9.3f}{rows[name][1]:9.3f}{rows[name][2]:8.3f}")
    rec = load_result("rag_finetune")
    runs = [r["after"]["test"] for r in rec["runs"]]
    before = rec["before"]["test"]
    for key in ("recall@1", "recall@5", "mrr"):
        vals = [r[key] for r in runs]
        print(f"   fine-tuned dense, {key:<9} {np.mean(vals):.3f} (range {min(vals):.3f}-{max(vals):.3f} over "
              f"{len(vals)} seeds; same model before fine-tuning {before[key]:.3f}) [recorded]")
    print(f"   recorded result command: {rec['command']}")
    d, h = rows["dense all-MiniLM-L6-v2"], rows["hybrid RRF(BM25, dense), k=60"]
    print(f"   ratios: hybrid / dense MRR = {h[2] / d[2]:.3f}; "
          f"BM25 / dense MRR = {rows['BM25 (lucene, k1=1.5, b=0.75)'][2] / d[2]:.3f}")


def synthetic(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def speed(n: int, dim: int) -> None:
    import faiss

    faiss.omp_set_num_threads(1)
    xb = synthetic(n, dim, 1000, seed=0)
    xq = synthetic(1000, dim, 1000, seed=1)[:1000]
    k = 10
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    t0 = time.perf_counter()
    _, truth = flat.search(xq, k)
    t_flat = time.perf_counter() - t0
    ours = exact_search(torch.from_numpy(xq[:100]), torch.from_numpy(xb), k)[1].numpy()
    print(f"\n2. search speed: {n:,} unit vectors of dimension {dim}, {len(xq)} queries, top {k}, one thread")
    print(f"   llmlab exact_search ids equal IndexFlatIP on 100 queries: {bool((ours == truth[:100]).all())}")
    print(f"   {'index':<30}{'build':>9}{'QPS':>10}{'recall@10':>11}{'speed-up':>10}")
    qps_flat = len(xq) / t_flat
    print(f"   {'IndexFlatIP (exact)':<30}{'-':>9}{qps_flat:10.0f}{1.0:11.3f}{1.0:9.1f}x")

    def report(name: str, index, build: float) -> None:
        t0 = time.perf_counter()
        _, got = index.search(xq, k)
        qps = len(xq) / (time.perf_counter() - t0)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth, strict=True)])
        print(f"   {name:<30}{build:8.1f}s{qps:10.0f}{recall:11.3f}{qps / qps_flat:9.1f}x")

    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 64
    hnsw.add(xb)
    build = time.perf_counter() - t0
    for ef in (16, 64, 256, 1024):
        hnsw.hnsw.efSearch = ef
        report(f"HNSW M=32 efSearch={ef}", hnsw, build)
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 1024, faiss.METRIC_INNER_PRODUCT)
    ivf.train(xb)
    ivf.add(xb)
    build = time.perf_counter() - t0
    for nprobe in (1, 4, 16, 64):
        ivf.nprobe = nprobe
        report(f"IVF-Flat 1024 lists nprobe={nprobe}", ivf, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="vectors in the synthetic index")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    import faiss

    torch.set_num_threads(2)
    print(f"python {platform.python_version()} | torch {torch.__version__} | faiss {faiss.__version__}")
    quality()
    speed(args.n, args.dim)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
