"""Soft prompts: prompt tuning, P-tuning, prefix tuning and P-tuning v2, on a frozen language model.

What it implements
- Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):
  ``PromptEmbedding``, N trainable virtual-token embeddings (N, C) placed before the input
  embeddings. They are trained (not fixed); only the input layer sees them directly.
- P-tuning (Liu et al. 2021, "GPT Understands, Too"): ``PromptEncoder``, the same N virtual tokens,
  but produced by a small network (an MLP, or a bidirectional LSTM + MLP) from trainable
  pseudo-token embeddings. The encoder sees only the pseudo-token indices 0..N-1, never the input
  text, so the prompt is the same for every input; the network only reparameterizes it (it
  couples the tokens and makes optimisation easier). After training it can be collapsed into a
  plain (N, C) table.
- Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"):
  ``PrefixEncoder``, trainable key/value prefixes (N positions) for the attention of every layer,
  produced during training by a reparameterization MLP (embedding (N, E) -> Linear -> tanh ->
  Linear -> L * 2 * K * D). ``PrefixEncoder.collapse()`` evaluates the MLP once and keeps only the
  resulting prefixes, which changes no output.
- P-tuning v2 (Liu et al. 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
  Universally Across Scales and Tasks"): deep prompts at every layer, not only at the input. The
  paper makes the reparameterization optional (it helps on some tasks and hurts on others);
  ``PrefixConfig.p_tuning_v2()`` trains the per-layer prompts directly, which is how peft implements
  it (prefix tuning with ``prefix_projection=False``). So P-tuning v2 is not "longer prefixes": the
  difference from P-tuning is depth (every layer's keys and values), not length.
- ``SoftPromptModel`` and ``PrefixModel`` wrap a frozen model. Virtual tokens are put in front by
  feeding N placeholder ids and overwriting their embeddings (a forward hook on the input
  embedding), so it works with any model that has an embedding table; labels / targets and the
  attention mask are extended with -100 / ones. Prefixes go in as a pre-filled key/value cache:
  ``past_key_values`` (a ``DynamicCache``) for transformers models, as peft does, and a pre-filled
  ``llmlab.attention.KVCache`` for llmlab's ``LLM``. Real tokens then start at position N, as in peft.

Reference implementation: peft (``PromptTuningConfig``, ``PromptEncoderConfig``, ``PrefixTuningConfig``):
module names (``embedding``, ``transform``, ``mlp_head``, ``lstm_head``) and the layout of the flat
prefix vector (layer, key/value, head, head dim) follow it, so weights copy across and the tests
compare logits. Left out: multitask prompt tuning, encoder-decoder models, text initialisation of
prompts from a tokenizer (``init_from_vocab`` samples vocabulary rows instead), and generation helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.peft_utils import (  # these names used to be defined here; old imports keep working
    ModelGeometry,
    freeze,
    input_embedding,
    is_llmlab_model,
    trainable_parameters,  # noqa: F401 (re-exported)
)
from llmlab.shapes import check_choice, check_float, check_int, check_tensor

ENCODER_TYPES = ("mlp", "lstm")


# ----------------------------------------------------------------------------------------------
# Prompt tuning and P-tuning: virtual tokens in the input


@dataclass(frozen=True)
class PromptConfig:
    """Virtual tokens at the input: prompt tuning (no encoder) or P-tuning (MLP / LSTM encoder)."""

    num_virtual_tokens: int = 20  # N: virtual tokens put in front of every input
    encoder: str | None = None  # None (prompt tuning), "mlp" or "lstm" (P-tuning's prompt encoder)
    encoder_hidden_size: int | None = None  # width of the encoder (default: the model width C)
    encoder_num_layers: int = 2  # LSTM layers (P-tuning uses 2)
    encoder_dropout: float = 0.0  # dropout between LSTM layers

    def __post_init__(self) -> None:
        check_int("num_virtual_tokens", self.num_virtual_tokens, minimum=1)
        if self.encoder is not None:
            check_choice("encoder", self.encoder, ENCODER_TYPES)
        if self.encoder_hidden_size is not None:
            check_int("encoder_hidden_size", self.encoder_hidden_size, minimum=1)
        check_int("encoder_num_layers", self.encoder_num_layers, minimum=1)
        check_float("encoder_dropout", self.encoder_dropout, 0.0, 1.0, high_open=True)

    @classmethod
    def prompt_tuning(cls, num_virtual_tokens: int = 20) -> PromptConfig:
        """Lester et al.: a plain table of trainable virtual token embeddings."""
        return cls(num_virtual_tokens=num_virtual_tokens)

    @classmethod
    def p_tuning(cls, num_virtual_tokens: int = 20, encoder: str = "mlp") -> PromptConfig:
        """Liu et al.: the virtual tokens come out of a prompt encoder (MLP, or LSTM + MLP)."""
        return cls(num_virtual_tokens=num_virtual_tokens, encoder=encoder)


class PromptEmbedding(nn.Module):
    """Prompt tuning: a trainable (N, C) table; forward() returns it. peft name: ``embedding``."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, hidden_size)  # weight (N, C), N(0, 1) init

    @torch.no_grad()
    def init_from_vocab(self, token_embedding: nn.Embedding, generator: torch.Generator | None = None) -> None:
        """Start from randomly chosen rows of the vocabulary (Lester et al. found this beats random init)."""
        rows = torch.randint(0, token_embedding.num_embeddings, (self.embedding.num_embeddings,), generator=generator)
        self.embedding.weight.copy_(token_embedding.weight[rows.to(token_embedding.weight.device)])  # (N, C)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (N, C)


