"""Can the dequant kernels hide behind the UNet's compute?  (GPU only; an upper bound for BENCHMARKS.md)

    python bench/overlap_probe.py --out OUT.json

The compiled packed step runs the dense step's kernels plus ~280 dequant kernels (~1 ms on an H200).
Before building a side-stream prefetch of weights, this measures what overlap can give at best: in one
CUDA graph, the dense compiled UNet step (batch 2, 512²) on the capturing stream while every packed
layer of paper-final is dequantized on a second stream (no dependencies between the two, so the GPU
may interleave them freely), against each alone and both one after the other.  Side streams of
several priorities, since a low-priority dequant should fill the compute kernels' idle SMs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline, cuda_graph_ms  # noqa: E402
from quantsd.nn import packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "priority_range": list(torch.cuda.Stream.priority_range())}
    packed = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev, recipe=load_recipe(a.recipe),
                            grouped_dequant=False)
    layers = [m for _, m in packed_modules(packed.unet)]
    dense = build_pipeline("sd15-arch", BenchConfig("fp16-sdpa"), dev)
    unet = torch.compile(dense.unet)
    lat, t, ctx = _unet_inputs(dense, 2, 512, dev, torch.float16)

    def step():
        unet(lat, t, encoder_hidden_states=ctx, return_dict=False)

    def dequant():
        for m in layers:
            m.dequantized_weight()

    def both(side: torch.cuda.Stream):
        def fn():
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                dequant()
            step()
            main.wait_stream(side)
        return fn

    with torch.inference_mode():
        for _ in range(3):
            step()
        res["dense_step_ms"] = cuda_graph_ms(step)
        res["dequant_all_ms"] = cuda_graph_ms(dequant)
        res["serial_ms"] = cuda_graph_ms(lambda: (dequant(), step()))
        lo, hi = torch.cuda.Stream.priority_range()
        for name, prio in (("side_low_priority", lo), ("side_high_priority", hi)):
            res[f"concurrent_{name}_ms"] = cuda_graph_ms(both(torch.cuda.Stream(priority=prio)))
            print(name, res[f"concurrent_{name}_ms"], flush=True)
    res["layers"] = len(layers)
    for k in list(res):
        if k.startswith("concurrent_"):
            res[k.replace("_ms", "_over_dense")] = res[k] / res["dense_step_ms"]
    print(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
