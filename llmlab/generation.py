"""What every decoder shares: the generation config, the logits processors and the model interface.

What it implements
- ``GenerationConfig``: one frozen config for greedy decoding, sampling and beam search, with
  named presets and validation at construction.
- Logits processors, each a pure function on scores (N, V): temperature, top-k, top-p (nucleus;
  Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"), min-p (Nguyen et al.
  2024), the repetition penalty of CTRL (Keskar et al. 2019), OpenAI's frequency and presence
  penalties, no-repeat n-gram blocking (as in fairseq) and a minimum-length rule that forbids EOS.
  ``process_logits`` applies them in one fixed order, the order of transformers'
  ``GenerationMixin._get_logits_processor``:

      repetition penalty -> frequency / presence penalty -> no-repeat n-gram -> min-length (EOS)
      -> [sampling only] temperature -> top-k -> top-p -> min-p

  Penalties and bans change which token is best, so they act on every strategy; temperature and
  the truncations only shape a distribution to sample from, so greedy decoding and beam search
  skip them (transformers does the same when ``do_sample=False``).
- ``DecodingModel``: the small interface the decoders drive, ``prefill`` / ``step`` / ``reorder``,
  with adapters for llmlab's ``LLM`` (its ``KVCache``) and transformers causal LMs
  (``past_key_values``); ``GenerationOutput`` and ``check_prompt``.

The decoders live in ``llmlab.decoding`` (greedy, sampling, ``generate``) and
``llmlab.beam_search``; both import this module, and ``llmlab.decoding`` re-exports its names, so
``from llmlab.decoding import GenerationConfig, top_p_filter`` keeps working.

Reference implementation: transformers ``generation/configuration_utils.py`` and
``generation/logits_process.py``; the processors equal transformers' processors on the same
inputs. Deliberate differences are listed at each function (top_p=0 is rejected here; frequency
and presence penalties have no transformers counterpart and follow OpenAI's published formula).

What it leaves out: stop strings, logit bias, and the processors of constrained decoding. Shape
letters are those of ``llmlab.shapes``; N is the number of rows being decoded (B, or B * num_beams).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from llmlab.shapes import check_float, check_int, check_tensor

EARLY_STOPPING_CHOICES = (True, False, "never")


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. Field names and meanings follow transformers' ``GenerationConfig``.

    >>> GenerationConfig.beam(num_beams=4, max_new_tokens=20).num_beams
    4
    """

    max_new_tokens: int = 32  # tokens generated after the prompt at most
    do_sample: bool = False  # True: draw from the processed distribution; False: greedy or beam search
    num_beams: int = 1  # > 1 selects beam search (deterministic; beam sampling is left out)
    num_return_sequences: int = 1  # beam search: best finished beams per prompt (<= num_beams); sampling: draws
    length_penalty: float = 1.0  # finished beam score = sum of log-probs / (generated length ** length_penalty)
    early_stopping: bool | str = False  # beam search stop rule: True, False (a heuristic) or "never"
    temperature: float = 1.0  # sampling: divide logits by this (> 0); < 1 sharpens, > 1 flattens
    top_k: int | None = None  # sampling: keep the k highest-scoring tokens (ties with the k-th are kept)
    top_p: float = 1.0  # sampling: keep the smallest top set whose probability reaches top_p; 1.0 = off
    min_p: float | None = None  # sampling: drop tokens with p < min_p * p_max
    repetition_penalty: float = 1.0  # CTRL penalty on every token already in the sequence; 1.0 = off
    frequency_penalty: float = 0.0  # OpenAI: subtract count(token in generated text) * this from its logit
    presence_penalty: float = 0.0  # OpenAI: subtract this from the logit of every token generated at least once
    no_repeat_ngram_size: int = 0  # forbid any n-gram of this size from occurring twice; 0 = off
    min_new_tokens: int = 0  # EOS is forbidden until this many tokens have been generated
    eos_token_id: int | tuple[int, ...] | None = None  # end-of-sequence id(s); None = always run max_new_tokens
    pad_token_id: int | None = None  # fills finished rows; defaults to the first EOS id

    def __post_init__(self) -> None:
        _validate_lengths(self)
        _validate_beams(self)
        _validate_processors(self)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (empty when there is no EOS)."""
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    @property
    def pad_id(self) -> int | None:
        """The id written after a row has finished: pad_token_id, else the first EOS id."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else None

    @classmethod
    def greedy(cls, max_new_tokens: int = 32, **kwargs: Any) -> GenerationConfig:
        """Preset: take the most probable token each step."""
        return cls(max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def nucleus(
        cls, top_p: float = 0.9, temperature: float = 0.7, max_new_tokens: int = 32, **kwargs: Any
    ) -> GenerationConfig:
        """Preset: the usual chat setting, temperature then top-p sampling."""
        return cls(max_new_tokens=max_new_tokens, do_sample=True, top_p=top_p, temperature=temperature, **kwargs)

    @classmethod
    def beam(cls, num_beams: int = 4, max_new_tokens: int = 32, **kwargs: Any) -> GenerationConfig:
        """Preset: beam search with transformers' defaults (length_penalty 1.0, early_stopping False)."""
        return cls(max_new_tokens=max_new_tokens, num_beams=num_beams, **kwargs)


def _validate_lengths(c: GenerationConfig) -> None:
    check_int("max_new_tokens", c.max_new_tokens, minimum=1)
    check_int("min_new_tokens", c.min_new_tokens, minimum=0)
    check_int("no_repeat_ngram_size", c.no_repeat_ngram_size, minimum=0)
    if not isinstance(c.do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(c.do_sample).__name__} {c.do_sample!r}")
    ids = c.eos_token_id if isinstance(c.eos_token_id, tuple) else (c.eos_token_id,)
    for i in ids if c.eos_token_id is not None else ():
        check_int("eos_token_id", i, minimum=0)
    if c.eos_token_id is not None and not ids:
        raise ValueError("eos_token_id must be an int, a non-empty tuple of ints or None, got ()")
    if c.pad_token_id is not None:
        check_int("pad_token_id", c.pad_token_id, minimum=0)


def _validate_beams(c: GenerationConfig) -> None:
    check_int("num_beams", c.num_beams, minimum=1)
    check_int("num_return_sequences", c.num_return_sequences, minimum=1)
    check_float("length_penalty", c.length_penalty)
    if not (isinstance(c.early_stopping, bool) or c.early_stopping == "never"):
        raise ValueError(f"early_stopping must be one of True, False, 'never'; got {c.early_stopping!r}")
    if c.num_beams > 1 and c.do_sample:
        raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not implemented; pick one")
    if c.num_beams > 1 and c.num_return_sequences > c.num_beams:
        raise ValueError(
            f"num_return_sequences must be <= num_beams={c.num_beams} for beam search, got {c.num_return_sequences}"
        )
    if c.num_beams == 1 and not c.do_sample and c.num_return_sequences != 1:
        raise ValueError(
            f"num_return_sequences must be 1 for greedy decoding (it has one answer), got {c.num_return_sequences}"
        )


def _validate_processors(c: GenerationConfig) -> None:
    check_float("temperature", c.temperature, low=0.0, low_open=True)
    check_float("top_p", c.top_p, low=0.0, high=1.0, low_open=True)
    if c.top_k is not None:
        check_int("top_k", c.top_k, minimum=1)
    if c.min_p is not None:
        check_float("min_p", c.min_p, low=0.0, high=1.0)
    check_float("repetition_penalty", c.repetition_penalty, low=0.0, low_open=True)
    check_float("frequency_penalty", c.frequency_penalty, low=-2.0, high=2.0)
    check_float("presence_penalty", c.presence_penalty, low=-2.0, high=2.0)


# ----------------------------------------------------------------------------------------------
# Logits processors: scores (N, V) in, scores (N, V) out. A removed token gets -inf.


def _check_scores(scores: torch.Tensor, input_ids: torch.Tensor | None = None) -> None:
    check_tensor("scores", scores, ndim=2, layout="(N, V)")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if input_ids is not None:
        check_tensor("input_ids", input_ids, ndim=2, layout="(N, T)")
        if input_ids.shape[0] != scores.shape[0]:
            raise ValueError(
                f"input_ids must have one row per row of scores ({scores.shape[0]}), got {input_ids.shape[0]}"
            )


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / tau): tau < 1 sharpens the distribution, tau > 1 flattens it. (N, V) -> (N, V)."""
    _check_scores(scores)
    temperature = check_float("temperature", temperature, low=0.0, low_open=True)
    return scores / temperature  # (N, V)


def top_k_filter(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep tokens scoring at least the k-th highest score; the rest get -inf. (N, V) -> (N, V).

    Like transformers' TopKLogitsWarper, every token tied with the k-th score is kept (so ties can
    keep more than k), k is raised to ``min_tokens_to_keep`` and clipped to V.

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    tensor([[-inf, 3., 2.]])
    """
    _check_scores(scores)
    k = max(check_int("top_k", top_k, minimum=1), check_int("min_tokens_to_keep", min_tokens_to_keep, minimum=1))
    k = min(k, scores.shape[-1])
    kth_best = torch.topk(scores, k, dim=-1).values[:, -1:]  # (N, 1)
    return scores.masked_fill(scores < kth_best, -math.inf)  # (N, V)


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most probable tokens whose total probability
    reaches ``top_p``; the rest get -inf. (N, V) -> (N, V).

    Walking up from the least probable token, a token is dropped while the probability of it and
    of everything below it is still <= 1 - top_p (then the tokens above it already hold >= top_p);
    the ``min_tokens_to_keep`` most probable tokens always stay. This is transformers'
    TopPLogitsWarper, with one deliberate difference: tokens with equal scores are ranked by id
    (the lower id counts as more probable, as in argmax), where transformers keeps whichever tie
    its unstable ``torch.sort`` puts last, which varies with V and the device. Without ties at the
    cut the two are identical; with ties they keep the same number of tokens and the same values.
    top_p must be in (0, 1]; transformers also accepts 0 (keeping one token).

    >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7)
    tensor([[-0.6931, -1.2040,    -inf]])
    """
    _check_scores(scores)
    top_p = check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)
    min_tokens_to_keep = check_int("min_tokens_to_keep", min_tokens_to_keep, minimum=1)
    # A stable ascending sort of the reversed vocabulary lists equal scores from high id to low id,
    # so among ties the lowest id ends up nearest the top.
    ascending, rev_order = torch.sort(scores.flip(-1), dim=-1, descending=False, stable=True)  # (N, V) each
    order = scores.shape[-1] - 1 - rev_order  # (N, V) vocabulary ids, least probable first
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)  # (N, V): probability of this token and all below
    drop_sorted = mass_up_to <= 1.0 - top_p  # (N, V)
    drop_sorted[:, -min_tokens_to_keep:] = False  # the most probable tokens always stay
    drop = drop_sorted.scatter(1, order, drop_sorted)  # (N, V) back in vocabulary order
    return scores.masked_fill(drop, -math.inf)  # (N, V)


def min_p_filter(scores: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top probability. (N, V) -> (N, V).

    The cut scales with the model's confidence: a peaked distribution keeps few tokens, a flat one
    keeps many. The ``min_tokens_to_keep`` most probable tokens always stay (transformers' MinPLogitsWarper).
    """
    _check_scores(scores)
    min_p = check_float("min_p", min_p, low=0.0, high=1.0)
    min_tokens_to_keep = check_int("min_tokens_to_keep", min_tokens_to_keep, minimum=1)
    probs = scores.softmax(dim=-1)  # (N, V)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)  # (N, V)
    best = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices  # (N, min_tokens_to_keep)
    drop = drop.scatter(1, best, False)  # (N, V)
    return scores.masked_fill(drop, -math.inf)  # (N, V)


