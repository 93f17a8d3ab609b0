"""llmlab.memory: the estimator agrees with measurement (saved activations, retained bytes under
checkpointing, parameters/grads/optimizer state after a real step); activation checkpointing changes
memory and compute, never the loss or the gradients; micro-batches with gradient accumulation give
the gradient of the whole batch."""

from dataclasses import replace

import pytest
import torch

import llmlab.flash_attention
from llmlab.attention import kv_cache_bytes
from llmlab.lora import LoRAConfig, count_trainable_parameters, inject_lora
from llmlab.memory import (
    LORA_TARGETS,
    activation_bytes,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    held_state_bytes,
    inference_memory,
    is_activation_checkpointing,
    lora_parameters,
    measure_peak_memory,
    measure_retained_memory,
    measure_saved_activations,
    split_micro_batches,
    training_memory,
)
from llmlab.model import LLM, ModelConfig
from llmlab.param_count import Architecture
from llmlab.precision import MasterWeightOptimizer
from llmlab.train import accumulate_gradients
from tests.models import tiny_llmlab

V = 40


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
    model = tiny_llmlab(vocab_size=V, training=True, **changes)
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
    model = enable_activation_checkpointing(tiny_llmlab(vocab_size=V, training=True))
    x, y = _batch()
    n = model.config.n_layer
    assert _count_mlp_calls(model, lambda: model(x, targets=y).loss.backward()) == 2 * n  # forward + recompute
    with torch.no_grad():
        assert _count_mlp_calls(model, lambda: model(x)) == n  # no graph, nothing to recompute
    model.eval()
    assert _count_mlp_calls(model, lambda: model(x, targets=y).loss.backward()) == n  # eval mode: plain forward


def test_checkpointing_lowers_peak_memory():
    model = tiny_llmlab(
        vocab_size=V, training=True, n_layer=4, block_size=64, n_embd=64, n_head=4, n_kv_head=4, ffn_hidden=128
    )
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
    model = tiny_llmlab(vocab_size=V, training=True)
    x, _ = _batch()
    before = model(x).logits
    enable_activation_checkpointing(model)
    assert is_activation_checkpointing(model)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    untouched = tiny_llmlab(vocab_size=V, training=True)
    assert set(model.state_dict()) == set(untouched.state_dict())  # parameter names are untouched
    disable_activation_checkpointing(model)
    assert not is_activation_checkpointing(model)
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)


def test_checkpointing_needs_an_llmlab_model():
    with pytest.raises(TypeError, match="model must be an llmlab.model.LLM"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_micro_batches_accumulate_to_the_gradient_of_the_whole_batch():
    model = tiny_llmlab(vocab_size=V, training=True)
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


# ----------------------------------------------------------------------------------------------
# The estimator against measurement

CONFIGS = {  # each differs in one way that changes what is saved
    "llama_gqa": {},
    "mqa_manual_attention": {"n_kv_head": 1, "attn_impl": "manual"},
    "mha_wide_ffn": {"n_kv_head": 4, "ffn_hidden": 256, "n_layer": 2},
    "gpt2_family": {"position": "learned", "norm": "layernorm", "ffn": "gelu", "bias": True,
                    "tie_embeddings": True, "n_kv_head": 4},
}


def _config(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=96, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=160)
    return replace(base, **changes)


B, T = 4, 64  # T = block_size: the model's cached RoPE tables (at least 64 rows) are exactly the T rows saved


def _run(cfg: ModelConfig, dtype: torch.dtype, b: int = B, t: int = T):
    torch.manual_seed(0)
    model = LLM(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, cfg.vocab_size, (b, t), generator=g) for _ in range(2))
    return model, x, y


