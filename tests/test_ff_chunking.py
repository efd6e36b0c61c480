"""Feed-forward chunking: same outputs as diffusers' FeedForward, a lower activation peak."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import FeedForward

from quantsd.ff_chunking import chunk_feed_forward, undo_chunk_feed_forward
from quantsd.models import load_pipeline

from test_lean_vae import _LiveBytes


def _peak(fn):
    with torch.inference_mode(), _LiveBytes() as mem:
        out = fn()
    return out, mem.peak


def test_chunked_feed_forward_matches_and_lowers_the_peak():
    torch.manual_seed(0)
    ff = FeedForward(32, mult=4, activation_fn="geglu").eval()
    x = torch.randn(2, 1000, 32)
    ref, peak_ref = _peak(lambda: ff(x))
    calls = []
    ff.net[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    assert chunk_feed_forward(ff, tokens=96) == 1
    got, peak_chunked = _peak(lambda: ff(x))
    assert calls == [96] * 10 + [40]             # uneven split: any sequence length works
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert peak_chunked < peak_ref / 3          # the 4x-wide GEGLU projection never exists whole
    calls.clear()
    short = torch.randn(2, 96, 32)
    expected = type(ff).forward(ff, short)
    calls.clear()
    assert torch.equal(ff(short), expected)   # at or under the limit: untouched, one call
    assert calls == [96]
    assert undo_chunk_feed_forward(ff) == 1 and "forward" not in vars(ff)
    assert torch.equal(ff(x), ref)


def test_chunked_unet_step_matches_and_keeps_state_dict_keys():
    unet = load_pipeline("tiny").unet.eval()
    keys = list(unet.state_dict())
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.inference_mode():
        ref = unet(lat, 10, encoder_hidden_states=ctx).sample
        n = chunk_feed_forward(unet, tokens=7)   # 256 and 64 tokens per level: 37 and 10 slices
        got = unet(lat, 10, encoder_hidden_states=ctx).sample
    assert n == sum(1 for m in unet.modules() if type(m).__name__ == "FeedForward") and n > 0
    assert list(unet.state_dict()) == keys
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert undo_chunk_feed_forward(unet) == n


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="at least 1 token"):
        chunk_feed_forward(FeedForward(8), tokens=0)
