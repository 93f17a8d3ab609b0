"""Checkers for the exercises at the end of the notebooks.

Each ``check_*`` function runs the learner's function and llmlab's reference on fresh random
inputs (new shapes and values on every call unless ``seed`` is given), prints a verdict, and
returns it as a :class:`Verdict` (true when passed). When the answer is wrong, the checker
compares it with the mistakes people commonly make (RoPE with the wrong pairing, attention scaled
by the model width, ...) and names the one it matches in the hint.

The references are the package's own implementations (``llmlab.attention``, ``llmlab.positional``,
``llmlab.bpe``, ``llmlab.quantization``, ...), which the tests check against PyTorch and
transformers; the mistakes are written here so the tests can show that every checker rejects them.

>>> from llmlab.exercises import check_causal_mask
>>> v = check_causal_mask(lambda t: torch.ones(t, t, dtype=torch.bool).tril(), verbose=False)
>>> bool(v)
True
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "Verdict",
    "check_absmax_quantize",
    "check_attention",
    "check_causal_mask",
    "check_decoder_parameters",
    "check_kv_cache_bytes",
    "check_lora_merge",
    "check_loss_scale_update",
    "check_merge_pair",
    "check_mixed_precision_bytes",
    "check_pair_counts",
    "check_per_channel_quantize",
    "check_prefix_lm_mask",
    "check_rmsnorm",
    "check_rope",
    "check_swiglu",
    "check_top_p",
    "MISTAKES",
]


@dataclass(frozen=True)
class Verdict:
    """The result of one checker run; ``bool(verdict)`` is whether the learner's function passed."""

    exercise: str  # the checker's name, e.g. "rope"
    passed: bool
    message: str  # what was compared and what happened
    hint: str = ""  # what to look at when it failed

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} [{self.exercise}] {self.message}"
        return head if self.passed or not self.hint else f"{head}\nHint: {self.hint}"


def _generator(seed: int | None) -> torch.Generator:
    if seed is None:
        seed = int.from_bytes(os.urandom(7), "little")  # fresh inputs on every call
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def _same(got: object, expected: object, rtol: float, atol: float) -> bool:
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return False
        if expected.dtype == torch.bool or not expected.is_floating_point():
            return bool(torch.equal(got.to(expected.dtype), expected))
        return bool(torch.allclose(got.to(expected.dtype), expected, rtol=rtol, atol=atol))
    if isinstance(expected, tuple | list):
        return (isinstance(got, tuple | list) and len(got) == len(expected)
                and all(_same(a, b, rtol, atol) for a, b in zip(got, expected, strict=True)))
    if isinstance(expected, float):
        return isinstance(got, int | float) and math.isclose(got, expected, rel_tol=rtol, abs_tol=atol)
    return got == expected


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    if isinstance(value, tuple | list) and len(value) > 4:
        return f"{type(value).__name__} of length {len(value)}"
    return repr(value)


