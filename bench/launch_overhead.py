"""Host time of the packed layers' dequant in eager mode, and eager UNet steps (GPU only; numbers
for BENCHMARKS.md).

    python bench/launch_overhead.py --recipe recipes/paper-final.yaml --out OUT.json

An eager UNet step is host-bound (the GPU waits for Python): every packed layer adds its
dequant launch to the host's work.  For every packed layer of the sd15-arch UNet (fp16) this
times, on the host only (``time.perf_counter`` around N launches of all layers, then one sync),
per layer:

* ``layer_grouped``: ``QuantModule._forward_weight()`` (what ``forward`` calls) with the layers
  grouped as eager generation groups them (quantsd.dequant_groups, ``EAGER_MAX_BYTES``);
* ``layer``: the same, one launch per layer;
* ``launch``: ``kernels.dequant.launch`` (allocation + the cached compiled kernel's own launcher);
* ``launch_triton_run``: the same through Triton's ``JITFunction.run`` (argument binding,
  specialization, cache lookup: the path before the direct launcher);
* ``alloc``: the output allocation alone (``torch.empty``);
* ``f_linear``: one small ``F.linear`` (the cost of one dense op, for scale);
* ``graph_replay``: ``CUDAGraph.replay()`` of a graph holding one layer's dequant launch into a
  fixed buffer (what a launch would cost the host if decodes were replayed graphs).

Then eager UNet steps (batch 2 = CFG, 512²), dense fp16, packed per layer (also with Triton's own
launch path) and packed grouped (eager generation's cap, and ``--caps`` MiB each as ``packed_grouped_<cap>``),
interleaved: ``--rounds`` rounds of 5 CUDA-event-timed steps of
each variant in turn, medians per variant and the median of each round's ratio to fp16 (the H200
box's eager timings drift by up to 2x within minutes, so variants are compared within a round).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline, cuda_time_ms  # noqa: E402
from quantsd.dequant_groups import EAGER_MAX_BYTES, group_dequant, launch_counts, ungroup_dequant  # noqa: E402
from quantsd.kernels import dequant  # noqa: E402
from quantsd.nn import packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def host_us(fn, n_layers: int, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best.append((time.perf_counter() - t) / reps / n_layers * 1e6)
        torch.cuda.synchronize()
    best.sort()
    return round(best[len(best) // 2], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of eager UNet steps")
    ap.add_argument("--caps", default="", help="more group caps to time, MiB, comma-separated (e.g. 96,192)")
    a = ap.parse_args()
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), torch.device("cuda"),
                          recipe=load_recipe(a.recipe))
    layers = [m for _, m in packed_modules(pipe.unet)]
    n = len(layers)
    dt = torch.float16
    groups = group_dequant(pipe.unet, EAGER_MAX_BYTES)   # as eager generation groups
    caps = [float(c) for c in a.caps.split(",") if c.strip()]
    res: dict = {"gpu": torch.cuda.get_device_name(0), "layers": n, "groups": len(groups),
                 "grouped_layers": sum(len(g.members) for g in groups),
                 "largest_group_mib": round(max((g.dense_bytes for g in groups), default=0) / 2**20, 1)}
    unet = pipe.unet
    lat, t, ctx = _unet_inputs(pipe, 2, 512, unet.device, unet.dtype)

    def step(u):
        return lambda: u(lat, t, encoder_hidden_states=ctx, return_dict=False)

    dense = build_pipeline("sd15-arch", BenchConfig("fp16-sdpa"), torch.device("cuda"))
    with torch.inference_mode():
        res["layer_grouped_us"] = host_us(lambda: [m._forward_weight() for m in layers], n)
        ungroup_dequant(unet)
        res["layer_us"] = host_us(lambda: [m._forward_weight() for m in layers], n)
        res["launch_us"] = host_us(lambda: [dequant.launch(m._plan, m.weight_packed, m._lut, None, m._lut, dt)
                                            for m in layers], n)
        res["alloc_us"] = host_us(lambda: [torch.empty(m.weight_shape, dtype=dt, device="cuda") for m in layers], n)
        x = torch.randn(8, 64, device="cuda", dtype=dt)
        w = torch.randn(64, 64, device="cuda", dtype=dt)
        res["f_linear_us"] = host_us(lambda: F.linear(x, w), 1, reps=2000)
        graphs = []
        for m in layers:
            buf = torch.empty(m.weight_shape, dtype=dt, device="cuda")
            dequant.launch_into(m._plan, m.weight_packed, m._lut, None, m._lut, buf)   # compile + cache first
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                dequant.launch_into(m._plan, m.weight_packed, m._lut, None, m._lut, buf)
            graphs.append((g, buf))
        res["graph_replay_us"] = host_us(lambda: [g.replay() for g, _ in graphs], n)
        graphs.clear()
        was = dequant._direct_enabled
        dequant._direct_enabled = False   # the same launches through Triton's JITFunction.run
        try:
            res["launch_triton_run_us"] = host_us(
                lambda: [dequant.launch(m._plan, m.weight_packed, m._lut, None, m._lut, dt) for m in layers], n)
        finally:
            dequant._direct_enabled = was

        # eager UNet steps, the variants interleaved round by round: this host's eager timings drift
        # by up to 2x within minutes, so each round compares the variants within seconds of each other
        def per_layer_triton_run():
            now = dequant._direct_enabled
            dequant._direct_enabled = False
            try:
                return cuda_time_ms(step(unet), 5, 1)["median"]
            finally:
                dequant._direct_enabled = now

        variants = {"fp16": lambda: cuda_time_ms(step(dense.unet), 5, 1)["median"],
                    "packed_per_layer": lambda: cuda_time_ms(step(unet), 5, 1)["median"],
                    "packed_per_layer_triton_run": per_layer_triton_run,
                    "packed_grouped": None}
        variants.update({f"packed_grouped_{c:g}": None for c in caps})
        rounds: dict[str, list] = {k: [] for k in variants}
        names = list(variants)
        for r in range(a.rounds):   # the order rotates, so no variant always runs first in a round
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn = variants[name]
                if name.startswith("packed_grouped"):
                    cap = name[len("packed_grouped_"):]
                    group_dequant(unet, int(float(cap) * 2**20) if cap else EAGER_MAX_BYTES)
                    rounds[name].append(cuda_time_ms(step(unet), 5, 1)["median"])
                    ungroup_dequant(unet)
                else:
                    rounds[name].append(fn())
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        res["unet_eager_ms"] = {k: round(med(v), 2) for k, v in rounds.items()}
        res["unet_eager_ratio_vs_fp16"] = {k: round(med([x / f for x, f in zip(v, rounds["fp16"])]), 3)
                                           for k, v in rounds.items() if k != "fp16"}
        res["unet_eager_rounds_ms"] = {k: [round(x, 2) for x in v] for k, v in rounds.items()}
        res["launches_per_step"] = {}
        for c in [None] + caps:
            group_dequant(unet, EAGER_MAX_BYTES if c is None else int(c * 2**20))
            res["launches_per_step"]["default" if c is None else f"{c:g}"] = launch_counts(unet)
        ungroup_dequant(unet)
        res["direct_kernels_cached"] = len(dequant._DIRECT)
        res["direct_enabled"] = dequant._direct_enabled
    print(json.dumps(res))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
