"""Fine-tuning comparison behind notebooks 11 and 12: one new domain, fourteen ways to adapt a model.

The shipped ``tiny-char`` model (``llmlab.checkpoint.load_pretrained``: 4 layers, width 128, 0.82 M
parameters, trained on the generated children's stories) is fine-tuned on a domain it has never
seen, the generated recipes of ``llmlab.peft_domain.generate_recipes``, with: full fine-tuning;
training only the top block (selective); LoRA on every linear layer at ranks 1, 4, 16 and 64;
QLoRA (NF4 + double quantization, rank 16); AdaLoRA (rank 16 per module at the start, 4 on average
at the end); prompt tuning; P-tuning (LSTM prompt encoder); prefix tuning (with its MLP); P-tuning
v2 (per-layer prompts, no MLP); Houlsby bottleneck adapters; and LLaMA-Adapter (zero-gated
adaption prompts in the top 3 layers).

Every method gets the same data order, the same number of steps, batch and context, the same
AdamW (betas 0.9/0.99, no weight decay), gradient clipping at 1.0 and the same schedule (linear
warm-up, cosine decay to a tenth of the peak). Only the peak learning rate differs, one per method,
because the methods differ in how far one step moves the output (a soft prompt needs a far larger
step than a full weight matrix). How the rates were set:
- full, selective (1e-3), LoRA and QLoRA (3e-3), adapters (3e-3) and AdaLoRA (1e-2: its lambda
  start at zero and P, Q at std 0.02, so its update grows slowly): common values for these methods,
  not tuned (full, LoRA, QLoRA and AdaLoRA were checked to train stably in a 60-step run);
- prompt tuning, P-tuning, prefix tuning, P-tuning v2 and LLaMA-Adapter: the best recipe validation
  loss among 1, 3 and 10 times a first guess (3e-2, 3e-3, 3e-3, 1e-2, 1e-2), each an 80-step run of
  this script (``--lr-multiplier 3 --only "prompt tuning" ...``). Ten times won for all but
  P-tuning (three times), so those four might do better still at even larger rates.
Small gaps between rows are therefore within what more tuning could change.

Measured for each method (written to JSON, read by the notebooks):
- ``trainable_params``: parameters with requires_grad.
- ``trainable_state_bytes``: the tensors training keeps for them, measured after the first step:
  the parameters, their gradients and AdamW's two moments (all float32: 16 bytes per parameter).
- ``resident_bytes``: every parameter and buffer of the model as stored (QLoRA's base is NF4).
- ``step_peak_bytes``: the peak of bytes allocated during the first optimizer step (forward,
  backward, AdamW creating its moments) above the level before it, from PyTorch's profiler
  (``llmlab.memory.measure_peak_memory``): activations, gradients, optimizer state and
  temporaries. It is exact and repeatable on one machine and set of versions.
- ``peak_train_bytes`` = resident + step peak: the memory training needs at its high point.
- ``seconds_per_step`` (median over the run's steps) and ``train_seconds`` (all steps but the
  profiled first one): wall time on one CPU thread; noisy on a shared machine.
- ``new_val_loss`` (recipes) and ``orig_val_loss`` (stories, the shipped checkpoint's held-out
  windows): mean next-character loss on the first ``eval_windows`` non-overlapping windows of each
  validation split (``llmlab.train.heldout_loss``), at initialisation and after training. The
  difference on the stories is the forgetting; every model is evaluated with its adapter active.

    python scripts/peft_comparison.py                 # about 4 minutes on a 2-core CPU (total_seconds in the JSON)
    python scripts/peft_comparison.py --steps 3 --batch-size 2 --block-size 32 --eval-windows 2 --out /tmp/x.json

The run is deterministic apart from the timings (fixed seeds, one thread).

Learning-rate and seed sweep (``--sweep``): the table above is one seed at one learning rate per
method, so it cannot rank methods. The sweep retrains the methods whose ranking the notebooks
discuss (``SWEEP_GRID``: full fine-tuning, LoRA r=4 and r=64, adapters, prompt tuning, P-tuning and
P-tuning v2) at several multiples of their learning rate, each with seeds 0, 1 and 2 (the seed sets
the adapter initialisation and the data order), and writes only the two losses per run to
``llmlab/results/peft_lr_sweep.json``. The notebooks pick each method's best multiplier by its mean
over the seeds and report the min-max over the seeds there. Selection and report use the same
validation windows, so the best mean is slightly optimistic for every method alike.

    python scripts/peft_comparison.py --sweep         # 66 runs, about 20 minutes; total in the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llmlab.adalora import AdaLoRAConfig, RankAllocator, inject_adalora, orthogonal_regularization, ranks
from llmlab.adapters import (
    AdaptionPromptConfig,
    BottleneckConfig,
    adaption_gates,
    inject_adapters,
    inject_adaption_prompts,
)
from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus, get_batch, train_val_split
from llmlab.lora import LoRAConfig, inject_lora
from llmlab.memory import measure_peak_memory
from llmlab.notebook import save_result, seed_everything
from llmlab.peft_domain import generate_recipes
from llmlab.prompt_tuning import PrefixConfig, PrefixModel, PromptConfig, SoftPromptModel, input_embedding
from llmlab.quantization import NF4Config, prepare_qlora
from llmlab.train import TrainConfig, heldout_loss, lr_at

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "llmlab" / "results" / "peft_comparison.json"  # package data: works on Colab too
SWEEP_OUT = ROOT / "llmlab" / "results" / "peft_lr_sweep.json"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VIRTUAL_TOKENS = 16  # N for prompt tuning, P-tuning, prefix tuning and P-tuning v2


@dataclass(frozen=True)
class RunConfig:
    """The budget shared by every method."""

    steps: int = 80  # optimizer steps per method
    batch_size: int = 8  # sequences per step (B)
    block_size: int = 128  # characters per sequence (T), the shipped model's context
    warmup: int = 8  # linear warm-up steps, then cosine decay to lr / 10
    eval_windows: int = 48  # non-overlapping validation windows of block_size characters per split
    recipe_chars: int = 200_000  # size of the generated new-domain corpus (90% train, 10% validation)
    lr_multiplier: float = 1.0  # scales every method's learning rate (for the learning-rate check)
    seed: int = 0  # data order and adapter initialisation


@dataclass(frozen=True)
class Method:
    """One row of the comparison: how to wrap the model, and at what learning rate to train it."""

    name: str  # row label
    category: str  # taxonomy (Lialin et al. 2023): full, selective, additive, reparameterized
    where: str  # what is trained and where it enters the model
    lr: float  # peak learning rate for this method's family
    build: Callable[[nn.Module, RunConfig], nn.Module]  # frozen base model -> model to train


def _full(model, run):
    return model


def _top_block(model, run):
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith((f"model.layers.{model.config.n_layer - 1}.", "model.norm.")))
    return model


def _lora(r):
    def build(model, run):
        return inject_lora(model, LoRAConfig(r=r, alpha=2.0 * r, target_modules=ALL_LINEAR))

    return build


def _qlora(model, run):
    return prepare_qlora(model, LoRAConfig(r=16, alpha=32.0, target_modules=ALL_LINEAR), NF4Config.qlora())


def adalora_config(run: RunConfig) -> AdaLoRAConfig:
    """Rank 16 per module at the start, 4 on average at the end; prune over the middle 70% of the run."""
    return AdaLoRAConfig(init_r=16, target_r=4, alpha=32.0, target_modules=ALL_LINEAR, total_step=run.steps,
                         tinit=run.steps // 10, tfinal=run.steps // 5, deltaT=1)  # fmt: skip


def _adalora(model, run):
    return inject_adalora(model, adalora_config(run))


def _prompt_tuning(model, run):
    wrapped = SoftPromptModel(model, PromptConfig.prompt_tuning(VIRTUAL_TOKENS))
    wrapped.prompt_encoder.init_from_vocab(input_embedding(model), torch.Generator().manual_seed(run.seed))
    return wrapped


def _p_tuning(model, run):
    return SoftPromptModel(model, PromptConfig.p_tuning(VIRTUAL_TOKENS, encoder="lstm"))


def _prefix(model, run):
    return PrefixModel(model, PrefixConfig.prefix_tuning(VIRTUAL_TOKENS))


def _p_tuning_v2(model, run):
    return PrefixModel(model, PrefixConfig.p_tuning_v2(VIRTUAL_TOKENS))


def _houlsby(model, run):
    return inject_adapters(model, BottleneckConfig.houlsby(bottleneck_size=16))


def _llama_adapter(model, run):
    return inject_adaption_prompts(model, AdaptionPromptConfig(adapter_len=10, adapter_layers=3))


METHODS = (
    Method("full fine-tuning", "full", "every weight", 1e-3, _full),
    Method("selective (top block)", "selective", "every weight of the last block + final norm", 1e-3, _top_block),
    Method("LoRA r=1", "reparameterized", "B A on all 7 linear layers per block", 3e-3, _lora(1)),
    Method("LoRA r=4", "reparameterized", "B A on all 7 linear layers per block", 3e-3, _lora(4)),
    Method("LoRA r=16", "reparameterized", "B A on all 7 linear layers per block", 3e-3, _lora(16)),
    Method("LoRA r=64", "reparameterized", "B A on all 7 linear layers per block", 3e-3, _lora(64)),
    Method("QLoRA r=16", "reparameterized", "B A on all linear layers; base weights NF4", 3e-3, _qlora),
    Method("AdaLoRA r=16->4", "reparameterized", "P diag(lambda) Q on all linear layers, pruned", 1e-2, _adalora),
    Method("prompt tuning", "additive", f"{VIRTUAL_TOKENS} input embeddings", 3e-1, _prompt_tuning),
    Method("P-tuning (LSTM)", "additive", f"{VIRTUAL_TOKENS} input embeddings from an LSTM+MLP", 9e-3, _p_tuning),
    Method("prefix tuning", "additive", f"{VIRTUAL_TOKENS} keys/values per layer from an MLP", 3e-2, _prefix),
    Method("P-tuning v2", "additive", f"{VIRTUAL_TOKENS} keys/values per layer, direct", 1e-1, _p_tuning_v2),
    Method("adapters (Houlsby)", "additive", "bottleneck MLP after o_proj and down_proj + norms", 3e-3, _houlsby),
    Method("LLaMA-Adapter", "additive", "10 gated prompts in the top 3 attention layers", 1e-1, _llama_adapter),
)


# Learning-rate multipliers of the sweep, per method (x the method's lr above). Every method brackets
# its rate on both sides where it was a common, untuned value; full fine-tuning and the adapters won
# at the top of their first grid (1/3 to 3 and 1/3 to 10), so the grid was extended up by one point
# (a second invocation of the same command, which keeps the runs already done). Prompt tuning and
# P-tuning v2 had won at 10x their first guess, so they go further up; P-tuning's rate was in the
# interior of its earlier grid, so only its seeds vary.
SWEEP_GRID = {
    "full fine-tuning": (1 / 3, 1.0, 3.0, 10.0),
    "LoRA r=4": (1 / 3, 1.0, 3.0, 10.0),
    "LoRA r=64": (1 / 3, 1.0, 3.0),
    "prompt tuning": (1.0, 3.0, 10.0),
    "P-tuning (LSTM)": (1.0,),
    "P-tuning v2": (1.0, 3.0),
    "adapters (Houlsby)": (1 / 3, 1.0, 3.0, 10.0, 30.0),
}
SWEEP_SEEDS = (0, 1, 2)


# ----------------------------------------------------------------------------------------------
# Measuring


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tied or shared tensor counted once)."""
    seen = {}
    for t in tensors:
        seen[(t.data_ptr(), t.nbytes)] = t.nbytes
    return sum(seen.values())


