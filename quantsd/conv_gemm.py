"""Small-output convolutions as one GEMM, for compiled UNets (packed or dense).

    from quantsd.conv_gemm import convs_as_gemm
    convs_as_gemm(pipe.unet, max_rows=256)     # before torch.compile
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")

Why: SD's lowest-resolution convolutions (8x8 latents at 512², batch 2 with CFG: 128 output
pixels) multiply a 1280 x 11520 weight (29.5 MB in fp16) by only 128 rows.  That is bound by
reading the weight -- about 8 us at an H200's bandwidth -- but cuDNN's implicit-GEMM kernels tile
the 128 rows into a handful of thread blocks and take 0.1 ms eager (bench/tune_fused.py, H200,
session 12: dense 3x3 1280->1280 conv at 128 rows, 0.105 ms).  Written as
``patches (rows, KH*KW*I) @ weight (O, KH*KW*I)^T`` the same product goes to cuBLAS, whose
small-M GEMMs split the reduction across the GPU (a 128-row, 10240 x 1280 linear: 7.8 us there).

The patches are gathered in (KH, KW, I) order -- the order of a channels-last weight, which is how
compiled packed layers decode their k x k weights (:func:`quantsd.dequant_groups.group_dequant`),
so the weight goes in as a free view; an NCHW weight is permuted (one copy, which Inductor
schedules with the rest).  Under torch.compile the gather (pad + KH*KW strided slices of a
~3 MB activation) fuses into one kernel.  The output comes back channels-last, as Inductor's
own convolutions return it.  Results equal the convolution's up to the order of fp32
accumulation.

Only where it pays: groups=1, zero padding given as numbers, and at most ``max_rows`` output rows
(batch x output pixels).  Eager forwards keep cuDNN (the gather would be separate kernels there)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv2d_as_gemm", "gemm_rows_ok", "convs_as_gemm", "GemmConv2d", "DEFAULT_MAX_ROWS", "env_max_rows"]

DEFAULT_MAX_ROWS = 256


def env_max_rows() -> int:
    """``QUANTSD_CONV_GEMM_MAX_ROWS`` (a non-negative integer; 0 switches the rewrite off), else 0."""
    env = os.environ.get("QUANTSD_CONV_GEMM_MAX_ROWS", "").strip()
    if not env:
        return 0
    if not env.isdigit():
        raise ValueError(f"QUANTSD_CONV_GEMM_MAX_ROWS must be a non-negative integer (rows), got {env!r}")
    return int(env)


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def gemm_rows_ok(conv: nn.Module, x: torch.Tensor, max_rows: int) -> bool:
    """Does ``conv`` (an nn.Conv2d or QuantConv2d) on input ``x`` qualify: a 4-d input, groups 1,
    numeric zero padding, and at most ``max_rows`` output rows (batch x output pixels)?"""
    if max_rows <= 0 or x.dim() != 4 or conv.groups != 1 or conv.padding_mode != "zeros" \
            or isinstance(conv.padding, str):
        return False
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    rows = x.shape[0] * _out_size(x.shape[2], kh, sh, ph, dh) * _out_size(x.shape[3], kw, sw, pw, dw)
    return rows <= max_rows


def conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1),
                   padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (groups 1) as patches @ weight^T;
    returns (N, O, OH, OW) in channels-last memory format."""
    n, c, h, w = x.shape
    o, i, kh, kw = weight.shape
    if i != c:
        raise ValueError(f"input has {c} channels, the weight takes {i} (groups must be 1)")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh, ow = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))           # (N, H+2p, W+2p, C)
    taps = [xp[:, a * dh: a * dh + (oh - 1) * sh + 1: sh, b * dw: b * dw + (ow - 1) * sw + 1: sw, :]
            for a in range(kh) for b in range(kw)]                          # each (N, OH, OW, C)
    patches = torch.stack(taps, dim=3).reshape(n * oh * ow, kh * kw * c)   # (kh, kw, c) order
    w2 = weight.permute(0, 2, 3, 1).reshape(o, kh * kw * c)               # a view if channels-last
    out = F.linear(patches, w2, bias)                                      # (N*OH*OW, O)
    return out.view(n, oh, ow, o).permute(0, 3, 1, 2)


class GemmConv2d(nn.Conv2d):
    """An nn.Conv2d that, in compiled forwards with at most ``gemm_max_rows`` output rows, runs as one
    GEMM (:func:`conv2d_as_gemm`); otherwise exactly nn.Conv2d (made by :func:`convs_as_gemm`)."""

    gemm_max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and gemm_rows_ok(self, x, self.gemm_max_rows):
            return conv2d_as_gemm(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return super().forward(x)


def convs_as_gemm(module: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Let the convolutions below ``module`` run as one GEMM in compiled forwards whenever they have
    at most ``max_rows`` output rows (0: back to cuDNN everywhere).  Packed layers
    (:class:`quantsd.nn.QuantConv2d`) get the setting; plain nn.Conv2d layers become
    :class:`GemmConv2d` (same parameters, same module).  Returns how many layers were set.  Call
    before torch.compile: the choice is made when the graph is traced."""
    from .nn import QuantConv2d

    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    n = 0
    for m in module.modules():
        if isinstance(m, QuantConv2d):
            m.gemm_max_rows = int(max_rows)
            n += 1
        elif type(m) is nn.Conv2d or isinstance(m, GemmConv2d):
            m.__class__ = GemmConv2d      # a subclass without state of its own: the swap is safe
            m.gemm_max_rows = int(max_rows)
            n += 1
    return n
