"""A VAE decode with a lower activation peak and the same output bits.

At 512² the VAE decode, not the UNet, sets a text-to-image pipeline's peak GPU memory: its last
up-blocks run 128–256 channels at full resolution (134 MB per fp16 tensor at 256 channels), and
diffusers' ``ResnetBlock2D.forward`` keeps three such tensors alive at its residual
(``(input + hidden) / scale`` allocates the sum and then the quotient while both operands live)
and allocates a fresh tensor for every activation.  The largest single allocation, though, is a
convolution's own: at 512² cuDNN's kernel for the 256-channel 3x3 convolutions takes ~320 MiB of
workspace on top of its 128 MiB output (allocator history of a whole image on an H200,
``bench/peak_attribution.py``), the 512² image's memory peak.

:func:`lean_vae_decode` rebinds ``forward`` of the decoder's plain resnet blocks (no time
embedding, no up/down-sampling inside, SiLU) to one that applies SiLU in place on the fresh
norm output and adds the shortcut in place into the fresh ``conv2`` output.  Every value is
computed by the same operation on the same operands (IEEE addition commutes), so the decoded
image is bit-identical; only tensors nobody else holds are overwritten.  Blocks in training
mode take the original forward.  It also makes the decoder's large convolutions (output above
``conv_chunk_bytes``, stride 1, "same" zero padding) run over bands of output rows, each band
from its input rows plus the kernel's halo, written into one preallocated output: workspace and
temporaries shrink with the band.  Every output value is the same dot product of the same
operands, but a smaller problem may run another cuDNN algorithm, so banded convolutions agree to
fp16 rounding rather than bit for bit (``conv_chunk_bytes=None`` keeps the decode bit-identical).

:func:`drop_vae_encoder` frees the VAE's encoder (SD1.5: 34M parameters, 68 MB in fp16) from a
pipeline that only generates from text, where ``vae.encode`` never runs.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["lean_vae_decode", "undo_lean_vae_decode", "drop_vae_encoder", "VaeEncoderDropped",
           "DEFAULT_CONV_CHUNK_BYTES"]

DEFAULT_CONV_CHUNK_BYTES = 32 * 2**20   # output bytes per band of a banded convolution


def _lean_resnet_forward(self, input_tensor: torch.Tensor, temb=None, *args, **kwargs) -> torch.Tensor:
    if self.training or temb is not None:
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    h = self.norm1(input_tensor)          # fresh tensor: safe to overwrite
    h = F.silu(h, inplace=True)
    h = self.conv1(h)
    h = self.norm2(h)
    h = F.silu(h, inplace=True)
    h = self.dropout(h)
    h = self.conv2(h)                     # fresh
    x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
    if x.dtype != h.dtype:  # mixed dtypes (autocast): diffusers' promotion, out of place
        return (x + h) / self.output_scale_factor
    return h.add_(x).div_(self.output_scale_factor)   # == (x + h) / scale, bit for bit


def _banded_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``self(x)`` computed over bands of output rows (see the module docstring)."""
    limit = self._quantsd_chunk_bytes
    if x.dim() != 4 or (torch.is_grad_enabled()
                        and (x.requires_grad or any(p.requires_grad for p in self.parameters(recurse=False)))):
        return type(self).forward(self, x)   # autograd: the module's own path (and memory profile)
    n, _, h, w = x.shape
    row_bytes = n * self.out_channels * w * x.element_size()
    if row_bytes * h <= limit or h < 2:
        return type(self).forward(self, x)
    if torch.is_autocast_enabled(x.device.type):   # autocast picks the conv's dtype: its own path
        return type(self).forward(self, x)
    weight = self.weight            # QuantConv2d: dequantized once for all bands
    if weight.dtype != x.dtype:     # mixed dtypes: the module's own path
        return type(self).forward(self, x)
    rows = max(1, limit // row_bytes)
    ph, pw = self.padding
    nhwc = any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (x, weight))
    out = torch.empty(n, self.out_channels, h, w, dtype=x.dtype, device=x.device,   # the layout conv2d would give
                      memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    for a in range(0, h, rows):
        b = min(a + rows, h)
        lo, hi = max(a - ph, 0), min(b + ph, h)
        band = x[:, :, lo:hi]
        top, bottom = ph - (a - lo), ph - (hi - b)
        if top or bottom:   # the image border: the zero rows the full convolution pads with
            band = F.pad(band, (0, 0, top, bottom))
        out[:, :, a:b] = F.conv2d(band, weight, self.bias, 1, (0, pw))
    return out


def _bandable(conv: nn.Module) -> bool:
    if type(conv).__name__ not in ("Conv2d", "QuantConv2d") or isinstance(conv.padding, str):
        return False
    kh, kw = conv.kernel_size
    return (tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and kh % 2 == 1 and kw % 2 == 1
            and tuple(conv.padding) == (kh // 2, kw // 2))


def _eligible(block: nn.Module) -> bool:
    return (type(block).__name__ == "ResnetBlock2D" and getattr(block, "time_emb_proj", 1) is None
            and block.upsample is None and block.downsample is None
            and getattr(block, "time_embedding_norm", "default") in ("default", "group")
            and isinstance(block.nonlinearity, nn.SiLU)
            # the norms must return fresh tensors (SiLU runs in place on their output)
            and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm))


def lean_vae_decode(vae: nn.Module, conv_chunk_bytes: int | None = DEFAULT_CONV_CHUNK_BYTES) -> int:
    """Switch the decoder of ``vae`` (an ``AutoencoderKL``) to the lean resnet forward and, unless
    ``conv_chunk_bytes`` is None, its convolutions to banded ones above that many output bytes;
    returns the number of modules switched (0 for a VAE without such modules, e.g. AutoencoderTiny)."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        return 0
    if conv_chunk_bytes is not None and conv_chunk_bytes < 1:
        raise ValueError(f"conv_chunk_bytes must be positive (or None for no banding), got {conv_chunk_bytes}")
    undo_lean_vae_decode(vae)   # a second call replaces the first one's settings
    n = 0
    for m in decoder.modules():
        if _eligible(m):
            m.forward = types.MethodType(_lean_resnet_forward, m)
            n += 1
        elif conv_chunk_bytes is not None and _bandable(m):
            m._quantsd_chunk_bytes = int(conv_chunk_bytes)
            m.forward = types.MethodType(_banded_conv_forward, m)
            n += 1
    return n


def undo_lean_vae_decode(vae: nn.Module) -> int:
    """Restore diffusers' own forward on every block :func:`lean_vae_decode` switched."""
    n = 0
    for m in vae.modules():
        if "forward" in vars(m) and getattr(m.forward, "__func__", None) in (_lean_resnet_forward,
                                                                              _banded_conv_forward):
            del m.forward
            m.__dict__.pop("_quantsd_chunk_bytes", None)
            n += 1
    return n


class VaeEncoderDropped(nn.Module):
    """Stands in for a dropped VAE encoder: no parameters, and a clear error if anything encodes."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this pipeline's VAE encoder was dropped to save memory (drop_vae_encoder / "
                           "--no-vae-encoder), so it can only generate from text; load it again without that "
                           "option for image-to-image or anything else that calls vae.encode")


def drop_vae_encoder(vae: nn.Module) -> int:
    """Replace ``vae.encoder`` by :class:`VaeEncoderDropped`; returns the bytes freed (0 when there
    is no encoder or it was dropped already).  Text-to-image output is unchanged (the encoder is
    never called); ``vae.encode`` raises a RuntimeError that says why."""
    enc = getattr(vae, "encoder", None)
    if enc is None or isinstance(enc, VaeEncoderDropped):
        return 0
    freed = sum(t.numel() * t.element_size() for t in [*enc.parameters(), *enc.buffers()])
    vae.encoder = VaeEncoderDropped()
    return freed
