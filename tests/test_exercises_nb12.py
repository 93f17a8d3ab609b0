"""llmlab.exercises.nb12: the soft-prompt-input and bottleneck-adapter checkers accept solutions written
from the definitions (not llmlab's reference), agree with llmlab's models, and reject each recognized
mistake, naming it."""

import torch

from llmlab.adapters import BottleneckAdapter
from llmlab.exercises import check_bottleneck_adapter, check_soft_prompt_inputs
from llmlab.model import LLM, ModelConfig
from llmlab.peft_utils import decoder_layers, input_embedding
from llmlab.prompt_tuning import PromptConfig, SoftPromptModel


def soft_prompt_inputs(inputs_embeds, attention_mask, labels, prompts):
    b, n = inputs_embeds.shape[0], prompts.shape[0]
    embeds = torch.cat([prompts.unsqueeze(0).repeat(b, 1, 1), inputs_embeds], dim=1)
    mask = torch.cat([torch.ones(b, n, dtype=attention_mask.dtype), attention_mask], dim=1)
    labels = torch.cat([torch.full((b, n), -100, dtype=labels.dtype), labels], dim=1)
    return embeds, mask, labels


def bottleneck_adapter(h, w_down, b_down, w_up, b_up):
    z = torch.clamp(h @ w_down.T + b_down, min=0)  # (B, T, m): ReLU in the bottleneck
    return h + z @ w_up.T + b_up  # (B, T, C)


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"soft_prompt_inputs": soft_prompt_inputs, "bottleneck_adapter": bottleneck_adapter}


def test_the_soft_prompt_solution_feeds_the_model_what_soft_prompt_model_feeds_it():
    torch.manual_seed(0)
    base = LLM(ModelConfig.tiny(vocab_size=50)).eval()
    model = SoftPromptModel(base, PromptConfig.prompt_tuning(num_virtual_tokens=4))
    emb = input_embedding(base)  # the token table the soft prompt model hooks
    ids = torch.randint(0, 50, (2, 6))  # (B, T)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # (B, T): row 0 left-padded
    embeds, full_mask, labels = soft_prompt_inputs(emb(ids), mask, ids, model.prompts())
    seen = {}
    first_block = decoder_layers(base)[0]  # its input is the embedded sequence the model really used
    handle = first_block.register_forward_pre_hook(lambda mod, args: seen.setdefault("embeds", args[0]))
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["embeds"], embeds, rtol=0, atol=0)
    assert full_mask[:, :4].eq(1).all() and labels[:, :4].eq(-100).all() and labels.shape == (2, 10)


def test_the_adapter_solution_equals_llmlab_bottleneck_adapter():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(16, 4)
    torch.nn.init.normal_(adapter.adapter_up.weight)  # up starts at zero; make it do something
    h = torch.randn(2, 3, 16)  # (B, T, C)
    with torch.no_grad():
        expected = adapter(h)
    got = bottleneck_adapter(h, adapter.adapter_down.weight.detach(), adapter.adapter_down.bias.detach(),
                             adapter.adapter_up.weight.detach(), adapter.adapter_up.bias.detach())
    torch.testing.assert_close(got, expected)


def test_an_unknown_wrong_answer_gets_the_general_hint():
    verdict = check_bottleneck_adapter(lambda h, *weights: h, seed=0, verbose=False)
    assert not verdict and "h + up(relu(down(h)))" in verdict.hint
    verdict = check_soft_prompt_inputs(lambda e, m, labels, p: (e, m, labels), seed=0, verbose=False)
    assert not verdict and "N times -100 in front" in verdict.hint
