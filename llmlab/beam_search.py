"""Beam search, written to be read next to notebook 08's ten-line version, and token-equal to
transformers' ``generate(num_beams=W, do_sample=False)``.

What it implements (``beam_search``), for each of B prompts:
1. Keep W live beams with their summed log-probabilities. At the start only beam 0 is live (the
   others score -inf), so the W copies of the prompt do not all pick the same first token.
2. Each step scores every (beam, token) extension, score = beam score + log p(token), and keeps
   the M best candidates of the prompt: M = max(2, 1 + number of EOS ids) * W, enough that W of
   them are still live after the finished ones are set aside.
3. A candidate that ends in EOS, or reaches ``max_new_tokens``, is finished: if it ranks among
   the W best candidates it joins the prompt's finished hypotheses with the length-normalized
   score  sum log p / generated_len ** length_penalty  (the W best are kept). The W best live
   candidates are the next beams (finished ones are masked with -inf).
4. A prompt is settled when no live beam can beat its worst finished hypothesis any more
   (transformers' heuristic, with the ``early_stopping`` variants: True = stop as soon as W
   hypotheses are finished; False = compare at the current length; "never" = compare at the
   longest possible length when length_penalty > 0). Decoding stops when every prompt is settled.
The answer is each prompt's finished hypotheses, best first.

The model is queried through ``llmlab.generation``'s ``DecodingModel`` (prefill / step / reorder),
so any KV cache works (``llmlab.paged_decoding`` shares the prompt's blocks across beams).

What it leaves out: diverse / constrained / group beam search and beam sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmlab.generation import GenerationConfig, GenerationOutput, as_decoding_model, check_prompt, process_logits


@dataclass
class _Finished:
    """One prompt's best finished hypotheses, at most W, best first."""

    width: int
    hypotheses: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (score 0-d, tokens)

    def add(self, score: torch.Tensor, tokens: torch.Tensor) -> None:
        self.hypotheses.append((score, tokens))
        self.hypotheses.sort(key=lambda h: float(h[0]), reverse=True)  # stable: earlier ones win ties
        del self.hypotheses[self.width :]

    @property
    def full(self) -> bool:
        return len(self.hypotheses) == self.width

    def worst(self) -> float:
        """The score a new hypothesis must beat (-inf while there is room)."""
        return float(self.hypotheses[-1][0]) if self.full else float("-inf")


def _can_improve(best_live: torch.Tensor, done: _Finished, num_new: int, config: GenerationConfig) -> bool:
    """Could the best live beam still beat the worst finished hypothesis? The length it is scored
    at is the current one, or max_new_tokens for early_stopping="never" with length_penalty > 0."""
    lp = config.length_penalty
    length = config.max_new_tokens if (config.early_stopping == "never" and lp > 0.0) else num_new
    return float(best_live / (length**lp)) > done.worst()


def beam_search(model: Any, input_ids: torch.Tensor, config: GenerationConfig) -> GenerationOutput:
    """Keep the ``num_beams`` best partial sequences by summed log-probability; return the best
    finished ones ranked by sum_logprobs / generated_len ** length_penalty.

    input_ids (B, T) -> sequences (B * num_return_sequences, T + L), rows of one prompt adjacent and
    best first, padded with ``pad_id``; ``sequence_scores`` (B * num_return_sequences,).
    """
    check_prompt(input_ids)
    lm, (b, t), w = as_decoding_model(model), input_ids.shape, config.num_beams
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=input_ids.device)  # (number of EOS ids,)
    n_cand = max(2, 1 + eos.numel()) * w
    beams = input_ids.repeat_interleave(w, dim=0).view(b, w, t)  # (B, W, t) live beams
    scores = torch.full((b, w), float("-inf"), device=input_ids.device)  # (B, W)
    scores[:, 0] = 0.0  # only beam 0 is live at the start
    finished = [_Finished(w) for _ in range(b)]
    settled = [False] * b
    logits, state = lm.prefill(input_ids)  # (B, V)
    rows = torch.arange(b, device=input_ids.device).repeat_interleave(w)  # (B * W,): every prompt W times
    logits, state = logits[rows], lm.reorder(state, rows)  # (B * W, V)
    for num_new in range(1, config.max_new_tokens + 1):
        log_probs = process_logits(logits.log_softmax(dim=-1), beams.reshape(b * w, -1), t, config, sampling=False)
        v = log_probs.shape[-1]
        total = (log_probs.view(b, w, v) + scores[:, :, None]).view(b, w * v)  # (B, W * V)
        cand_scores, flat = torch.topk(total, n_cand, dim=-1)  # (B, M) each, best first
        source, token = flat // v, flat % v  # (B, M): the beam extended and the token appended
        ends = torch.isin(token, eos) | (num_new >= config.max_new_tokens)  # (B, M)
        for i in range(b):
            # a settled prompt, or a full one with early_stopping=True, takes no new hypotheses
            accepting = not settled[i] and not (finished[i].full and config.early_stopping is True)
            for rank in range(w):  # only the W best candidates may finish
                if accepting and ends[i, rank]:
                    tokens = torch.cat([beams[i, source[i, rank]], token[i, rank : rank + 1]])  # (t + 1,)
                    finished[i].add(cand_scores[i, rank] / (num_new**config.length_penalty), tokens)
        live = torch.topk(cand_scores.masked_fill(ends, float("-inf")), w, dim=-1).indices  # (B, W)
        keep = torch.gather(source, 1, live)  # (B, W) beam each new beam extends
        beams = torch.cat([torch.gather(beams, 1, keep[:, :, None].expand(-1, -1, beams.shape[-1])),
                           torch.gather(token, 1, live)[:, :, None]], dim=-1)  # (B, W, t + 1)
        scores = torch.gather(cand_scores, 1, live).masked_fill(torch.gather(ends, 1, live), float("-inf"))
        for i in range(b):
            stop_early = finished[i].full and config.early_stopping is True
            settled[i] = settled[i] or stop_early or not _can_improve(scores[i, 0], finished[i], num_new, config)
        if all(settled) or bool(ends.all()):
            break
        src = (keep + torch.arange(b, device=keep.device)[:, None] * w).reshape(-1)  # (B * W,) cache rows
        logits, state = lm.step(beams[:, :, -1].reshape(-1), lm.reorder(state, src))  # (B * W, V)
    return _output(finished, config)


def _output(finished: list[_Finished], config: GenerationConfig) -> GenerationOutput:
    """The ``num_return_sequences`` best hypotheses of every prompt, padded to one length."""
    r, pad = config.num_return_sequences, config.pad_id if config.pad_id is not None else -1
    best = [h for done in finished for h in done.hypotheses[:r]]
    length = max(len(tokens) for _, tokens in best)
    sequences = torch.full((len(best), length), pad, dtype=torch.long, device=best[0][1].device)  # (B * R, T + L)
    for row, (_, tokens) in enumerate(best):
        sequences[row, : len(tokens)] = tokens
    return GenerationOutput(sequences=sequences, sequence_scores=torch.stack([s for s, _ in best]))
