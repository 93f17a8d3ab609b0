"""llmlab.exercises.nb11: the LoRA parameter-count checker accepts a count written from the shapes
(not llmlab's inject_lora), agrees with peft on a real model, and rejects each recognized mistake."""

import pytest

from llmlab.exercises import check_lora_parameters


def lora_parameters(hidden_size, intermediate_size, n_layer, n_head, n_kv_head, r, target_modules):
    kv = hidden_size // n_head * n_kv_head  # GQA: K and V have n_kv_head heads of head_dim
    shapes = {"q_proj": (hidden_size, hidden_size), "k_proj": (hidden_size, kv), "v_proj": (hidden_size, kv),
              "o_proj": (hidden_size, hidden_size), "gate_proj": (hidden_size, intermediate_size),
              "up_proj": (hidden_size, intermediate_size), "down_proj": (intermediate_size, hidden_size)}
    return n_layer * sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"lora_parameters": lora_parameters}


def test_the_solution_agrees_with_peft_on_a_transformers_llama():
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    targets = ("q_proj", "k_proj", "v_proj", "down_proj")
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=list(targets)))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == lora_parameters(32, 80, 2, 4, 2, 4, targets)


def test_an_unknown_wrong_answer_gets_the_general_hint():
    verdict = check_lora_parameters(lambda *args: 0, seed=0, verbose=False)
    assert not verdict and "r * (in + out)" in verdict.hint
