"""Tiny Shakespeare, character level: llmlab's small LLaMA-style model vs nanoGPT's "baby GPT".

Every model sees the same 1,536,000 training characters (nanoGPT's README CPU run: 2000 steps of
12 sequences x 64 characters) from the first 90% of the text, and is scored on the last 10%, cut
into non-overlapping windows, every window scored: once at 64 characters (the baseline's context,
the same windows for every model) and once at the model's own training context (nanoGPT's
convention). The trainings run interleaved, step by step in proportion to their step counts, so
that all see the same load on a shared machine; a model's wall time is the time spent in its own
training steps, with the same number of torch threads.

(a) ``small + Muon``: ``ModelConfig.small`` (RoPE, pre-RMSNorm, SwiGLU, no biases, context 128)
    trained with ``SMALL_RECIPE``: ``llmlab.optim.Muon`` on the matrices inside the blocks at peak
    learning rate 1e-2 (Moonshot's RMS matching) and AdamW on the embeddings, the output head and the
    norms at 3e-3; 25 warm-up steps, cosine decay to a tenth; 375 steps of 32 x 128 characters.
(b) ``small + AdamW``: the same model with AdamW everywhere (lr 3e-3 -> 3e-4, 750 steps of 16 x 128,
    the best of four AdamW recipes tried): what the optimizer is worth.
(c) ``gpt2_baseline``: ``ModelConfig.gpt2_baseline`` (learned positions, pre-LayerNorm, GELU, biases,
    tied embeddings, context 64) trained with ``TrainConfig.baby_gpt()``: lr 1e-3, 100 warm-up
    steps, cosine to 1e-4, beta2 0.99, batch 12, 2000 steps.

Targets (from the issue): (a)'s validation loss <= 1.70 at no more wall time than (c).
Measured (2 threads, benchmarks/results/bench_shakespeare.txt, also written to
llmlab/results/bench_shakespeare.json, which notebook 07 reads): (a) 1.608 at its 128-character
context, 1.630 on the 64-character windows, in 0.90 of (c)'s training time; (b) 1.721 and 1.742 in
0.86; (c) 1.891 (nanoGPT reports 1.88). Both targets are met, and only with Muon.

Recipe search for (a), each a full single-thread run with two runs sharing the 2-core machine, scored
at context 128 (1.725 for (b)'s recipe in the same setting): Muon lr 1e-2 with 750 x 16 gave 1.574
but its optimizer step made it slower than the baseline; 500 x 24 with Muon lr 1e-2 gave 1.601,
with 2e-2 1.618; 375 x 32 gave 1.607 (Muon 1e-2) and 1.662 (Muon 3e-3, the AdamW rate). Dropout 0.1
with AdamW gave 1.791. The Newton-Schulz iteration costs the same per step whatever the batch, so
larger batches (fewer steps) make it count less: in one interleaved timing of 2-thread steps,
500 x 24 took 0.91 of the baseline's time and 375 x 32 0.83, hence the recipe. A full run of
500 x 24 (before the iteration was batched over matrices of one shape) measured 1.597 at context
128 and 1.620 at 64, at 1.02 of the baseline's time on a machine busy with other jobs.

Run (prints a table; the committed output is benchmarks/results/bench_shakespeare.txt):
    .venv/bin/python benchmarks/bench_shakespeare.py
The data is read from ../shared/data/tinyshakespeare.txt (``--data`` to change it); it is never
copied into the repository. ``--scale 0.01 --out /tmp/x.json`` runs 1% of the budget (a smoke test).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads
# slow every matmul several times. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from llmlab.data import load_text, train_val_split  # noqa: E402
from llmlab.model import LLM, ModelConfig  # noqa: E402
from llmlab.notebook import save_result  # noqa: E402
from llmlab.tokenizer import CharTokenizer  # noqa: E402
from llmlab.train import TrainConfig, Trainer, heldout_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = ROOT / "llmlab" / "results" / "bench_shakespeare.json"
CHAR_BUDGET = 12 * 64 * 2000  # nanoGPT baby GPT: batch 12 x context 64 x 2000 steps
EVAL_BLOCK = 64  # the shared validation windows: the baseline's context length
TARGET_LOSS = 1.70

BASELINE_RECIPE = dataclasses.replace(TrainConfig.baby_gpt(), eval_interval=10**9, eval_iters=1, progress=False)
ADAMW_RECIPE = dataclasses.replace(
    BASELINE_RECIPE, lr=3e-3, min_lr=3e-4, warmup_iters=50, batch_size=16, block_size=128, max_iters=750
)
SMALL_RECIPE = dataclasses.replace(
    ADAMW_RECIPE, optimizer="muon", muon_lr=1e-2, warmup_iters=25, batch_size=32, max_iters=375
)


def interleaved_training(trainers: dict[str, Trainer]) -> None:
    """Step the trainers in turn, always the one furthest behind in its fraction of max_iters.

    The machine is shared with other jobs, so its speed drifts; interleaving gives every run the
    same conditions, and each trainer's ``elapsed`` counts only its own steps.
    """
    while not all(t.done for t in trainers.values()):
        behind = min((t for t in trainers.values() if not t.done), key=lambda t: t.steps / t.cfg.max_iters)
        behind.step()


def scaled(recipe: TrainConfig, scale: float) -> TrainConfig:
    """The recipe with ``scale`` of its steps (at least 2), the warm-up scaled alike (for smoke runs)."""
    if scale == 1.0:
        return recipe
    steps = max(2, round(recipe.max_iters * scale))
    return dataclasses.replace(recipe, max_iters=steps, warmup_iters=min(recipe.warmup_iters, steps - 1))


def run(data: Path, threads: int, scale: float) -> dict:
    """Train the three models interleaved; return their losses and times."""
    torch.set_num_threads(threads)
    text = load_text(data)
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tokenizer.encode(text))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")  # fmt: skip
    print(f"data {data.name}: {len(text):,} chars, vocab {tokenizer.vocab_size}, train {len(train_ids):,}, "
          f"val {len(val_ids):,} ({(len(val_ids) - 1) // EVAL_BLOCK} windows of {EVAL_BLOCK} scored)")  # fmt: skip
    print(f"training characters per model: {round(CHAR_BUDGET * scale):,}\n", flush=True)
    vocab = tokenizer.vocab_size
    runs = {"small + Muon": (ModelConfig.small(vocab), SMALL_RECIPE),
            "small + AdamW": (ModelConfig.small(vocab), ADAMW_RECIPE),
            "gpt2_baseline": (ModelConfig.gpt2_baseline(vocab), BASELINE_RECIPE)}  # fmt: skip
    trainers = {}
    for name, (config, recipe) in runs.items():
        if recipe.tokens_per_step * recipe.max_iters != CHAR_BUDGET:
            raise ValueError(f"{name} recipe must use {CHAR_BUDGET} training characters, "
                             f"got {recipe.tokens_per_step * recipe.max_iters}")  # fmt: skip
        torch.manual_seed(0)
        trainers[name] = Trainer(LLM(config), train_ids, val_ids, scaled(recipe, scale))
    start = time.perf_counter()
    interleaved_training(trainers)
    print(f"interleaved training of all models: {time.perf_counter() - start:.1f} s wall in all\n", flush=True)
    result = {"data": data.name, "train_chars": len(train_ids), "val_chars": len(val_ids), "threads": threads,
              "char_budget": round(CHAR_BUDGET * scale), "eval_block": EVAL_BLOCK, "target_loss": TARGET_LOSS,
              "runs": {}}  # fmt: skip
    for name, t in trainers.items():
        c = t.cfg
        result["runs"][name] = {
            "params": t.model.num_parameters(), "block_size": t.block_size, "optimizer": c.optimizer,
            "lr": c.lr, "min_lr": c.min_lr, "muon_lr": c.muon_lr, "steps": c.max_iters, "batch_size": c.batch_size,
            "val_loss_64": heldout_loss(t.model, val_ids, EVAL_BLOCK, batch_size=64),
            "val_loss_own": heldout_loss(t.model, val_ids, t.block_size, batch_size=64),
            "train_seconds": t.elapsed,
        }  # fmt: skip
    return result


def report(result: dict) -> None:
    """Print the table and the two targets."""
    header = "recipe (optimizer, lr peak->min, steps x batch x context)"
    print(f"{'model':<14} {'params':>9} {header:<58} {'val@64':>7} {'val@own':>7} {'train s':>8}")
    for name, r in result["runs"].items():
        lr = f"{r['lr']:g}->{r['min_lr']:g}" + (f" (Muon {r['muon_lr']:g})" if r["optimizer"] == "muon" else "")
        recipe = f"{r['optimizer']}, lr {lr}, {r['steps']} x {r['batch_size']} x {r['block_size']}"
        print(f"{name:<14} {r['params']:>9,} {recipe:<58} {r['val_loss_64']:>7.4f} {r['val_loss_own']:>7.4f} "
              f"{r['train_seconds']:>8.1f}")  # fmt: skip
    print("val@64: every model scored on the same 64-character windows; val@own: at its own training context")
    runs, base = result["runs"], result["runs"]["gpt2_baseline"]
    for name in ("small + Muon", "small + AdamW"):
        print(f"wall-time ratio {name} / baseline: {runs[name]['train_seconds'] / base['train_seconds']:.2f}")
    small = runs["small + Muon"]
    for label, key in (("at 64 characters of context", "val_loss_64"), ("at its own context", "val_loss_own")):
        met = "met" if small[key] <= TARGET_LOSS else "NOT met"
        print(f"target: small + Muon val loss <= {TARGET_LOSS} {label}: {met} ({small[key]:.4f})")
    met = "met" if small["train_seconds"] <= base["train_seconds"] else "NOT met"
    print(f"target: small + Muon wall time <= baseline: {met}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the character budget (smoke runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON result")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"--data must be a text file; {args.data} does not exist (the benchmark reads "
                         f"../shared/data/tinyshakespeare.txt by default)")  # fmt: skip
    if not 0 < args.scale <= 1:
        raise SystemExit(f"--scale must be in (0, 1], got {args.scale}")
    result = run(args.data, args.threads, args.scale)
    report(result)
    given = sys.argv[1:] if argv is None else argv
    result["command"] = f"python benchmarks/bench_shakespeare.py {shlex.join(given)}".strip()
    save_result(result, args.out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
