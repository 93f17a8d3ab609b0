"""Greedy decoding as two bare loops, with and without a KV cache: the cost comparison of notebook 09
and ``benchmarks/bench_kv_cache.py``.

What it implements
- ``greedy_with_cache(model, prompt, new_tokens)``: one forward pass over the prompt (prefill) fills
  a ``KVCache``; then each step runs the model on the newest token alone, its keys and values of
  earlier tokens read from the cache. Work per step is constant in the context length except the
  attention itself (one query against S keys).
- ``greedy_without_cache(model, prompt, new_tokens)``: every step runs the model over the whole
  sequence so far and keeps the last position's logits, so step s costs a forward over T0 + s
  tokens and n new tokens cost O(n^2) token-forwards instead of O(n).
Both append argmax(logits) and return the same tokens: the cache changes the cost, not the
function (Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2, for the
cost model). ``step_times`` (a list) receives the wall time of every step.

The loops keep per-step Python small, as a serving engine does: ``torch.inference_mode``, the
token ids written into one preallocated (B, T0 + n) tensor, and a cache preallocated to
T0 + n positions (written in place, no ``torch.cat`` per step).

What it leaves out: stopping at EOS, logits processors (temperature, top-k/p, repetition
penalty), sampling and beams: those live in ``llmlab.decoding``, whose ``greedy_search`` gives
the same tokens as these loops (tested).
"""

from __future__ import annotations

import time

import torch

from llmlab.shapes import check_int, check_tensor


def _check(prompt: torch.Tensor, new_tokens: int) -> int:
    check_tensor("prompt", prompt, ndim=2, layout="(B, T)")
    if prompt.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.shape[1] == 0:
        raise ValueError("prompt must hold at least one token per row, got T=0")
    return check_int("new_tokens", new_tokens, minimum=1)


def _record(step_times: list[float] | None, start: float) -> None:
    if step_times is not None:
        step_times.append(time.perf_counter() - start)


@torch.inference_mode()
def greedy_with_cache(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, step_times: list[float] | None = None
) -> torch.Tensor:
    """prompt (B, T0) -> (B, T0 + new_tokens): prefill once, then one forward per new token.

    ``model`` is an ``llmlab.LLM`` (it must provide ``new_cache(max_len)`` and accept ``cache=``).

    >>> from llmlab.model import LLM, ModelConfig
    >>> model = LLM(ModelConfig.tiny(vocab_size=20)).eval()
    >>> prompt = torch.tensor([[1, 2, 3]])
    >>> torch.equal(greedy_with_cache(model, prompt, 5), greedy_without_cache(model, prompt, 5))
    True
    """
    new_tokens = _check(prompt, new_tokens)
    b, t0 = prompt.shape
    ids = prompt.new_empty(b, t0 + new_tokens)  # (B, T0 + n): every token lands here
    ids[:, :t0] = prompt
    cache = model.new_cache(max_len=t0 + new_tokens)  # preallocated: written in place
    start = time.perf_counter()
    logits = model(prompt, cache=cache).logits[:, -1]  # (B, V) prefill
    for step in range(new_tokens):
        token = ids[:, t0 + step : t0 + step + 1]  # (B, 1) a view into ids
        token.copy_(logits.argmax(dim=-1, keepdim=True))
        if step < new_tokens - 1:
            _record(step_times, start)
            start = time.perf_counter()
            logits = model(token, cache=cache).logits[:, -1]  # (B, V): only the new token is computed
    _record(step_times, start)
    return ids


@torch.inference_mode()
def greedy_without_cache(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, step_times: list[float] | None = None
) -> torch.Tensor:
    """prompt (B, T0) -> (B, T0 + new_tokens): every step recomputes the whole sequence so far."""
    new_tokens = _check(prompt, new_tokens)
    b, t0 = prompt.shape
    ids = prompt.new_empty(b, t0 + new_tokens)  # (B, T0 + n)
    ids[:, :t0] = prompt
    for step in range(new_tokens):
        start = time.perf_counter()
        logits = model(ids[:, : t0 + step]).logits[:, -1]  # (B, V) from all (B, T0 + step) tokens
        ids[:, t0 + step] = logits.argmax(dim=-1)
        _record(step_times, start)
    return ids
