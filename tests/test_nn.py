"""QuantLinear / QuantConv2d: forward equals the dense layer with the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsd.nn import QuantConv2d, QuantLinear, dequantize_weight
from quantsd.quant import quantize_tensor


@pytest.mark.parametrize("method, bits, gran", [("uniform", 3, "channel"), ("pwlq", 4, "group:8"),
                                                ("pwlq-stochastic", 2, "tensor"), ("stochastic", 8, "tensor")])
def test_dequantize_weight_equals_qtensor(method, bits, gran):
    w = torch.randn(16, 32)
    qt = quantize_tensor(w, bits, method, gran, seed=3)
    got = dequantize_weight(qt.pack(), w.shape, bits, method, gran, qt.scale, qt.breakpoint, torch.float32)
    assert torch.equal(got, qt.dequantize())


def test_quant_linear_forward_and_dtype_handling():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    qt = quantize_tensor(lin.weight.detach(), 4, "pwlq", "channel")
    q = QuantLinear.from_linear(lin, qt)
    x = torch.randn(5, 32)
    assert torch.equal(q(x), F.linear(x, qt.dequantize(), lin.bias))
    assert torch.equal(q.weight, qt.dequantize())
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.numel() == 16 * 32 * 4 // 8
    q.to(torch.float64)  # compute dtype follows; stored parameters keep their dtype
    assert q.compute_dtype == torch.float64 and q.bias.dtype == torch.float64
    assert q.weight_scale.dtype == torch.float16 and q.weight_breakpoint.dtype == torch.float16
    assert torch.equal(q.weight, qt.dequantize().double())
    q.half()
    assert q.compute_dtype == torch.float16 and q.weight_scale.dtype == torch.float16
    assert set(q.state_dict()) == {"weight_packed", "weight_scale", "weight_breakpoint", "bias"}
    assert "bits=4" in repr(q)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=1, padding_mode="reflect"), dict(stride=2, groups=2)])
def test_quant_conv_forward(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, **kw)
    qt = quantize_tensor(conv.weight.detach(), 5, "uniform", "channel")
    q = QuantConv2d.from_conv(conv, qt)
    ref = nn.Conv2d(8, 6, 3, **kw)
    with torch.no_grad():
        ref.weight.copy_(qt.dequantize())
        ref.bias.copy_(conv.bias)
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("method", ["uniform", "stochastic", "pwlq", "pwlq-stochastic"])
def test_quant_embedding_lookup_equals_full_decode(bits, method):
    """Decoding only the looked-up rows gives exactly the full table's rows, for every
    granularity, including repeated ids, the last row and a 3-d id tensor."""
    from quantsd.nn import QuantEmbedding

    emb = nn.Embedding(50, 24, padding_idx=0)
    ids = torch.tensor([[[0, 3, 49, 3], [7, 7, 1, 0]]])
    for gran in ("tensor", "channel", "group:8", "group:3"):
        qt = quantize_tensor(emb.weight.detach(), bits, method, gran, seed=bits)
        q = QuantEmbedding.from_embedding(emb, qt)
        assert q.padding_idx == 0 and q._row_bytes == 24 * bits // 8
        want = qt.dequantize()
        out = q(ids)
        assert out.shape == (1, 2, 4, 24) and torch.equal(out, F.embedding(ids, want)), gran
        assert torch.equal(q.weight, want)


def test_quant_embedding_unaligned_rows_dtype_and_size():
    from quantsd.nn import QuantEmbedding

    emb = nn.Embedding(11, 5)   # 5 x 3 bits = 15 bits a row: rows are not byte-aligned
    qt = quantize_tensor(emb.weight.detach(), 3, "pwlq", "channel", seed=0)
    q = QuantEmbedding.from_embedding(emb, qt)
    assert q._row_bytes is None
    ids = torch.tensor([10, 0, 4])
    assert torch.equal(q(ids), F.embedding(ids, qt.dequantize()))
    q.half()  # compute dtype follows, stored parameters do not
    assert q(ids).dtype == torch.float16 and q.weight_scale.dtype == qt.scale.dtype
    assert torch.equal(q(ids), F.embedding(ids, qt.dequantize()).half())
    big = nn.Embedding(1000, 64)
    qb = QuantEmbedding.from_embedding(big, quantize_tensor(big.weight.detach(), 8, "uniform", "tensor"))
    assert qb.nbytes_packed < big.weight.numel() * 2 // 2 + 64   # 8-bit codes: half of fp16
    for gran in ("tensor", "channel", "group:4"):   # no ids: an empty (..., 0, dim) result, like nn.Embedding
        e = QuantEmbedding.from_embedding(big, quantize_tensor(big.weight.detach(), 4, "pwlq", gran))
        for shape in ((0,), (2, 0)):
            out = e(torch.zeros(shape, dtype=torch.long))
            assert out.shape == (*shape, 64) and out.shape == big(torch.zeros(shape, dtype=torch.long)).shape
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_embedding(nn.Embedding(4, 8, max_norm=1.0), qt)


def test_densify_small_layers_keeps_the_weights_and_outputs():
    """Small packed layers become dense layers with the very weights the packed ones decode (bit for
    bit), in the same train/eval mode; larger ones stay packed."""
    from quantsd.nn import QuantConv2d, QuantLinear, densify_small_layers, packed_modules
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    lin_small, lin_big, conv = nn.Linear(8, 8), nn.Linear(64, 64), nn.Conv2d(4, 6, 3, padding=1, bias=False)
    net = nn.Sequential(
        QuantLinear.from_linear(lin_small, quantize_tensor(lin_small.weight.detach(), 4, "pwlq", "tensor")),
        QuantLinear.from_linear(lin_big, quantize_tensor(lin_big.weight.detach(), 4, "pwlq", "channel")),
    ).eval()
    c = nn.Sequential(QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), 3, "uniform", "tensor"))).eval()
    x, y = torch.randn(5, 8), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        want_w = [m.dequantized_weight() for m in (net[0], net[1], c[0])]
        want_c = c(y)
        assert densify_small_layers(net, 64) == 1 and densify_small_layers(c, 4 * 6 * 9) == 1
        assert type(net[0]) is nn.Linear and isinstance(net[1], QuantLinear) and type(c[0]) is nn.Conv2d
        assert torch.equal(net[0].weight, want_w[0]) and torch.equal(c[0].weight, want_w[2]) and c[0].bias is None
        assert not net[0].training and not c[0].training and c[0].padding == (1, 1)
        assert torch.equal(c(y), want_c)
        assert torch.equal(net[0](x), torch.nn.functional.linear(x, want_w[0], net[0].bias))
        assert densify_small_layers(net, 0) == 0 and len(packed_modules(net)) == 1


def test_densify_in_inference_mode_and_with_grouped_layers():
    """Densified weights are ordinary tensors even when made under inference_mode (later casts and
    forwards outside it work), a layer passed alone is refused, and a layer that was in a grouped
    launch leaves it (its group no longer decodes it)."""
    from quantsd.dequant_groups import DequantGroup
    from quantsd.nn import QuantLinear, densify_small_layers
    from quantsd.quant import quantize_tensor

    lins = [nn.Linear(8, 8) for _ in range(2)]
    net = nn.Sequential(*[QuantLinear.from_linear(l, quantize_tensor(l.weight.detach(), 4, "pwlq", "tensor"))
                          for l in lins])
    g = DequantGroup([net[0], net[1]])     # (joins its members: _dq_group, _dq_index)
    assert (net[0]._dq_group, net[1]._dq_group, net[1]._dq_index) == (g, g, 1)
    with pytest.raises(ValueError, match="pass the model"):
        densify_small_layers(net[0], 100)
    with torch.inference_mode():
        assert densify_small_layers(net, 100) == 2
    assert not net[0].weight.is_inference() and not net[0].weight.requires_grad
    net.half().float()
    x = torch.randn(3, 8)
    assert net(x).shape == (3, 8)
    assert g._flat is None and all(m._dq_group is None for m in g.members)


def _qconv(i, o, k, bits, method, gran, seed=0, **kw):
    torch.manual_seed(seed)
    conv = nn.Conv2d(i, o, k, **kw)
    return QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), bits, method, gran, seed=seed))


@pytest.mark.parametrize("gran", ["tensor", "channel"])
@pytest.mark.parametrize("method", ["uniform", "pwlq"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_channels_last_round_trip(bits, method, gran):
    """Codes stored in (O, KH, KW, I) order decode to the very same weight, as a channels-last view
    (odd O, bit widths that straddle bytes), the forward is unchanged, and switching back restores
    the packed bytes exactly."""
    q = _qconv(16, 7, 3, bits, method, gran, seed=bits, padding=1)
    want, packed = q.dequantized_weight(), q.weight_packed.clone()
    x = torch.randn(2, 16, 5, 5)
    y = q(x)
    assert not q.codes_channels_last and q._fusable
    old = q.weight_packed
    q.set_codes_channels_last(True)
    assert q.codes_channels_last and q.weight_packed is not old
    assert not q._fusable   # the fused GEMM reads the natural order
    assert not torch.equal(q.weight_packed, packed)     # really stored in another order
    assert q.nbytes_packed == packed.numel() + q.weight_scale.numel() * q.weight_scale.element_size() + \
        (0 if q.weight_breakpoint is None else q.weight_breakpoint.numel() * q.weight_breakpoint.element_size())
    w = q.dequantized_weight()
    assert torch.equal(w, want) and w.permute(0, 2, 3, 1).is_contiguous() and not w.is_contiguous()
    # the forward convolves with exactly those weights; a channels-last weight may make the CPU's conv
    # take another algorithm (oneDNN on an AVX2-only host: last-bit differences from the NCHW run), so
    # against the NCHW forward the output is equal up to rounding
    out = q(x)
    assert torch.equal(out, F.conv2d(x, w, q.bias, q.stride, q.padding))
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)
    assert "codes_channels_last=True" in repr(q)
    q.set_codes_channels_last(False)
    assert torch.equal(q.weight_packed, packed) and q._fusable and torch.equal(q.dequantized_weight(), want)


def test_codes_channels_last_state_dict_is_natural_order():
    """Checkpoints never see the internal order: a repacked layer's state_dict equals the natural
    one byte for byte, a natural-order state_dict loads into a repacked layer (plain and assign=True),
    and the order travels with deepcopy and .to()."""
    import copy

    q = _qconv(8, 5, 3, 5, "pwlq", "channel", seed=1)
    nat = {k: v.clone() for k, v in q.state_dict().items()}
    want = q.dequantized_weight()
    q.set_codes_channels_last(True)
    sd = q.state_dict()
    assert sd.keys() == nat.keys() and all(torch.equal(sd[k], nat[k]) for k in nat)
    assert all(sd[k].dtype == nat[k].dtype for k in nat)
    other = _qconv(8, 5, 3, 5, "pwlq", "channel", seed=2)
    other_sd = {k: v.clone() for k, v in other.state_dict().items()}
    for assign in (False, True):
        r = copy.deepcopy(q)
        assert r.codes_channels_last
        r.load_state_dict(other_sd, assign=assign)
        assert r.codes_channels_last and torch.equal(r.dequantized_weight(), other.dequantized_weight())
        assert all(torch.equal(r.state_dict()[k], other_sd[k]) for k in other_sd)
        assert torch.equal(other_sd["weight_packed"], other.weight_packed)   # the caller's dict is left as given
    r = copy.deepcopy(q).to(torch.float64)
    assert r.codes_channels_last and torch.equal(r.dequantized_weight(), want.double())


@pytest.mark.parametrize("kw, gran, why", [(dict(kernel_size=1), "tensor", "1x1"),
                                           (dict(kernel_size=3), "group:8", "granularity"),
                                           (dict(kernel_size=3, groups=2), "tensor", "groups=2")])
def test_codes_channels_last_refuses_ineligible_layers(kw, gran, why):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, **kw)
    q = QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), 4, "uniform", gran))
    packed = q.weight_packed
    with pytest.raises(ValueError, match=why):
        q.set_codes_channels_last(True)
    assert q.weight_packed is packed and not q.codes_channels_last
    q.set_codes_channels_last(False)   # already natural: nothing to do
    lin = nn.Linear(8, 4)
    ql = QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "uniform", "tensor"))
    with pytest.raises(ValueError, match="QuantConv2d"):
        ql.set_codes_channels_last(True)
