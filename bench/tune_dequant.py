"""Pick the dequant kernel's launch shape on this GPU: weights per program x warps.

    python bench/tune_dequant.py --recipe recipes/paper-final.yaml --out OUT.json

Every packed layer of the sd15-arch UNet is rebuilt once per candidate, inside one captured CUDA
graph (GPU time only, no launch overhead); each candidate's output is also compared with the
pure-torch decode, layer by layer, bit for bit (the launch shape must not change a single bit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_packed import _graph_ms  # noqa: E402

from quantsd.bench.core import BenchConfig, build_pipeline  # noqa: E402
from quantsd.kernels import dequant  # noqa: E402
from quantsd.nn import dequantize_weight, packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--blocks", default="1024,2048,4096,8192")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), torch.device("cuda"),
                          recipe=load_recipe(a.recipe))
    layers = [m for _, m in packed_modules(pipe.unet)]
    moved = sum(m.nbytes_packed + 2 * m._plan.numel for m in layers)
    refs = [dequantize_weight(m.weight_packed, m.weight_shape, m.bits, m.method, m.granularity, m.weight_scale,
                              m.weight_breakpoint, torch.float16, backend="torch") for m in layers]
    default = (dequant.BLOCK, dequant.LAUNCH_OPTIONS["num_warps"])
    rows = []
    for block in map(int, a.blocks.split(",")):
        for warps in map(int, a.warps.split(",")):
            if block // (32 * warps) < 1:
                continue
            dequant.BLOCK, dequant.LAUNCH_OPTIONS["num_warps"] = block, warps
            exact = all(torch.equal(m.dequantized_weight(), r) for m, r in zip(layers, refs))
            ms = _graph_ms(lambda: [m.dequantized_weight() for m in layers])
            rows.append({"block": block, "warps": warps, "graph_ms": round(ms, 4), "GBps": round(moved / ms / 1e6),
                         "bit_exact": exact})
            print(json.dumps(rows[-1]), flush=True)
    dequant.BLOCK, dequant.LAUNCH_OPTIONS["num_warps"] = default
    best = min((r for r in rows if r["bit_exact"]), key=lambda r: r["graph_ms"])
    res = {"gpu": torch.cuda.get_device_name(0), "layers": len(layers), "bytes_moved": moved,
           "default": {"block": default[0], "warps": default[1]}, "best": best, "rows": rows}
    print("best", json.dumps(best))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
