"""llmlab.checkpoint: safetensors + JSON round trips (tied embeddings included), clear errors, and
the shipped ``tiny-char`` checkpoint: it loads without network and its recorded held-out loss is
reproduced on the fixed subset of the deterministic validation split."""

import dataclasses
import json
import urllib.request

import pytest
import torch

from llmlab.checkpoint import (
    load_checkpoint,
    load_pretrained,
    pretrained_dir,
    read_config,
    save_checkpoint,
    shipped_checkpoints,
)
from llmlab.data import generate_corpus, train_val_split
from llmlab.model import LLM, ModelConfig
from llmlab.tokenizer import CharTokenizer
from llmlab.train import heldout_loss

TEXT = "Once upon a time, there was a little dog.\n"


def make(**changes):
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    return LLM(dataclasses.replace(ModelConfig.tiny(tok.vocab_size), **changes)), tok


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": True, "position": "learned", "bias": True}])
def test_round_trip_gives_the_same_logits(tmp_path, changes):
    model, tok = make(**changes)
    with torch.no_grad():
        for p in model.parameters():  # move away from the init so a silent re-init would show
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(model, tok, tmp_path, {"note": "test"})
    loaded, tok2 = load_checkpoint(tmp_path)
    assert loaded.config == model.config and tok2.chars == tok.chars
    x = torch.tensor([tok.encode("a little dog")])  # (1, T)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert config["metadata"] == {"note": "test"} and config["num_parameters"] == model.num_parameters()


def test_errors(tmp_path):
    model, tok = make()
    with pytest.raises(TypeError, match="model must be"):
        save_checkpoint(torch.nn.Linear(2, 2), tok, tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        save_checkpoint(model, CharTokenizer.from_text("ab"), tmp_path)
    with pytest.raises(TypeError):
        save_checkpoint(model, tok, tmp_path, {"bad": object()})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="shipped checkpoints"):
        load_pretrained("no-such-model")


@pytest.fixture(scope="module")
def shipped():
    if "tiny-char" not in shipped_checkpoints():
        pytest.fail("the shipped checkpoint llmlab/checkpoints/tiny-char is missing")
    return load_pretrained("tiny-char")


def test_shipped_checkpoint_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_pretrained must not use the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    model, tok = load_pretrained()
    assert isinstance(model, LLM) and not model.training
    assert tok.vocab_size == model.config.vocab_size
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"


def test_shipped_checkpoint_reproduces_its_heldout_loss(shipped):
    model, tok = shipped
    meta = read_config(pretrained_dir())["metadata"]
    heldout = meta["heldout"]
    text = generate_corpus(meta["corpus_chars"])  # the corpus is deterministic: same text, same split
    assert len(text) == meta["corpus_chars"]
    _, val_ids = train_val_split(tok.encode(text))
    loss = heldout_loss(model, val_ids, heldout["block_size"], max_windows=heldout["check_windows"])
    assert loss == pytest.approx(heldout["check_loss"], abs=2e-3)
    assert heldout["full_loss"] < 1.2  # a trained model: the uniform guess is log(V) ~ 3.9
