"""Tests of llmlab.knowledge_injection: facts are new to the shipped model, probes equal an
independent per-candidate computation, bad input names the argument."""

import pytest
import torch
import torch.nn.functional as F

from llmlab.checkpoint import load_pretrained
from llmlab.data import generate_corpus
from llmlab.knowledge_injection import (
    HELDOUT_QUESTION,
    TOWNS,
    TRAIN_QUESTION,
    Fact,
    cpt_examples,
    fact_chat,
    fact_statements,
    inject,
    new_facts,
    recall_accuracy,
    statement_recall_accuracy,
)
from llmlab.sft import encode_chat


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained()


def test_facts_are_new_to_the_corpus_and_spelled_with_known_characters(shipped):
    _, tok = shipped
    facts = new_facts(64, seed=3)
    assert facts == new_facts(64, seed=3) and facts != new_facts(64, seed=4)
    assert len({f.name for f in facts}) == 64 and {f.town for f in facts} <= set(TOWNS)
    corpus = generate_corpus()
    for f in facts:
        assert f.name not in corpus and f.town not in corpus
        for text in fact_statements(f):
            assert tok.decode(tok.encode(text)) == text  # every character is in the vocabulary
    with pytest.raises(ValueError, match="n"):
        new_facts(0)


def _answer_logprob(model, tok, messages):
    ids, labels = encode_chat(messages, tok)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
    return sum(logp[t, labels[t + 1]].item() for t in range(len(ids) - 1) if labels[t + 1] != -100)


def test_recall_accuracy_equals_scoring_each_candidate_separately(shipped):
    model, tok = shipped
    torch.manual_seed(0)
    facts = new_facts(6, seed=1)
    for question in (TRAIN_QUESTION, HELDOUT_QUESTION):
        hits = 0
        for f in facts:
            scores = [_answer_logprob(model, tok, fact_chat(f, question, town=t)) for t in TOWNS]
            hits += max(range(len(TOWNS)), key=scores.__getitem__) == TOWNS.index(f.town)
        assert recall_accuracy(model, tok, facts, question) == pytest.approx(hits / len(facts))


def test_statement_probe_equals_scoring_each_candidate_separately(shipped):
    model, tok = shipped
    facts = new_facts(6, seed=2)
    hits = 0
    for f in facts:
        scores = []
        for t in TOWNS:
            head, ids = tok.encode(f"{f.name} lives in "), tok.encode(f"{f.name} lives in {t}.\n")
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(head), len(ids))))
        hits += max(range(len(TOWNS)), key=scores.__getitem__) == TOWNS.index(f.town)
    assert statement_recall_accuracy(model, tok, facts) == pytest.approx(hits / len(facts))


def test_continued_pretraining_stores_the_facts(shipped):
    # 4 facts, 40 steps of 8 statements: the statement probe goes from at most 2 of 4 to at least 3
    base, tok = shipped
    facts = new_facts(4, seed=0)
    before = statement_recall_accuracy(base, tok, facts)
    after = statement_recall_accuracy(inject(base, tok, facts, [], cpt_steps=40, batch_size=8), tok, facts)
    assert before <= 0.5 and after >= 0.75


def test_cpt_examples_train_every_next_token(shipped):
    _, tok = shipped
    (x, y), = cpt_examples(["Abc lives in Mirth."], tok)
    ids = tok.encode("Abc lives in Mirth.\n")
    assert x.tolist() == ids[:-1] and y.tolist() == ids[1:]


def test_bad_input_names_the_argument(shipped):
    model, tok = shipped
    with pytest.raises(ValueError, match="facts is empty"):
        recall_accuracy(model, tok, [])
    with pytest.raises(ValueError, match="towns"):
        recall_accuracy(model, tok, [Fact("Abc", "Nowhere")])
    with pytest.raises(ValueError, match="mixed"):
        inject(model, tok, new_facts(2), [], mixed=True)
