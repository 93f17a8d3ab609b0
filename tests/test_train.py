"""llmlab.train: the warm-up + cosine schedule, AdamW parameter groups, gradient accumulation
(k micro-batches = one k-times-larger batch), the training loop's budgets and history, the
deterministic held-out loss, and the command line."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.checkpoint import load_checkpoint, read_config
from llmlab.data import generate_corpus, train_val_split
from llmlab.optim import Muon
from llmlab.tokenizer import CharTokenizer
from llmlab.train import (
    TrainConfig,
    Trainer,
    accumulate_gradients,
    evaluate_loss,
    heldout_loss,
    lr_at,
    main,
    param_groups,
    train,
)
from tests.models import tiny_llmlab


@pytest.fixture(scope="module")
def ids():
    text = generate_corpus(30_000)
    tok = CharTokenizer.from_text(text)
    return tok.vocab_size, train_val_split(tok.encode(text))


# --- schedule ---------------------------------------------------------------------------------


def test_lr_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    warm = [lr_at(s, cfg) for s in range(10)]
    assert warm == pytest.approx([1e-3 * (s + 1) / 11 for s in range(10)])
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway: cos(pi/2) = 0
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay[:-1], decay[1:], strict=True))
    p = 0.3
    assert lr_at(10 + 30, cfg) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * p)))


@pytest.mark.parametrize("warmup,max_iters", [(10, 110), (0, 50), (3, 4)])
def test_lr_equals_transformers_cosine_with_warmup_shifted_by_one_step(warmup, max_iters):
    """Warm-up convention: transformers' get_cosine_with_min_lr_schedule_with_warmup starts at lr 0
    (step / warmup); llmlab's step s uses (s + 1) / (warmup + 1), so that no step is wasted at lr 0.
    llmlab's step s is therefore transformers' step s + 1 of a schedule with warmup + 1 warm-up steps
    and max_iters + 1 steps in all; the cosine part is the same (from lr down to min_lr)."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=warmup, max_iters=max_iters)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup + 1, max_iters + 1, min_lr=cfg.min_lr)
    theirs = []
    for _ in range(max_iters + 2):  # transformers' steps 0 .. max_iters + 1
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert theirs[0] == 0.0  # transformers' first step, which llmlab skips
    ours = [lr_at(s, cfg) for s in range(max_iters + 1)]
    assert ours == pytest.approx(theirs[1:], rel=1e-12, abs=1e-15)


def test_lr_follows_the_time_budget_when_it_is_further_along():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=0, max_iters=1000, max_seconds=10.0)
    assert lr_at(10, cfg, elapsed=5.0) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(10, cfg, elapsed=10.0) == pytest.approx(1e-4)
    assert lr_at(500, cfg, elapsed=0.1) == pytest.approx(1e-4 + 0.5 * 9e-4)


def test_train_config_validation():
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(TypeError, match="batch_size"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9,))
    with pytest.raises(ValueError, match="max_seconds"):
        TrainConfig(max_seconds=0.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="muon_lr"):
        TrainConfig(optimizer="muon", muon_lr=0.0)
    assert TrainConfig.baby_gpt().tokens_per_step == 12 * 64
    assert TrainConfig.baby_gpt().tokens_per_step * TrainConfig.baby_gpt().max_iters == 1_536_000


# --- optimizer groups -------------------------------------------------------------------------


