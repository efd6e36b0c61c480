"""One Triton launch for several packed layers (eager mode; see :mod:`quantsd.dequant_groups`).

An eager UNet step is host-bound: each layer's own dequant launch costs ~15-30 us of Python and
driver time, ~282 times per SD1.5 step.  :class:`GroupLaunch` rebuilds the dense weights of
several value-table layers (per-tensor parameters, one or two bit widths, one output dtype) in a single
launch of ``_group_table_kernel`` into one flat buffer, each layer's weight a view of it.

The layers' codes and tables stay where they are (no copy): the kernel is given the first
layer's codes and table as base pointers and every layer's offsets from them (int64 address
differences), plus a per-program layer index.  The decode is the per-layer kernel's value-table
path (same code extraction, same gather, same cast), so the weights are the reference's bits.

Speed: a layer's code offset and length reach the kernel at run time, so by default the compiler
loads one code byte per lane; when every member's offset and length are multiples of 16 (always, for
caching-allocator blocks and SD's shapes) the launch says so (``ALIGNED``) and the loads vectorize.
Each program decodes 4096 weights of one layer and gathers them from the layer's table held in
shared memory.  The whole SD1.5 paper-final decode (production: groups plus the lone layers' own
kernel) took 0.86 ms on an H200 against 0.62 ms for merely writing the same buffers
(bench/tune_group_kernel.py; BENCHMARKS.md, sessions 8 and 9).
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import dequant
from .dequant import HAS_TRITON, LAUNCH_OPTIONS

__all__ = ["GroupLaunch", "ALIGN", "flat_layout"]

# weights per program: four times the per-layer kernel's (each program loads its layer's table once).
# bench/tune_group_kernel.py on an H200, paper-final's decode as group-kernel launches in one CUDA graph:
# 118 launches, table gathered from global memory: 2048 x 4 warps 0.93 ms vs 1024 x 4 warps 1.02 ms;
# 103 launches, table in shared memory: 4096 x 4 warps 0.855 ms vs 2048 x 4 warps 0.880 ms (session 9)
BLOCK = 4096
ALIGN = 128  # elements: each layer's weight starts on a 256-byte boundary of the flat buffer (fp16)
assert BLOCK % ALIGN == 0   # a layer's programs cover its padded slot, never the next layer's
_KERNELS: dict = {}  # specialization key -> compiled group kernel, checked once (dequant.adopt_checked)


def flat_layout(numels: Sequence[int]) -> tuple[list[int], int]:
    """(offsets, total): where each layer's weight starts in a group's flat buffer (every start on an
    ALIGN boundary), and the buffer's length in elements."""
    offsets, off = [], 0
    for n in numels:
        offsets.append(off)
        off += -(-int(n) // ALIGN) * ALIGN
    return offsets, off


class GroupLaunch:
    """Launch constants of one group, computed once (``run`` only allocates and launches).

    ``packed`` / ``luts``: the layers' codes (uint8) and value tables (float32[2^bits]), which must
    stay alive and in place while this object is used (callers rebuild it when a data pointer
    changes).  ``shapes``: the dense weights' shapes.  ``bits``: every layer's bit width, or one per
    layer -- at most two different widths in one launch (paper-final's 4-bit convolutions beside
    8-bit projections in one block: one launch, not two).  ``codes_channels_last``: per layer, its
    codes are stored in (O, KH, KW, I) order (:meth:`quantsd.nn.QuantModule.set_codes_channels_last`;
    a 4-d conv weight larger than 1x1), so the decode, which writes every layer in its codes' order,
    writes that weight channels-last and its view gets channels-last strides.  Why: a compiled UNet
    runs its convolutions channels-last, and Inductor copies every weight that arrives NCHW to
    channels-last on every call (H200, SD1.5: 0.79 ms of a 7.07 ms dense step;
    bench/conv_layout_probe.py)."""

    def __init__(self, packed: Sequence[torch.Tensor], luts: Sequence[torch.Tensor], shapes: Sequence[tuple],
                 bits: int | Sequence[int], dtype: torch.dtype, codes_channels_last: Sequence[bool] | None = None):
        if not HAS_TRITON:
            raise RuntimeError("grouped dequant needs Triton")
        if not packed or len(packed) != len(luts) or len(packed) != len(shapes):
            raise ValueError("one codes tensor, one table and one shape per layer")
        if any(t.dtype != torch.float32 for t in luts) or any(p.dtype != torch.uint8 for p in packed):
            raise ValueError("grouped dequant takes uint8 codes and float32 value tables")
        per_layer = [int(bits)] * len(packed) if isinstance(bits, int) else [int(b) for b in bits]
        widths = sorted(set(per_layer))
        if len(per_layer) != len(packed) or len(widths) > 2 or not all(1 <= b <= 8 for b in widths):
            raise ValueError(f"one launch takes one or two bit widths in 1..8, one per layer; got {bits}")
        # the kernel's BITS and BITS2 (0: one width)
        self.bits, self.bits2 = widths[0], (widths[1] if len(widths) == 2 else 0)
        self.dtype = dtype
        self.device = packed[0].device
        self.shapes = [tuple(int(s) for s in sh) for sh in shapes]
        numels = [int(torch.Size(sh).numel()) for sh in self.shapes]
        self.offsets, self.numel = flat_layout(numels)
        ccl = [False] * len(packed) if codes_channels_last is None else [bool(c) for c in codes_channels_last]
        if len(ccl) != len(packed):
            raise ValueError("one codes_channels_last flag per layer")
        for sh, c in zip(self.shapes, ccl):
            if c and (len(sh) != 4 or sh[2] * sh[3] <= 1):
                raise ValueError(f"a weight of shape {sh} can't have channels-last codes (needs a conv weight "
                                 "(O, I, KH, KW) with KH*KW > 1)")
        self.codes_channels_last = ccl
        progs = [-(-n // BLOCK) for n in numels]
        first = [0]
        for p in progs[:-1]:
            first.append(first[-1] + p)
        self.programs = sum(progs)
        self._packed_base, self._lut_base = packed[0], luts[0]
        pb, lb = packed[0].data_ptr(), luts[0].data_ptr()
        rows = []
        for p, t, o, n, f, b in zip(packed, luts, self.offsets, numels, first, per_layer):
            dl = t.data_ptr() - lb
            if dl % 4:
                raise ValueError("value tables must be 4-byte aligned")
            rows.append([p.data_ptr() - pb, dl // 4, o, n, f, b])
        # code loads vectorize when every layer's codes sit 16 bytes apart from the first's and every
        # length is a multiple of 16 (caching-allocator blocks and SD's layer shapes always are)
        self.aligned = all(r[0] % 16 == 0 for r in rows) and all(n % 16 == 0 for n in numels)
        self._view_args = [(sh, _strides(sh, c), o) for sh, o, c in zip(self.shapes, self.offsets, ccl)]
        # the compiled kernel's specialization: output dtype, and the base pointers' 16-byte alignment
        # (every other argument is a fresh allocation); the kernels live in a module-level cache,
        # never on this object (a compiled kernel can be neither copied nor pickled)
        self._key = (self.bits, self.bits2, dtype, self.device, pb % 16 == 0, lb % 16 == 0, self.aligned)
        self.desc = torch.tensor(rows, dtype=torch.int64).to(self.device)
        self.prog_layer = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                                  torch.tensor(progs)).to(self.device)
        # a direct launch's fixed arguments: the addresses as integers (Triton's launcher then asks
        # neither the tensors for their addresses nor the driver about them; the tensors stay referenced
        # above) and the constexprs; the output's address is the one argument read per launch
        self._index = self.device.index if self.device.type == "cuda" else None
        self._addresses = (pb, lb, self.desc.data_ptr(), self.prog_layer.data_ptr())
        self._constexprs = (self.bits, BLOCK, dtype == torch.bfloat16, ALIGN, self.aligned, self.bits2)
        self._direct = None    # the compiled kernel, once adopted (run_into); never copied or pickled
        self._fast = None      # its C launcher's call, once checked (_adopt_fast); never copied or pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_direct": None, "_fast": None}

    def _launch_direct(self, k, out_address: int) -> None:
        """Compiled kernel ``k`` into the buffer at ``out_address``, on the current stream."""
        pb, lb, dp, pp = self._addresses
        dequant.direct_launch(k, self.programs, self._index, pb, lb, out_address, dp, pp, *self._constexprs)

    def run(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat buffer of every layer's dense weight (layer i at ``offsets[i]``); ``out``: a
        contiguous buffer of at least ``numel`` elements of ``dtype`` on the device to write into
        (reused slots, :class:`quantsd.dequant_groups._SlotPool`), else a fresh one.

        After the first launch (Triton's own, whose output a direct launch must then reproduce) the
        compiled kernel is launched directly: every argument but the fresh output is fixed, and the
        output is a new caching-allocator block (aligned), so the specialization cannot change."""
        if self.device.type == "cuda" and self.device.index != torch._C._cuda_getDevice():
            with torch.cuda.device(self.device):     # Triton launches on the current device
                return self.run(out)
        if out is None:
            out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        elif (out.dtype != self.dtype or out.device != self.device or out.numel() < self.numel
              or not out.is_contiguous() or out.data_ptr() % 16):
            raise ValueError(f"out must be a contiguous, 16-byte aligned {self.dtype} buffer of at least {self.numel} "
                             f"elements on {self.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
        if not self.programs:
            return out
        bf16 = self.dtype == torch.bfloat16
        direct = self.device.type == "cuda" and dequant.direct_ok()
        if direct:
            k = _KERNELS.get(self._key)
            if k is not None:
                self._launch_direct(k, out.data_ptr())
                return out
        o = out.view(torch.int16) if bf16 else out
        k = dequant._group_table_kernel[(self.programs,)](
            self._packed_base, self._lut_base, o, self.desc, self.prog_layer, BITS=self.bits, BLOCK=BLOCK,
            OUT_BF16=bf16, ALIGN=ALIGN, ALIGNED=self.aligned, BITS2=self.bits2, **LAUNCH_OPTIONS)
        if direct and hasattr(k, "run") and not torch.cuda.is_current_stream_capturing():
            dequant.adopt_checked(_KERNELS, self._key, k, lambda check: self._launch_direct(k, check.data_ptr()),
                                  out, self.same_weights)
        return out

    def run_into(self, out: torch.Tensor) -> None:
        """:meth:`run` into ``out`` without its per-call work, for a caller that guarantees what
        ``run`` checks: ``out`` a contiguous ``dtype`` buffer of at least ``numel`` elements on
        ``device``, which is the current device (a pool slot made for this launch,
        :class:`quantsd.dequant_groups._SlotPool`).  Once ``run`` has checked a direct launch against
        Triton's own, a call is that one direct launch with its arguments fixed at construction.
        Why: once per block and eager step on the host-bound path (session 13's H200 profile: the
        checks and the kernel-cache lookup in ``run`` were ~20 us of host time per launch)."""
        k = self._direct
        if k is None or not dequant.direct_ok():
            self.run(out)
            if self._index is not None and dequant.direct_ok():
                self._direct = _KERNELS.get(self._key)
                if self._direct is not None:
                    self._adopt_fast(out)
            return
        fast = self._fast
        if fast is None:
            self._launch_direct(k, out.data_ptr())
            return
        launch, grid, head, tail = fast
        launch(*grid, torch._C._cuda_getCurrentRawStream(self._index), *head, out.data_ptr(), *tail)

    def _adopt_fast(self, want: torch.Tensor) -> None:
        """Launch through the C launcher alone (:func:`quantsd.kernels.dequant.c_launcher`) from now
        on if that reproduces ``want``, the adopted kernel's output: checked once, like the direct
        launch; a launcher that refuses the call or disagrees keeps the direct launch (for this
        group)."""
        bound = dequant.c_launcher(self._direct)
        if bound is None or torch.cuda.is_current_stream_capturing():
            return
        launch, head = bound
        pb, lb, dp, pp = self._addresses
        fast = (launch, (self.programs, 1, 1), head + (pb, lb), (dp, pp, *self._constexprs))
        try:
            got = dequant.poisoned_like(want[:self.numel])
            launch(*fast[1], torch._C._cuda_getCurrentRawStream(self._index), *fast[2], got.data_ptr(), *fast[3])
            ok = self.same_weights(got, want)
        except torch.OutOfMemoryError:
            return
        except Exception:  # a launcher that takes other arguments
            ok = False
        if ok:
            self._fast = fast

    def same_weights(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Do flat buffers ``a`` and ``b`` hold the same bits in every layer's weight?  (The padding
        between layers belongs to no weight: it is not compared.)"""
        from .dequant import same_bits

        return all(same_bits(x, y) for x, y in zip(self.views(a), self.views(b)))

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Layer ``i``'s weight in the flat buffer ``run`` returned."""
        return flat.as_strided(*self._view_args[i])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat.as_strided(*args) for args in self._view_args]


def _strides(shape: tuple, channels_last: bool) -> tuple:
    """A weight's strides in the flat buffer: contiguous, or channels-last ((O, KH, KW, I) order)."""
    if channels_last:
        _, i, kh, kw = shape
        return (kh * kw * i, 1, kw * i, i)
    return torch.empty(shape, device="meta").stride()
