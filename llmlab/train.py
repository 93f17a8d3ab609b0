"""Training loop for the tiny LLMs: AdamW, warm-up + cosine schedule, clipping, accumulation.

What it implements
- ``TrainConfig``: every knob of a run, frozen, with presets (``tiny`` for tests, ``baby_gpt``
  for nanoGPT's ``train_shakespeare_char`` recipe scaled to a CPU, ``shipped`` for the checkpoint
  in ``llmlab/checkpoints``).
- ``lr_at``: linear warm-up then cosine decay to ``min_lr`` (Loshchilov and Hutter 2017, SGDR,
  without restarts; the schedule of GPT-3 and LLaMA and of nanoGPT's ``get_lr``). With a time
  budget the decay follows the larger of the iteration and wall-time fractions, so a run cut by
  ``max_seconds`` still ends at ``min_lr``.
- ``configure_optimizer``: ``optimizer="adamw"`` (default): decoupled weight decay (AdamW,
  Loshchilov and Hutter 2019) on the matrices of linear layers only. ``optimizer="muon"``:
  ``llmlab.optim.Muon``, orthogonalized momentum on the matrices inside the blocks and AdamW on the
  embeddings, the output head, norms and biases; ``muon_lr`` sets the Muon groups' peak learning
  rate, which follows the same schedule. Norm gains, biases and embedding tables (token and learned
  position embeddings, and therefore a tied output head) are not decayed: pulling a gain toward 0
  or a rarely seen token's row toward the origin only hurts, which is the usual practice
  (nanoGPT decays every 2-D tensor including embeddings; Hugging Face's Trainer skips biases and
  norms; we also skip embeddings, as many LLaMA-style recipes do).
- ``accumulate_gradients``: k micro-batches, each loss divided by k, give the gradient of one
  k-times-larger batch: the standard answer to "out of memory when the batch grows".
- ``Trainer`` and ``train``: the loop, with gradient clipping by global norm, periodic evaluation on fixed
  batches, a tqdm bar that can be switched off, an iteration or wall-time budget, and a
  ``History`` of iterations, losses, learning rates and elapsed seconds.
- ``evaluate_loss`` (random windows from a fixed seed) and ``heldout_loss`` (non-overlapping
  windows from the start of a split: fully deterministic, used to record a checkpoint's loss).
- ``python -m llmlab.train``: a command line that trains a preset on the generated corpus or any
  text file and saves a checkpoint (``llmlab.checkpoint``: safetensors + JSON).

What it leaves out: mixed precision, activation checkpointing, distributed data parallelism,
``torch.compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from llmlab.data import get_batch
from llmlab.optim import Muon, muon_param_groups
from llmlab.positional import LearnedPositionalEmbedding
from llmlab.shapes import check_choice, check_float, check_int, check_tensor

OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warm-up steps from lr/(warmup+1) to lr
    max_iters: int = 2000  # optimizer steps (the cosine decay spans them)
    max_seconds: float | None = None  # optional wall-time budget; training stops when it is spent
    batch_size: int = 12  # sequences per micro-batch (B)
    block_size: int | None = None  # sequence length T; None uses the model's block_size
    grad_accum_steps: int = 1  # micro-batches per optimizer step (effective batch = B * this)
    weight_decay: float = 0.1  # decoupled (AdamW) decay on linear weights only
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW (beta1, beta2); beta2 0.99 suits small batches
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    optimizer: str = "adamw"  # "adamw", or "muon" (llmlab.optim.Muon on the blocks' matrices, AdamW on the rest)
    muon_lr: float | None = None  # peak learning rate of the Muon matrices (None: lr); scheduled like lr
    eval_interval: int = 250  # evaluate every this many steps (and at the end)
    eval_iters: int = 20  # batches per split in each evaluation
    seed: int = 1337  # seeds the training batches (model init is seeded by the caller)
    device: str = "cpu"  # "cpu", "cuda", "mps", ...
    progress: bool = True  # show a tqdm progress bar (turn off in tests and quiet notebooks)

    def __post_init__(self) -> None:
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("min_lr", self.min_lr, low=0.0, high=self.lr)
        check_int("warmup_iters", self.warmup_iters, minimum=0)
        check_int("max_iters", self.max_iters, minimum=1)
        if self.max_seconds is not None:
            check_float("max_seconds", self.max_seconds, low=0.0, low_open=True)
        check_int("batch_size", self.batch_size, minimum=1)
        if self.block_size is not None:
            check_int("block_size", self.block_size, minimum=1)
        check_int("grad_accum_steps", self.grad_accum_steps, minimum=1)
        check_float("weight_decay", self.weight_decay, low=0.0)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            check_float(f"betas[{i}]", b, 0.0, 1.0, high_open=True)
        check_float("grad_clip", self.grad_clip, low=0.0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.muon_lr is not None:
            check_float("muon_lr", self.muon_lr, low=0.0, low_open=True)
        check_int("eval_interval", self.eval_interval, minimum=1)
        check_int("eval_iters", self.eval_iters, minimum=1)
        check_int("seed", self.seed)

    @classmethod
    def tiny(cls) -> TrainConfig:
        """A few steps on tiny batches: for tests and quick notebook demos."""
        return cls(lr=3e-3, min_lr=3e-4, warmup_iters=2, max_iters=20, batch_size=4, eval_interval=10,
                   eval_iters=2, progress=False)  # fmt: skip

    @classmethod
    def baby_gpt(cls) -> TrainConfig:
        """nanoGPT's README CPU run of ``train_shakespeare_char``: 2000 steps of 12 x 64 characters."""
        return cls(lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000, batch_size=12, block_size=64,
                   weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0)  # fmt: skip

    @classmethod
    def shipped(cls) -> TrainConfig:
        """The recipe of the shipped ``tiny-char`` checkpoint (see scripts/train_shipped_model.sh)."""
        return cls(lr=3e-3, min_lr=3e-4, warmup_iters=50, max_iters=5000, max_seconds=450.0, batch_size=16,
                   block_size=128, eval_interval=100, eval_iters=4)  # fmt: skip

    @property
    def tokens_per_step(self) -> int:
        """Tokens seen per optimizer step (needs block_size set)."""
        if self.block_size is None:
            raise ValueError("block_size must be set to count tokens per step, got None")
        return self.batch_size * self.block_size * self.grad_accum_steps


