"""Launch shapes and variants of the grouped value-table decode (GPU only; numbers for BENCHMARKS.md).

    python bench/tune_group_kernel.py --recipe recipes/paper-final.yaml --out OUT.json

Why: a grouped compiled packed UNet step is the dense step plus its decode (~0.8-1.0 ms on an H200
for paper-final: 1.64 GB of fp16 written at ~2-3 TB/s of the card's 4.8), and the decode is what
separates it from the <= 1.10x target.  The kernel (``kernels.dequant._group_table_kernel``) runs a
dependent chain per program -- program->layer index, the layer's descriptor, its codes, the table
gather, the store -- so few bytes are in flight per SM (latency-bound), and an 8-bit layer's table
gather (a 1 KiB float32 table) touches up to 8 L1 lines per warp access.  This script chose the
production kernel's shape (session 8, H200): 2048 weights x 4 warps per program, vector code loads
(``ALIGNED``), float32 table, 1-D grid -- the fourth row of VARIANTS.

This times, for the UNet's real groups (``quantsd.dequant_groups`` at the default cap; every other
packed layer as a group of one), one CUDA-graph replay of the whole step's decode into preallocated
buffers, per variant of an experimental copy of that kernel:

* ``BLOCK`` weights per inner step and ``num_warps``;
* ``ITER`` inner steps per program (more independent loads in flight per program, fewer programs);
* ``GRID2D``: a 2-D grid (block, layer) instead of the program->layer table (one dependent load less;
  programs past a layer's end do nothing);
* ``LUT16``: the value table stored in the output dtype (the reference cast done once, on the table:
  same bits) -- half the table bytes per gather, no per-weight cast.

Every variant's output is compared bit for bit with the production decode (``DequantGroup.flat`` /
``dequantized_weight``).  Also timed: the production path itself, 4-bit and 8-bit units apart, and
the floor (``fill_`` of the same buffers: writes only, one launch per unit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, build_pipeline, cuda_graph_ms  # noqa: E402
from quantsd.dequant_groups import group_dequant  # noqa: E402
from quantsd.kernels.dequant import _load_codes  # noqa: E402
from quantsd.nn import packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402

ALIGN = 128


@triton.jit
def _variant_kernel(packed_base, lut_base, out_ptr, desc_ptr, prog_layer_ptr,
                    BITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, ITER: tl.constexpr,
                    GRID2D: tl.constexpr, ALIGNED: tl.constexpr, GATHER: tl.constexpr = False):
    if GRID2D:
        d = desc_ptr + tl.program_id(1).to(tl.int64) * 5
        first = tl.program_id(0).to(tl.int64) * ITER
    else:
        pid = tl.program_id(0)
        d = desc_ptr + tl.load(prog_layer_ptr + pid).to(tl.int64) * 5
        first = (pid.to(tl.int64) - tl.load(d + 4)) * ITER
    code_off = tl.load(d)
    if ALIGNED:   # every layer's codes start 16 bytes apart from the base: vector loads...
        code_off = tl.multiple_of(code_off, 16)
    packed_ptr = packed_base + code_off
    lut_ptr = lut_base + tl.load(d + 1)
    out = out_ptr + tl.multiple_of(tl.load(d + 2), ALIGN)
    numel = tl.load(d + 3)
    if ALIGNED:   # and every layer's length is a multiple of 16: whole-vector masks
        numel = tl.multiple_of(numel, 16)
    padded = tl.multiple_of((numel + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    for i in tl.static_range(ITER):
        lpid = first + i
        e = lpid * BLOCK + tl.arange(0, BLOCK)
        code = _load_codes(packed_ptr, lpid, e, e < numel, numel, BITS, BLOCK, ALIGNED)
        if GATHER:   # the table in shared memory (tl.gather), not an L1 gather per weight from global memory
            w = tl.gather(tl.load(lut_ptr + tl.arange(0, 1 << BITS)), code, 0)
        else:
            w = tl.load(lut_ptr + code)
        tl.store(out + e, w.to(out_ptr.dtype.element_ty), mask=e < padded)


class Unit:
    """One launch's layers (a production group, or one lone layer), copied into contiguous codes and
    tables so that every variant reads the same bytes; the output buffer is preallocated."""

    def __init__(self, members, reference: torch.Tensor, offsets: list[int], numel: int):
        dev = members[0].weight_packed.device
        self.bits = members[0].bits
        self.members = members
        code_offs, n = [], 0
        for m in members:
            code_offs.append(n)
            n += -(-m.weight_packed.numel() // 16) * 16
        self.codes = torch.zeros(n + 16, dtype=torch.uint8, device=dev)
        for m, o in zip(members, code_offs):
            self.codes[o:o + m.weight_packed.numel()] = m.weight_packed
        self.lut32 = torch.cat([torch.nn.functional.pad(m._lut, (0, 256 - m._lut.numel())) for m in members])
        self.lut16 = self.lut32.to(torch.float16)
        self.numels = [m._plan.numel for m in members]
        self.offsets, self.numel = offsets, numel
        self.rows = [[co, 256 * i, oo, ne] for i, (co, oo, ne) in enumerate(zip(code_offs, offsets, self.numels))]
        self.reference = reference
        self.out = torch.empty(numel, dtype=torch.float16, device=dev)
        self.plans: dict = {}

    def plan(self, block: int, iters: int, grid2d: bool):
        key = (block, iters, grid2d)
        if key not in self.plans:
            per = block * iters
            progs = [-(-n // per) for n in self.numels]
            first = [0]
            for p in progs[:-1]:
                first.append(first[-1] + p)
            dev = self.codes.device
            desc = torch.tensor([r + [f] for r, f in zip(self.rows, first)], dtype=torch.int64, device=dev)
            prog_layer = torch.repeat_interleave(torch.arange(len(progs), dtype=torch.int32),
                                                 torch.tensor(progs)).to(dev)
            grid = (max(progs), len(progs)) if grid2d else (sum(progs),)
            self.plans[key] = (desc, prog_layer, grid)
        return self.plans[key]

    def launch(self, block: int, warps: int, iters: int, grid2d: bool, lut16: bool, aligned: bool,
               gather: bool = False) -> None:
        desc, prog_layer, grid = self.plan(block, iters, grid2d)
        _variant_kernel[grid](self.codes, self.lut16 if lut16 else self.lut32, self.out, desc, prog_layer,
                              BITS=self.bits, BLOCK=block, ALIGN=ALIGN, ITER=iters, GRID2D=grid2d, ALIGNED=aligned,
                              GATHER=gather, num_warps=warps, enable_fp_fusion=False)

    def exact(self) -> bool:
        a = self.out.view(torch.int16)
        b = self.reference.view(torch.int16)
        return all(torch.equal(a[o:o + n], b[o:o + n]) for o, n in zip(self.offsets, self.numels))


def build_units(unet) -> list[Unit]:
    layers = [m for _, m in packed_modules(unet)]
    groups = list({id(m._dq_group): m._dq_group for m in layers if m._dq_group is not None}.values())
    units = []
    with torch.inference_mode():
        for g in groups:
            units.append(Unit(g.members, g.flat(torch.float16), g.offsets, g.numel))
        for m in layers:
            if m._dq_group is None:
                if m._lut is None or m._lut.numel() > 256 or not m._table:
                    raise SystemExit(f"{m}: not a value-table layer; this script covers per-tensor recipes")
                n = m._plan.numel
                units.append(Unit([m], m.dequantized_weight(torch.float16).reshape(-1), [0], -(-n // ALIGN) * ALIGN))
    return units


# (BLOCK, warps, ITER, GRID2D, LUT16, ALIGNED[, GATHER]); the first is the kernel before session 8, the fourth today's
VARIANTS = [
    (1024, 4, 1, False, False, False),
    (1024, 4, 1, False, False, True),
    (2048, 4, 1, False, False, False),
    (2048, 4, 1, False, False, True),
    (2048, 8, 1, False, False, True),
    (4096, 4, 1, False, False, True),
    (4096, 8, 1, False, False, True),
    (1024, 2, 1, False, False, True),
    (2048, 4, 1, True, False, True),
    (2048, 4, 1, False, True, True),
    (1024, 4, 2, False, False, True),
    (2048, 4, 2, False, False, True),
    (1024, 4, 1, True, True, True),
    (2048, 4, 1, False, False, True, True),
    (2048, 4, 1, False, True, True, True),
    (4096, 4, 1, False, False, True, True),
]
# --variants gather: today's kernel (2048 x 4, vector code loads, fp32 or fp16 table) against its
# table-in-shared-memory forms only (a short GPU run)
GATHER_VARIANTS = [v for v in VARIANTS if len(v) > 6 or (v[:4] == (2048, 4, 1, False) and v[5])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--time-budget", type=float, default=240.0, help="skip variants that would start after S seconds")
    ap.add_argument("--model", default="sd15-arch")
    ap.add_argument("--variants", choices=["all", "gather"], default="all",
                    help="gather: only today's kernel and its table-in-shared-memory (tl.gather) variants")
    ap.add_argument("--per-unit", type=int, default=12, help="time the largest N units one by one")
    ap.add_argument("--check-only", action="store_true",
                    help="compare every variant with the production decode, no timing (CPU: TRITON_INTERPRET=1)")
    a = ap.parse_args()
    t0 = time.time()
    dev = torch.device("cpu" if a.check_only and not torch.cuda.is_available() else "cuda")
    pipe = build_pipeline(a.model, BenchConfig("packed", packed=True), dev, recipe=load_recipe(a.recipe))
    unet = pipe.unet
    group_dequant(unet, mixed_bits=False)   # (a Unit, and its variant kernel, decode one bit width)
    units = build_units(unet)
    written = sum(2 * u.numel for u in units)
    read = sum(u.codes.numel() for u in units)
    by_bits = {b: [u for u in units if u.bits == b] for b in sorted({u.bits for u in units})}
    res = {"gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (interpreter)", "torch": torch.__version__, "triton": triton.__version__,
           "units": len(units), "fp16_bytes_written": written, "code_bytes_read": read,
           "by_bits": {b: {"units": len(us), "fp16_bytes": sum(2 * u.numel for u in us)} for b, us in by_bits.items()},
           "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)

    def timed(fn) -> float | None:
        return None if a.check_only else round(cuda_graph_ms(fn), 4)

    layers = [m for _, m in packed_modules(unet)]
    groups = list({id(m._dq_group): m._dq_group for m in layers if m._dq_group is not None}.values())
    singles = [m for m in layers if m._dq_group is None]
    with torch.inference_mode():
        def production():
            return [g.flat(torch.float16) for g in groups] + [m.dequantized_weight() for m in singles]

        res["production_ms"] = timed(production)
        res["fill_floor_ms"] = timed(lambda: [u.out.fill_(0) for u in units])
        big = torch.empty(sum(u.numel for u in units), dtype=torch.float16, device=dev)
        res["one_fill_ms"] = timed(lambda: big.fill_(0))
        del big
        res["fill_floor_by_bits_ms"] = {b: timed(lambda us=us: [u.out.fill_(0) for u in us]) for b, us in by_bits.items()}
        print(json.dumps({k: res[k] for k in ("production_ms", "fill_floor_ms", "one_fill_ms", "fill_floor_by_bits_ms")}),
              flush=True)
        for args in (GATHER_VARIANTS if a.variants == "gather" else VARIANTS):
            if time.time() - t0 > a.time_budget:
                res["skipped_after_s"] = a.time_budget
                break
            block, warps, iters, grid2d, lut16, aligned = args[:6]
            row = {"block": block, "warps": warps, "iter": iters, "grid2d": grid2d, "lut16": lut16, "aligned": aligned,
                   "gather": len(args) > 6 and args[6]}
            try:
                for u in units:
                    u.out.fill_(float("nan"))
                    u.launch(*args)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row["exact"] = all(u.exact() for u in units)
                row["ms"] = timed(lambda: [u.launch(*args) for u in units])
                row["GBps"] = row["ms"] and round((written + read) / row["ms"] / 1e6, 1)
                row["by_bits_ms"] = {b: timed(lambda us=us: [u.launch(*args) for u in us]) for b, us in by_bits.items()}
            except Exception as e:  # a shape Triton can't compile: record it, go on
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
        # the production path again (drift), then the largest units one by one: production vs variants vs fill
        res["production_ms_again"] = timed(production)
        big_units = sorted(units, key=lambda u: -u.numel)[:a.per_unit]
        for u in big_units:
            if time.time() - t0 > a.time_budget + 60:
                break
            g = u.members[0]._dq_group if len(u.members) > 1 else None
            prod = (lambda g=g: g.flat(torch.float16)) if g is not None else \
                (lambda m=u.members[0]: m.dequantized_weight())
            row = {"layers": len(u.members), "bits": u.bits, "mib": round(2 * u.numel / 2**20, 2),
                   "production_ms": timed(prod), "fill_ms": timed(lambda u=u: u.out.fill_(0))}
            for v in PER_UNIT:
                row[str(v)] = timed(lambda u=u, v=v: u.launch(*v))
            res.setdefault("per_unit", []).append(row)
            print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


PER_UNIT = [(1024, 4, 1, False, False, False), (1024, 4, 1, False, False, True), (2048, 4, 1, False, False, True)]


if __name__ == "__main__":
    main()
