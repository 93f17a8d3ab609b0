"""A simulated serving workload: how much KV-cache memory paging and contiguous preallocation
reserve over time for the same stream of requests (the comparison of the vLLM paper, Kwon et al.
2023, section 3 and Figure 2).

What it implements
- ``WorkloadConfig``: a seeded stream of requests (Poisson arrivals, uniform prompt and output
  lengths, a context limit ``max_model_len``, ``block_tokens`` slots per block, parallel samples).
- ``simulate_workload``: requests arrive, store their prompt (forked once per extra sample, so the
  samples share the prompt's blocks), decode one token per step and sequence until their output is
  complete, and are freed. At every step it reads ``llmlab.paged_attention.BlockManager.stats``
  (filled, logical and reserved slots) and what contiguous preallocation to ``max_model_len``
  would reserve, and sums them over the run.
- ``WorkloadReport``: those sums (slot-steps), the peaks, and the waste ratios derived from them.

What it leaves out: the scheduler's admission limits and preemption (the pool is sized so that
nothing is ever refused), prefix caching across requests, and time per step (every step decodes
one token for every running sequence).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from llmlab.paged_attention import BlockManager, contiguous_reserved_slots
from llmlab.shapes import check_float, check_int


@dataclass(frozen=True)
class WorkloadConfig:
    """A stream of requests for ``simulate_workload``; lengths are uniform in [min, max]."""

    num_requests: int = 300  # requests in the run
    arrivals_per_step: float = 0.25  # mean new requests per decoding step (Poisson arrivals)
    min_prompt: int = 16  # shortest prompt, tokens
    max_prompt: int = 512  # longest prompt, tokens
    min_output: int = 16  # shortest generated answer, tokens
    max_output: int = 512  # longest generated answer, tokens
    max_model_len: int = 2048  # context limit: what a contiguous cache reserves per request
    block_tokens: int = 16  # token slots per block for paging
    samples_per_request: int = 1  # parallel samples (n > 1: forks that share the prompt's blocks)
    seed: int = 0  # seeds arrivals and lengths

    def __post_init__(self) -> None:
        names = ("num_requests", "min_prompt", "max_prompt", "min_output", "max_output", "block_tokens")
        for name in (*names, "samples_per_request"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_float("arrivals_per_step", self.arrivals_per_step, low=0.0, low_open=True)
        if self.min_prompt > self.max_prompt or self.min_output > self.max_output:
            raise ValueError(f"min lengths must be <= max lengths, got {self}")
        if check_int("max_model_len", self.max_model_len, minimum=1) < self.max_prompt + self.max_output:
            raise ValueError(
                f"max_model_len must be >= max_prompt + max_output = {self.max_prompt + self.max_output}, "
                f"got {self.max_model_len}"
            )

    @classmethod
    def tiny(cls) -> WorkloadConfig:
        """A short run for tests: 30 requests, lengths up to 64 + 64, context 256."""
        return cls(num_requests=30, arrivals_per_step=0.5, max_prompt=64, max_output=64, max_model_len=256)


@dataclass(frozen=True)
class WorkloadReport:
    """Token slots summed over the decoding steps of a simulated run (slot-steps)."""

    steps: int  # decoding steps until the last request finished
    filled_slot_steps: int  # slots holding a token's k and v: the useful memory
    logical_slot_steps: int  # tokens as the sequences see them (a shared prompt counts once per sample)
    paged_slot_steps: int  # slots reserved by paging (whole blocks)
    contiguous_slot_steps: int  # slots reserved by giving every running request max_model_len up front
    peak_paged_slots: int  # largest paging reservation at one step
    peak_contiguous_slots: int  # largest contiguous reservation at one step

    @property
    def paged_per_filled(self) -> float:
        return self.paged_slot_steps / self.filled_slot_steps

    @property
    def contiguous_per_filled(self) -> float:
        """Contiguous reservation per useful slot (per logical token: contiguous caches share nothing)."""
        return self.contiguous_slot_steps / self.logical_slot_steps

    @property
    def paged_waste(self) -> float:
        """Share of the slots paging reserves that hold nothing."""
        return 1.0 - self.filled_slot_steps / self.paged_slot_steps

    @property
    def contiguous_waste(self) -> float:
        """Share of the slots contiguous preallocation reserves that hold nothing (each sample keeps its
        own copy of the prompt there, so its useful slots are the logical ones)."""
        return 1.0 - self.logical_slot_steps / self.contiguous_slot_steps

    @property
    def sharing_saving(self) -> float:
        """Share of the logical tokens that prefix sharing did not have to store (0 with one sample)."""
        return 1.0 - self.filled_slot_steps / self.logical_slot_steps


def _requests(config: WorkloadConfig) -> list[tuple[int, int, int]]:
    """(arrival step, prompt length, output length) per request, from the seeded generator."""
    rng, clock, out = random.Random(config.seed), 0.0, []
    for _ in range(config.num_requests):
        clock += rng.expovariate(config.arrivals_per_step)
        prompt = rng.randint(config.min_prompt, config.max_prompt)
        out.append((int(clock), prompt, rng.randint(config.min_output, config.max_output)))
    return out


def _admit(manager: BlockManager, rid: int, prompt: int, output: int, samples: int, remaining: dict) -> None:
    """Prefill a request's prompt once, then fork one sequence per further sample: all share the prompt's
    blocks. Sequence ids are rid * samples + sample."""
    first = rid * samples
    manager.add_sequence(first)
    for _ in range(prompt):
        manager.append_slot(first)
    for sid in range(first, first + samples):
        if sid != first:
            manager.fork(first, sid)
        remaining[sid] = output


def simulate_workload(config: WorkloadConfig | None = None) -> WorkloadReport:
    """Run requests through a ``BlockManager``: each arrives, stores its prompt (forked once per extra
    sample), appends one token per step and sequence until its output is complete, and is freed.
    Sums filled, logical and reserved slots over the steps.

    >>> report = simulate_workload(WorkloadConfig.tiny())
    >>> report.paged_waste < report.contiguous_waste
    True
    """
    config = WorkloadConfig() if config is None else config
    if not isinstance(config, WorkloadConfig):
        raise TypeError(f"config must be a WorkloadConfig, got {type(config).__name__}")
    pending, n = _requests(config), config.samples_per_request
    blocks_per_sequence = math.ceil(config.max_model_len / config.block_tokens)
    manager = BlockManager(config.num_requests * n * blocks_per_sequence, config.block_tokens)
    remaining: dict[int, int] = {}  # sequence id -> output tokens still to generate
    totals, peaks, step, nxt = [0, 0, 0, 0], [0, 0], 0, 0
    while nxt < len(pending) or remaining:
        while nxt < len(pending) and pending[nxt][0] <= step:  # admit: prefill the prompt
            _admit(manager, nxt, pending[nxt][1], pending[nxt][2], n, remaining)
            nxt += 1
        for sid in remaining:  # decode: one new token per running sequence
            manager.append_slot(sid)
            remaining[sid] -= 1
        st = manager.stats()
        contiguous = contiguous_reserved_slots(len(remaining), config.max_model_len)
        for i, value in enumerate((st.slots_filled, st.logical_tokens, st.slots_reserved, contiguous)):
            totals[i] += value
        peaks = [max(peaks[0], st.slots_reserved), max(peaks[1], contiguous)]
        for sid in [r for r, left in remaining.items() if left == 0]:
            manager.free(sid)
            del remaining[sid]
        step += 1
    return WorkloadReport(step, *totals, *peaks)