def _within(measured: int, estimate: int, rel: float = 0.05) -> bool:
    return abs(measured - estimate) <= rel * estimate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_activation_formula_matches_the_tensors_autograd_saves(name, dtype):
    cfg = _config(**CONFIGS[name])
    model, x, y = _run(cfg, dtype)
    _, saved = measure_saved_activations(lambda: model(x, targets=y).loss, exclude=model.parameters())
    est = activation_bytes(Architecture.from_model_config(cfg), B, T, dtype.itemsize,
                           fused_attention=cfg.attn_impl == "sdpa")
    assert _within(saved, est.saved), (saved, est.saved)
    if dtype == torch.float32 and cfg.norm == "rmsnorm":
        assert saved == est.saved  # counted tensor by tensor, so exact here


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_family"])
def test_activation_formula_with_lora_matches_measurement(name):
    cfg = _config(**CONFIGS[name])
    for dtype in (torch.float32, torch.bfloat16):
        model, x, y = _run(cfg, dtype)
        inject_lora(model, LoRAConfig(r=4, target_modules=LORA_TARGETS))
        arch = Architecture.from_model_config(cfg)
        assert count_trainable_parameters(model)[0] == lora_parameters(arch, 4)
        _, saved = measure_saved_activations(lambda: model(x, targets=y).loss, exclude=model.parameters())  # noqa: B023
        est = activation_bytes(arch, B, T, dtype.itemsize, lora_rank=4)
        assert _within(saved, est.saved), (dtype, saved, est.saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointing_formula_matches_the_bytes_a_forward_pass_leaves_behind(dtype):
    cfg = _config()
    model, x, y = _run(cfg, dtype)
    arch = Architecture.from_model_config(cfg)
    for ckpt in (False, True):
        (enable_activation_checkpointing if ckpt else disable_activation_checkpointing)(model)
        out, retained = measure_retained_memory(lambda: model(x, targets=y))
        logits = out.logits.numel() * out.logits.element_size() + 4  # outputs: logits and the loss
        # torch.utils.checkpoint keeps the CPU RNG state per layer (host memory, not activations)
        rng = cfg.n_layer * torch.get_rng_state().numel() if ckpt else 0
        est = activation_bytes(arch, B, T, dtype.itemsize, checkpointing=ckpt)
        assert _within(retained - logits - rng, est.saved), (ckpt, retained - logits - rng, est.saved)
        del out


def _one_step(model, x, y, optimizer) -> None:
    model(x, targets=y).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum", "sgd"])
def test_fp32_state_bytes_after_a_real_step_match_the_estimate(optimizer):
    cfg = _config()
    model, x, y = _run(cfg, torch.float32)
    opt = {"adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
           "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
           "sgd": lambda p: torch.optim.SGD(p, lr=1e-3)}[optimizer](model.parameters())
    _one_step(model, x, y, opt)
    held = held_state_bytes(model, opt)
    est = training_memory(model, B, T, optimizer=optimizer, precision="fp32")
    for key in ("weights", "gradients", "master_weights", "optimizer_state"):
        assert _within(held[key], getattr(est, key)), (key, held[key], getattr(est, key))
    assert held["weights"] == est.weights == 4 * model.num_parameters()


def test_mixed_precision_state_is_16_bytes_per_parameter_measured():
    cfg = _config()
    model, x, y = _run(cfg, torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), lr=1e-3)
    model(x, targets=y).loss.backward()
    opt.step()
    held = held_state_bytes(model, opt)  # the fp32 master gradients are freed inside step()
    est = training_memory(model, B, T, optimizer="adamw", precision="bf16_mixed")
    for key in ("weights", "gradients", "master_weights", "optimizer_state"):
        assert _within(held[key], getattr(est, key)), (key, held[key], getattr(est, key))
    n = model.num_parameters()
    assert (est.weights, est.gradients, est.master_weights, est.optimizer_state) == (2 * n, 2 * n, 4 * n, 8 * n)
    assert 15.9 < (held["total"]) / n < 16.1  # plus AdamW's 4-byte step counter per tensor


