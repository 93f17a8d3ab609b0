"""Tiny Shakespeare, character level: llmlab's small LLaMA-style model vs nanoGPT's "baby GPT".

Both models see the same 1,536,000 training characters (nanoGPT's README CPU run: 2000 steps of
12 sequences x 64 characters) from the first 90% of the text, and are scored on the same fixed
set of validation windows: the last 10% of the text cut into non-overlapping 64-character
windows, every window scored (the baseline's context is 64, so both models are scored with at
most 64 characters of context). The two trainings run interleaved, step by step in proportion to
their step counts, so that both see the same load on a shared machine; the wall time of a model
is the time spent in its own training steps, with the same number of torch threads.

(a) ``ModelConfig.small`` (RoPE, pre-RMSNorm, SwiGLU, no biases, context 128) trained with
    ``SMALL_RECIPE``: peak learning rate 3e-3 with 50 warm-up steps and cosine decay to 3e-4, and
    750 steps of 16 x 128 characters. Measured (2 threads, benchmarks/results/bench_shakespeare.txt):
    val loss 1.742 on the shared 64-character windows (1.721 scored at its own 128-character
    context) against the baseline's 1.891, at 0.90 of the baseline's training time. A run with
    lr 5e-3 -> 5e-4 and 1000 steps of 12 x 128 gave 1.762 at a time ratio of 1.01, so 3e-3 is closer
    to the best learning rate. The gain over the baseline comes from the higher learning rate
    (nanoGPT's 1e-3 suits its 384-wide model; a 128-wide one trains faster at a few times more), the
    LLaMA-style blocks and the 128-character windows (each target sees up to twice the context). The
    target of 1.70 is not reached yet at this character budget.
(b) ``ModelConfig.gpt2_baseline`` (learned positions, pre-LayerNorm, GELU, biases, tied
    embeddings, context 64) trained with ``TrainConfig.baby_gpt()``: lr 1e-3, 100 warm-up steps,
    cosine to 1e-4, beta2 0.99, batch 12, 2000 steps.

Run (prints a table; the committed output is benchmarks/results/bench_shakespeare.txt):
    .venv/bin/python benchmarks/bench_shakespeare.py
The data is read from ../shared/data/tinyshakespeare.txt (``--data`` to change it); it is never
copied into the repository.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads
# slow every matmul several times. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from llmlab.data import load_text, train_val_split  # noqa: E402
from llmlab.model import LLM, ModelConfig  # noqa: E402
from llmlab.tokenizer import CharTokenizer  # noqa: E402
from llmlab.train import TrainConfig, Trainer, heldout_loss  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CHAR_BUDGET = 12 * 64 * 2000  # nanoGPT baby GPT: batch 12 x context 64 x 2000 steps
EVAL_BLOCK = 64  # validation windows: the baseline's context length

BASELINE_RECIPE = dataclasses.replace(TrainConfig.baby_gpt(), eval_interval=10**9, eval_iters=1, progress=False)
SMALL_RECIPE = dataclasses.replace(
    BASELINE_RECIPE, lr=3e-3, min_lr=3e-4, warmup_iters=50, batch_size=16, block_size=128, max_iters=750
)


def interleaved_training(trainers: dict[str, Trainer]) -> None:
    """Step the trainers in turn, always the one furthest behind in its fraction of max_iters.

    The machine is shared with other jobs, so its speed drifts; interleaving gives both runs the
    same conditions, and each trainer's ``elapsed`` counts only its own steps.
    """
    while not all(t.done for t in trainers.values()):
        behind = min((t for t in trainers.values() if not t.done), key=lambda t: t.steps / t.cfg.max_iters)
        behind.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = load_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tokenizer.encode(text))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")  # fmt: skip
    print(f"data {args.data.name}: {len(text):,} chars, vocab {tokenizer.vocab_size}, train {len(train_ids):,}, "
          f"val {len(val_ids):,} ({(len(val_ids) - 1) // EVAL_BLOCK} windows of {EVAL_BLOCK} scored)")  # fmt: skip
    print(f"training characters per model: {CHAR_BUDGET:,}\n", flush=True)
    vocab = tokenizer.vocab_size
    runs = {"small": (ModelConfig.small(vocab), SMALL_RECIPE),
            "gpt2_baseline": (ModelConfig.gpt2_baseline(vocab), BASELINE_RECIPE)}  # fmt: skip
    trainers = {}
    for name, (config, recipe) in runs.items():
        if recipe.tokens_per_step * recipe.max_iters != CHAR_BUDGET:
            raise ValueError(f"{name} recipe must use {CHAR_BUDGET} training characters, "
                             f"got {recipe.tokens_per_step * recipe.max_iters}")  # fmt: skip
        torch.manual_seed(0)
        trainers[name] = Trainer(LLM(config), train_ids, val_ids, recipe)
    start = time.perf_counter()
    interleaved_training(trainers)
    total = time.perf_counter() - start
    results = {}
    for name, t in trainers.items():
        val = heldout_loss(t.model, val_ids, EVAL_BLOCK, batch_size=64)
        # Each model also scored at its own training context, as nanoGPT reports its loss.
        own = heldout_loss(t.model, val_ids, t.cfg.block_size, batch_size=64)
        results[name] = {"params": t.model.num_parameters(), "val": val, "own": own, "seconds": t.elapsed,
                         "cfg": t.cfg}
    print(f"interleaved training of both models: {total:.1f} s wall in all", flush=True)
    print()
    header = "recipe (lr peak->min, steps x batch x context)"
    print(f"{'model':<14} {'params':>9} {header:<46} {'val@64':>7} {'val@own':>7} {'train s':>8}")
    for name, r in results.items():
        c = r["cfg"]
        recipe = f"lr {c.lr:g}->{c.min_lr:g}, {c.max_iters} x {c.batch_size} x {c.block_size}"
        print(f"{name:<14} {r['params']:>9,} {recipe:<46} {r['val']:>7.4f} {r['own']:>7.4f} {r['seconds']:>8.1f}")
    small, base = results["small"], results["gpt2_baseline"]
    print("val@64: every model scored on the same 64-character windows; val@own: at its own training context")
    print(f"wall-time ratio small / baseline: {small['seconds'] / base['seconds']:.2f}")
    for label, key in (("at 64 characters of context", "val"), ("at its own context", "own")):
        print(f"target: small val loss <= 1.70 {label}: {'met' if small[key] <= 1.70 else 'NOT met'} "
              f"({small[key]:.4f})")
    print(f"target: wall time <= baseline: {'met' if small['seconds'] <= base['seconds'] else 'NOT met'}")


if __name__ == "__main__":
    main()
