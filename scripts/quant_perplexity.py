"""Held-out loss of the shipped model after weight-only quantization: round-to-nearest vs GPTQ vs NF4,
for notebook 14 (quantization).

The shipped model (``llmlab.load_pretrained()``: 0.82 M parameters, 4 layers, width 128) has its 28
linear layers (q, k, v, o, gate, up, down in each block) quantized by ``llmlab.gptq.quantize_linears``;
embeddings, output head and norms stay fp32. Formats: integer codes at 8, 4, 3 and 2 bits with
zero-point, one scale per output channel or per group of 32 columns; NF4 (block 64, double
quantization). GPTQ calibrates on 16 random windows of 128 tokens from the training split; each of
3 seeds draws other windows (round-to-nearest and NF4 need no data and are deterministic). Every
model is scored on the whole held-out split (the last 10% of the generated corpus, non-overlapping
windows of 128 tokens, ``llmlab.train.heldout_loss``), the number recorded in the checkpoint. The
result goes into the package (llmlab/results/quant_perplexity.json), where the notebook reads it:

    python scripts/quant_perplexity.py                       # about 4-6 minutes on a 2-core CPU
    python scripts/quant_perplexity.py --seeds 1 --eval-windows 8 --out /tmp/q.json   # a smoke test
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, get_batch, train_val_split
from llmlab.gptq import GPTQConfig, quantize_linears
from llmlab.notebook import save_result
from llmlab.train import heldout_loss

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "quant_perplexity.json"
BITS = (8, 4, 3, 2)
GROUP_SIZES = (None, 32)
CALIB_WINDOWS, BLOCK = 16, 128


def run(seeds: int = 3, eval_windows: int | None = None, out: Path = DEFAULT_OUT) -> dict:
    torch.set_num_threads(1)
    model, tokenizer = load_pretrained()
    train_ids, val_ids = train_val_split(torch.tensor(tokenizer.encode(generate_corpus())))

    def score(m) -> float:
        return heldout_loss(m, val_ids, BLOCK, max_windows=eval_windows)

    n_params = sum(p.numel() for p in model.parameters())
    rows = [{"method": "fp32", "bits": 32, "group_size": None, "bytes": 4 * n_params, "losses": [score(model)]}]
    calib = [get_batch(train_ids, CALIB_WINDOWS, BLOCK, torch.Generator().manual_seed(s))[0] for s in range(seeds)]
    for bits in BITS:
        for group_size in GROUP_SIZES:
            config = GPTQConfig(bits=bits, group_size=group_size)
            rtn, size = quantize_linears(model, "rtn", config)
            rows.append({"method": "rtn", "bits": bits, "group_size": group_size, "bytes": size,
                         "losses": [score(rtn)]})  # fmt: skip
            losses = []
            for ids in calib:
                gptq, size = quantize_linears(model, "gptq", config, ids)
                losses.append(score(gptq))
            rows.append({"method": "gptq", "bits": bits, "group_size": group_size, "bytes": size, "losses": losses})
            print(f"{bits} bits, group {group_size}: rtn {rows[-2]['losses'][0]:.4f}, gptq {losses}", flush=True)
    nf4, size = quantize_linears(model, "nf4")
    rows.append({"method": "nf4", "bits": 4, "group_size": 64, "bytes": size, "losses": [score(nf4)]})
    windows = (len(val_ids) - 1) // BLOCK if eval_windows is None else eval_windows
    result = {
        "command": "python scripts/quant_perplexity.py"
        + ("" if seeds == 3 else f" --seeds {seeds}")
        + ("" if eval_windows is None else f" --eval-windows {eval_windows}"),
        "seeds": seeds,
        "calibration": f"{CALIB_WINDOWS} random windows of {BLOCK} tokens from the training split per seed",
        "eval_windows": windows,
        "block_size": BLOCK,
        "num_parameters": n_params,
        "rows": rows,
    }
    return save_result(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="GPTQ calibration seeds 0 .. seeds-1")
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows scored (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON result")
    args = parser.parse_args()
    start = time.time()
    result = run(args.seeds, args.eval_windows, args.out)
    for row in result["rows"]:
        mean = sum(row["losses"]) / len(row["losses"])
        print(f"{row['method']:5s} {row['bits']:2d} bits group {str(row['group_size']):4s} "
              f"{row['bytes'] / 1e3:8.1f} kB  loss {mean:.4f} (ppl {math.exp(mean):.4f})")  # fmt: skip
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
