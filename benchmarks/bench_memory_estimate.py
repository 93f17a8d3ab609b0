"""Memory estimator vs measurement, component by component, on several model configurations.

For each configuration one real AdamW step runs (fp32 AdamW, or a bf16 model with fp32 master
weights through llmlab.precision.MasterWeightOptimizer), and the bytes actually held are compared
with llmlab.memory.training_memory / activation_bytes:
- weights, gradients, master weights, optimizer state: storages held after the step
  (llmlab.memory.held_state_bytes);
- activations: the distinct storages autograd holds for backward at the end of the forward pass
  (llmlab.memory.measure_saved_activations, torch.autograd.graph.saved_tensors_hooks); with
  activation checkpointing, the bytes a forward pass leaves allocated (measure_retained_memory)
  minus the returned logits and the CPU RNG state torch.utils.checkpoint keeps per layer.
Target: every component within 5% (exit status 1 otherwise).

    .venv/bin/python benchmarks/bench_memory_estimate.py              # the committed result (CPU)
    .venv/bin/python benchmarks/bench_memory_estimate.py --device cuda  # adds the CUDA allocator

Output committed in benchmarks/results/bench_memory_estimate.txt.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import replace

import torch

from llmlab.memory import (
    activation_bytes,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    held_state_bytes,
    measure_retained_memory,
    measure_saved_activations,
    training_memory,
)
from llmlab.model import LLM, ModelConfig
from llmlab.param_count import Architecture
from llmlab.precision import MasterWeightOptimizer

TOLERANCE = 0.05
BATCH, SEQ = 8, 128
BASE = ModelConfig.small(vocab_size=65)  # the shipped model's shape: 4 blocks, width 128
CONFIGS = {
    "small (LLaMA, MHA)": {},
    "small, GQA 8:2, width 256": {"n_embd": 256, "n_head": 8, "n_kv_head": 2, "ffn_hidden": 704},
    "small, MQA, plain attention": {"n_kv_head": 1, "attn_impl": "manual"},
    "GPT-2 layout (LayerNorm, GELU, tied)": {"position": "learned", "norm": "layernorm", "ffn": "gelu",
                                             "bias": True, "tie_embeddings": True, "ffn_hidden": 512},
    "deep narrow (8 blocks, width 64)": {"n_layer": 8, "n_embd": 64, "ffn_hidden": 192},
}
COMPONENTS = ("weights", "gradients", "master_weights", "optimizer_state", "activations")


def run(name: str, changes: dict, precision: str, device: torch.device) -> list[tuple[str, int, int]]:
    cfg = replace(BASE, **changes)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    model = LLM(cfg).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g).to(device) for _ in range(2))
    if precision == "fp32":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = MasterWeightOptimizer(model.parameters(), lr=1e-3)
    loss, act = measure_saved_activations(lambda: model(x, targets=y).loss, exclude=model.parameters())
    loss.backward()
    opt.step()
    held = {**held_state_bytes(model, opt), "activations": act}
    est = training_memory(model, BATCH, SEQ, optimizer="adamw", precision=precision,
                          fused_attention=cfg.attn_impl == "sdpa").as_dict()
    rows = [(key, held[key], est[key]) for key in COMPONENTS]
    enable_activation_checkpointing(model)
    out, retained = measure_retained_memory(lambda: model(x, targets=y), device)
    outputs = out.logits.numel() * out.logits.element_size() + out.loss.numel() * out.loss.element_size()
    rng = cfg.n_layer * torch.get_rng_state().numel() if device.type == "cpu" else 0
    ckpt = activation_bytes(Architecture.from_model_config(cfg), BATCH, SEQ, dtype.itemsize,
                            fused_attention=cfg.attn_impl == "sdpa", checkpointing=True)
    disable_activation_checkpointing(model)
    rows.append(("activations, checkpointed", retained - outputs - rng, ckpt.saved))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    print(f"python {platform.python_version()} | torch {torch.__version__} | device {device} | threads 1")
    print(f"batch {BATCH} x {SEQ} tokens, one AdamW step; measured / formula per component (target: within "
          f"{TOLERANCE:.0%})")
    worst = 0.0
    for name, changes in CONFIGS.items():
        for precision in ("fp32", "bf16_mixed"):
            print(f"\n{name}, {precision}")
            for key, measured, formula in run(name, changes, precision, device):
                ratio = measured / formula if formula else (1.0 if measured == 0 else float("inf"))
                worst = max(worst, abs(ratio - 1))
                print(f"  {key:27s} formula {formula / 2**20:9.3f} MiB  measured {measured / 2**20:9.3f} MiB  "
                      f"ratio {ratio:.4f}")
    ok = worst <= TOLERANCE
    print(f"\nlargest deviation {worst:.2%}: {'every component within' if ok else 'FAILS'} {TOLERANCE:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
