"""Exercise checkers for notebook 20 Modern LLM designs: speculative decoding's accept/resample rule
and the KV cache of multi-head latent attention (MLA)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_mla_cache_elements", "check_speculative_accept"]


def _speculative_accept_reference(p: torch.Tensor, q: torch.Tensor, x: int) -> tuple[float, torch.Tensor]:
    from llmlab.speculative import residual_distribution

    # accept x with probability min(1, p(x)/q(x)) (llmlab.speculative.verify: u q(x) < p(x))
    return min(1.0, float(p[x] / q[x])), residual_distribution(p, q)  # (V,)


def _distribution(g: torch.Generator, v: int, spread: float) -> torch.Tensor:
    """A float64 distribution (V,) from softmax of random logits; spread sets how peaked it is."""
    return torch.softmax(spread * torch.randn(v, generator=g, dtype=torch.float64), dim=0)  # (V,)


def _speculative_cases(g: torch.Generator, trials: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    cases = []
    for i in range(max(trials, 2)):
        v = _randint(g, 4, 12)
        p, q = _distribution(g, v, 2.0), _distribution(g, v, 2.0)
        under = (p < q).nonzero().flatten()  # tokens the draft over-proposes: acceptance below 1
        over = (p >= q).nonzero().flatten()  # tokens the draft under-proposes: always accepted
        pool = under if i % 2 == 0 and len(under) else over if len(over) else under
        x = int(pool[_randint(g, 0, len(pool) - 1)])
        cases.append((p, q, x))
    return cases


def _as_accept_and_residual(out: object) -> object:
    """Accept a one-element tensor for the probability (min(1.0, p[x] / q[x]) gives one)."""
    if isinstance(out, tuple | list) and len(out) == 2 and isinstance(out[0], torch.Tensor) \
            and out[0].numel() == 1:
        return float(out[0]), out[1]
    return out


def check_speculative_accept(fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[float, torch.Tensor]],
                             trials: int = 6, seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(p, q, x) -> (acceptance probability of the drafted token x, the distribution (V,) to
    resample from if it is rejected): p and q (V,) are the target's and the draft's next-token
    distributions (float64), x a token the draft sampled from q."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")
    return _run("speculative_accept", lambda p, q, x: _as_accept_and_residual(fn(p, q, x)),
                _speculative_accept_reference, _speculative_cases(_generator(seed), trials),
                "accept x with probability min(1, p(x) / q(x)); after a rejection sample from "
                "max(0, p - q) divided by its sum", MISTAKES["speculative_accept"], rtol=1e-6, atol=1e-9,
                verbose=verbose)


def _accept(p, q, x):
    return min(1.0, float(p[x] / q[x]))


def _residual(p, q):
    excess = (p - q).clamp(min=0)  # (V,)
    return excess / excess.sum()


def _mla_cache_reference(config: dict) -> tuple[int, int]:
    from llmlab.mla import kv_cache_elements_per_token, mla_cache_elements_per_token

    mla = mla_cache_elements_per_token(1, config["kv_lora_rank"], config["qk_rope_head_dim"])
    mha = kv_cache_elements_per_token(1, config["num_attention_heads"], config["v_head_dim"])
    return mla, mha


def _mla_configs(g: torch.Generator, trials: int) -> list[tuple[dict]]:
    """Random DeepSeek-style attention sizes, named as in config.json (qk_nope_head_dim = v_head_dim,
    as in every DeepSeek-V2/V3 release)."""
    cases = []
    for _ in range(trials):
        d_h = [64, 128, 192][_randint(g, 0, 2)]
        cases.append(({"num_attention_heads": 2 ** _randint(g, 3, 7), "kv_lora_rank": 2 ** _randint(g, 7, 9),
                       "qk_nope_head_dim": d_h, "qk_rope_head_dim": [32, 64][_randint(g, 0, 1)],
                       "v_head_dim": d_h},))
    return cases


def check_mla_cache_elements(fn: Callable[[dict], tuple[int, int]], trials: int = 5, seed: int | None = None,
                             verbose: bool = True) -> Verdict:
    """fn(config) -> (MLA, MHA) numbers cached per token per layer. config holds DeepSeek's
    config.json fields num_attention_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and
    v_head_dim; the MHA baseline is the paper's (Table 1): the same heads, each caching a key and a
    value of width d_h = v_head_dim."""
    return _run("mla_cache_elements", fn, _mla_cache_reference, _mla_configs(_generator(seed), trials),
                "MLA caches the joint latent c_kv (kv_lora_rank) and one RoPE key shared by all heads "
                "(qk_rope_head_dim); MHA caches a key and a value per head: 2 x heads x v_head_dim",
                MISTAKES["mla_cache_elements"], verbose=verbose)


def _mha(c: dict) -> int:
    return 2 * c["num_attention_heads"] * c["v_head_dim"]


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "speculative_accept": {
        "ratio_not_clipped": (lambda p, q, x: (float(p[x] / q[x]), _residual(p, q)),
                              "a probability cannot exceed 1: accept with min(1, p(x) / q(x))"),
        "resample_from_p": (lambda p, q, x: (_accept(p, q, x), p),
                            "after a rejection, resample from norm(max(0, p - q)), not from p: the accepted "
                            "draft tokens already supply min(p, q), and sampling p again over-weights "
                            "them"),
        "not_clipped": (lambda p, q, x: (_accept(p, q, x), (p - q) / (p - q).sum()),
                        "clip the residual at 0 before normalizing: max(0, p - q); p - q has negative "
                        "entries and sums to 0"),
        "not_normalized": (lambda p, q, x: (_accept(p, q, x), (p - q).clamp(min=0)),
                           "divide max(0, p - q) by its sum so that it is a distribution"),
    },
    "mla_cache_elements": {
        "decompressed": (lambda c: (c["num_attention_heads"] * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
                                                                + c["v_head_dim"]), _mha(c)),
                         "MLA caches the latent c_kv and the shared RoPE key, not the per-head keys and values "
                         "they expand into at attention time (that would be more than MHA)"),
        "rope_key_per_head": (lambda c: (c["kv_lora_rank"] + c["num_attention_heads"] * c["qk_rope_head_dim"],
                                         _mha(c)),
                              "the decoupled RoPE key k_rope = RoPE(W_KR x) is one qk_rope_head_dim vector per "
                              "token shared by all heads; only the queries have a RoPE part per head"),
        "latent_twice": (lambda c: (2 * c["kv_lora_rank"] + c["qk_rope_head_dim"], _mha(c)),
                         "keys and values are both up-projected from one joint latent c_kv (the 'kv' in "
                         "kv_lora_rank): it is cached once"),
        "no_rope_key": (lambda c: (c["kv_lora_rank"], _mha(c)),
                        "the RoPE key cannot be rebuilt from the latent (RoPE depends on the position), so "
                        "it is cached beside c_kv: kv_lora_rank + qk_rope_head_dim"),
        "mha_keys_only": (lambda c: (c["kv_lora_rank"] + c["qk_rope_head_dim"], c["num_attention_heads"]
                                     * c["v_head_dim"]),
                          "MHA caches a key and a value for every head: 2 x heads x head dim"),
    },
}