@dataclass
class History:
    """What ``train`` records. Eval-point lists are aligned; ``step_loss`` has one entry per step."""

    iters: list[int] = field(default_factory=list)  # step at each evaluation
    train_loss: list[float] = field(default_factory=list)  # estimated train loss at each evaluation
    val_loss: list[float] = field(default_factory=list)  # estimated validation loss at each evaluation
    lr: list[float] = field(default_factory=list)  # learning rate at each evaluation
    elapsed: list[float] = field(default_factory=list)  # seconds since the start at each evaluation
    step_loss: list[float] = field(default_factory=list)  # training loss of every optimizer step
    steps: int = 0  # optimizer steps taken
    seconds: float = 0.0  # wall time of the whole run, evaluations included

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer


def lr_at(step: int, cfg: TrainConfig, elapsed: float | None = None) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up: lr * (step + 1) / (warmup_iters + 1). Then, with progress p in [0, 1],
    min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (max_iters - warmup),
    or the wall-time fraction elapsed / max_seconds when that is larger.

    >>> cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    >>> round(lr_at(10, cfg), 6), round(lr_at(60, cfg), 6), round(lr_at(110, cfg), 6)
    (0.001, 0.00055, 0.0001)
    """
    step = check_int("step", step, minimum=0)
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    span = max(cfg.max_iters - cfg.warmup_iters, 1)
    progress = (step - cfg.warmup_iters) / span
    if cfg.max_seconds is not None and elapsed is not None:
        progress = max(progress, elapsed / cfg.max_seconds)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, LearnedPositionalEmbedding)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: 2-D non-embedding weights decay; norms, biases and embeddings do not.

    A tied output head shares its tensor with the token embedding, so it is not decayed either.
    """
    skip = _embedding_param_ids(model)
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in skip else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, cfg.weight_decay)``, or with ``cfg.optimizer == "muon"``
    ``llmlab.optim.Muon`` over ``muon_param_groups``. Each group carries ``lr_scale``, its peak
    learning rate over ``cfg.lr`` (``muon_lr / lr`` for the Muon groups, 1 otherwise), which the
    trainer multiplies into the scheduled learning rate."""
    if cfg.optimizer == "adamw":
        groups = [dict(g, lr_scale=1.0) for g in param_groups(model, cfg.weight_decay)]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    scale = 1.0 if cfg.muon_lr is None else cfg.muon_lr / cfg.lr
    groups = [dict(g, lr_scale=scale if g["use_muon"] else 1.0) for g in muon_param_groups(model, cfg.weight_decay)]
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)


# ----------------------------------------------------------------------------------------------
# Losses


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x, targets=y)
    if getattr(out, "loss", None) is None:
        raise TypeError("model(input_ids, targets=...) must return an output with a .loss tensor")
    return out.loss


def accumulate_gradients(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Backward over k micro-batches (x, y), each (B, T), each loss scaled by 1/k; return the mean loss.

    Gradients add up in ``.grad``, so with equal micro-batch sizes the result is the gradient of
    the mean loss over all k * B sequences: one large batch, at the activation memory of one small one.
    """
    if not batches:
        raise ValueError("batches must hold at least one (x, y) pair, got an empty list")
    total = 0.0
    for x, y in batches:
        loss = _loss(model, x, y) / len(batches)
        loss.backward()
        total += float(loss.detach())
    return total


