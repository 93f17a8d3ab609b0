"""Knowledge injection into the shipped model: continued pretraining vs SFT vs both, for notebook 16.

New facts ("<invented name> lives in <invented town>", ``llmlab.knowledge_injection.new_facts``):
64 per seed, split into A (first 32) and B (last 32). Runs, each from the shipped model
(``llmlab.load_pretrained()``, 0.82 M parameters), AdamW at a constant, untuned lr of 3e-3:
- "CPT": continued pretraining on 3 paraphrased statements of every fact (A and B), 300 steps
  of 16 statements;
- "SFT on A": SFT on one question wording ("Where does X live?") for the facts of A, 100 steps;
- "CPT, then SFT on A": the two in sequence;
- "mixed CPT + SFT on A": the statements of A and B and the questions of A shuffled together,
  300 steps.
Probes (multiple choice over the 8 towns by answer log-likelihood; chance 1/8): the statement
"X lives in <town>." (is the fact stored?), the trained question wording and a held-out wording
("Which town is the home of X?"), each on A and on B. 3 seeds (facts, batch order).

    python scripts/knowledge_injection.py                       # about 10 minutes on a 2-core CPU
    python scripts/knowledge_injection.py --seeds 1 --cpt-steps 5 --sft-steps 5 --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmlab.checkpoint import load_pretrained
from llmlab.knowledge_injection import (
    HELDOUT_QUESTION,
    TRAIN_QUESTION,
    inject,
    new_facts,
    recall_accuracy,
    statement_recall_accuracy,
)
from llmlab.notebook import save_result

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "knowledge_injection.json"
RUNS = ("shipped model", "CPT", "SFT on A", "CPT, then SFT on A", "mixed CPT + SFT on A")


def probes(model, tok, a, b) -> dict:
    out = {}
    for split, facts in (("A", a), ("B", b)):
        out[f"statement {split}"] = statement_recall_accuracy(model, tok, facts)
        out[f"trained question {split}"] = recall_accuracy(model, tok, facts, TRAIN_QUESTION)
        out[f"held-out question {split}"] = recall_accuracy(model, tok, facts, HELDOUT_QUESTION)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cpt-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, tok = load_pretrained()
    steps = {"cpt_steps": args.cpt_steps, "sft_steps": args.sft_steps}
    results: dict[str, list[dict]] = {name: [] for name in RUNS}
    start = time.time()
    for seed in range(args.seeds):
        facts = new_facts(64, seed=seed)
        a, b = facts[:32], facts[32:]
        cpt = inject(base, tok, facts, [], seed=seed, **steps)
        models = {
            "shipped model": base,
            "CPT": cpt,
            "SFT on A": inject(base, tok, [], a, seed=seed, **steps),
            "CPT, then SFT on A": inject(cpt, tok, [], a, seed=seed, **steps),
            "mixed CPT + SFT on A": inject(base, tok, facts, a, mixed=True, seed=seed, **steps),
        }
        for name, model in models.items():
            results[name].append(probes(model, tok, a, b))
            print(f"seed {seed} {name:22s} " + " ".join(f"{v:.2f}" for v in results[name][-1].values()),
                  f"({time.time() - start:.0f} s)", flush=True)
    save_result({"command": "python scripts/knowledge_injection.py", "seeds": args.seeds,
                 "facts_per_seed": 64, "towns": 8, "lr": 3e-3, **steps,
                 "runs": results, "seconds": round(time.time() - start)}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
