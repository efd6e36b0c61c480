"""Why is a compiled packed UNet step slower than its kernels?  (GPU only; BENCHMARKS.md)

    python bench/compiled_overhead.py --variants dense,packed --out OUT.json

Under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) the packed step measured 13.0 ms
while its kernels add up to 7.9 ms (dense: 8.4 ms vs 7.0).  For each variant this measures, on
the sd15-arch UNet (CFG batch 2, 512²):

* the step time with CUDA events (median of 20, as ``quantsd bench``) and the host time per call
  (no synchronization: how long Python takes to issue one step);
* one profiled window of 5 steps with CPU and CUDA activity: the CPU-side ops and CUDA runtime
  calls per step (graph launches vs. individual kernel launches, input copies) and the GPU
  kernels per step, so host overhead, graph partitions and extra copies can be told apart;
* Dynamo/Inductor counters (graphs, graph breaks, cudagraph partitions, skips).

Variants: ``dense`` (fp16, SDPA), ``packed`` (recipe, Triton dequant), ``packed-nopartition``
(the same with ``torch._inductor.config.graph_partition = False``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config as ic
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline, cuda_time_ms  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def measure(pipe, steps: int = 5) -> dict:
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    unet = pipe.unet
    lat, t, ctx = _unet_inputs(pipe, 2, 512, unet.device, unet.dtype)
    call = lambda: unet(lat, t, encoder_hidden_states=ctx, return_dict=False)  # noqa: E731
    res: dict = {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(6):  # compile, record, replays
            call()
        torch.cuda.synchronize()
        res["warmup_s"] = round(time.perf_counter() - t0, 1)
        res["event_ms"] = cuda_time_ms(call, 20, 3)
        host = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                call()
            host.append((time.perf_counter() - t0) / 5 * 1e3)
            torch.cuda.synchronize()
        res["host_ms_per_call"] = sorted(host)[len(host) // 2]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                call()
            torch.cuda.synchronize()
    cpu, gpu, runtime = Counter(), Counter(), Counter()
    cpu_us, gpu_us = Counter(), Counter()
    for ev in prof.key_averages():
        name = ev.key[:100]
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            gpu[name] += ev.count
            gpu_us[name] += getattr(ev, "self_device_time_total", 0) or 0
        else:
            cpu[name] += ev.count
            cpu_us[name] += ev.self_cpu_time_total
            if name.startswith("cuda"):
                runtime[name] += ev.count
    per = lambda c: {k: round(v / steps, 1) for k, v in c.most_common(25)}  # noqa: E731
    res["cuda_runtime_calls_per_step"] = per(runtime)
    res["cpu_ops_per_step"] = per(cpu)
    res["cpu_self_us_per_step_top"] = {k: round(v / steps) for k, v in cpu_us.most_common(25)}
    res["gpu_kernels_per_step"] = round(sum(gpu.values()) / steps, 1)
    res["gpu_kernel_ms_per_step"] = round(sum(gpu_us.values()) / steps / 1e3, 3)
    res["counters"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "inductor", "graph_break")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--variants", default="dense,packed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for v in a.variants.split(","):
        torch._dynamo.reset()
        counters.clear()
        ic.graph_partition = v != "packed-nopartition"
        packed = v.startswith("packed")
        cfg = BenchConfig(v, packed=packed, compile=True)
        pipe = build_pipeline("sd15-arch", cfg, dev, recipe=load_recipe(a.recipe) if packed else None)
        try:
            out[v] = measure(pipe)
        except Exception as e:  # record and go on with the next variant
            out[v] = {"error": f"{type(e).__name__}: {e}"[:500]}
        small = {k: out[v].get(k) for k in ("warmup_s", "event_ms", "host_ms_per_call", "gpu_kernels_per_step",
                                             "gpu_kernel_ms_per_step", "cuda_runtime_calls_per_step", "error")}
        print(v, json.dumps(small), flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        del pipe
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