def _eval_mode_loss(model: nn.Module, batches) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(_loss(model, x, y)) for x, y in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def evaluate_loss(
    model: nn.Module, data: torch.Tensor, batch_size: int, block_size: int, num_batches: int, seed: int = 0,
    device: str | torch.device = "cpu",
) -> float:
    """Mean loss over ``num_batches`` random (B, T) windows drawn with a fixed ``seed``: the same
    windows every call, so successive evaluations differ only because the model changed."""
    num_batches = check_int("num_batches", num_batches, minimum=1)
    gen = torch.Generator().manual_seed(seed)
    batches = (get_batch(data, batch_size, block_size, gen, device) for _ in range(num_batches))
    return _eval_mode_loss(model, batches)


def heldout_loss(
    model: nn.Module, data: torch.Tensor, block_size: int, batch_size: int = 32, max_windows: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Mean loss over non-overlapping windows data[i*T : (i+1)*T] from the start of ``data``
    (at most ``max_windows`` of them): no randomness, so a recorded value can be checked exactly."""
    check_tensor("data", data, ndim=1, layout="(N,)")
    block_size = check_int("block_size", block_size, minimum=1)
    n = (len(data) - 1) // block_size
    if max_windows is not None:
        n = min(n, check_int("max_windows", max_windows, minimum=1))
    if n < 1:
        raise ValueError(f"data must hold more than block_size={block_size} tokens, got {len(data)}")
    x = data[: n * block_size].view(n, block_size)  # (N, T)
    y = data[1 : n * block_size + 1].view(n, block_size)  # (N, T)
    batches = [(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)) for i in range(0, n, batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # weight each batch by its size, so the result is a mean over all windows
            total = sum(float(_loss(model, bx, by)) * len(bx) for bx, by in batches)
    finally:
        model.train(was_training)
    return total / n


# ----------------------------------------------------------------------------------------------
# The loop


def _block_size(model: nn.Module, cfg: TrainConfig) -> int:
    if cfg.block_size is not None:
        return cfg.block_size
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "block_size"):
        raise ValueError("cfg.block_size must be set when the model has no config.block_size")
    return int(config.block_size)


class Trainer:
    """The training loop's state, advanced one optimizer step at a time.

    ``train`` runs one trainer to the end. Stepping two trainers in turn (a benchmark does) gives
    both the same machine load, and ``elapsed`` counts only the time spent in each one's own calls.

    >>> trainer = Trainer(model, train_ids, val_ids, TrainConfig.tiny())  # doctest: +SKIP
    >>> while not trainer.done:  # doctest: +SKIP
    ...     trainer.step()
    """

    def __init__(self, model: nn.Module, train_data: torch.Tensor, val_data: torch.Tensor, cfg: TrainConfig) -> None:
        check_tensor("train_data", train_data, ndim=1, layout="(N,)")
        check_tensor("val_data", val_data, ndim=1, layout="(N,)")
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.model, self.train_data, self.val_data, self.cfg = model, train_data, val_data, cfg
        self.block_size = _block_size(model, cfg)
        model.to(cfg.device).train()
        self.optimizer = configure_optimizer(model, cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # training batches only
        self.history = History()
        self.steps = 0  # optimizer steps taken
        self.elapsed = 0.0  # seconds spent in step() and evaluate()

    @property
    def done(self) -> bool:
        """True once max_iters steps are taken or the max_seconds budget is spent."""
        out_of_time = self.cfg.max_seconds is not None and self.elapsed >= self.cfg.max_seconds
        return self.steps >= self.cfg.max_iters or out_of_time

    def lr(self) -> float:
        """Learning rate of the next step."""
        return lr_at(self.steps, self.cfg, self.elapsed)

    def step(self) -> float:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean training loss."""
        start, cfg = time.perf_counter(), self.cfg
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = [get_batch(self.train_data, cfg.batch_size, self.block_size, self.generator, cfg.device)
                   for _ in range(cfg.grad_accum_steps)]  # fmt: skip
        loss = accumulate_gradients(self.model, batches)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.history.step_loss.append(loss)
        self.elapsed += time.perf_counter() - start
        return loss

    def evaluate(self) -> tuple[float, float]:
        """Estimate (train loss, val loss) on fixed batches and append them to the history."""
        start, cfg, h = time.perf_counter(), self.cfg, self.history
        args = (cfg.batch_size, self.block_size, cfg.eval_iters, cfg.seed + 1, cfg.device)
        losses = evaluate_loss(self.model, self.train_data, *args), evaluate_loss(self.model, self.val_data, *args)
        self.elapsed += time.perf_counter() - start
        h.iters.append(self.steps)
        h.train_loss.append(losses[0])
        h.val_loss.append(losses[1])
        h.lr.append(self.lr())
        h.elapsed.append(self.elapsed)
        h.steps, h.seconds = self.steps, self.elapsed
        return losses


def train(model: nn.Module, train_data: torch.Tensor, val_data: torch.Tensor, cfg: TrainConfig) -> History:
    """Train ``model`` in place on token ids (N,) and return its ``History``.

    The model must accept ``model(x, targets=y)`` with x, y (B, T) and return an output with ``.loss``.
    It is evaluated every ``eval_interval`` steps and once at the end.

    >>> history = train(model, train_ids, val_ids, TrainConfig.tiny())  # doctest: +SKIP
    """
    trainer = Trainer(model, train_data, val_data, cfg)
    bar = tqdm(total=cfg.max_iters, disable=not cfg.progress, desc="train", dynamic_ncols=True)
    while not trainer.done:
        if trainer.steps % cfg.eval_interval == 0 and trainer.steps > 0:
            bar.set_postfix(val=f"{trainer.evaluate()[1]:.3f}")
        loss = trainer.step()
        bar.update(1)
        bar.set_description(f"train loss {loss:.3f}")
    bar.close()
    trainer.evaluate()
    return trainer.history


# ----------------------------------------------------------------------------------------------
# Command line: python -m llmlab.train --corpus generated --preset small --max-iters 2000 --out runs/x


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llmlab.train", description="Train a char-level llmlab LLM.")
    p.add_argument("--corpus", default="generated", help="'generated' (llmlab.data.generate_corpus) or a text file")
    p.add_argument("--corpus-chars", type=int, default=None, help="size of the generated corpus")
    p.add_argument("--preset", default="small", help="ModelConfig preset: tiny, small or gpt2_baseline")
    p.add_argument("--model-override", action="append", default=[], metavar="FIELD=VALUE",
                   help="replace a ModelConfig field, e.g. n_layer=4 (repeatable)")  # fmt: skip
    p.add_argument("--train-preset", default="shipped", help="TrainConfig preset: tiny, baby_gpt or shipped")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    for name in ("lr", "min_lr", "max_seconds", "weight_decay", "grad_clip", "muon_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    for name in ("warmup_iters", "max_iters", "batch_size", "block_size", "grad_accum_steps", "eval_interval",
                 "eval_iters", "seed"):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    return p


def _train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = getattr(TrainConfig, args.train_preset)()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    changes = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.no_progress:
        changes["progress"] = False
    return dataclasses.replace(base, **changes)


def _model_config_from_args(args: argparse.Namespace, vocab_size: int):
    from llmlab.model import ModelConfig

    config = getattr(ModelConfig, args.preset)(vocab_size)
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    changes = {}
    for item in args.model_override:
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"--model-override field must be a ModelConfig field, got {key!r}")
        current = getattr(config, key)
        parsed = value if isinstance(current, str) else eval_literal(value)
        changes[key] = float(parsed) if isinstance(current, float) and isinstance(parsed, int) else parsed
    return dataclasses.replace(config, **changes)


