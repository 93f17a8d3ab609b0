"""Speculative decoding with a small draft model trained here, for notebook 20.

Target: the shipped model (``llmlab.load_pretrained()``: ModelConfig.small, 4 layers, width 128,
0.82 M parameters). Draft: a 1-layer, width-32 llmlab LLM (2 heads, SwiGLU 96) trained on the same
generated corpus (first 90% of ``generate_corpus()``) with AdamW for ``--steps`` steps of 16 x 128
characters (lr 3e-3, untuned). Then, on 4 prompts of 32 characters from the held-out split, each
continued by 64 characters: greedy (temperature 0) and sampled (temperature 1, 3 seeds) speculative
decoding for k = 1, 2, 3, 4, 6, 8, against the target alone. Both loops recompute the full prefix
per forward pass (no KV cache). Recorded per (temperature, k): acceptance rate, tokens per target
pass, measured wall-time speed-up (each k timed back to back with the target alone), and
Leviathan et al.'s predicted speed-up from the measured acceptance rate and cost ratio c (draft
pass time / target pass time, measured on 96-token inputs).
Timings are from a shared 2-core CPU and are noisy; the pass counts are exact.

    python scripts/modern_speculative.py                      # about 7 minutes on a loaded 2-core CPU (1 thread)
    python scripts/modern_speculative.py --steps 20 --out /tmp/s.json   # a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, train_val_split
from llmlab.model import LLM, ModelConfig
from llmlab.notebook import save_result
from llmlab.speculative import autoregressive_generate, expected_speedup, speculative_generate
from llmlab.train import TrainConfig, heldout_loss, train

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "modern_speculative.json"
KS = (1, 2, 3, 4, 6, 8)
PROMPT_LEN, NEW_TOKENS, N_PROMPTS = 32, 64, 4


def draft_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, block_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                       ffn_hidden=96)


def pass_seconds(model, ids: torch.Tensor, repeats: int = 30) -> float:
    with torch.no_grad():
        model(ids)
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids)
    return (time.perf_counter() - start) / repeats


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def measure(target, draft, prompts, temperature: float, seeds: list[int]) -> dict:
    """Per k: the target alone and speculative decoding, timed back to back on the same prompts and
    seeds (so a change in the machine's load hits both), plus exact pass and acceptance counts."""
    rows = {}
    for k in KS:
        accepted = rejected = target_calls = 0
        spent = base_time = 0.0
        for prompt in prompts:
            for seed in seeds:
                _, t = timed(autoregressive_generate, target, prompt, NEW_TOKENS, temperature,
                             torch.Generator().manual_seed(seed))
                base_time += t
                out, t = timed(speculative_generate, target, draft, prompt, NEW_TOKENS, k, temperature,
                               torch.Generator().manual_seed(seed))
                spent += t
                accepted += sum(out.accepted)
                rejected += sum(1 for n, kk in zip(out.accepted, out.drafted, strict=True) if n < kk)
                target_calls += out.target_calls
        n_gen = len(prompts) * len(seeds)
        rows[str(k)] = {"acceptance_rate": accepted / (accepted + rejected),
                        "tokens_per_target_pass": NEW_TOKENS * n_gen / target_calls,
                        "measured_speedup": base_time / spent, "baseline_seconds": base_time,
                        "speculative_seconds": spent}
        print(temperature, k, rows[str(k)], flush=True)
    return {"seeds": seeds, "by_k": rows}


def run(steps: int, out: Path, command: str) -> dict:
    torch.set_num_threads(1)  # the shared CPU is oversubscribed; 1 thread is faster and steadier
    start = time.time()
    target, tok = load_pretrained()
    train_ids, val_ids = train_val_split(tok.encode(generate_corpus()))
    torch.manual_seed(0)
    draft = LLM(draft_config(target.config.vocab_size))
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_iters=50, max_iters=steps, batch_size=16, block_size=128,
                      eval_interval=max(steps, 1), eval_iters=4, progress=False)
    train(draft, train_ids, val_ids, cfg)
    draft.eval()
    result = {"command": command, "draft_steps": steps, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
              "n_prompts": N_PROMPTS, "ks": list(KS),
              "target_parameters": target.num_parameters(), "draft_parameters": draft.num_parameters(),
              "target_heldout_loss": heldout_loss(target, val_ids, 128, max_windows=32),
              "draft_heldout_loss": heldout_loss(draft, val_ids, 128, max_windows=32)}
    probe = val_ids[None, : PROMPT_LEN + NEW_TOKENS]  # (1, 96)
    result["cost_ratio_c"] = pass_seconds(draft, probe) / pass_seconds(target, probe)
    prompts = [val_ids[None, i * 1000: i * 1000 + PROMPT_LEN] for i in range(N_PROMPTS)]
    result["greedy"] = measure(target, draft, prompts, 0.0, [0])
    result["sampled_t1"] = measure(target, draft, prompts, 1.0, [0, 1, 2])
    for key in ("greedy", "sampled_t1"):
        for k, row in result[key]["by_k"].items():
            row["predicted_speedup"] = expected_speedup(min(row["acceptance_rate"], 1.0), int(k),
                                                        result["cost_ratio_c"])
    result["seconds"] = round(time.time() - start, 1)
    return save_result(result, out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="draft training steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    command = "python scripts/modern_speculative.py" + (f" --steps {args.steps}" if args.steps != 600 else "")
    return run(args.steps, args.out, command)


if __name__ == "__main__":
    main()