def test_no_decay_on_norms_biases_and_embeddings():
    model = tiny_llmlab(
        vocab_size=20, training=True, position="learned", norm="layernorm", ffn="gelu", bias=True, tie_embeddings=True
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in no_decay_names  # and so the tied lm_head
    assert "model.embed_positions.weight" in no_decay_names
    assert all(n.endswith(".weight") and "norm" not in n and "embed" not in n for n in decay_names)
    assert any("q_proj" in n for n in decay_names) and any(n.endswith(".bias") for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_option_puts_block_matrices_under_muon_at_their_own_scheduled_lr(ids):
    vocab, (train_ids, val_ids) = ids
    model = tiny_llmlab(vocab_size=vocab, training=True)
    cfg = dataclasses.replace(TrainConfig.tiny(), optimizer="muon", lr=2e-3, min_lr=2e-4, muon_lr=1e-2, max_iters=4)
    trainer = Trainer(model, train_ids, val_ids, cfg)
    assert isinstance(trainer.optimizer, Muon)
    muon_groups = [g for g in trainer.optimizer.param_groups if g["use_muon"]]
    assert len(muon_groups) == 1 and len(muon_groups[0]["params"]) == 7 * model.config.n_layer
    trainer.step()
    for g in trainer.optimizer.param_groups:  # the first warm-up step's lr, scaled per group
        peak = cfg.muon_lr if g["use_muon"] else cfg.lr
        assert g["lr"] == pytest.approx(peak * lr_at(0, cfg) / cfg.lr)
    while not trainer.done:
        trainer.step()
    assert trainer.history.step_loss[-1] < trainer.history.step_loss[0]
    plain = Trainer(tiny_llmlab(vocab_size=vocab, training=True), train_ids, val_ids, TrainConfig.tiny())
    assert isinstance(plain.optimizer, torch.optim.AdamW)


# --- gradient accumulation --------------------------------------------------------------------


def test_accumulation_equals_one_large_batch(ids):
    vocab, (train_ids, _) = ids
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(len(train_ids) - 33, (8,), generator=gen)
    x = torch.stack([train_ids[s : s + 32] for s in starts])  # (B, T)
    y = torch.stack([train_ids[s + 1 : s + 33] for s in starts])  # (B, T)
    big, small = (tiny_llmlab(vocab_size=vocab, training=True) for _ in range(2))
    loss_big = accumulate_gradients(big, [(x, y)])
    loss_small = accumulate_gradients(small, [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    for (name, p_big), p_small in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p_small.grad, p_big.grad, rtol=1e-4, atol=1e-6, msg=name)


# --- evaluation -------------------------------------------------------------------------------


def test_heldout_loss_is_the_mean_over_non_overlapping_windows(ids):
    vocab, (_, val_ids) = ids
    model = tiny_llmlab(vocab_size=vocab)
    x = val_ids[: 5 * 16].view(5, 16)
    y = val_ids[1 : 5 * 16 + 1].view(5, 16)
    with torch.no_grad():
        logits = model(x).logits  # (B, T, V)
    expected = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1)).item()
    assert heldout_loss(model, val_ids, 16, batch_size=2, max_windows=5) == pytest.approx(expected, rel=1e-5)
    a = evaluate_loss(model, val_ids, 4, 16, num_batches=3, seed=7)
    assert a == evaluate_loss(model, val_ids, 4, 16, num_batches=3, seed=7)


# --- the loop ---------------------------------------------------------------------------------


def test_train_lowers_the_loss_and_records_history(ids):
    vocab, (train_ids, val_ids) = ids
    cfg = dataclasses.replace(TrainConfig.tiny(), max_iters=20, eval_interval=10, grad_accum_steps=2)
    history = train(tiny_llmlab(vocab_size=vocab, training=True), train_ids, val_ids, cfg)
    assert history.steps == 20 and len(history.step_loss) == 20
    assert history.iters == [10, 20]
    assert len(history.train_loss) == len(history.val_loss) == len(history.lr) == len(history.elapsed) == 2
    assert history.val_loss[-1] < math.log(vocab) - 0.3  # below the uniform guess
    assert history.step_loss[-1] < history.step_loss[0]


def test_training_is_reproducible(ids):
    vocab, (train_ids, val_ids) = ids
    cfg = dataclasses.replace(TrainConfig.tiny(), max_iters=4, eval_interval=100)
    first = train(tiny_llmlab(vocab_size=vocab, training=True), train_ids, val_ids, cfg)
    again = train(tiny_llmlab(vocab_size=vocab, training=True), train_ids, val_ids, cfg)
    assert again.step_loss == pytest.approx(first.step_loss, rel=1e-5)  # seeded: same run twice


def test_time_budget_stops_training(ids):
    vocab, (train_ids, val_ids) = ids
    cfg = dataclasses.replace(TrainConfig.tiny(), max_iters=10_000, max_seconds=0.5, eval_interval=10_000)
    history = train(tiny_llmlab(vocab_size=vocab, training=True), train_ids, val_ids, cfg)
    assert 0 < history.steps < 10_000
    assert history.seconds < 30.0


def test_cli_trains_and_saves_a_checkpoint(tmp_path):
    out = tmp_path / "ck"
    meta = main(["--corpus-chars", "20000", "--preset", "tiny", "--train-preset", "tiny", "--max-iters", "4",
                 "--model-override", "n_layer=1", "--optimizer", "muon", "--muon-lr", "0.01",
                 "--out", str(out)])  # fmt: skip
    model, tok = load_checkpoint(out)
    assert model.config.n_layer == 1 and tok.vocab_size == model.config.vocab_size
    config = read_config(out)
    assert config["metadata"]["command"].startswith("python -m llmlab.train --corpus-chars 20000")
    assert config["metadata"]["heldout"]["full_loss"] == pytest.approx(meta["heldout"]["full_loss"])
    assert config["metadata"]["train_config"]["optimizer"] == "muon"
    assert config["metadata"]["train_config"]["muon_lr"] == 0.01
    with pytest.raises(ValueError, match="ModelConfig field"):
        main(["--preset", "tiny", "--model-override", "n_layers=1", "--out", str(out)])