class PromptEncoder(nn.Module):
    """P-tuning: pseudo-token embeddings (N, C) -> MLP or (bi-LSTM -> MLP) -> virtual tokens (N, C).

    The input is the fixed index list 0..N-1, so the output does not depend on the user's text.
    """

    def __init__(self, config: PromptConfig, hidden_size: int) -> None:
        super().__init__()
        if config.encoder is None:
            raise ValueError("config.encoder must be 'mlp' or 'lstm' for a PromptEncoder, got None")
        n, c = config.num_virtual_tokens, hidden_size
        h = config.encoder_hidden_size or c
        self.encoder = config.encoder
        self.embedding = nn.Embedding(n, c)  # weight (N, C): the pseudo tokens
        if config.encoder == "lstm":
            self.lstm_head = nn.LSTM(
                c,
                h,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, c))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(c, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight[None]  # (1, N, C): one "sequence" of pseudo tokens
        if self.encoder == "lstm":
            x = self.lstm_head(x)[0]  # (1, N, 2h): each virtual token sees all the others
        return self.mlp_head(x)[0]  # (N, C)

    @torch.no_grad()
    def collapse(self) -> PromptEmbedding:
        """The plain table this encoder currently produces (what inference needs)."""
        table = self()  # (N, C)
        plain = PromptEmbedding(table.shape[0], table.shape[1]).to(table.device, table.dtype)
        plain.embedding.weight.copy_(table)
        return plain


@contextlib.contextmanager
def _replace_first_embeddings(embedding: nn.Module, prompts: torch.Tensor) -> Iterator[None]:
    """While active, the embedding output's first N positions are replaced by ``prompts`` (N, C)."""

    def hook(module, args, out):
        n = prompts.shape[0]
        front = prompts.to(out.dtype)[None].expand(out.shape[0], -1, -1)  # (B, N, C)
        return torch.cat([front, out[:, n:]], dim=1)  # (B, N + T, C)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _extend_front(x: torch.Tensor | None, n: int, fill: int) -> torch.Tensor | None:
    """Put ``n`` columns of ``fill`` in front of a (B, T) tensor. (B, T) -> (B, N + T)"""
    if x is None:
        return None
    return torch.cat([x.new_full((x.shape[0], n), fill), x], dim=1)  # (B, N + T)


class SoftPromptModel(nn.Module):
    """A frozen model with N trainable virtual tokens in front of every input.

    forward(input_ids (B, T), attention_mask (B, T) or None, labels= / targets= (B, T), ...) calls the
    model on N + T positions and returns its output unchanged (logits (B, N + T, V), like peft).

    >>> from llmlab.model import LLM, ModelConfig
    >>> base = LLM(ModelConfig.tiny(vocab_size=50))
    >>> model = SoftPromptModel(base, PromptConfig.prompt_tuning(num_virtual_tokens=8))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).logits.shape  # (B, N + T, V)
    torch.Size([2, 13, 50])
    >>> trainable_parameters(model) == 8 * base.config.n_embd  # N x C, the base model is frozen
    True
    """

    def __init__(self, model: nn.Module, config: PromptConfig) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, PromptConfig):
            raise TypeError(f"config must be a PromptConfig, got {type(config).__name__}")
        self.config = config
        self.base_model = model
        freeze(model)
        emb = input_embedding(model)
        c = emb.embedding_dim
        encoder = PromptEncoder(config, c) if config.encoder else PromptEmbedding(config.num_virtual_tokens, c)
        self.prompt_encoder = encoder.to(emb.weight.device)

    def prompts(self) -> torch.Tensor:
        """The current virtual tokens. (N, C)"""
        return self.prompt_encoder()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
        n = self.config.num_virtual_tokens
        ids = _extend_front(input_ids, n, 0)  # (B, N + T): placeholders, overwritten below
        mask = _extend_front(attention_mask, n, 1)  # (B, N + T)
        for key in ("labels", "targets"):
            if key in kwargs:
                kwargs[key] = _extend_front(kwargs[key], n, -100)  # (B, N + T): no loss on virtual tokens
        with _replace_first_embeddings(input_embedding(self.base_model), self.prompts()):
            return self.base_model(ids, attention_mask=mask, **kwargs)


