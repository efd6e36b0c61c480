"""The armed call (quantsd.nn.set_armed_calls): an armed packed layer's eager call goes straight to
its op -- the same output as nn.Module.__call__ + forward -- and takes nn.Module.__call__ whenever
that would do more (hooks on the layer or on every module, a forward set on the instance, keyword
input, no weight handed over, torch.compile); only eager prehook groups give it, ungrouping and
compiled grouping take it back."""

import pytest
import torch
from torch import nn

from quantsd.nn import QuantConv2d, QuantLinear, set_armed_calls
from quantsd.quant import quantize_tensor


def _armed(layer):
    """``layer`` with the armed call and its weight handed over as a group's arm does (a one-member
    hand-over cell)."""
    set_armed_calls(layer, True)
    layer.__dict__["_arm_cell"] = [[layer.dequantized_weight()]]
    return layer


def _layers():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    lin_nobias = nn.Linear(8, 6, bias=False)
    conv = nn.Conv2d(4, 5, 3, padding=1)
    conv_reflect = nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect", bias=False)
    q = {
        "linear": QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "pwlq", "channel")),
        "linear, no bias": QuantLinear.from_linear(lin_nobias, quantize_tensor(lin_nobias.weight.detach(), 3,
                                                                               "uniform", "tensor")),
        "conv": QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), 4, "pwlq", "channel")),
        "conv, reflect padding": QuantConv2d.from_conv(conv_reflect, quantize_tensor(conv_reflect.weight.detach(), 5,
                                                                                     "uniform", "channel")),
    }
    inputs = {"linear": torch.randn(3, 8), "linear, no bias": torch.randn(2, 5, 8), "conv": torch.randn(2, 4, 6, 6),
              "conv, reflect padding": torch.randn(1, 4, 5, 7)}
    return q, inputs


def _took_forward(layer, x) -> tuple[torch.Tensor, bool]:
    """The call's output, and whether it went through the layer's forward (nn.Module.__call__)."""
    seen = []
    plain = type(layer).__mro__[2]          # QuantLinear / QuantConv2d: the forward is theirs
    cls_forward = plain.forward

    def spy(self, *args, **kwargs):
        seen.append(1)
        return cls_forward(self, *args, **kwargs)

    plain.forward = spy
    try:
        out = layer(x)
    finally:
        plain.forward = cls_forward
    return out, bool(seen)


@pytest.mark.parametrize("name", ["linear", "linear, no bias", "conv", "conv, reflect padding"])
def test_an_armed_call_skips_forward_and_gives_its_output(name):
    layers, inputs = _layers()
    layer, x = _armed(layers[name]), inputs[name]
    with torch.inference_mode():
        want = nn.Module.__call__(layer, x)          # nn.Module.__call__ + forward, the other way
        got, took_forward = _took_forward(layer, x)
    assert not took_forward
    assert torch.equal(got, want)


def test_every_reason_to_take_nn_module_call_is_honoured():
    layers, inputs = _layers()
    layer, x = _armed(layers["linear"]), inputs["linear"]
    with torch.inference_mode():
        want = nn.Module.__call__(layer, x)
        # a forward hook on the layer runs, and its output replaces the call's
        handle = layer.register_forward_hook(lambda mod, args, out: out * 2)
        out, took = _took_forward(layer, x)
        assert took and torch.equal(out, want * 2)
        handle.remove()
        # a pre-hook changes the input
        handle = layer.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
        out, took = _took_forward(layer, x)
        assert took and torch.equal(out, nn.Module.__call__(layer, x * 0))
        handle.remove()
        # a hook on every module
        calls = []
        handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append(mod))
        try:
            out, took = _took_forward(layer, x)
        finally:
            handle.remove()
        assert took and calls == [layer] and torch.equal(out, want)
        # keyword input, nothing handed over
        assert _took_forward(layer, x)[1] is False
        assert torch.equal(layer(x=x), want)
        layer.__dict__["_arm_cell"] = [None]
        out, took = _took_forward(layer, x)
        assert took and torch.allclose(out, want)
        # a forward set on the instance (accelerate's hooks do this) is the one called
        _armed(layer)
        layer.forward = lambda t: t.sum()
        assert torch.equal(layer(x), x.sum())


def test_under_torch_compile_the_layer_traces_as_before():
    """Dynamo inlines the class's __call__, sees is_compiling() and takes nn.Module.__call__: one
    graph (fullgraph), the same output, armed or not."""
    layers, inputs = _layers()
    net = nn.Sequential(_armed(layers["conv"]), nn.Flatten(), nn.LazyLinear(3))
    x = inputs["conv"]
    with torch.no_grad():
        want = net(x)
        torch._dynamo.reset()
        try:
            got = torch.compile(net, backend="eager", fullgraph=True)(x)
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(got, want)