def _run(
    exercise: str,
    fn: Callable,
    reference: Callable,
    cases: Sequence[tuple],
    hint: str,
    mistakes: dict[str, tuple[Callable, str]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    verbose: bool = True,
) -> Verdict:
    """Compare fn with reference on every case; on the first difference, name a matching mistake."""
    if not callable(fn):
        raise TypeError(f"fn must be the function to check, got {type(fn).__name__}")
    verdict = None
    for i, args in enumerate(cases, start=1):
        expected = reference(*args)
        try:
            got = fn(*_copy(args))
        except Exception as err:  # the learner's code failing is a verdict, not a crash
            verdict = Verdict(exercise, False, f"raised {type(err).__name__}: {err} (input {i} of {len(cases)})",
                              hint)
            break
        if _same(got, expected, rtol, atol):
            continue
        found = hint
        for wrong, why in (mistakes or {}).values():
            try:
                if _same(got, wrong(*_copy(args)), rtol, atol):
                    found = why
                    break
            except Exception:  # a mistake that does not apply to these inputs
                continue
        verdict = Verdict(exercise, False, f"differs from the reference on input {i} of {len(cases)}: expected "
                          f"{_describe(expected)}, got {_describe(got)}", found)
        break
    if verdict is None:
        verdict = Verdict(exercise, True, f"matches the reference on {len(cases)} fresh inputs")
    if verbose:
        print(verdict)
    return verdict


def _copy(args: tuple) -> tuple:
    """Fresh copies, so a function that edits its input in place cannot change the reference's."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else list(a) if isinstance(a, list) else a for a in args)


# ----------------------------------------------------------------------------------------------
# 01 Architectures: masks and parameter counts


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


# ----------------------------------------------------------------------------------------------
# 02 Tokenization: the two steps of BPE training


def _random_ids(g: torch.Generator, n: int, alphabet: int) -> list[int]:
    return torch.randint(0, alphabet, (n,), generator=g).tolist()


def _pair_counts_reference(ids: list[int]) -> dict[tuple[int, int], int]:
    return dict(Counter(zip(ids, ids[1:], strict=False)))


def check_pair_counts(fn: Callable[[list[int]], dict], trials: int = 5, seed: int | None = None,
                      verbose: bool = True) -> Verdict:
    """fn(ids) -> {(a, b): count} over adjacent pairs, the statistic BPE merges by."""
    g = _generator(seed)
    cases = [(_random_ids(g, _randint(g, 5, 60), _randint(g, 2, 5)),) for _ in range(trials)]
    return _run("pair_counts", fn, lambda ids: _pair_counts_reference(ids), cases,
                "count every adjacent pair (ids[i], ids[i+1]), overlapping ones included",
                MISTAKES["pair_counts"], verbose=verbose)


def _merge_reference(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    from llmlab.bpe import _merge

    return _merge(list(ids), pair, new_id)


def check_merge_pair(fn: Callable[[list[int], tuple[int, int], int], list[int]], trials: int = 5,
                     seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(ids, pair, new_id) -> ids with every non-overlapping occurrence of pair, scanned left to
    right, replaced by new_id (one BPE merge)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        ids = _random_ids(g, _randint(g, 8, 40), 3)
        ids[2:5] = [1, 1, 1]  # a run where overlapping occurrences compete
        pair = (1, 1) if _randint(g, 0, 1) else (ids[0], ids[1])
        cases.append((ids, pair, 99))
    return _run("merge_pair", fn, _merge_reference, cases,
                "scan left to right; after replacing a pair, skip both of its tokens",
                MISTAKES["merge_pair"], verbose=verbose)


# ----------------------------------------------------------------------------------------------
# 03 RoPE, 04 attention


def _rope_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    from llmlab.positional import apply_rope, rope_cos_sin

    cos, sin = rope_cos_sin(positions, x.shape[-1], base)  # (T, D) each
    return apply_rope(x, cos, sin)  # (B, H, T, D)


def check_rope(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], trials: int = 5,
               seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, positions, base) -> x rotated by RoPE, x (B, H, T, D), positions (T,): channel i is
    paired with channel i + D/2 (the LLaMA / transformers layout) and pair i turns by p * base^(-2i/D)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        d = 2 * _randint(g, 2, 16)
        t = _randint(g, 2, 9)
        x = torch.randn(_randint(g, 1, 2), _randint(g, 1, 3), t, d, generator=g)  # (B, H, T, D)
        positions = torch.randint(0, 512, (t,), generator=g)  # (T,)
        cases.append((x, positions, float(10 ** _randint(g, 2, 5))))
    return _run("rope", fn, _rope_reference, cases,
                "cos/sin of p * base^(-2i/D) for i < D/2, applied as x*cos + rotate_half(x)*sin",
                MISTAKES["rope"], rtol=1e-3, atol=1e-3, verbose=verbose)


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from llmlab.attention import scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, T, D)


def check_attention(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor],
                    trials: int = 5, seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(q, k, v, causal) -> softmax(q k^T / sqrt(D) [+ causal mask]) v, all (B, H, T, D)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        shape = (_randint(g, 1, 2), _randint(g, 2, 4), _randint(g, 2, 9), 4 * _randint(g, 1, 8))
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))  # (B, H, T, D) each
        cases.append((q, k, v, bool(_randint(g, 0, 1)) or len(cases) == 0))
    return _run("attention", fn, _attention_reference, cases,
                "scale by 1/sqrt(D) with D the per-head dimension, softmax over the keys (last axis)",
                MISTAKES["attention"], verbose=verbose)


# ----------------------------------------------------------------------------------------------
# 05 RMSNorm and SwiGLU


def _rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from llmlab.norms import RMSNorm

    norm = RMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)  # (..., C)


def check_rmsnorm(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], trials: int = 5,
                  seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, weight, eps) -> x / sqrt(mean(x^2 over the last axis) + eps) * weight."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        c = _randint(g, 4, 32)
        x = 0.3 * torch.randn(_randint(g, 1, 3), _randint(g, 1, 5), c, generator=g) + 0.5  # (B, T, C)
        cases.append((x, torch.rand(c, generator=g) + 0.5, [1e-2, 1e-1, 0.3][_randint(g, 0, 2)]))
    return _run("rmsnorm", fn, _rmsnorm_reference, cases,
                "no mean subtraction and no bias; eps goes inside the square root", MISTAKES["rmsnorm"],
                verbose=verbose)


def _swiglu_reference(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    from llmlab.ffn import SwiGLUMLP

    mlp = SwiGLUMLP(x.shape[-1], w_gate.shape[0])
    with torch.no_grad():
        for layer, w in ((mlp.gate_proj, w_gate), (mlp.up_proj, w_up), (mlp.down_proj, w_down)):
            layer.weight.copy_(w)
        return mlp(x)  # (B, T, C)


def check_swiglu(fn: Callable[..., torch.Tensor], trials: int = 5, seed: int | None = None,
                 verbose: bool = True) -> Verdict:
    """fn(x, w_gate, w_up, w_down) -> down(SiLU(x W_gate^T) * (x W_up^T)); weights in nn.Linear's
    (out, in) layout: w_gate and w_up (F, C), w_down (C, F)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        c, f = _randint(g, 4, 16), _randint(g, 8, 40)
        x = torch.randn(_randint(g, 1, 2), _randint(g, 1, 5), c, generator=g)  # (B, T, C)
        cases.append((x, torch.randn(f, c, generator=g), torch.randn(f, c, generator=g),
                      torch.randn(c, f, generator=g)))
    return _run("swiglu", fn, _swiglu_reference, cases,
                "the gate branch goes through SiLU (x * sigmoid(x)); multiply it elementwise with the up branch",
                MISTAKES["swiglu"], verbose=verbose)


# ----------------------------------------------------------------------------------------------
# 08 top-p, 09 KV cache, 11 LoRA


def _top_p_reference(probs: torch.Tensor, p: float) -> torch.Tensor:
    from llmlab.decoding import top_p_filter

    return torch.softmax(top_p_filter(probs.log()[None], p), dim=-1)[0]  # (V,)


def check_top_p(fn: Callable[[torch.Tensor, float], torch.Tensor], trials: int = 5, seed: int | None = None,
                verbose: bool = True) -> Verdict:
    """fn(probs, p) -> the nucleus distribution: keep the smallest set of most likely tokens whose
    total probability reaches p, zero the rest, renormalize. probs (V,) sums to 1."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        probs = torch.softmax(2 * torch.randn(_randint(g, 5, 50), generator=g), dim=-1)  # (V,)
        cases.append((probs, [0.5, 0.8, 0.9, 0.95][_randint(g, 0, 3)]))
    return _run("top_p", fn, _top_p_reference, cases,
                "sort descending; keep a token while the probability before it is still below p",
                MISTAKES["top_p"], atol=1e-6, verbose=verbose)


def _kv_cache_bytes_reference(n_layer: int, n_head: int, n_kv_head: int, head_dim: int, seq_len: int,
                              batch: int, bytes_per_value: int) -> int:
    from llmlab.attention import kv_cache_bytes

    return kv_cache_bytes(n_layer, n_kv_head, head_dim, tokens=seq_len, batch_size=batch,
                          bytes_per_value=bytes_per_value)


def check_kv_cache_bytes(fn: Callable[..., int], trials: int = 5, seed: int | None = None,
                         verbose: bool = True) -> Verdict:
    """fn(n_layer, n_head, n_kv_head, head_dim, seq_len, batch, bytes_per_value) -> bytes of the KV
    cache of a decoder with grouped-query attention."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        n_kv = 2 ** _randint(g, 0, 3)
        cases.append((_randint(g, 1, 80), n_kv * 2 ** _randint(g, 1, 3), n_kv, 2 ** _randint(g, 5, 7),
                      _randint(g, 1, 32768), _randint(g, 1, 64), [1, 2, 4][_randint(g, 0, 2)]))
    return _run("kv_cache_bytes", fn, _kv_cache_bytes_reference, cases,
                "2 (K and V) x layers x KV heads x head dim x tokens x batch x bytes", MISTAKES["kv_cache_bytes"],
                verbose=verbose)


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


# ----------------------------------------------------------------------------------------------
# 13 memory and mixed precision, 14 quantization

MIXED_PRECISION_OPTIMIZERS = ("adamw", "sgd_momentum", "sgd")


def _mixed_precision_bytes_reference(n_params: int, optimizer: str) -> int:
    from llmlab.memory import _optimizer_bytes

    # fp16/bf16 weights (2) + fp16/bf16 gradients (2) + fp32 master weights (4) + optimizer state
    return 8 * n_params + _optimizer_bytes(optimizer, n_params)


def check_mixed_precision_bytes(fn: Callable[[int, str], int], trials: int = 5, seed: int | None = None,
                                verbose: bool = True) -> Verdict:
    """fn(n_params, optimizer) -> bytes of weights, gradients and optimizer state in mixed-precision
    training (activations excluded); optimizer is "adamw", "sgd_momentum" or "sgd"."""
    g = _generator(seed)
    cases = [(_randint(g, 10**6, 10**11), MIXED_PRECISION_OPTIMIZERS[i % 3]) for i in range(max(trials, 3))]
    return _run("mixed_precision_bytes", fn, _mixed_precision_bytes_reference, cases,
                "2 + 2 bytes for half-precision weights and gradients, 4 for the fp32 master copy, then "
                "the optimizer's fp32 state (AdamW: m and v)", MISTAKES["mixed_precision_bytes"], verbose=verbose)


def _loss_scale_reference(scale: float, found_inf: bool, good_steps: int, growth_interval: int):
    from llmlab.precision import DynamicLossScaler

    scaler = DynamicLossScaler(init_scale=scale, growth_interval=growth_interval)
    scaler.growth_tracker, scaler.found_inf = good_steps, found_inf
    return float(scaler.update()), scaler.growth_tracker


def check_loss_scale_update(fn: Callable[[float, bool, int, int], tuple[float, int]], trials: int = 8,
                            seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(scale, found_inf, good_steps, growth_interval) -> (new_scale, new_good_steps): dynamic loss
    scaling as torch.amp.GradScaler does it (backoff 0.5 on overflow, growth 2 after
    growth_interval overflow-free steps in a row)."""
    g = _generator(seed)
    cases = []
    for i in range(max(trials, 4)):
        interval = _randint(g, 2, 10)
        found_inf = i % 2 == 0
        good = interval - 1 if i % 4 == 1 else _randint(g, 0, interval - 1)
        cases.append((float(2 ** _randint(g, 4, 20)), found_inf, good, interval))
    return _run("loss_scale_update", fn, _loss_scale_reference, cases,
                "overflow: halve the scale and restart the count; otherwise count the step and double the "
                "scale when the count reaches growth_interval (then restart it)",
                MISTAKES["loss_scale_update"], verbose=verbose)


def _absmax_reference(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.quantization import absmax_quantize

    q, scale = absmax_quantize(x, bits=bits)
    return q, scale


def check_absmax_quantize(fn: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]], trials: int = 5,
                          seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(x, bits) -> (q, scale), symmetric per-tensor quantization: scale = max|x| / (2^(bits-1) - 1),
    q = round(x / scale) as integers."""
    g = _generator(seed)
    cases = [(torch.randn(_randint(g, 2, 8), _randint(g, 2, 8), generator=g) * 3, _randint(g, 3, 8))
             for _ in range(trials)]
    return _run("absmax_quantize", fn, _absmax_reference, cases,
                "the largest magnitude maps to 2^(bits-1) - 1 (127 for 8 bits); round to nearest",
                MISTAKES["absmax_quantize"], verbose=verbose)


def _per_channel_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.quantization import absmax_quantize

    return absmax_quantize(w, dim=1, bits=8)  # scale (out, 1)


def check_per_channel_quantize(fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], trials: int = 5,
                               seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(w) -> (q int8, scale (out, 1)): 8-bit absmax quantization of a weight (out, in) with one
    scale per output channel (row)."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        w = torch.randn(_randint(g, 3, 10), _randint(g, 3, 10), generator=g)  # (out, in)
        w = w * torch.logspace(-2, 1, w.shape[0]).unsqueeze(1)  # rows of very different ranges
        cases.append((w,))
    return _run("per_channel_quantize", fn, _per_channel_reference, cases,
                "one scale per row: the max over the input dimension (dim=1), kept as a column",
                MISTAKES["per_channel_quantize"], verbose=verbose)


# ----------------------------------------------------------------------------------------------
# The common mistakes each checker recognizes (and the tests prove it rejects).


def _rope_interleaved(x, positions, base):
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (D/2,)
    ang = positions.float()[:, None] * inv  # (T, D/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i+1): GPT-J / Meta's complex layout
    out = torch.stack((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), dim=-1)
    return out.flatten(-2)  # (B, H, T, D)


def _rope_half(x, positions, base, exponent_scale=1.0, sign=1.0):
    d = x.shape[-1]
    inv = base ** (-exponent_scale * torch.arange(0, d, 2, dtype=torch.float32) / d)  # (D/2,)
    ang = sign * positions.float()[:, None] * inv  # (T, D/2)
    cos, sin = torch.cat((ang.cos(), ang.cos()), -1), torch.cat((ang.sin(), ang.sin()), -1)  # (T, D)
    rot = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    return x * cos + rot * sin


def _attention_with_scale(q, k, v, causal, scale):
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, T)
    if causal:
        t = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2 :]
    return ids


