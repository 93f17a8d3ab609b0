"""llmlab.prompt_tuning against peft (prompt tuning, P-tuning, prefix tuning / P-tuning v2 on a tiny
transformers Llama: same virtual-token weights -> same logits and loss) and against invariants:
prefixes are key/value caches of virtual tokens, soft prompts made of vocabulary rows are hard
prompts, collapsing the reparameterization changes nothing, the base model stays frozen."""


import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from llmlab.model import LLM
from llmlab.prompt_tuning import (
    ModelGeometry,
    PrefixConfig,
    PrefixEncoder,
    PrefixModel,
    PromptConfig,
    PromptEncoder,
    SoftPromptModel,
    input_embedding,
    trainable_parameters,
)
from tests.models import peft_pair, tiny_llama, tiny_llmlab, train_steps

N = 4  # virtual tokens


G = torch.Generator().manual_seed(5)
IDS = torch.randint(0, 64, (2, 7), generator=G)
MASK = torch.tensor([[1] * 7, [0, 0] + [1] * 5])  # the second row is left-padded
HARD_PROMPT = torch.randint(0, 64, (1, N), generator=G)


def randomize(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --- equality with peft --------------------------------------------------------------------------


PEFT_PROMPT_CASES = [
    (PromptConfig.prompt_tuning(N), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    (
        PromptConfig(num_virtual_tokens=N, encoder="mlp", encoder_hidden_size=16),
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    ),
    (
        PromptConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=16),
        PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
        ),
    ),
]


@pytest.mark.parametrize("ours_cfg,peft_cfg", PEFT_PROMPT_CASES, ids=["prompt_tuning", "p_tuning_mlp", "p_tuning_lstm"])
def test_virtual_tokens_give_peft_logits_and_loss(ours_cfg, peft_cfg):
    ours, theirs = peft_pair(tiny_llama(), lambda m: SoftPromptModel(m, ours_cfg), peft_cfg, seed=3)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        out_t = theirs(input_ids=IDS, attention_mask=MASK, labels=IDS)
        out_o = ours(IDS, attention_mask=MASK, labels=IDS)
    assert out_o.logits.shape == (2, N + 7, 64)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=1e-5, atol=1e-6)
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("projection", [True, False], ids=["prefix_tuning", "p_tuning_v2"])
def test_prefixes_give_peft_logits(projection):
    peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection)
    ours_cfg = PrefixConfig(num_virtual_tokens=N, projection=projection)
    ours, theirs = peft_pair(tiny_llama(), lambda m: PrefixModel(m, ours_cfg), peft_cfg, seed=3)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        out_t = theirs(input_ids=IDS, attention_mask=MASK, labels=IDS)
        out_o = ours(IDS, attention_mask=MASK, labels=IDS)
    assert out_o.logits.shape == (2, 7, 64)
    torch.testing.assert_close(out_o.logits, out_t.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_o.loss, out_t.loss, rtol=1e-5, atol=1e-6)
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()[0]


# --- invariants ----------------------------------------------------------------------------------


def real_kv(model, prompt):
    """Per-layer (K, N, D) keys and values of real tokens, from each library's own cache."""
    with torch.no_grad():
        if isinstance(model, LLM):
            cache = model.new_cache()
            model(prompt, cache=cache)
            return [(cache.keys[i][0], cache.values[i][0]) for i in range(cache.n_layer)]
        cache = model(prompt, use_cache=True).past_key_values
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


@pytest.mark.parametrize("make", [tiny_llama, tiny_llmlab], ids=["transformers", "llmlab"])
def test_a_prefix_is_a_kv_cache_of_virtual_tokens(make):
    base = make()
    model = PrefixModel(base, PrefixConfig.p_tuning_v2(N)).eval()
    model.prompt_encoder.set_prefixes(real_kv(base, HARD_PROMPT))
    with torch.no_grad():
        expected = base(torch.cat([HARD_PROMPT.expand(2, -1), IDS], dim=1)).logits[:, N:]
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_llmlab], ids=["transformers", "llmlab"])
def test_soft_prompt_of_vocabulary_rows_is_a_hard_prompt(make):
    base = make()
    model = SoftPromptModel(base, PromptConfig.prompt_tuning(N)).eval()
    with torch.no_grad():
        emb = input_embedding(base)
        model.prompt_encoder.embedding.weight.copy_(emb.weight[HARD_PROMPT[0]])
        expected = base(torch.cat([HARD_PROMPT.expand(2, -1), IDS], dim=1)).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_llmlab_prefix_model_with_padding_mask_and_targets():
    base = tiny_llmlab()
    model = PrefixModel(base, PrefixConfig.prefix_tuning(N))
    out = model(IDS, attention_mask=MASK, targets=IDS)
    assert out.logits.shape == (2, 7, 64)
    # targets are per position (llmlab's convention, no shift): the loss is the mean cross-entropy
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), IDS.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)
    out.loss.backward()
    assert all(p.grad.abs().max() > 0 for p in model.prompt_encoder.parameters())
    assert all(p.grad is None for p in base.parameters())
    with torch.no_grad():  # the gradient points downhill: a small step against it lowers the loss
        for p in model.prompt_encoder.parameters():
            p -= 1e-2 * p.grad
        assert model(IDS, attention_mask=MASK, targets=IDS).loss < out.loss


