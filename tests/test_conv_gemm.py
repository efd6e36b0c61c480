"""quantsd.conv_gemm: small-output convolutions as one GEMM (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsd.conv_gemm import GemmConv2d, conv2d_as_gemm, convs_as_gemm, env_max_rows, gemm_rows_ok


@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2), ((3, 1), (2, 1), (1, 0), 1), (5, 1, 2, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_as_gemm_equals_conv2d(k, stride, padding, dilation, channels_last):
    pair = nn.modules.utils._pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 7, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, *pair(k), generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    if channels_last:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    ref = F.conv2d(x, w, b, pair(stride), pair(padding), pair(dilation))
    got = conv2d_as_gemm(x, w, b, pair(stride), pair(padding), pair(dilation))
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv2d_as_gemm(x, w, None, pair(stride), pair(padding), pair(dilation)),
                               F.conv2d(x, w, None, pair(stride), pair(padding), pair(dilation)))


def test_a_channels_last_weight_goes_in_without_a_copy():
    """A channels-last weight (how compiled packed layers decode k x k weights) is already in the
    patches' (KH, KW, I) order: its GEMM operand is a view of the same memory."""
    w = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    assert w.permute(0, 2, 3, 1).reshape(4, 27).data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match="groups must be 1"):
        conv2d_as_gemm(torch.randn(1, 5, 4, 4), w, None)


def test_rows_rule():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 8, 8)             # 2 x 8 x 8 = 128 output rows
    assert gemm_rows_ok(conv, x, 128) and not gemm_rows_ok(conv, x, 127) and not gemm_rows_ok(conv, x, 0)
    assert gemm_rows_ok(nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.randn(2, 8, 16, 16), 128)
    assert not gemm_rows_ok(nn.Conv2d(8, 8, 3, padding=1, groups=2), x, 1 << 20)
    assert not gemm_rows_ok(nn.Conv2d(8, 8, 3, padding="same"), x, 1 << 20)
    assert not gemm_rows_ok(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), x, 1 << 20)


def test_env_setting(monkeypatch):
    monkeypatch.delenv("QUANTSD_CONV_GEMM_MAX_ROWS", raising=False)
    assert env_max_rows() == 0
    monkeypatch.setenv("QUANTSD_CONV_GEMM_MAX_ROWS", "256")
    assert env_max_rows() == 256
    monkeypatch.setenv("QUANTSD_CONV_GEMM_MAX_ROWS", "lots")
    with pytest.raises(ValueError, match="QUANTSD_CONV_GEMM_MAX_ROWS must be a non-negative integer"):
        env_max_rows()


def test_compiled_model_takes_the_gemm_below_the_row_limit_only(monkeypatch):
    """convs_as_gemm swaps plain convolutions for GemmConv2d (same parameters) and sets packed ones;
    a compiled forward then runs the small-output ones as GEMMs -- same result -- and leaves the
    large-output ones (and every eager forward) to F.conv2d."""
    import quantsd.conv_gemm as cg

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    ref_in = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = model(ref_in)
    params = [p.data_ptr() for p in model.parameters()]
    assert convs_as_gemm(model, max_rows=16) == 2
    assert all(type(m) is GemmConv2d for m in (model[0], model[2]))
    assert [p.data_ptr() for p in model.parameters()] == params
    calls = []
    real = cg.conv2d_as_gemm
    monkeypatch.setattr(cg, "conv2d_as_gemm", lambda *a: calls.append(a[1].shape) or real(*a))
    with torch.no_grad():
        assert torch.equal(model(ref_in), ref) and not calls          # eager: cuDNN / F.conv2d
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(ref_in)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the first conv has 64 output rows (over the limit), the strided one 16
    assert calls == [torch.Size([8, 8, 3, 3])]
    with pytest.raises(ValueError, match="max_rows must be >= 0"):
        convs_as_gemm(model, -1)


def test_packed_conv_takes_the_gemm_when_compiled(monkeypatch):
    from quantsd.nn import QuantConv2d
    from quantsd.quant import quantize_tensor
    import quantsd.conv_gemm as cg

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    qt = quantize_tensor(conv.weight.detach(), 4, "pwlq", "tensor")
    q = QuantConv2d.from_conv(conv, qt)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        ref = q(x)
    assert convs_as_gemm(q, max_rows=32) == 1 and q.gemm_max_rows == 32
    calls = []
    real = cg.conv2d_as_gemm
    monkeypatch.setattr(cg, "conv2d_as_gemm", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(q, backend="eager")(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]
