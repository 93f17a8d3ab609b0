"""Length-extrapolation experiment behind notebook 03 (positional encodings).

Trains one small llmlab model per positional encoding (learned, sinusoidal, RoPE, ALiBi, none) on
the project's generated corpus with a context of 64 tokens, then measures the validation loss at
every position of 256-token windows, four times the training length. RoPE is also evaluated with
position interpolation and NTK-aware scaling (factor 4) applied at evaluation time only, with no
fine-tuning. The result is written as JSON into the package (llmlab/results/), so that the notebook
finds it on Colab too; the notebook reads it with ``llmlab.notebook.load_result`` and checks it:

    python scripts/positional_extrapolation.py            # about 3 minutes on a 2-core CPU
    python scripts/positional_extrapolation.py --iters 20 --out /tmp/x.json   # a quick smoke run

The run is deterministic for a given machine, thread count and set of versions (fixed seeds, one
thread).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.data import generate_corpus, train_val_split
from llmlab.model import LLM, ModelConfig
from llmlab.notebook import save_result, seed_everything
from llmlab.tokenizer import CharTokenizer
from llmlab.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "llmlab" / "results" / "positional_extrapolation.json"  # package data: works on Colab too
TRAIN_LEN, EVAL_LEN, BUCKET = 64, 256, 8
ENCODINGS = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_SCALINGS = {"rope + PI x4": ("linear", 4.0), "rope + NTK x4": ("ntk", 4.0)}


def base_config(vocab_size: int) -> ModelConfig:
    """2 layers, width 64, 4 heads, SwiGLU, pre-RMSNorm: small enough to train in seconds."""
    return ModelConfig(vocab_size=vocab_size, block_size=TRAIN_LEN, n_layer=2, n_head=4, n_kv_head=4,
                       n_embd=64, ffn_hidden=176)


def eval_windows(val_ids: torch.Tensor, count: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed validation windows of EVAL_LEN tokens and their next-token targets, each (N, T)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val_ids) - EVAL_LEN - 1, (count,), generator=g)  # (N,)
    x = torch.stack([val_ids[s : s + EVAL_LEN] for s in starts.tolist()])  # (N, T)
    y = torch.stack([val_ids[s + 1 : s + EVAL_LEN + 1] for s in starts.tolist()])  # (N, T)
    return x, y


@torch.no_grad()
def loss_per_position(model: LLM, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Mean cross-entropy at each position, averaged over the windows and then over buckets of 8."""
    model.eval()
    logits = model(x).logits  # (N, T, V)
    per_token = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (N, T)
    per_bucket = per_token.mean(0).reshape(-1, BUCKET).mean(1)  # (T / 8,)
    return [round(v, 4) for v in per_bucket.tolist()]


def at_length(model: LLM, length: int, **changes) -> LLM:
    """The same weights in a model whose config allows ``length`` tokens (and any RoPE changes)."""
    longer = LLM(replace(model.config, block_size=length, **changes))
    longer.load_state_dict(model.state_dict())
    return longer


def run(iters: int, out: Path, corpus_chars: int = 300_000, windows: int = 64) -> dict:
    """Train and evaluate every encoding; write and return the result (small values make a smoke run)."""
    torch.set_num_threads(1)
    text = generate_corpus(corpus_chars, seed=1)
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(torch.tensor(tok.encode(text)))
    x, y = eval_windows(val_ids, count=windows)
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_iters=min(30, iters // 2), max_iters=iters, batch_size=16,
                      eval_interval=iters, eval_iters=8, progress=False, seed=0)
    result = {"train_len": TRAIN_LEN, "eval_len": EVAL_LEN, "bucket": BUCKET, "iters": iters,
              "val_loss_at_train_len": {}, "loss_by_position": {}, "train_seconds": {}}
    for encoding in ENCODINGS:
        seed_everything(0)
        model = LLM(replace(base_config(tok.vocab_size), position=encoding))
        start = time.perf_counter()
        history = train(model, train_ids, val_ids, cfg)
        result["train_seconds"][encoding] = round(time.perf_counter() - start, 1)
        result["val_loss_at_train_len"][encoding] = round(history.val_loss[-1], 4)
        print(f"{encoding:>10}: trained in {result['train_seconds'][encoding]} s, "
              f"val loss {result['val_loss_at_train_len'][encoding]}", flush=True)
        if encoding == "learned":
            continue  # no table rows past TRAIN_LEN: it cannot be evaluated at EVAL_LEN at all
        result["loss_by_position"][encoding] = loss_per_position(at_length(model, EVAL_LEN), x, y)
        if encoding == "rope":
            for name, (scaling, factor) in ROPE_SCALINGS.items():
                scaled = at_length(model, EVAL_LEN, rope_scaling=scaling, rope_factor=factor)
                result["loss_by_position"][name] = loss_per_position(scaled, x, y)
    result["command"] = f"python scripts/positional_extrapolation.py --iters {iters}"
    return save_result(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600, help="training steps per model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON result")
    args = parser.parse_args()
    run(args.iters, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
