"""Catastrophic forgetting during SFT of the shipped model, and four mitigations, for notebook 16.

The shipped model (``llmlab.load_pretrained()``: 0.82 M parameters, trained on the generated story
corpus) is fine-tuned on generated two-turn story Q&A dialogues (``llmlab.sft.story_qa_dataset``,
400 training dialogues, loss on assistant tokens only) for 120 AdamW steps of 16 dialogues. Runs:
full fine-tuning at lr 3e-3 (the pretraining peak lr) and at 1e-3; full at 3e-3 with 25% replay of
old-domain windows; LoRA (all linear layers, r=8, alpha=16, lr 3e-3); the first two of four blocks
and the embeddings frozen (lr 3e-3). Each run over 3 seeds (batch order, replay windows, LoRA init).
Scores: old-domain loss = the first 32 windows of 128 tokens of the shipped model's held-out split
(last 10% of ``generate_corpus()``); new-domain loss = assistant-token loss on 40 held-out dialogues;
answer accuracy = exact greedy answers on 20 held-out dialogues (40 turns). Learning rates untuned.

    python scripts/sft_forgetting.py                     # about 5 minutes on a 2-core CPU
    python scripts/sft_forgetting.py --seeds 1 --steps 5 --out /tmp/f.json   # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, train_val_split
from llmlab.lora import LoRAConfig, inject_lora
from llmlab.notebook import save_result
from llmlab.sft import answer_accuracy, finetune, freeze_except, sft_batch, sft_example, story_qa_dataset
from llmlab.train import heldout_loss

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "sft_forgetting.json"
RUNS = {  # name -> (lr, replay_fraction, how the model is prepared)
    "full lr 3e-3": (3e-3, 0.0, "full"),
    "full lr 1e-3": (1e-3, 0.0, "full"),
    "replay 25%": (3e-3, 0.25, "full"),
    "LoRA r=8": (3e-3, 0.0, "lora"),
    "freeze lower half": (3e-3, 0.0, "freeze"),
}
TRAINABLE_WHEN_FROZEN = ("model.layers.2.", "model.layers.3.", "model.norm", "lm_head")


def prepare(base, how: str, seed: int):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if how == "lora":
        inject_lora(model, LoRAConfig.all_linear(r=8, alpha=16.0))
    elif how == "freeze":
        freeze_except(model, TRAINABLE_WHEN_FROZEN)
    return model


def scores(model, tok, old_ids, test) -> dict:
    x, y = sft_batch([sft_example(c, tok) for c in test])
    with torch.no_grad():
        new = model.eval()(x, targets=y).loss.item()
    return {"old_loss": heldout_loss(model, old_ids, 128, max_windows=32), "new_loss": new,
            "accuracy": answer_accuracy(model, tok, test[:20])}


def run(seeds: int = 3, steps: int = 120, out: Path = DEFAULT_OUT, command: str = "") -> dict:
    torch.set_num_threads(2)
    start = time.time()
    base, tok = load_pretrained()
    _, old_ids = train_val_split(tok.encode(generate_corpus()))
    examples = [sft_example(c, tok) for c in story_qa_dataset(400, seed=0, turns=2)]
    test = story_qa_dataset(40, seed=1, turns=2)
    result = {"command": command, "steps": steps, "batch_size": 16, "seeds": list(range(seeds)),
              "base": scores(base, tok, old_ids, test), "runs": {}}
    for name, (lr, replay, how) in RUNS.items():
        result["runs"][name] = {"lr": lr, "replay_fraction": replay, "how": how, "per_seed": []}
        for seed in range(seeds):
            model = prepare(base, how, seed)
            finetune(model, examples, steps, lr, seed=seed, replay=old_ids if replay else None,
                     replay_fraction=replay)
            result["runs"][name]["per_seed"].append(scores(model, tok, old_ids, test))
            print(name, seed, result["runs"][name]["per_seed"][-1], f"{time.time() - start:.0f} s", flush=True)
    result["seconds"] = round(time.time() - start, 1)
    return save_result(result, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args()
    cmd = "python scripts/sft_forgetting.py" + ("" if a.out == DEFAULT_OUT else f" --out {a.out}")
    cmd += "" if (a.seeds, a.steps) == (3, 120) else f" --seeds {a.seeds} --steps {a.steps}"
    run(a.seeds, a.steps, a.out, cmd)


if __name__ == "__main__":
    main()