def _merge_no_skip(ids, pair, new_id):
    out = []
    for i, tok in enumerate(ids):
        if i + 1 < len(ids) and (tok, ids[i + 1]) == tuple(pair):
            out.append(new_id)
        elif not (i > 0 and (ids[i - 1], tok) == tuple(pair)):
            out.append(tok)
    return out


def _top_p_exclusive(probs, p):
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) <= p  # drops the token that crosses p
    keep[0] = True
    out = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    return out / out.sum()


def _top_p_unnormalized(probs, p):
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < p
    return torch.zeros_like(probs).scatter(0, order, sorted_p * keep)


def _loss_scale_grow_always(scale, found_inf, good, interval):
    return (scale * 0.5, 0) if found_inf else (scale * 2.0, 0)


def _loss_scale_no_reset(scale, found_inf, good, interval):
    if found_inf:
        return scale * 0.5, good
    good += 1
    return (scale * 2.0, 0) if good >= interval else (scale, good)


def _absmax_wrong_levels(x, bits):
    scale = x.abs().max() / 2 ** (bits - 1)  # 128 levels for 8 bits: +max does not fit
    return torch.round(x / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8), scale


def _absmax_truncate(x, bits):
    scale = x.abs().max().clamp_min(torch.finfo(torch.float32).tiny) / (2 ** (bits - 1) - 1)
    return torch.trunc(x / scale).to(torch.int8), scale


