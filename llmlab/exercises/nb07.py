"""Exercise checkers for notebook 07 Training a tiny LLM: the next-token loss and the learning-rate
schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_lr_schedule", "check_next_token_loss"]


def _callable(fn: object, convert: Callable[[object], object]) -> Callable:
    """fn with its result converted (a loss returned as a float, a rate as a 0-dim tensor)."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")

    def converted(*args):
        return convert(fn(*args))

    return converted


# ----------------------------------------------------------------------------------------------
# Exercise 1: next-token cross-entropy with labels in the input's positions


def _next_token_loss_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from llmlab.sft import IGNORE_INDEX

    # llmlab's convention (LLM.forward, llmlab.sft): the caller shifts, target t = token t + 1, and
    # F.cross_entropy averages over the scored tokens of the whole batch
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def _loss_case(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and labels (B, T): each row has a prompt (labels -100) and some rows right
    padding (-100); the rows score different numbers of tokens."""
    b, t, v = _randint(g, 2, 4), _randint(g, 8, 16), _randint(g, 5, 40)
    logits = torch.randn(b, t, v, generator=g) * 2  # (B, T, V)
    labels = torch.randint(0, v, (b, t), generator=g)  # (B, T)
    scored = (torch.randperm(t - 4, generator=g)[:b] + 2).tolist()  # distinct counts in [2, T - 3]
    for row, n in enumerate(scored):
        pad = _randint(g, 0, 2)
        labels[row, : t - pad - n] = -100  # the prompt (at least label 0) carries no loss
        if pad:
            labels[row, t - pad :] = -100  # right padding
    return logits, labels


def check_next_token_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], trials: int = 5,
                          seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(logits, labels) -> the mean next-token cross-entropy (a 0-dim tensor or a float).

    logits (B, T, V) from a causal LM; labels (B, T) in the positions of the input ids (as in
    transformers: label t is token t, -100 where nothing is scored), so the logits at position t
    are scored against label t + 1."""
    g = _generator(seed)
    cases = [_loss_case(g) for _ in range(trials)]
    return _run("next_token_loss", _callable(fn, _as_loss), _next_token_loss_reference, cases,
                "score logits[:, :-1] against labels[:, 1:], skip the -100 labels, and average over the "
                "scored tokens of the whole batch", MISTAKES["next_token_loss"], verbose=verbose)


def _as_loss(out: object) -> object:
    return torch.tensor(float(out)) if isinstance(out, int | float) else out


def _token_losses(logits, labels):
    """Per-position losses (B, T) of logits against labels already aligned, 0 where label is -100."""
    keep = labels != -100  # (B, T)
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T)
    return nll * keep, keep


def _loss_over_all_positions(logits, labels):
    nll, _ = _token_losses(logits[:, :-1], labels[:, 1:])
    return nll.sum() / nll.numel()


def _loss_mean_per_sequence(logits, labels):
    nll, keep = _token_losses(logits[:, :-1], labels[:, 1:])
    return (nll.sum(dim=1) / keep.sum(dim=1)).mean()


# ----------------------------------------------------------------------------------------------
# Exercise 2: linear warm-up, then cosine decay to min_lr


