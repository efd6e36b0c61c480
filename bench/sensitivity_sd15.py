"""Wall time of a default sensitivity sweep on ``sd15-arch`` (GPU), measured on a sample.

The full default sweep is every block (86) x 3 methods x {4, 8} bits = 516 configurations
of 8 prompts, 20 steps, 512x512. Within a short GPU lease we time the cached reference and a
stratified sample of configurations (every component, blocks of every size class), then
extrapolate per component: total = reference + sum_c n_configs_c * median_seconds_c.
Where the time goes is reported by splitting each configuration into quantize / sample /
decode with CUDA synchronisation.

    python bench/sensitivity_sd15.py --dtype float16 --budget-s 240 --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from quantsd.blocks import list_blocks
from quantsd.models import load_pipeline
from quantsd.prompts import draw_prompts
from quantsd.sensitivity.config import SweepConfig
from quantsd.sensitivity.runner import PipelineRunner, measure, quantized_block, sweep_plan


def _sync() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--per-component", type=int, default=6, help="sampled configurations per component")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    pipe = load_pipeline("sd15-arch", device="cuda")
    pipe.to(dtype=dtype)
    build_s = time.perf_counter() - t0
    config = SweepConfig(model="sd15-arch", prompts=tuple(draw_prompts(None, 8, seed=0)), steps=20,
                         height=512, width=512, dtype=args.dtype)
    runner = PipelineRunner(pipe, config, torch.device("cuda"), batch_size=8)
    t = _sync()
    ref = runner.reference()
    ref_s = _sync() - t
    plan = sweep_plan(pipe, config)
    per_component: dict[str, list] = {}
    for b, m, n in plan:
        per_component.setdefault(b.component, []).append((b, m, n))
    timings: dict[str, list[dict]] = {c: [] for c in per_component}
    deadline = time.perf_counter() + args.budget_s
    for component, configs in per_component.items():
        step = max(1, len(configs) // args.per_component)
        for b, m, n in configs[::step][: args.per_component]:
            if time.perf_counter() > deadline:
                break
            t = _sync()
            with quantized_block(pipe, b, m, n, config.granularity, config.seed):
                tq = _sync()
            quant_s = tq - t  # quantize + restore
            t = _sync()
            rec = measure(runner, ref, b, m, n)
            total = _sync() - t
            timings[component].append({"block": b.name, "method": m, "bits": n, "n_params": b.n_params,
                                       "quantize_restore_s": quant_s, "config_s": total,
                                       "image_error": rec["image_error"]})
            print(f"{component:12s} {b.name:45s} {m:10s} {n}b {total:6.2f}s (quant {quant_s:.2f}s) "
                  f"err {rec['image_error']:.3g}%", flush=True)
    estimate = ref_s
    breakdown = {}
    for component, configs in per_component.items():
        secs = [t["config_s"] for t in timings[component]]
        med = statistics.median(secs) if secs else float("nan")
        breakdown[component] = {"configs": len(configs), "sampled": len(secs), "median_config_s": med,
                                "median_quantize_s": statistics.median([t["quantize_restore_s"] for t in timings[component]]) if secs else None,
                                "estimated_s": med * len(configs)}
        estimate += med * len(configs)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
              "build_s": build_s, "reference_s": ref_s, "configs_total": len(plan), "breakdown": breakdown,
              "estimated_full_sweep_s": estimate, "samples": timings,
              "blocks": len([b for b in list_blocks(pipe) if b.layer_names])}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
