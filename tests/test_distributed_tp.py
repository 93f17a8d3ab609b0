"""llmlab.parallel: Megatron-style tensor parallelism on 2 gloo processes equals the unsharded
llmlab.LLM (logits, loss, and every gradient, sliced)."""

import copy

import pytest
import torch

from llmlab import distributed as D


def _tp_worker(rank, world):
    from llmlab.model import LLM, ModelConfig
    from llmlab.parallel import TensorParallelAttention, TensorParallelMLP

    torch.manual_seed(0)
    full = LLM(ModelConfig.tiny(vocab_size=64))  # 4 query heads, 2 KV heads, F = 96
    tp = copy.deepcopy(full)
    for layer in tp.model.layers:
        layer.self_attn = TensorParallelAttention(layer.self_attn)
        layer.mlp = TensorParallelMLP(layer.mlp)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))  # (B, T+1)
    outs = [m(x[:, :-1], x[:, 1:]) for m in (full, tp)]
    for o in outs:
        o.loss.backward()
    h, d = 96 // world, 8
    errs = {"logits": (outs[0].logits - outs[1].logits).abs().max().item(),
            "loss": abs(outs[0].loss.item() - outs[1].loss.item())}
    rows = {"q": slice(rank * 2 * d, (rank + 1) * 2 * d), "kv": slice(rank * d, (rank + 1) * d),
            "f": slice(rank * h, (rank + 1) * h)}
    grad = 0.0
    for a, b in zip(full.model.layers, tp.model.layers, strict=True):
        pairs = [(a.self_attn.q_proj.weight.grad[rows["q"]], b.self_attn.local.q_proj.weight.grad),
                 (a.self_attn.k_proj.weight.grad[rows["kv"]], b.self_attn.local.k_proj.weight.grad),
                 (a.self_attn.v_proj.weight.grad[rows["kv"]], b.self_attn.local.v_proj.weight.grad),
                 (a.self_attn.o_proj.weight.grad[:, rows["q"]], b.self_attn.local.o_proj.weight.grad),
                 (a.mlp.gate_proj.weight.grad[rows["f"]], b.mlp.local.gate_proj.weight.grad),
                 (a.mlp.up_proj.weight.grad[rows["f"]], b.mlp.local.up_proj.weight.grad),
                 (a.mlp.down_proj.weight.grad[:, rows["f"]], b.mlp.local.down_proj.weight.grad),
                 (a.input_layernorm.weight.grad, b.input_layernorm.weight.grad)]
        grad = max(grad, *((p - q).abs().max().item() for p, q in pairs))
    emb = (full.model.embed_tokens.weight.grad - tp.model.embed_tokens.weight.grad).abs().max().item()
    errs.update(grad=grad, embed_grad=emb, scale=full.model.layers[0].mlp.up_proj.weight.grad.abs().max().item())
    return errs


def test_tensor_parallel_llm_equals_unsharded():
    out = D.launch(_tp_worker, 2, timeout=90.0)
    for o in out:
        assert o["logits"] < 1e-5 and o["loss"] < 1e-6
        assert o["grad"] < 1e-6 and o["embed_grad"] < 1e-6
        assert o["scale"] > 1e-4  # the gradients compared are not all zero


def _bad_split_worker(rank, world):
    from llmlab.ffn import SwiGLUMLP
    from llmlab.parallel import TensorParallelMLP

    TensorParallelMLP(SwiGLUMLP(8, 5))


def test_tensor_parallel_uneven_split_names_argument():
    with pytest.raises(ValueError, match="rank [01]: hidden=5 must be divisible by the world size 2"):
        D.launch(_bad_split_worker, 2, timeout=90.0)


def _pp_worker(rank, world):
    from llmlab.model import LLM, ModelConfig
    from llmlab.parallel import PipelineStage, bubble_fraction, gpipe_step, one_f_one_b_step

    torch.manual_seed(0)
    cfg = ModelConfig.tiny(vocab_size=64)
    full = LLM(ModelConfig(**{**cfg.__dict__, "n_layer": 4}))
    stage_model = copy.deepcopy(full)
    stage = PipelineStage(stage_model, world, rank)
    x = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(5))  # (B, T+1)
    loss, timeline = gpipe_step(stage, x[:, :-1], x[:, 1:], n_micro=4)
    ref = full(x[:, :-1], x[:, 1:]).loss
    ref.backward()
    names = dict(full.named_parameters())
    grad = 0.0
    for name, p in stage_model.named_parameters():
        if p.grad is not None:
            grad = max(grad, (p.grad - names[name].grad).abs().max().item())
    n_with_grad = sum(p.grad is not None for p in stage_model.parameters())
    # 1F1B on a fresh copy: same loss and gradients, at most (world - rank) micro-batches in flight
    model_1f1b = copy.deepcopy(full)
    model_1f1b.zero_grad(set_to_none=True)
    loss_1f1b, timeline_1f1b, peak = one_f_one_b_step(PipelineStage(model_1f1b, world, rank), x[:, :-1],
                                                      x[:, 1:], n_micro=4)
    grad_1f1b = 0.0
    for name, p in model_1f1b.named_parameters():
        if p.grad is not None:
            grad_1f1b = max(grad_1f1b, (p.grad - names[name].grad).abs().max().item())
    return {"loss": None if loss is None else abs(loss.item() - ref.item()), "grad": grad,
            "n_with_grad": n_with_grad, "bubble": bubble_fraction(timeline), "events": len(timeline),
            "loss_1f1b": None if loss_1f1b is None else abs(loss_1f1b.item() - ref.item()),
            "grad_1f1b": grad_1f1b, "peak_1f1b": peak,
            "order_1f1b": [e[:2] for e in timeline_1f1b]}


def test_gpipe_and_1f1b_equal_unsharded():
    out = D.launch(_pp_worker, 2, timeout=90.0)
    assert out[0]["loss"] is None and out[1]["loss"] < 1e-6
    for o in out:
        assert o["grad"] < 1e-6 and o["n_with_grad"] > 0 and o["events"] == 8
        assert 0.0 <= o["bubble"] < 1.0
    assert out[0]["n_with_grad"] == 1 + 2 * 9 and out[1]["n_with_grad"] == 2 * 9 + 2  # embed / norm, head
    # 1F1B: same loss and gradients; rank 0 holds 2 micro-batches at most (GPipe: all 4)
    assert out[0]["loss_1f1b"] is None and out[1]["loss_1f1b"] < 1e-6
    assert all(o["grad_1f1b"] < 1e-6 for o in out)
    assert [o["peak_1f1b"] for o in out] == [2, 1]
    assert out[1]["order_1f1b"] == [(k, i) for i in range(4) for k in "FB"]
    assert out[0]["order_1f1b"] == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2),
                                    ("B", 3)]


def test_pipeline_bad_arguments_name_them():
    from llmlab.model import LLM, ModelConfig
    from llmlab.parallel import PipelineStage, gpipe_step

    model = LLM(ModelConfig.tiny(vocab_size=64))  # 2 layers
    with pytest.raises(ValueError, match=r"n_stages must be in \[1, n_layer=2\], got 3"):
        PipelineStage(model, 3, 0)
    stage = PipelineStage(model, 1, 0)
    x = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="n_micro must divide the batch size 3, got 2"):
        gpipe_step(stage, x, x, n_micro=2)
    from llmlab.parallel import one_f_one_b_step

    with pytest.raises(ValueError, match="n_micro must divide the batch size 3, got 2"):
        one_f_one_b_step(stage, x, x, n_micro=2)
