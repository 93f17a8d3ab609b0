"""llmlab.exercises.nb16 (notebook 16): the SFT-label and packing checkers accept correct solutions
written from the definitions (not llmlab.sft) and reject each listed mistake, naming it."""

import torch


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


# the solutions written from the formula; tests/test_exercises.py checks that each checker accepts
# its solution and rejects every mistake it lists
SOLUTIONS = {"sft_labels": sft_labels, "packing": packing}


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
