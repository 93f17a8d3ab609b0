"""Multi-token prediction (DeepSeek-V3, depth 1) on the shipped model, for notebook 20.

Main model: ``llmlab.load_pretrained()`` (ModelConfig.small, 0.82 M parameters), frozen. An
``llmlab.mtp.MTPModule`` (one Transformer block of the same width, sharing the embedding and the
output head) is trained alone to predict token t+2 with AdamW (lr 3e-3, untuned) for ``--steps``
steps of 16 x 128 characters from the first 90% of ``generate_corpus()``. Recorded: held-out MTP
loss along training, the main model's held-out next-token loss, the top-1 agreement between the
MTP prediction at t and the main model's greedy prediction at t+1 on held-out text, and
self-speculative decoding with the MTP module as a depth-1 draft (k = 1) on 4 held-out prompts of
32 characters, 64 new characters each: greedy, and sampled at temperature 1 with 3 seeds
(acceptance rate, tokens per main-model pass, greedy tokens equal to the main model alone).

    python scripts/modern_mtp.py                              # about 3 minutes on a loaded 2-core CPU
    python scripts/modern_mtp.py --steps 20 --out /tmp/m.json  # a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, train_val_split
from llmlab.mtp import MTPDraft, MTPModule, mtp_forward, mtp_loss
from llmlab.notebook import save_result
from llmlab.speculative import autoregressive_generate, speculative_generate

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "modern_mtp.json"
BATCH, SEQ, PROMPT_LEN, NEW_TOKENS, N_PROMPTS = 16, 128, 32, 64, 4


def heldout(model, mtp, val: torch.Tensor) -> dict:
    """MTP loss, main loss and top-1 agreement on 8 held-out rows of 128 characters."""
    rows = val[:8 * (SEQ + 1)].view(8, SEQ + 1)
    x, y = rows[:, :-1], rows[:, 1:]
    with torch.no_grad():
        main, extra = mtp_forward(model, mtp, x)
        main_loss = torch.nn.functional.cross_entropy(main.flatten(0, 1), y.flatten())
        agree = (extra.argmax(-1) == main[:, 1:].argmax(-1)).float().mean()
    return {"mtp_loss": float(mtp_loss(extra, y)), "main_loss": float(main_loss), "top1_agreement": float(agree)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = load_pretrained()
    model.eval().requires_grad_(False)
    train_ids, val = train_val_split(tok.encode(generate_corpus()))
    mtp = MTPModule(model)
    opt = torch.optim.AdamW(mtp.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    curve, start = [], time.time()
    for step in range(args.steps + 1):
        if step % 50 == 0 or step == args.steps:
            mtp.eval()
            curve.append({"step": step, **heldout(model, mtp, val)})
            print(curve[-1], flush=True)
            mtp.train()
        if step == args.steps:
            break
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (BATCH,), generator=gen)
        rows = torch.stack([train_ids[s:s + SEQ + 1] for s in starts.tolist()])  # (B, T + 1)
        _, extra = mtp_forward(model, mtp, rows[:, :-1])
        loss = mtp_loss(extra, rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.time() - start
    mtp.eval()
    draft = MTPDraft(model, mtp)
    prompts = [val[1000 + 500 * i:1000 + 500 * i + PROMPT_LEN][None] for i in range(N_PROMPTS)]
    decoding = {}
    for label, temp, seeds in (("greedy", 0.0, [0]), ("sampled_t1", 1.0, [0, 1, 2])):
        acc, tested, tokens, passes, equal = 0, 0, 0, 0, True
        for seed in seeds:
            for p in prompts:
                g = torch.Generator().manual_seed(seed)
                out = speculative_generate(model, draft, p, NEW_TOKENS, k=1, temperature=temp, generator=g)
                acc += sum(out.accepted)
                tested += len(out.accepted)
                tokens += NEW_TOKENS
                passes += out.target_calls
                if temp == 0.0:
                    equal &= torch.equal(out.tokens, autoregressive_generate(model, p, NEW_TOKENS, 0.0).tokens)
        decoding[label] = {"acceptance_rate": acc / tested, "tokens_per_main_pass": tokens / passes,
                           "generations": len(seeds) * len(prompts)}
        if temp == 0.0:
            decoding[label]["tokens_equal_main_alone"] = bool(equal)
        print(label, decoding[label], flush=True)
    save_result({
        "command": "python scripts/modern_mtp.py", "steps": args.steps, "batch": BATCH, "seq": SEQ,
        "main_parameters": model.num_parameters(), "mtp_parameters": sum(p.numel() for p in mtp.parameters()),
        "train_seconds": round(train_s, 1), "curve": curve, "decoding": decoding,
    }, args.out)


if __name__ == "__main__":
    main()