def _seen_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, T) token ids -> (N, V) bool, True where the token occurs in the row."""
    seen = torch.zeros(ids.shape[0], vocab_size, dtype=torch.bool, device=ids.device)  # (N, V)
    return seen.scatter(1, ids, True) if ids.shape[1] else seen  # (N, V)


def repetition_penalty(scores: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in the row (prompt included), applied once per token:
    a positive score is divided by ``penalty``, a negative one multiplied, so both move down for
    penalty > 1. (N, V), (N, T) -> (N, V); equals transformers' RepetitionPenaltyLogitsProcessor.
    """
    _check_scores(scores, input_ids)
    penalty = check_float("penalty", penalty, low=0.0, low_open=True)
    seen = _seen_mask(input_ids, scores.shape[-1])  # (N, V)
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)  # (N, V)
    return torch.where(seen, penalized, scores)  # (N, V)


def frequency_presence_penalty(
    scores: torch.Tensor, generated_ids: torch.Tensor, frequency_penalty: float, presence_penalty: float
) -> torch.Tensor:
    """OpenAI's penalties: z_j - c_j * frequency_penalty - [c_j > 0] * presence_penalty, where c_j
    counts token j in the generated tokens (not the prompt, as in OpenAI's API). (N, V), (N, T) -> (N, V).

    Unlike the repetition penalty, the frequency term grows with every repeat, and both terms are
    subtracted from the logit whatever its sign. transformers has no processor for these two.
    """
    _check_scores(scores, generated_ids)
    frequency_penalty = check_float("frequency_penalty", frequency_penalty)
    presence_penalty = check_float("presence_penalty", presence_penalty)
    counts = torch.zeros_like(scores)  # (N, V)
    counts.scatter_add_(1, generated_ids, torch.ones_like(generated_ids, dtype=scores.dtype))  # (N, V): c_j per row
    return scores - counts * frequency_penalty - (counts > 0).to(scores.dtype) * presence_penalty  # (N, V)


