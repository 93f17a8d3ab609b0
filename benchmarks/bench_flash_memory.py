"""Peak extra memory of attention at T = 8192, D = 64, one head: naive (llmlab.attention's
from-scratch scaled_dot_product_attention) vs tiled (FlashAttention) vs PyTorch's fused kernel,
measured in one run with llmlab.memory.measure_peak_memory.

"Extra" is everything allocated while the call runs (score/probability matrices, tiles, the output,
the log-sum-exp), above what was allocated before it (q, k, v). The claim checked: the tiled
forward needs at most 1/10 of the naive implementation's peak. Wall times are printed for
information only (a Python loop of tiles is not fast on a CPU; the point is memory).

    .venv/bin/python benchmarks/bench_flash_memory.py            # CPU, the committed result
    .venv/bin/python benchmarks/bench_flash_memory.py --device cuda

Output committed in benchmarks/results/bench_flash_memory.txt.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.nn.functional as F

from llmlab.attention import scaled_dot_product_attention
from llmlab.flash_attention import FlashConfig, flash_attention_forward
from llmlab.memory import measure_peak_memory
from llmlab.notebook import format_seconds, time_call

MAX_RATIO = 0.1  # tiled peak / naive peak must not exceed this


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128, help="block_q = block_k of the tiled forward")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    device, t, d = torch.device(args.device), args.seq_len, args.head_dim
    q, k, v = torch.randn(3, 1, 1, t, d, device=device)  # (B, H, T, D) each, B = H = 1
    config = FlashConfig(args.block, args.block)

    def tiled() -> torch.Tensor:
        return flash_attention_forward(q, k, v, config=config).output  # (B, H, T, D)

    runs = {
        "naive (materialises T x T)": lambda: scaled_dot_product_attention(q, k, v),  # llmlab.attention
        f"tiled flash ({args.block}x{args.block} tiles)": tiled,
        "torch fused sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    print(f"python {platform.python_version()} | torch {torch.__version__} | device {device} | threads 1")
    print(f"T = S = {t}, D = {d}, B = H = 1, float32; q, k, v = {3 * t * d * 4 / 2**20:.2f} MiB before the call")
    print(f"{'implementation':34s} {'peak extra':>12s} {'vs naive':>9s} {'time':>9s}")
    peaks, outputs = {}, {}
    for name, fn in runs.items():
        outputs[name], peaks[name] = measure_peak_memory(fn, device)
        seconds = time_call(fn, repeat=1, warmup=0)
        ratio = peaks[name] / peaks[next(iter(runs))]
        print(f"{name:34s} {peaks[name] / 2**20:9.2f} MiB {ratio:9.4f} {format_seconds(seconds):>9s}")
    names = list(runs)
    torch.testing.assert_close(outputs[names[1]], outputs[names[0]], rtol=1e-4, atol=1e-5)
    ratio = peaks[names[1]] / peaks[names[0]]
    print(f"tiled / naive peak extra memory = {ratio:.4f} (claim: <= {MAX_RATIO}); outputs equal to 1e-5")
    print(f"naive / tiled = {1 / ratio:.1f}x less memory for the tiled forward")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
