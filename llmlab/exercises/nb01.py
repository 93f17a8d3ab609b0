"""Exercise checkers for notebook 01 Architectures: masks and parameter counts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["LLAMA_FIELDS", "check_causal_mask", "check_decoder_parameters", "check_prefix_lm_mask"]


def _causal_reference(t: int) -> torch.Tensor:
    from llmlab.attention import causal_mask

    return causal_mask(t)  # (T, T) True = may attend


def check_causal_mask(fn: Callable[[int], torch.Tensor], trials: int = 5, seed: int | None = None,
                      verbose: bool = True) -> Verdict:
    """fn(T) -> (T, T) boolean mask, True where query t may attend to key s (s <= t)."""
    g = _generator(seed)
    cases = [(_randint(g, 2, 12),) for _ in range(trials)]
    mistakes = MISTAKES["causal_mask"]
    return _run("causal_mask", fn, _causal_reference, cases,
                "row t is query position t; it may see keys 0..t, itself included", mistakes, verbose=verbose)


def _prefix_reference(t: int, p: int) -> torch.Tensor:
    from llmlab.attention import prefix_lm_mask

    return prefix_lm_mask(t, p)  # (T, T)


def check_prefix_lm_mask(fn: Callable[[int, int], torch.Tensor], trials: int = 5, seed: int | None = None,
                         verbose: bool = True) -> Verdict:
    """fn(T, P) -> (T, T) boolean prefix-LM mask: every query sees the whole prefix of P tokens;
    after it, attention is causal."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        t = _randint(g, 3, 12)
        cases.append((t, _randint(g, 1, t - 1)))
    return _run("prefix_lm_mask", fn, _prefix_reference, cases,
                "columns 0..P-1 are visible from every row; the rest is the causal mask",
                MISTAKES["prefix_lm_mask"], verbose=verbose)


LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings")


def _random_llama_config(g: torch.Generator) -> dict:
    head_dim = 8 * _randint(g, 1, 16)
    n_kv = _randint(g, 1, 8)
    n_head = n_kv * _randint(g, 1, 4)
    return {"vocab_size": _randint(g, 100, 200_000), "hidden_size": head_dim * n_head,
            "intermediate_size": 16 * _randint(g, 4, 800), "num_hidden_layers": _randint(g, 1, 96),
            "num_attention_heads": n_head, "num_key_value_heads": n_kv,
            "tie_word_embeddings": bool(_randint(g, 0, 1)), "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5}


def _decoder_parameters_reference(config: dict) -> int:
    from llmlab.param_count import Architecture, _llama_fields, count_parameters

    return count_parameters(Architecture(name="exercise", **_llama_fields(config))).total


def check_decoder_parameters(fn: Callable[[dict], int], trials: int = 5, seed: int | None = None,
                             verbose: bool = True) -> Verdict:
    """fn(config) -> total parameters of a LLaMA-style decoder (RMSNorm, SwiGLU, grouped-query
    attention, no biases) from a config dict with the published field names (LLAMA_FIELDS)."""
    g = _generator(seed)
    cases = [(_random_llama_config(g),) for _ in range(trials)]
    return _run("decoder_parameters", fn, _decoder_parameters_reference, cases,
                "sum: embedding V*C, per layer q/o (C*C each), k/v (C*K*D each), three SwiGLU matrices "
                "(3*C*F), two RMSNorm weights (2*C), a final norm C, and the output head V*C unless tied",
                MISTAKES["decoder_parameters"], verbose=verbose)


def _decoder_parameters_variant(config, mlp_matrices=3, gqa=True, lm_head=True):
    v, c, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    h, k = config["num_attention_heads"], config["num_key_value_heads"] if gqa else config["num_attention_heads"]
    d = c // h
    per_layer = 2 * c * c + 2 * c * k * d + mlp_matrices * c * f + 2 * c
    head = v * c if lm_head and not config["tie_word_embeddings"] else 0
    return v * c + config["num_hidden_layers"] * per_layer + c + head



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "causal_mask": {
        "future": (lambda t: torch.ones(t, t, dtype=torch.bool).triu(),
                   "your mask lets each query see the future and not the past: use the lower triangle"),
        "no_diagonal": (lambda t: torch.ones(t, t, dtype=torch.bool).tril(-1),
                        "a token may attend to itself: keep the diagonal"),
    },
    "prefix_lm_mask": {
        "causal_only": (lambda t, p: torch.ones(t, t, dtype=torch.bool).tril(),
                        "that is the causal mask: the prefix must be visible bidirectionally"),
        "prefix_rows_see_all": (
            lambda t, p: torch.ones(t, t, dtype=torch.bool).tril().index_fill(0, torch.arange(p), True),
            "prefix rows must not see the target part: open the prefix columns, not the prefix rows"),
    },
    "decoder_parameters": {
        "two_matrix_mlp": (lambda cfg: _decoder_parameters_variant(cfg, mlp_matrices=2),
                           "SwiGLU has three matrices (gate, up, down), not two"),
        "no_gqa": (lambda cfg: _decoder_parameters_variant(cfg, gqa=False),
                   "k_proj and v_proj map to num_key_value_heads * head_dim, not hidden_size"),
        "no_head": (lambda cfg: _decoder_parameters_variant(cfg, lm_head=False),
                    "an untied model has a separate output head of vocab_size * hidden_size"),
    },
}