def no_repeat_ngram_ban(scores: torch.Tensor, input_ids: torch.Tensor, ngram_size: int) -> torch.Tensor:
    """Give -inf to every token that would complete an n-gram already present in the row (prompt
    included), as fairseq and transformers' NoRepeatNGramLogitsProcessor do. (N, V), (N, T) -> (N, V).
    """
    _check_scores(scores, input_ids)
    n = check_int("ngram_size", ngram_size, minimum=1)
    t = input_ids.shape[1]
    if t < n:
        return scores
    windows = input_ids.unfold(1, n, 1)  # (N, T - n + 1, n): every n-gram of the row
    last = input_ids[:, t - n + 1 :]  # (N, n - 1): the n-1 tokens a new n-gram would start with
    starts_like_last = (windows[:, :, :-1] == last[:, None, :]).all(dim=-1)  # (N, T - n + 1)
    banned = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # (N, V)
    rows, cols = starts_like_last.nonzero(as_tuple=True)
    banned[rows, windows[rows, cols, -1]] = True
    return scores.masked_fill(banned, -math.inf)  # (N, V)


def min_new_tokens_rule(
    scores: torch.Tensor, num_new_tokens: int, min_new_tokens: int, eos_token_id: int | Sequence[int]
) -> torch.Tensor:
    """Forbid EOS (score -inf) while fewer than ``min_new_tokens`` tokens have been generated.
    (N, V) -> (N, V). Same as transformers' MinNewTokensLengthLogitsProcessor, and as its
    MinLengthLogitsProcessor with min_length = prompt length + min_new_tokens.
    """
    _check_scores(scores)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if check_int("num_new_tokens", num_new_tokens, minimum=0) >= check_int("min_new_tokens", min_new_tokens, 0):
        return scores
    out = scores.clone()  # (N, V)
    out[:, eos] = -math.inf
    return out


