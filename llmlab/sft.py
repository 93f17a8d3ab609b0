"""Supervised fine-tuning (SFT) data: chat templates, loss masking, packing, an instruction set.

What it implements
- ``CHAT_TEMPLATE``: a Jinja chat template in the format of transformers' ``chat_template``
  (Hugging Face "Templates for chat models"), written only with characters the shipped
  character-level model knows: ``Q <user text>\\n`` and ``A <assistant text>\\n``; the
  assistant's text and its end-of-turn newline sit inside ``{% generation %}`` so that
  transformers' ``return_assistant_tokens_mask`` marks the same tokens llmlab trains on.
- ``render_chat``: renders a template the way transformers does (sandboxed Jinja, trim_blocks,
  lstrip_blocks, ``raise_exception``, the ``generation`` tag), and ``hf_chat_tokenizer``: a
  ``PreTrainedTokenizerFast`` over a ``CharTokenizer`` carrying the template, so the tests check
  that ``apply_chat_template`` gives the same text and ids.
- ``encode_chat`` / ``sft_example``: token ids and labels that are -100 everywhere except the
  assistant turns (every assistant turn of a multi-turn dialogue is trained; the "A " header is
  not), found by rendering each prefix of the conversation (the assistant span is what the
  message adds after the generation prompt), independently of the ``generation`` tags.
- Packing (as in T5 and "Efficient sequence packing", Krell et al. 2021): ``pack_examples``
  concatenates examples into rows with per-document ids and restarted positions;
  ``block_diagonal_mask`` lets a token attend only to earlier tokens of its own document;
  ``packed_loss`` runs ``llmlab.LLM`` on a packed batch with or without those boundaries.
- ``story_qa_dataset``: generated multi-turn questions and answers about short stories in the
  vocabulary of the project's corpus (``llmlab.data``), no download.

What it leaves out: chat templates with tool calls, tokenizer special tokens (the character
tokenizer has none: the newline ends a turn), and FlashAttention's varlen kernels (the packed mask
is a dense boolean mask here).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.shapes import check_int, check_tensor

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch's cross_entropy default)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Q ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'A ' }}{% generation %}{{ message['content'] + '\\n' }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A ' }}{%- endif -%}"
)

_PROBE = [{"role": "user", "content": "uuu"}, {"role": "assistant", "content": "aaa"}]


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once (compiling costs far more than rendering)."""
    return _environment().from_string(template)


