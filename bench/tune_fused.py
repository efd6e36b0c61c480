"""Fused dequant-GEMM vs dequantize-then-GEMM vs dense, per weight-bound layer of the SD1.5 UNet.
(GPU only; numbers for BENCHMARKS.md)

    python bench/tune_fused.py --recipe recipes/paper-final.yaml --max-rows 512 --out OUT.json \
        [--configs-out TUNED.json]

Captures every packed layer's input of one eager UNet step (batch 2 = CFG, 512²) whose GEMM has at
most ``--max-rows`` rows, and times each distinct layer shape as a CUDA graph of 20 calls (GPU time
only): the dense fp16 op on the decoded weight (the dense model's cost), dequant kernel + op (the
packed path without fusion), the fused kernel with the default launch shape (``choose_config``) and
with every launch shape of a small grid (the best is written to ``--configs-out``, loadable with
``QUANTSD_FUSED_CONFIGS``).  Also checks each fused output against dequant + op (relative error).
Totals are weighted by how often each shape occurs in a step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import BenchConfig, _unet_inputs, build_pipeline, cuda_graph_ms  # noqa: E402
from quantsd.kernels import fused  # noqa: E402
from quantsd.nn import QuantConv2d, QuantLinear, kernel_args, packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def graph_ms(fn, reps: int = 20) -> float:
    """Median GPU milliseconds of one ``fn`` call, from CUDA-graph replays of ``reps`` calls."""
    return cuda_graph_ms(fn, reps, iters=7)


def capture(unet, max_rows: int, inputs) -> "OrderedDict":
    """(signature) -> [layer, input, count] for the packed layers with at most ``max_rows`` GEMM rows."""
    seen: "OrderedDict" = OrderedDict()
    hooks = []

    def hook(m, args):
        x = args[0]
        rows = m._output_rows(x)
        if rows > max_rows:
            return
        key = (type(m).__name__, tuple(x.shape), m.weight_shape, m.bits, m.method, m.granularity,
               getattr(m, "stride", None), getattr(m, "padding", None))
        if key in seen:
            seen[key][2] += 1
        else:
            seen[key] = [m, x.detach().clone(), 1, rows]

    for _, m in packed_modules(unet):
        if isinstance(m, (QuantLinear, QuantConv2d)):
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.inference_mode():
        unet(*inputs[:1], inputs[1], encoder_hidden_states=inputs[2])
    for h in hooks:
        h.remove()
    return seen


def run_fused(m, x, cfg=None):
    params = kernel_args(m)
    if isinstance(m, QuantLinear):
        return fused.fused_linear(x, m._plan, *params, m.bias, cfg)
    return fused.fused_conv2d(x, m._plan, *params, m.bias, m.stride, m.padding, m.dilation, cfg)


def run_op(m, x, w):
    if isinstance(m, QuantLinear):
        return F.linear(x, w, m.bias)
    return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)


def grid(rows: int):
    """Launch shapes to try: BLOCK_M as the default picks it (one M tile where it can), the rest varied."""
    bm = fused.choose_config(rows, 1280, 11520, 4).block_m
    for bn, bk, warps in itertools.product((32, 64, 128), (32, 64), (4,)):
        for split in (1, 2, 4, 8, 16):
            yield fused.FusedConfig(bm, bn, bk, split, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--max-rows", type=int, default=512)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs-out", default=None)
    ap.add_argument("--grid-max-rows", type=int, default=256,
                    help="search launch shapes only for layers of at most this many rows (the rest: default)")
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds for the grid search")
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.time()
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev, recipe=load_recipe(args.recipe),
                          grouped_dequant=False)
    unet = pipe.unet
    lat, t, ctx = _unet_inputs(pipe, 2, 512, dev, unet.dtype)
    layers = capture(unet, args.max_rows, (lat, t, ctx))
    print(f"{len(layers)} distinct weight-bound layer shapes ({sum(v[2] for v in layers.values())} layers), "
          f"built in {time.time() - t0:.0f}s", flush=True)
    rows_out, tuned = [], []
    totals = {"dense": 0.0, "dequant_op": 0.0, "fused_default": 0.0, "fused_best": 0.0}
    deadline = time.time() + args.time_budget
    with torch.inference_mode():
        for key, (m, x, count, rows) in layers.items():
            w = m.dequantized_weight()
            ref = run_op(m, x, w)
            got = run_fused(m, x)
            err = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
            r = {"layer": key[0], "input": list(key[1]), "weight": list(key[2]), "bits": key[3], "rows": rows,
                 "count": count, "rel_err_vs_dequant_op": err,
                 "dense_ms": graph_ms(lambda: run_op(m, x, w)),
                 "dequant_op_ms": graph_ms(lambda: run_op(m, x, m.dequantized_weight())),
                 "fused_default_ms": graph_ms(lambda: run_fused(m, x)),
                 "default_config": list(fused.choose_config(rows, m._plan.shape[0],
                                                            m._plan.numel // m._plan.shape[0], m.bits,
                                                            fused._sms(dev)))}
            best = (r["fused_default_ms"], r["default_config"])
            if rows <= args.grid_max_rows:
                for cfg in grid(rows):
                    if time.time() > deadline:
                        r["grid_cut"] = True
                        break
                    try:
                        ms = graph_ms(lambda: run_fused(m, x, cfg))
                    except Exception as e:  # a launch shape Triton cannot compile (resources)
                        print("  skip", cfg, type(e).__name__, flush=True)
                        continue
                    if ms < best[0]:
                        best = (ms, list(cfg))
            r["fused_best_ms"], r["best_config"] = best
            rows_out.append(r)
            for k in totals:
                totals[k] += count * r[{"dense": "dense_ms", "dequant_op": "dequant_op_ms",
                                        "fused_default": "fused_default_ms", "fused_best": "fused_best_ms"}[k]]
            N, K = m._plan.shape[0], m._plan.numel // m._plan.shape[0]
            tuned.append({"kind": "linear" if isinstance(m, QuantLinear) else "conv", "plan": m._plan_key,
                          "M": rows, "N": N, "K": K, "bits": m.bits, "config": best[1], "fused_ms": best[0],
                          "unfused_ms": r["dequant_op_ms"]})
            print(f"{key[0]:11s} rows {rows:4d} w {tuple(key[2])} {key[3]}b x{count}: dense {r['dense_ms']:.4f} "
                  f"dequant+op {r['dequant_op_ms']:.4f} fused {r['fused_default_ms']:.4f} best {best[0]:.4f} "
                  f"{best[1]} err {err:.1e}", flush=True)
            write(args, rows_out, tuned, totals, len(layers))   # after every layer: a cut run keeps its numbers
    print("per UNet step (ms):", {k: round(v, 3) for k, v in totals.items()})


def write(args, rows_out: list, tuned: list, totals: dict, shapes: int) -> None:
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "recipe": args.recipe,
           "max_rows": args.max_rows, "shapes": shapes, "shapes_done": len(rows_out), "totals_ms_per_step": totals,
           "layers": rows_out}
    Path(args.out).write_text(json.dumps(out, indent=1))
    if args.configs_out:
        Path(args.configs_out).write_text(json.dumps(tuned, indent=1))

if __name__ == "__main__":
    main()