def _absmax_of_max(x, bits):
    scale = x.max() / (2 ** (bits - 1) - 1)  # the largest value, not the largest magnitude
    return torch.round(x / scale).clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1).to(torch.int8), scale


def _per_tensor(w):
    from llmlab.quantization import absmax_quantize

    q, s = absmax_quantize(w, bits=8)
    return q, s.expand(w.shape[0], 1)


def _per_input_column(w):
    from llmlab.quantization import absmax_quantize

    return absmax_quantize(w, dim=0, bits=8)


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
    "pair_counts": {
        "skip_one": (lambda ids: dict(Counter(zip(ids, ids[2:], strict=False))),
                     "pairs are neighbours (i, i+1), not (i, i+2)"),
        "unique": (lambda ids: dict.fromkeys(zip(ids, ids[1:], strict=False), 1),
                   "count every occurrence, not only whether a pair occurs"),
    },
    "merge_pair": {
        "first_only": (_merge_first_only, "replace every occurrence, not only the first"),
        "no_skip": (_merge_no_skip, "after a merge, skip the second token of the pair before scanning on"),
    },
    "rope": {
        "interleaved": (_rope_interleaved,
                        "you paired channels (2i, 2i+1); LLaMA in transformers pairs i with i + D/2 (rotate_half)"),
        "exponent": (lambda x, pos, base: _rope_half(x, pos, base, exponent_scale=0.5),
                     "the frequency of pair i is base^(-2i/D): check the exponent"),
        "sign": (lambda x, pos, base: _rope_half(x, pos, base, sign=-1.0),
                 "you rotate by -p*w: the rotation is x*cos + rotate_half(x)*sin with rotate_half = (-x2, x1)"),
    },
    "attention": {
        "model_width": (lambda q, k, v, c: _attention_with_scale(q, k, v, c, 1 / math.sqrt(q.shape[1] * q.shape[3])),
                        "scale by 1/sqrt(d_k), the per-head dimension, not the model width H*D"),
        "no_scale": (lambda q, k, v, c: _attention_with_scale(q, k, v, c, 1.0),
                     "divide the scores by sqrt(D) before the softmax"),
        "no_mask": (lambda q, k, v, c: _attention_with_scale(q, k, v, False, 1 / math.sqrt(q.shape[-1])),
                    "with causal=True, mask the future keys with -inf before the softmax"),
    },
    "rmsnorm": {
        "layernorm": (lambda x, w, eps: F.layer_norm(x, x.shape[-1:], w, None, eps),
                      "that is LayerNorm: RMSNorm does not subtract the mean"),
        "eps_outside": (lambda x, w, eps: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w,
                        "eps goes inside the square root: sqrt(mean(x^2) + eps)"),
        "no_weight": (lambda x, w, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps),
                      "multiply by the learned weight (gain) at the end"),
    },
    "swiglu": {
        "silu_on_up": (lambda x, wg, wu, wd: (x @ wg.T * F.silu(x @ wu.T)) @ wd.T,
                       "SiLU goes on the gate branch (w_gate), not on the up branch"),
        "gelu": (lambda x, wg, wu, wd: (F.gelu(x @ wg.T) * (x @ wu.T)) @ wd.T,
                 "that is GeGLU: SwiGLU uses SiLU (Swish with beta = 1)"),
        "no_gate": (lambda x, wg, wu, wd: F.silu(x @ wg.T) @ wd.T,
                    "multiply the activated gate by the up projection before w_down"),
    },
    "top_p": {
        "exclusive": (_top_p_exclusive, "keep the token that makes the total reach p (the smallest set "
                                        "whose probability is >= p)"),
        "unnormalized": (_top_p_unnormalized, "renormalize the kept probabilities so they sum to 1"),
    },
    "kv_cache_bytes": {
        "query_heads": (lambda n_layer, h, k, d, t, b, nbytes: 2 * n_layer * h * d * t * b * nbytes,
                        "only the key/value heads are cached: n_kv_head, not n_head"),
        "keys_only": (lambda n_layer, h, k, d, t, b, nbytes: n_layer * k * d * t * b * nbytes,
                      "both K and V are cached: a factor of 2"),
    },
    "lora_merge": {
        "no_rank_division": (lambda w, a, b, alpha, r: w + alpha * (b @ a), "the scale is alpha / r, not alpha"),
        "unscaled": (lambda w, a, b, alpha, r: w + b @ a, "multiply B A by alpha / r"),
    },
    "mixed_precision_bytes": {
        "no_master": (lambda n, opt: 4 * n + _mixed_state(opt, n),
                      "mixed precision keeps an fp32 master copy of the weights: 4 more bytes per parameter"),
        "fp32_grads": (lambda n, opt: 10 * n + _mixed_state(opt, n),
                       "gradients are computed in half precision: 2 bytes per parameter"),
        "adam_everywhere": (lambda n, opt: 16 * n, "the optimizer state depends on the optimizer: AdamW keeps 2 "
                            "fp32 moments, SGD with momentum 1, plain SGD none"),
    },
    "loss_scale_update": {
        "grow_every_step": (_loss_scale_grow_always,
                            "grow only after growth_interval overflow-free steps in a row, not on every step"),
        "no_reset": (_loss_scale_no_reset, "an overflow restarts the count of good steps at 0"),
    },
    "absmax_quantize": {
        "levels": (_absmax_wrong_levels, "divide by 2^(bits-1) - 1 (127), not 2^(bits-1): the range is symmetric"),
        "truncate": (_absmax_truncate, "round to nearest, do not truncate toward zero"),
        "max_not_absmax": (_absmax_of_max, "use the largest magnitude max|x|, not the largest value"),
    },
    "per_channel_quantize": {
        "per_tensor": (_per_tensor, "one scale for the whole matrix is per-tensor: take the max per row"),
        "per_column": (_per_input_column,
                       "you took one scale per input column (dim=0); output channels are the rows (dim=1)"),
    },
}


def _mixed_state(optimizer: str, n: int) -> int:
    from llmlab.memory import _optimizer_bytes

    return _optimizer_bytes(optimizer, n)
