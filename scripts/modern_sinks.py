"""Attention sinks (StreamingLLM) on the shipped model, for notebook 20.

Model: ``llmlab.load_pretrained()`` (ModelConfig.small: 4 layers, width 128, context 128, trained on
128-character crops of ``generate_corpus()``). Text: 4 rows of ``--tokens`` characters from the
held-out 10% of ``generate_corpus()``. For each window W in ``--windows`` (cache size W tokens):
the reference (a fresh forward pass over the last W tokens for every prediction), window only
(n_sink = 0) and sinks + window (n_sink = 1 and 4, window W - n_sink), positions within the cache
as in the paper. Recorded: mean next-token loss (nats) over the tokens at or after 2W (far past
the window, every prediction made after evictions), over the tokens before W (no eviction yet),
per row, and the attention mass each layer puts on the first token in a full-context forward.

    python scripts/modern_sinks.py                          # about 6 minutes on a loaded 2-core CPU
    python scripts/modern_sinks.py --tokens 96 --windows 16 --out /tmp/s.json   # a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmlab.attention_sinks import sliding_window_logits, streaming_logits
from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, train_val_split
from llmlab.notebook import save_result

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "modern_sinks.json"
ROWS = 4
SINKS = (0, 1, 4)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> per-token cross-entropy (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def first_token_mass(model, ids: torch.Tensor) -> list[float]:
    """Per layer, the mean attention probability on token 0 from queries 32..T-1 (all heads, rows)."""
    with torch.no_grad():
        probs = model(ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    return [float(p[:, :, 32:, 0].mean()) for p in probs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--windows", type=int, nargs="+", default=[128, 64, 32])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained()
    model.eval()
    _, val = train_val_split(tok.encode(generate_corpus()))
    rows = val[:ROWS * (args.tokens + 1)].view(ROWS, args.tokens + 1)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    result = {
        "command": "python scripts/modern_sinks.py",
        "rows": ROWS, "tokens": args.tokens, "model_parameters": model.num_parameters(),
        "block_size": model.config.block_size,
        "first_token_attention": first_token_mass(model, inputs[:, :model.config.block_size]),
        "uniform_attention": float((1.0 / torch.arange(33, model.config.block_size + 1)).mean()),
        "by_window": {},
    }
    for w in args.windows:
        start = time.time()
        runs = {"reference": token_losses(sliding_window_logits(model, inputs, w), targets)}
        for n_sink in SINKS:
            runs[f"sink{n_sink}"] = token_losses(streaming_logits(model, inputs, n_sink, w - n_sink), targets)
        result["by_window"][str(w)] = {
            name: {"far_mean": float(loss[:, 2 * w:].mean()), "early_mean": float(loss[:, :w].mean()),
                   "far_by_row": [float(v) for v in loss[:, 2 * w:].mean(dim=1)]}
            for name, loss in runs.items()
        }
        print(f"W={w}: " + ", ".join(f"{k} {v['far_mean']:.4f}" for k, v in result["by_window"][str(w)].items())
              + f" ({time.time() - start:.0f} s)", flush=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
