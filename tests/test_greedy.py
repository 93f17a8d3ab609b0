"""llmlab.greedy: the cached and uncached greedy loops give the tokens of llmlab.decoding's
greedy_search (itself tested equal to transformers' generate in test_decoding.py) and reject bad input."""

import pytest
import torch

from llmlab.decoding import GenerationConfig, greedy_search
from llmlab.greedy import greedy_with_cache, greedy_without_cache
from llmlab.model import LLM, ModelConfig


def tiny(seed=0):
    torch.manual_seed(seed)
    return LLM(ModelConfig.tiny(vocab_size=37)).eval()


def test_cached_and_uncached_loops_equal_greedy_search():
    model = tiny()
    prompt = torch.randint(0, 37, (3, 6), generator=torch.Generator().manual_seed(1))
    times = {"cache": [], "no cache": []}
    cached = greedy_with_cache(model, prompt, 20, times["cache"])
    full = greedy_without_cache(model, prompt, 20, times["no cache"])
    reference = greedy_search(model, prompt, GenerationConfig.greedy(max_new_tokens=20)).sequences
    assert torch.equal(cached, full) and torch.equal(cached, reference)
    assert torch.equal(cached[:, :6], prompt) and cached.shape == (3, 26)
    assert len(times["cache"]) == len(times["no cache"]) == 20 and min(times["cache"]) > 0


def test_loops_leave_grad_mode_alone_and_reject_bad_input():
    model = tiny()
    greedy_with_cache(model, torch.tensor([[1, 2]]), 3)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for fn in (greedy_with_cache, greedy_without_cache):
        with pytest.raises(ValueError, match="prompt must have 2 dimensions"):
            fn(model, torch.tensor([1, 2]), 3)
        with pytest.raises(TypeError, match="prompt must hold integer token ids, got dtype torch.float32"):
            fn(model, torch.ones(1, 2), 3)
        with pytest.raises(ValueError, match="new_tokens"):
            fn(model, torch.tensor([[1, 2]]), 0)
