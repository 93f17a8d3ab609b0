"""llmlab.norms and llmlab.ffn against transformers (GPT-2's MLP), the released LLaMA configs, and
the invariant RMSNorm is written for: half-precision inputs whose squares overflow still normalize."""

import pytest
import torch
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from llmlab.ffn import GELUMLP, swiglu_hidden
from llmlab.norms import RMSNorm, make_norm
from llmlab.reference_configs import load_reference_config


def test_gelu_mlp_equals_gpt2_mlp():
    config = GPT2Config(n_embd=16, n_inner=64, activation_function="gelu_new", resid_pdrop=0.0)
    ref = GPT2MLP(64, config).eval()
    ours = GELUMLP(16, 64)
    with torch.no_grad():  # GPT-2's Conv1D stores (in, out); nn.Linear stores (out, in)
        ours.up_proj.weight.copy_(ref.c_fc.weight.T)
        ours.up_proj.bias.copy_(ref.c_fc.bias)
        ours.down_proj.weight.copy_(ref.c_proj.weight.T)
        ours.down_proj.bias.copy_(ref.c_proj.bias)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-7b", "llama-2-7b"])
def test_swiglu_hidden_reproduces_the_released_width(name):
    fields = load_reference_config(name).fields
    assert swiglu_hidden(fields["hidden_size"], multiple_of=256) == fields["intermediate_size"]


def test_rmsnorm_in_half_precision_does_not_overflow():
    x = torch.full((2, 8), 300.0).half()  # 300^2 = 90000 > 65504, the largest float16
    assert torch.isinf(x.pow(2)).any()  # a naive float16 reduction overflows
    y = RMSNorm(8).half()(x)  # a float16 model, as after model.half()
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, torch.ones(2, 8, dtype=torch.float16))


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: RMSNorm(0), ValueError, "dim"),
        (lambda: RMSNorm(8)(torch.randn(2, 7)), ValueError, "C=8"),
        (lambda: make_norm("batchnorm", 8), ValueError, "kind must be one of"),
        (lambda: swiglu_hidden(0), ValueError, "n_embd"),
        (lambda: GELUMLP(16, 0), ValueError, "hidden"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
