"""Exercise checkers for notebook 16 SFT and forgetting."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmlab.exercises._core import Verdict, _generator, _randint, _run

__all__ = ["check_packing", "check_sft_labels"]

IGNORE = -100  # llmlab.sft.IGNORE_INDEX, cross_entropy's default ignore_index


# --- SFT labels: loss on the response only -----------------------------------------------------------

_BASE = 0x4E00  # token id i <-> the character chr(_BASE + i), so llmlab.sft can render ids as text


class _IdTokenizer:
    """One character per token id, so that rendering and encoding round-trip any id sequence."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) - _BASE for c in text]


def _text(ids: torch.Tensor) -> str:
    return "".join(chr(_BASE + int(i)) for i in ids)


def _sft_labels_reference(prompt_ids: torch.Tensor, response_ids: torch.Tensor,
                          eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.sft import sft_example

    # A one-turn chat template whose generation prompt is the prompt's last token and whose
    # assistant turn ends with eos: llmlab.sft then trains exactly the response and its eos.
    head, eos = _text(prompt_ids[-1:]), _text(torch.tensor([eos_id]))
    template = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ m['content'] }}{%- else -%}"
                f"{{{{ '{head}' }}}}{{% generation %}}{{{{ m['content'] + '{eos}' }}}}{{% endgeneration %}}"
                "{%- endif -%}{%- endfor -%}"
                f"{{%- if add_generation_prompt -%}}{{{{ '{head}' }}}}{{%- endif -%}}")
    chat = [{"role": "user", "content": _text(prompt_ids[:-1])},
            {"role": "assistant", "content": _text(response_ids)}]
    return sft_example(chat, _IdTokenizer(), template)


def check_sft_labels(fn: Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                     trials: int = 5, seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(prompt_ids (P,), response_ids (R,), eos_id) -> (input_ids (T,), targets (T,)) for
    ``LLM(input_ids, targets)``: the sequence is prompt + response + eos, T = P + R; target t is
    token t + 1 where that token belongs to the response or is the eos, -100 elsewhere."""
    g = _generator(seed)
    cases = []
    for _ in range(trials):
        eos_id = _randint(g, 0, 50)
        prompt, response = (_token_ids(g, _randint(g, lo, hi), eos_id) for lo, hi in ((2, 12), (1, 10)))
        cases.append((prompt, response, eos_id))
    return _run("sft_labels", fn, _sft_labels_reference, cases,
                "input_ids = sequence[:-1]; labels = sequence with the prompt set to -100 (response and eos "
                "kept); targets = labels[1:], shifted once", MISTAKES["sft_labels"], verbose=verbose)


def _token_ids(g: torch.Generator, n: int, eos_id: int, vocab: int = 51) -> torch.Tensor:
    t = torch.randint(0, vocab - 1, (n,), generator=g)  # (n,) ids in [0, vocab - 2]
    return t + (t >= eos_id).long()  # skip the eos id


def _sft_wrong(prompt_ids, response_ids, eos_id, trained: str = "response", shift: int = 1):
    """The (input_ids, targets) of a labelling that trains ``trained`` and shifts by ``shift``."""
    seq = torch.cat([prompt_ids, response_ids, torch.tensor([eos_id])])  # (P + R + 1,)
    p = len(prompt_ids)
    span = {"response": slice(p, None), "prompt": slice(0, p), "response_without_eos": slice(p, -1)}[trained]
    labels = torch.full_like(seq, IGNORE)  # (P + R + 1,)
    labels[span] = seq[span]
    targets = torch.cat([labels, torch.full((2,), IGNORE)])[shift:shift + len(seq) - 1]  # (P + R,)
    return seq[:-1], targets


# --- packing: block-diagonal causal mask and restarted positions --------------------------------------


def _packing_reference(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from llmlab.sft import block_diagonal_mask, pack_examples

    examples = [(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)) for n in lengths]
    batch = pack_examples(examples, block_size=sum(lengths))  # exactly one full row, no padding
    return batch.position_ids[0], block_diagonal_mask(batch.doc_ids)[0, 0]  # (T,), (T, T)


def check_packing(fn: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]], trials: int = 5,
                  seed: int | None = None, verbose: bool = True) -> Verdict:
    """fn(lengths) -> (position_ids (T,), mask (T, T) bool) for documents of these lengths packed into
    one row of T = sum(lengths) tokens: positions restart at 0 in each document, and mask[i, j] is
    True where token i may attend to token j (earlier or same token of its own document)."""
    g = _generator(seed)
    cases = [([_randint(g, 2, 8) for _ in range(_randint(g, 2, 5))],) for _ in range(trials)]
    return _run("packing", fn, _packing_reference, cases,
                "a token attends to itself and earlier tokens of its own document only (block-diagonal and "
                "causal), and each document's positions count 0, 1, ... again", MISTAKES["packing"],
                verbose=verbose)


def _doc_ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # (T,)


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])  # (T,)


def _same_doc(lengths: list[int]) -> torch.Tensor:
    d = _doc_ids(lengths)
    return d[:, None] == d[None, :]  # (T, T)


def _causal(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()  # (T, T)


MISTAKES: dict[str, dict[str, tuple[Callable, str]]] = {
    "sft_labels": {
        "masked_the_response": (lambda p, r, e: _sft_wrong(p, r, e, trained="prompt"),
                                "mask the prompt, not the response: the loss is on what the assistant says"),
        "masked_the_eos": (lambda p, r, e: _sft_wrong(p, r, e, trained="response_without_eos"),
                           "keep the eos in the loss: a model never trained to emit it does not stop"),
        "shifted_twice": (lambda p, r, e: _sft_wrong(p, r, e, shift=2),
                          "shift once: target t is token t + 1, not t + 2"),
        "not_shifted": (lambda p, r, e: _sft_wrong(p, r, e, shift=0),
                        "LLM(input_ids, targets) takes targets already shifted: target t is token t + 1 "
                        "(transformers' labels=input_ids shifts inside the model instead)"),
    },
    "packing": {
        "causal_across_documents": (lambda ls: (_positions(ls), _causal(sum(ls))),
                                    "a plain causal mask lets a token attend to the documents packed before "
                                    "it: keep only pairs from the same document"),
        "positions_not_reset": (lambda ls: (torch.arange(sum(ls)), _same_doc(ls) & _causal(sum(ls))),
                                "positions restart at 0 in each document, as if it were alone in the row"),
        "not_causal_within_document": (lambda ls: (_positions(ls), _same_doc(ls)),
                                       "within a document the mask stays causal: no attending to later "
                                       "tokens"),
    },
}
