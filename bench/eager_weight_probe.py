"""Why is an eager packed UNet step slower on the host than a dense one?  Three probes (GPU only;
numbers for BENCHMARKS.md).

    python bench/eager_weight_probe.py --out OUT.json

1. ``op_host_us``: host time of one eager ``torch.conv2d`` / ``F.linear`` call whose weight is a
   parameter, a plain tensor, a view into a larger flat buffer (offset 0 and an interior offset,
   what a grouped packed layer passes), or a non-view tensor placed into that buffer's storage with
   ``set_`` -- which property of a grouped layer's weight costs host time (session 12's profile:
   ~7 us per convolution for a view).
2. ``gc``: interleaved host ms per UNet step, dense fp16 and packed, with Python's garbage
   collector enabled, disabled and after ``gc.freeze()``: the packed forward allocates more Python
   objects per step, and collections are charged to whatever op happens to run.
3. ``aten_drift``: torch.profiler self CPU time of the two models profiled A, B, A, B: whether the
   per-op differences of a single A-then-B profile are the models' or the host drifting.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def _weights(w: torch.Tensor) -> dict[str, torch.Tensor]:
    n = w.numel()
    flat = torch.empty(8 * n, device=w.device, dtype=w.dtype)
    view0 = flat[:n].view(w.shape)
    view0.copy_(w)
    view_mid = flat.as_strided(w.shape, w.stride(), 3 * n + 64)
    view_mid.copy_(w)
    placed = torch.empty(0, device=w.device, dtype=w.dtype).set_(flat.untyped_storage(), 5 * n + 128,
                                                                  w.shape, w.stride())
    placed.copy_(w)
    return {"parameter": torch.nn.Parameter(w.clone(), requires_grad=False), "tensor": w.clone(),
            "view_offset0": view0, "view_interior": view_mid, "set_into_storage": placed,
            "parameter_again": torch.nn.Parameter(w.clone(), requires_grad=False)}


def _host_us(fn, reps: int = 200) -> float:
    times = []
    for _ in range(7):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e6)
        torch.cuda.synchronize()
    return round(statistics.median(times), 2)


def op_host_us(dev: torch.device) -> dict:
    h = torch.float16
    x = torch.randn(2, 320, 64, 64, device=dev, dtype=h)
    wc, bc = torch.randn(320, 320, 3, 3, device=dev, dtype=h), torch.randn(320, device=dev, dtype=h)
    xl = torch.randn(2, 4096, 320, device=dev, dtype=h)
    wl, bl = torch.randn(1280, 320, device=dev, dtype=h), torch.randn(1280, device=dev, dtype=h)
    out: dict = {"conv2d": {}, "linear": {}}
    for name, w in _weights(wc).items():
        out["conv2d"][name] = _host_us(lambda w=w: torch.conv2d(x, w, bc, 1, 1))
    for name, w in _weights(wl).items():
        out["linear"][name] = _host_us(lambda w=w: F.linear(xl, w, bl))
    return out


def _aten(fn, steps: int = 2) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with torch.inference_mode():
        res["op_host_us"] = op_host_us(dev)
        print(json.dumps(res["op_host_us"]), flush=True)
    variants = {"fp16": build_pipeline("sd15-arch", BenchConfig("fp16-sdpa"), dev),
                "packed": build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev,
                                         recipe=load_recipe(a.recipe))}
    calls = {}
    for name, pipe in variants.items():
        lat, t, ctx = _unet_inputs(pipe, 2, 512, dev, pipe.unet.dtype)
        calls[name] = (lambda u=pipe.unet, lat=lat, t=t, ctx=ctx:
                       u(lat, t, encoder_hidden_states=ctx, return_dict=False))
    names = list(variants)
    with torch.inference_mode():
        for name in names:
            for _ in range(3):
                calls[name]()
        torch.cuda.synchronize()
        res["gc"] = {}
        for mode in ("enabled", "disabled", "frozen"):
            gc.enable()
            gc.collect()
            if mode == "disabled":
                gc.disable()
            elif mode == "frozen":
                gc.freeze()
            host: dict = {k: [] for k in names}
            counts0 = [s["collections"] for s in gc.get_stats()]
            for r in range(a.rounds):
                for name in names[r % 2:] + names[:r % 2]:
                    for _ in range(5):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        calls[name]()
                        host[name].append((time.perf_counter() - t0) * 1e3)
            counts1 = [s["collections"] for s in gc.get_stats()]
            med = {k: round(statistics.median(v), 2) for k, v in host.items()}
            res["gc"][mode] = {"host_ms": med, "packed_over_fp16": round(med["packed"] / med["fp16"], 3),
                               "collections_per_gen": [b - c for b, c in zip(counts1, counts0)]}
            if mode == "frozen":
                gc.unfreeze()
            gc.enable()
            print(mode, json.dumps(res["gc"][mode]), flush=True)
        profiles = []
        for name in names + names:
            profiles.append((name, _aten(calls[name])))
        res["aten_drift"] = {}
        for op in ("aten::cudnn_convolution", "aten::addmm", "aten::mm", "aten::native_group_norm",
                   "aten::empty", "cudaLaunchKernel", "aten::add", "aten::silu"):
            res["aten_drift"][op] = [(n, round(p.get(op, 0.0), 1)) for n, p in profiles]
        res["aten_drift"]["total_self_cpu_ms"] = [(n, round(sum(p.values()) / 1e3, 2)) for n, p in profiles]
        print(json.dumps(res["aten_drift"]), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
