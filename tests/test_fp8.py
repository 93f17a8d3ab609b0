"""llmlab.fp8: format numbers from torch.finfo and the OCP FP8 definition, round trips within
half an ulp, block scaling beats per-tensor scaling when a few outliers are present, and FP8
matmul errors sit above bf16's."""

import pytest
import torch

from llmlab.fp8 import dequantize_fp8, fp8_formats, fp8_matmul, quantize_fp8, relative_error


def test_formats():
    f = fp8_formats()
    # Micikevicius et al. 2022, Table 1: E4M3 max 448, min normal 2^-6, min subnormal 2^-9;
    # E5M2 max 57344, min normal 2^-14, min subnormal 2^-16.
    assert (f["e4m3"]["max"], f["e4m3"]["smallest_normal"], f["e4m3"]["smallest_subnormal"]) == (448.0, 2**-6, 2**-9)
    assert (f["e5m2"]["max"], f["e5m2"]["smallest_normal"], f["e5m2"]["smallest_subnormal"]) == (
        57344.0, 2**-14, 2**-16)
    assert f["e4m3"]["eps"] == 2**-3 and f["e5m2"]["eps"] == 2**-2
    # the subnormal figure is a real FP8 value: it survives a round trip, half of it does not
    for fmt, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        tiny = torch.tensor(f[fmt]["smallest_subnormal"])
        assert float(tiny.to(dtype).float()) == float(tiny)
        assert float((tiny / 4).to(dtype).float()) == 0.0


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", [None, (1, 128), (128, 128)])
def test_round_trip_within_half_an_ulp(fmt, block):
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    q, scale = quantize_fp8(x, fmt, block)
    back = dequantize_fp8(q, scale)
    eps = fp8_formats()[fmt]["eps"]
    big = x.abs() > 0.5  # normal range after scaling for every block here
    assert ((back - x).abs()[big] <= x.abs()[big] * eps / 2 + 1e-7).all()
    bm, bk = (256, 256) if block is None else block
    assert scale.shape == (256 // bm, 256 // bk)


def test_block_scaling_survives_outliers():
    """One huge activation per row ruins per-tensor scaling for every other value; 1x128 tiles confine it."""
    torch.manual_seed(0)
    x = torch.randn(64, 512) * 1e-3
    x[:, 0] = 1000.0  # outlier channel
    per_tensor = relative_error(dequantize_fp8(*quantize_fp8(x[:, 128:], "e4m3", None)), x[:, 128:])
    x_pt = dequantize_fp8(*quantize_fp8(x, "e4m3", None))
    x_bl = dequantize_fp8(*quantize_fp8(x, "e4m3", (1, 128)))
    err_pt = relative_error(x_pt[:, 128:], x[:, 128:])  # tiles without the outlier
    err_bl = relative_error(x_bl[:, 128:], x[:, 128:])
    assert err_bl < 0.05 < err_pt and per_tensor < 0.05


def test_matmul_error_vs_bf16():
    torch.manual_seed(0)
    x, w = torch.randn(64, 512), torch.randn(256, 512)
    ref = x.double() @ w.double().t()
    bf16 = relative_error((x.bfloat16() @ w.bfloat16().t()).float(), ref)
    e4m3 = relative_error(fp8_matmul(x, w, "e4m3"), ref)
    e5m2 = relative_error(fp8_matmul(x, w, "e5m2"), ref)
    assert bf16 < e4m3 < e5m2  # 8 > 4 > 3 significand bits
    assert e4m3 < 0.05


def test_errors():
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize_fp8(torch.randn(4, 4), "e3m4")
    with pytest.raises(ValueError, match="must divide"):
        quantize_fp8(torch.randn(4, 100), block=(1, 128))
    with pytest.raises(ValueError, match="share K"):
        fp8_matmul(torch.randn(2, 128), torch.randn(128, 256))