def eval_literal(text: str):
    """Parse a command-line literal (int, float, bool, None) without eval."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv: list[str] | None = None) -> dict:
    """Run the command line; return the metadata written to the checkpoint's config.json."""
    from llmlab.checkpoint import save_checkpoint
    from llmlab.data import generate_corpus, load_text, train_val_split
    from llmlab.model import LLM
    from llmlab.tokenizer import CharTokenizer

    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.corpus == "generated":
        text = generate_corpus(args.corpus_chars) if args.corpus_chars else generate_corpus()
    else:
        text = load_text(args.corpus)
    tokenizer = CharTokenizer.from_text(text)
    train_ids, val_ids = train_val_split(tokenizer.encode(text))
    cfg = _train_config_from_args(args)
    torch.manual_seed(cfg.seed)
    model = LLM(_model_config_from_args(args, tokenizer.vocab_size))
    history = train(model, train_ids, val_ids, cfg)
    block = _block_size(model, cfg)
    metadata = {
        "command": "python -m llmlab.train " + shlex.join(argv),
        "corpus": args.corpus, "corpus_chars": len(text), "split": "first 90% train, last 10% validation",
        "train_config": dataclasses.asdict(cfg), "steps": history.steps, "train_seconds": round(history.seconds, 1),
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "final_train_loss": history.train_loss[-1], "final_val_loss_estimate": history.val_loss[-1],
        "heldout": heldout_record(model, val_ids, block, device=cfg.device),
    }  # fmt: skip
    save_checkpoint(model, tokenizer, args.out, metadata)
    print(f"saved {args.out}: {history.steps} steps in {history.seconds:.0f} s, "
          f"held-out loss {metadata['heldout']['full_loss']:.4f}")  # fmt: skip
    return metadata


HELDOUT_CHECK_WINDOWS = 64  # windows of the fixed held-out subset re-checked by the tests


def heldout_record(model: nn.Module, val_ids: torch.Tensor, block_size: int, device: str = "cpu") -> dict:
    """The held-out numbers stored in a checkpoint: loss on the whole validation split and on its
    first ``HELDOUT_CHECK_WINDOWS`` windows (fast to re-check), both with ``heldout_loss``."""
    return {
        "block_size": block_size,
        "full_windows": (len(val_ids) - 1) // block_size,
        "full_loss": heldout_loss(model, val_ids, block_size, device=device),
        "check_windows": HELDOUT_CHECK_WINDOWS,
        "check_loss": heldout_loss(model, val_ids, block_size, max_windows=HELDOUT_CHECK_WINDOWS, device=device),
    }


if __name__ == "__main__":
    main()