def process_logits(
    scores: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, config: GenerationConfig, sampling: bool
) -> torch.Tensor:
    """Apply every processor ``config`` switches on, in the fixed order of the module docstring.

    scores (N, V) for the next token; input_ids (N, T) the rows so far, of which the first
    ``prompt_len`` columns are the prompt. Warpers (temperature, top-k, top-p, min-p) run only
    when ``sampling``. ``min_tokens_to_keep`` is 1, transformers' value outside beam sampling.
    """
    c = config
    if c.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, input_ids, c.repetition_penalty)
    if c.frequency_penalty != 0.0 or c.presence_penalty != 0.0:
        generated = input_ids[:, prompt_len:]  # (N, T - prompt_len)
        scores = frequency_presence_penalty(scores, generated, c.frequency_penalty, c.presence_penalty)
    if c.no_repeat_ngram_size > 0:
        scores = no_repeat_ngram_ban(scores, input_ids, c.no_repeat_ngram_size)
    if c.min_new_tokens > 0 and c.eos_ids:
        scores = min_new_tokens_rule(scores, input_ids.shape[1] - prompt_len, c.min_new_tokens, c.eos_ids)
    if not sampling:
        return scores
    if c.temperature != 1.0:
        scores = apply_temperature(scores, c.temperature)
    if c.top_k is not None:
        scores = top_k_filter(scores, c.top_k)
    if c.top_p < 1.0:
        scores = top_p_filter(scores, c.top_p)
    if c.min_p is not None:
        scores = min_p_filter(scores, c.min_p)
    return scores


