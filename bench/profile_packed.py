"""Where does a packed UNet step's time go?  (GPU only; numbers for BENCHMARKS.md)

    python bench/profile_packed.py --recipe recipes/paper-final.yaml --out OUT.json [--compare OLD.py]

1. The dequant kernels alone: every packed layer of the sd15-arch UNet rebuilt once, timed
   eager (Python launch per layer) and as one captured CUDA graph replay (GPU time only), with
   the effective bandwidth (packed bytes read + dense bytes written).  ``--compare`` times another
   kernel module with the same ``dequantize(...)`` signature the same way (an earlier version).
2. Eager UNet steps (batch 2, 512²) of dense fp16 and packed, under torch.profiler: the sum of
   GPU kernel time per step by kernel family, so launch gaps and kernel time are told apart.
3. With ``--compiled``: the same for ``torch.compile(unet)`` (Inductor, no CUDA graphs, so every
   kernel is visible), dense and packed: which kernels the compiled packed step adds besides the
   dequant (e.g. weight layout conversions Inductor inserts after the opaque custom op).
4. The step's decode as a grouped compiled step runs it (one launch per dequant group), one CUDA
   graph replay per group size cap (``--group-caps``, MiB; 0 = one launch per layer).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.bench.core import (BenchConfig, _unet_inputs, build_pipeline, cuda_graph_ms, cuda_time_ms,  # noqa: E402
                                weight_bytes)
from quantsd.dequant_groups import launch_counts  # noqa: E402
from quantsd.nn import packed_modules  # noqa: E402
from quantsd.recipe import load_recipe  # noqa: E402


def _events_ms(fn, iters: int = 10, warmup: int = 3) -> float:
    return cuda_time_ms(fn, iters, warmup)["median"]


def _graph_ms(fn) -> float:
    """GPU time of ``fn`` captured in one CUDA graph (no launch overhead)."""
    return cuda_graph_ms(fn)


def dequant_alone(unet, compare_path: str | None) -> dict:
    layers = [m for _, m in packed_modules(unet)]
    moved = sum(m.nbytes_packed + 2 * m._plan.numel for m in layers)  # read codes+scales, write fp16

    def ours():
        for m in layers:
            m.dequantized_weight()

    out = {"layers": len(layers), "bytes_moved": moved,
           "current": {"eager_ms": _events_ms(ours), "graph_ms": _graph_ms(ours)}}
    if compare_path:
        spec = importlib.util.spec_from_file_location("old_dequant", compare_path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)

        def theirs():
            for m in layers:
                old.dequantize(m.weight_packed, m.weight_shape, m.bits, m.method, m.granularity, m.weight_scale,
                               m.weight_breakpoint, torch.float16)

        out["compare"] = {"path": compare_path, "eager_ms": _events_ms(theirs), "graph_ms": _graph_ms(theirs)}
    for k in ("current", "compare"):
        if k in out:
            out[k]["graph_GBps"] = moved / out[k]["graph_ms"] / 1e6
    # the slowest layers, each in its own graph
    per = []
    for m in layers:
        per.append((_graph_ms(lambda m=m: m.dequantized_weight()), m.weight_shape, m.bits, m.method))
    per.sort(key=lambda r: -r[0])
    out["slowest_layers"] = [{"ms": round(t, 4), "shape": list(s), "bits": b, "method": me} for t, s, b, me in per[:8]]
    out["sum_single_layer_graph_ms"] = sum(r[0] for r in per)
    return out


def grouped_decode(unet) -> tuple:
    """(decode, stats): ``decode()`` rebuilds every packed layer's weight as a grouped compiled step
    does (one launch per group of :mod:`quantsd.dequant_groups`, one per layer outside a group) and
    returns the buffers; ``stats`` counts groups, lone layers and launches."""
    layers = [m for _, m in packed_modules(unet)]
    groups = list({id(m._dq_group): m._dq_group for m in layers if m._dq_group is not None}.values())
    singles = [m for m in layers if m._dq_group is None]
    dtypes = [g.members[0]._dtype for g in groups]

    def decode():
        return [g.flat(d) for g, d in zip(groups, dtypes)] + [m.dequantized_weight() for m in singles]

    return decode, {**launch_counts(unet), "grouped_layers": sum(len(g.members) for g in groups)}


def grouped_alone(unet, caps_mib: list[float], moved: int) -> list[dict]:
    """GPU time of a step's decode (one CUDA graph replay) with the layers grouped under each cap
    (0: no groups, one launch per layer); the UNet is left grouped at the default cap."""
    from quantsd.dequant_groups import DEFAULT_MAX_BYTES, group_dequant, ungroup_dequant

    rows = []
    for cap in caps_mib:
        if cap > 0:
            group_dequant(unet, int(cap * (1 << 20)))
        else:
            ungroup_dequant(unet)
        decode, stats = grouped_decode(unet)
        ms = _graph_ms(decode)
        rows.append({"cap_mib": cap, **stats, "graph_ms": ms, "graph_GBps": moved / ms / 1e6})
        print("grouped decode", json.dumps(rows[-1]), flush=True)
    group_dequant(unet, DEFAULT_MAX_BYTES)
    return rows


def kernel_time_per_step(pipe, steps: int = 5) -> dict:
    unet = pipe.unet
    lat, t, ctx = _unet_inputs(pipe, 2, 512, unet.device, unet.dtype)
    with torch.inference_mode():
        for _ in range(3):
            unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
        torch.cuda.synchronize()
        wall = _events_ms(lambda: unet(lat, t, encoder_hidden_states=ctx, return_dict=False), iters=5, warmup=0)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                unet(lat, t, encoder_hidden_states=ctx, return_dict=False)
            torch.cuda.synchronize()
    fam: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    names: list[tuple[float, int, str]] = []
    for ev in prof.key_averages():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        name = ev.key.lower()
        key = ("dequant" if ("dequant" in name or "group_table" in name)
               else "inductor triton" if name.startswith("triton_") else "attention" if ("flash" in name or "fmha" in name or "attention" in name)
               else "gemm/conv" if any(k in name for k in ("gemm", "conv", "sm90", "xmma", "cutlass", "cudnn", "implicit"))
               else "elementwise/other")
        fam[key] += us / 1000 / steps
        count[key] += ev.count // steps
        names.append((us / 1000 / steps, ev.count // steps, ev.key[:120]))
    names.sort(reverse=True)
    return {"wall_ms": wall, "kernel_ms_per_step": {k: round(v, 3) for k, v in sorted(fam.items())},
            "kernels_per_step": dict(count), "kernel_ms_total": round(sum(fam.values()), 3),
            "top_kernels": [{"ms": round(t, 4), "per_step": c, "name": n} for t, c, n in names[:40]]}


def memory_phases(pipe, side: int = 512) -> dict:
    """Peak allocated bytes above the resident weights in each phase of a 512² CFG generation:
    text encoding, one UNet step (batch 2) and the VAE decode; so the 512² peak can be attributed."""
    dev = pipe.unet.device
    out = {}
    with torch.inference_mode():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        out["resident_bytes"] = base
        ids = pipe.tokenizer(["a photograph of an astronaut riding a horse", ""], padding="max_length",
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        ctx = pipe.text_encoder(ids)[0]
        out["text_encoder_peak_over_resident"] = torch.cuda.max_memory_allocated(dev) - base
        lat, t, _ = _unet_inputs(pipe, 2, side, dev, pipe.unet.dtype)
        base2 = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        pipe.unet(lat, t, encoder_hidden_states=ctx.to(pipe.unet.dtype), return_dict=False)
        out["unet_step_peak_over_resident"] = torch.cuda.max_memory_allocated(dev) - base2
        z = lat[:1] / pipe.vae.config.scaling_factor
        base3 = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        pipe.vae.decode(z, return_dict=False)
        out["vae_decode_peak_over_resident"] = torch.cuda.max_memory_allocated(dev) - base3
    out["weight_bytes"] = {m: weight_bytes(getattr(pipe, m)) for m in ("text_encoder", "unet", "vae")}
    if hasattr(pipe.vae, "encoder"):
        out["weight_bytes"]["vae_encoder"] = weight_bytes(pipe.vae.encoder)
    emb = pipe.text_encoder.get_input_embeddings()
    out["weight_bytes"]["text_token_embedding"] = emb.weight.numel() * emb.weight.element_size()
    return out


def _profile_into(res: dict, name: str, pipe, compiled: bool) -> None:
    """``res[name + "_eager"]`` and, with ``compiled``, ``res[name + "_compiled"]`` (Inductor, no CUDA graphs)."""
    res[f"{name}_eager"] = kernel_time_per_step(pipe)
    print(name, json.dumps({k: v for k, v in res[f"{name}_eager"].items() if k != "top_kernels"}), flush=True)
    if compiled:
        pipe.unet = torch.compile(pipe.unet)
        res[f"{name}_compiled"] = kernel_time_per_step(pipe)
        print(name, "compiled", json.dumps({k: v for k, v in res[f"{name}_compiled"].items() if k != "top_kernels"}), flush=True)
        torch._dynamo.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/paper-final.yaml")
    ap.add_argument("--compare", default=None, help="another dequant kernel module (same dequantize signature)")
    ap.add_argument("--compiled", action="store_true", help="also profile torch.compile'd steps (~75 s compile each)")
    ap.add_argument("--group-caps", default="0,32,96,256",
                    help="MiB caps of dequant groups to time the step's decode with (0: one launch per layer)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    recipe = load_recipe(a.recipe)
    pipe = build_pipeline("sd15-arch", BenchConfig("packed", packed=True), dev, recipe=recipe)
    res["dequant"] = dequant_alone(pipe.unet, a.compare)
    print(json.dumps(res["dequant"], indent=1), flush=True)
    caps = [float(c) for c in a.group_caps.split(",") if c.strip()]
    res["grouped_decode"] = grouped_alone(pipe.unet, caps, res["dequant"]["bytes_moved"])
    res["packed_memory"] = memory_phases(pipe)
    print("packed memory", json.dumps(res["packed_memory"]), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    _profile_into(res, "packed", pipe, a.compiled)
    Path(a.out).write_text(json.dumps(res, indent=1))
    del pipe
    torch.cuda.empty_cache()
    dense = build_pipeline("sd15-arch", BenchConfig("fp16-sdpa"), dev)
    res["dense_memory"] = memory_phases(dense)
    print("dense memory", json.dumps(res["dense_memory"]), flush=True)
    _profile_into(res, "dense", dense, a.compiled)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
