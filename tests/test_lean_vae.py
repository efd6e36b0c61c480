"""The lean VAE decode: same bits as diffusers' decode, fewer live activation bytes."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from quantsd.lean_vae import lean_vae_decode, undo_lean_vae_decode
from quantsd.models import load_pipeline


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage created inside the mode and still alive (CPU stand-in for
    torch.cuda.max_memory_allocated, activations only)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr() or id(st)
                if key in self._seen:
                    continue
                self._seen.add(key)
                self.live += st.nbytes()
                weakref.finalize(st, self._free, st.nbytes(), key)
                self.peak = max(self.peak, self.live)
        return out

    def _free(self, n: int, key: int) -> None:
        self.live -= n
        self._seen.discard(key)


def _decode(vae, z):
    with torch.inference_mode(), _LiveBytes() as mem:
        out = vae.decode(z, return_dict=False)[0]
    return out, mem.peak


def test_lean_decode_is_bit_identical_and_lighter():
    vae = load_pipeline("tiny").vae.eval()
    z = torch.randn(1, vae.config.latent_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    ref, peak_ref = _decode(vae, z)
    n = lean_vae_decode(vae, conv_chunk_bytes=None)   # resnets only: bit-identical by construction
    assert n == sum(1 for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    assert n > 0
    z_before = z.clone()
    got, peak_lean = _decode(vae, z)
    assert torch.equal(got, ref)
    assert torch.equal(z, z_before)          # the caller's latents are never overwritten
    assert peak_lean < peak_ref
    assert undo_lean_vae_decode(vae) == n
    again, peak_again = _decode(vae, z)
    assert torch.equal(again, ref) and peak_again == peak_ref


def test_lean_block_keeps_its_input_and_training_uses_diffusers_forward():
    vae = load_pipeline("tiny").vae
    lean_vae_decode(vae)
    block = next(m for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    x = torch.randn(1, block.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = x.clone()
    block.eval()
    with torch.no_grad():
        y = block(x, None)
    assert torch.equal(x, x0)
    block.train()
    with torch.no_grad():
        y_train = type(block).forward(block, x, None)
        y_lean_path = block(x, None)        # training mode: falls back to diffusers' forward
    assert torch.equal(y_lean_path, y_train) and torch.equal(y, y_train)


def test_generate_with_lean_vae_gives_the_same_image():
    import numpy as np

    from quantsd.generate import generate

    kw = dict(seed=3, steps=2, guidance=5.0, height=64, width=64, device="cpu")
    a, _ = generate("tiny", "a red circle", **kw)
    b, _ = generate("tiny", "a red circle", lean_vae=True, **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_drop_vae_encoder_frees_it_and_keeps_text_to_image():
    import numpy as np
    import pytest

    from quantsd.generate import generate
    from quantsd.lean_vae import drop_vae_encoder

    pipe = load_pipeline("tiny")
    enc_bytes = sum(p.numel() * p.element_size() for p in pipe.vae.encoder.parameters())
    before = sum(p.numel() * p.element_size() for p in pipe.vae.parameters())
    assert drop_vae_encoder(pipe.vae) == enc_bytes > 0
    assert sum(p.numel() * p.element_size() for p in pipe.vae.parameters()) == before - enc_bytes
    assert drop_vae_encoder(pipe.vae) == 0          # idempotent
    with pytest.raises(RuntimeError, match="encoder was dropped"):
        pipe.vae.encode(torch.zeros(1, 3, 32, 32))
    kw = dict(seed=5, steps=2, guidance=5.0, height=64, width=64, device="cpu")
    a, _ = generate("tiny", "a blue square", **kw)
    b, _ = generate("tiny", "a blue square", drop_vae_encoder=True, lean_vae=True, **kw)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_lean_block_mixed_dtypes_and_non_groupnorm_blocks():
    """Under autocast the shortcut (fp32) and conv2's output (bf16) differ in dtype: the lean block
    then promotes exactly like diffusers; blocks whose norms are not GroupNorm are left alone."""
    from torch import nn

    vae = load_pipeline("tiny").vae.eval()
    lean_vae_decode(vae)
    block = next(m for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    x = torch.randn(1, block.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = type(block).forward(block, x, None)
        got = block(x, None)
    assert got.dtype == want.dtype and torch.equal(got, want)
    other = load_pipeline("tiny").vae
    blk = next(m for m in other.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    blk.norm1 = nn.Identity()  # would hand its input to the in-place SiLU
    n_all = sum(1 for m in other.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    assert lean_vae_decode(other, conv_chunk_bytes=None) == n_all - 1 and "forward" not in vars(blk)


class _ConvCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("conv2d", "convolution"):
            self.rows.append(out.shape[-2])
        return out


@pytest.mark.parametrize("kind", ["conv", "quant"])
@pytest.mark.parametrize("kernel", [3, 1])
def test_banded_convolution_equals_the_full_one(kind, kernel):
    from torch import nn

    from quantsd.lean_vae import _banded_conv_forward
    from quantsd.nn import QuantConv2d
    from quantsd.quant import quantize_tensor

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, padding=kernel // 2)
    if kind == "quant":
        conv = QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), 4, "pwlq", "channel"))
    conv.eval()
    x = torch.randn(2, 6, 23, 17)
    with torch.inference_mode():
        want = conv(x)
        row_bytes = 2 * 5 * 17 * 4
        for rows in (1, 4, 7, 22):                     # uneven bands, first/last band at the border
            conv._quantsd_chunk_bytes = rows * row_bytes
            with _ConvCalls() as calls:
                got = _banded_conv_forward(conv, x)
            assert calls.rows == [rows] * (23 // rows) + ([23 % rows] if 23 % rows else [])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        conv._quantsd_chunk_bytes = 23 * row_bytes     # fits in one band: the module's own forward
        with _ConvCalls() as calls:
            assert torch.equal(_banded_conv_forward(conv, x), want)
        assert calls.rows == [23]
    xl = x.to(memory_format=torch.channels_last)       # channels-last in, channels-last out (as conv2d)
    conv._quantsd_chunk_bytes = 4 * row_bytes
    with torch.inference_mode():
        got_cl = _banded_conv_forward(conv, xl)
        want_cl = type(conv).forward(conv, xl)
    assert got_cl.is_contiguous(memory_format=torch.channels_last) == want_cl.is_contiguous(
        memory_format=torch.channels_last)
    torch.testing.assert_close(got_cl, want, rtol=1e-5, atol=1e-5)
    conv.train()                                       # the mode does not matter: same math
    conv._quantsd_chunk_bytes = 4 * row_bytes
    with torch.inference_mode(), _ConvCalls() as calls:
        torch.testing.assert_close(_banded_conv_forward(conv, x), want, rtol=1e-5, atol=1e-5)
    assert len(calls.rows) == 6
    if kind == "conv":                                 # autograd: the module's own forward
        with _ConvCalls() as calls:
            _banded_conv_forward(conv, x)
        assert calls.rows == [23]


def test_lean_decode_bands_large_convolutions_only():
    vae = load_pipeline("tiny").vae.eval()
    z = torch.randn(1, vae.config.latent_channels, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = vae.decode(z, return_dict=False)[0]
    resnets = sum(1 for m in vae.decoder.modules() if type(m).__name__ == "ResnetBlock2D")
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    n = lean_vae_decode(vae, conv_chunk_bytes=16 * 1024)
    banded = [c for c in convs if "forward" in vars(c)]
    assert n == resnets + len(banded) and 0 < len(banded) <= len(convs)
    assert all(c.stride == (1, 1) for c in banded)
    with torch.inference_mode(), _ConvCalls() as calls:
        got = vae.decode(z, return_dict=False)[0]
    assert len(calls.rows) > len(convs)               # some convolutions ran in several bands
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert lean_vae_decode(vae, conv_chunk_bytes=None) == resnets    # re-applying replaces the bands
    assert not any("forward" in vars(c) for c in convs)
    assert lean_vae_decode(vae, conv_chunk_bytes=16 * 1024) == n
    assert undo_lean_vae_decode(vae) == n and not any("forward" in vars(c) or hasattr(c, "_quantsd_chunk_bytes")
                                                      for c in convs)
    conv = banded[0]
    lean_vae_decode(vae, conv_chunk_bytes=1)
    xb = torch.randn(1, conv.in_channels, 9, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _ConvCalls() as calls:
        assert conv(xb).dtype == torch.bfloat16        # autocast: the module's own forward, one call
    assert calls.rows == [9]
    with pytest.raises(ValueError, match="conv_chunk_bytes"):
        lean_vae_decode(vae, conv_chunk_bytes=0)
