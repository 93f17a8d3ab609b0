"""Ablation of the LLaMA-style architecture choices behind notebook 07 (training a tiny LLM).

Five small llmlab models are trained on the same data, with the same budget and the same seeds,
and differ only in the three choices LLaMA made differently from GPT-2:

    llama            RoPE,    RMSNorm,   SwiGLU MLP (hidden 8C/3)     (Touvron et al. 2023)
    learned_pos      learned absolute positions instead of RoPE       (one swap back to GPT-2)
    layernorm        LayerNorm instead of RMSNorm                     (one swap back)
    gelu_mlp         GELU MLP (hidden 4C) instead of SwiGLU           (one swap back)
    gpt              learned positions, LayerNorm, GELU MLP           (all three swapped back)

Width C = 48 makes the two feed-forward blocks exactly equal in size: SwiGLU has 3 * C * 8C/3 =
3 * 48 * 128 and the GELU MLP 2 * C * 4C = 2 * 48 * 192 weights, 18,432 per layer each. Biases
and weight tying stay off in every variant (GPT-2 has both), so that only the three switches
change; the learned position table adds block_size * C = 3,072 embedding parameters.

Every variant is trained once per seed; a seed fixes the initialization and the training batches,
so the variants of one seed see exactly the same data in the same order. The score is the loss on
fixed non-overlapping windows of the held-out split (``llmlab.train.heldout_loss``). The result is
written into the package (llmlab/results/), where the notebook reads it with
``llmlab.notebook.load_result``:

    python scripts/ablation_llama_choices.py         # about 10 minutes on a busy 2-core CPU, one thread
    python scripts/ablation_llama_choices.py --iters 2 --seeds 1 --eval-windows 4 --out /tmp/x.json

One thread and fixed seeds: the same machine and versions give the same numbers.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from llmlab.data import generate_corpus, train_val_split
from llmlab.model import LLM, ModelConfig
from llmlab.notebook import save_result, seed_everything
from llmlab.tokenizer import CharTokenizer
from llmlab.train import TrainConfig, heldout_loss, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "llmlab" / "results" / "ablation_llama_choices.json"  # package data: found on Colab too
N_EMBD, BLOCK_SIZE = 48, 64
SWIGLU_HIDDEN, GELU_HIDDEN = 8 * N_EMBD // 3, 4 * N_EMBD  # 128 and 192: equal parameter counts
VARIANTS = {  # name -> the ModelConfig fields that differ from the LLaMA-style base
    "llama": {},
    "learned_pos": {"position": "learned"},
    "layernorm": {"norm": "layernorm"},
    "gelu_mlp": {"ffn": "gelu", "ffn_hidden": GELU_HIDDEN},
    "gpt": {"position": "learned", "norm": "layernorm", "ffn": "gelu", "ffn_hidden": GELU_HIDDEN},
}
CURVE_BIN = 10  # training losses are stored as means over bins of this many steps


def base_config(vocab_size: int) -> ModelConfig:
    """LLaMA-style: RoPE, pre-RMSNorm, SwiGLU; 2 layers, width 48, 4 heads, context 64, no biases."""
    return ModelConfig(vocab_size=vocab_size, block_size=BLOCK_SIZE, n_layer=2, n_head=4, n_kv_head=4,
                       n_embd=N_EMBD, ffn_hidden=SWIGLU_HIDDEN)  # fmt: skip


def variant_config(name: str, vocab_size: int) -> ModelConfig:
    """The base config with the fields of ``VARIANTS[name]`` replaced."""
    if name not in VARIANTS:
        raise ValueError(f"name must be one of {list(VARIANTS)}, got {name!r}")
    return replace(base_config(vocab_size), **VARIANTS[name])


def binned(values: list[float], size: int = CURVE_BIN) -> list[float]:
    """Means of consecutive groups of ``size`` values (the last group may be shorter), rounded."""
    return [round(sum(chunk) / len(chunk), 4) for chunk in (values[i : i + size] for i in range(0, len(values), size))]


def train_one(name: str, seed: int, data: tuple[torch.Tensor, torch.Tensor], vocab_size: int, iters: int,
              eval_windows: int) -> dict:  # fmt: skip
    """Train one variant with one seed; return its held-out loss, training curve and size."""
    train_ids, val_ids = data
    seed_everything(seed)  # the initialization
    model = LLM(variant_config(name, vocab_size))
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_iters=min(20, iters // 2), max_iters=iters, batch_size=16,
                      eval_interval=iters + 1, eval_iters=1, seed=seed, progress=False)  # fmt: skip
    start = time.perf_counter()
    history = train(model, train_ids, val_ids, cfg)
    seconds = time.perf_counter() - start
    loss = heldout_loss(model, val_ids, BLOCK_SIZE, max_windows=eval_windows)
    return {"heldout_loss": round(loss, 4), "train_curve": binned(history.step_loss), "seconds": round(seconds, 1),
            "parameters": model.num_parameters(), "non_embedding_parameters":
            model.num_parameters(exclude_embeddings=True)}  # fmt: skip


def run(iters: int, seeds: int, eval_windows: int, out: Path) -> dict:
    torch.set_num_threads(1)
    text = generate_corpus(300_000, seed=1)
    tok = CharTokenizer.from_text(text)
    data = train_val_split(torch.tensor(tok.encode(text)))
    result = {"iters": iters, "seeds": list(range(seeds)), "eval_windows": eval_windows, "block_size": BLOCK_SIZE,
              "n_embd": N_EMBD, "curve_bin": CURVE_BIN, "vocab_size": tok.vocab_size,
              "variants": {name: dict(changes) for name, changes in VARIANTS.items()}, "runs": {}}  # fmt: skip
    for seed in range(seeds):
        for name in VARIANTS:
            run_result = train_one(name, seed, data, tok.vocab_size, iters, eval_windows)
            result["runs"].setdefault(name, []).append(run_result)
            print(f"seed {seed} {name:>12}: held-out loss {run_result['heldout_loss']:.4f} "
                  f"({run_result['seconds']} s)", flush=True)  # fmt: skip
    result["command"] = (f"python scripts/ablation_llama_choices.py --iters {iters} --seeds {seeds} "
                         f"--eval-windows {eval_windows}")  # fmt: skip
    return save_result(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200, help="training steps per model")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. seeds-1, each trains every variant")
    parser.add_argument("--eval-windows", type=int, default=256, help="held-out windows of 64 tokens scored")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON result")
    args = parser.parse_args()
    run(args.iters, args.seeds, args.eval_windows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
