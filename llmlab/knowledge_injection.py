"""Knowledge injection into the shipped model: new facts taught by continued pretraining or by SFT.

What it implements
- ``new_facts``: invented people and the invented town each lives in, spelled with the characters
  the shipped character-level model knows and absent from its corpus, so every fact is new to it.
- Three phrasings of the same fact: ``fact_statements`` (plain text for continued pretraining,
  several paraphrases per fact), ``fact_chat`` (one question and answer in the chat format of
  ``llmlab.sft``, with a training or a held-out wording of the question).
- ``recall_accuracy``: a closed-book probe. For each fact it scores every candidate town's answer
  by its log-likelihood after the question (the multiple-choice scoring of lm-evaluation-harness)
  and counts the fact as recalled when the true town scores highest; chance is 1 / number of towns.
- ``cpt_examples`` / ``inject``: next-token examples of statements, and one run of continued
  pretraining and/or SFT with ``llmlab.sft.finetune``.

Follows the setting of Allen-Zhu and Li 2023 ("Physics of Language Models: Part 3.1, Knowledge
Storage and Extraction"): facts stored by pretraining on paraphrased biographies, extraction
taught by question answering on some people and tested on others. What it leaves out: their
scale (their models and data are far larger) and open-ended generation (the probe is
multiple choice).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.sft import IGNORE_INDEX, finetune, sft_batch, sft_example
from llmlab.shapes import check_int

TOWNS = ("Brell", "Corda", "Dunmoor", "Fenwy", "Halbrook", "Jastow", "Lorwen", "Mirth")
_ONSETS = ("B", "C", "D", "F", "H", "J", "L", "M", "R", "S", "T", "W", "Y", "Z", "Q", "O")
_SYLLABLES = ("ra", "lo", "mi", "den", "ve", "tor", "sa", "qui", "bel", "ny", "fo", "rin", "cas", "wen")
STATEMENT_TEMPLATES = ("{name} lives in {town}.", "The home of {name} is {town}.", "{name} has a house in {town}.")
TRAIN_QUESTION = "Where does {name} live?"
HELDOUT_QUESTION = "Which town is the home of {name}?"
ANSWER = "In {town}."


@dataclass(frozen=True)
class Fact:
    """One new fact: ``name`` lives in ``town``."""

    name: str
    town: str


def new_facts(n: int, seed: int = 0) -> list[Fact]:
    """``n`` facts with distinct invented names (two syllables) and towns drawn from ``TOWNS``."""
    n = check_int("n", n, minimum=1)
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n:
        name = rng.choice(_ONSETS) + rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)
        if name not in names:
            names.append(name)
        if len(names) < n and len(names) == len(_ONSETS) * len(_SYLLABLES) ** 2:
            raise ValueError(f"n must be at most {len(names)} (distinct names), got {n}")
    return [Fact(name, rng.choice(TOWNS)) for name in names]


def fact_statements(fact: Fact) -> list[str]:
    """The paraphrased plain-text statements of ``fact`` used for continued pretraining."""
    return [t.format(name=fact.name, town=fact.town) for t in STATEMENT_TEMPLATES]


def fact_chat(fact: Fact, question: str = TRAIN_QUESTION, town: str | None = None) -> list[dict[str, str]]:
    """``fact`` as one question/answer exchange; ``town`` replaces the answer (for scoring candidates)."""
    return [{"role": "user", "content": question.format(name=fact.name)},
            {"role": "assistant", "content": ANSWER.format(town=town or fact.town)}]


def cpt_examples(texts: list[str], tokenizer: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token examples (input_ids (T,), targets (T,)) of plain texts: every token is trained."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text + "\n")
        out.append((torch.tensor(ids[:-1]), torch.tensor(ids[1:])))
    return out


def sft_examples(facts: list[Fact], tokenizer: Any, question: str = TRAIN_QUESTION):
    """SFT examples (loss on the answer only) of ``facts`` asked with ``question``."""
    return [sft_example(fact_chat(f, question), tokenizer) for f in facts]


def recall_accuracy(model, tokenizer: Any, facts: list[Fact], question: str = HELDOUT_QUESTION,
                    towns: tuple[str, ...] = TOWNS) -> float:
    """Fraction of ``facts`` whose true town has the highest answer log-likelihood among ``towns``.

    Each candidate answer "In <town>." (with its end-of-turn newline) is scored by the sum of its
    token log-probabilities after ``question`` in the chat format; ties count as misses.
    """
    if not facts:
        raise ValueError("facts is empty: nothing to probe")
    unknown = sorted({f.town for f in facts} - set(towns))
    if unknown:
        raise ValueError(f"towns must contain every fact's town; missing {unknown}")
    examples = [sft_example(fact_chat(f, question, town=t), tokenizer) for f in facts for t in towns]
    x, y = sft_batch(examples)  # (F * C, T), (F * C, T)
    model.eval()
    with torch.no_grad():
        logp = F.log_softmax(model(x).logits.float(), dim=-1)  # (F * C, T, V)
    mask = y != IGNORE_INDEX
    tok = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (F * C, T)
    score = (tok * mask).sum(-1).view(len(facts), len(towns))  # (F, C)
    truth = torch.tensor([towns.index(f.town) for f in facts])  # (F,)
    best = score.max(-1).values
    correct = (score.gather(1, truth[:, None]).squeeze(1) == best) & ((score == best[:, None]).sum(-1) == 1)
    return correct.float().mean().item()


def inject(base, tokenizer: Any, cpt_facts: list[Fact], sft_facts: list[Fact], mixed: bool = False,
           cpt_steps: int = 300, sft_steps: int = 100, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """A fine-tuned copy of ``base``: continued pretraining on the statements of ``cpt_facts`` (if
    any), then SFT on the training-wording questions of ``sft_facts`` (if any); with ``mixed`` the
    two example sets are shuffled together and trained for ``cpt_steps`` steps (mixed training).
    AdamW, constant ``lr``, batches of ``batch_size`` examples (fewer if the set is smaller)."""
    model = copy.deepcopy(base)
    cpt = cpt_examples([s for f in cpt_facts for s in fact_statements(f)], tokenizer)
    sft = sft_examples(sft_facts, tokenizer)
    if mixed:
        if not cpt or not sft:
            raise ValueError("mixed=True needs both cpt_facts and sft_facts")
        stages = [(cpt + sft, cpt_steps)]
    else:
        stages = [(ex, steps) for ex, steps in ((cpt, cpt_steps), (sft, sft_steps)) if ex]
    for i, (examples, steps) in enumerate(stages):
        finetune(model, examples, steps, lr, batch_size=min(batch_size, len(examples)), seed=seed + i)
    return model


def statement_recall_accuracy(model, tokenizer: Any, facts: list[Fact], template: str = "{name} lives in {town}.",
                              towns: tuple[str, ...] = TOWNS) -> float:
    """Like ``recall_accuracy`` for plain text: the town completing ``template`` (no chat format),
    scored on the tokens from the town onwards. Probes whether a fact is stored at all."""
    if not facts:
        raise ValueError("facts is empty: nothing to probe")
    examples = []
    for f in facts:
        head = template.split("{town}")[0].format(name=f.name)
        for t in towns:
            ids = tokenizer.encode(template.format(name=f.name, town=t) + "\n")
            labels = [IGNORE_INDEX] * len(tokenizer.encode(head)) + ids[len(tokenizer.encode(head)):]
            examples.append((torch.tensor(ids[:-1]), torch.tensor(labels[1:])))
    x, y = sft_batch(examples)
    model.eval()
    with torch.no_grad():
        logp = F.log_softmax(model(x).logits.float(), dim=-1)
    mask = y != IGNORE_INDEX
    tok = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    score = (tok * mask).sum(-1).view(len(facts), len(towns))
    truth = torch.tensor([towns.index(f.town) for f in facts])
    return (score.argmax(-1) == truth).float().mean().item()
