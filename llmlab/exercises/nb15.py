"""Exercise checkers for notebook 15 Distributed training."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_ring_all_reduce", "check_zero_bytes"]


# --- ring all-reduce, simulated in one process ------------------------------------------------------


def _ring_all_reduce_reference(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    n, numel = len(tensors), tensors[0].numel()
    total = torch.stack(tensors).sum(0)  # (L,): what every rank holds after an all-reduce
    # llmlab.distributed.ring_all_reduce (tested against dist.all_reduce on real processes): each rank
    # sends 2 (N - 1) chunks of L / N elements, 2 (N - 1) / N of the tensor
    return [total.clone() for _ in range(n)], [2 * (n - 1) * numel // n] * n


def check_ring_all_reduce(fn: Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], list[int]]],
                          trials: int = 5, seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(tensors) -> (results, sent): a ring all-reduce (reduce-scatter, then all-gather) simulated
    over ``tensors``, a list of N (ranks) 1-D tensors of length L (a multiple of N). results[r] is
    what rank r holds at the end (the sum of all N tensors), sent[r] the elements rank r sent."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")
    g = _generator(seed)
    cases = []
    for i in range(max(trials, 2)):
        n = 2 if i == max(trials, 2) - 1 else _randint(g, 3, 8)  # the last one: two ranks
        length = n * _randint(g, 1, 6)
        cases.append(([torch.randn(length, generator=g) for _ in range(n)],))

    def learner(tensors: list[torch.Tensor]):
        return fn([t.clone() for t in tensors])  # each rank's own copy: in-place edits stay local

    return _run("ring_all_reduce", learner, _ring_all_reduce_reference, cases,
                "N - 1 reduce-scatter steps (send one chunk of L/N to the right, add the one received), "
                "then N - 1 all-gather steps (pass the finished chunks on, copying): 2 (N - 1) chunks sent "
                "per rank", MISTAKES["ring_all_reduce"], verbose=verbose)


def _ring(tensors: list[torch.Tensor], gather: str = "copy") -> tuple[list[torch.Tensor], list[int]]:
    """A chunked ring; gather is "copy" (right), "add" (adds again in the all-gather) or "none"."""
    n = len(tensors)
    chunks = [list(t.clone().chunk(n)) for t in tensors]  # chunks[rank][c], each (L/N,)
    sent = [0] * n
    phases = [("reduce", 0)] + ([("gather", 1)] if gather != "none" else [])
    for phase, offset in phases:
        for s in range(n - 1):
            msgs = [(r, (r + offset - s) % n, chunks[r][(r + offset - s) % n].clone()) for r in range(n)]
            for r, c, chunk in msgs:  # all ranks send at once, then receive
                right = chunks[(r + 1) % n]
                right[c] = chunk if phase == "gather" and gather == "copy" else right[c] + chunk
                sent[r] += chunk.numel()
    return [torch.cat(c) for c in chunks], sent


def _ring_whole_tensors(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The naive ring: pass whole tensors around N - 1 times and add what arrives."""
    n = len(tensors)
    acc = [t.clone() for t in tensors]
    msgs = [t.clone() for t in tensors]
    for _ in range(n - 1):
        msgs = [msgs[(r - 1) % n] for r in range(n)]  # rank r receives from rank r - 1
        acc = [a + m for a, m in zip(acc, msgs, strict=True)]
    return acc, [(n - 1) * t.numel() for t in tensors]


def _ring_count_reduce_scatter_only(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    results, sent = _ring(tensors)
    return results, [s // 2 for s in sent]


# --- ZeRO: model-state bytes per rank ---------------------------------------------------------------


def _zero_bytes_reference(num_params: int, world_size: int, stage: int) -> float:
    from llmlab.distributed import zero_bytes_per_rank

    return zero_bytes_per_rank(num_params, world_size, stage)["total"]  # mixed-precision AdamW: 2, 2, 12


def check_zero_bytes(fn: Callable[[int, int, int], float], trials: int = 8, seed: int | None = None,
                     verbose: bool = True) -> Verdict:
    """fn(num_params, world_size, stage) -> bytes of model states (parameters, gradients, optimizer
    state) per rank under ZeRO stage 0-3, for mixed-precision AdamW (activations excluded)."""
    g = _generator(seed)
    cases = [(_randint(g, 10**6, 10**11), 2 ** _randint(g, 1, 10), i % 4) for i in range(max(trials, 4))]
    return _run("zero_bytes", fn, _zero_bytes_reference, cases,
                "16 bytes per parameter (2 fp16 weights, 2 fp16 gradients, 12 fp32 master + m + v); stage 1 "
                "divides the 12 by N, stage 2 also the gradients' 2, stage 3 also the weights' 2",
                MISTAKES["zero_bytes"], verbose=verbose)


def _zero_sharded(num_params: int, world_size: int, sharded: tuple[bool, bool, bool],
                  sizes: tuple[int, int, int] = (2, 2, 12)) -> float:
    """Bytes per rank when (parameters, gradients, optimizer state) are each sharded or not."""
    return sum(b * num_params / (world_size if s else 1) for b, s in zip(sizes, sharded, strict=True))


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "ring_all_reduce": {
        "no_all_gather": (lambda ts: _ring(ts, gather="none"),
                          "after the reduce-scatter each rank holds the full sum of only one chunk: N - 1 "
                          "all-gather steps must pass the finished chunks around"),
        "add_in_all_gather": (lambda ts: _ring(ts, gather="add"),
                              "the all-gather copies the finished chunk it receives; adding it again "
                              "counts some ranks twice"),
        "whole_tensors": (_ring_whole_tensors,
                          "send chunks of L/N elements, not whole tensors: a rank sends 2 (N - 1) / N of the "
                          "tensor, not N - 1 times all of it"),
        "reduce_scatter_only_counted": (_ring_count_reduce_scatter_only,
                                        "each rank sends in both phases: 2 (N - 1) chunks, not N - 1"),
    },
    "zero_bytes": {
        "stages_reversed": (lambda p, n, s: _zero_sharded(p, n, (s >= 1, s >= 2, s >= 3)),
                            "the stages go optimizer state (1), then gradients (2), then parameters (3): "
                            "the biggest part, the 12 bytes of fp32 state, is sharded first"),
        "params_at_stage_1": (lambda p, n, s: _zero_sharded(p, n, (s >= 1, s >= 2, s >= 1)),
                              "stage 1 shards only the optimizer state; every rank still holds all "
                              "fp16 parameters until stage 3"),
        "no_master_weights": (lambda p, n, s: _zero_sharded(p, n, (s >= 3, s >= 2, s >= 1), (2, 2, 8)),
                              "mixed-precision Adam keeps an fp32 master copy besides m and v: 12 bytes of "
                              "optimizer state per parameter, not 8"),
    },
}
