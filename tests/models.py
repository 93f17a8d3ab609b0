"""Tiny random models shared by the tests of the fine-tuning modules (LoRA, QLoRA, AdaLoRA, prompt
methods, adapters): one transformers Llama and one llmlab LLM of the same small shape."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmlab.model import LLM, ModelConfig


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, width-32 transformers Llama with GQA (4 query heads, 2 key/value heads), vocab 64."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llmlab(seed: int = 0) -> LLM:
    """llmlab's ModelConfig.tiny with the same vocabulary of 64."""
    torch.manual_seed(seed)
    return LLM(ModelConfig.tiny(vocab_size=64)).eval()
