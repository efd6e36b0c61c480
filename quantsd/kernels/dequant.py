"""Triton dequantization of packed n-bit weights (bits 2..8, every method and granularity).

One launch rebuilds one dense weight from its packed LSB-first bitstream (docs/FORMAT.md)
and its stored scale / breakpoint, writing the compute dtype directly.  The output equals
the pure-torch reference (:func:`quantsd.nn.dequantize_weight` on the same device), bit for
bit, in one of two ways.

**Per-tensor parameters (value table).**  When one scale (and breakpoint) covers the whole
weight, a weight is a function of its code alone.  :func:`value_table` evaluates the reference
decode on every code (2^bits float32 values, 1 KiB at most, once per layer and device) and the
kernel's decode is ``w = table[code]``: exact by construction, and the cheapest decode there is
(one L1-resident gather; 282 SD1.5 layers in 1.12 ms on an H200 vs 1.41 ms arithmetically).

**Per-channel / per-group parameters (arithmetic).**  The kernel performs the reference's float32
operations in the same order:

* the only division in the reference, ``code / L`` (then ``- 0.5`` for uniform levels), is
  not recomputed in the kernel: it is read from a small table (``level_table``) that is the
  reference decode itself (``quant.quantizers.decode``) evaluated by torch on the weight's
  device at unit parameters, so it is the reference's intermediate value bit for bit, whatever
  division torch does there (today true IEEE division by a device tensor, ``true_div_``; an
  earlier table divided by a Python scalar, which CUDA turns into ``c * (1/L)``: up to a few
  ulp off the reference for 3+ bits, the cause of the H100 mismatches);
* the kernel then does what the reference does next, one IEEE op at a time with the same operands:
  ``(2m) * t`` (uniform; ``2m`` is exact), ``(2p) * t`` (PWLQ center), ``(m - p) * t`` then
  ``+ p`` (PWLQ tail), ``(p + m) * 0.5`` (2-bit tail), a sign flip, selects.  Multiplies and
  adds are kept separate (launch option ``enable_fp_fusion=False``, in ``LAUNCH_OPTIONS``):
  Triton then emits ``mul.rn.f32`` / ``add.rn.f32``, which ptxas never contracts, and passes
  ``--fmad=false``; torch eager runs each op as its own kernel, so it never fuses
  ``p + (m - p) * t`` into an FMA.  A CPU test compiles the kernel for sm_90 and checks the
  PTX/SASS has no FMA; Triton rejects unknown launch options, so the flag cannot be silently
  dropped;
* the final cast to float16 / bfloat16 is round-to-nearest-even, like ``Tensor.to`` (bfloat16 by
  integer rounding of the float32 bits: finite weights only, which is all a decode produces).

Work split: one program per ``BLOCK`` consecutive weights, one weight per lane, 32-bit index
math (64-bit only for a layer whose bitstream exceeds 2^31 bits).  A code is extracted by
its byte: 8-bit codes are the bytes themselves, 4- and 2-bit codes are split out of
contiguous byte loads and interleaved back into weight order, and 3/5/6/7-bit codes read a
second byte only when they straddle one (so nothing past the stream's last byte is ever
read).  Neighbouring lanes read neighbouring bytes and write neighbouring outputs
(vectorized stores).  The scale index is ``e // group``.  PWLQ reads one level-table entry per
weight (center or tail).  Launch shape BLOCK=1024 / 4 warps, tuned on an H200
(bench/tune_dequant.py; BENCHMARKS.md).

Entry points: :func:`dequantize` (launch, any device Triton runs on: CUDA, or the CPU under
``TRITON_INTERPRET=1``), :func:`prepare` (per-layer launch constants, computed once), and
the custom op ``torch.ops.quantsd.dequantize`` (opaque to torch.compile, with a fake impl, so
compiled graphs keep the quantized layers without graph breaks and CUDA graphs can capture
the launch).  The op's only constant argument is :func:`plan_key`, one string per layer:
torch.compile re-checks every constant a layer reads on every call (Dynamo guards), and with ~280
layers per UNet step that host time is what separated a compiled packed step from a dense one
(3.3 ms of guard checks per call before, 1.9 ms after; BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional, Sequence

import torch

from ..quant.packing import check_bits, packed_nbytes

try:  # Triton is optional: without it every layer uses the pure-torch decode
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - platform without triton
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreting", "available", "level_table", "prepare", "dequantize", "DequantPlan",
           "SUPPORTED_DTYPES", "LAUNCH_OPTIONS", "value_table"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PWLQ = ("pwlq", "pwlq-stochastic")
_UNIFORM = ("uniform", "stochastic")
BLOCK = 1024            # weights per program (one per lane; 8 per thread at 4 warps; tuned on an H200)
NUM_WARPS = 4
# Compile options of every launch.  enable_fp_fusion=False is part of the bit-exactness contract
# (no FMA contraction of the PWLQ tail's multiply-add), not a tuning knob.
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Can the Triton kernel run for tensors on ``device``?"""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


