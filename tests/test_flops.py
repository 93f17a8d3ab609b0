"""llmlab.flops against analytic FLOP counts (2 m n k per matrix product)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import sdpa_flop_count

from llmlab.flops import count_flops, count_flops_by_operator, matmul_flops


def test_matmul_equals_two_m_n_k():
    a, b = torch.randn(7, 5), torch.randn(5, 3)  # (m, k), (k, n)
    assert count_flops(torch.matmul, a, b) == 2 * 7 * 3 * 5 == matmul_flops(7, 3, 5)


def test_linear_forward_and_backward():
    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)  # (N, C_in)
    forward = count_flops(layer, x)
    assert forward == 2 * 4 * 8 * 16
    # backward: one product for dL/dx and one for dL/dW, each as large as the forward
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward
    with torch.no_grad():
        assert count_flops(layer, x) == forward  # no_grad changes memory, not the count


def test_keyword_arguments_are_passed():
    x = torch.randn(3, 4)
    w = torch.randn(6, 4)
    assert count_flops(F.linear, x, weight=w) == matmul_flops(3, 6, 4)


def test_meta_device_counts_without_work():
    a = torch.empty(4096, 11008, device="meta")  # one LLaMA-7B FFN matrix
    b = torch.empty(11008, 1, device="meta")
    assert count_flops(torch.matmul, a, b) == 2 * 4096 * 11008


def test_by_operator_splits_bmm_and_mm_and_skips_softmax():
    q = torch.randn(2, 6, 4)  # (B, T, D)
    w = torch.randn(4, 4)

    def fn():
        scores = (q @ q.transpose(1, 2)).softmax(-1)  # (B, T, T): bmm, then no-FLOP softmax
        return scores @ q, q.reshape(12, 4) @ w  # bmm (B, T, D) and mm (B*T, D)

    counts = count_flops_by_operator(fn)
    assert counts == {"aten.bmm": 2 * (2 * 6 * 6 * 4) * 2, "aten.mm": 2 * 12 * 4 * 4}
    assert list(counts) == sorted(counts)
    assert count_flops(fn) == sum(counts.values())


def test_explicit_attention_equals_pytorch_sdpa_formula():
    b, h, t, s, d = 2, 3, 5, 7, 8
    q = torch.randn(b, h, t, d)  # (B, H, T, D)
    k, v = torch.randn(2, b, h, s, d).unbind(0)  # (B, H, S, D) each

    def attention():
        return (q @ k.transpose(-2, -1) / d**0.5).softmax(-1) @ v  # (B, H, T, D)

    # Q K^T and P V: 2 T S D each per head; the formula PyTorch applies to its fused kernels
    assert count_flops(attention) == 4 * b * h * t * s * d == sdpa_flop_count(q.shape, k.shape, v.shape)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="fn must be callable"):
        count_flops(3)
    with pytest.raises(ValueError, match="m must be an integer >= 0"):
        matmul_flops(-1, 2, 3)
    with pytest.raises(TypeError, match="k must be an integer"):
        matmul_flops(1, 2, 3.0)