def resident_bytes(model: nn.Module) -> int:
    """Every parameter and buffer as stored: what the model occupies before training starts."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def trainable_state(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the trainable parameters, their gradients and AdamW's two moments."""
    moments = [s[k] for p in params for k in ("exp_avg", "exp_avg_sq") for s in [optimizer.state[p]]]
    out = {"params": tensor_bytes(params), "grads": tensor_bytes([p.grad for p in params]),
           "adam_moments": tensor_bytes(moments)}  # fmt: skip
    out["total"] = sum(out.values())
    return out


def eval_loss(model: nn.Module, data: torch.Tensor, run: RunConfig) -> float:
    return round(heldout_loss(model, data, run.block_size, batch_size=16, max_windows=run.eval_windows), 4)


def method_extras(method: Method, model: nn.Module) -> dict:
    """What a method has that the others do not: AdaLoRA's ranks, LLaMA-Adapter's gates, NF4 storage."""
    if method.name.startswith("AdaLoRA"):
        return {"ranks": ranks(model)}
    if method.name == "LLaMA-Adapter":
        return {"gates": {k: round(float(v.reshape(-1)[0]), 4) for k, v in adaption_gates(model).items()}}
    if method.name.startswith("QLoRA"):
        nf4 = sum(m.nf4_tensor().storage_bits() for m in model.modules() if hasattr(m, "nf4_tensor")) // 8
        return {"nf4_weight_bytes": nf4}
    return {}


