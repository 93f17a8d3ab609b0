"""Vocabulary expansion: add domain tokens to a tokenizer and grow the model's embeddings to match.

What it implements
- ``ExpandedTokenizer``: a base tokenizer plus added tokens (strings) that are matched first,
  longest first, as Hugging Face's ``add_tokens``; the rest of the text goes to the base tokenizer.
  Added token k gets id ``base.vocab_size + k``; ``subtoken_ids`` lists, for every added token,
  the base ids it used to split into.
- ``resize_token_embeddings(model, new_vocab_size, init)``: a new (V', C) ``embed_tokens`` and, when
  untied, a new (V', C) ``lm_head``, with the old rows copied unchanged (as transformers'
  ``PreTrainedModel.resize_token_embeddings``). New rows are initialized by
  ``init="mean"`` (the mean of the old rows, what transformers' ``mean_resizing=True`` samples
  around, following Hewitt 2021, "Initializing new word embeddings for pretrained language
  models"), ``init="subtokens"`` (each new row is the mean of the rows of the tokens it used to
  split into, as in e.g. Chinese-LLaMA's and domain-adaptation recipes), or ``init="random"``
  (normal with the model's ``init_std``, transformers' ``mean_resizing=False``).

What it leaves out: padding the vocabulary to a multiple (``pad_to_multiple_of``), and retraining
the tokenizer itself (train a new BPE with ``llmlab.bpe`` and merge vocabularies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import regex
import torch
from torch import nn

from llmlab.model import LLM
from llmlab.shapes import check_choice, check_int
from llmlab.tokenizer import Tokenizer, _check_ids, tokenizer_from_dict

INITS = ("mean", "subtokens", "random")


class ExpandedTokenizer(Tokenizer):
    """``base`` plus added tokens matched first (longest first); their ids follow the base ids.

    >>> from llmlab.tokenizer import CharTokenizer
    >>> tok = ExpandedTokenizer(CharTokenizer.from_text("abc "), ["abc"])
    >>> tok.encode("abc cab")     # 'abc' is one token, id 4
    [4, 0, 3, 1, 2]
    """

    kind = "expanded"

    def __init__(self, base: Tokenizer, added_tokens: Iterable[str]) -> None:
        if not isinstance(base, Tokenizer):
            raise TypeError(f"base must be an llmlab Tokenizer, got {type(base).__name__}")
        self.base = base
        self.added_tokens = list(added_tokens)
        for t in self.added_tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"added_tokens must be non-empty strings, got {t!r}")
        if len(set(self.added_tokens)) != len(self.added_tokens):
            raise ValueError("added_tokens must not repeat a token")
        self.added_ids = {t: base.vocab_size + k for k, t in enumerate(self.added_tokens)}
        by_length = sorted(self.added_tokens, key=len, reverse=True)
        self._splitter = regex.compile("(" + "|".join(regex.escape(t) for t in by_length) + ")") if by_length else None
        self.subtoken_ids = [base.encode(t) for t in self.added_tokens]  # what each added token used to be

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(self.added_tokens)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._splitter is None:
            return self.base.encode(text)
        out: list[int] = []
        for k, piece in enumerate(self._splitter.split(text)):
            if k % 2:
                out.append(self.added_ids[piece])
            elif piece:
                out.extend(self.base.encode(piece))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids, n, parts, run = _check_ids(ids, self.vocab_size), self.base.vocab_size, [], []
        for i in ids:
            if i < n:
                run.append(i)
                continue
            parts.append(self.base.decode(run))
            parts.append(self.added_tokens[i - n])
            run = []
        parts.append(self.base.decode(run))
        return "".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "base": self.base.to_dict(), "added_tokens": self.added_tokens}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpandedTokenizer:
        return cls(tokenizer_from_dict(data["base"]), data["added_tokens"])


def _new_rows(old: torch.Tensor, n_new: int, init: str, subtokens, std: float, generator) -> torch.Tensor:
    """(n_new, C) rows for the added ids, from the (V, C) matrix ``old``."""
    if init == "mean":
        return old.mean(dim=0, keepdim=True).expand(n_new, -1).clone()  # (n_new, C)
    if init == "subtokens":
        return torch.stack([old[list(ids)].mean(dim=0) for ids in subtokens])  # (n_new, C)
    rows = torch.randn(n_new, old.shape[1], generator=generator, dtype=torch.float32) * std
    return rows.to(dtype=old.dtype, device=old.device)


def _check_subtokens(subtokens, n_new: int, old_vocab: int) -> list[list[int]]:
    if subtokens is None or len(subtokens) != n_new:
        got = None if subtokens is None else len(subtokens)
        raise ValueError(f"subtokens must list the old ids of each of the {n_new} new tokens for "
                         f"init='subtokens', got {got}")
    out = []
    for k, ids in enumerate(subtokens):
        ids = _check_ids(ids, old_vocab)
        if not ids:
            raise ValueError(f"subtokens[{k}] must hold at least one old id, got an empty list")
        out.append(ids)
    return out


@torch.no_grad()
def resize_token_embeddings(
    model: LLM,
    new_vocab_size: int,
    init: str = "mean",
    *,
    subtokens: Sequence[Sequence[int]] | None = None,
    generator: torch.Generator | None = None,
) -> LLM:
    """Grow (or shrink) ``model``'s vocabulary to ``new_vocab_size`` in place; return the model.

    Old rows of ``embed_tokens`` and an untied ``lm_head`` are kept unchanged; a tied head stays
    tied. ``init`` sets the new rows: "mean", "subtokens" (needs ``subtokens``: for each new id,
    the old ids it used to split into, e.g. ``ExpandedTokenizer.subtoken_ids``) or "random"
    (normal with ``model.config.init_std``, seeded by ``generator``).

    >>> model = resize_token_embeddings(LLM(ModelConfig.tiny(50)), 53, init="mean")  # doctest: +SKIP
    """
    if not isinstance(model, LLM):
        raise TypeError(f"model must be an llmlab.model.LLM, got {type(model).__name__}")
    check_int("new_vocab_size", new_vocab_size, minimum=1)
    check_choice("init", init, INITS)
    cfg = model.config
    old_v, n_new = cfg.vocab_size, new_vocab_size - cfg.vocab_size
    if init == "subtokens" and n_new > 0:
        subtokens = _check_subtokens(subtokens, n_new, old_v)
    keep = min(old_v, new_vocab_size)
    old_emb = model.model.embed_tokens.weight  # (V, C)
    emb = nn.Embedding(new_vocab_size, cfg.n_embd, device=old_emb.device, dtype=old_emb.dtype)
    emb.weight[:keep] = old_emb[:keep]
    if n_new > 0:
        emb.weight[old_v:] = _new_rows(old_emb, n_new, init, subtokens, cfg.init_std, generator)
    model.model.embed_tokens = emb
    if cfg.tie_embeddings:
        model.lm_head = nn.Linear(cfg.n_embd, new_vocab_size, bias=False, device=emb.weight.device)
        model.lm_head.weight = emb.weight  # one (V', C) matrix, as before
    else:
        old_head = model.lm_head.weight  # (V, C)
        head = nn.Linear(cfg.n_embd, new_vocab_size, bias=False, device=old_head.device, dtype=old_head.dtype)
        head.weight[:keep] = old_head[:keep]
        if n_new > 0:
            head.weight[old_v:] = _new_rows(old_head, n_new, init, subtokens, cfg.init_std, generator)
        model.lm_head = head
    model.config = dataclasses.replace(cfg, vocab_size=new_vocab_size)
    return model
