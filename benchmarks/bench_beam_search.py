"""Beam search in llmlab vs transformers' ``generate`` on the same weights: same tokens, wall time.

The shipped model (``llmlab.checkpoint.load_pretrained()``) decodes a few prompts with beam search
(4 beams, 128 new tokens, no EOS, length_penalty 1.0, early_stopping False) twice: with
``llmlab.decoding.beam_search`` on the llmlab ``LLM`` and its ``KVCache``, and with
``model.generate(num_beams=4, do_sample=False)`` on the converted model
(``llmlab.interop.to_hf``, a ``LlamaForCausalLM``) and its ``DynamicCache``. Every output is
asserted equal token for token; then each side is timed over the prompts, alternating sides,
and the best of a few repeats is kept. The claim checked: llmlab takes at most 1.5x the time of
transformers.

    .venv/bin/python benchmarks/bench_beam_search.py

Output committed in benchmarks/results/bench_beam_search.txt (one CPU thread, as in the notebooks).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import transformers

from llmlab.decoding import GenerationConfig, beam_search
from llmlab.interop import to_hf

PROMPTS = ["Once upon a time", "The little dog", "She opened the door and", "In the morning the"]
MAX_RATIO = 1.5


def load_models(random_weights: bool):
    """(llmlab LLM, transformers twin, tokenizer); ``random_weights`` is for trying the script
    before a checkpoint exists."""
    if random_weights:
        from llmlab.model import LLM, ModelConfig
        from llmlab.tokenizer import CharTokenizer

        tokenizer = CharTokenizer.from_text("".join(PROMPTS) + " .,!?abcdefghijklmnopqrstuvwxyz")
        torch.manual_seed(0)
        model = LLM(ModelConfig.small(tokenizer.vocab_size)).eval()
    else:
        from llmlab.checkpoint import load_pretrained

        model, tokenizer = load_pretrained()
        model.eval()
    hf = to_hf(model).eval()
    hf.generation_config.eos_token_id = None  # no EOS: every run makes exactly 128 tokens
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = None
    return model, hf, tokenizer


def run_llmlab(model, ids, config):
    return beam_search(model, ids, config).sequences  # (R, T + L)


def run_hf(hf, ids, config):
    return hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=config.num_beams,
        max_new_tokens=config.max_new_tokens,
        length_penalty=config.length_penalty,
        early_stopping=config.early_stopping,
    )  # (R, T + L)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-weights", action="store_true", help="try the script without the checkpoint")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()  # the prompt + 128 tokens pass block_size; RoPE has no limit
    torch.set_num_threads(args.threads)
    model, hf, tokenizer = load_models(args.random_weights)
    config = GenerationConfig.beam(num_beams=4, max_new_tokens=128)
    print(f"model: {model.config}")
    print("decoding: num_beams=4, max_new_tokens=128, length_penalty=1.0, early_stopping=False, no EOS")
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats} repeats per prompt")
    prompts = [torch.tensor([tokenizer.encode(p)]) for p in PROMPTS]  # each (1, T)
    for ids in prompts:  # warm-up, and the equality check
        assert torch.equal(run_llmlab(model, ids, config), run_hf(hf, ids, config)), "outputs differ"
    print(f"outputs equal token for token on all {len(prompts)} prompts")
    best = {"llmlab": [float("inf")] * len(prompts), "transformers": [float("inf")] * len(prompts)}
    for _ in range(args.repeats):
        for i, ids in enumerate(prompts):
            best["llmlab"][i] = min(best["llmlab"][i], timed(run_llmlab, model, ids, config)[0])
            best["transformers"][i] = min(best["transformers"][i], timed(run_hf, hf, ids, config)[0])
    print(f"{'prompt':28s} {'llmlab s':>9s} {'hf s':>9s} {'ratio':>6s}")
    for p, a, b in zip(PROMPTS, best["llmlab"], best["transformers"], strict=True):
        print(f"{p!r:28s} {a:9.3f} {b:9.3f} {a / b:6.2f}")
    total_ours, total_hf = sum(best["llmlab"]), sum(best["transformers"])
    ratio = total_ours / total_hf
    print(f"total: llmlab {total_ours:.3f} s, transformers {total_hf:.3f} s")
    print(f"wall-time ratio llmlab / transformers = {ratio:.2f} (claim: <= {MAX_RATIO})")
    return 0 if ratio <= MAX_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