# ----------------------------------------------------------------------------------------------
# Training


def train_method(method: Method, data: dict[str, torch.Tensor], run: RunConfig) -> dict:
    """Fine-tune a fresh copy of the shipped model with ``method``; return its measurements."""
    seed_everything(run.seed)
    base, _ = load_pretrained()
    model = method.build(base, run)
    params = trainable(model)
    row = {"name": method.name, "category": method.category, "where": method.where,
           "lr": method.lr * run.lr_multiplier, "trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in model.parameters()),
           "resident_bytes": resident_bytes(model),
           "new_val_loss_init": eval_loss(model, data["new_val"], run),
           "orig_val_loss_init": eval_loss(model, data["orig_val"], run)}  # fmt: skip
    cfg = TrainConfig(lr=row["lr"], min_lr=row["lr"] / 10, warmup_iters=min(run.warmup, run.steps - 1),
                      max_iters=run.steps)  # fmt: skip
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    allocator = RankAllocator(model, adalora_config(run)) if method.name.startswith("AdaLoRA") else None
    gen = torch.Generator().manual_seed(run.seed)
    model.train()

    def step(i: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i, cfg)
        x, y = get_batch(data["new_train"], run.batch_size, run.block_size, gen)  # (B, T) each
        loss = model(x, targets=y).loss
        total = loss + allocator.config.orth_reg_weight * orthogonal_regularization(model) if allocator else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if allocator:  # after the update and before zero_grad, as peft's update_and_allocate
            allocator.step(model, i)
        if i == 0:
            row["trainable_state_bytes"] = trainable_state(params, optimizer)
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss, row["step_peak_bytes"] = measure_peak_memory(lambda: step(0))
    row["peak_train_bytes"] = row["resident_bytes"] + row["step_peak_bytes"]
    losses, times = [first_loss], []
    for i in range(1, run.steps):
        start = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - start)
    model.eval()
    row["train_seconds"] = round(sum(times), 2)
    row["seconds_per_step"] = round(statistics.median(times), 4) if times else None
    row["step_loss"] = [round(v, 4) for v in losses]
    row["new_val_loss"] = eval_loss(model, data["new_val"], run)
    row["orig_val_loss"] = eval_loss(model, data["orig_val"], run)
    row["extras"] = method_extras(method, model)
    return row


