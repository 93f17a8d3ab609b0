"""Exercise checkers for notebook 11 LoRA: merging an adapter, and counting its parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_lora_merge", "check_lora_parameters"]


def _lora_merge_reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, r: int):
    return w + (alpha / r) * (b @ a)  # (out, in): W + (alpha / r) B A, Hu et al. 2021 section 4.1


def check_lora_merge(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                     verbose: bool = True) -> Verdict:
    """fn(W, A, B, alpha, r) -> the merged weight; W (out, in), A (r, in), B (out, r)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        out_f, in_f, r = _randint(g, 4, 24), _randint(g, 4, 24), 2 ** _randint(g, 0, 3)
        cases.append((torch.randn(out_f, in_f, generator=g), torch.randn(r, in_f, generator=g),
                      torch.randn(out_f, r, generator=g), float(2 ** _randint(g, 0, 6)), r))
    return _run("lora_merge", fn, _lora_merge_reference, cases,
                "the update is B A (out x r times r x in), scaled by alpha / r", MISTAKES["lora_merge"],
                verbose=verbose)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_parameters_reference(hidden_size: int, intermediate_size: int, n_layer: int, n_head: int,
                               n_kv_head: int, r: int, target_modules: tuple[str, ...]) -> int:
    """Build llmlab's LLaMA-style LLM with these sizes on the meta device, wrap the targets with
    inject_lora and count what is trainable."""
    from llmlab.lora import LoRAConfig, inject_lora
    from llmlab.model import LLM, ModelConfig
    from llmlab.peft_utils import trainable_parameters

    config = ModelConfig(vocab_size=8, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=hidden_size,
                         ffn_hidden=intermediate_size)
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = inject_lora(LLM(config), LoRAConfig(r=r, alpha=2.0 * r, target_modules=target_modules))
    return trainable_parameters(model)


def check_lora_parameters(fn: Callable[..., int], trials: int = 5, seed: int | None = None,
                          verbose: bool = True) -> Verdict:
    """fn(hidden_size, intermediate_size, n_layer, n_head, n_kv_head, r, target_modules) -> the number
    of trainable LoRA parameters in a LLaMA-style decoder (q/k/v/o attention projections with
    grouped-query attention, gate/up/down SwiGLU MLP, no biases); target_modules is a tuple of
    projection names such as ("q_proj", "v_proj")."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        n_kv = 2 ** _randint(g, 0, 2)
        n_head = n_kv * 2 ** _randint(g, 1, 2)  # always GQA: k_proj and v_proj are narrower than q_proj
        hidden = n_head * 2 ** _randint(g, 3, 5)
        extra = [name for name in PROJECTIONS if name != "v_proj" and _randint(g, 0, 1)]
        targets = tuple(name for name in PROJECTIONS if name in extra or name == "v_proj")
        cases.append((hidden, 8 * _randint(g, 4, 48), _randint(g, 1, 6), n_head, n_kv, 2 ** _randint(g, 1, 4),
                      targets))
    return _run("lora_parameters", fn, _lora_parameters_reference, cases,
                "each adapted projection (out x in) adds A (r x in) and B (out x r): r * (in + out), in every "
                "layer", MISTAKES["lora_parameters"], verbose=verbose)


def _projection_shapes(hidden, intermediate, n_head, n_kv_head, gqa=True):
    kv = hidden // n_head * n_kv_head if gqa else hidden
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}  # name -> (in, out)


def _count(per_module, gqa=True):
    def count(hidden, intermediate, n_layer, n_head, n_kv_head, r, targets):
        shapes = _projection_shapes(hidden, intermediate, n_head, n_kv_head, gqa)
        return n_layer * sum(per_module(r, *shapes[name]) for name in targets)
    return count



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "lora_merge": {
        "no_rank_division": (lambda w, a, b, alpha, r: w + alpha * (b @ a), "the scale is alpha / r, not alpha"),
        "unscaled": (lambda w, a, b, alpha, r: w + b @ a, "multiply B A by alpha / r"),
    },
    "lora_parameters": {
        "no_gqa": (_count(lambda r, i, o: r * (i + o), gqa=False),
                   "with grouped-query attention k_proj and v_proj output n_kv_head * head_dim, not hidden_size"),
        "only_a": (_count(lambda r, i, o: r * i), "count both matrices: A is r x in and B is out x r"),
        "r_squared": (_count(lambda r, i, o: r * r),
                      "the adapter is two thin matrices r x in and out x r, not an r x r block"),
    },
}