def _environment():
    """A sandboxed Jinja environment configured as transformers configures its own."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
    return list(messages)


def render_chat(messages: list[dict[str, str]], template: str = CHAT_TEMPLATE,
                add_generation_prompt: bool = False) -> str:
    """The conversation as text, as ``tokenizer.apply_chat_template(..., tokenize=False)`` renders it.

    >>> render_chat([{"role": "user", "content": "Hi?"}], add_generation_prompt=True)
    'Q Hi?\\nA '
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a Jinja string, got {type(template).__name__}")
    messages = _check_messages(messages)
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` renders assistant turns and a generation prompt."""
    text = render_chat(_PROBE, template)
    if "aaa" not in text:
        raise ValueError(f"template has no assistant role: an assistant message's content does not appear in "
                         f"its rendering {text!r}")
    with_prompt = render_chat(_PROBE[:1], template, add_generation_prompt=True)
    if with_prompt == render_chat(_PROBE[:1], template):
        raise ValueError("template adds no generation prompt (add_generation_prompt=True renders the same text)")


def assistant_char_mask(messages: list[dict[str, str]], template: str = CHAT_TEMPLATE) -> tuple[str, list[bool]]:
    """(rendered text, one bool per character: True on what each assistant message adds after the
    generation prompt, i.e. its content and end-of-turn marker; False on headers, user and system)."""
    check_template(template)
    messages = _check_messages(messages)
    text = render_chat(messages, template)
    mask = [False] * len(text)
    env = _compiled(template)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = env.render(messages=messages[:i], add_generation_prompt=True)  # ends with "A "
        upto = env.render(messages=messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(head) and text.startswith(upto)):
            raise ValueError("template renders a prefix of the conversation differently from the whole; "
                             "the assistant spans cannot be located")
        mask[len(head):len(upto)] = [True] * (len(upto) - len(head))
    return text, mask


def encode_chat(messages: list[dict[str, str]], tokenizer: Any,
                template: str = CHAT_TEMPLATE) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a conversation: label = id on assistant tokens, -100 elsewhere.

    Runs of trained and untrained characters are encoded separately and concatenated, which is
    exact for a character tokenizer; a subword tokenizer may merge differently across a boundary.
    """
    text, mask = assistant_char_mask(messages, template)
    ids: list[int] = []
    labels: list[int] = []
    start = 0
    for end in range(1, len(text) + 1):
        if end == len(text) or mask[end] != mask[start]:
            run = tokenizer.encode(text[start:end])
            ids += run
            labels += run if mask[start] else [IGNORE_INDEX] * len(run)
            start = end
    return ids, labels


def sft_example(messages: list[dict[str, str]], tokenizer: Any,
                template: str = CHAT_TEMPLATE) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (T,), targets (T,)) for ``LLM(input_ids, targets)``: targets are the labels shifted
    by one (target t is token t + 1, -100 where token t + 1 is not an assistant token)."""
    ids, labels = encode_chat(messages, tokenizer, template)
    if len(ids) < 2:
        raise ValueError(f"messages render to {len(ids)} token(s); need at least 2 to train")
    return torch.tensor(ids[:-1]), torch.tensor(labels[1:])  # (T,), (T,)


def hf_chat_tokenizer(tokenizer: Any, template: str = CHAT_TEMPLATE):
    """A transformers ``PreTrainedTokenizerFast`` with the ids of a ``CharTokenizer`` (one token per
    character, same ids) that carries ``template`` as its ``chat_template``."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    if getattr(tokenizer, "kind", None) != "char":
        raise TypeError(f"tokenizer must be an llmlab CharTokenizer, got {type(tokenizer).__name__}")
    check_template(template)
    tk = HFTokenizer(models.WordLevel(vocab=dict(tokenizer.stoi), unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template)


# --- packing ---------------------------------------------------------------------------------------


@dataclass
class PackedBatch:
    """Examples concatenated into rows. Padding has doc_ids -1 and targets -100."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T): restart at 0 at each document
    doc_ids: torch.Tensor  # (B, T): index of the example each token comes from, -1 for padding


def pack_examples(examples: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                  pad_id: int = 0) -> PackedBatch:
    """Greedy packing in order: each (input_ids (L,), targets (L,)) example goes into the current row
    if it fits, else starts a new row; rows are padded to ``block_size``. Examples are not split."""
    t = check_int("block_size", block_size, minimum=1)
    if not examples:
        raise ValueError("examples is empty: nothing to pack")
    rows: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[]]
    used = 0
    for i, (x, y) in enumerate(examples):
        check_tensor(f"examples[{i}] input_ids", x, ndim=1, layout="(L,)")
        if x.shape != y.shape or len(x) > t or len(x) == 0:
            raise ValueError(f"examples[{i}] must be (input_ids, targets) of equal length in [1, block_size={t}], "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if used + len(x) > t:
            rows.append([])
            used = 0
        rows[-1].append((i, x, y))
        used += len(x)
    out = PackedBatch(*(torch.full((len(rows), t), v, dtype=torch.long) for v in (pad_id, IGNORE_INDEX, 0, -1)))
    for r, row in enumerate(rows):
        pos = 0
        for i, x, y in row:
            n = len(x)
            out.input_ids[r, pos:pos + n], out.targets[r, pos:pos + n] = x, y
            out.position_ids[r, pos:pos + n], out.doc_ids[r, pos:pos + n] = torch.arange(n), i
            pos += n
    return out


def block_diagonal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal mask within each document: doc_ids (B, T) -> boolean (B, 1, T, T), True = may attend.

    Padding (doc id -1) attends only to itself, so no row of the mask is empty (an empty row gives
    NaN in softmax)."""
    check_tensor("doc_ids", doc_ids, ndim=2, layout="(B, T)")
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    real = (doc_ids >= 0)[:, :, None]  # (B, T, 1)
    eye = torch.eye(t, dtype=torch.bool, device=doc_ids.device)  # (T, T)
    return ((same & causal & real) | eye).unsqueeze(1)  # (B, 1, T, T)


def _forward_with_positions(model, input_ids, mask, positions):
    """Run ``llmlab.LLM`` with explicit per-row positions (B, T). LLM.forward derives positions
    itself, so they are supplied by shadowing its ``_positions`` method on this instance only."""
    model._positions = lambda *_args: positions
    try:
        return model(input_ids, attention_mask=mask).logits  # (B, T, V)
    finally:
        del model._positions


def packed_loss(model, batch: PackedBatch, boundaries: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets of a packed batch.

    boundaries=True: block-diagonal mask and positions restarted per document (each document sees
    only itself, as if trained alone). boundaries=False: plain causal attention over the whole row
    and positions 0..T-1 (documents attend to their predecessors in the row)."""
    if boundaries:
        logits = _forward_with_positions(model, batch.input_ids, block_diagonal_mask(batch.doc_ids),
                                         batch.position_ids)
    else:
        logits = model(batch.input_ids).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX)


# --- a generated instruction dataset ---------------------------------------------------------------

_NAMES = (("Tom", "he"), ("Lily", "she"), ("Ben", "he"), ("Mia", "she"), ("Sam", "he"), ("Anna", "she"),
          ("Max", "he"), ("Lucy", "she"), ("Leo", "he"), ("Emma", "she"), ("Jack", "he"), ("Sara", "she"))
_PLACES = ("the park", "the farm", "the lake", "the beach", "the hill", "the river", "the town", "the school")
_COLORS = ("red", "blue", "green", "pink")
_OBJECTS = ("ball", "kite", "hat", "book", "cup", "box", "drum", "boat")
_FEELINGS = ("happy", "sad", "tired", "proud")


def story_qa(rng: random.Random, turns: int = 2) -> list[dict[str, str]]:
    """One dialogue: a three-sentence story in the first user turn, then ``turns`` question/answer
    pairs about it (who, where, what, which color, how did they feel), each answer one short line;
    follow-up questions refer back with a pronoun, so they need the earlier turns."""
    name, pron = rng.choice(_NAMES)
    place, color, obj, feel = (rng.choice(x) for x in (_PLACES, _COLORS, _OBJECTS, _FEELINGS))
    he = pron.capitalize()
    story = f"{name} took a {color} {obj} to {place}. {he} was {feel}."
    qa = [  # (first-turn question, follow-up question that refers back with a pronoun, answer)
        (f"Where did {name} go?", f"Where did {pron} go?", f"To {place}."),
        (f"What did {name} take?", f"What did {pron} take?", f"A {color} {obj}."),
        (f"What color was the {obj}?", "What color was it?", f"It was {color}."),
        (f"How did {name} feel?", f"How did {pron} feel?", f"{he} was {feel}."),
        (f"Who went to {place}?", f"Who had the {obj}?", f"{name}."),
    ]
    messages = []
    for j, (first, follow, answer) in enumerate(rng.sample(qa, k=turns)):
        messages.append({"role": "user", "content": f"{story} {first}" if j == 0 else follow})
        messages.append({"role": "assistant", "content": answer})
    return messages


def story_qa_dataset(n: int, seed: int = 0, turns: int = 2, max_chars: int | None = 128) -> list[list[dict[str, str]]]:
    """``n`` generated dialogues (``story_qa``), reproducible from ``seed``. A dialogue whose rendering
    with ``CHAT_TEMPLATE`` is longer than ``max_chars`` (the shipped model's context) is drawn again."""
    n = check_int("n", n, minimum=1)
    turns = check_int("turns", turns, minimum=1)
    if turns > 5:
        raise ValueError(f"turns must be <= 5 (one per question kind), got {turns}")
    rng = random.Random(seed)
    out = []
    for _ in range(100 * n):
        chat = story_qa(rng, turns)
        if max_chars is None or len(render_chat(chat)) <= max_chars:
            out.append(chat)
            if len(out) == n:
                return out
    raise ValueError(f"max_chars={max_chars} is too small: fewer than 1 in 100 {turns}-turn dialogues fit")


# --- training and evaluation helpers for the notebooks ---------------------------------------------


def sft_batch(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (input_ids (L,), targets (L,)) examples into (B, T) tensors (targets padded with -100)."""
    if not examples:
        raise ValueError("examples is empty")
    t = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), t), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(examples), t), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (xi, yi) in enumerate(examples):
        x[i, : len(xi)], y[i, : len(yi)] = xi, yi
    return x, y


def answer_accuracy(model, tokenizer: Any, dialogues: list[list[dict[str, str]]], template: str = CHAT_TEMPLATE,
                    max_new_tokens: int = 24) -> float:
    """Fraction of assistant turns that greedy decoding reproduces exactly, each turn generated after
    the gold conversation so far plus the generation prompt, stopping at the end-of-turn newline."""
    stop = tokenizer.encode("\n")[0]
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for chat in dialogues:
            for i, m in enumerate(chat):
                if m["role"] != "assistant":
                    continue
                ids = tokenizer.encode(render_chat(chat[:i], template, add_generation_prompt=True))
                x = torch.tensor([ids])  # (1, T)
                out: list[int] = []
                for _ in range(max_new_tokens):
                    nxt = int(model(x).logits[0, -1].argmax())
                    if nxt == stop:
                        break
                    out.append(nxt)
                    x = torch.cat([x, torch.tensor([[nxt]])], dim=1)  # (1, T + 1)
                hits += tokenizer.decode(out) == m["content"]
                total += 1
    if total == 0:
        raise ValueError("dialogues hold no assistant turn to score")
    return hits / total


def finetune(model, examples: list[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float, batch_size: int = 16,
             seed: int = 0, replay: torch.Tensor | None = None, replay_fraction: float = 0.0,
             block_size: int = 128) -> list[float]:
    """Fine-tune the parameters of ``model`` that require grad with AdamW (no weight decay, constant lr).

    Each step draws ``batch_size`` examples (``random.Random(seed)``); with ``replay`` (old-domain token
    ids (N,)) the loss is (1 - f) * SFT loss + f * next-token loss on 4 random old-domain windows,
    f = ``replay_fraction`` (experience replay against forgetting). Returns the per-step losses."""
    steps = check_int("steps", steps, minimum=1)
    if not 0.0 <= replay_fraction < 1.0 or (replay_fraction > 0 and replay is None):
        raise ValueError(f"replay_fraction must be in [0, 1) and needs replay data, got {replay_fraction}")
    from llmlab.data import get_batch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires grad")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = sft_batch(rng.sample(examples, batch_size))  # (B, T), (B, T)
        loss = model(x, targets=y).loss
        if replay_fraction > 0:
            xb, yb = get_batch(replay, 4, block_size, gen)  # (4, T), (4, T)
            loss = (1 - replay_fraction) * loss + replay_fraction * model(xb, targets=yb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def freeze_except(model, prefixes: tuple[str, ...]) -> int:
    """Train only parameters whose name starts with one of ``prefixes``; return how many elements train."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(tuple(prefixes))
        n += p.numel() if p.requires_grad else 0
    if n == 0:
        raise ValueError(f"prefixes {prefixes!r} match no parameter name")
    return n
