"""llmlab.memory: activation checkpointing changes memory and compute, never the loss or the gradients;
micro-batches with gradient accumulation give the gradient of the whole batch."""

from dataclasses import replace

import pytest
import torch

from llmlab.flash_attention import measure_peak_memory
from llmlab.memory import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    is_activation_checkpointing,
    split_micro_batches,
)
from llmlab.model import LLM, ModelConfig
from llmlab.train import accumulate_gradients

V = 40


def _model(**changes) -> LLM:
    torch.manual_seed(0)
    return LLM(replace(ModelConfig.tiny(vocab_size=V), **changes))


def _batch(b: int = 4, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (b, t), generator=g), torch.randint(0, V, (b, t), generator=g)


def _loss_and_grads(model: LLM, x, y, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = model(x, targets=y).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("changes", [{}, {"dropout": 0.1}, {"position": "learned", "norm": "layernorm", "ffn": "gelu"}])
def test_checkpointing_gives_the_same_loss_and_gradients(changes):
    model = _model(**changes).train()
    x, y = _batch()
    loss, grads = _loss_and_grads(model, x, y)
    enable_activation_checkpointing(model)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x, y)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


def _count_mlp_calls(model: LLM, fn) -> int:
    """How often the layers' feed-forward blocks run during fn() (the recomputation skips module hooks,
    so the count wraps the forward methods themselves)."""
    calls = []
    for layer in model.model.layers:
        plain = layer.mlp.forward
        layer.mlp.forward = lambda h, plain=plain: calls.append(1) or plain(h)
    try:
        fn()
    finally:
        for layer in model.model.layers:
            del layer.mlp.forward
    return len(calls)


def test_checkpointing_reruns_each_layer_forward_in_backward_only_when_training():
    model = enable_activation_checkpointing(_model()).train()
    x, y = _batch()
    n = model.config.n_layer
    assert _count_mlp_calls(model, lambda: model(x, targets=y).loss.backward()) == 2 * n  # forward + recompute
    with torch.no_grad():
        assert _count_mlp_calls(model, lambda: model(x)) == n  # no graph, nothing to recompute
    model.eval()
    assert _count_mlp_calls(model, lambda: model(x, targets=y).loss.backward()) == n  # eval mode: plain forward


def test_checkpointing_lowers_peak_memory():
    model = _model(n_layer=4, block_size=64, n_embd=64, n_head=4, n_kv_head=4, ffn_hidden=128).train()
    x, y = _batch(b=16, t=64)

    def step():
        model.zero_grad(set_to_none=False)  # gradient buffers exist before the call: only activations count
        model(x, targets=y).loss.backward()

    step()
    _, plain = measure_peak_memory(step)
    enable_activation_checkpointing(model)
    _, ckpt = measure_peak_memory(step)
    assert ckpt < 0.6 * plain, (plain, ckpt)


def test_disable_restores_the_plain_layers_and_outputs_are_unchanged():
    model = _model()
    x, _ = _batch()
    before = model(x).logits
    enable_activation_checkpointing(model)
    assert is_activation_checkpointing(model)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    assert set(model.state_dict()) == set(_model().state_dict())  # parameter names are untouched
    disable_activation_checkpointing(model)
    assert not is_activation_checkpointing(model)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_checkpointing_needs_an_llmlab_model():
    with pytest.raises(TypeError, match="model must be an llmlab.model.LLM"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_micro_batches_accumulate_to_the_gradient_of_the_whole_batch():
    model = _model()
    x, y = _batch(b=8)
    _, grads = _loss_and_grads(model, x, y)
    for k in (2, 4, 8):
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, split_micro_batches(x, y, k))
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_split_micro_batches_keeps_order_and_checks_sizes():
    x, y = _batch(b=6)
    parts = split_micro_batches(x, y, 3)
    assert [tuple(p[0].shape) for p in parts] == [(2, 16)] * 3
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="divisible by num_micro_batches=4"):
        split_micro_batches(x, y, 4)
    with pytest.raises(ValueError, match="y must have the shape of x"):
        split_micro_batches(x, y[:, :3], 2)
    with pytest.raises(ValueError, match="num_micro_batches must be an integer >= 1"):
        split_micro_batches(x, y, 0)