# ----------------------------------------------------------------------------------------------
# One small model interface


@runtime_checkable
class DecodingModel(Protocol):
    """What a decoder needs from a model. ``state`` is opaque to the decoder (a KV cache).

    - ``prefill(input_ids (N, T)) -> (logits (N, V) for the next token, state)``
    - ``step(tokens (N,), state) -> (logits (N, V), state)``: append one token per row.
    - ``reorder(state, rows (M,)) -> state``: keep cache rows ``rows`` in that order (beam search
      reordering; with repeated rows it also expands a batch to B * num_beams).
    """

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...

    def reorder(self, state: Any, rows: torch.Tensor) -> Any: ...


class HFCausalLM:
    """Adapter for a transformers causal LM (LlamaForCausalLM, GPT2LMHeadModel, ...): the state is
    its ``past_key_values`` cache, reordered with ``Cache.reorder_cache``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values  # (N, V)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        from transformers import DynamicCache

        return self._forward(input_ids, DynamicCache(config=self.model.config))

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return self._forward(tokens[:, None], state)  # tokens (N,) -> (N, 1)

    def reorder(self, state: Any, rows: torch.Tensor) -> Any:
        state.reorder_cache(rows)
        return state


class LLMAdapter:
    """Adapter for llmlab's ``LLM``: the state is an ``llmlab.attention.KVCache``, filled by
    ``LLM.forward(..., cache=cache)`` and reordered in place with ``KVCache.reorder``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._warned_past_context = False

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        block_size = self.model.config.block_size
        if cache.seq_len + input_ids.shape[1] > block_size and not self._warned_past_context:
            # RoPE/ALiBi/no-position models accept any position, but quality usually drops past the
            # training context (notebook 03); learned or sinusoidal tables raise a clear error instead.
            warnings.warn(f"decoding past the model's block_size={block_size}: positions beyond the training "
                          "context were never seen in training, so quality usually degrades", stacklevel=3)
            self._warned_past_context = True
        out = self.model(input_ids, cache=cache)
        return out.logits[:, -1, :].float(), cache  # (N, V)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self._forward(input_ids, self.model.new_cache())

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return self._forward(tokens[:, None], state)  # tokens (N,) -> (N, 1)

    def reorder(self, state: Any, rows: torch.Tensor) -> Any:
        state.reorder(rows)
        return state


def as_decoding_model(model: Any) -> DecodingModel:
    """Wrap ``model`` in the adapter that fits: a transformers PreTrainedModel -> HFCausalLM, an
    llmlab LLM -> LLMAdapter; an object that already has prefill/step/reorder is returned as is."""
    if isinstance(model, DecodingModel):
        return model
    from llmlab.model import LLM

    if isinstance(model, LLM):
        return LLMAdapter(model)
    # A transformers model exists only if transformers was imported: no slow import just to check.
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        return HFCausalLM(model)
    raise TypeError(
        "model must be an llmlab LLM, a transformers causal LM or have prefill/step/reorder methods, "
        f"got {type(model).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# Greedy decoding and sampling


@dataclass
class GenerationOutput:
    """Result of a decoder. ``sequences`` (N, T + L) holds prompt and generated tokens, finished
    rows padded with ``pad_id``; ``scores`` the processed (N, V) scores of each step (greedy and
    sampling); ``sequence_scores`` (N,) the length-penalized beam scores (beam search)."""

    sequences: torch.Tensor  # (N, T + L)
    scores: list[torch.Tensor] = field(default_factory=list)  # L tensors (N, V)
    sequence_scores: torch.Tensor | None = None  # (N,)


def check_prompt(input_ids: torch.Tensor) -> None:
    """Validate a batch of prompts: int64 token ids (B, T) with T >= 1."""
    check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be int64 token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one prompt token per row, got shape {tuple(input_ids.shape)}")