def test_collapsing_the_prefix_mlp_changes_nothing():
    model = PrefixModel(tiny_llama(), PrefixConfig(num_virtual_tokens=N, projection=True, encoder_hidden_size=16))
    randomize(model.prompt_encoder)
    with torch.no_grad():
        before = model(IDS, attention_mask=MASK).logits
        n_before = trainable_parameters(model)
        model.collapse()
        torch.testing.assert_close(model(IDS, attention_mask=MASK).logits, before, rtol=0, atol=1e-6)
    geometry = ModelGeometry.of(model.base_model)
    assert not model.prompt_encoder.projection
    assert trainable_parameters(model) == N * geometry.num_layers * 2 * geometry.num_kv_heads * geometry.head_dim
    assert n_before != trainable_parameters(model)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_encoder_collapses_to_a_table_and_is_input_independent(encoder):
    model = SoftPromptModel(tiny_llama(), PromptConfig.p_tuning(N, encoder=encoder)).eval()
    other = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(IDS).logits, model(other).logits
        # the virtual tokens come first, so under causal attention their outputs cannot see the text
        torch.testing.assert_close(a[:, :N], b[:, :N], rtol=0, atol=1e-6)
        assert isinstance(model.prompt_encoder, PromptEncoder)
        model.prompt_encoder = model.prompt_encoder.collapse()
        torch.testing.assert_close(model(IDS).logits, a, rtol=0, atol=1e-6)


def test_prompt_tuning_trains_only_the_prompt_and_lowers_the_loss():
    base = tiny_llama()
    model = SoftPromptModel(base, PromptConfig.prompt_tuning(N))
    assert trainable_parameters(model) == N * 32
    losses = train_steps(model, [IDS] * 5, lr=0.1, optimizer=torch.optim.Adam)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in base.parameters())


def test_prefix_layout_is_layer_then_key_value_then_head():
    geometry = ModelGeometry(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4)
    enc = PrefixEncoder(PrefixConfig.p_tuning_v2(3), geometry)
    with torch.no_grad():
        enc.embedding.weight.copy_(torch.arange(3 * 32, dtype=torch.float32).view(3, 32))
    prefixes = enc()
    assert len(prefixes) == 2 and prefixes[0][0].shape == (2, 3, 4)
    assert prefixes[0][0][0, 0].tolist() == [0, 1, 2, 3]  # layer 0 key, head 0, position 0
    assert prefixes[0][1][0, 0].tolist() == [8, 9, 10, 11]  # layer 0 value follows its key
    assert prefixes[1][0][1, 2].tolist() == [84, 85, 86, 87]  # layer 1 key, head 1, position 2


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: PromptConfig(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be an integer >= 1"),
        (lambda: PromptConfig(encoder="gru"), ValueError, "encoder must be one of"),
        (lambda: PrefixConfig(token_dim=0), ValueError, "token_dim must be"),
        (lambda: SoftPromptModel("model", PromptConfig()), TypeError, "model must be a torch.nn.Module"),
        (lambda: PrefixModel(tiny_llama(), PromptConfig()), TypeError, "config must be a PrefixConfig"),
        (lambda: SoftPromptModel(tiny_llama(), PromptConfig())(IDS[0]), ValueError, "input_ids must have 2"),
        (
            lambda: PrefixModel(tiny_llama(), PrefixConfig.prefix_tuning(N)).prompt_encoder.set_prefixes([]),
            ValueError,
            "projection-free",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- llmlab's LLM against peft on the same weights in transformers -------------------------------
# No left padding here: with a padding mask llmlab's LLM starts each row's positions at its first
# real token, while transformers' Llama counts the pads, so padded rows differ by design.
FULL = torch.ones_like(MASK)


@pytest.mark.parametrize("projection", [True, False], ids=["prefix_tuning", "p_tuning_v2"])
def test_llmlab_kv_cache_prefix_equals_peft_on_the_converted_model(projection):
    from llmlab.interop import to_hf

    base = tiny_llmlab()
    peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection)
    ours_cfg = PrefixConfig(num_virtual_tokens=N, projection=projection)
    ours, theirs = peft_pair(base, lambda m: PrefixModel(m, ours_cfg), peft_cfg, hf_base=to_hf(base), seed=3)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS, attention_mask=FULL).logits
        torch.testing.assert_close(ours(IDS, attention_mask=FULL).logits, expected, rtol=1e-5, atol=1e-5)


def test_llmlab_soft_prompt_equals_peft_on_the_converted_model():
    from llmlab.interop import to_hf

    base = tiny_llmlab()
    ours_cfg, peft_cfg = PEFT_PROMPT_CASES[1]
    ours, theirs = peft_pair(base, lambda m: SoftPromptModel(m, ours_cfg), peft_cfg, hf_base=to_hf(base), seed=3)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        expected = theirs(input_ids=IDS, attention_mask=FULL).logits
        torch.testing.assert_close(ours(IDS, attention_mask=FULL).logits, expected, rtol=1e-5, atol=1e-5)


def test_prompt_init_from_vocabulary_rows():
    model = SoftPromptModel(tiny_llama(), PromptConfig.prompt_tuning(N))
    emb = input_embedding(model.base_model)
    model.prompt_encoder.init_from_vocab(emb, generator=torch.Generator().manual_seed(0))
    table = model.prompts()
    assert table.shape == (N, 32)
    assert all((emb.weight == row).all(dim=1).any() for row in table)


def test_prefixes_follow_a_half_precision_model():
    model = PrefixModel(tiny_llama().to(torch.bfloat16), PrefixConfig.prefix_tuning(N))
    assert model.prompt_encoder.embedding.weight.dtype == torch.float32  # trained in float32
    out = model(IDS, labels=IDS)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    grad = model.prompt_encoder.embedding.weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().max() > 0