def load_data(run: RunConfig) -> dict[str, torch.Tensor]:
    """Recipe train/validation ids and the stories' validation ids, all with the shipped tokenizer."""
    _, tokenizer = load_pretrained()
    new_train, new_val = train_val_split(torch.tensor(tokenizer.encode(generate_recipes(run.recipe_chars))))
    _, orig_val = train_val_split(torch.tensor(tokenizer.encode(generate_corpus())))  # the checkpoint's split
    return {"new_train": new_train, "new_val": new_val, "orig_val": orig_val}


def select_methods(names: list[str] | None) -> tuple[Method, ...]:
    """The methods called ``names`` (all of them for None), in the table's order."""
    known = [m.name for m in METHODS]
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ValueError(f"method names must be among {known}, got {unknown}")
    return tuple(m for m in METHODS if names is None or m.name in names)


def run_comparison(run: RunConfig, out: Path, methods: tuple[Method, ...] = METHODS) -> dict:
    """Train every method under ``run``, write the JSON result to ``out`` and return it."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_data(run)
    base, _ = load_pretrained()
    result = {"run": asdict(run), "base": {"params": sum(p.numel() for p in base.parameters()),
              "resident_bytes": resident_bytes(base), "new_val_loss": eval_loss(base, data["new_val"], run),
              "orig_val_loss": eval_loss(base, data["orig_val"], run)}, "methods": []}  # fmt: skip
    for method in methods:
        row = train_method(method, data, run)
        result["methods"].append(row)
        print(f"{method.name:>20}: {row['trainable_params']:>7} trainable, new {row['new_val_loss_init']:.3f} -> "
              f"{row['new_val_loss']:.3f}, orig {row['orig_val_loss_init']:.3f} -> {row['orig_val_loss']:.3f}, "
              f"{row['seconds_per_step']} s/step", flush=True)  # fmt: skip
    defaults = RunConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(run).items() if v != getattr(defaults, k)]
    flags += [f"--only {m.name!r}" for m in methods] if methods != METHODS else []
    result["command"] = " ".join(["python scripts/peft_comparison.py", *flags])
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    return save_result(result, out)


def run_sweep(run: RunConfig, out: Path, grid: dict[str, tuple[float, ...]] = SWEEP_GRID,
              seeds: tuple[int, ...] = SWEEP_SEEDS) -> dict:  # fmt: skip
    """Train every method of ``grid`` at each of its learning-rate multipliers and each seed.

    Writes {"run", "base", "grid", "seeds", "runs": [{name, lr_multiplier, lr, seed, losses}], "command",
    "total_seconds"} to ``out`` and returns it. If ``out`` already holds a sweep with the same ``run``,
    its runs are kept and only the missing (method, multiplier, seed) runs are trained (so a grid can be
    extended); ``total_seconds`` then adds up the time of every invocation.
    """
    methods = select_methods(list(grid))
    torch.set_num_threads(1)
    start = time.perf_counter()
    previous = json.loads(Path(out).read_text()) if Path(out).is_file() else None
    if previous is not None and previous.get("run") != asdict(run):
        raise ValueError(f"out={out} holds a sweep with another run config; pass a new --out")
    done = {(r["name"], r["lr_multiplier"], r["seed"]): r for r in (previous or {}).get("runs", [])}
    data = load_data(run)
    base, _ = load_pretrained()
    result = {"run": asdict(run), "base": {"new_val_loss": eval_loss(base, data["new_val"], run),
              "orig_val_loss": eval_loss(base, data["orig_val"], run)},
              "grid": {k: list(v) for k, v in grid.items()}, "seeds": list(seeds), "runs": []}  # fmt: skip
    keys = ("new_val_loss_init", "new_val_loss", "orig_val_loss_init", "orig_val_loss")
    for method in methods:
        for multiplier in grid[method.name]:
            for seed in seeds:
                if (method.name, round(multiplier, 4), seed) in done:
                    result["runs"].append(done[(method.name, round(multiplier, 4), seed)])
                    continue
                row = train_method(method, data, replace(run, lr_multiplier=multiplier, seed=seed))
                entry = {"name": method.name, "lr_multiplier": round(multiplier, 4), "lr": row["lr"],
                         "seed": seed, **{k: row[k] for k in keys}}  # fmt: skip
                result["runs"].append(entry)
                print(f"{method.name:>20} x{multiplier:<6.3g} seed {seed}: new {entry['new_val_loss']:.3f}, "
                      f"orig {entry['orig_val_loss']:.3f}", flush=True)  # fmt: skip
    defaults = RunConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(run).items() if v != getattr(defaults, k)]
    flags += [f"--only {m.name!r}" for m in methods] if grid != SWEEP_GRID else []
    result["command"] = " ".join(["python scripts/peft_comparison.py --sweep", *flags])
    earlier = previous["total_seconds"] if previous else 0.0
    result["total_seconds"] = round(earlier + time.perf_counter() - start, 1)
    return save_result(result, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = RunConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON result")
    parser.add_argument("--only", action="append", default=None, metavar="NAME", help="run only this method")
    parser.add_argument("--sweep", action="store_true", help="learning-rate x seed sweep (SWEEP_GRID)")
    args = vars(parser.parse_args())
    out, only, sweep = args.pop("out"), args.pop("only"), args.pop("sweep")
    run = replace(defaults, **args)
    if sweep:
        grid = {k: v for k, v in SWEEP_GRID.items() if only is None or k in only}
        out = SWEEP_OUT if out == DEFAULT_OUT else out
        run_sweep(run, out, grid)
    else:
        run_comparison(run, out, select_methods(only))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
