"""llmlab.vocab_expansion: resizing keeps the old rows (as transformers' resize_token_embeddings),
initializes new rows as documented, keeps a tied head tied, and the expanded tokenizer matches its
added tokens first."""

import pytest
import torch

from llmlab.interop import to_hf
from llmlab.model import LLM, ModelConfig
from llmlab.tokenizer import CharTokenizer, load_tokenizer
from llmlab.vocab_expansion import ExpandedTokenizer, resize_token_embeddings


def _model(**kw):
    torch.manual_seed(0)
    return LLM(ModelConfig.tiny(vocab_size=20, **kw) if not kw else ModelConfig(vocab_size=20, block_size=16,
               n_layer=1, n_head=2, n_kv_head=2, n_embd=16, ffn_hidden=32, **kw))


def test_matches_transformers_resize():
    model = _model()
    hf = to_hf(model)
    old_emb, old_head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    resize_token_embeddings(model, 27, init="mean")
    torch.manual_seed(1)
    hf.resize_token_embeddings(27)  # mean_resizing=True: samples around the old mean (covariance * 1e-9)
    for mine, theirs, old in ((model.model.embed_tokens.weight, hf.get_input_embeddings().weight, old_emb),
                              (model.lm_head.weight, hf.get_output_embeddings().weight, old_head)):
        assert mine.shape == theirs.shape == (27, model.config.n_embd)
        torch.testing.assert_close(mine[:20], old, rtol=0, atol=0)  # old rows untouched
        torch.testing.assert_close(theirs[:20], old, rtol=0, atol=0)
        torch.testing.assert_close(mine[20:], theirs[20:], rtol=0, atol=1e-4)
    assert model.config.vocab_size == hf.config.vocab_size == 27
    ids = torch.tensor([[1, 5, 22, 26]])
    assert model(ids).logits.shape == (1, 4, 27)


def test_subtokens_and_random_init():
    model = _model()
    emb, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    resize_token_embeddings(model, 22, init="subtokens", subtokens=[[1, 2, 3], [4]])
    torch.testing.assert_close(model.model.embed_tokens.weight[20], emb[[1, 2, 3]].mean(0))
    torch.testing.assert_close(model.model.embed_tokens.weight[21], emb[4])
    torch.testing.assert_close(model.lm_head.weight[20], head[[1, 2, 3]].mean(0))
    model = _model()
    resize_token_embeddings(model, 120, init="random", generator=torch.Generator().manual_seed(0))
    new = model.model.embed_tokens.weight[20:]
    assert abs(new.std().item() - model.config.init_std) < 0.002


def test_tied_head_stays_tied_and_shrinking_keeps_prefix():
    model = _model(tie_embeddings=True, position="learned", norm="layernorm", ffn="gelu", bias=True)
    old = model.model.embed_tokens.weight.clone()
    resize_token_embeddings(model, 25)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight[:20], old)
    model = _model()
    old = model.model.embed_tokens.weight.clone()
    resize_token_embeddings(model, 10)
    assert torch.equal(model.model.embed_tokens.weight, old[:10])
    assert model.model.embed_tokens.weight.shape == (10, model.config.n_embd) and model.config.vocab_size == 10


def test_expanded_tokenizer():
    base = CharTokenizer.from_text("abcdefgh ")
    tok = ExpandedTokenizer(base, ["abc", "abcd", "gh"])
    assert tok.vocab_size == base.vocab_size + 3
    ids = tok.encode("abcd abc gh a")
    assert ids[:2] == [base.vocab_size + 1, base.encode(" ")[0]]  # longest added token wins
    assert tok.decode(ids) == "abcd abc gh a"
    assert tok.subtoken_ids == [base.encode("abc"), base.encode("abcd"), base.encode("gh")]


def test_expanded_tokenizer_json(tmp_path):
    tok = ExpandedTokenizer(CharTokenizer.from_text("xyz "), ["xyz"])
    back = load_tokenizer(tok.save(tmp_path / "t.json"))
    assert back.encode("xyz zy") == tok.encode("xyz zy")


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="init must be one of"):
        resize_token_embeddings(model, 30, init="zeros")
    with pytest.raises(ValueError, match="subtokens must list the old ids of each of the 2 new tokens"):
        resize_token_embeddings(model, 22, init="subtokens", subtokens=[[1]])
    with pytest.raises(ValueError, match="token id must be < vocab_size=20"):
        resize_token_embeddings(model, 21, init="subtokens", subtokens=[[25]])
    with pytest.raises(ValueError, match="new_vocab_size must be an integer >= 1"):
        resize_token_embeddings(model, 0)
    with pytest.raises(TypeError, match="model must be an llmlab.model.LLM"):
        resize_token_embeddings(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="added_tokens must not repeat"):
        ExpandedTokenizer(CharTokenizer.from_text("ab"), ["ab", "ab"])
