"""Is int8 faster than fp16/bf16? One linear layer of LLaMA-2-7B through PyTorch's real CPU kernels.

Shapes from the published config (``llmlab.reference_configs``, "llama-2-7b": hidden_size C = 4096,
intermediate_size F = 11008): y = x W^T with W (C, C) (q_proj) and (F, C) (gate_proj / up_proj), at
decode (1 token) and prefill (256 tokens). Kernels (``llmlab.quantization.quantized_linear_kernels``):
fp32, bf16 and fp16 ``F.linear``; int8 weight-only (``torch._weight_int8pack_mm``, bf16
activations); W8A8 dynamic (``torch.ao.nn.quantized.dynamic.Linear``, fbgemm: x quantized per tensor
on every call); and the bare int8 GEMM (``torch._int_mm`` on pre-quantized operands).

Decode reads every weight once per token, as a model does layer after layer: each timed pass runs
the kernel over several copies of the weight whose int8 bytes together are 4x the 32 MiB L3 cache,
so the weights come from DRAM, not from cache (timing one matrix again and again would measure the
cache). Prefill reuses each weight for 256 tokens and is bound by arithmetic. Each time is the best
of 5 passes after one warm-up, one thread; ratios are fp32 time / kernel time from the same run.

    .venv/bin/python benchmarks/bench_quant_matmul.py

Output committed in benchmarks/results/bench_quant_matmul.txt; the times also go to
llmlab/results/bench_quant_matmul.json, which notebook 14 reads.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path

import torch

from llmlab.notebook import save_result, time_call
from llmlab.quantization import quantized_linear_kernels
from llmlab.reference_configs import load_reference_config

JSON_OUT = Path(__file__).resolve().parents[1] / "llmlab" / "results" / "bench_quant_matmul.json"
L3_BYTES = 32 * 2**20  # this machine's last-level cache (lscpu)
PREFILL_TOKENS = 256
SKIP_AT_PREFILL = ("fp16",)  # emulated fp16 GEMMs take tens of seconds at prefill on this CPU


def time_kernel(kernels: list[dict], name: str, x: torch.Tensor) -> float:
    """Best-of-5 seconds per layer for one pass over all copies."""
    fns = [k[name] for k in kernels]
    return time_call(lambda: [f(x) for f in fns], repeat=5, warmup=1) / len(fns)


def bench_shape(label: str, tokens: int, out_features: int, in_features: int) -> dict[str, float]:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 0.02
    copies = 1 if tokens > 1 else math.ceil(4 * L3_BYTES / weight.numel())  # int8: 1 byte per weight
    kernels = [quantized_linear_kernels(weight.clone()) for _ in range(copies)]
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
    ref = kernels[0]["fp32"](x)
    flops = 2 * tokens * out_features * in_features
    print(f"\n{label}: x ({tokens}, {in_features}) @ W^T, W ({out_features}, {in_features}); "
          f"{copies} weight copies per pass")  # fmt: skip
    header = f"{'kernel':20s} {'time/layer':>11s} {'vs fp32':>8s} {'weight GB/s':>12s} {'GFLOP/s':>8s}"
    print(header + f" {'rel. error':>11s}")
    times = {}
    for name in kernels[0]:
        if tokens > 1 and name in SKIP_AT_PREFILL:
            print(f"{name:20s} {'skipped':>11s}")
            continue
        t = time_kernel(kernels, name, x)
        times[name] = t
        y = kernels[0][name](x)
        if name == "int8 GEMM only":  # int32 accumulators: rescale to compare
            w_scale = weight.abs().amax(dim=1) / 127
            y = y.float() * (x.abs().amax() / 127) * w_scale
        err = float((y.float() - ref).norm() / ref.norm())
        weight_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(name, 1) * weight.numel()
        print(f"{name:20s} {t * 1e3:8.2f} ms {times['fp32'] / t:7.2f}x {weight_bytes / t / 1e9:12.1f} "
              f"{flops / t / 1e9:8.1f} {err:11.4f}")  # fmt: skip
    return times


def main() -> int:
    torch.set_num_threads(1)
    fields = load_reference_config("llama-2-7b").fields
    c, f = fields["hidden_size"], fields["intermediate_size"]
    print(f"python {platform.python_version()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()} | "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"llama-2-7b: hidden_size {c}, intermediate_size {f} (llmlab.reference_configs)")
    results = {
        "decode q_proj": bench_shape("decode, q_proj", 1, c, c),
        "decode gate_proj": bench_shape("decode, gate_proj", 1, f, c),
        "prefill q_proj": bench_shape(f"prefill ({PREFILL_TOKENS} tokens), q_proj", PREFILL_TOKENS, c, c),
        "prefill gate_proj": bench_shape(f"prefill ({PREFILL_TOKENS} tokens), gate_proj", PREFILL_TOKENS, f, c),
    }
    print("\nspeed-up over fp32 (fp32 time / kernel time, same run):")
    names = list(results["decode q_proj"])
    print(f"{'':18s} " + " ".join(f"{n:>18s}" for n in names))
    for case, times in results.items():
        cells = [f"{times['fp32'] / times[n]:17.2f}x" if n in times else f"{'-':>18s}" for n in names]
        print(f"{case:18s} " + " ".join(cells))
    speedup = {case: {n: t["fp32"] / t[n] for n in t} for case, t in results.items()}
    save_result({"command": ".venv/bin/python benchmarks/bench_quant_matmul.py", "threads": 1,
                 "prefill_tokens": PREFILL_TOKENS, "seconds_per_layer": results,
                 "speedup_vs_fp32": speedup}, JSON_OUT)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
