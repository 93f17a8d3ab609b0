"""Small preference and reward tasks for the shipped character model, and the sampling they need.

What it implements
- The "feeling" task: prompts ``"<Name> saw a <animal>. He was very "`` in the style of the
  generated story corpus (``llmlab.data``), where the shipped model continues with a feeling word
  (its samples spread over the nine feelings of the corpus). A rule stands in for
  the human labeller: ``feeling_reward`` gives +1 when the first word is one of
  ``PREFERRED_FEELINGS``, 0 for another feeling of the corpus, -1 when the first word is not a
  feeling at all (a broken or off-topic continuation). It is also the verifiable reward of GRPO
  (a program checks the answer; Shao et al. 2024 and DeepSeek-R1 2025 use rule-based rewards).
- ``sample_continuations``: ancestral sampling of a fixed number of new tokens with a KV cache.
- ``continuation_log_probs``: log pi(y_t | x, y_<t) of the sampled tokens, with gradients.
- ``preference_pairs``: (chosen, rejected) continuations of the same prompt with different rule
  scores, the shape of the data a reward model and DPO train on (Ouyang et al. 2022; Rafailov et
  al. 2023).

What it leaves out: variable-length responses and an end-of-sequence token (every response has
the same number of tokens, so no padding is needed), and human or model (RLAIF) labellers.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from llmlab.shapes import check_int, check_tensor

PROMPT_NAMES = ("Tom", "Ben", "Sam", "Max", "Leo", "Tim")  # 3 letters each: prompts need no padding
PROMPT_ANIMALS = ("dog", "cat", "fox")
PREFERRED_FEELINGS = ("proud", "excited")
OTHER_FEELINGS = ("happy", "sad", "scared", "tired", "angry", "surprised", "kind")
RESPONSE_TOKENS = 10  # "surprised " fits; characters of the shipped char-level model


def feeling_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts ``"<Name> saw a <animal>. He was very "`` (names from ``PROMPT_NAMES``, animals
    from ``PROMPT_ANIMALS``; all 30 characters long)."""
    n = check_int("n", n, minimum=1)
    rng = random.Random(seed)
    return [f"{rng.choice(PROMPT_NAMES)} saw a {rng.choice(PROMPT_ANIMALS)}. He was very " for _ in range(n)]


def first_word(response: str) -> str:
    """The letters before the first non-letter of ``response`` ("proud and" -> "proud")."""
    word = []
    for ch in response:
        if not ch.isalpha():
            break
        word.append(ch)
    return "".join(word)


def feeling_reward(response: str) -> float:
    """The rule: +1 if the first word is preferred, 0 if it is another feeling, -1 otherwise.

    A first word that runs to the end of the response without a space or punctuation mark is
    unfinished and counts as "not a feeling".

    >>> feeling_reward("proud and "), feeling_reward("happy. The"), feeling_reward("proudproud")
    (1.0, 0.0, -1.0)
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    word = first_word(response)
    if len(word) == len(response):
        return -1.0
    if word in PREFERRED_FEELINGS:
        return 1.0
    return 0.0 if word in OTHER_FEELINGS else -1.0


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int = RESPONSE_TOKENS,
    generator: torch.Generator | None = None, temperature: float = 1.0,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` tokens after each prompt: prompt_ids (B, P) -> response ids (B, R).

    Plain ancestral sampling from softmax(logits / temperature) with the model's KV cache; the
    prompts share one length P (no padding).
    """
    check_tensor("prompt_ids", prompt_ids, ndim=2, layout="(B, P)")
    r = check_int("max_new_tokens", max_new_tokens, minimum=1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    cache = model.new_cache()
    logits = model(prompt_ids, cache=cache).logits[:, -1]  # (B, V)
    out = []
    for step in range(r):
        probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
        nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        out.append(nxt)
        if step + 1 < r:
            logits = model(nxt, cache=cache).logits[:, -1]  # (B, V)
    return torch.cat(out, dim=1)  # (B, R)


def continuation_log_probs(
    model: nn.Module, prompt_ids: torch.Tensor, response_ids: torch.Tensor, with_entropy: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) of every response token: (B, P), (B, R) -> (B, R) (and entropy (B, R)).

    One forward pass over prompt + response; the logits at positions P-1 .. P+R-2 predict the
    response tokens. With ``temperature`` the policy is softmax(logits / temperature), the
    distribution ``sample_continuations`` draws from (trl's PPO and GRPO trainers do the same).
    Gradients flow when the caller has them enabled.
    """
    from llmlab.alignment import entropy_from_logits, token_log_probs

    check_tensor("prompt_ids", prompt_ids, ndim=2, layout="(B, P)")
    check_tensor("response_ids", response_ids, ndim=2, layout="(B, R)")
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"prompt_ids and response_ids must have the same batch size, got "
                         f"{prompt_ids.shape[0]} and {response_ids.shape[0]}")
    p, r = prompt_ids.shape[1], response_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+R)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = model(ids).logits[:, p - 1:p + r - 1] / temperature  # (B, R, V)
    logp = token_log_probs(logits, response_ids)  # (B, R)
    return (logp, entropy_from_logits(logits)) if with_entropy else logp


def preference_pairs(
    prompts: list[str], responses: list[list[str]], score=feeling_reward
) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from several sampled responses per prompt.

    For each prompt, the responses are ranked by ``score``; every pair with a strictly higher
    score on one side becomes one preference (as InstructGPT turns a ranking of K answers into
    K(K-1)/2 comparisons, Ouyang et al. 2022 section 3.5), at most one pair per distinct score pair.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and "
                         f"{len(responses)}")
    pairs = []
    for prompt, group in zip(prompts, responses, strict=True):
        best: dict[float, str] = {}
        for text in group:
            best.setdefault(score(text), text)  # first response of each score
        levels = sorted(best, reverse=True)
        for i, hi in enumerate(levels):
            for lo in levels[i + 1:]:
                pairs.append((prompt, best[hi], best[lo]))
    return pairs
