"""Fused dequant-GEMM for weight-bound packed layers: the codes are decoded in registers, inside the
matrix multiply, and the dense weight is never written to memory.

Why: dequantize-then-GEMM writes every dense weight (fp16, 2 bytes a weight) and reads it back,
on top of reading the codes.  For layers with few output rows per weight -- SD1.5's 8x8-level
convolutions (M = 2*8*8 = 128 rows, 308M of the UNet's 859M weights), the cross-attention K/V
projections of the 77-token prompt (M = 154) and the time-embedding projections (M = 2) -- that
traffic is most of the layer's time: they are bound by weight bytes, not by arithmetic.  Read
packed, a 4-bit layer moves a quarter of the dense layer's weight bytes.

One kernel serves ``F.linear`` and ``F.conv2d`` (implicit GEMM: each output pixel is a row, each
``(in_channel, kh, kw)`` a column, gathered from the input with the convolution's stride / padding /
dilation, zero outside the image; no im2col buffer).  ``out[m, n] = sum_k x[m, k] * w[n, k]``, with
``w[n, k]`` decoded exactly as :mod:`quantsd.kernels.dequant` decodes it (the same ``_decode``, cast
to the compute dtype the same way), so the weights are the reference's bits; only the
accumulation order differs from cuBLAS/cuDNN (float32 accumulation in both).  Split-K spreads a
layer's K over more programs (a weight-bound layer needs all SMs reading): each split writes a
float32 partial and a second kernel sums them in a fixed order (deterministic) and adds the bias.

Entry points: :func:`fused_linear`, :func:`fused_conv2d` and their custom ops
(``torch.ops.quantsd.fused_linear`` / ``fused_conv2d``, opaque to torch.compile, CUDA-graph safe),
used by :class:`quantsd.nn.QuantLinear` / :class:`quantsd.nn.QuantConv2d` under torch.compile for
inputs of at most :func:`max_rows` rows (``QUANTSD_FUSED_MAX_M``, 0 switches the path off).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import torch

from .dequant import HAS_TRITON, DequantPlan, interpreting, plan_from_key, plan_key

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .dequant import _decode, _store_weights

__all__ = ["fused_linear", "fused_conv2d", "max_rows", "set_max_rows", "should_fuse", "load_tuned", "tuned_config", "FusedConfig", "choose_config", "DEFAULT_MAX_ROWS"]

DEFAULT_MAX_ROWS = 0     # off by default: measured slower than dequantize + cuBLAS/cuDNN so far (BENCHMARKS.md)


def max_rows() -> int:
    """Largest input row count (M) for which packed layers use the fused kernel under torch.compile
    (``QUANTSD_FUSED_MAX_M`` at import, :func:`set_max_rows` later; 0 turns the fused path off)."""
    return MAX_ROWS


def set_max_rows(rows: int) -> None:
    """Change :func:`max_rows` (a module global: torch.compile guards it, so compiled graphs that
    depend on it recompile)."""
    global MAX_ROWS
    MAX_ROWS = int(rows)


def _env_rows() -> int:
    raw = os.environ.get("QUANTSD_FUSED_MAX_M", str(DEFAULT_MAX_ROWS))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"QUANTSD_FUSED_MAX_M must be a whole number of rows (0 = fused path off), got {raw!r}") \
            from None


MAX_ROWS = _env_rows() if HAS_TRITON else -1


class FusedConfig(NamedTuple):
    """Launch shape of one fused GEMM."""

    block_m: int
    block_n: int
    block_k: int
    split: int       # K splits (1: the kernel writes the output itself)
    num_warps: int


_TUNED: dict = {}   # (kind, plan key, rows) -> (FusedConfig, fuse?), from bench/tune_fused.py (load_tuned)


def load_tuned(path: str) -> int:
    """Use what a tuning run measured (JSON list of {"kind": "linear"|"conv", "plan": plan key, "M": rows,
    "config": [5 ints]} with optional "fused_ms" / "unfused_ms"): each listed layer shape gets its best
    launch shape and takes the fused path only where it beat dequantize + cuBLAS/cuDNN; once a table
    is loaded, shapes not in it are not fused.  Returns how many shapes were loaded.  Load it before
    compiling (compiled graphs keep the decisions they were traced with: ``torch._dynamo.reset()``)."""
    import json

    try:
        with open(path) as f:
            rows = json.load(f)
        table = {}
        for r in rows:
            faster = "fused_ms" not in r or r["fused_ms"] < r.get("unfused_ms", float("inf"))
            cfg = FusedConfig(*map(int, r["config"]))
            if min(cfg) < 1 or any(b & (b - 1) or b < 16 for b in cfg[:3]):
                raise ValueError(f"bad launch shape {list(cfg)}")
            table[(str(r["kind"]), str(r["plan"]), int(r["M"]))] = (cfg, bool(faster))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot use the fused-GEMM tuning table {path!r} ({type(e).__name__}: {e}); write one "
                         "with bench/tune_fused.py --configs-out, or unset QUANTSD_FUSED_CONFIGS") from e
    _TUNED.update(table)     # all or nothing
    return len(table)


def should_fuse(plan: str, rows: int, kind: str) -> bool:
    """Take the fused path for a ``kind`` ("linear" / "conv") layer with plan key ``plan``
    (:func:`quantsd.kernels.dequant.plan_key`) at ``rows`` GEMM rows?  At most :func:`max_rows`
    rows, and where a tuning table is loaded, only shapes it measured faster fused.  Runs while
    torch.compile traces: the graph guards on ``MAX_ROWS`` and on the row count (a dynamic row count
    is specialized to its value only when a table is consulted)."""
    if rows > MAX_ROWS:
        return False
    if not _TUNED:
        return True
    entry = _TUNED.get((kind, plan, int(rows)))
    return entry is not None and entry[1]


def tuned_config(plan: str, rows: int, kind: str) -> Optional[FusedConfig]:
    """The measured launch shape of a layer shape, if a loaded table has one."""
    entry = _TUNED.get((kind, plan, int(rows)))
    return None if entry is None else entry[0]


@functools.lru_cache(maxsize=None)
def choose_config(M: int, N: int, K: int, bits: int, sms: int = 132) -> FusedConfig:
    """Launch shape for an (M x K) @ (K x N) product with ``bits``-bit weights.

    Tiles are small (64 x 64 x 32 at most, 4 warps): the decode's per-weight temporaries live in
    registers beside the accumulator; larger tiles need up to 255 registers per thread and some spill
    (ptxas, sm_90a), and 128 x 128 tiles ran 3-56x slower than dequantize + cuBLAS on an H200.
    A measured table (:func:`load_tuned`, :func:`tuned_config`) overrides this for the shapes it lists.
    Split-K: enough programs to keep every SM reading (about 2 per SM), but the float32
    partials (split * M * N * 4 bytes, written and read back) stay under half the layer's packed
    weight bytes, and each split runs at least 4 K steps."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    bn = 64 if N >= 64 else max(16, 1 << (N - 1).bit_length())
    bk = 32
    tiles = -(-M // bm) * -(-N // bn)
    want = max(1, -(-2 * sms // tiles))
    by_bytes = max(1, int((N * K * bits / 8) / 2 // (M * N * 4)))
    by_steps = max(1, K // (4 * bk))
    split = max(1, min(want, by_bytes, by_steps))
    return FusedConfig(bm, bn, bk, split, 4)


if HAS_TRITON:

    @triton.jit
    def _fused_kernel(x_ptr, packed_ptr, scale_ptr, bp_ptr, lut_ptr, bias_ptr, out_ptr,
                      M, N, K, group, k_per_split,
                      sx0, sx1, sx2, sx3, H, W, OH, OW,
                      BITS: tl.constexpr, PWLQ: tl.constexpr, GMODE: tl.constexpr, TABLE: tl.constexpr,
                      CONV: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                      PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, BF16: tl.constexpr, DOT_F32: tl.constexpr,
                      ROWBYTES: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Linear: x is (M, K) with strides sx0, sx1.  Conv: x is (B, C, H, W) with strides sx0..sx3,
        # row m = (b, oh, ow) of the (B, OH, OW) output, column k = (c, kh, kw) as in the weight.
        # out: (M, N) in the compute dtype (DIRECT: one split) or float32 partials (splits, M, N).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        # index math split into a row part (once) and a column part (per K step), 32-bit, so that the
        # 2-D temporaries per step are one add each (few registers: no spills)
        if CONV:
            r = rm % (OH * OW)
            ih0 = (r // OW) * SH - PH
            iw0 = (r % OW) * SW - PW
            xrow = (rm // (OH * OW)) * sx0 + ih0 * sx2 + iw0 * sx3
        else:
            xrow = rm * sx0
        wrow = rn * K                                       # first weight of each output row
        if ROWBYTES:
            wbyte = rn * (K * BITS // 8)                    # ... and its first byte
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < k_hi
            if CONV:
                t = rk % (KH * KW)
                dh = (t // KW) * DH
                dw = (t % KW) * DW
                xcol = (rk // (KH * KW)) * sx1 + dh * sx2 + dw * sx3
                ih = ih0[:, None] + dh[None, :]
                iw = iw0[:, None] + dw[None, :]
                amask = mmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            else:
                xcol = rk * sx1
                amask = mmask[:, None] & kmask[None, :]
            a = tl.load(x_ptr + (xrow[:, None] + xcol[None, :]), mask=amask, other=0.0)
            # the weight tile (BLOCK_N x BLOCK_K), decoded from the LSB-first bitstream
            e = wrow[:, None] + rk[None, :]
            emask = nmask[:, None] & kmask[None, :]
            MASK: tl.constexpr = (1 << BITS) - 1
            if ROWBYTES and ((BITS == 8) or (BITS == 4) or (BITS == 2)):
                # rows start on a byte: contiguous (vectorized) byte loads, codes split in registers
                PER: tl.constexpr = 8 // BITS
                jb = tl.arange(0, BLOCK_K // PER)
                bmask = nmask[:, None] & ((k0 + jb * PER) < k_hi)[None, :]
                byte = tl.load(packed_ptr + (wbyte[:, None] + (k0 // PER + jb)[None, :]), mask=bmask,
                               other=0).to(tl.int32)
                if BITS == 8:
                    code = byte
                elif BITS == 4:                                 # low nibble first
                    code = tl.interleave(byte & MASK, byte >> 4)
                else:                                           # low bits first
                    code = tl.interleave(tl.interleave(byte & MASK, (byte >> 4) & MASK),
                                         tl.interleave((byte >> 2) & MASK, byte >> 6))
            elif (BITS == 8) or (BITS == 4) or (BITS == 2):   # never straddles a byte
                if BITS == 8:
                    code = tl.load(packed_ptr + e, mask=emask, other=0).to(tl.int32)
                else:
                    PER2: tl.constexpr = 8 // BITS
                    byte = tl.load(packed_ptr + e // PER2, mask=emask, other=0).to(tl.int32)
                    code = (byte >> ((e % PER2) * BITS)) & MASK
            else:
                bit = e * BITS
                sh = (bit & 7).to(tl.int32)
                lo = tl.load(packed_ptr + (bit >> 3), mask=emask, other=0).to(tl.int32)
                hi = tl.load(packed_ptr + (bit >> 3) + 1, mask=emask & (sh + BITS > 8), other=0).to(tl.int32)
                code = ((lo | (hi << 8)) >> sh) & MASK
            if TABLE and BITS <= 4:
                # a small value table held in registers: selects instead of one gather per weight
                w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32) + tl.load(lut_ptr)
                for j in tl.static_range(1, 1 << BITS):
                    w = tl.where(code == j, tl.load(lut_ptr + j), w)
            else:
                w = _decode(code, e, emask, scale_ptr, bp_ptr, lut_ptr, group, BITS, PWLQ, GMODE, TABLE)
            w = tl.where(emask, w, 0.0)
            # the compute dtype, rounded to nearest even like the dequant kernel's store (on the GPU;
            # the interpreter truncates to bfloat16)
            wq = w.to(x_ptr.dtype.element_ty)
            if DOT_F32:   # the interpreter multiplies bfloat16 operands as raw integers: widen them there
                acc = tl.dot(a.to(tl.float32), tl.trans(wq).to(tl.float32), acc)
            else:
                acc = tl.dot(a, tl.trans(wq), acc)
        omask = mmask[:, None] & nmask[None, :]
        if DIRECT:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            _store_weights(out_ptr, rm[:, None] * N + rn[None, :], omask, acc, BF16)
        else:
            tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=omask)

    @triton.jit
    def _splitk_reduce(part_ptr, bias_ptr, out_ptr, MN, N, splits, HAS_BIAS: tl.constexpr,
                       BF16: tl.constexpr, BLOCK: tl.constexpr):
        # out = sum of the partials, in split order (deterministic), + bias, cast
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
        for s in range(1, splits):
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        _store_weights(out_ptr, offs, mask, acc, BF16)


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


_REDUCE_BLOCK = 1024


def _rowbytes_ok(K: int, bits: int, block_k: int) -> bool:
    """Take the row-bytes code loads (whole bytes per row, split in registers)?  Only where every row
    starts on a byte and the tile is at least 32 weights deep: on the H200 (session 9, the first GPU run
    of this path) the exact-decode test failed for 2- and 4-bit codes with 16-deep tiles and passed
    with 32; 16-deep tiles take the per-weight byte loads."""
    return (K * bits) % 8 == 0 and block_k >= 32


def _run(x: torch.Tensor, plan: DequantPlan, packed, scale, bp, lut, bias, M: int, N: int, K: int,
         strides, geometry, conv_consts, config: Optional[FusedConfig]) -> torch.Tensor:
    """Launch the fused kernel (and the split-K reduction); returns the (M, N) output.  Launch shape:
    ``config``, else a loaded table's for this layer shape, else :func:`choose_config`."""
    if x.is_cuda and x.device.index != torch._C._cuda_getDevice():
        with torch.cuda.device(x.device):
            return _run(x, plan, packed, scale, bp, lut, bias, M, N, K, strides, geometry, conv_consts, config)
    dtype = x.dtype
    bf16 = dtype == torch.bfloat16
    out = torch.empty((M, N), dtype=dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    cfg = config
    if cfg is None and _TUNED:
        cfg = tuned_config(plan_key(plan), M, "linear" if conv_consts is None else "conv")
    if cfg is None:
        cfg = choose_config(M, N, K, plan.bits, _sms(x.device))
    if M * N * cfg.split >= 2 ** 31 or -(-M // cfg.block_m) > 65535:
        raise ValueError(f"{M} rows x {N} outputs are too many for the fused kernel (32-bit partial offsets, "
                         "grid limits): use dequantize + F.linear/F.conv2d")
    k_per = -(-K // cfg.split)
    k_per = -(-k_per // cfg.block_k) * cfg.block_k
    split = -(-K // k_per)
    grid = (-(-N // cfg.block_n), -(-M // cfg.block_m), split)
    o = out.view(torch.int16) if bf16 else out
    target = o if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    has_bias = bias is not None
    b = bias if has_bias else lut
    conv = conv_consts is not None
    kh, kw, sh, sw, ph, pw, dh, dw = conv_consts if conv else (1,) * 8
    H, W, OH, OW = geometry
    _fused_kernel[grid](
        x, packed, scale, bp, lut, b, target, M, N, K, plan.group, k_per, *strides, H, W, OH, OW,
        BITS=plan.bits, PWLQ=plan.pwlq, GMODE=plan.gmode, TABLE=plan.table, CONV=conv, KH=kh, KW=kw, SH=sh, SW=sw,
        PH=ph, PW=pw, DH=dh, DW=dw, HAS_BIAS=has_bias, DIRECT=split == 1, BF16=bf16, DOT_F32=bf16 and interpreting(),
        ROWBYTES=_rowbytes_ok(K, plan.bits, cfg.block_k), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, enable_fp_fusion=False)
    if split > 1:
        _splitk_reduce[(-(-(M * N) // _REDUCE_BLOCK),)](
            target, b, o, M * N, N, split, HAS_BIAS=has_bias, BF16=bf16, BLOCK=_REDUCE_BLOCK, num_warps=4)
    return out


def _check(x: torch.Tensor, plan: DequantPlan, packed: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the fused kernel computes in float16/bfloat16, not {x.dtype}")
    if packed.dtype != torch.uint8 or packed.numel() != plan.nbytes:
        raise ValueError(f"packed codes must be {plan.nbytes} uint8 bytes, got {packed.numel()} {packed.dtype}")
    if plan.wide:
        raise ValueError("the fused kernel indexes weights with 32-bit math: layer too large")
    if x.numel() >= 2 ** 31:
        raise ValueError("the fused kernel indexes inputs with 32-bit math: input too large "
                         "(the fused path is meant for few rows; use dequantize + F.linear/F.conv2d)")


def fused_linear(x: torch.Tensor, plan: DequantPlan, packed: torch.Tensor, scale: torch.Tensor,
                 breakpoint: Optional[torch.Tensor], lut: torch.Tensor, bias: Optional[torch.Tensor],
                 config: Optional[FusedConfig] = None) -> torch.Tensor:
    """``F.linear(x, dequantize(...), bias)`` with the weight decoded inside the GEMM.

    ``plan``/``lut`` as for :func:`quantsd.kernels.dequant.launch` (for a value-table plan the
    kernel reads neither ``scale`` nor ``breakpoint``)."""
    _check(x, plan, packed)
    N, K = plan.shape[0], math.prod(plan.shape[1:])
    if x.shape[-1] != K:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {K}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    bp = scale if breakpoint is None else breakpoint
    out = _run(x2, plan, packed, scale, bp, lut, bias, M, N, K, (x2.stride(0), x2.stride(1), 0, 0), (1, 1, 1, 1),
               None, config)
    return out.view(*x.shape[:-1], N)


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def fused_conv2d(x: torch.Tensor, plan: DequantPlan, packed: torch.Tensor, scale: torch.Tensor,
                 breakpoint: Optional[torch.Tensor], lut: torch.Tensor, bias: Optional[torch.Tensor],
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), config: Optional[FusedConfig] = None) -> torch.Tensor:
    """``F.conv2d(x, dequantize(...), bias, stride, padding, dilation)`` (groups 1, zero padding) as an
    implicit GEMM with the weight decoded inside; the output is channels-last in memory (a
    permuted view of the (B, OH, OW, N) result, NCHW in shape like conv2d's)."""
    _check(x, plan, packed)
    if x.dim() != 4:
        raise ValueError(f"fused_conv2d takes (B, C, H, W) inputs, got {tuple(x.shape)}")
    N, C, KH, KW = plan.shape
    B, Cx, H, W = x.shape
    if Cx != C:
        raise ValueError(f"input has {Cx} channels, the layer takes {C}")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    OH, OW = conv_output_size(H, KH, sh, ph, dh), conv_output_size(W, KW, sw, pw, dw)
    M, K = B * OH * OW, C * KH * KW
    bp = scale if breakpoint is None else breakpoint
    out = _run(x, plan, packed, scale, bp, lut, bias, M, N, K, tuple(x.stride()), (H, W, OH, OW),
               (KH, KW, sh, sw, ph, pw, dh, dw), config)
    return out.view(B, OH, OW, N).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- custom ops
def _register_ops():
    if not HAS_TRITON:
        return None, None

    @torch.library.custom_op("quantsd::fused_linear", mutates_args=())
    def _lin(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, breakpoint: Optional[torch.Tensor],
             lut: torch.Tensor, bias: Optional[torch.Tensor], plan: str) -> torch.Tensor:
        return fused_linear(x, plan_from_key(plan), packed, scale, breakpoint, lut, bias)

    @_lin.register_fake
    def _(x, packed, scale, breakpoint, lut, bias, plan):
        return x.new_empty(*x.shape[:-1], plan_from_key(plan).shape[0])

    @torch.library.custom_op("quantsd::fused_conv2d", mutates_args=())
    def _conv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, breakpoint: Optional[torch.Tensor],
              lut: torch.Tensor, bias: Optional[torch.Tensor], plan: str, stride: list[int], padding: list[int],
              dilation: list[int]) -> torch.Tensor:
        return fused_conv2d(x, plan_from_key(plan), packed, scale, breakpoint, lut, bias, stride, padding,
                            dilation).contiguous(memory_format=torch.channels_last)

    @_conv.register_fake
    def _(x, packed, scale, breakpoint, lut, bias, plan, stride, padding, dilation):
        N, _, KH, KW = plan_from_key(plan).shape
        B, _, H, W = x.shape
        OH = conv_output_size(H, KH, stride[0], padding[0], dilation[0])
        OW = conv_output_size(W, KW, stride[1], padding[1], dilation[1])
        return torch.empty((B, N, OH, OW), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    return _lin, _conv


LINEAR_OP, CONV_OP = _register_ops()   # at import: registering inside a traced region would break the graph
if os.environ.get("QUANTSD_FUSED_CONFIGS"):
    load_tuned(os.environ["QUANTSD_FUSED_CONFIGS"])
