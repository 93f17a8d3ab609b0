"""llmlab.sft against transformers' apply_chat_template (same text, same ids, same assistant-token
mask from the template's generation tags) and against invariants: packing with per-document
boundaries gives the loss of training the documents one by one, packing without them does not."""

import random

import pytest
import torch
import torch.nn.functional as F
from jinja2.exceptions import TemplateError

import llmlab
from llmlab.sft import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    answer_accuracy,
    assistant_char_mask,
    block_diagonal_mask,
    check_template,
    encode_chat,
    finetune,
    freeze_except,
    hf_chat_tokenizer,
    pack_examples,
    packed_loss,
    render_chat,
    sft_batch,
    sft_example,
    story_qa,
    story_qa_dataset,
)

MODEL, TOK = llmlab.load_pretrained()
MODEL.eval()
HF = hf_chat_tokenizer(TOK)

CHATS = [
    [{"role": "user", "content": "Tom had a ball. Where did he go?"},
     {"role": "assistant", "content": "To the park."},
     {"role": "user", "content": "How did he feel?"},
     {"role": "assistant", "content": "He was happy."}],
    [{"role": "system", "content": "Answer in one line."},
     {"role": "user", "content": "Who had a kite?"},
     {"role": "assistant", "content": "Mia did."}],
    [{"role": "user", "content": "Hi?"}],
] + story_qa_dataset(3, seed=7, turns=3, max_chars=None)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_llmlab_rendering_equals_apply_chat_template(chat, gen):
    text = render_chat(chat, add_generation_prompt=gen)
    assert text == HF.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    hf_ids = HF.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
    assert TOK.encode(text) == list(hf_ids)


@pytest.mark.parametrize("chat", [c for c in CHATS if any(m["role"] == "assistant" for m in c)])
def test_loss_mask_equals_transformers_assistant_mask(chat):
    ids, labels = encode_chat(chat, TOK)
    out = HF.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"])
    assert [lab != IGNORE_INDEX for lab in labels] == [bool(m) for m in out["assistant_masks"]]


def test_every_assistant_turn_is_trained_and_nothing_else():
    assert HF.chat_template == CHAT_TEMPLATE
    ids, labels = encode_chat(CHATS[0], TOK)
    trained = TOK.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "To the park.\nHe was happy.\n"  # both turns, with their end-of-turn newline
    text, mask = assistant_char_mask(CHATS[0])
    assert text == "Q Tom had a ball. Where did he go?\nA To the park.\nQ How did he feel?\nA He was happy.\n"
    assert "".join(c for c, m in zip(text, mask, strict=True) if not m) == (
        "Q Tom had a ball. Where did he go?\nA Q How did he feel?\nA ")
    x, y = sft_example(CHATS[0], TOK)
    assert torch.equal(x, torch.tensor(ids[:-1])) and torch.equal(y, torch.tensor(labels[1:]))
    assert render_chat(CHATS[0][:3], add_generation_prompt=True).endswith("\nQ How did he feel?\nA ")


def test_bad_templates_and_messages():
    no_assistant = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="template has no assistant role"):
        check_template(no_assistant)
    with pytest.raises(ValueError, match="template has no assistant role"):
        encode_chat(CHATS[0], TOK, template=no_assistant)
    no_prompt = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="template adds no generation prompt"):
        hf_chat_tokenizer(TOK, no_prompt)
    with pytest.raises(TemplateError, match="unknown role: tool"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        render_chat([])
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict"):
        render_chat([{"role": "user", "content": "a"}, {"role": "assistant"}])
    with pytest.raises(TypeError, match="template must be a Jinja string"):
        render_chat(CHATS[0], template=None)
    with pytest.raises(TypeError, match="tokenizer must be an llmlab CharTokenizer"):
        hf_chat_tokenizer(object())


# --- packing ---------------------------------------------------------------------------------------


def test_block_diagonal_mask_by_hand():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1]])
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_diagonal_mask(doc_ids)[0, 0], want)


def test_packing_with_boundaries_equals_one_by_one_and_without_does_not():
    examples = [sft_example(c, TOK) for c in story_qa_dataset(6, seed=1, turns=1)]
    batch = pack_examples(examples, block_size=256)  # restarted positions stay below 128
    assert batch.input_ids.shape[0] < len(examples)  # several examples share a row
    assert sorted(set(batch.doc_ids.flatten().tolist()) - {-1}) == list(range(len(examples)))
    with torch.no_grad():
        total, count = 0.0, 0
        for x, y in examples:  # each document alone, positions from 0
            logits = MODEL(x[None]).logits[0]
            total += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((y != IGNORE_INDEX).sum())
        alone = total / count
        packed = packed_loss(MODEL, batch, boundaries=True).item()
        leaky = packed_loss(MODEL, batch, boundaries=False).item()
    assert packed == pytest.approx(alone, abs=1e-5)
    assert abs(leaky - alone) > 1e-3  # attending across documents changes the loss


