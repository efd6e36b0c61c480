"""Bad inputs raise QuantError (a ValueError) whose message names the problem and the choices."""

from __future__ import annotations

import pytest
import torch

from quantsd.quant import METHODS, QTensor, QuantError, fake_quantize, parse_granularity, quantize_tensor


def test_quanterror_is_valueerror():
    assert issubclass(QuantError, ValueError)


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, 4.5, "4", None, True])
def test_bad_bits(bits):
    with pytest.raises(QuantError, match=r"bits must be an integer in 2\.\.8"):
        quantize_tensor(torch.randn(8), bits=bits, method="uniform")


@pytest.mark.parametrize("method", ["PWLQ", "linear", "", None, "pwlq_stochastic"])
def test_unknown_method_lists_valid(method):
    with pytest.raises(QuantError, match="unknown quantization method") as ei:
        fake_quantize(torch.randn(8), 4, method)
    for m in METHODS:
        assert m in str(ei.value)


@pytest.mark.parametrize("spec", ["row", "Tensor", "group", "group:", "group:0", "group:-4", "group:x", "group:4.0", 3, None])
def test_bad_granularity(spec):
    with pytest.raises(QuantError, match="granularity") as ei:
        quantize_tensor(torch.randn(4, 8), 4, "uniform", spec)
    assert "group:G" in str(ei.value)


def test_parse_granularity_canonical():
    assert str(parse_granularity("tensor")) == "tensor"
    assert str(parse_granularity("channel")) == "channel"
    g = parse_granularity("group:64")
    assert g.kind == "group" and g.group_size == 64 and str(g) == "group:64"


def test_group_must_divide_row():
    with pytest.raises(QuantError, match=r"group size 5 does not divide the row length 8"):
        quantize_tensor(torch.randn(4, 8), 4, "uniform", "group:5")
    with pytest.raises(QuantError, match=r"row length 27"):  # conv: row = in*kh*kw
        quantize_tensor(torch.randn(4, 3, 3, 3), 4, "pwlq", "group:6")


def test_channel_needs_a_dimension():
    with pytest.raises(QuantError, match="0-d tensor"):
        quantize_tensor(torch.tensor(1.5), 4, "uniform", "channel")
    quantize_tensor(torch.tensor(1.5), 4, "uniform", "tensor")  # fine


@pytest.mark.parametrize("bad,count", [(float("nan"), 2), (float("inf"), 2), (float("-inf"), 1)])
def test_nan_inf_weights(bad, count):
    w = torch.randn(10)
    w[:count] = bad
    with pytest.raises(QuantError, match=f"weight contains {count} NaN/Inf values"):
        quantize_tensor(w, 4, "pwlq")


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0, 3, 3)])
def test_empty_tensor(shape):
    with pytest.raises(QuantError, match="empty tensor"):
        quantize_tensor(torch.randn(shape), 4, "uniform")


def test_too_large_for_fp16_scale():
    w = torch.tensor([1.0, -7.0e4, 3.0])
    with pytest.raises(QuantError, match=r"scale_dtype=torch\.float32"):
        quantize_tensor(w, 4, "uniform")
    qt = quantize_tensor(w, 8, "uniform", scale_dtype=torch.float32)
    assert torch.allclose(qt.dequantize(), w, atol=7e4 / 255 + 1)


def test_bad_scale_dtype_and_inputs():
    with pytest.raises(QuantError, match="scale_dtype"):
        quantize_tensor(torch.randn(4), 4, "uniform", scale_dtype=torch.int8)
    with pytest.raises(QuantError, match="floating-point"):
        quantize_tensor(torch.arange(4), 4, "uniform")
    with pytest.raises(QuantError, match="torch.Tensor"):
        quantize_tensor([1.0, 2.0], 4, "uniform")
    with pytest.raises(QuantError, match="seed"):
        quantize_tensor(torch.randn(4), 4, "stochastic", seed=1.5)


def test_from_packed_validation():
    w = torch.randn(6, 8)
    qt = quantize_tensor(w, 4, "pwlq", "channel")
    packed = qt.pack()
    with pytest.raises(QuantError, match="scale has shape"):
        QTensor.from_packed(packed, w.shape, 4, "pwlq", "channel", qt.scale[:3], qt.breakpoint)
    with pytest.raises(QuantError, match="needs a breakpoint"):
        QTensor.from_packed(packed, w.shape, 4, "pwlq", "channel", qt.scale)
    with pytest.raises(QuantError, match="takes no breakpoint"):
        QTensor.from_packed(packed, w.shape, 4, "uniform", "channel", qt.scale, qt.breakpoint)
    with pytest.raises(QuantError, match="truncated"):
        QTensor.from_packed(packed[:-1], w.shape, 4, "pwlq", "channel", qt.scale, qt.breakpoint)
    with pytest.raises(QuantError, match="need exactly"):
        QTensor.from_packed(packed, (6, 9), 4, "pwlq", "channel", qt.scale, qt.breakpoint)
    with pytest.raises(QuantError, match="unknown quantization method"):
        QTensor.from_packed(packed, w.shape, 4, "pwl", "channel", qt.scale, qt.breakpoint)
