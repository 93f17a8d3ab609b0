"""llmlab: small, tested PyTorch implementations behind the llmlab interview notebooks.

Each module implements one concept and names the paper and the reference implementation it is
checked against. Shape letters used in every shape comment are defined in ``llmlab.shapes``.
Modules that need transformers or peft import them inside their functions, so ``import llmlab``
needs only torch and numpy.

    >>> import llmlab
    >>> model, tokenizer = llmlab.load_pretrained()   # the shipped tiny model, no network
"""

from llmlab import (
    adalora,
    adapters,
    alignment,
    attention,
    bpe,
    checkpoint,
    data,
    decoding,
    distributed,
    encoder,
    ffn,
    flash_attention,
    flops,
    gptq,
    interop,
    lora,
    memory,
    metrics,
    model,
    moe,
    norms,
    notebook,
    optim,
    paged_attention,
    param_count,
    peft_domain,
    peft_utils,
    positional,
    precision,
    prompt_tuning,
    quantization,
    reference_configs,
    retrieval,
    sft,
    shapes,
    tokenizer,
    train,
    vocab_expansion,
    wordpiece,
)
from llmlab.checkpoint import load_pretrained
from llmlab.model import LLM, ModelConfig
from llmlab.notebook import setup as setup_notebook

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ModelConfig",
    "__version__",
    "adalora",
    "adapters",
    "alignment",
    "attention",
    "bpe",
    "checkpoint",
    "data",
    "decoding",
    "distributed",
    "encoder",
    "ffn",
    "flash_attention",
    "flops",
    "gptq",
    "interop",
    "load_pretrained",
    "lora",
    "memory",
    "metrics",
    "model",
    "moe",
    "norms",
    "notebook",
    "optim",
    "paged_attention",
    "param_count",
    "peft_domain",
    "peft_utils",
    "positional",
    "precision",
    "prompt_tuning",
    "quantization",
    "reference_configs",
    "retrieval",
    "setup_notebook",
    "sft",
    "shapes",
    "tokenizer",
    "train",
    "vocab_expansion",
    "wordpiece",
]