# ----------------------------------------------------------------------------------------------
# Prefix tuning and P-tuning v2: key/value prefixes in every layer


@dataclass(frozen=True)
class PrefixConfig:
    """Per-layer key/value prefixes: prefix tuning (with the MLP) or P-tuning v2 (without)."""

    num_virtual_tokens: int = 20  # N: prefix positions in every layer's keys and values
    projection: bool = True  # produce the prefixes with the reparameterization MLP while training
    token_dim: int | None = None  # E: width of the prefix embedding fed to the MLP (default K * D, as peft)
    encoder_hidden_size: int | None = None  # the MLP's hidden width (default: token_dim)

    def __post_init__(self) -> None:
        check_int("num_virtual_tokens", self.num_virtual_tokens, minimum=1)
        for name in ("token_dim", "encoder_hidden_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)

    @classmethod
    def prefix_tuning(cls, num_virtual_tokens: int = 20) -> PrefixConfig:
        """Li & Liang: prefixes through an MLP while training (it stabilises optimisation)."""
        return cls(num_virtual_tokens=num_virtual_tokens, projection=True)

    @classmethod
    def p_tuning_v2(cls, num_virtual_tokens: int = 20) -> PrefixConfig:
        """Liu et al.: deep prompts at every layer, trained directly (no reparameterization)."""
        return cls(num_virtual_tokens=num_virtual_tokens, projection=False)


class PrefixEncoder(nn.Module):
    """Produces every layer's key and value prefix, each (K, N, D).

    With projection: embedding (N, E) -> Linear(E, h) -> tanh -> Linear(h, L * 2 * K * D).
    Without: an embedding table (N, L * 2 * K * D) that is the prefixes themselves.
    """

    def __init__(self, config: PrefixConfig, geometry: ModelGeometry) -> None:
        super().__init__()
        self.geometry, self.projection = geometry, config.projection
        self.num_virtual_tokens = n = config.num_virtual_tokens
        g = geometry
        flat = g.num_layers * 2 * g.num_kv_heads * g.head_dim  # L * 2 * K * D numbers per position
        if config.projection:
            e = config.token_dim or g.num_kv_heads * g.head_dim
            h = config.encoder_hidden_size or e
            self.embedding = nn.Embedding(n, e)  # weight (N, E)
            self.transform = nn.Sequential(nn.Linear(e, h), nn.Tanh(), nn.Linear(h, flat))
        else:
            self.embedding = nn.Embedding(n, flat)  # weight (N, L * 2 * K * D)

    def flat_prefixes(self) -> torch.Tensor:
        """All prefixes as one (N, L * 2 * K * D) matrix."""
        x = self.embedding.weight  # (N, E) or (N, L * 2 * K * D)
        return self.transform(x) if self.projection else x

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(key, value)] per layer, each (K, N, D)."""
        g = self.geometry
        n = self.num_virtual_tokens
        flat = self.flat_prefixes().view(n, g.num_layers * 2, g.num_kv_heads, g.head_dim)  # (N, 2L, K, D)
        kv = flat.permute(1, 2, 0, 3)  # (2L, K, N, D): peft's layout, layer-major then key/value
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(g.num_layers)]

    @torch.no_grad()
    def set_prefixes(self, prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store given per-layer (key, value) prefixes, each (K, N, D); only without projection.

        For example the cached keys and values of N real tokens: then the prefix acts exactly like
        those tokens written in front of the input (a prefix is a key/value cache of virtual tokens).
        """
        if self.projection:
            raise ValueError("set_prefixes needs a projection-free encoder; call collapse() first")
        g = self.geometry
        if len(prefixes) != g.num_layers:
            raise ValueError(f"prefixes must hold one (key, value) pair per layer, {g.num_layers}, got {len(prefixes)}")
        want = (g.num_kv_heads, self.num_virtual_tokens, g.head_dim)
        for k, v in prefixes:
            if tuple(k.shape) != want or tuple(v.shape) != want:
                raise ValueError(f"each prefix key/value must have shape (K, N, D) = {want}, got {tuple(k.shape)}")
        kv = torch.stack([t for pair in prefixes for t in pair])  # (2L, K, N, D)
        self.embedding.weight.copy_(kv.permute(2, 0, 1, 3).reshape(self.num_virtual_tokens, -1))  # (N, L*2*K*D)

    @torch.no_grad()
    def collapse(self) -> PrefixEncoder:
        """A projection-free encoder holding exactly the prefixes this one produces now."""
        config = PrefixConfig(num_virtual_tokens=self.num_virtual_tokens, projection=False)
        plain = PrefixEncoder(config, self.geometry).to(self.embedding.weight.device, self.embedding.weight.dtype)
        plain.embedding.weight.copy_(self.flat_prefixes())  # (N, L * 2 * K * D)
        return plain


