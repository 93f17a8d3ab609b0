"""llmlab.exercises.nb20: the speculative-decoding accept/resample and MLA cache-size checkers accept
solutions written from the formulas (not llmlab's reference) and reject each recognized mistake,
naming it."""

import pytest
import torch

from llmlab.exercises import check_mla_cache_elements, check_speculative_accept
from llmlab.reference_configs import load_reference_config
from llmlab.speculative import emitted_distribution


def speculative_accept(p, q, x):
    accept = torch.clamp(p[x] / q[x], max=1.0)  # a one-element tensor: the checker takes it
    excess = torch.relu(p - q)
    return accept, excess / excess.sum()


def speculative_accept_floats(p, q, x):
    excess = [max(0.0, a - b) for a, b in zip(p.tolist(), q.tolist(), strict=True)]
    return min(1.0, p[x].item() / q[x].item()), torch.tensor(excess, dtype=torch.float64) / sum(excess)


def mla_cache_elements(config):
    mla = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    mha = 2 * config["num_attention_heads"] * config["v_head_dim"]
    return mla, mha


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"speculative_accept": speculative_accept, "mla_cache_elements": mla_cache_elements}


def test_a_float_acceptance_and_a_tensor_acceptance_both_pass():
    assert check_speculative_accept(speculative_accept_floats, seed=3, verbose=False)
    assert check_speculative_accept(speculative_accept, seed=3, verbose=False)


def test_the_accept_rule_emits_the_target_distribution():
    # the solution's two parts, composed over every draft token, give back p (the theorem)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2 * torch.randn(7, generator=g, dtype=torch.float64), 0)  # (V,)
    q = torch.softmax(2 * torch.randn(7, generator=g, dtype=torch.float64), 0)  # (V,)
    emitted = torch.zeros(7, dtype=torch.float64)
    for x in range(7):
        a, r = speculative_accept_floats(p, q, x)
        emitted[x] += q[x] * a
        emitted += q[x] * (1 - a) * r
    torch.testing.assert_close(emitted, p, rtol=0, atol=1e-12)
    torch.testing.assert_close(emitted_distribution(p, q), p, rtol=0, atol=1e-12)


def test_the_mla_solution_on_the_committed_deepseek_configs():
    # DeepSeek-V2 paper, Table 1: MLA caches (d_c + d_h^R) = 4.5 d_h per token and layer
    for name in ("deepseek-v2", "deepseek-v3"):
        f = load_reference_config(name).fields
        assert mla_cache_elements(f) == (576, 32768) and 576 == 4.5 * f["v_head_dim"]


def test_an_unrecognized_wrong_answer_gets_the_general_hint():
    verdict = check_speculative_accept(lambda p, q, x: (0.5, q), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("accept x with probability min(1, p(x) / q(x))")
    verdict = check_mla_cache_elements(lambda c: (1, 2), seed=0, verbose=False)
    assert not verdict and verdict.hint.startswith("MLA caches the joint latent c_kv")


def test_a_function_that_raises_is_a_failed_verdict():
    def stub(p, q, x):
        raise NotImplementedError("write your solution here")

    verdict = check_speculative_accept(stub, seed=0, verbose=False)
    assert not verdict and "raised NotImplementedError" in verdict.message


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match="fn must be the function to check"):
        check_speculative_accept(42, seed=0)