def test_sixteen_bytes_per_parameter_and_sharding():
    arch = Architecture.llama2_7b()
    n = 6_738_415_616  # count_parameters(LLaMA-2-7B), the model card's 6.7B
    for precision in ("fp32", "bf16_mixed"):
        m = training_memory(arch, 1, 1, precision=precision)
        assert m.weights + m.gradients + m.master_weights + m.optimizer_state == 16 * n
    plain = training_memory(arch, 1, 512)
    ddp = training_memory(arch, 1, 512, zero_stage=0, world_size=8)
    assert ddp == plain  # data parallelism alone keeps a full copy on every rank
    z1, z2, z3 = (training_memory(arch, 1, 512, zero_stage=s, world_size=8) for s in (1, 2, 3))
    assert z1.optimizer_state == plain.optimizer_state // 8 and z1.gradients == plain.gradients
    assert z2.gradients == plain.gradients // 8 and z2.weights == plain.weights
    assert z3.weights == plain.weights // 8 and z3.activations == plain.activations
    eight_bit = training_memory(arch, 1, 512, optimizer="adamw_8bit")
    assert 2 * n < eight_bit.optimizer_state < 2.01 * n
    off = training_memory(arch, 1, 512, offload_optimizer=True)
    assert off.optimizer_state == off.master_weights == 0 and off.offloaded == 12 * n


def test_lora_and_qlora_memory():
    arch = Architecture.from_model_config(ModelConfig.small(vocab_size=65))
    assert lora_parameters(arch, 16) == 157696  # notebook 11's LoRA r=16 on the small model (all 7 linears)
    full = training_memory(arch, 8, 128, precision="fp32")
    lora = training_memory(arch, 8, 128, precision="fp32", lora_rank=16)
    qlora = training_memory(arch, 8, 128, precision="fp32", lora_rank=16, qlora=True)
    assert lora.gradients + lora.optimizer_state == 12 * 157696
    assert qlora.weights < lora.weights / 3 and qlora.activations == lora.activations < full.activations


def test_inference_memory_is_weights_plus_kv_cache():
    arch = Architecture.llama2_70b()
    m = inference_memory(arch, 4, 4096, precision="int8")
    assert m["kv_cache"] == kv_cache_bytes(80, 8, 128, 4096, 4, 2)
    assert m["weights"] == 68_976_648_192 and m["total"] == m["weights"] + m["kv_cache"]
    nf4, int4 = (inference_memory(arch, 1, 1, precision=p)["weights"] for p in ("nf4", "int4"))
    assert int4 < nf4 < 1.04 * int4  # 4.127 bits per weight with double quantization


def test_estimator_rejects_bad_input():
    arch = Architecture.llama2_7b()
    with pytest.raises(ValueError, match="optimizer must be one of"):
        training_memory(arch, 1, 8, optimizer="adam16")
    with pytest.raises(ValueError, match="precision must be one of"):
        training_memory(arch, 1, 8, precision="int8")
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3, got 4"):
        training_memory(arch, 1, 8, zero_stage=4)
    with pytest.raises(ValueError, match="qlora=True needs a lora_rank"):
        training_memory(arch, 1, 8, qlora=True)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        training_memory(arch, 0, 8)
    with pytest.raises(TypeError, match="arch_or_model must be an Architecture"):
        training_memory("llama", 1, 8)
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_memory(arch, 1, 8, precision="fp8")
    with pytest.raises(ValueError, match="n_experts must be 1"):
        activation_bytes(Architecture.mixtral_8x7b(), 1, 8)


def test_measure_peak_memory_has_one_home():
    # it moved to llmlab.memory; flash_attention no longer re-exports it (that import closed a
    # cycle model -> flash_attention -> memory -> model)
    assert not hasattr(llmlab.flash_attention, "measure_peak_memory")
    assert measure_peak_memory.__module__ == "llmlab.memory"
    _, peak = measure_peak_memory(lambda: torch.zeros(256).exp())
    assert peak == 2048  # the zeros and their exp exist together
    _, kept = measure_retained_memory(lambda: torch.zeros(256).exp())
    assert kept == 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_agrees_with_the_estimate():
    cfg = _config(n_embd=256, n_head=8, n_kv_head=4, ffn_hidden=704)
    model, x, y = _run(cfg, torch.float32, b=8, t=64)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    out, retained = measure_retained_memory(lambda: model(x, targets=y), device="cuda")
    logits = out.logits.numel() * 4
    est = activation_bytes(Architecture.from_model_config(cfg), 8, 64, 4)
    assert _within(retained - logits, est.saved), (retained - logits, est.saved)
