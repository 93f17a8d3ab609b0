"""Multi-token prediction: one DeepSeek-V3 MTP module (depth 1) on an ``llmlab.model.LLM``.

DeepSeek-V3 technical report (2024), section 2.2; Gloeckle et al. 2024, "Better & Faster Large
Language Models via Multi-token Prediction" (parallel heads instead of a sequential module).

What it implements
- ``MTPModule``: from the main model's last hidden state h_t (before its final norm) and the
  embedding of the next token t+1, predict token t+2:
  h'_t = M [RMSNorm(h_t); RMSNorm(Emb(x_{t+1}))] (M: 2C -> C), one causal Transformer block over
  the sequence, then a final RMSNorm and the main model's output head. The embedding and the head
  are shared with the main model (not copied), as in DeepSeek-V3.
- ``mtp_forward``: the main logits (B, T, V) and the MTP logits (B, T-1, V); MTP position t sees
  tokens 0..t+1 only.
- ``mtp_loss``: the cross-entropy of the MTP logits against the token two ahead; DeepSeek-V3 adds
  lambda times it to the main loss (lambda = 0.3, then 0.1).
- ``MTPDraft``: the main model plus the module as a next-token model, so
  ``llmlab.speculative.speculative_generate`` can use the MTP prediction as its draft
  (self-speculative decoding). It recomputes the main model per call for clarity; a serving engine
  reuses the hidden state of the last verification pass, so the draft then costs one block.

What it leaves out: depth D > 1 (chained modules), and training the main model jointly.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.model import LLM, DecoderLayer
from llmlab.norms import RMSNorm
from llmlab.shapes import check_tensor


class MTPModule(nn.Module):
    """One MTP depth: (hidden (B, T, C), next-token embeddings (B, T, C)) -> hidden (B, T, C).

    >>> from llmlab.model import ModelConfig
    >>> model = LLM(ModelConfig.tiny(vocab_size=20))
    >>> mtp = MTPModule(model)
    >>> main, extra = mtp_forward(model, mtp, torch.randint(0, 20, (2, 9)))
    >>> tuple(main.shape), tuple(extra.shape)
    ((2, 9, 20), (2, 8, 20))
    """

    def __init__(self, model: LLM) -> None:
        super().__init__()
        if not isinstance(model, LLM):
            raise TypeError(f"model must be an llmlab LLM, got {type(model).__name__}")
        cfg = model.config
        if cfg.position != "rope" or cfg.norm_placement != "pre":
            raise ValueError(f"MTPModule needs position='rope' and norm_placement='pre', got "
                             f"position={cfg.position!r}, norm_placement={cfg.norm_placement!r}")
        c = cfg.n_embd
        self.hnorm = RMSNorm(c, cfg.norm_eps)
        self.enorm = RMSNorm(c, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * c, c, bias=False)  # M in the report
        self.block = DecoderLayer(cfg, layer_idx=0)
        self.norm = RMSNorm(c, cfg.norm_eps)
        nn.init.normal_(self.eh_proj.weight, std=cfg.init_std)
        for p in self.block.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, rope) -> torch.Tensor:
        """hidden, next_embeds (B, T, C); rope (cos, sin) each (T, D) -> (B, T, C) before the head."""
        x = self.eh_proj(torch.cat([self.hnorm(hidden), self.enorm(next_embeds)], dim=-1))  # (B, T, C)
        x, _, _ = self.block(x, mask=None, is_causal=True, positions=None, cache=None, rope=rope,
                             return_probs=False)  # (B, T, C)
        return self.norm(x)  # (B, T, C)


def _hidden_and_logits(model: LLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The main model's last hidden state before its final norm (B, T, C), and its logits (B, T, V)."""
    seen = []
    handle = model.model.norm.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        logits = model(input_ids).logits  # (B, T, V)
    finally:
        handle.remove()
    return seen[0], logits


def mtp_forward(model: LLM, mtp: MTPModule, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) -> (main logits (B, T, V), MTP logits (B, T-1, V)).

    MTP logits[:, t] predict token t+2 from the hidden state at t and the embedding of token t+1.
    """
    check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens per row, got T={input_ids.shape[1]}")
    hidden, logits = _hidden_and_logits(model, input_ids)  # (B, T, C), (B, T, V)
    t = input_ids.shape[1] - 1
    cos, sin = model.model.rotary_emb(t, hidden.dtype, hidden.device)  # (>= T-1, D) each
    next_embeds = model.model.embed_tokens(input_ids[:, 1:])  # (B, T-1, C)
    h = mtp(hidden[:, :-1], next_embeds, (cos[:t], sin[:t]))  # (B, T-1, C)
    return logits, model.lm_head(h)  # (B, T, V), (B, T-1, V)


def mtp_loss(mtp_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of MTP logits (B, T-1, V) against the token two ahead.

    targets (B, T) are the usual next-token targets (targets[:, t] = token t+1), so the token two
    ahead of position t is targets[:, t+1]; -100 is ignored.
    """
    check_tensor("mtp_logits", mtp_logits, ndim=3, layout="(B, T-1, V)")
    check_tensor("targets", targets, ndim=2, layout="(B, T)")
    if targets.shape[0] != mtp_logits.shape[0] or targets.shape[1] != mtp_logits.shape[1] + 1:
        raise ValueError(f"targets must be (B, T) for mtp_logits (B, T-1, V) = {tuple(mtp_logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    return F.cross_entropy(mtp_logits.flatten(0, 1).float(), targets[:, 1:].flatten().long(), ignore_index=-100)


class MTPDraft:
    """The main model with its MTP module as a next-token model: logits (1, T, V) whose row t is the
    MTP prediction for token t+1 made at position t-1 (row 0: the main model's own prediction)."""

    def __init__(self, model: LLM, mtp: MTPModule) -> None:
        self.model, self.mtp = model, mtp

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        if input_ids.shape[1] < 2:
            return SimpleNamespace(logits=self.model(input_ids).logits)  # (B, 1, V)
        main, extra = mtp_forward(self.model, self.mtp, input_ids)  # (B, T, V), (B, T-1, V)
        return SimpleNamespace(logits=torch.cat([main[:, :1], extra], dim=1))  # (B, T, V)
