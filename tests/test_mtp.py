"""llmlab.mtp: shapes, causality of the MTP prediction, the loss by hand, and its use as a draft."""

import math

import pytest
import torch

from llmlab.model import LLM, ModelConfig
from llmlab.mtp import MTPDraft, MTPModule, mtp_forward, mtp_loss
from llmlab.speculative import autoregressive_generate, speculative_generate

V = 24


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = LLM(ModelConfig.tiny(vocab_size=V)).eval()
    return model, MTPModule(model).eval()


def test_shapes_and_shared_head(pair):
    model, mtp = pair
    main, extra = mtp_forward(model, mtp, torch.randint(0, V, (3, 11)))
    assert main.shape == (3, 11, V) and extra.shape == (3, 10, V)
    names = {n for n, _ in mtp.named_parameters()}
    assert not any("lm_head" in n or "embed" in n for n in names)  # shared with the main model, not copied


def test_prediction_at_t_ignores_tokens_after_t_plus_1(pair):
    model, mtp = pair
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=gen)
    with torch.no_grad():
        _, base = mtp_forward(model, mtp, ids)
        for t in (0, 4, 9):
            changed = ids.clone()
            changed[:, t + 2:] = torch.randint(0, V, (2, 10 - t), generator=gen)
            _, other = mtp_forward(model, mtp, changed)
            torch.testing.assert_close(other[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
            # token t+1 does matter: the module reads its embedding
            moved = ids.clone()
            moved[:, t + 1] = (moved[:, t + 1] + 1) % V
            assert (mtp_forward(model, mtp, moved)[1][:, t] - base[:, t]).abs().max() > 1e-6


def test_loss_equals_a_hand_computation(pair):
    model, mtp = pair
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    targets[1, 4] = -100
    with torch.no_grad():
        _, extra = mtp_forward(model, mtp, ids)
    total, n = 0.0, 0
    for b in range(2):
        for t in range(6):
            y = int(targets[b, t + 1])
            if y == -100:
                continue
            row = extra[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[y])
            n += 1
    assert n == 11
    assert math.isclose(float(mtp_loss(extra, targets)), total / n, rel_tol=1e-5)


def test_draft_keeps_the_greedy_tokens(pair):
    model, mtp = pair
    prompt = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(4))
    spec = speculative_generate(model, MTPDraft(model, mtp), prompt, 12, k=1, temperature=0.0)
    alone = autoregressive_generate(model, prompt, 12, temperature=0.0)
    assert torch.equal(spec.tokens, alone.tokens)
    assert spec.target_calls <= 12 and sum(spec.drafted) > 0


def test_bad_inputs(pair):
    model, mtp = pair
    with pytest.raises(TypeError, match="model must be"):
        MTPModule(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        mtp_forward(model, mtp, torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        mtp_loss(torch.zeros(2, 5, V), torch.zeros(2, 5, dtype=torch.long))


def test_committed_result_has_the_layout_notebook_20_reads():
    from llmlab.notebook import load_result

    rec = load_result("modern_mtp")
    assert rec["command"] == "python scripts/modern_mtp.py"
    assert [p["step"] for p in rec["curve"]] == list(range(0, rec["steps"] + 1, 50))
    assert set(rec["decoding"]) == {"greedy", "sampled_t1"}
    for row in rec["decoding"].values():
        # k = 1: each main pass yields 1 token, or 2 when the draft is accepted
        assert 0 <= row["acceptance_rate"] <= 1 and 1 <= row["tokens_per_main_pass"] <= 2
