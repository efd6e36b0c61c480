"""Direct attention calls (quantsd.attention_calls): the same outputs as diffusers' Attention.forward,
without its per-call inspect.signature; diffusers' own path wherever extra keyword arguments come."""

import copy
import inspect as real_inspect
import logging

import pytest
import torch

import quantsd
from diffusers.models import attention_processor as ap
from quantsd.attention_calls import direct_attention_calls, remove_direct_attention_calls
from quantsd.generate import configure_pipeline


def _unet_call(unet):
    torch.manual_seed(0)
    lat = torch.randn(2, unet.config.in_channels, 16, 16)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        return unet(lat, torch.tensor([10, 10]), encoder_hidden_states=ctx, return_dict=False)[0]


class _CountingInspect:
    """Stands in for the ``inspect`` module diffusers' attention_processor uses: counts signature calls."""

    def __init__(self):
        self.calls = 0

    def signature(self, fn):
        self.calls += 1
        return real_inspect.signature(fn)

    def __getattr__(self, name):
        return getattr(real_inspect, name)


@pytest.fixture
def counting_inspect(monkeypatch):
    counter = _CountingInspect()
    monkeypatch.setattr(ap, "inspect", counter)
    return counter


def _attentions(module):
    return [m for m in module.modules() if isinstance(m, ap.Attention)]


def test_direct_calls_give_the_same_outputs_without_inspecting(counting_inspect):
    """Bit-identical UNet output; diffusers' forward inspects once per attention call, the direct one
    never; removing it restores diffusers' path."""
    pipe = quantsd.load_pipeline("tiny")
    n = len(_attentions(pipe.unet))
    want = _unet_call(pipe.unet)
    assert n > 0 and counting_inspect.calls == n          # diffusers: one inspection per call
    assert direct_attention_calls(pipe.unet) == n
    counting_inspect.calls = 0
    assert torch.equal(_unet_call(pipe.unet), want)
    assert counting_inspect.calls == 0
    assert direct_attention_calls(pipe.unet) == 0         # already set: not wrapped twice
    assert remove_direct_attention_calls(pipe.unet) == n
    assert torch.equal(_unet_call(pipe.unet), want) and counting_inspect.calls == n


def test_extra_keyword_arguments_take_diffusers_path(counting_inspect, caplog):
    """An extra keyword argument goes through diffusers' forward: filtered out with its warning, the
    same output as without it."""
    pipe = quantsd.load_pipeline("tiny")
    attn = _attentions(pipe.unet)[0]
    direct_attention_calls(pipe.unet)
    x = torch.randn(1, 8, attn.to_q.in_features)
    with torch.inference_mode():
        plain = attn(x)
        assert counting_inspect.calls == 0
        with caplog.at_level(logging.WARNING):
            extra = attn(x, not_a_processor_argument=1.0)
    assert counting_inspect.calls == 1 and torch.equal(plain, extra)
    assert "not_a_processor_argument" in caplog.text


def test_a_processor_set_afterwards_is_used():
    """The processor is read at every call: set_attn_processor after the direct forwards still counts."""
    pipe = quantsd.load_pipeline("tiny")
    direct_attention_calls(pipe.unet)
    calls = []

    class Recording(ap.AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(attn)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    pipe.unet.set_attn_processor(Recording())
    _unet_call(pipe.unet)
    assert len(calls) == len(_attentions(pipe.unet))


def test_configure_pipeline_sets_direct_calls_eager_only_and_deep_copies_keep_their_own():
    """configure_pipeline gives the UNet's and the VAE's attentions the direct forward (eager), none with
    direct_attention=False; a deep copy's forwards call the copy's modules."""
    pipe = configure_pipeline(quantsd.load_pipeline("tiny"))
    both = _attentions(pipe.unet) + _attentions(pipe.vae)
    assert both and all("forward" in a.__dict__ for a in both)
    plain = configure_pipeline(quantsd.load_pipeline("tiny"), direct_attention=False)
    assert not any("forward" in a.__dict__ for a in _attentions(plain.unet))
    twin = copy.deepcopy(pipe.unet)
    assert all(a.__dict__["forward"].module is a for a in _attentions(twin))
    assert torch.equal(_unet_call(twin), _unet_call(plain.unet))


def test_a_subclass_with_its_own_forward_is_left_alone():
    """An Attention subclass that overrides forward keeps it (it may do more than call the processor)."""

    class Scaled(ap.Attention):
        def forward(self, hidden_states, *args, **kwargs):
            return 2 * super().forward(hidden_states, *args, **kwargs)

    holder = torch.nn.Sequential(ap.Attention(8, heads=1, dim_head=8), Scaled(8, heads=1, dim_head=8))
    assert direct_attention_calls(holder) == 1
    assert "forward" in holder[0].__dict__ and "forward" not in holder[1].__dict__
