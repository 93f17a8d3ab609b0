"""llmlab.speculative: the accept/resample rule keeps the target distribution exactly (enumeration
for one position, Pearson's chi-square over whole sampled continuations), greedy speculative
decoding equals the target alone and transformers' generate(assistant_model=...), and the
expected-speed-up formulas of Leviathan et al. 2023 hold."""

import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch

from llmlab.speculative import (
    autoregressive_generate,
    chi_square_sf,
    chi_square_test,
    emitted_distribution,
    expected_speedup,
    expected_tokens_per_step,
    probs_from_logits,
    residual_distribution,
    speculative_generate,
    verify,
)
from tests.models import tiny_llama


class Bigram:
    """A toy LM: the next-token logits depend on the last token only (fast enough for 1000s of samples)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (V, V)

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[ids])  # (1, T, V)


# The shared tiny Llama (tests/models.py) with a 16-token vocabulary and no special tokens.
SPECULATIVE_LLAMA = {"vocab_size": 16, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}


def test_emitted_distribution_is_the_target_for_any_draft():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(3 * torch.randn(6, generator=gen, dtype=torch.float64), 0)
        q = torch.softmax(3 * torch.randn(6, generator=gen, dtype=torch.float64), 0)
        torch.testing.assert_close(emitted_distribution(p, q), p, rtol=0, atol=1e-12)
    # a draft that puts zero mass on some tokens: the residual supplies them
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    q = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(emitted_distribution(p, q), p, rtol=0, atol=1e-12)


def test_accepting_every_draft_token_would_give_the_draft_distribution():
    """The rejection step is what makes the output p: without it the output is q."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    accept_all = q  # what "always accept" emits
    assert (accept_all - p).abs().max() > 0.4
    assert (emitted_distribution(p, q) - p).abs().max() < 1e-12


def test_residual_and_probs():
    r = residual_distribution(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3]))
    torch.testing.assert_close(r, torch.tensor([1.0, 0.0, 0.0]))
    same = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(residual_distribution(same, same), same)
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    torch.testing.assert_close(probs_from_logits(logits, 1.0), torch.softmax(logits.double(), -1))
    torch.testing.assert_close(probs_from_logits(logits, 0.5), torch.softmax(logits.double() / 0.5, -1))
    assert probs_from_logits(logits, 0.0).tolist() == [[0.0, 1.0, 0.0]]


def test_verify_first_token_frequencies_match_target():
    """Many runs of verify with k=1: the emitted first token is distributed as p (chi-square)."""
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    counts = torch.zeros(4)
    for _ in range(4000):
        x = torch.multinomial(q[0].float(), 1, generator=gen)
        n, nxt = verify(p, q, x, gen)
        counts[int(x) if n == 1 else nxt] += 1
    _, pvalue = chi_square_test(counts, p[0])
    assert pvalue > 1e-3
    # and against a wrong reference (the draft) the test rejects
    assert chi_square_test(counts, q[0])[1] < 1e-6


def test_sampled_continuations_follow_the_target_distribution():
    """3 new tokens, vocab 4, k=2: frequencies of all 64 continuations against the exact target."""
    gen = torch.Generator().manual_seed(0)
    target = Bigram(torch.randn(4, 4, generator=gen))
    draft = Bigram(torch.randn(4, 4, generator=gen))
    pt = torch.softmax(target.table.double(), -1)  # (V, V)
    seqs = list(itertools.product(range(4), repeat=3))
    exact = torch.tensor([pt[0, a] * pt[a, b] * pt[b, c] for a, b, c in seqs])
    index = {s: i for i, s in enumerate(seqs)}
    counts = torch.zeros(len(seqs))
    for _ in range(3000):
        out = speculative_generate(target, draft, torch.tensor([[0]]), 3, k=2, generator=gen)
        counts[index[tuple(out.tokens[0, 1:].tolist())]] += 1
    stat, pvalue = chi_square_test(counts, exact)
    assert pvalue > 1e-3, (stat, pvalue)
    draft_exact = torch.softmax(draft.table.double(), -1)
    wrong = torch.tensor([draft_exact[0, a] * draft_exact[a, b] * draft_exact[b, c] for a, b, c in seqs])
    assert chi_square_test(counts, wrong)[1] < 1e-6


def test_chi_square_sf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for x, dof in [(0.5, 1), (3.841, 1), (20.0, 10), (70.0, 63)]:
        assert chi_square_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-6)


def test_greedy_equals_target_alone_and_transformers_assisted_generation():
    target = tiny_llama(0, **SPECULATIVE_LLAMA)
    draft = tiny_llama(0, **SPECULATIVE_LLAMA)
    with torch.no_grad():  # a perturbed copy: it agrees often, but not always
        draft.lm_head.weight.add_(0.5 * draft.lm_head.weight.std() * torch.randn_like(draft.lm_head.weight))
    for prompt in ([1, 5, 7], [3, 3, 9, 2, 11]):
        ids = torch.tensor([prompt])
        spec = speculative_generate(target, draft, ids, 24, k=3, temperature=0.0)
        alone = autoregressive_generate(target, ids, 24, temperature=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24)
        assert spec.tokens.tolist() == alone.tokens.tolist() == hf.tolist()
        assert 0.0 < spec.acceptance_rate < 1.0  # some drafts were rejected and fixed
        assert spec.target_calls < 24


def test_perfect_draft_accepts_everything():
    target = tiny_llama(0, **SPECULATIVE_LLAMA)
    out = speculative_generate(target, target, torch.tensor([[1, 2]]), 17, k=4,
                               generator=torch.Generator().manual_seed(0))
    assert out.acceptance_rate == 1.0
    assert out.target_calls == 4  # 5 + 5 + 5 + 2 tokens
    assert out.tokens.shape == (1, 19)


def test_expected_speedup_formulas():
    assert expected_tokens_per_step(0.0, 5) == 1.0
    assert expected_tokens_per_step(1.0, 5) == 6.0
    alpha, k = 0.7, 3
    assert expected_tokens_per_step(alpha, k) == pytest.approx(sum(alpha ** i for i in range(k + 1)))
    assert expected_speedup(alpha, k, 0.0) == pytest.approx(expected_tokens_per_step(alpha, k))
    assert expected_speedup(0.2, 8, 0.5) < 1.0  # a poor, costly draft slows decoding down


def test_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        probs_from_logits(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match="same shape"):
        residual_distribution(torch.ones(3) / 3, torch.ones(4) / 4)
    with pytest.raises(ValueError, match="k=2"):
        verify(torch.ones(2, 4) / 4, torch.ones(2, 4) / 4, torch.tensor([0, 1]))
    target = Bigram(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate(target, target, torch.tensor([[0], [1]]), 3)
    with pytest.raises(ValueError, match="k must be"):
        speculative_generate(target, target, torch.tensor([[0]]), 3, k=0)
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_step(1.5, 2)
