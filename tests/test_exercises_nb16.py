"""llmlab.exercises.nb16 (notebook 16): the SFT-label and packing checkers accept correct solutions
written from the definitions (not llmlab.sft) and reject each listed mistake, naming it."""

import pytest
import torch

from llmlab import exercises as ex


def sft_labels(prompt_ids, response_ids, eos_id):
    seq = torch.cat([prompt_ids, response_ids, torch.tensor([eos_id])])
    labels = seq.clone()
    labels[: len(prompt_ids)] = -100  # no loss on the prompt
    return seq[:-1], labels[1:]


def packing(lengths):
    t = sum(lengths)
    doc = torch.tensor([d for d, n in enumerate(lengths) for _ in range(n)])
    positions = torch.tensor([i for n in lengths for i in range(n)])
    mask = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    return positions, mask


@pytest.mark.parametrize("seed", [0, 1, None])
def test_sft_labels_accepts_prompt_masking(seed, capsys):
    assert ex.check_sft_labels(sft_labels, seed=seed)
    assert capsys.readouterr().out.startswith("PASS [sft_labels] matches the reference on 5 fresh inputs")


@pytest.mark.parametrize("seed", [0, 1, None])
def test_packing_accepts_a_block_diagonal_causal_mask(seed, capsys):
    assert ex.check_packing(packing, seed=seed)
    assert capsys.readouterr().out.startswith("PASS [packing] matches the reference on 5 fresh inputs")


@pytest.mark.parametrize("name", ["sft_labels", "packing"])
def test_each_checker_names_at_least_two_mistakes_and_rejects_them(name):
    mistakes = ex.MISTAKES[name]
    assert len(mistakes) >= 2
    for wrong, why in mistakes.values():
        for seed in (0, 1, 2):
            verdict = getattr(ex, f"check_{name}")(wrong, seed=seed, verbose=False)
            assert not verdict and verdict.hint == why


def test_sft_labels_reference_is_llmlab_sft_example_on_a_rendered_chat():
    # the default template with the character tokenizer: prompt "Q ...\nA ", response, eos "\n"
    from llmlab.exercises.nb16 import _sft_labels_reference
    from llmlab.sft import render_chat, sft_example
    from llmlab.tokenizer import CharTokenizer

    chat = [{"role": "user", "content": "Who ran?"}, {"role": "assistant", "content": "Tom."}]
    tok = CharTokenizer("".join(sorted(set(render_chat(chat)))))
    prompt = torch.tensor(tok.encode(render_chat(chat[:1], add_generation_prompt=True)))
    x, y = _sft_labels_reference(prompt, torch.tensor(tok.encode("Tom.")), tok.encode("\n")[0])
    want_x, want_y = sft_example(chat, tok)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert tok.decode([t for t in y.tolist() if t != -100]) == "Tom.\n"
