"""Decoding: greedy decoding, sampling and beam search over one small model interface.

What it implements
- The decoders over ``llmlab.generation``, which holds what every decoder shares (the
  ``GenerationConfig``, the logits processors applied by ``process_logits`` in transformers'
  order, and the ``prefill`` / ``step`` / ``reorder`` model interface with its adapters); its
  names are re-exported here. Every decoder runs on the cache: one token per model call after
  the prompt.
- ``greedy_search``, ``sample`` (multinomial with an explicit ``torch.Generator``) and
  ``beam_search`` (its own module, ``llmlab.beam_search``) with transformers' length penalty,
  ``early_stopping`` (True / False / "never"), EOS handling and ``num_return_sequences``;
  ``generate`` dispatches on a ``GenerationConfig``.
- Metrics for comparing strategies: distinct-n (Li et al. 2016), repeated n-gram rate, and the
  mean log-probability of a continuation under a model.

Reference implementation: transformers ``generation/logits_process.py`` and
``generation/utils.py`` (``_sample``, ``_beam_search``, the vectorized beam search of v4.50+).
Greedy decoding and beam search return exactly the tokens of ``model.generate`` with
``do_sample=False``; the processors equal transformers' processors on the same inputs. Deliberate
differences are listed at each function (top_p=0 is rejected here; frequency and presence
penalties have no transformers counterpart and follow OpenAI's published formula).

What it leaves out: beam sampling, group (diverse) beam search, constrained decoding, contrastive
search, speculative decoding, stop strings, and left-padded batches (prompts in one batch share a
length). Shape letters are those of ``llmlab.shapes``; N is the number of rows being decoded
(B, or B * num_beams).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llmlab.beam_search import beam_search
from llmlab.generation import (
    EARLY_STOPPING_CHOICES,
    DecodingModel,
    GenerationConfig,
    GenerationOutput,
    HFCausalLM,
    LLMAdapter,
    apply_temperature,
    as_decoding_model,
    check_prompt,
    frequency_presence_penalty,
    min_new_tokens_rule,
    min_p_filter,
    no_repeat_ngram_ban,
    process_logits,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
)
from llmlab.shapes import check_int, check_tensor

__all__ = [
    "EARLY_STOPPING_CHOICES",
    "DecodingModel",
    "GenerationConfig",
    "GenerationOutput",
    "HFCausalLM",
    "LLMAdapter",
    "apply_temperature",
    "as_decoding_model",
    "beam_search",
    "check_prompt",
    "continuation_log_probs",
    "distinct_n",
    "frequency_presence_penalty",
    "generate",
    "greedy_search",
    "mean_log_prob",
    "min_new_tokens_rule",
    "min_p_filter",
    "no_repeat_ngram_ban",
    "process_logits",
    "repeated_ngram_rate",
    "repetition_penalty",
    "sample",
    "top_k_filter",
    "top_p_filter",
]


# ----------------------------------------------------------------------------------------------
# Greedy decoding and sampling


def _single_path(
    model: Any, input_ids: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> GenerationOutput:
    """The loop shared by greedy decoding (generator None) and sampling: one token per row per step."""
    lm = as_decoding_model(model)
    prompt_len = input_ids.shape[1]
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=input_ids.device)  # (number of EOS ids,)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (N,)
    logits, state = lm.prefill(input_ids)  # (N, V)
    seqs, history = input_ids, []
    for step in range(config.max_new_tokens):
        scores = process_logits(logits, seqs, prompt_len, config, sampling=generator is not None)  # (N, V)
        history.append(scores)
        if generator is None:
            tokens = scores.argmax(dim=-1)  # (N,)
        else:
            tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]  # (N,)
        if config.pad_id is not None:
            tokens = torch.where(finished, config.pad_id, tokens)  # (N,)
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)  # (N, T + step + 1)
        finished = finished | torch.isin(tokens, eos)  # (N,)
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        logits, state = lm.step(tokens, state)  # (N, V)
    return GenerationOutput(sequences=seqs, scores=history)


def greedy_search(model: Any, input_ids: torch.Tensor, config: GenerationConfig) -> GenerationOutput:
    """Append argmax of the processed logits until every row hit EOS or max_new_tokens.

    input_ids (B, T) -> sequences (B, T + L); equals ``model.generate(do_sample=False)``.

    >>> out = greedy_search(model, prompt, GenerationConfig.greedy(max_new_tokens=10))  # doctest: +SKIP
    """
    check_prompt(input_ids)
    return _single_path(model, input_ids, config, generator=None)


def sample(
    model: Any, input_ids: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
) -> GenerationOutput:
    """Draw each token from softmax(processed logits) with ``torch.multinomial(generator=...)``.

    input_ids (B, T) -> sequences (B * num_return_sequences, T + L); rows of one prompt are adjacent.
    Passing a seeded ``generator`` makes the draws reproducible without touching the global seed.
    """
    check_prompt(input_ids)
    if generator is None:
        generator = torch.Generator(device=input_ids.device)
        generator.seed()
    expanded = input_ids.repeat_interleave(config.num_return_sequences, dim=0)  # (B * R, T)
    return _single_path(model, expanded, config, generator=generator)


def generate(
    model: Any, input_ids: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
) -> GenerationOutput:
    """Dispatch on ``config``: num_beams > 1 -> beam search; do_sample -> sampling; else greedy.

    >>> generate(model, prompt, GenerationConfig.nucleus(top_p=0.9), generator=g)  # doctest: +SKIP
    """
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if config.num_beams > 1:
        return beam_search(model, input_ids, config)
    if config.do_sample:
        return sample(model, input_ids, config, generator)
    return greedy_search(model, input_ids, config)


# ----------------------------------------------------------------------------------------------
# Metrics


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def _as_token_list(tokens: Any, name: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        check_tensor(name, tokens, ndim=1, layout="(T,)")
        return tokens.tolist()
    return list(tokens)


def distinct_n(sequences: Sequence[Sequence[int]] | torch.Tensor, n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of generations (Li et al. 2016); 1.0 = no n-gram
    occurs twice. 0.0 when there is no n-gram at all.

    >>> distinct_n([[1, 2, 1, 2]], n=2)
    0.6666666666666666
    """
    n = check_int("n", n, minimum=1)
    grams = [g for seq in sequences for g in _ngrams(_as_token_list(seq, "sequences[i]"), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(tokens: Sequence[int] | torch.Tensor, n: int = 4) -> float:
    """Fraction of the n-grams of one sequence that already occurred earlier in it (0.0 = none).

    >>> repeated_ngram_rate([1, 2, 3, 1, 2, 3], n=3)
    0.25
    """
    n = check_int("n", n, minimum=1)
    grams = _ngrams(_as_token_list(tokens, "tokens"), n)
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def continuation_log_probs(model: Any, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor) -> torch.Tensor:
    """log p(c_i | prompt, c_<i) of each continuation token under the model (no processors).

    prompt_ids (B, T), continuation_ids (B, L) -> (B, L). Runs prefill then one cached step per token.
    """
    check_prompt(prompt_ids)
    check_tensor("continuation_ids", continuation_ids, ndim=2, layout="(B, L)")
    if continuation_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(
            f"continuation_ids must have {prompt_ids.shape[0]} rows like prompt_ids, got {continuation_ids.shape[0]}"
        )
    lm = as_decoding_model(model)
    logits, state = lm.prefill(prompt_ids)  # (B, V)
    out = []
    for i in range(continuation_ids.shape[1]):
        tok = continuation_ids[:, i]  # (B,)
        out.append(logits.log_softmax(dim=-1).gather(1, tok[:, None])[:, 0])  # (B,)
        if i + 1 < continuation_ids.shape[1]:
            logits, state = lm.step(tok, state)  # (B, V)
    return torch.stack(out, dim=1) if out else prompt_ids.new_zeros(prompt_ids.shape[0], 0, dtype=torch.float)  # (B, L)


def mean_log_prob(model: Any, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor) -> torch.Tensor:
    """Mean log-probability per continuation token (higher = the model finds it more likely). -> (B,)"""
    return continuation_log_probs(model, prompt_ids, continuation_ids).mean(dim=1)