def prefix_cache(model: nn.Module, prefixes: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """A key/value cache pre-filled with per-layer prefixes (K, N, D), for ``batch_size`` rows.

    llmlab's ``LLM`` gets a ``KVCache``; transformers models a ``DynamicCache``. Build a new one for
    every forward: the model appends the input's keys and values to it.
    """
    expanded = [
        (k[None].expand(batch_size, -1, -1, -1), v[None].expand(batch_size, -1, -1, -1)) for k, v in prefixes
    ]  # each (B, K, N, D)
    if is_llmlab_model(model):
        cache = model.new_cache()
        for i, (k, v) in enumerate(expanded):
            cache.update(i, k, v)
        return cache
    from transformers import DynamicCache

    return DynamicCache(expanded)


class PrefixModel(nn.Module):
    """A frozen model whose every attention layer also attends to N trainable key/value prefixes.

    forward(input_ids (B, T), attention_mask (B, T) or None, **kwargs) -> the model's output; logits
    are (B, T, V) (the prefix has keys and values but no output positions).

    >>> from llmlab.model import LLM, ModelConfig
    >>> base = LLM(ModelConfig.tiny(vocab_size=50))  # 2 layers, K = 2 key/value heads of D = 8
    >>> model = PrefixModel(base, PrefixConfig.p_tuning_v2(num_virtual_tokens=8))
    >>> model(torch.zeros(2, 5, dtype=torch.long)).logits.shape  # (B, T, V)
    torch.Size([2, 5, 50])
    >>> trainable_parameters(model) == 8 * 2 * 2 * 2 * 8  # N x layers x (key, value) x K x D
    True
    """

    def __init__(self, model: nn.Module, config: PrefixConfig) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, PrefixConfig):
            raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
        self.config = config
        self.base_model = model
        freeze(model)
        device = input_embedding(model).weight.device
        self.prompt_encoder = PrefixEncoder(config, ModelGeometry.of(model)).to(device)

    def collapse(self) -> None:
        """Replace the reparameterization MLP by the prefixes it produces (in place)."""
        self.prompt_encoder = self.prompt_encoder.collapse()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        check_tensor("input_ids", input_ids, ndim=2, layout="(B, T)")
        dtype = input_embedding(self.base_model).weight.dtype  # prefixes join the model's own keys/values
        prefixes = [(k.to(dtype), v.to(dtype)) for k, v in self.prompt_encoder()]  # each (K, N, D)
        cache = prefix_cache(self.base_model, prefixes, input_ids.shape[0])
        mask = _extend_front(attention_mask, self.config.num_virtual_tokens, 1)  # (B, N + T)
        if is_llmlab_model(self.base_model):
            return self.base_model(input_ids, cache=cache, attention_mask=mask, **kwargs)
        return self.base_model(input_ids=input_ids, past_key_values=cache, attention_mask=mask, **kwargs)
