"""Contrastive fine-tuning of all-MiniLM-L6-v2 on the torch-docs questions, for notebook 19.

The real all-MiniLM-L6-v2 (``llmlab.retrieval.load_minilm``, 22.7 M parameters; only its top two
of six blocks train, 3.5 M parameters, and training passages are cut to 128 tokens, to fit a shared
2-core CPU) is fine-tuned with InfoNCE and in-batch negatives
(``llmlab.retrieval.fine_tune``: batches of 16 (question, gold document) pairs with distinct
documents, temperature 0.05, AdamW) on the 45 *train* questions of
``llmlab/corpora/torch_docs_questions.json``; recall@1, recall@5 and MRR of exact inner-product
search over the 142 whole documents are measured on the 44 held-out *test* questions (whose gold
documents differ from the training ones) before and after, for 3 seeds (batch order). The
learning rate and step count were set once, not tuned on the test questions.

    python scripts/rag_finetune.py                   # about 15 minutes on a loaded 2-core CPU
    python scripts/rag_finetune.py --seeds 1 --steps 2 --out /tmp/ft.json   # a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmlab.notebook import save_result
from llmlab.retrieval import exact_search, fine_tune, load_corpus, load_minilm, mrr, recall_at_k

TRAINABLE = ("model.encoder.layer.4.", "model.encoder.layer.5.")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "rag_finetune.json"


def evaluate(encoder, doc_texts, splits: dict, gold: dict) -> dict:
    """Recall@1, recall@5 and MRR per split of exact search over the whole documents."""
    index = encoder.encode(doc_texts)  # (N, 384)
    out = {}
    for name, questions in splits.items():
        q = encoder.encode([x["question"] for x in questions])  # (Q, 384)
        ranked = exact_search(q, index, k=10)[1].tolist()
        out[name] = {"recall@1": recall_at_k(ranked, gold[name], 1),
                     "recall@5": recall_at_k(ranked, gold[name], 5), "mrr": mrr(ranked, gold[name])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)
    docs, questions = load_corpus()
    ids = [d["id"] for d in docs]
    texts = [d["text"] for d in docs]
    train = [q for q in questions if q["split"] == "train"]
    test = [q for q in questions if q["split"] == "test"]
    gold = {s: [{ids.index(g) for g in q["gold"]} for q in qs] for s, qs in (("train", train), ("test", test))}
    t0 = time.time()
    base = load_minilm()
    splits = {"train": train, "test": test}
    before = evaluate(base, texts, splits, gold)
    print("before", before, flush=True)
    runs = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        enc = load_minilm()
        for name, p in enc.named_parameters():
            p.requires_grad_(name.startswith(TRAINABLE))
        enc.max_seq_length = 128
        losses = fine_tune(enc, [q["question"] for q in train], [texts[ids.index(q["gold"][0])] for q in train],
                           steps=args.steps, batch_size=16, lr=args.lr, temperature=0.05, seed=seed)
        enc.max_seq_length = 256
        after = evaluate(enc, texts, splits, gold)
        n_trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
        runs.append({"seed": seed, "losses": [round(x, 4) for x in losses], "after": after})
        print(seed, after, losses[0], losses[-1], round(time.time() - t0), flush=True)
    cmd = "python scripts/rag_finetune.py"
    if (args.seeds, args.steps, args.lr) != (3, 30, 5e-5):
        cmd += f" --seeds {args.seeds} --steps {args.steps} --lr {args.lr}"
    save_result({"command": cmd, "n_train": len(train), "n_test": len(test), "n_documents": len(docs),
                 "steps": args.steps, "batch_size": 16, "trainable": list(TRAINABLE),
                 "trainable_parameters": n_trainable, "train_max_seq_length": 128, "lr": args.lr, "temperature": 0.05,
                 "before": before, "runs": runs, "seconds": round(time.time() - t0)}, args.out)


if __name__ == "__main__":
    main()
