"""Exercise checkers for notebook 09 KV cache: its size."""

from __future__ import annotations

from collections.abc import Callable

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_kv_cache_bytes"]


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



MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "kv_cache_bytes": {
        "query_heads": (lambda n_layer, h, k, d, t, b, nbytes: 2 * n_layer * h * d * t * b * nbytes,
                        "only the key/value heads are cached: n_kv_head, not n_head"),
        "keys_only": (lambda n_layer, h, k, d, t, b, nbytes: n_layer * k * d * t * b * nbytes,
                      "both K and V are cached: a factor of 2"),
    },
}