def test_restarted_positions_matter_for_absolute_positions():
    torch.manual_seed(0)
    cfg = llmlab.ModelConfig.tiny(vocab_size=TOK.vocab_size)
    model = llmlab.LLM(llmlab.ModelConfig(**{**cfg.__dict__, "position": "learned"})).eval()
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, TOK.vocab_size, (n,), generator=g),
                 torch.randint(0, TOK.vocab_size, (n,), generator=g)) for n in (9, 14, 7)]
    batch = pack_examples(examples, block_size=32)
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=block_diagonal_mask(batch.doc_ids)).logits
        unrestarted = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=-100).item()
        restarted = packed_loss(model, batch).item()
        alone = [model(x[None], targets=y[None]).loss.item() for x, y in examples]
    n = [int((y != -100).sum()) for _, y in examples]
    assert restarted == pytest.approx(sum(a * k for a, k in zip(alone, n, strict=True)) / sum(n), abs=1e-5)
    assert abs(unrestarted - restarted) > 1e-4


def test_pack_examples_errors():
    x = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="examples is empty"):
        pack_examples([], 8)
    with pytest.raises(ValueError, match=r"examples\[0\] must be .* block_size=4"):
        pack_examples([(x, x)], 4)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        pack_examples([(x, x)], 0)


# --- the generated dataset -------------------------------------------------------------------------


def test_story_qa_dataset_is_reproducible_in_vocabulary_and_fits_the_context():
    data = story_qa_dataset(200, seed=0, turns=2)
    assert data == story_qa_dataset(200, seed=0, turns=2) and data != story_qa_dataset(200, seed=1, turns=2)
    vocab = set(TOK.chars)
    for chat in data:
        text = render_chat(chat)
        assert set(text) <= vocab and len(text) <= MODEL.config.block_size
        assert [m["role"] for m in chat] == ["user", "assistant"] * 2
    for seed in range(20):  # every answer is read off the story: its words are the story's words
        chat = story_qa(random.Random(seed), turns=5)
        story = chat[0]["content"].rsplit(".", 1)[0]
        words = {w.strip(".").lower() for w in story.split()} | {"a", "it", "was", "to"}
        for m in chat[1::2]:
            assert {w.strip(".").lower() for w in m["content"].split()} <= words, (story, m)
    with pytest.raises(ValueError, match="turns must be <= 5"):
        story_qa_dataset(2, turns=6)
    with pytest.raises(ValueError, match="max_chars=40 is too small"):
        story_qa_dataset(2, max_chars=40)


# --- training helpers ------------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Predicts the next character of ``text`` (shifted by ``offset``): a model with known accuracy."""

    def __init__(self, text, offset=0):
        super().__init__()
        self.ids, self.offset = TOK.encode(text), offset

    def forward(self, x):
        logits = torch.zeros(1, x.shape[1], TOK.vocab_size)
        logits[0, -1, self.ids[min(x.shape[1] + self.offset, len(self.ids) - 1)]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_answer_accuracy_scores_exact_greedy_answers():
    chat = CHATS[0]
    assert answer_accuracy(Oracle(render_chat(chat)), TOK, [chat]) == 1.0
    assert answer_accuracy(Oracle(render_chat(chat), offset=1), TOK, [chat]) == 0.0
    with pytest.raises(ValueError, match="no assistant turn"):
        answer_accuracy(Oracle("Q a\n"), TOK, [CHATS[2]])


def test_sft_batch_and_finetune_learn_the_answers_only():
    examples = [sft_example(c, TOK) for c in story_qa_dataset(8, seed=3)]
    x, y = sft_batch(examples[:3])
    assert x.shape == y.shape and x.shape[1] == max(len(e[0]) for e in examples[:3])
    assert (y[1, len(examples[1][1]):] == IGNORE_INDEX).all()
    torch.manual_seed(0)
    model = llmlab.LLM(llmlab.ModelConfig.tiny(vocab_size=TOK.vocab_size))
    n = freeze_except(model, ("model.layers.1.", "lm_head"))
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    frozen = model.model.embed_tokens.weight.clone()
    losses = finetune(model, examples, steps=15, lr=1e-2, batch_size=4)
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(frozen, model.model.embed_tokens.weight)  # frozen parameters did not move
    with pytest.raises(ValueError, match="match no parameter name"):
        freeze_except(model, ("nope",))
    with pytest.raises(ValueError, match="replay_fraction must be in"):
        finetune(model, examples, steps=1, lr=1e-3, replay_fraction=0.5)


def test_committed_forgetting_result_is_complete():
    from llmlab.notebook import load_result

    rec = load_result("sft_forgetting")
    assert rec["command"] == "python scripts/sft_forgetting.py" and rec["seeds"] == [0, 1, 2]
    assert set(rec["runs"]) == {"full lr 3e-3", "full lr 1e-3", "replay 25%", "LoRA r=8", "freeze lower half"}
    for run in rec["runs"].values():
        assert len(run["per_seed"]) == 3
        assert all(s["old_loss"] > rec["base"]["old_loss"] and s["new_loss"] < rec["base"]["new_loss"]
                   for s in run["per_seed"])