if HAS_TRITON:

    @triton.jit
    def _load_codes(packed_ptr, pid, e, emask, numel, BITS: tl.constexpr, BLOCK: tl.constexpr,
                    EVEN: tl.constexpr):
        """The codes of weights ``e`` (= pid * BLOCK + arange) of one layer's LSB-first bitstream.
        EVEN: ``numel`` is a multiple of the codes per byte, so a byte's mask can be written
        ``b < numel / k`` -- the same bytes as ``b * k < numel``, in a form whose constancy the
        compiler sees (with a ``multiple_of`` numel, the loads vectorize)."""
        MASK: tl.constexpr = (1 << BITS) - 1
        if BITS == 8:
            code = tl.load(packed_ptr + e, mask=emask, other=0).to(tl.int32)
        elif BITS == 4:                                         # 2 codes per byte, low nibble first
            b = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
            bmask = (b < numel // 2) if EVEN else (b * 2 < numel)
            byte = tl.load(packed_ptr + b, mask=bmask, other=0).to(tl.int32)
            code = tl.interleave(byte & MASK, byte >> 4)
        elif BITS == 2:                                         # 4 codes per byte, low bits first
            b = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
            bmask = (b < numel // 4) if EVEN else (b * 4 < numel)
            byte = tl.load(packed_ptr + b, mask=bmask, other=0).to(tl.int32)
            code = tl.interleave(tl.interleave(byte & MASK, (byte >> 4) & MASK),
                                 tl.interleave((byte >> 2) & MASK, byte >> 6))
        else:                                                   # LSB-first stream, maybe 2 bytes
            bit = e * BITS
            sh = (bit & 7).to(tl.int32)
            lo = tl.load(packed_ptr + (bit >> 3), mask=emask, other=0).to(tl.int32)
            hi = tl.load(packed_ptr + (bit >> 3) + 1, mask=emask & (sh + BITS > 8), other=0).to(tl.int32)
            code = ((lo | (hi << 8)) >> sh) & MASK
        return code

    @triton.jit
    def _store_weights(out_ptr, e, emask, w, OUT_BF16: tl.constexpr):
        if OUT_BF16:
            # round-to-nearest-even to bfloat16 by hand, stored as int16 bits: the same result as
            # torch's cast, on the GPU and in the interpreter (whose own cast truncates)
            u = w.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            tl.store(out_ptr + e, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=emask)
        else:
            tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=emask)

    @triton.jit
    def _decode(code, e, emask, scale_ptr, bp_ptr, lut_ptr, group, BITS: tl.constexpr, PWLQ: tl.constexpr,
                GMODE: tl.constexpr, TABLE: tl.constexpr):
        """float32 weights of ``code`` (any shape; ``e``: their element indices in the weight, for
        the scale index): the reference decode, op for op (see the module docstring)."""
        if TABLE:
            w = tl.load(lut_ptr + code)
        else:
            if GMODE == 0:
                m = tl.load(scale_ptr).to(tl.float32)
            else:
                g = e // group
                m = tl.load(scale_ptr + g, mask=emask, other=0.0).to(tl.float32)

            if PWLQ:
                L1: tl.constexpr = (1 << (BITS - 1)) - 1
                L2: tl.constexpr = (1 << (BITS - 2)) - 1
                if GMODE == 0:
                    p = tl.load(bp_ptr).to(tl.float32)
                else:
                    p = tl.load(bp_ptr + g, mask=emask, other=0.0).to(tl.float32)
                tail_region = ((code >> (BITS - 1)) & 1) != 0
                # one table read per weight: the center's level (cc/L1 - 0.5) or the tail's (lvl/L2)
                if L2 > 0:
                    t = tl.load(lut_ptr + tl.where(tail_region, 256 + (code & L2), code & L1))
                else:
                    t = tl.load(lut_ptr + (code & L1))
                center = (2.0 * p) * t                              # (2p) * (cc/L1 - 0.5)
                center = tl.where(p == 0.0, 0.0, center)
                if L2 > 0:
                    mag = p + (m - p) * t                           # p + (m-p) * (lvl/L2), no FMA
                else:
                    mag = (p + m) * 0.5 + tl.zeros_like(t)
                neg = ((code >> (BITS - 2)) & 1) != 0
                tail = tl.where(neg, -mag, mag)
                w = tl.where(tail_region, tail, center)
            else:
                v = (2.0 * m) * tl.load(lut_ptr + code)             # 2m * (c/L - 0.5)
                w = tl.where(m == 0.0, 0.0, v)
        return w

    @triton.jit
    def _dequant_kernel(packed_ptr, scale_ptr, bp_ptr, lut_ptr, out_ptr, numel, group,
                        BITS: tl.constexpr, PWLQ: tl.constexpr, GMODE: tl.constexpr, BLOCK: tl.constexpr,
                        OUT_BF16: tl.constexpr, WIDE: tl.constexpr, TABLE: tl.constexpr):
        # GMODE: 0 one scale (tensor), 1 one scale per `group` consecutive weights
        # TABLE: lut_ptr is the layer's value table (float32[2^BITS], the decoded weight of every
        # code): the decode is one gather, scale/breakpoint are not read
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        e = pid * BLOCK + tl.arange(0, BLOCK)                   # element index
        emask = e < numel
        code = _load_codes(packed_ptr, pid, e, emask, numel, BITS, BLOCK, False)

        w = _decode(code, e, emask, scale_ptr, bp_ptr, lut_ptr, group, BITS, PWLQ, GMODE, TABLE)
        _store_weights(out_ptr, e, emask, w, OUT_BF16)

    @triton.jit
    def _dequant_cl_kernel(packed_ptr, scale_ptr, bp_ptr, lut_ptr, out_ptr, numel, group, cin, ksize,
                           BITS: tl.constexpr, PWLQ: tl.constexpr, GMODE: tl.constexpr, BLOCK: tl.constexpr,
                           OUT_BF16: tl.constexpr, WIDE: tl.constexpr, TABLE: tl.constexpr):
        # _dequant_kernel for a conv weight (O, I, KH, KW) written channels-last, i.e. in
        # (O, KH, KW, I) memory order: the stored (NCHW-order) element e = (o*I + i)*K + s (K = KH*KW)
        # goes to o*I*K + s*I + i.  Same codes, same decode, same bits; only the store moves.
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        e = pid * BLOCK + tl.arange(0, BLOCK)
        emask = e < numel
        code = _load_codes(packed_ptr, pid, e, emask, numel, BITS, BLOCK, False)
        w = _decode(code, e, emask, scale_ptr, bp_ptr, lut_ptr, group, BITS, PWLQ, GMODE, TABLE)
        r = e % (cin * ksize)
        _store_weights(out_ptr, e - r + (r % ksize) * cin + r // ksize, emask, w, OUT_BF16)

    @triton.jit
    def _group_table_kernel(packed_base, lut_base, out_ptr, desc_ptr, prog_layer_ptr,
                            BITS: tl.constexpr, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr,
                            ALIGN: tl.constexpr, ALIGNED: tl.constexpr = False, BITS2: tl.constexpr = 0):
        # Several value-table layers of one or two bit widths in one launch (kernels/grouped.py).
        # Program pid works on layer prog_layer[pid]; desc (int64, 6 per layer): its codes' byte offset
        # from packed_base, its table's element offset from lut_base, its first element in out, its
        # element count, its first program, its bit width.  Every layer has BITS bits, or (BITS2 > 0)
        # BITS or BITS2: the program then branches on its layer's width (one branch per program, so
        # its threads never diverge).  The decode is the TABLE path above, and each layer's weights
        # are written in its codes' stored order (a conv whose codes are in (O, KH, KW, I) order comes
        # out channels-last).
        # ALIGNED: every layer's codes start a multiple of 16 bytes from packed_base and its length is
        # a multiple of 16 -- stated to the compiler, the code loads vectorize (without it a runtime
        # offset and length give one byte load per lane and code)
        pid = tl.program_id(0)
        layer = tl.load(prog_layer_ptr + pid).to(tl.int64)
        d = desc_ptr + layer * 6
        code_off = tl.load(d)
        numel = tl.load(d + 3)
        if ALIGNED:
            code_off = tl.multiple_of(code_off, 16)
            numel = tl.multiple_of(numel, 16)
        packed_ptr = packed_base + code_off
        lut_ptr = lut_base + tl.load(d + 1)
        out_off = tl.multiple_of(tl.load(d + 2), ALIGN)      # every layer starts on an ALIGN boundary
        lpid = pid.to(tl.int64) - tl.load(d + 4)
        e = lpid * BLOCK + tl.arange(0, BLOCK)
        emask = e < numel
        # stores run to the layer's padded end (the padding is the group buffer's own, unread), so
        # whole ALIGN-element runs are stored and the stores vectorize
        padded = tl.multiple_of((numel + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
        if BITS2 == 0:
            w = _table_decode(packed_ptr, lut_ptr, lpid, e, emask, numel, BITS, BLOCK, ALIGNED)
        elif tl.load(d + 5) == BITS:
            w = _table_decode(packed_ptr, lut_ptr, lpid, e, emask, numel, BITS, BLOCK, ALIGNED)
        else:
            w = _table_decode(packed_ptr, lut_ptr, lpid, e, emask, numel, BITS2, BLOCK, ALIGNED)
        _store_weights(out_ptr + out_off, e, e < padded, w, OUT_BF16)

    @triton.jit
    def _table_decode(packed_ptr, lut_ptr, lpid, e, emask, numel, BITS: tl.constexpr, BLOCK: tl.constexpr,
                      ALIGNED: tl.constexpr):
        """Weights ``e`` of a value-table layer: codes, then the table.  The layer's table (2^BITS
        values) goes to shared memory once per program and each weight is gathered from there: a
        gather per weight from global memory touches up to 8 cache lines per warp for an 8-bit table
        (H200, bench/tune_group_kernel.py: the 8-bit layers' decode 0.233 -> 0.205 ms)."""
        code = _load_codes(packed_ptr, lpid, e, emask, numel, BITS, BLOCK, ALIGNED)
        return tl.gather(tl.load(lut_ptr + tl.arange(0, 1 << BITS)), code, 0)


_LUTS: dict = {}


def level_table(bits: int, method: str, device: torch.device) -> torch.Tensor:
    """float32[512] on ``device``: [0:256] the reference's ``c/L - 0.5`` (uniform: L = 2^n-1;
    PWLQ center: L1 = 2^(n-1)-1), [256:512] PWLQ's ``lvl/L2`` (L2 = 2^(n-2)-1; zeros for n=2).
    Entries past the last code are 0 (never read).

    Computed by the reference decode itself (quantizers.decode) on ``device``, at parameters
    that make every later op exact, so each entry is the decode's intermediate bit for bit:
    uniform codes with m = 1/2 give ``(c/L - 1/2) * (2 * 1/2)``; PWLQ center codes with p = 1/2
    give ``(c/L1 - 1/2) * 1``; PWLQ tail codes (sign bit 0) with m = 1, p = 0 give
    ``(l/L2) * (1 - 0) + 0`` (all >= 0, so no -0.0) times the sign +1.  Whatever division torch
    does on that device is therefore the one the table holds.  Cached per (bits, kind, device)
    and shared by every layer.
    """
    from ..quant.quantizers import decode

    pwlq = method in _PWLQ
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (int(bits), pwlq, device)
    t = _LUTS.get(key)
    if t is None:
        bits = int(bits)
        L, L1, L2 = (1 << bits) - 1, (1 << (bits - 1)) - 1, (1 << (bits - 2)) - 1

        def par(v: float) -> torch.Tensor:
            return torch.full((1,), v, dtype=torch.float32, device=device)

        def codes(n: int, base: int = 0) -> torch.Tensor:  # one group of n codes, shape (1, n)
            return (torch.arange(n, device=device, dtype=torch.int32) | base).to(torch.uint8)[None]

        t = torch.zeros(512, dtype=torch.float32, device=device)
        if pwlq:
            t[:L1 + 1] = decode(codes(L1 + 1), method, bits, par(1.0), par(0.5))[0]
            if L2 > 0:
                t[256:256 + L2 + 1] = decode(codes(L2 + 1, 1 << (bits - 1)), method, bits, par(1.0), par(0.0))[0]
        else:
            t[:L + 1] = decode(codes(L + 1), method, bits, par(0.5))[0]
        _LUTS[key] = t
    return t


class DequantPlan(NamedTuple):
    """Launch constants of one layer (computed once, at layer construction)."""

    shape: tuple
    numel: int
    nbytes: int
    bits: int
    pwlq: bool
    gmode: int       # 0: one scale; 1: one scale per `group` consecutive weights
    group: int       # elements per scale (numel for per-tensor)
    wide: bool       # 64-bit index math (bitstream of 2^31 bits or more)
    table: bool      # decode by the layer's value table (per-tensor parameters): see value_table


def prepare(shape: Sequence[int], bits: int, method: str, granularity: str) -> DequantPlan:
    from ..quant.granularity import param_shape, parse_granularity

    bits = check_bits(bits)
    if method not in _PWLQ + _UNIFORM:
        raise ValueError(f"unknown method {method!r}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    pshape = param_shape(shape, granularity)
    nparams = 1
    for s in pshape:
        nparams *= s
    g = parse_granularity(granularity)
    if g.kind == "tensor" or nparams <= 1:
        gmode, group = 0, max(numel, 1)
    else:
        gmode, group = 1, numel // nparams
    return _plan(shape, bits, method in _PWLQ, gmode, group)


def _plan(shape, bits: int, pwlq: bool, gmode: int, group: int) -> DequantPlan:
    """The plan with its derived fields (element count, packed bytes, index width, table decode)."""
    numel = math.prod(shape)
    return DequantPlan(tuple(shape), numel, packed_nbytes(bits, numel), bits, pwlq, gmode, group,
                       numel * bits + 8 >= 2 ** 31, gmode == 0 and numel > 0)


def value_table(bits: int, method: str, scale: torch.Tensor, breakpoint: Optional[torch.Tensor]) -> torch.Tensor:
    """float32[2^bits] on the parameters' device: the decoded weight of every code of a layer with
    per-tensor parameters, computed by the reference decode itself (``quant.quantizers.decode``,
    elementwise, so each entry is bit for bit what the reference gives a weight with that code).

    With it the kernel's decode is one gather (``w = table[code]``) instead of a level-table read
    plus the PWLQ/uniform arithmetic: 1 KiB per layer at most (256 float32), computed once per
    device and dtype-independent (the cast to the compute dtype stays in the kernel).
    """
    from ..quant.quantizers import decode

    dev = scale.device
    codes = torch.arange(1 << int(bits), device=dev, dtype=torch.int32).to(torch.uint8)[None]
    p = None if breakpoint is None else breakpoint.float().reshape(1)
    return decode(codes, method, int(bits), scale.float().reshape(1), p)[0].contiguous()


# --------------------------------------------------------------------------- eager launches
# Triton's ``JITFunction.run`` binds and specializes every argument and looks the kernel up on
# each call: ~29 us of host time per launch on the H200 box, against ~15 us for the compiled
# kernel's own launcher (bench/launch_overhead.py).  An eager UNet step is host-bound, so that
# difference is ~4 ms per SD1.5 step.  The compiled kernel is therefore cached per specialization
# (the plan fixes the integer arguments; pointers are keyed by dtype and 16-byte alignment, as
# Triton keys them) and launched directly.  A new entry is checked once against Triton's own
# launch (same bits); on a mismatch or an error the direct path is switched off for good.
_DIRECT: dict = {}
_direct_enabled = HAS_TRITON and os.environ.get("QUANTSD_DIRECT_LAUNCH", "1") != "0"


def _no_launch_hooks() -> bool:
    """No profiler (e.g. proton) has registered a Triton launch hook: the direct launch skips them."""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is None or not getattr(hook, "calls", True)


def _direct_key(plan, packed, scale, bp, lut, dtype):
    return (plan, dtype, scale.dtype, bp.dtype, packed.device.index, packed.data_ptr() % 16 == 0,
            scale.data_ptr() % 16 == 0, bp.data_ptr() % 16 == 0, lut.data_ptr() % 16 == 0)


def direct_launch(k, grid: int, device_index: int, *args) -> None:
    """Launch compiled Triton kernel ``k`` (what ``JITFunction.run`` returned) on the current stream
    with ``args`` in signature order, constexprs included: what Triton's ``run`` does after binding."""
    k.run(grid, 1, 1, torch._C._cuda_getCurrentRawStream(device_index), k.function, k.packed_metadata, None, None,
          None, *args)


def c_launcher(k) -> tuple | None:
    """``(launch, head)`` to call compiled kernel ``k``'s C launcher without Triton's Python wrapper
    around it: ``launch(grid, 1, 1, stream, *head, *args)`` with ``args`` as :func:`direct_launch`
    takes them.  None where the wrapper does work of its own (scratch memory, sanitizer) or the
    launcher is not the layout this was checked against on a GPU (Triton 3.6's per-signature
    launcher; 3.8's generic one takes other arguments): callers keep :func:`direct_launch`.

    Why: the wrapper defines two closures and looks up the allocators on every call; on the
    host-bound eager path each group launch costs ~14 us of host time in situ (H200, session 15),
    once per block and step."""
    run = getattr(k, "run", None)
    launch = getattr(run, "launch", None)
    if (launch is None or type(run).__name__ != "CudaLauncher" or hasattr(run, "arg_annotations")
            or getattr(run, "gsan_enabled", False) or getattr(run, "global_scratch_size", 1)
            or getattr(run, "profile_scratch_size", 1) or not hasattr(run, "launch_pdl")):
        return None
    return launch, (k.function, run.launch_cooperative_grid, run.launch_pdl, None, None, k.packed_metadata, None,
                    None, None)


def direct_ok() -> bool:
    """May callers launch cached kernels directly?  Not switched off, and no launch hooks.  (Callers
    launch on the weights' device made current, as Triton compiles and loads for the current one.)"""
    return _direct_enabled and _no_launch_hooks()


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor like ``t`` with every byte 0xFF (NaN in every float dtype): a launch checked
    into it must write every element it is compared on -- a fresh block from the caching allocator
    may still hold a previous decode's very bits, and a launch that wrote nothing would pass."""
    got = torch.empty_like(t)
    got.untyped_storage().fill_(255)
    return got


def adopt_checked(cache: dict, key, k, launch_into, want: torch.Tensor, same) -> None:
    """Cache compiled kernel ``k`` under ``key`` if launching it directly (``launch_into(buffer)``)
    reproduces Triton's own output ``want`` (``same(got, want)``).  A disagreement or a launcher
    that rejects the arguments (another Triton) switches direct launches off for good; running out
    of memory for the check buffer only skips the caching."""
    try:
        got = poisoned_like(want)
        launch_into(got)
        ok = same(got, want)
    except torch.OutOfMemoryError:
        return
    except Exception:  # a Triton whose launcher takes other arguments
        ok = False
    if ok:
        cache[key] = k
    else:
        disable_direct()


def disable_direct() -> None:
    """Switch direct launches off for good (a launch that disagreed with Triton's own)."""
    global _direct_enabled
    _direct_enabled = False


def _run_direct(k, grid: int, plan: DequantPlan, packed, scale, bp, lut, out, bf16: bool) -> None:
    direct_launch(k, grid, packed.device.index, packed, scale, bp, lut, out, plan.numel, plan.group, plan.bits,
                  plan.pwlq, plan.gmode, BLOCK, bf16, plan.wide, plan.table)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two float16/bfloat16/float32 tensors (NaNs included)."""
    def bits(t):
        return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])

    return torch.equal(bits(a), bits(b))


def _adopt(key, k, grid, plan, packed, scale, bp, lut, want: torch.Tensor, bf16: bool) -> None:
    """Cache ``k`` for ``key`` if a direct launch reproduces Triton's own output (``want``)."""
    adopt_checked(_DIRECT, key, k, lambda got: _run_direct(k, grid, plan, packed, scale, bp, lut, got, bf16),
                  want, same_bits)


def launch(plan: DequantPlan, packed: torch.Tensor, scale: torch.Tensor, breakpoint: Optional[torch.Tensor],
           lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Run the kernel for a prepared layer (no validation: the hot path).  ``lut`` is the layer's
    :func:`value_table` when ``plan.table``, else the shared :func:`level_table`."""
    if packed.is_cuda and packed.device.index != torch._C._cuda_getDevice():
        # Triton launches on the current device: make it the weights' (a model on cuda:1)
        with torch.cuda.device(packed.device):
            return launch(plan, packed, scale, breakpoint, lut, dtype)
    out = torch.empty(plan.shape, dtype=dtype, device=packed.device)
    launch_into(plan, packed, scale, breakpoint, lut, out)
    return out


def launch_into(plan: DequantPlan, packed: torch.Tensor, scale: torch.Tensor, breakpoint: Optional[torch.Tensor],
                lut: torch.Tensor, out: torch.Tensor) -> None:
    """:func:`launch` writing into ``out`` (``plan.shape``, a kernel dtype, on the current device;
    contiguous, or a 4-d conv weight in channels-last memory format), e.g. a slot of a preallocated
    buffer (:mod:`quantsd.prefetch`); launches on the current stream."""
    if plan.numel == 0:
        return
    dtype = out.dtype
    bf16 = dtype == torch.bfloat16
    bp = scale if breakpoint is None else breakpoint
    grid = -(-plan.numel // BLOCK)
    if not out.is_contiguous():
        if out.dim() != 4 or not out.is_contiguous(memory_format=torch.channels_last):
            raise ValueError("dequant output must be contiguous or a channels-last 4-d tensor")
        o = out.permute(0, 2, 3, 1)   # (O, KH, KW, I): contiguous, the same memory
        o = o.view(torch.int16) if bf16 else o
        _dequant_cl_kernel[(grid,)](
            packed, scale, bp, lut, o, plan.numel, plan.group, out.shape[1], out.shape[2] * out.shape[3],
            BITS=plan.bits, PWLQ=plan.pwlq, GMODE=plan.gmode, BLOCK=BLOCK, OUT_BF16=bf16, WIDE=plan.wide,
            TABLE=plan.table, **LAUNCH_OPTIONS)
        return
    o = out.view(torch.int16) if bf16 else out
    direct = packed.is_cuda and direct_ok()
    if direct:
        key = _direct_key(plan, packed, scale, bp, lut, dtype)
        k = _DIRECT.get(key)
        if k is not None:
            _run_direct(k, grid, plan, packed, scale, bp, lut, o, bf16)
            return
    k = _dequant_kernel[(grid,)](
        packed, scale, bp, lut, o, plan.numel, plan.group,
        BITS=plan.bits, PWLQ=plan.pwlq, GMODE=plan.gmode, BLOCK=BLOCK, OUT_BF16=bf16, WIDE=plan.wide,
        TABLE=plan.table, **LAUNCH_OPTIONS)
    if direct and k is not None and hasattr(k, "run") and not torch.cuda.is_current_stream_capturing():
        _adopt(key, k, grid, plan, packed, scale, bp, lut, o, bf16)   # (the check would sync a capture)


def dequantize(packed: torch.Tensor, shape: Sequence[int], bits: int, method: str, granularity: str,
               scale: torch.Tensor, breakpoint: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Triton counterpart of :func:`quantsd.nn.dequantize_weight` (same arguments, same bits out).

    Validates sizes like the reference, then launches.  Runs on CUDA, or on the CPU under
    ``TRITON_INTERPRET=1``.
    """
    if not available(packed.device):
        raise RuntimeError(f"the Triton dequant kernel cannot run on {packed.device} "
                           "(needs CUDA, or TRITON_INTERPRET=1 on the CPU)")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Triton dequant writes {SUPPORTED_DTYPES}, not {dtype}")
    plan = prepare(shape, bits, method, granularity)
    if packed.dtype != torch.uint8 or packed.numel() != plan.nbytes:
        from ..quant import QuantError

        raise QuantError(f"packed data has {packed.numel()} bytes but {plan.numel} codes of {bits} bits need "
                         f"exactly {plan.nbytes} bytes")
    if (breakpoint is not None) != plan.pwlq:
        raise ValueError(f"method {method!r} {'needs' if plan.pwlq else 'takes no'} breakpoint")
    packed = packed.reshape(-1).contiguous()
    scale = scale.contiguous()
    breakpoint = None if breakpoint is None else breakpoint.contiguous()
    lut = value_table(bits, method, scale, breakpoint) if plan.table else level_table(bits, method, packed.device)
    return launch(plan, packed, scale, breakpoint, lut, dtype)


# --------------------------------------------------------------------------- custom op
_OP = None


def plan_key(plan: DequantPlan) -> str:
    """The plan as one string (``"bits:pwlq:gmode:group:table:shape"``), the op's only constant
    argument: torch.compile guards one string per layer instead of every field of the plan."""
    return f"{plan.bits}:{int(plan.pwlq)}:{plan.gmode}:{plan.group}:{int(plan.table)}:" + "x".join(map(str, plan.shape))


CODES_CL = ":cl"   # plan-key suffix of a conv whose codes are stored in (O, KH, KW, I) order


def _stored_order_out(shape, dtype, device, codes_cl: bool) -> torch.Tensor:
    """The op's output: contiguous, or for channels-last codes an (O, I, KH, KW) view of
    (O, KH, KW, I) memory, which the flat decode fills in stored order."""
    if not codes_cl:
        return torch.empty(shape, dtype=dtype, device=device)
    o, i, kh, kw = shape
    return torch.empty((o, kh, kw, i), dtype=dtype, device=device).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def plan_from_key(key: str) -> DequantPlan:
    key = key.removesuffix(CODES_CL)
    bits, pwlq, gmode, group, table, shape = key.split(":")
    plan = _plan(tuple(int(s) for s in shape.split("x")) if shape else (), int(bits), pwlq == "1", int(gmode),
                 int(group))
    if plan.table != (table == "1"):
        raise ValueError(f"inconsistent dequant plan key {key!r}")
    return plan


def _register_op():
    """``torch.ops.quantsd.dequantize``: one opaque node per layer in compiled graphs."""
    global _OP
    if _OP is not None or not HAS_TRITON:
        return _OP

    @torch.library.custom_op("quantsd::dequantize", mutates_args=())
    def _op(packed: torch.Tensor, scale: torch.Tensor, breakpoint: Optional[torch.Tensor], lut: torch.Tensor,
            plan: str, dtype: torch.dtype) -> torch.Tensor:
        p = plan_from_key(plan)
        if not plan.endswith(CODES_CL):
            return launch(p, packed, scale, breakpoint, lut, dtype)
        out = _stored_order_out(p.shape, dtype, packed.device, True)
        if packed.is_cuda and packed.device.index != torch._C._cuda_getDevice():
            with torch.cuda.device(packed.device):
                launch_into(p, packed, scale, breakpoint, lut, out.permute(0, 2, 3, 1))
        else:
            launch_into(p, packed, scale, breakpoint, lut, out.permute(0, 2, 3, 1))
        return out

    @_op.register_fake
    def _(packed, scale, breakpoint, lut, plan, dtype):
        return _stored_order_out(plan_from_key(plan).shape, dtype, packed.device, plan.endswith(CODES_CL))

    _OP = _op
    return _OP


_register_op()  # at import: registering inside a traced region would break the graph


def op_call(plan: DequantPlan, key: str, packed, scale, breakpoint, lut, dtype) -> torch.Tensor:
    """The layer's dequant: the custom op (constant argument: ``key``, :func:`plan_key`) while
    torch.compile traces, the direct launch of ``plan`` in eager (skips the dispatcher: one Python
    call and one kernel launch per layer).  Under compile ``plan`` is not read (no guards on it).
    For a value-table plan the kernel reads neither ``scale`` nor ``breakpoint``: callers pass the
    table for both (``lut, None``) so the compiled graph has no extra inputs (or guards) for them."""
    if torch.compiler.is_compiling():
        return _OP(packed, scale, breakpoint, lut, key, dtype)
    return launch(plan, packed, scale, breakpoint, lut, dtype)
