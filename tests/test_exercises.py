"""llmlab.exercises: every checker accepts a correct solution written from the formula (not the
package's reference) and rejects each plausible wrong one, naming it in the hint. The solutions of
notebooks 01-05, 08, 09, 11, 13 and 14's first exercises are here; the others are in
tests/test_exercises_nbXX.py, which also hold each module's own checks."""

import importlib
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlab import exercises as ex
from llmlab.exercises import nb01, nb13


def causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def prefix_lm(t, p):
    m = causal(t)
    m[:, :p] = True
    return m


def decoder_parameters(cfg):
    v, c, f, n = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * c // cfg["num_attention_heads"]
    layer = 2 * c * c + 2 * c * kv + 3 * c * f + 2 * c
    return v * c * (1 if cfg["tie_word_embeddings"] else 2) + n * layer + c


def pair_counts(ids):
    return dict(Counter(zip(ids, ids[1:], strict=False)))


def merge_pair(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def rope(x, positions, base):
    d = x.shape[-1]
    theta = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    ang = positions.double()[:, None] * theta  # (T, D/2)
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    out = torch.cat((x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()), dim=-1)
    return out.float()


def attention(q, k, v, causal_):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal_)


def rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def swiglu(x, wg, wu, wd):
    g = x @ wg.T
    return (g * torch.sigmoid(g) * (x @ wu.T)) @ wd.T


def top_p(probs, p):
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


def kv_cache_bytes(n_layer, n_head, n_kv_head, head_dim, seq_len, batch, nbytes):
    return 2 * n_layer * n_kv_head * head_dim * seq_len * batch * nbytes


def lora_merge(w, a, b, alpha, r):
    return w + alpha / r * b @ a


def mixed_precision_bytes(n, optimizer):
    return n * (2 + 2 + 4 + {"adamw": 8, "sgd_momentum": 4, "sgd": 0}[optimizer])


def loss_scale_update(scale, found_inf, good, interval):
    if found_inf:
        return scale / 2, 0
    good += 1
    return (scale * 2, 0) if good == interval else (scale, good)


def absmax_quantize(x, bits):
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max() / qmax
    return torch.round(x / scale).to(torch.int8), scale


def per_channel(w):
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).to(torch.int8), scale


SOLUTIONS = {
    "causal_mask": causal,
    "prefix_lm_mask": prefix_lm,
    "decoder_parameters": decoder_parameters,
    "pair_counts": pair_counts,
    "merge_pair": merge_pair,
    "rope": rope,
    "attention": attention,
    "rmsnorm": rmsnorm,
    "swiglu": swiglu,
    "top_p": top_p,
    "kv_cache_bytes": kv_cache_bytes,
    "lora_merge": lora_merge,
    "mixed_precision_bytes": mixed_precision_bytes,
    "loss_scale_update": loss_scale_update,
    "absmax_quantize": absmax_quantize,
    "per_channel_quantize": per_channel,
}


def _all_solutions() -> dict:
    """The solutions above and those of every tests/test_exercises_nbXX.py (one per notebook module)."""
    solutions = dict(SOLUTIONS)
    for path in sorted(Path(__file__).parent.glob("test_exercises_nb*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        assert not set(module.SOLUTIONS) & set(solutions), f"{path.name} repeats an exercise"
        solutions.update(module.SOLUTIONS)
    return solutions


ALL_SOLUTIONS = _all_solutions()


def test_every_checker_has_a_solution_and_at_least_two_mistakes():
    checkers = {name[len("check_"):] for name in ex.__all__ if name.startswith("check_")}
    assert checkers == set(ALL_SOLUTIONS) == set(ex.MISTAKES)
    assert all(len(m) >= 2 for m in ex.MISTAKES.values())


@pytest.mark.parametrize("name", sorted(ALL_SOLUTIONS))
@pytest.mark.parametrize("seed", [0, 1, None])
def test_checker_accepts_a_correct_solution(name, seed, capsys):
    verdict = getattr(ex, f"check_{name}")(ALL_SOLUTIONS[name], seed=seed)
    assert verdict, str(verdict)
    assert capsys.readouterr().out.startswith(f"PASS [{name}] matches the reference on ")


MISTAKE_CASES = [(name, mistake) for name in sorted(ex.MISTAKES) for mistake in sorted(ex.MISTAKES[name])]


@pytest.mark.parametrize(("name", "mistake"), MISTAKE_CASES, ids=[f"{n}-{m}" for n, m in MISTAKE_CASES])
def test_checker_rejects_a_plausible_mistake_and_names_it(name, mistake):
    check = getattr(ex, f"check_{name}")  # every notebook module's checkers, not only those above
    wrong, why = ex.MISTAKES[name][mistake]
    for seed in (0, 1, 2):
        verdict = check(wrong, seed=seed, verbose=False)
        assert not verdict, f"{name} accepted the mistake {mistake!r} (seed {seed})"
        assert verdict.hint == why
        assert str(verdict).startswith(f"FAIL [{name}] ") and f"Hint: {why}" in str(verdict)


def test_a_learner_function_that_raises_is_a_failed_verdict_not_a_crash():
    def broken(t):
        raise NotImplementedError("todo")

    verdict = ex.check_causal_mask(broken, seed=0, verbose=False)
    assert not verdict and "raised NotImplementedError: todo" in verdict.message


def test_an_unknown_wrong_answer_gets_the_general_hint():
    verdict = ex.check_rmsnorm(lambda x, w, eps: x, seed=0, verbose=False)
    assert not verdict and "eps goes inside the square root" in verdict.hint


def test_fresh_inputs_without_a_seed_and_the_same_inputs_with_one():
    seen = []
    ex.check_causal_mask(lambda t: seen.append(t) or causal(t), trials=8, verbose=False)
    ex.check_causal_mask(lambda t: seen.append(t) or causal(t), trials=8, verbose=False)
    assert seen[:8] != seen[8:] or len(set(seen)) > 1
    fixed = []
    for _ in range(2):
        ex.check_causal_mask(lambda t: fixed.append(t) or causal(t), trials=6, seed=3, verbose=False)
    assert fixed[:6] == fixed[6:]


def test_the_learner_cannot_change_the_reference_inputs_in_place():
    def in_place(x, w, eps):
        y = rmsnorm(x, w, eps)
        x.zero_()
        return y

    assert ex.check_rmsnorm(in_place, seed=0, verbose=False)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(TypeError, match="fn must be the function to check"):
        ex.check_rope(42, seed=0)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        ex.check_rope(rope, seed="0")


def test_reference_decoder_count_equals_the_published_llama2_7b_total():
    from llmlab.reference_configs import load_reference_config

    ref = load_reference_config("llama-2-7b")
    fields = {k: ref.fields[k] for k in (*ex.LLAMA_FIELDS, "max_position_embeddings", "rms_norm_eps")
              if k in ref.fields}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("tie_word_embeddings", False)
    assert nb01._decoder_parameters_reference(fields) == decoder_parameters(fields) == 6_738_415_616
    assert math.isclose(nb13._mixed_precision_bytes_reference(10**9, "adamw") / 10**9, 16.0)