def _lr_schedule_reference(step: int, max_lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    from llmlab.train import TrainConfig, lr_at

    return lr_at(step, TrainConfig(lr=max_lr, min_lr=min_lr, warmup_iters=warmup, max_iters=max_steps))


def _schedule_case(g: torch.Generator, phase: int) -> tuple[int, float, float, int, int]:
    """A schedule and a step in one phase: 0 first half of the warm-up, 1 the cosine past 20 %,
    2 after max_steps, 3 the first step after the warm-up (the peak)."""
    warmup = _randint(g, 5, 200)
    max_steps = warmup + _randint(g, 20, 2000)
    max_lr = _randint(g, 1, 9) * 10.0 ** -_randint(g, 3, 4)
    min_lr = max_lr * _randint(g, 5, 20) / 100
    span = max_steps - warmup
    step = [_randint(g, 0, warmup // 2), _randint(g, warmup + span // 5, max_steps - 1),
            _randint(g, max_steps + 1, max_steps + span - 1), warmup][phase]
    return step, max_lr, min_lr, warmup, max_steps


def check_lr_schedule(fn: Callable[[int, float, float, int, int], float], trials: int = 8,
                      seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(step, max_lr, min_lr, warmup, max_steps) -> the learning rate of optimizer step ``step``
    (0-based): max_lr * (step + 1) / (warmup + 1) during the warm-up (step < warmup), then a cosine
    from max_lr at step = warmup down to min_lr at step = max_steps, and min_lr after that."""
    g = _generator(seed)
    cases = [_schedule_case(g, i % 4) for i in range(max(trials, 4))]
    return _run("lr_schedule", _callable(fn, _as_rate), _lr_schedule_reference, cases,
                "warm-up: max_lr * (step + 1) / (warmup + 1); then p = (step - warmup) / (max_steps - warmup), "
                "capped at 1, and min_lr + (max_lr - min_lr) * (1 + cos(pi p)) / 2",
                MISTAKES["lr_schedule"], rtol=1e-6, atol=0.0, verbose=verbose)


def _as_rate(out: object) -> object:
    return float(out) if isinstance(out, torch.Tensor) and out.numel() == 1 else out


def _cosine(step, max_lr, min_lr, warmup, max_steps, start=None, floor=None, cap=True):
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    start = warmup if start is None else start
    p = (step - start) / (max_steps - start)
    p = min(p, 1.0) if cap else p
    low = min_lr if floor is None else floor
    return low + (max_lr - low) * 0.5 * (1 + math.cos(math.pi * p))


def _warmup_from_zero(step, max_lr, min_lr, warmup, max_steps):
    if step < warmup:
        return max_lr * step / warmup
    return _cosine(step, max_lr, min_lr, warmup, max_steps)


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "next_token_loss": {
        "no_shift": (lambda logits, labels: F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100),
                     "the logits at position t predict the token at t + 1: compare logits[:, :-1] with "
                     "labels[:, 1:], not the same positions (that asks the model to copy its input)"),
        "shift_the_wrong_way": (lambda logits, labels: F.cross_entropy(logits[:, 1:].flatten(0, 1),
                                                                       labels[:, :-1].flatten(), ignore_index=-100),
                                "shifted the wrong way: drop the LAST logit and the FIRST label "
                                "(logits[:, :-1] against labels[:, 1:])"),
        "mean_over_all_positions": (_loss_over_all_positions,
                                    "divide by the number of scored tokens (labels != -100), not by all positions: "
                                    "ignored positions add 0 to the sum and must not count in the mean"),
        "mean_per_sequence": (_loss_mean_per_sequence,
                              "average over all scored tokens of the batch at once (F.cross_entropy with "
                              "ignore_index does), not per sequence and then over sequences, which weights "
                              "the tokens of short answers more"),
    },
    "lr_schedule": {
        "warmup_from_zero": (_warmup_from_zero,
                             "this schedule warms up as max_lr * (step + 1) / (warmup + 1) (nanoGPT's and "
                             "llmlab's convention): step 0 already trains, at max_lr / (warmup + 1), not at 0"),
        "decay_to_zero": (lambda s, hi, lo, w, n: _cosine(s, hi, lo, w, n, floor=0.0),
                          "the cosine ends at min_lr, not 0: min_lr + (max_lr - min_lr) * (1 + cos(pi p)) / 2"),
        "progress_from_zero": (lambda s, hi, lo, w, n: _cosine(s, hi, lo, w, n, start=0),
                               "the cosine starts where the warm-up ends: p = (step - warmup) / "
                               "(max_steps - warmup), not step / max_steps"),
        "no_floor_after_end": (lambda s, hi, lo, w, n: _cosine(s, hi, lo, w, n, cap=False),
                               "after max_steps the rate stays at min_lr: cap p at 1, or cos(pi p) climbs "
                               "back up"),
    },
}
